"""One client connection of the MQTT shell: the pump that feeds its session events and
carries out the commands the session returns, in the order of the list.

Everything that decides lives in :mod:`proxy.mqtt.session`; a :class:`Connection` only
moves bytes and runs what the session asks for:

* whatever the session returns for a chunk leaves in one ``write`` per direction;
* backpressure across the pair: when one side's write buffer passes the high water mark
  (:data:`~proxy.mqtt.sockets.WRITE_HIGH`), the *other* side stops reading until it drains,
  so a slow subscriber slows the broker's delivery to it instead of growing a queue;
* the broker connection is opened only once the session has authenticated the client
  (``OpenUpstream``), so unauthenticated bytes never reach it;
* credentials are checked off the read path (``Authenticate`` -> a task), with the client's
  reading paused meanwhile;
* timers: one ``call_at`` per connection, set to the session's next deadline (CONNECT
  deadline from accept, so it also bounds the TLS handshake and, on the WebSocket listener,
  the HTTP upgrade; keepalive; token expiry), never a task per connection;
* however the connection ends, the session hears of it (``ClientClosed``) before the
  upstream is closed, and the gateway is told (:meth:`MqttGateway.forget` and friends).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

from proxy.identity.model import AuthError, AuthReason
from proxy.mqtt import events as ev
from proxy.mqtt.admission import PENALIZED_CLOSES
from proxy.mqtt.commands import (
    AuditRecords,
    Authenticate,
    AuthRequest,
    Close,
    Command,
    CountMetrics,
    OpenUpstream,
    SendToBroker,
    SendToClient,
)
from proxy.mqtt.events import Buffer
from proxy.mqtt.session import Session
from proxy.mqtt.shell_metrics import BYTES_IN, BYTES_OUT, CONNECTIONS_CLOSED, TALLIED, count_metrics
from proxy.mqtt.sockets import BrokerSide, TlsClientSide, close_upstream, joined
from proxy.mqtt.transport import Transport

if TYPE_CHECKING:
    from proxy.mqtt.server import MqttGateway

log = logging.getLogger("keygate.mqtt")

__all__ = ["Connection"]


class Connection:
    """One client, its session, and (once authenticated) its broker connection."""

    __slots__ = ("gateway", "client", "session", "websocket", "upstream", "_pending_upstream", "_dialing",
                 "_auth_task", "_timer", "_timer_at", "_client_pauses", "_broker_paused", "closed",
                 "close_reason", "_seen_inputs", "address", "peer_key", "_client_tls", "__weakref__")

    def __init__(self, gateway: MqttGateway, transport: Transport, session: Session, *, websocket: bool = False):
        self.gateway = gateway
        self.client = transport
        self._client_tls = type(transport) is TlsClientSide
        self.session = session
        self.websocket = websocket
        self.upstream: asyncio.Transport | None = None
        self._pending_upstream: list[bytes] = []  # CONNECT (and more) while the broker is dialled
        self._dialing: asyncio.Task[None] | None = None
        self._auth_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._client_pauses: set[str] = set()  # why the client's reading is paused
        self._broker_paused = False
        self.closed = False
        self.close_reason = ""
        self._seen_inputs: tuple[object, ...] = ()
        # The address whose unauthenticated place this connection holds, until its CONNACK.
        self.address: str | None = None
        self.peer_key: str | None = None  # the address key, kept for a reconnect penalty

    # -- events from the client side
    def client_data(self, data: Buffer) -> None:
        if self.closed:
            return
        BYTES_IN.value += len(data)
        self.apply(self.session.client_data(data))  # handle(ClientData(data)), without the event

    def client_lost(self, exc: Exception | None) -> None:
        self._teardown()  # tells the session first (its Will may have to be discarded)

    # -- events from the broker side
    def broker_data(self, data: Buffer) -> None:
        if self.closed:
            return
        BYTES_OUT.value += len(data)
        self.apply(self.session.broker_data(data))

    def broker_lost(self, exc: Exception | None) -> None:
        self.upstream = None
        if not self.closed:
            self.apply(self.session.handle(ev.BrokerClosed()))
            if not self.closed:  # the session had nothing to say: the pair is over anyway
                self.close("broker_closed")

    # -- backpressure, across the pair
    def pause_writing(self) -> None:
        """The client is not keeping up: stop reading from the broker."""
        if not self._broker_paused:
            self._broker_paused = True
            if self.upstream is not None:
                self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self._broker_paused:
            self._broker_paused = False
            if self.upstream is not None and not self.upstream.is_closing():
                self.upstream.resume_reading()

    def client_reading(self, on: bool, why: str) -> None:
        pauses = self._client_pauses
        if on:
            if why in pauses:
                pauses.discard(why)
                if not pauses and not self.client.is_closing():
                    self.client.resume_reading()
        elif why not in pauses:
            if not pauses and not self.client.is_closing():
                self.client.pause_reading()
            pauses.add(why)

    # -- carrying out what the session decided, in the order of the list
    def apply(self, commands: list[Command]) -> None:
        # Dispatch on ``type(cmd) is``: cheaper per command than isinstance or match, but mypy
        # does not narrow on it, hence the ignores on the attribute reads below.
        if self.closed:
            return
        for cmd in commands:
            kind = type(cmd)
            if kind is SendToBroker:
                items = cmd.items  # type: ignore[attr-defined]
                # joined(items), inline: once per chunk
                data = items[0] if len(items) == 1 and type(items[0]) is bytes else b"".join(items)
                if self.upstream is not None:
                    self.upstream.write(data)
                elif self._dialing is not None:
                    self._pending_upstream.append(data)
            elif kind is CountMetrics:
                for metric, n in cmd.counts:  # type: ignore[attr-defined]
                    tally = TALLIED.get(metric)  # (count_metrics, inline for the per-chunk counts)
                    if tally is not None:
                        tally.value += n
                    else:
                        count_metrics(((metric, n),))
            elif kind is SendToClient:
                # (the TLS side drops a write after its close itself: no is_closing call first)
                if self._client_tls or not self.client.is_closing():
                    items = cmd.items  # type: ignore[attr-defined]
                    self.client.write(items[0] if len(items) == 1 and type(items[0]) is bytes else b"".join(items))
            elif kind is AuditRecords:
                self.gateway.audit_writer.write(cmd.records)  # type: ignore[attr-defined]
            elif kind is OpenUpstream:
                if self.upstream is None and self._dialing is None:
                    self._dialing = asyncio.ensure_future(self._dial())
            elif kind is Authenticate:
                self._auth_task = asyncio.ensure_future(self._authenticate(cmd.request))  # type: ignore[attr-defined]
            elif kind is Close:
                self.close(cmd.reason)  # type: ignore[attr-defined]
                return
        inputs = self.session.deadline_inputs
        if inputs != self._seen_inputs or self._timer is None:
            # A state change: look at reading and deadlines again. Otherwise the timer
            # already stands at the earliest deadline there can be (it reschedules itself).
            self._seen_inputs = inputs
            if self.session.established:
                self.gateway.session_established(self)
            self.client_reading(not self.session.reading_paused, "session")
            self.schedule()

    # -- authentication, off the read path
    async def _authenticate(self, request: AuthRequest) -> None:
        session = self.session
        try:
            kind = "token"
            try:
                kind, identity = await self.gateway.authenticate(request, self.client)
            except AuthError as exc:
                actions = session.handle(ev.AuthenticationFailed(exc.reason, kind))
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug or a broken store must not leave the client hanging
                log.exception("MQTT authentication failed unexpectedly")
                actions = session.handle(ev.AuthenticationFailed(AuthReason.ISSUER_UNREACHABLE, kind))
            else:
                actions = self.gateway.refuse_penalized(session, identity) or session.handle(ev.Authenticated(identity))
        finally:
            self._auth_task = None
        self.apply(actions)

    # -- the broker connection
    async def _dial(self) -> None:
        try:
            transport, _ = await self.gateway.connect_upstream(lambda: BrokerSide(self))
        except (TimeoutError, OSError) as exc:
            self._dialing = None
            if not self.closed:
                log.warning("MQTT broker unreachable at %s: %s", self.gateway.mqtt.upstream, exc)
                self._pending_upstream.clear()
                self.apply(self.session.handle(ev.BrokerClosed()))
            return
        self._dialing = None
        if self.closed:
            transport.close()
            return
        self.upstream = cast(asyncio.Transport, transport)  # a stream connection's (create_connection)
        self.gateway.upstream_opened(self.session)
        if self._pending_upstream:
            data = b"".join(self._pending_upstream)
            self._pending_upstream.clear()
            self.upstream.write(data)
        if self._broker_paused:
            self.upstream.pause_reading()

    # -- timers: one handle per connection, at the session's next deadline
    def schedule(self) -> None:
        deadline = self.session.next_deadline()
        timer = self._timer
        if deadline is None:
            if timer is not None:
                timer.cancel()
                self._timer = None
            return
        if timer is not None and self._timer_at <= deadline:
            return  # the earlier timer fires first and reschedules (keepalive deadlines only move later)
        if timer is not None:
            timer.cancel()
        loop = self.gateway.loop
        if loop is None:
            raise RuntimeError("the gateway is not started")
        self._timer_at = deadline
        # Session deadlines are time.monotonic() values; the loop's clock may have another origin.
        self._timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()) + 0.001, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self.closed:
            self.apply(self.session.handle(ev.Tick(time.monotonic())))

    # -- revocation and shutdown
    def invalidate(self, devices: set[str] | None = None) -> None:
        if not self.closed:
            self.apply(self.session.handle(ev.Invalidated(None if devices is None else frozenset(devices))))

    def shutdown(self) -> None:
        """The server is going away: the session says so (v5 DISCONNECT 0x8B), then close."""
        if not self.closed:
            self.apply(self.session.handle(ev.Shutdown()))
            self.close("shutdown")

    def close(self, reason: str = "") -> None:
        """Flush what is queued and close both sides."""
        if self.closed:
            return
        self.close_reason = reason
        CONNECTIONS_CLOSED.labels(reason or "unknown").inc()
        self._teardown()

    def _teardown(self) -> None:
        if not self.session.closed:
            # However the connection ends, the session hears of it before the upstream closes:
            # a Will no longer allowed is discarded by the DISCONNECT it returns.
            for cmd in self.session.handle(ev.ClientClosed()):
                if isinstance(cmd, SendToBroker):
                    if self.upstream is not None and not self.upstream.is_closing():
                        self.upstream.write(joined(cmd.items))
                elif isinstance(cmd, AuditRecords):
                    self.gateway.audit_writer.write(cmd.records)
                elif isinstance(cmd, CountMetrics):
                    count_metrics(cmd.counts)
        if not self.closed:
            self.closed = True
            if not self.close_reason:
                self.close_reason = "client_closed"
            self.gateway.session_closed(self.session)
            if self.close_reason in PENALIZED_CLOSES:
                self.gateway.penalize(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in (self._auth_task, self._dialing):
            if task is not None:
                task.cancel()
        self._auth_task = self._dialing = None
        if self.upstream is not None and not self.upstream.is_closing():
            close_upstream(self.upstream, self.gateway.loop)
        if not self.client.is_closing():
            if self.websocket or isinstance(self.client, TlsClientSide) or self.close_reason == "shutdown":
                self.client.close()  # (the TLS side lingers itself, after its close_notify)
            else:
                self.gateway.linger_close(cast(asyncio.Transport, self.client))  # a socket's
        if self.address is not None:
            self.gateway.release_address(self)
        self.gateway.forget(self)
