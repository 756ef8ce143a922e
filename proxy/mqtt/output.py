"""What one call of the session produces, gathered while it runs, and the pass-through run.

:class:`Output` collects the writes of one :meth:`Session.handle` call per side and turns
them, with the audit records and counts, into the ordered command list
(:data:`proxy.mqtt.commands.ORDER`). :class:`End` is how a piece of the session says the
connection ends. :class:`Run` joins consecutive pass-through packets of
one chunk into one slice of the buffer they came in, made only when the run ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from proxy.mqtt.codec import Frame
from proxy.mqtt.commands import (
    AuditRecords,
    Authenticate,
    AuthRequest,
    Close,
    Command,
    CountMetrics,
    Metric,
    OpenUpstream,
    Record,
    SendToBroker,
    SendToClient,
)
from proxy.mqtt.events import Buffer

__all__ = ["End", "Output", "Run"]


class Output:
    """The writes of one call, each side in order, and what else it asks (authenticate, open the
    upstream, close). A plain slotted class, not a dataclass: one is made per chunk read, on the hot path."""

    __slots__ = ("to_client", "to_broker", "auth", "open_upstream", "close", "run")

    def __init__(self) -> None:
        self.to_client: list[Buffer] = []
        self.to_broker: list[Buffer] = []
        self.auth: AuthRequest | None = None
        self.open_upstream = False
        self.close: Close | None = None
        self.run: Run | None = None  # the pass-through run of this call's chunk, if one is open

    def forward(self, out: list[Buffer], frame: Frame, view: memoryview | None) -> None:
        """Forward a packet unchanged to ``out`` (``to_client`` or ``to_broker``); neighbours from
        the same chunk join into one slice (made once the run ends, in :meth:`end_run`)."""
        if frame.start < 0 or view is None:
            self.end_run()
            out.append(frame.raw)
            return
        run = self.run
        if run is not None and run.extends(out, frame.start):
            run.end_at = frame.end
            run.grown = True
            return
        self.end_run()
        out.append(frame.raw)
        self.run = Run(out, frame.start, frame.end, view)

    def end_run(self) -> None:
        """End the pass-through run: whatever is written next comes after it."""
        run = self.run
        if run is not None:
            self.run = None
            run.end()

    def commands(self, records: list[Record], counts: list[tuple[Metric, int]] | None) -> list[Command]:
        """The commands, in ORDER; takes (and empties) ``records``."""
        out: list[Command] = []
        if self.to_client:
            out.append(SendToClient(self.to_client))
        if self.open_upstream:
            out.append(OpenUpstream())
        if self.to_broker:
            out.append(SendToBroker(self.to_broker))
        if self.auth is not None:
            out.append(Authenticate(self.auth))
        if records:
            out.append(AuditRecords(records[:]))
            records.clear()
        if counts:
            out.append(CountMetrics(counts))
        if self.close is not None:
            out.append(self.close)
        return out


class End(NamedTuple):
    """A piece of the session says the connection ends: the session carries it out (the Will
    decided, the connection's holdings given back), as :class:`~proxy.mqtt.commands.Close`."""
    reason: str
    detail: str = ""
    disconnect: int | None = None  # v5: the DISCONNECT reason code the client is told first
    connack: int | None = None     # before CONNACK: refuse with this code (v5; the 3.1.1 one for it)
    code: int | None = None        # the code the client was already sent (Close.reason_code)


class Run:
    """Pass-through packets forwarded unchanged from one buffer: ``out[index]`` stands for
    ``view[start:end]`` once :meth:`end` is called (until then it holds the first packet alone)."""

    __slots__ = ("out", "index", "start", "end_at", "view", "grown")

    def __init__(self, out: list[Buffer], start: int, end_at: int, view: memoryview) -> None:
        self.out = out
        self.index = len(out) - 1
        self.start = start
        self.end_at = end_at
        self.view = view
        self.grown = False  # more than the item already in out[index]

    def extends(self, out: Sequence[Buffer], start: int) -> bool:
        """Whether a packet at ``start`` of the same buffer, going to ``out``, continues this run."""
        return self.out is out and self.index == len(out) - 1 and self.end_at == start

    def end(self) -> None:
        if self.grown:
            self.out[self.index] = self.view[self.start:self.end_at]
