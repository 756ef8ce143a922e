"""The asyncio shell around the sans-IO MQTT session: listeners and connection pairs.

Everything that decides lives in :mod:`proxy.mqtt.session`; this module only
moves bytes and runs what the session asks for:

* one :class:`Connection` per client, with an ``asyncio.BufferedProtocol`` on
  each side (client and broker). Both read into receive buffers shared by every
  connection of the gateway (a protocol's ``buffer_updated`` runs to completion
  before the loop reads the next socket, so the buffers are free again by then),
  and whatever the session returns for a chunk leaves in one ``write`` per
  direction;
* TLS is done here on ``ssl.MemoryBIO`` (:class:`_TlsClientSide`), decrypting
  into the shared buffer: per idle TLS connection this costs ~22 KiB, against
  ~47 KiB with uvloop's TLS transport and ~280 KiB with the stdlib's (which
  keeps a 256 KiB buffer per connection);
* backpressure across the pair: when one side's write buffer passes the high
  water mark, the *other* side stops reading until it drains, so a slow
  subscriber slows the broker's delivery to it instead of growing a queue;
* the broker connection is opened only once the session has authenticated the
  client (``Actions.open_upstream``), so unauthenticated bytes never reach it;
* credentials are checked off the read path (``Actions.auth`` -> a task), with
  the client's reading paused meanwhile;
* timers: one ``call_at`` per connection, set to the session's next deadline
  (CONNECT deadline from accept, so it also bounds the TLS handshake and, on the
  WebSocket listener, the HTTP upgrade; keepalive; token expiry), never a task
  per connection;
* admission at accept (:meth:`MqttGateway.accept_transport`), for every
  listener, before any TLS state exists: ``mqtt.max_connections`` (WebSocket
  sockets count from accept, not from their upgrade), then the per-address
  limits on connections not yet past CONNACK
  (:class:`~proxy.mqtt.admission.AddressLimiter`: a cap and a token bucket per
  address). A refused socket is aborted at once, counted in
  ``keygate_mqtt_connections_refused{reason}`` and audited at most once a
  second per address with a count. A connection gives its address's place back
  when the session reports ``established`` (CONNACK passed on) or when it ends.

Runs on the stdlib loop or uvloop (``keygate serve`` installs uvloop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from prometheus_client import Counter, Gauge

from proxy.config import Config, parse_hostport, read_secret
from proxy.identity.model import AuthError, AuthReason, Identity
from proxy.metrics import REGISTRY, Tally
from proxy.mqtt import events as ev
from proxy.mqtt.admission import (
    CONNECTIONS_PER_IDENTITY,
    PENALIZED_CLOSES,
    PER_ADDRESS,
    RATE,
    RECONNECT_PENALTY,
    AddressLimiter,
    ReconnectPenalty,
    RefusalFolder,
    address_key,
)
from proxy.mqtt.audit_writer import AuditWriter
from proxy.mqtt.cleaner import clear_device
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
from proxy.mqtt.handshake import classify_credentials
from proxy.mqtt.persistent import PERSISTENT_SESSIONS, Handle, PersistentSessions
from proxy.mqtt.presence import DevicePresence
from proxy.mqtt.session import Session
from proxy.mqtt.subscriptions import SubscriptionQuota
from proxy.mqtt.transport import Transport
from proxy.ratelimit import RateLimiter
from proxy.services import Services
from proxy.sharing import reuse_port
from proxy.tls import PeerCertificate, peer_certificate, server_context

log = logging.getLogger("keygate.mqtt")

__all__ = ["MqttGateway", "Connection", "server_ssl_context"]

# One receive buffer for every connection of a gateway (see the module docstring).
RECV_BUFFER_SIZE = 256 * 1024
# Deliveries first: one read from a client takes at most a quarter of what one read
# from the broker may take. Clients can be slowed down losslessly (TCP backpressure);
# the broker cannot: when the gateway drains it slower than it is fed, it queues, and
# past max_queued_messages it drops QoS 0 messages. Reading publishers in smaller bites
# than deliveries keeps the gateway from feeding the broker faster than it drains it.
CLIENT_READ_SIZE = 64 * 1024
# Write-buffer marks per socket: above HIGH the other side stops reading.
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024

# --------------------------------------------------------------------------- metrics
# Decisions, authentications and rate-limit hits are counted here, as the session's
# CountMetrics commands say (the session itself touches no global).

# Counted per message: tallies (plain integers read at scrape time), not locked counters.
DECISIONS = Tally("keygate_mqtt_decisions", "MQTT authorization decisions", ["action", "result"])
MESSAGES = Tally("keygate_mqtt_messages", "PUBLISH packets forwarded, by direction", ["direction"])
AUTHENTICATIONS = Counter("keygate_mqtt_authentications", "MQTT authentications",
                          ["method", "result"], registry=REGISTRY)
RATE_LIMITED = Counter("keygate_mqtt_rate_limited", "MQTT messages over the per-identity rate limit",
                       registry=REGISTRY)
PROTOCOL_ERRORS = Counter("keygate_mqtt_protocol_errors", "MQTT protocol violations refused",
                          ["side"], registry=REGISTRY)
_SESSION_METRICS: dict[str, Any] = {"decisions": DECISIONS, "messages": MESSAGES, "authentications": AUTHENTICATIONS,
                                    "rate_limited": RATE_LIMITED, "protocol_errors": PROTOCOL_ERRORS}
_CHILDREN: dict[Metric, Any] = {}  # Metric -> its labelled child (a Tally's has .value, a Counter's .inc)


def count_metrics(counts: Any) -> None:
    """Carry out a CountMetrics command."""
    for metric, n in counts:
        child = _CHILDREN.get(metric)
        if child is None:
            parent = _SESSION_METRICS[metric.name]
            child = _CHILDREN[metric] = parent.labels(*metric.labels) if metric.labels else parent
        if hasattr(child, "value"):
            child.value += n
        else:
            child.inc(n)


CONNECTIONS_ACTIVE = Gauge("keygate_mqtt_connections_active", "Open MQTT client connections",
                           registry=REGISTRY)
CONNECTIONS_TOTAL = Counter("keygate_mqtt_connections", "Accepted MQTT client connections",
                            ["transport"], registry=REGISTRY)
CONNECTIONS_REFUSED = Counter("keygate_mqtt_connections_refused", "Connections refused before CONNECT",
                              ["reason"], registry=REGISTRY)
CONNECTIONS_CLOSED = Counter("keygate_mqtt_connections_closed", "MQTT connections closed by the gateway, by reason",
                             ["reason"], registry=REGISTRY)
BYTES = Tally("keygate_mqtt_bytes", "Bytes read, by direction", ["direction"])  # per chunk: a plain integer

LINGER_REFUSED = Counter("keygate_mqtt_linger_aborted",
                         "Closed sockets aborted instead of lingering (lingering_sockets_max reached)",
                         registry=REGISTRY)
_REFUSED_BY_ADDRESS = {why: CONNECTIONS_REFUSED.labels(why)
                       for why in (PER_ADDRESS, RATE, RECONNECT_PENALTY, CONNECTIONS_PER_IDENTITY)}
_BYTES_IN = BYTES.labels("client_to_broker")
_BYTES_OUT = BYTES.labels("broker_to_client")


def _joined(items: Sequence[Buffer]) -> bytes:
    """One ``bytes`` for one write. Items may be slices of the shared receive buffer,
    which must not outlive this call: transports (uvloop's in particular) may keep a
    reference to what they are given, so they only ever get ``bytes``."""
    if len(items) == 1:
        first = items[0]
        if type(first) is bytes:
            return first
    return b"".join(items)


def server_ssl_context(config: Config) -> ssl.SSLContext:
    """The listener's TLS context (server certificate; device certificates if ``tls.client_ca``)."""
    return server_context(config.tls, config.base_dir)


def _peer_certificate(ssl_object: Any) -> PeerCertificate | None:
    return peer_certificate(ssl_object) if ssl_object is not None else None


# --------------------------------------------------------------------------- protocols


class _ClientSide(asyncio.BufferedProtocol):
    """The client's socket on a plain listener (``mqtt.tls: false``)."""

    __slots__ = ("conn", "_gateway", "_session")

    def __init__(self, gateway: MqttGateway):
        self._gateway = gateway
        self._session = gateway.new_session()
        self.conn: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = self._gateway.accept_transport(cast(Transport, transport), self._session)  # a stream socket's
        self._session = None  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._gateway.client_read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        if conn is not None:
            conn.client_data(self._gateway.recv_buffer[:nbytes])

    def eof_received(self) -> bool:
        return False  # close: a half-open MQTT connection is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.client_lost(exc)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_writing()


class _TlsClientSide(asyncio.BufferedProtocol):
    """The client's socket with TLS done here, on ``ssl.MemoryBIO``s, instead of by the loop.

    Why not ``create_server(ssl=...)``: the stdlib's TLS layer keeps a 256 KiB
    buffer per connection and uvloop's costs ~40 KiB; here ciphertext and
    plaintext both land in buffers shared by every connection, leaving OpenSSL's
    own state as the per-connection cost. The :class:`Connection` exists from
    accept, so its CONNECT deadline covers the handshake; it sees no byte before
    the handshake is complete. To the connection this object is the transport.
    """

    __slots__ = ("conn", "_gateway", "_accept", "_raw", "_in", "_out", "_tls", "_ready", "_closing")

    def __init__(self, gateway: MqttGateway, accept: Any = None):
        self._gateway = gateway
        # accept(self) -> what receives the plaintext (a Connection, or the WebSocket listener's
        # HTTP side), or None when refused; by default an MQTT connection of the gateway.
        self._accept = accept or gateway.accept_transport
        self.conn: Any = None
        self._raw: asyncio.Transport | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls: Any = None
        self._ready = False
        self._closing = False

    # -- the raw socket's events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        self.conn = self._accept(self)
        if self.conn is not None:  # refused connections cost no TLS state
            ctx = self._gateway.ssl_context
            if ctx is None:
                raise RuntimeError("a TLS client side without a TLS context")
            self._tls = ctx.wrap_bio(self._in, self._out, server_side=True)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._gateway.tls_read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing or self._tls is None:
            return
        self._in.write(self._gateway.tls_buffer[:nbytes])
        try:
            if not self._ready:
                try:
                    self._tls.do_handshake()
                except ssl.SSLWantReadError:
                    self._flush()
                    return
                self._ready = True
            self._read_plaintext()
        except ssl.SSLError as exc:  # a failed handshake or a corrupt record: nothing to answer
            log.debug("TLS error from %s: %s", self.get_extra_info("peername"), exc)
            self._flush()
            self.abort()
            return
        if self._out.pending:
            self._flush()

    def _read_plaintext(self) -> None:
        """Decrypt everything the BIO holds into the shared buffer; one client_data per fill."""
        buf = self._gateway.recv_buffer
        size = len(buf)
        got = 0
        peer_closed = False
        tls, bio = self._tls, self._in
        try:
            while got < size:
                n = tls.read(size - got, buf[got:] if got else buf)
                if not n:
                    peer_closed = True
                    break
                got += n
                if not bio.pending:
                    # All read: spare the SSLWantReadError the next read would raise. (A read
                    # returns one record's plaintext at most; if that filled the buffer, the
                    # loop ends anyway and the call below picks up the rest.)
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            peer_closed = True
        if got and self.conn is not None:
            self.conn.client_data(buf[:got])
        if peer_closed:
            # close_notify: the client is done; answer in kind and let the connection go.
            self.close()
        elif got == size and not self._closing:
            self._read_plaintext()  # the buffer was full: more records may wait in the BIO

    def _flush(self) -> None:
        if self._out.pending and self._raw is not None and not self._raw.is_closing():
            self._raw.write(self._out.read())

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self.conn is not None:
            self.conn.client_lost(exc)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_writing()

    # -- the transport the connection sees
    def write(self, data: bytes) -> None:
        if self._closing or not self._ready:
            return
        try:
            self._tls.write(data)
        except ssl.SSLError:
            self.abort()
            return
        self._flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._ready:
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._tls.unwrap()  # queues close_notify
            if self._out.pending and self._raw is not None and not self._raw.is_closing():
                self._raw.write(self._out.read())
        if self._raw is not None:
            self._gateway.linger_close(self._raw)

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def pause_reading(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls if self._ready else default
        if name == "sslcontext":
            return self._gateway.ssl_context if self._ready else default
        return self._raw.get_extra_info(name, default) if self._raw is not None else default


class _BrokerSide(asyncio.BufferedProtocol):
    """The connection to the broker, opened after authentication."""

    __slots__ = ("conn", "_buffer")

    def __init__(self, conn: Connection):
        self.conn = conn
        self._buffer = conn.gateway.recv_buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.broker_data(self._buffer[:nbytes])

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.broker_lost(exc)

    def pause_writing(self) -> None:
        # The broker is not keeping up with us: stop reading from the client.
        self.conn.client_reading(False, "broker")

    def resume_writing(self) -> None:
        self.conn.client_reading(True, "broker")


# --------------------------------------------------------------------------- connection


class Connection:
    """One client, its session, and (once authenticated) its broker connection."""

    __slots__ = ("gateway", "client", "session", "websocket", "upstream", "_pending_upstream", "_dialing",
                 "_auth_task", "_timer", "_timer_at", "_client_pauses", "_broker_paused", "closed",
                 "close_reason", "_seen_inputs", "address", "peer_key", "__weakref__")

    def __init__(self, gateway: MqttGateway, transport: Transport, session: Session, *, websocket: bool = False):
        self.gateway = gateway
        self.client = transport
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
    def client_data(self, data: Any) -> None:
        if self.closed:
            return
        _BYTES_IN.value += len(data)
        self.apply(self.session.handle(ev.ClientData(data)))

    def client_lost(self, exc: Exception | None) -> None:
        self._teardown()  # tells the session first (its Will may have to be discarded)

    # -- events from the broker side
    def broker_data(self, data: Any) -> None:
        if self.closed:
            return
        _BYTES_OUT.value += len(data)
        self.apply(self.session.handle(ev.BrokerData(data)))

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
        if self.closed:
            return
        for cmd in commands:
            kind = type(cmd)
            if kind is SendToClient:
                if not self.client.is_closing():
                    self.client.write(_joined(cmd.items))  # type: ignore[attr-defined]
            elif kind is SendToBroker:
                data = _joined(cmd.items)  # type: ignore[attr-defined]
                if self.upstream is not None:
                    self.upstream.write(data)
                elif self._dialing is not None:
                    self._pending_upstream.append(data)
            elif kind is CountMetrics:
                count_metrics(cmd.counts)  # type: ignore[attr-defined]
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
            transport, _ = await self.gateway.connect_upstream(lambda: _BrokerSide(self))
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
                        self.upstream.write(_joined(cmd.items))
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
            _close_upstream(self.upstream, self.gateway.loop)
        if not self.client.is_closing():
            if self.websocket or isinstance(self.client, _TlsClientSide) or self.close_reason == "shutdown":
                self.client.close()  # (the TLS side lingers itself, after its close_notify)
            else:
                self.gateway.linger_close(cast(asyncio.Transport, self.client))  # a socket's
        if self.address is not None:
            self.gateway.release_address(self)
        self.gateway.forget(self)


LINGER_SECONDS = 2.0  # how long a closed client's socket still reads (and drops) what it sends


def _linger_close(raw: asyncio.Transport, loop: asyncio.AbstractEventLoop | None,
                  done: Callable[[], None] | None = None) -> bool:
    """Close a client socket without losing our last bytes (a refusal) to a TCP reset.

    A socket closed with unread input answers with a reset, and the client's
    system then drops what it had not read yet, our CONNACK or DISCONNECT with
    it. So: our bytes, then FIN (``write_eof``); what the client still sends is
    read and dropped (its connection is closed), until it closes too (EOF: the
    transport then closes) or ``LINGER_SECONDS`` pass (abort). The socket is no
    longer counted as a connection meanwhile; new connections are still bounded
    by the per-address rate, and by the gateway's ``lingering_sockets_max``
    (:meth:`MqttGateway.linger_close`). True: lingering (``done`` is called when
    its time is up).
    """
    if raw.is_closing():
        return False
    if loop is None or not raw.can_write_eof():
        raw.close()
        return False
    raw.write_eof()
    raw.resume_reading()

    def end() -> None:
        raw.abort()
        if done is not None:
            done()

    loop.call_later(LINGER_SECONDS, end)
    return True


def _close_upstream(transport: asyncio.Transport, loop: Any) -> None:
    """Half-close towards the broker and let it close its side.

    A full close here would answer the broker's next write (a PUBACK for the
    client's last publish, say) with a reset, and a reset makes the broker drop
    what it has not read yet: the last publishes, or the DISCONNECT, so that a
    Will would be sent for a client that left cleanly. After ``write_eof`` the
    broker reads everything, then closes; what it still sends is discarded (the
    connection is closed). A broker that never closes is cut after 2 s. Without
    a DISCONNECT in the stream the broker sends the client's Will, as it should.
    """
    if transport.can_write_eof():
        transport.write_eof()
        transport.resume_reading()
        loop.call_later(2.0, transport.abort)
    else:
        transport.close()


# --------------------------------------------------------------------------- gateway


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
        self._ws: Any = None
        self.ssl_context: ssl.SSLContext | None = None
        self._unsubscribe: list[Any] = []
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
        side = _TlsClientSide if self.ssl_context is not None else _ClientSide
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
                    _REFUSED_BY_ADDRESS[RECONNECT_PENALTY].inc()
                    transport.abort()
                    if count:
                        self._audit_folded("address " + address, {RECONNECT_PENALTY: count})
                    self._arm_report_timer()
                    return None
            refusal, count = self.address_limiter.admit(address)
            if refusal is not None:
                _REFUSED_BY_ADDRESS[refusal].inc()
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
        if _linger_close(raw, self.loop, self._linger_done):
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
            _REFUSED_BY_ADDRESS[CONNECTIONS_PER_IDENTITY].inc()
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
        _REFUSED_BY_ADDRESS[RECONNECT_PENALTY].inc()
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

    async def connect_upstream(self, factory: Any) -> tuple[asyncio.BaseTransport, Any]:
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
