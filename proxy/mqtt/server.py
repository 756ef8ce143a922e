"""The asyncio shell around the sans-IO MQTT session: listeners and connection pairs.

Everything that decides lives in :mod:`proxy.mqtt.session`; this module only
moves bytes and runs what the session asks for:

* one :class:`Connection` per client, with an ``asyncio.BufferedProtocol`` on
  each side (client and broker). Both read into one receive buffer shared by
  every connection of the gateway (a protocol's ``buffered_updated`` runs to
  completion before the loop reads the next socket, so the buffer is free
  again by then), and whatever the session returns for a chunk leaves in one
  ``write`` per direction;
* backpressure across the pair: when one side's write buffer passes the high
  water mark, the *other* side stops reading until it drains, so a slow
  subscriber slows the broker's delivery to it instead of growing a queue;
* the broker connection is opened only once the session has authenticated the
  client (``Actions.open_upstream``), so unauthenticated bytes never reach it;
* credentials are checked off the read path (``Actions.auth`` -> a task), with
  the client's reading paused meanwhile;
* timers: one ``call_at`` per connection, set to the session's next deadline
  (CONNECT deadline, keepalive, token expiry), never a task per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from typing import Any

from prometheus_client import Counter, Gauge

from proxy.config import Config, parse_hostport, read_secret
from proxy.identity.model import AuthError, AuthReason, Identity
from proxy.metrics import REGISTRY
from proxy.mqtt.session import Actions, RateLimiter, Session
from proxy.services import Services

log = logging.getLogger("keygate.mqtt")

__all__ = ["MqttGateway", "Connection", "server_ssl_context"]

# One receive buffer for every connection of a gateway (see the module docstring).
RECV_BUFFER_SIZE = 256 * 1024
# Write-buffer marks per socket: above HIGH the other side stops reading.
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024

# --------------------------------------------------------------------------- metrics

CONNECTIONS_ACTIVE = Gauge("keygate_mqtt_connections_active", "Open MQTT client connections",
                           registry=REGISTRY)
CONNECTIONS_TOTAL = Counter("keygate_mqtt_connections", "Accepted MQTT client connections",
                            ["transport"], registry=REGISTRY)
CONNECTIONS_REFUSED = Counter("keygate_mqtt_connections_refused", "Connections refused before CONNECT",
                              ["reason"], registry=REGISTRY)
AUTH_RESULTS = Counter("keygate_mqtt_auth", "MQTT authentications", ["method", "result"], registry=REGISTRY)
DECISIONS = Counter("keygate_mqtt_decisions", "MQTT policy decisions", ["action", "result"], registry=REGISTRY)
BYTES = Counter("keygate_mqtt_bytes", "Bytes forwarded", ["direction"], registry=REGISTRY)
MESSAGES = Counter("keygate_mqtt_messages", "PUBLISH packets forwarded", ["direction"], registry=REGISTRY)
RATE_LIMITED = Counter("keygate_mqtt_rate_limited", "Messages over the per-identity rate limit",
                       registry=REGISTRY)

_BYTES_IN = BYTES.labels("client_to_broker")
_BYTES_OUT = BYTES.labels("broker_to_client")


def server_ssl_context(config: Config) -> ssl.SSLContext:
    """The listener's TLS context: server certificate, optional device-certificate CA."""
    try:
        from proxy import tls as _tls  # the foundation's builder, when present
        build = getattr(_tls, "server_context", None)
    except ImportError:
        build = None
    if build is not None:
        return build(config)
    tls = config.tls
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(config.resolve(tls.cert)), str(config.resolve(tls.key)))
    if tls.client_ca:
        ctx.load_verify_locations(str(config.resolve(tls.client_ca)))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_auth == "required" else ssl.CERT_OPTIONAL
    return ctx


def _peer_common_name(ssl_object: Any) -> str | None:
    if ssl_object is None:
        return None
    try:
        from proxy.tls import peer_common_name
    except ImportError:
        peer_common_name = None
    if peer_common_name is not None:
        return peer_common_name(ssl_object)
    cert = ssl_object.getpeercert()  # only verified certificates are returned here
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


# --------------------------------------------------------------------------- protocols


class _ClientSide(asyncio.BufferedProtocol):
    """The client's socket; every event goes to the connection."""

    __slots__ = ("conn",)

    def __init__(self, gateway: "MqttGateway"):
        self.conn: Connection | None = None
        self._gateway = gateway

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = self._gateway.accept_transport(transport)  # type: ignore[arg-type]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._gateway.recv_buffer

    def buffered_updated(self, nbytes: int) -> None:
        if self.conn is not None:
            self.conn.client_data(self._gateway.recv_buffer[:nbytes].tobytes())

    def eof_received(self) -> bool:
        return False  # close; a half-open MQTT connection is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.client_lost(exc)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_writing()


class _BrokerSide(asyncio.BufferedProtocol):
    """The connection to the broker, opened after authentication."""

    def __init__(self, conn: "Connection"):
        self.conn = conn
        self._buffer = conn.gateway.recv_buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffered_updated(self, nbytes: int) -> None:
        self.conn.broker_data(self._buffer[:nbytes].tobytes())

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

    def __init__(self, gateway: "MqttGateway", transport: Any, session: Session, *, websocket: bool = False):
        self.gateway = gateway
        self.client = transport
        self.session = session
        self.websocket = websocket
        self.upstream: asyncio.Transport | None = None
        self._pending_upstream: list[bytes] = []  # bytes for the broker while it is being dialled
        self._upstream_task: asyncio.Task | None = None
        self._auth_task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._client_pauses: set[str] = set()  # why the client's reading is paused
        self._broker_paused = False
        self.closed = False
        self.peer = transport.get_extra_info("peername")

    # -- events from the client side
    def client_data(self, data: bytes) -> None:
        if self.closed:
            return
        _BYTES_IN.inc(len(data))
        self.apply(self.session.client_data(data))

    def client_lost(self, exc: Exception | None) -> None:
        self._teardown()

    # -- events from the broker side
    def broker_data(self, data: bytes) -> None:
        if self.closed:
            return
        _BYTES_OUT.inc(len(data))
        self.apply(self.session.broker_data(data))

    def broker_lost(self, exc: Exception | None) -> None:
        # The broker hung up (or refused us): the client's session has no other end.
        if not self.closed:
            self.upstream = None
            self.close()

    # -- backpressure
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
        if on:
            if why in self._client_pauses:
                self._client_pauses.discard(why)
                if not self._client_pauses and not self.client.is_closing():
                    self.client.resume_reading()
        elif why not in self._client_pauses:
            if not self._client_pauses and not self.client.is_closing():
                self.client.pause_reading()
            self._client_pauses.add(why)

    # -- running what the session decided
    def apply(self, actions: Actions | None) -> None:
        if actions is None or self.closed:
            return
        if actions.to_client:
            self.client.write(actions.to_client)
        if actions.to_broker:
            if self.upstream is not None:
                self.upstream.write(actions.to_broker)
            else:
                self._pending_upstream.append(actions.to_broker)
        self._account(actions)
        if actions.auth is not None:
            self._start_auth(actions.auth)
        if actions.open_upstream and self._upstream_task is None and self.upstream is None:
            self._open_upstream()
        if actions.close:
            self.close()
            return
        self.schedule()

    def _account(self, actions: Actions) -> None:
        for action, result in getattr(actions, "decisions", ()) or ():
            DECISIONS.labels(action, result).inc()
        n = getattr(actions, "published_to_broker", 0)
        if n:
            MESSAGES.labels("client_to_broker").inc(n)
        n = getattr(actions, "published_to_client", 0)
        if n:
            MESSAGES.labels("broker_to_client").inc(n)
        if getattr(actions, "rate_limited", 0):
            RATE_LIMITED.inc(actions.rate_limited)

    # -- authentication, off the read path
    def _start_auth(self, request: Any) -> None:
        self.client_reading(False, "auth")
        self._auth_task = asyncio.ensure_future(self._authenticate(request))

    async def _authenticate(self, request: Any) -> None:
        method = request.method
        try:
            identity = await self.gateway.authenticate(request, self.client)
        except AuthError as exc:
            AUTH_RESULTS.labels(method, exc.reason.value).inc()
            actions = self.session.authentication_failed(exc.reason)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug or an unreachable store must not hang the client
            log.exception("authentication failed unexpectedly")
            AUTH_RESULTS.labels(method, "error").inc()
            actions = self.session.authentication_failed(AuthReason.ISSUER_UNREACHABLE)
        else:
            AUTH_RESULTS.labels(method, "ok").inc()
            actions = self.session.authenticated(identity)
        finally:
            self._auth_task = None
        if self.closed:
            return
        self.apply(actions)
        self.client_reading(True, "auth")

    # -- the broker connection
    def _open_upstream(self) -> None:
        self.client_reading(False, "upstream")
        self._upstream_task = asyncio.ensure_future(self._dial())

    async def _dial(self) -> None:
        try:
            transport, _ = await self.gateway.connect_upstream(lambda: _BrokerSide(self))
        except (OSError, asyncio.TimeoutError) as exc:
            self._upstream_task = None
            if not self.closed:
                log.warning("broker unreachable at %s: %s", self.gateway.config.mqtt.upstream, exc)
                self.apply(self.session.upstream_failed()) if hasattr(self.session, "upstream_failed") \
                    else self.close()
            return
        self._upstream_task = None
        if self.closed:
            transport.close()
            return
        self.upstream = transport
        if self._pending_upstream:
            data = b"".join(self._pending_upstream)
            self._pending_upstream.clear()
            transport.write(data)
        if self._broker_paused:
            transport.pause_reading()
        self.client_reading(True, "upstream")

    # -- timers: one handle per connection, at the session's next deadline
    def schedule(self) -> None:
        deadline = self.session.next_deadline()
        if deadline is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        loop_at = self.gateway.loop_time_for(deadline)
        if self._timer is not None:
            if self._timer_at <= loop_at:
                return  # the earlier timer fires first and reschedules
            self._timer.cancel()
        self._timer_at = loop_at
        self._timer = self.gateway.loop.call_at(loop_at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self.closed:
            self.apply(self.session.tick())

    # -- revocation and shutdown
    def invalidate(self) -> None:
        if not self.closed:
            self.apply(self.session.invalidate())

    def shutdown(self) -> None:
        """Server going away: let the session say so (v5 DISCONNECT 0x8B), then close."""
        if self.closed:
            return
        if hasattr(self.session, "shutdown"):
            self.apply(self.session.shutdown())
        self.close()

    def close(self) -> None:
        """Flush what is queued and close both sides."""
        if self.closed:
            return
        self.closed = True
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        self._teardown()

    def _teardown(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in (self._auth_task, self._upstream_task):
            if task is not None:
                task.cancel()
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.close()
        if not self.client.is_closing():
            self.client.close()
        self.gateway.forget(self)


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
        self.rate_limiter = RateLimiter(self.mqtt.rate_limit.messages_per_second, self.mqtt.rate_limit.burst)
        self.port: int | None = None
        self.ws_port: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ws = None
        self._ssl: ssl.SSLContext | None = None
        self._unsubscribe: list[Any] = []
        self._upstream_credentials = (self.mqtt.upstream_username,
                                      read_secret(self.mqtt.upstream_password, self.mqtt.upstream_password_file,
                                                  self.config))
        self._accepting = False

    # -- lifecycle
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._ssl = server_ssl_context(self.config) if self.mqtt.tls else None
        host, port = parse_hostport(self.mqtt.listen)
        self._server = await self.loop.create_server(
            lambda: _ClientSide(self), host, port, ssl=self._ssl, backlog=1024, reuse_address=True,
            ssl_handshake_timeout=self.mqtt.connect_timeout_seconds if self._ssl else None)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.mqtt.websocket_listen:
            from proxy.mqtt.websocket import WebSocketListener

            self._ws = WebSocketListener(self)
            whost, wport = parse_hostport(self.mqtt.websocket_listen)
            self.ws_port = await self._ws.start(whost, wport, self._ssl)
        # Revocation: any ownership or policy change re-checks every open session.
        self._unsubscribe.append(self.services.policies.subscribe(self._invalidate_all))
        self._unsubscribe.append(self.services.ownership.facts.subscribe(self._invalidate_all))
        self._accepting = True
        log.info("MQTT gateway listening on %s:%s%s", host, self.port,
                 f", WebSocket on {self.ws_port}" if self.ws_port else "")

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
        # Let the closes flush (DISCONNECT on the wire before the socket goes).
        await asyncio.sleep(0)

    # -- connections
    def accept_transport(self, transport: Any, *, websocket: bool = False) -> Connection | None:
        if not self._accepting or len(self.connections) >= self.mqtt.max_connections:
            CONNECTIONS_REFUSED.labels("shutting_down" if not self._accepting else "max_connections").inc()
            transport.abort() if hasattr(transport, "abort") else transport.close()
            return None
        if not websocket:
            transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = self.new_session(transport)
        conn = Connection(self, transport, session, websocket=websocket)
        self.connections.add(conn)
        CONNECTIONS_ACTIVE.inc()
        CONNECTIONS_TOTAL.labels("websocket" if websocket else "tcp").inc()
        conn.schedule()  # the CONNECT deadline runs from accept
        return conn

    def new_session(self, transport: Any) -> Session:
        ssl_object = transport.get_extra_info("ssl_object")
        peer = transport.get_extra_info("peername")
        return Session(
            self.services.config.mqtt,
            self.services.policies,
            audit=self.services.audit,
            rate_limiter=self.rate_limiter,
            certificate_cn=_peer_common_name(ssl_object),
            peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or ""),
            upstream_credentials=self._upstream_credentials,
        )

    def forget(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            CONNECTIONS_ACTIVE.dec()

    def _invalidate_all(self, *_: Any) -> None:
        for conn in list(self.connections):
            conn.invalidate()

    # -- what connections ask of the gateway
    async def authenticate(self, request: Any, transport: Any) -> Identity:
        method = request.method
        if method == "token":
            return await self.services.tokens.validate(request.token)
        if method == "device_key":
            return await self.services.ownership.authenticate_device_key(request.device_id, request.key)
        if method == "certificate":
            cn = _peer_common_name(transport.get_extra_info("ssl_object"))
            if not cn:
                raise AuthError(AuthReason.BAD_CERTIFICATE, "no verified client certificate")
            return self.services.ownership.device_identity(cn)
        raise AuthError(AuthReason.NO_CREDENTIALS)

    async def connect_upstream(self, factory):
        upstream = self.mqtt.upstream
        timeout = self.mqtt.connect_timeout_seconds
        if upstream.startswith("unix:"):
            return await asyncio.wait_for(self.loop.create_unix_connection(factory, upstream[5:]), timeout)
        host, port = parse_hostport(upstream)
        transport, proto = await asyncio.wait_for(self.loop.create_connection(factory, host, port), timeout)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return transport, proto

    def loop_time_for(self, deadline: float) -> float:
        """A session deadline (unix time) as a loop time."""
        return self.loop.time() + max(0.0, deadline - time.time())
