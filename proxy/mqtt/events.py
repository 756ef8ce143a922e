"""What happens to an MQTT connection: the events the shell feeds :meth:`Session.handle`.

The shape of mitmproxy's ``proxy/events.py`` and h11's ``_events.py``: small frozen
records, one per thing that happened, and nothing else goes into the session. Time
enters only as :class:`Tick` ``now`` (the session's monotonic clock, the value
:meth:`~proxy.mqtt.session.Session.next_deadline` speaks in); the bytes of
:class:`ClientData` / :class:`BrokerData` may be a ``memoryview`` of a buffer the
shell reuses (see :mod:`proxy.mqtt.commands` for how long it must stay unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.identity.model import AuthReason, Identity

__all__ = ["Authenticated", "AuthenticationFailed", "BrokerClosed", "BrokerData", "Buffer", "ClientClosed",
           "ClientData", "ConnectRefused", "Event", "Invalidated", "Shutdown", "Tick"]

#: Bytes as the shell reads them (any split, down to one byte at a time).
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of everything :meth:`Session.handle` takes."""


@dataclass(frozen=True, slots=True)
class ClientData(Event):
    """Bytes read from the client."""
    data: Buffer


@dataclass(frozen=True, slots=True)
class BrokerData(Event):
    """Bytes read from the broker."""
    data: Buffer


@dataclass(frozen=True, slots=True)
class Authenticated(Event):
    """The answer to :class:`~proxy.mqtt.commands.Authenticate`: the credentials are this identity."""
    identity: Identity


@dataclass(frozen=True, slots=True)
class AuthenticationFailed(Event):
    """The answer to :class:`~proxy.mqtt.commands.Authenticate`: refused (``method``: which
    verifier was asked, for the metrics)."""
    reason: AuthReason
    method: str = ""


@dataclass(frozen=True, slots=True)
class Tick(Event):
    """The session's deadline has come (``next_deadline()``); ``now`` on the session's clock."""
    now: float


@dataclass(frozen=True, slots=True)
class ClientClosed(Event):
    """The client connection ended, however it ended, unless the session closed it itself."""


@dataclass(frozen=True, slots=True)
class BrokerClosed(Event):
    """The upstream connection failed to open or was lost."""


@dataclass(frozen=True, slots=True)
class Invalidated(Event):
    """Policies were reloaded or ownership facts changed (``devices``: the ids an ownership
    write touched; None: anything may have changed)."""
    devices: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class ConnectRefused(Event):
    """The shell refuses a CONNECT whose credentials were good, for a quota of its own (a
    reconnect back-off): answer it instead of :class:`Authenticated`."""
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Shutdown(Event):
    """Graceful server shutdown."""
