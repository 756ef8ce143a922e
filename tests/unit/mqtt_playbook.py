"""Playbook tests for the MQTT session, in the shape of mitmproxy's ``test/mitmproxy/proxy/tutils.py``.

A test reads as the conversation it checks::

    assert (
        Playbook(session)
        >> ClientData(connect_packet())
        << Authenticates(kind="connect", username="alice")
        >> Authenticated(ALICE)
        << OpenUpstream()
        << ToBroker(upstream_connect)
        << Audit(action="connect", decision="allow")
    )

``>> event`` feeds :meth:`Session.handle` (through its one entry point, nothing else of the
session is touched) and ``<< expectation`` takes the next command it returned: every command
must be expected, in the order the session returned them, and nothing may be left over when
the playbook is asserted. Unlike mitmproxy's, each step is checked when it is written, so a
test may change its clock between two ``assert playbook >> ...`` statements, and a failure
points at the line that expected something else.

Expectations: a :class:`~proxy.mqtt.commands.Command` instance matches an equal command;
:class:`ToClient` / :class:`ToBroker` match the packets written (decoded at packet boundaries,
however the session grouped its slices); :class:`Audit`, :class:`Counts`, :class:`Closes` and
:class:`Authenticates` match the fields they name. :class:`~proxy.mqtt.commands.CountMetrics`
are not checked unless the playbook is made with ``counts=True`` (they are asserted where they
are the point), as mitmproxy's playbooks leave out log lines unless asked.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.mqtt import codec
from proxy.mqtt.codec import Frame, Framer
from proxy.mqtt.commands import (
    AuditRecords,
    Authenticate,
    Close,
    Command,
    CountMetrics,
    Metric,
    SendToBroker,
    SendToClient,
)
from proxy.mqtt.events import Buffer, Event
from proxy.mqtt.packets import PacketType
from proxy.mqtt.session import Session

__all__ = ["Audit", "Authenticates", "Closes", "Counts", "Packet", "Playbook", "ToBroker", "ToClient", "connack_code",
           "disconnect_code", "packets"]


def packets(items: list[Buffer] | tuple[Buffer, ...]) -> list[Frame]:
    """The whole packets of a send's items (the session never writes a partial one)."""
    data = b"".join(bytes(i) for i in items)
    frames = Framer(1 << 28).feed(data)
    assert sum(len(f.raw) for f in frames) == len(data), "a send ends inside a packet"
    return frames


@dataclass(frozen=True)
class Packet:
    """One packet of a send, by its type and whatever the test says of it (``check``: the frame ->
    True when it is the one meant); ``what`` is how a failure names it."""
    type: PacketType
    what: str = ""
    check: Callable[[Frame], bool] | None = None

    def matches(self, frame: Frame) -> bool:
        return frame.type == self.type and (self.check is None or self.check(frame))

    def __repr__(self) -> str:
        return f"{self.type.name}({self.what})" if self.what else self.type.name


PacketSpec = bytes | Packet


class Expectation(abc.ABC):
    """What one ``<<`` line says of the next command."""

    @abc.abstractmethod
    def mismatch(self, command: Command) -> str | None:
        """None if ``command`` is the one meant, else why not."""


def _packets_mismatch(kind: type[Command], specs: tuple[PacketSpec, ...], command: Command) -> str | None:
    if not isinstance(command, kind):
        return f"expected {kind.__name__}, got {command!r}"
    assert isinstance(command, SendToClient | SendToBroker)
    frames = packets(list(command.items))
    if len(frames) != len(specs):
        return f"expected {len(specs)} packet(s) {specs!r}, got {[bytes(f.raw) for f in frames]!r}"
    for i, (spec, frame) in enumerate(zip(specs, frames, strict=True)):
        ok = bytes(frame.raw) == spec if isinstance(spec, bytes) else spec.matches(frame)
        if not ok:
            return f"packet {i}: expected {spec!r}, got {bytes(frame.raw)!r}"
    return None


class ToClient(Expectation):
    """A :class:`SendToClient` of exactly these packets, in this order."""

    def __init__(self, *specs: PacketSpec):
        self.specs = specs

    def mismatch(self, command: Command) -> str | None:
        return _packets_mismatch(SendToClient, self.specs, command)

    def __repr__(self) -> str:
        return f"ToClient{self.specs!r}"


class ToBroker(Expectation):
    """A :class:`SendToBroker` of exactly these packets, in this order."""

    def __init__(self, *specs: PacketSpec):
        self.specs = specs

    def mismatch(self, command: Command) -> str | None:
        return _packets_mismatch(SendToBroker, self.specs, command)

    def __repr__(self) -> str:
        return f"ToBroker{self.specs!r}"


class Audit(Expectation):
    """An :class:`AuditRecords` of as many records as given, each with the fields named
    (``Audit(dict(action="connect", decision="deny"), ...)``, or one record as keywords)."""

    def __init__(self, *records: Mapping[str, Any], **one: Any):
        assert not (records and one), "records or one record's fields, not both"
        self.records = records if records else (one,)

    def mismatch(self, command: Command) -> str | None:
        if not isinstance(command, AuditRecords):
            return f"expected audit records {self.records!r}, got {command!r}"
        got = [r.as_kwargs() for r in command.records]
        if len(got) != len(self.records):
            return f"expected {len(self.records)} record(s) {self.records!r}, got {got!r}"
        for want, record in zip(self.records, got, strict=True):
            wrong = {k: record.get(k, "<absent>") for k, v in want.items() if record.get(k, "<absent>") != v}
            if wrong:
                return f"record {record!r}: expected {dict(want)!r}, these differ: {wrong!r}"
        return None

    def __repr__(self) -> str:
        return f"Audit{self.records!r}"


class Counts(Expectation):
    """A :class:`CountMetrics` with exactly these counts (only with ``Playbook(counts=True)``)."""

    def __init__(self, counts: Mapping[Metric, int]):
        self.counts = dict(counts)

    def mismatch(self, command: Command) -> str | None:
        if not isinstance(command, CountMetrics):
            return f"expected counts {self.counts!r}, got {command!r}"
        got = dict(command.counts)
        return None if got == self.counts else f"expected counts {self.counts!r}, got {got!r}"

    def __repr__(self) -> str:
        return f"Counts({self.counts!r})"


class Closes(Expectation):
    """A :class:`Close` with this reason (and the reason code / detail, when given)."""

    _ANY: Any = object()

    def __init__(self, reason: str, *, reason_code: Any = _ANY, detail: Any = _ANY):
        self.want = {"reason": reason, "reason_code": reason_code, "detail": detail}

    def mismatch(self, command: Command) -> str | None:
        if not isinstance(command, Close):
            return f"expected {self!r}, got {command!r}"
        wrong = [k for k, v in self.want.items() if v is not self._ANY and getattr(command, k) != v]
        return f"expected {self!r}, got {command!r}" if wrong else None

    def __repr__(self) -> str:
        return "Closes(" + ", ".join(f"{k}={v!r}" for k, v in self.want.items() if v is not self._ANY) + ")"


class Authenticates(Expectation):
    """An :class:`Authenticate` whose request has the fields named."""

    def __init__(self, **fields: Any):
        self.fields = fields

    def mismatch(self, command: Command) -> str | None:
        if not isinstance(command, Authenticate):
            return f"expected {self!r}, got {command!r}"
        wrong = {k: getattr(command.request, k) for k, v in self.fields.items() if getattr(command.request, k) != v}
        return f"expected {self!r}, these differ: {wrong!r}" if wrong else None

    def __repr__(self) -> str:
        return f"Authenticates({self.fields!r})"


class Playbook:
    """Feed events (``>>``), take the commands they returned one expectation at a time (``<<``);
    ``bool(playbook)`` is True when every command returned so far was expected."""

    def __init__(self, session: Session, *, counts: bool = False):
        self.session = session
        self.counts = counts
        self.pending: list[Command] = []   # returned by the last event, not yet expected
        self.history: list[str] = []       # the conversation so far, for failure messages
        self.taken: list[Command] = []     # every command expected so far, in order

    def __rshift__(self, event: Event) -> Playbook:
        self._all_expected()
        self.history.append(f">> {event!r}")
        commands = self.session.handle(event)
        self.pending = [c for c in commands if self.counts or not isinstance(c, CountMetrics)]
        return self

    def __lshift__(self, expected: Command | Expectation) -> Playbook:
        self.history.append(f"<< {expected!r}")
        if not self.pending:
            raise AssertionError(self._story(f"expected {expected!r}, but nothing more was returned"))
        command = self.pending.pop(0)
        if isinstance(expected, Expectation):
            why = expected.mismatch(command)
        else:
            why = None if command == expected else f"expected {expected!r}, got {command!r}"
        if why is not None:
            raise AssertionError(self._story(why))
        self.taken.append(command)
        return self

    def __bool__(self) -> bool:
        self._all_expected()
        return True

    def _all_expected(self) -> None:
        if self.pending:
            left, self.pending = self.pending, []
            raise AssertionError(self._story(f"commands returned but not expected: {left!r}"))

    def _story(self, why: str) -> str:
        return "\n".join([*self.history[-12:], f"!! {why}"])


def connack_code(code: int, level: int) -> Packet:
    """A CONNACK with this reason code (v5) or return code (3.1.1)."""
    return Packet(PacketType.CONNACK, f"code {code:#x}",
                  lambda f: codec.decode_connack(f.body, level).reason == code)


def disconnect_code(code: int, level: int = 5) -> Packet:
    return Packet(PacketType.DISCONNECT, f"code {code:#x}",
                  lambda f: codec.decode_disconnect(f.body, level).reason == code)
