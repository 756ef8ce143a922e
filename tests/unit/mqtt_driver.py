"""Drive a :class:`~proxy.mqtt.session.Session` through its one entry point, ``handle(event)``,
and read the command list back as one :class:`Outcome` per event.

The adapter checks the list's shape on every call (kinds in :data:`~proxy.mqtt.commands.ORDER`,
each at most once), and copies the audit records into a :class:`MemoryAudit` the way the shell's
audit writer would, so a test reads what the session decided from what it returned, never from
its private attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.audit import MemoryAudit
from proxy.identity.model import AuthReason, Identity
from proxy.mqtt import events as ev
from proxy.mqtt.commands import (
    ORDER,
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
from proxy.mqtt.session import Session


@dataclass(eq=False)
class Outcome:
    """What one event made the session ask for, command by command."""
    to_client: list = field(default_factory=list)
    to_broker: list = field(default_factory=list)
    auth: AuthRequest | None = None
    open_upstream: bool = False
    close: Close | None = None
    records: list[Record] = field(default_factory=list)
    counts: dict[Metric, int] = field(default_factory=dict)
    commands: list[Command] = field(default_factory=list)

    def __eq__(self, other: object) -> bool:
        """Equal on what the connection sees (the writes, auth, open, close), not audit or counts."""
        if not isinstance(other, Outcome):
            return NotImplemented
        return (self.to_client, self.to_broker, self.auth, self.open_upstream, self.close) == \
            (other.to_client, other.to_broker, other.auth, other.open_upstream, other.close)

    __hash__ = None  # type: ignore[assignment]


def outcome(commands: list[Command]) -> Outcome:
    kinds = [type(c) for c in commands]
    assert len(set(kinds)) == len(kinds), f"a kind of command twice: {commands}"
    assert kinds == sorted(kinds, key=ORDER.index), f"commands out of order: {kinds}"
    out = Outcome(commands=commands)
    for c in commands:
        if isinstance(c, SendToClient):
            out.to_client = list(c.items)
        elif isinstance(c, SendToBroker):
            out.to_broker = list(c.items)
        elif isinstance(c, Authenticate):
            out.auth = c.request
        elif isinstance(c, OpenUpstream):
            out.open_upstream = True
        elif isinstance(c, Close):
            out.close = c
        elif isinstance(c, AuditRecords):
            out.records = list(c.records)
        elif isinstance(c, CountMetrics):
            out.counts = dict(c.counts)
    return out


class Driver:
    """A session and the events a shell would feed it, one method per event."""

    def __init__(self, session: Session, audit: MemoryAudit | None = None):
        self.session = session
        self.audit = audit if audit is not None else MemoryAudit()
        self.counts: dict[Metric, int] = {}

    def handle(self, event: ev.Event) -> Outcome:
        out = outcome(self.session.handle(event))
        for r in out.records:
            self.audit.record(**r.as_kwargs())
        for m, n in out.counts.items():
            self.counts[m] = self.counts.get(m, 0) + n
        return out

    def client_data(self, data: Any) -> Outcome:
        return self.handle(ev.ClientData(data))

    def broker_data(self, data: Any) -> Outcome:
        return self.handle(ev.BrokerData(data))

    def authenticated(self, identity: Identity) -> Outcome:
        return self.handle(ev.Authenticated(identity))

    def authentication_failed(self, reason: AuthReason, method: str = "") -> Outcome:
        return self.handle(ev.AuthenticationFailed(reason, method))

    def tick(self, now: float | None = None) -> Outcome:
        return self.handle(ev.Tick(self.session.clock() if now is None else now))

    def invalidate(self, devices: set[str] | None = None) -> Outcome:
        return self.handle(ev.Invalidated(None if devices is None else frozenset(devices)))

    def broker_closed(self) -> Outcome:
        return self.handle(ev.BrokerClosed())

    def client_closed(self) -> Outcome:
        return self.handle(ev.ClientClosed())

    def shutdown(self) -> Outcome:
        return self.handle(ev.Shutdown())

    def __getattr__(self, name: str) -> Any:  # the session's public state: closed, identity, next_deadline()...
        return getattr(self.session, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("session", "audit", "counts"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.session, name, value)
