"""What the session asks of the shell: the commands :meth:`Session.handle` returns.

The shape of mitmproxy's ``proxy/commands.py``: small frozen records the shell
carries out, in the order of the list. One call returns at most one command of
each kind, always in :data:`ORDER`:

1. :class:`SendToClient` — write the items to the client (one ``writelines``).
2. :class:`OpenUpstream` — connect to the broker now; write what follows once connected
   (if the connection fails, feed :class:`~proxy.mqtt.events.BrokerClosed`).
3. :class:`SendToBroker` — write the items to the broker.
4. :class:`Authenticate` — verify the credentials off the read path; answer with
   :class:`~proxy.mqtt.events.Authenticated` or :class:`~proxy.mqtt.events.AuthenticationFailed`.
5. :class:`AuditRecords` — write the records to the audit log (off the event loop, batched:
   nothing else waits for it).
6. :class:`CountMetrics` — add the counts to the gateway's metrics.
7. :class:`Close` — flush both writes, then close the client and the upstream (already audited).

Items of the sends may be ``memoryview`` slices of the buffer the event carried; consecutive
pass-through packets of one chunk come out as one slice. The buffer must not be overwritten
while a transport still holds unsent data from it: uvloop's ``write()`` keeps the memoryview
itself when the socket does not take it all at once, so a shell that reuses one receive buffer
switches to a fresh one whenever ``get_write_buffer_size()`` is non-zero after its writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from proxy.identity.model import Identity
from proxy.mqtt.events import Buffer

__all__ = ["AuditRecords", "AuthRequest", "Authenticate", "Close", "Command", "CountMetrics", "Metric",
           "ORDER", "OpenUpstream", "Record", "SendToBroker", "SendToClient"]


@dataclass(frozen=True, slots=True)
class Command:
    """Base class of everything :meth:`Session.handle` returns."""


@dataclass(frozen=True, slots=True)
class SendToClient(Command):
    items: Sequence[Buffer]


@dataclass(frozen=True, slots=True)
class OpenUpstream(Command):
    pass


@dataclass(frozen=True, slots=True)
class SendToBroker(Command):
    items: Sequence[Buffer]


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """Credentials for the shell to verify."""
    kind: Literal["connect", "reauth"]
    username: str | None
    password: bytes | None
    auth_method: str | None
    auth_data: bytes | None
    client_id: str

    def __repr__(self) -> str:  # never show a secret in a log line or a traceback
        return (f"AuthRequest(kind={self.kind!r}, username={self.username!r}, "
                f"password={'<set>' if self.password is not None else None}, "
                f"auth_method={self.auth_method!r}, "
                f"auth_data={'<set>' if self.auth_data is not None else None}, client_id={self.client_id!r})")


@dataclass(frozen=True, slots=True)
class Authenticate(Command):
    request: AuthRequest


@dataclass(frozen=True, slots=True)
class Record:
    """One audit line (protocol ``mqtt``), as :meth:`proxy.audit.AuditLog.record` takes it."""
    action: str
    decision: str
    resource: str = ""
    identity: Identity | None = None
    rule: str | None = None
    reason: str | None = None
    extra: Mapping[str, Any] | None = None

    def as_kwargs(self) -> dict[str, Any]:
        return {"protocol": "mqtt", "action": self.action, "decision": self.decision, "resource": self.resource,
                "identity": self.identity, "rule": self.rule, "reason": self.reason, **(self.extra or {})}


@dataclass(frozen=True, slots=True)
class AuditRecords(Command):
    records: Sequence[Record]


class Metric(NamedTuple):
    """A counter of the gateway's (``keygate_mqtt_<name>_total``) with its label values.
    (A tuple: the session counts into a dict keyed by these on the hot path, and a tuple's
    hash is computed in C.)"""
    name: Literal["decisions", "authentications", "rate_limited", "protocol_errors", "messages"]
    labels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CountMetrics(Command):
    counts: Sequence[tuple[Metric, int]]


@dataclass(frozen=True, slots=True)
class Close(Command):
    # One word: protocol_error, connect_timeout, keepalive_timeout, auth_failed, not_authorized,
    # client_id_rejected, token_expired, reauth_failed, rate_limited, denied_publish,
    # client_disconnect, broker_disconnect, broker_refused, broker_closed, buffer_full, shutdown, ...
    reason: str
    detail: str = ""
    reason_code: int | None = None  # the MQTT code sent to the client, if any


#: The order of the commands in every list :meth:`Session.handle` returns.
ORDER: tuple[type[Command], ...] = (SendToClient, OpenUpstream, SendToBroker, Authenticate, AuditRecords,
                                    CountMetrics, Close)
