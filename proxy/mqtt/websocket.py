"""MQTT over (secure) WebSocket, subprotocol ``mqtt``.

A WebSocket connection is an MQTT connection from accept, not from the
completed upgrade: the listener's own ``create_server`` hands every socket to
:meth:`MqttGateway.accept_transport <proxy.mqtt.server.MqttGateway.accept_transport>`
first, so it counts against ``mqtt.max_connections`` and the per-address limits
at once (refused before the TLS handshake), and its session's CONNECT deadline
runs from accept across the TLS handshake (done on ``ssl.MemoryBIO`` like the
TCP listener's, :class:`~proxy.mqtt.sockets.TlsClientSide`), the HTTP upgrade
and the CONNECT. A client that sends half a request line and stops is closed
at that deadline; aiohttp's own keep-alive timeout (an hour) never comes into
it. aiohttp parses the HTTP and the WebSocket frames, fed the plaintext by
:class:`_HttpSide`.

A WebSocket message is just a slice of the MQTT byte stream: one frame may hold
half a packet or three of them, so frames are fed to the same
:class:`~proxy.mqtt.connection.Connection` as TCP chunks and the sans-IO framer
reassembles them. The :class:`WebSocketTransport` gives the connection the
transport surface it uses (:class:`~proxy.mqtt.transport.Transport`), with the
same backpressure rules: outgoing bytes beyond the high-water mark pause the
broker side until the socket drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from aiohttp import WSMsgType, web
from aiohttp.web_protocol import RequestHandler

from proxy.mqtt.events import Buffer
from proxy.mqtt.sockets import TlsClientSide
from proxy.mqtt.transport import Transport
from proxy.mqtt.wsguard import (
    HEAD_MAX_BYTES,
    HEAD_REFUSAL,
    HEAD_TOO_LARGE,
    INVALID_REFUSAL,
    MESSAGE_TOO_BIG,
    UPGRADE_INVALID,
    PreauthGuard,
    close_frame,
)
from proxy.sharing import reuse_port

if TYPE_CHECKING:
    from proxy.mqtt.connection import Connection
    from proxy.mqtt.server import MqttGateway

SUBPROTOCOL = "mqtt"
PATHS = ("/mqtt", "/")
HIGH_WATER = 256 * 1024  # queued outgoing bytes above which the broker side stops reading


class WebSocketTransport:
    """The asyncio-transport surface of one MQTT-over-WebSocket client, from accept on.

    ``raw`` is the socket's transport (the TLS side on a TLS listener); until
    :meth:`attach` gives it the upgraded WebSocket, closing aborts ``raw``.
    """

    def __init__(self, raw: Transport):
        self._raw = raw
        self._ws: web.WebSocketResponse | None = None
        self._out: list[bytes] = []
        self._out_size = 0
        self._wake = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._writing_paused = False
        self.flush_raw = False  # closing before the upgrade: close raw (flushing a refusal), not abort
        self.protocol: Connection | None = None  # told of backpressure (pause_writing / resume_writing)
        self.guard: PreauthGuard | None = None  # told when the 101 goes out (wsguard: one request only)

    def attach(self, ws: web.WebSocketResponse) -> None:
        self._ws = ws

    # -- what the connection calls
    def write(self, data: bytes) -> None:
        if self._closing or not data or self._ws is None:  # the session says nothing before a CONNECT
            return
        self._out.append(data)
        self._out_size += len(data)
        self._wake.set()
        if self._out_size > HIGH_WATER and not self._writing_paused and self.protocol is not None:
            self._writing_paused = True
            self.protocol.pause_writing()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            if self._ws is None:  # not upgraded (yet): nothing to say, the socket goes
                self._raw.close() if self.flush_raw else self._raw.abort()
            self._wake.set()
            self._reading.set()

    def abort(self) -> None:
        self._out.clear()
        self._out_size = 0
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def get_write_buffer_size(self) -> int:
        return self._out_size

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("peername", "ssl_object"):
            return self._raw.get_extra_info(name, default)
        return default

    # -- the two loops that move bytes
    async def pump_out(self) -> None:
        """Send queued bytes as one binary frame per batch, until closed."""
        ws = self._ws
        if ws is None:
            raise RuntimeError("ws is not set")
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._out:
                data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
                self._out.clear()
                self._out_size = 0
                try:
                    await ws.send_bytes(data)
                except (ConnectionError, RuntimeError):
                    self._closing = True
                if self._writing_paused and self.protocol is not None:
                    self._writing_paused = False
                    self.protocol.resume_writing()
            if self._closing and not self._out:
                with contextlib.suppress(Exception):
                    await ws.close()
                return

    async def pump_in(self, on_data: Callable[[bytes], None]) -> None:
        ws = self._ws
        if ws is None:
            raise RuntimeError("ws is not set")
        while not self._closing:
            await self._reading.wait()
            if self._closing:
                return
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                on_data(msg.data)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            else:  # MQTT over WebSocket is binary only ([MQTT-6.0.0-1]): close on a text frame
                return


class _HttpSide:
    """What one accepted socket's plaintext goes to: aiohttp's HTTP protocol, made on the first
    bytes (after the TLS handshake). Ends the socket's Connection however the socket ends."""

    __slots__ = ("listener", "transport", "ws_transport", "conn", "http", "guard")

    def __init__(self, listener: WebSocketListener, transport: Transport, ws_transport: WebSocketTransport,
                 conn: Connection):
        self.listener = listener
        self.transport = transport  # what aiohttp sees: the TLS side, or the plain socket
        self.ws_transport = ws_transport
        self.conn = conn  # the socket's MQTT connection, from accept
        self.http: RequestHandler | None = None
        # Until the CONNACK: the upgrade head and each WebSocket message bounded (wsguard).
        self.guard: PreauthGuard | None = PreauthGuard(listener.preauth_message_max, paths=PATHS)
        ws_transport.guard = self.guard

    def client_data(self, data: Buffer) -> None:
        data = bytes(data)  # data may be a slice of the shared receive buffer
        guard = self.guard
        authenticated = False
        if guard is not None:
            authenticated = self.conn.session.established
            if authenticated:  # (a message pipelined behind the CONNECT may be a full-size one)
                guard.message_max = self.listener.message_max
                if guard.at_message_boundary:
                    self._widen()
                    guard = None
        if guard is not None:
            held = not guard.head_done
            refused = guard.feed(data)
            if refused is not None:
                self._refuse(refused)
                return
            if held:  # aiohttp gets the head only whole and checked
                if not guard.head_done:
                    return
                data = guard.take_head()
        http = self.http
        if http is None:
            http = self.http = self.listener.new_http_protocol()
            http.connection_made(cast(asyncio.BaseTransport, self.transport))  # (a Transport is enough for aiohttp)
        http.data_received(data)
        if authenticated and guard is not None and guard.at_message_boundary:
            self._widen()

    def _widen(self) -> None:
        """Authenticated, and aiohttp's reader holds nothing: one of max_packet_size, no guard."""
        self.guard = self.ws_transport.guard = None
        ws = self.ws_transport._ws
        if ws is not None and self.http is not None:
            _widen_reader(ws, self.http, self.listener.message_max)

    def _refuse(self, why: str) -> None:
        """Over a pre-authentication bound: say so (431, or close 1009) and close, the rest unread."""
        self.guard = None
        ws_transport = self.ws_transport
        conn = self.conn
        upgraded = ws_transport._ws is not None
        if not self.transport.is_closing():
            if upgraded:
                self.transport.write(close_frame(1009))
            elif why in (HEAD_TOO_LARGE, UPGRADE_INVALID):  # (a pipelined one: aiohttp may be answering)
                self.transport.write(HEAD_REFUSAL if why == HEAD_TOO_LARGE else INVALID_REFUSAL)
        ws_transport.flush_raw = True
        self.listener.gateway.audit_preauth_refusal(conn, why, **self.guard_detail(why))
        if upgraded:  # aiohttp's side is closed with the socket
            self.transport.close()
        conn.close(why)

    def guard_detail(self, why: str) -> dict[str, Any]:
        if why == HEAD_TOO_LARGE:
            return {"limit": HEAD_MAX_BYTES}
        if why == MESSAGE_TOO_BIG:
            return {"limit": self.listener.preauth_message_max}
        if why == UPGRADE_INVALID and self.ws_transport.guard is not None:
            return {"problem": self.ws_transport.guard.problem}
        return {}

    def client_lost(self, exc: Exception | None) -> None:
        self.listener.waiting.pop(self.transport, None)
        if self.http is not None:
            self.http.connection_lost(exc)
        self.conn.client_lost(exc)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        if self.http is not None:
            self.http.pause_writing()

    def resume_writing(self) -> None:
        if self.http is not None:
            self.http.resume_writing()


def _widen_reader(ws: web.WebSocketResponse, http: RequestHandler, max_msg_size: int) -> None:
    """Give an upgraded connection's aiohttp a WebSocket reader with a larger message limit.
    Only at a message boundary (the old reader holds no partial frame). aiohttp's C reader keeps
    its limit out of reach, so the reader is replaced (private names, aiohttp pinned)."""
    from aiohttp._websocket.reader import WebSocketReader

    old, queue = ws._parser, ws._reader
    if old is None or queue is None or http._payload_parser is not old:  # (closing: leave it)
        return
    parser = WebSocketReader(queue, max_msg_size, compress=False, decode_text=ws._decode_text)
    ws._parser = parser
    http._payload_parser = parser


class _PlainSide(asyncio.Protocol):
    """A plain (``mqtt.tls: false``) WebSocket listener's socket: the same admission at accept."""

    __slots__ = ("listener", "side")

    def __init__(self, listener: WebSocketListener):
        self.listener = listener
        self.side: _HttpSide | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.side = self.listener.accept(cast(Transport, transport))  # a stream socket's

    def data_received(self, data: bytes) -> None:
        if self.side is not None:
            self.side.client_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.side is not None:
            self.side.client_lost(exc)

    def pause_writing(self) -> None:
        if self.side is not None:
            self.side.pause_writing()

    def resume_writing(self) -> None:
        if self.side is not None:
            self.side.resume_writing()


class WebSocketListener:
    """Accepts sockets itself (admission and deadline from accept) and lets aiohttp speak HTTP
    and WebSocket on them; each upgraded socket carries on as the Connection made at accept."""

    def __init__(self, gateway: MqttGateway):
        self.gateway = gateway
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        # Accepted, not yet upgraded: by the transport aiohttp sees (``request.transport``).
        self.waiting: dict[object, WebSocketTransport] = {}
        self._http_server: web.Server | None = None  # makes aiohttp's HTTP protocol
        # Before authentication a WebSocket message may carry at most a CONNECT's worth.
        mqtt = gateway.mqtt
        self.preauth_message_max = mqtt.preauth_max_bytes
        # After the CONNACK: a frame may join several packets, so one maximum-size packet plus
        # slack per message; the session bounds what it buffers across frames.
        self.message_max = mqtt.max_packet_size + 65536

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        app = web.Application()
        for path in PATHS:
            app.router.add_get(path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        self._http_server = self._runner.server
        # Bind the socket ourselves: the real port is then known for "port 0".
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=1024, reuse_port=reuse_port())
        loop = asyncio.get_running_loop()
        if ssl_context is not None:
            def factory() -> asyncio.BaseProtocol:
                return TlsClientSide(self.gateway, self.accept)
        else:
            def factory() -> asyncio.BaseProtocol:
                return _PlainSide(self)
        self._server = await loop.create_server(factory, sock=sock, backlog=1024)
        bound: int = sock.getsockname()[1]
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    def new_http_protocol(self) -> RequestHandler:
        if self._http_server is None:
            raise RuntimeError("the WebSocket listener is not started")
        return self._http_server()

    def accept(self, transport: Transport) -> _HttpSide | None:
        """A socket, at accept: its Connection now (or refused: None, the socket aborted)."""
        ws_transport = WebSocketTransport(transport)
        conn = self.gateway.accept_transport(ws_transport, websocket=True)
        if conn is None:
            return None
        ws_transport.protocol = conn
        self.waiting[transport] = ws_transport
        return _HttpSide(self, transport, ws_transport, conn)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ws_transport = self.waiting.get(request.transport)
        conn = ws_transport.protocol if ws_transport is not None else None  # (set at accept)
        if ws_transport is None or conn is None or ws_transport.is_closing():  # upgraded once already, or closed
            return web.json_response({"error": {"code": "connection_closing",
                                                "message": "this connection is closing"}}, status=503)
        # aiohttp's own reader refuses at the frame header what the guard refuses, until the CONNACK
        # (aiohttp refuses a message of max_msg_size itself: hence + 1); then it is widened.
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=self.preauth_message_max + 1,
                                   autoping=True, compress=False)
        if not ws.can_prepare(request).ok:
            response = web.json_response({"error": {"code": "websocket_required",
                                                    "message": "MQTT over WebSocket: upgrade with subprotocol mqtt"}},
                                         status=400)
            response.force_close()  # one request per connection before the upgrade (wsguard)
            return response
        del self.waiting[request.transport]
        if ws_transport.guard is not None:
            ws_transport.guard.upgraded()  # the 101 goes out: what follows are frames
        await ws.prepare(request)
        if ws.ws_protocol != SUBPROTOCOL:
            # [MQTT-6.0.0-3]/[MQTT-6.0.0-4]: the client must offer "mqtt"; close otherwise.
            await ws.close(code=1002, message=b"subprotocol mqtt required")
            return ws  # aiohttp closes the socket, and with it the Connection
        ws_transport.attach(ws)
        out = asyncio.create_task(ws_transport.pump_out())
        try:
            await ws_transport.pump_in(conn.client_data)
        finally:
            ws_transport.close()
            conn.client_lost(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(out, 2.0)
        return ws
