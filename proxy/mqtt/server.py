"""The asyncio shell around the sans-IO MQTT session: the listeners and what is shared
between connections.

The shell reads, in the order the data goes through it: :mod:`proxy.mqtt.sockets` (the
sockets' protocols, TLS on ``ssl.MemoryBIO``, the shared receive buffers, closing without
losing bytes), :mod:`proxy.mqtt.connection` (one client's pump: events to its session, the
session's commands carried out in order, its timer, its broker connection),
:mod:`proxy.mqtt.shell_metrics` (the counters), and this module, :class:`MqttGateway`:

* the listeners (TCP, plain or TLS; the WebSocket listener of :mod:`proxy.mqtt.websocket`),
  bound with ``SO_REUSEPORT`` when ``keygate serve --workers N`` shares the port;
* admission at accept (:meth:`MqttGateway.accept_transport`), for every listener, before
  any TLS state exists: ``mqtt.max_connections`` (WebSocket sockets count from accept, not
  from their upgrade), then the per-address limits on connections not yet past CONNACK
  (:class:`~proxy.mqtt.admission.AddressLimiter`: a cap and a token bucket per address). A
  refused socket is aborted at once, counted in ``keygate_mqtt_connections_refused{reason}``
  and audited at most once a second per address with a count. A connection gives its
  address's place back when the session reports ``established`` (CONNACK passed on) or when
  it ends. After authentication: ``connections_per_identity`` and the reconnect back-off;
* the registry of open connections, and the fan-out of invalidations to them (an ownership
  write or a policy swap re-checks every open session at once); shutdown;
* what sessions share: the rate limiter, the subscription and QoS 2 quotas, the persistent
  sessions' admission, device presence, the audit writer; and what a connection asks of the
  gateway (authentication, the broker dial, the lingering-close budget).

Runs on the stdlib loop or uvloop (``keygate serve`` installs uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from proxy.config import parse_hostport, read_secret
from proxy.identity.model import AuthError, AuthReason, Identity
from proxy.mqtt import events as ev
from proxy.mqtt.admission import (
    CONNECTIONS_PER_IDENTITY,
    RECONNECT_PENALTY,
    AddressLimiter,
    ReconnectPenalty,
    RefusalFolder,
    address_key,
)
from proxy.mqtt.audit_writer import AuditWriter
from proxy.mqtt.cleaner import clear_device
from proxy.mqtt.commands import AuthRequest, Command, Record
from proxy.mqtt.connection import Connection
from proxy.mqtt.handshake import classify_credentials
from proxy.mqtt.persistent import PERSISTENT_SESSIONS, Handle, PersistentSessions
from proxy.mqtt.presence import DevicePresence
from proxy.mqtt.session import Session
from proxy.mqtt.shell_metrics import (
    CONNECTIONS_ACTIVE,
    CONNECTIONS_REFUSED,
    CONNECTIONS_TOTAL,
    LINGER_REFUSED,
    REFUSED_BY_REASON,
)
from proxy.mqtt.sockets import (
    CLIENT_READ_SIZE,
    RECV_BUFFER_SIZE,
    WRITE_HIGH,
    WRITE_LOW,
    BrokerSide,
    PlainClientSide,
    TlsClientSide,
    lingering_close,
    server_ssl_context,
)
from proxy.mqtt.subscriptions import SubscriptionQuota
from proxy.mqtt.transport import Transport
from proxy.ratelimit import RateLimiter
from proxy.services import Services
from proxy.sharing import reuse_port
from proxy.tls import PeerCertificate, peer_certificate

if TYPE_CHECKING:
    from proxy.mqtt.websocket import WebSocketListener

log = logging.getLogger("keygate.mqtt")

__all__ = ["MqttGateway"]


def _peer_certificate(ssl_object: ssl.SSLObject | None) -> PeerCertificate | None:
    return peer_certificate(ssl_object) if ssl_object is not None else None


class MqttGateway:
    """The MQTT listeners (TLS, optional secure WebSocket) in front of one broker."""

    def __init__(self, services: Services):
        if services.config.mqtt is None:
            raise ValueError("the configuration has no mqtt section")
        self.services = services
        self.config = services.config
        self.mqtt = services.config.mqtt
        self.max_packet_size = self.mqtt.max_packet_size
        self.connections: set[Connection] = set()
        self.recv_buffer = memoryview(bytearray(RECV_BUFFER_SIZE))
        self.tls_buffer = memoryview(bytearray(RECV_BUFFER_SIZE))  # ciphertext, before decryption
        self.client_read_buffer = self.recv_buffer[:CLIENT_READ_SIZE]
        self.tls_read_buffer = self.tls_buffer[:CLIENT_READ_SIZE]
        self.rate_limiter = RateLimiter.from_config(self.mqtt.rate_limit)
        limits = self.mqtt.limits
        # Entries holding connections never outnumber max_connections; the rest is room for
        # buckets still refilling.
        self.address_limiter = AddressLimiter(limits.unauthenticated_per_address,
                                              limits.unauthenticated_rate_per_address,
                                              limits.unauthenticated_burst_per_address,
                                              max_entries=2 * self.mqtt.max_connections + 1024)
        self._report_timer: asyncio.TimerHandle | None = None
        self.penalty = ReconnectPenalty(limits.reconnect_penalty_initial_seconds,
                                        limits.reconnect_penalty_max_seconds,
                                        max_entries=2 * self.mqtt.max_connections + 1024)
        self.subscription_quota = SubscriptionQuota(self.mqtt.limits.subscriptions_per_identity)
        self.qos2_budget = SubscriptionQuota(self.mqtt.limits.qos2_hold_bytes_per_identity)  # (bytes)
        # The sessions' audit lines, written off the event loop in batches.
        self.audit_writer = AuditWriter(services.audit)
        self.persistent = PersistentSessions(limits.persistent_sessions_per_identity,
                                             limits.persistent_session_expiry_seconds, self.subscription_quota)
        self._persistent_handles: dict[Session, Handle] = {}  # an authenticated session -> its admission
        self._connections_of: dict[str, int] = {}  # identity -> its authenticated connections
        self.presence = DevicePresence()  # devices connected now, and when last seen (the portal shows it)
        # Refusals folded per address / identity (one audit line per key and second, with counts).
        self.refusals = RefusalFolder(max_entries=2 * self.mqtt.max_connections + 1024)
        self.lingering = 0  # sockets in a lingering close (bounded by limits.lingering_sockets_max)
        self.port: int | None = None
        self.ws_port: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ws: WebSocketListener | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._upstream_password = read_secret(self.mqtt.upstream_password, self.mqtt.upstream_password_file,
                                              self.config)
        self._accepting = False

    # -- lifecycle
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.audit_writer.start(self.loop)
        self.ssl_context = server_ssl_context(self.config) if self.mqtt.tls else None
        host, port = parse_hostport(self.mqtt.listen)
        self._accepting = True
        side = TlsClientSide if self.ssl_context is not None else PlainClientSide
        self._server = await self.loop.create_server(lambda: side(self), host, port, backlog=1024,
                                                     reuse_address=True, reuse_port=reuse_port() or None)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.mqtt.websocket_listen:
            from proxy.mqtt.websocket import WebSocketListener

            self._ws = WebSocketListener(self)
            whost, wport = parse_hostport(self.mqtt.websocket_listen)
            self.ws_port = await self._ws.start(whost, wport, self.ssl_context)
        # Revocation: any ownership or policy change re-checks every open session at once.
        self._unsubscribe.append(self.services.policies.subscribe(lambda _: self._invalidate_all(None)))
        self._unsubscribe.append(self.services.ownership.facts.subscribe(self._invalidate_all))
        # A deleted device's retained messages and broker session go with it (owed durably: a
        # clean-up that fails is retried, and the id stays unregistrable until it is done).
        ownership = self.services.ownership
        ownership.set_broker_clearer(self.clear_device)
        self._unsubscribe.append(lambda: ownership.set_broker_clearer(None))
        log.info("MQTT gateway listening on %s:%s%s (%s)", host, self.port,
                 f", WebSocket on {self.ws_port}" if self.ws_port else "", "TLS" if self.ssl_context else "plain")

    async def stop(self) -> None:
        """Stop accepting, tell every client (v5: DISCONNECT 0x8B), close everything."""
        self._accepting = False
        for unsub in self._unsubscribe:
            with contextlib.suppress(Exception):
                unsub()
        self._unsubscribe.clear()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self._ws is not None:
            await self._ws.stop()
            self._ws = None
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        self._report_refusals(everything=True)
        await asyncio.sleep(0)  # let the closing transports flush their DISCONNECTs
        await self.audit_writer.close()

    # -- connections
    def new_session(self) -> Session:
        session = Session(config=self.mqtt, policies=self.services.policies,
                          rate_limiter=self.rate_limiter, token_leeway=self.config.oidc.leeway_seconds,
                          upstream_password=self._upstream_password,
                          credential_problem=self.services.ownership.credential_problem,
                          subscription_quota=self.subscription_quota, qos2_budget=self.qos2_budget,
                          admit_connect=None)
        # Per session, so that its close is counted against its own admission (a generation).
        session.admit_connect = functools.partial(self._admit_persistent, session)
        return session

    def accept_transport(self, transport: Transport, session: Session | None = None, *,
                         websocket: bool = False) -> Connection | None:
        """A new client socket, at accept (before its TLS handshake or WebSocket upgrade):
        a Connection, counted and under its CONNECT deadline from now, or None (refused)."""
        if not self._accepting or len(self.connections) >= self.mqtt.max_connections:
            why = "max_connections" if self._accepting else "shutting_down"
            CONNECTIONS_REFUSED.labels(why).inc()
            transport.abort()
            return None
        peer = transport.get_extra_info("peername")
        address = None
        if self.address_limiter.enabled and isinstance(peer, tuple):
            address = address_key(peer[0])
            if self.penalty.enabled:  # closed for flooding a moment ago: refused before its TLS handshake
                refused, count = self.penalty.refused("address " + address)
                if refused:
                    REFUSED_BY_REASON[RECONNECT_PENALTY].inc()
                    transport.abort()
                    if count:
                        self._audit_folded("address " + address, {RECONNECT_PENALTY: count})
                    self._arm_report_timer()
                    return None
            refusal, count = self.address_limiter.admit(address)
            if refusal is not None:
                REFUSED_BY_REASON[refusal].inc()
                transport.abort()
                if count:
                    self._audit_folded("address " + address, {refusal: count})
                self._arm_report_timer()
                return None
        if not websocket:
            cast(asyncio.Transport, transport).set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)  # a socket's
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = session or self.new_session()
        session.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        conn = Connection(self, transport, session, websocket=websocket)
        conn.address = conn.peer_key = address
        self.connections.add(conn)
        CONNECTIONS_ACTIVE.inc()
        CONNECTIONS_TOTAL.labels("websocket" if websocket else "tcp").inc()
        conn.schedule()  # the CONNECT deadline runs from accept
        return conn

    def linger_close(self, raw: asyncio.Transport) -> None:
        """Close a client socket with a lingering close, or abort it when ``lingering_sockets_max``
        sockets linger already (each holds a descriptor outside every connection count)."""
        if self.lingering >= self.mqtt.limits.lingering_sockets_max:
            LINGER_REFUSED.inc()
            raw.abort()
            return
        if lingering_close(raw, self.loop, self._linger_done):
            self.lingering += 1

    def _linger_done(self) -> None:
        self.lingering -= 1

    def session_established(self, conn: Connection) -> None:
        """The broker's CONNACK went out (seen once per state change, not per packet)."""
        if conn.address is not None:
            self.release_address(conn)
        identity = conn.session.identity
        if identity is not None and identity.is_device:
            self.presence.up(identity.device_id, id(conn.session))
        handle = self._persistent_handles.get(conn.session)
        if handle is not None:
            self.persistent.reached(handle)

    def upstream_opened(self, session: Session) -> None:
        """The broker connection is up: the session's CONNECT goes to the broker now."""
        handle = self._persistent_handles.get(session)
        if handle is not None:
            handle.sent = True

    def release_address(self, conn: Connection) -> None:
        """The connection authenticated (its CONNACK went out) or ended: its address's place is free."""
        address, conn.address = conn.address, None
        if address is not None:
            self.address_limiter.release(address)

    def penalize(self, conn: Connection) -> None:
        """``conn`` was closed for flooding: its identity and address wait before they connect again."""
        if not self.penalty.enabled:
            return
        identity = conn.session.identity
        if identity is not None:
            self.penalty.penalize("identity " + identity.sub)
        if conn.peer_key is not None:
            self.penalty.penalize("address " + conn.peer_key)

    def _admit_persistent(self, session: Session, identity: Identity, client_id: str, clean_start: bool,
                          expiry: float) -> str | None:
        handle = self.persistent.admit(identity.sub, client_id, clean_start=clean_start, expiry=expiry)
        if handle is None:
            return PERSISTENT_SESSIONS
        self._persistent_handles[session] = handle
        self._connections_of[identity.sub] = self._connections_of.get(identity.sub, 0) + 1
        return None

    def session_closed(self, session: Session) -> None:
        """A connection ended: a persistent session's filters stay charged while the broker keeps it."""
        identity = session.identity
        if identity is not None and identity.is_device:
            self.presence.down(identity.device_id, id(session))
        handle = self._persistent_handles.pop(session, None)
        if handle is not None:
            left = self._connections_of.get(handle.sub, 0) - 1
            if left > 0:
                self._connections_of[handle.sub] = left
            else:
                self._connections_of.pop(handle.sub, None)
            self.persistent.closed(handle, session.subscribed_filters(), session.session_expiry)

    def refuse_penalized(self, session: Session, identity: Identity) -> list[Command] | None:
        """Right after authentication: the refusal of an identity in its reconnect back-off or with
        ``connections_per_identity`` open already, or None."""
        if session.established:  # (a re-authentication is not a connect)
            return None
        limit = self.mqtt.limits.connections_per_identity
        if limit and self._connections_of.get(identity.sub, 0) >= limit:
            REFUSED_BY_REASON[CONNECTIONS_PER_IDENTITY].inc()
            counts = self.refusals.note("identity " + identity.sub, CONNECTIONS_PER_IDENTITY)
            if counts:
                self._audit_folded("identity " + identity.sub, counts)
            self._arm_report_timer()
            return session.handle(ev.ConnectRefused(CONNECTIONS_PER_IDENTITY, "connections per identity"))
        if not self.penalty.enabled:
            return None
        refused, count = self.penalty.refused("identity " + identity.sub)
        if not refused:
            return None
        REFUSED_BY_REASON[RECONNECT_PENALTY].inc()
        if count:
            self._audit_refusal(RECONNECT_PENALTY, identity=identity, count=count)
        self._arm_report_timer()
        return session.handle(ev.ConnectRefused(RECONNECT_PENALTY, "reconnect back-off"))

    def audit_preauth_refusal(self, conn: Connection, why: str, **detail: Any) -> None:
        """A connection refused before authentication (the WebSocket guard): folded per address,
        so a stranger opening connection after connection writes one line a second, with counts."""
        key = "address " + (conn.peer_key or address_key(conn.session.peer.rpartition(":")[0]))
        counts = self.refusals.note(key, why)
        if counts:
            self._audit_folded(key, counts, **detail)
        self._arm_report_timer()

    def _audit_folded(self, key: str, counts: dict[str, int], **detail: Any) -> None:
        kind, _, name = key.partition(" ")
        reasons = sorted(counts)
        fields: dict[str, Any] = {"peer" if kind == "address" else "sub": name, **detail}
        if len(reasons) > 1:
            fields["counts"] = counts
        self._audit_refusal("+".join(reasons), count=sum(counts.values()), **fields)

    def _audit_refusal(self, reason: str, *, identity: Identity | None = None, **extra: Any) -> None:
        """A refused connect, written by the audit writer like the sessions' lines: off the event loop,
        where a flood of refusals is written."""
        self.audit_writer.write([Record("connect", "deny", identity=identity, reason=reason, extra=extra)])

    def _arm_report_timer(self) -> None:
        """Refusals folded into a later line get that line even if the address stops trying."""
        limiter = self.address_limiter
        pending = limiter.reports_pending or self.penalty.reports_pending or self.refusals.reports_pending
        if self._report_timer is None and pending and self.loop is not None:
            self._report_timer = self.loop.call_later(limiter.report_every, self._on_report_timer)

    def _on_report_timer(self) -> None:
        self._report_timer = None
        self._report_refusals()
        self._arm_report_timer()

    def _report_refusals(self, *, everything: bool = False) -> None:
        for address, counts in self.address_limiter.due_reports(everything=everything):
            if counts:
                self._audit_folded("address " + address, counts)
        for key, counts in self.refusals.due_reports(everything=everything):
            self._audit_folded(key, counts)
        for key, count in self.penalty.due_reports(everything=everything):
            kind, _, name = key.partition(" ")
            who: dict[str, Any] = {"peer": name} if kind == "address" else {"sub": name}
            self._audit_refusal(RECONNECT_PENALTY, count=count, **who)

    def forget(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            CONNECTIONS_ACTIVE.dec()

    def _invalidate_all(self, devices: set[str] | None) -> None:
        """An ownership write touched ``devices`` (None: anything, or a policy swap)."""
        for conn in list(self.connections):
            conn.invalidate(devices)

    async def clear_device(self, device_id: str) -> None:
        """A device was deleted (its connections are closed by then): clear its retained
        messages and its session at the broker, so a later registration of the id starts empty.
        Raises when it could not (the ownership service retries)."""
        filters = self.services.policies.compiled.device_topic_filters(device_id)
        audit = self.services.audit
        try:
            cleared = await clear_device(self.mqtt, device_id, filters, upstream_password=self._upstream_password)
        except Exception as exc:  # the broker unreachable or misbehaving: say so, and let it be retried
            audit.record(protocol="mqtt", action="device.clear", decision="fail", resource=device_id,
                         reason=str(exc) or type(exc).__name__)
            raise
        self.persistent.forget(device_id)  # its broker session is gone
        audit.record(protocol="mqtt", action="device.clear", decision="allow", resource=device_id,
                     retained_cleared=len(cleared))

    # -- what connections ask of the gateway
    async def authenticate(self, request: AuthRequest, transport: Transport) -> tuple[str, Identity]:
        """(method, identity) for the credentials of a CONNECT or AUTH; AuthError otherwise."""
        ownership = self.services.ownership
        peer = _peer_certificate(transport.get_extra_info("ssl_object")) if request.kind == "connect" else None
        cred = classify_credentials(request, peer.common_name if peer else None,
                                    lambda name: ownership.facts.device(name) is not None)
        method = cred[0]
        if method == "token" and len(cred) == 2:
            return method, await self.services.tokens.validate(cred[1])
        if method == "device_key" and len(cred) == 3:
            return method, await ownership.authenticate_device_key(cred[1], cred[2])
        if method == "certificate" and len(cred) == 2 and peer is not None:
            # Only a certificate enrolled for the device's current registration counts.
            return method, ownership.device_identity(cred[1], peer.fingerprint)
        raise AuthError(AuthReason.NO_CREDENTIALS)

    async def connect_upstream(self, factory: Callable[[], BrokerSide]) -> tuple[asyncio.BaseTransport, BrokerSide]:
        upstream = self.mqtt.upstream
        timeout = self.mqtt.connect_timeout_seconds
        if self.loop is None:
            raise RuntimeError("self.loop is not set")
        if upstream.startswith("unix:"):
            return await asyncio.wait_for(self.loop.create_unix_connection(factory, upstream[5:]), timeout)
        host, port = parse_hostport(upstream)
        transport, proto = await asyncio.wait_for(self.loop.create_connection(factory, host, port), timeout)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return transport, proto
