"""MQTT over (secure) WebSocket, subprotocol ``mqtt``.

A WebSocket message is just a slice of the MQTT byte stream: one frame may hold
half a packet or three of them, so frames are fed to the same
:class:`~proxy.mqtt.server.Connection` as TCP chunks and the sans-IO framer
reassembles them. The :class:`WebSocketTransport` gives the connection the
small transport surface it uses (write, close, pause/resume reading,
``get_extra_info``), with the same backpressure rules: outgoing bytes beyond
the high-water mark pause the broker side until the socket drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

if TYPE_CHECKING:
    from proxy.mqtt.server import MqttGateway

SUBPROTOCOL = "mqtt"
PATHS = ("/mqtt", "/")
HIGH_WATER = 256 * 1024  # queued outgoing bytes above which the broker side stops reading


class WebSocketTransport:
    """The asyncio-transport surface of one MQTT-over-WebSocket client."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request):
        self._ws = ws
        self._request = request
        self._out: list[bytes] = []
        self._out_size = 0
        self._wake = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._writing_paused = False
        self.protocol: Any = None  # the Connection's client side (pause_writing / resume_writing)

    # -- what the connection calls
    def write(self, data: bytes) -> None:
        if self._closing or not data:
            return
        self._out.append(data)
        self._out_size += len(data)
        self._wake.set()
        if self._out_size > HIGH_WATER and not self._writing_paused:
            self._writing_paused = True
            self.protocol.pause_writing()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
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
        if name == "peername":
            return self._request.transport.get_extra_info("peername") if self._request.transport else default
        if name == "ssl_object":
            return self._request.transport.get_extra_info("ssl_object") if self._request.transport else default
        return default

    # -- the two loops that move bytes
    async def pump_out(self) -> None:
        """Send queued bytes as one binary frame per batch, until closed."""
        ws = self._ws
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
                if self._writing_paused:
                    self._writing_paused = False
                    self.protocol.resume_writing()
            if self._closing and not self._out:
                with contextlib.suppress(Exception):
                    await ws.close()
                return

    async def pump_in(self, on_data) -> None:
        ws = self._ws
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


class WebSocketListener:
    """An aiohttp server that hands each upgraded socket to the gateway."""

    def __init__(self, gateway: "MqttGateway"):
        self.gateway = gateway
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._sockets: set[web.WebSocketResponse] = set()

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        app = web.Application()
        for path in PATHS:
            app.router.add_get(path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        # Bind the socket ourselves: the real port is then known for "port 0".
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=1024)
        self._site = web.SockSite(self._runner, sock, ssl_context=ssl_context)
        await self._site.start()
        return sock.getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # A frame may join several packets: allow one maximum-size packet plus slack per frame;
        # the session bounds what it buffers across frames.
        ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=self.gateway.max_packet_size + 65536,
                                   autoping=True, compress=False)
        if not ws.can_prepare(request).ok:
            return web.json_response({"error": {"code": "websocket_required",
                                                "message": "MQTT over WebSocket: upgrade with subprotocol mqtt"}},
                                     status=400)
        await ws.prepare(request)
        if ws.ws_protocol != SUBPROTOCOL:
            # [MQTT-6.0.0-3]/[MQTT-6.0.0-4]: the client must offer "mqtt"; close otherwise.
            await ws.close(code=1002, message=b"subprotocol mqtt required")
            return ws
        transport = WebSocketTransport(ws, request)
        conn = self.gateway.accept_transport(transport, websocket=True)
        if conn is None:  # over max_connections: refused
            await ws.close(code=1013, message=b"try again later")
            return ws
        transport.protocol = conn
        out = asyncio.create_task(transport.pump_out())
        try:
            await transport.pump_in(conn.client_data)
        finally:
            transport.close()
            conn.client_lost(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(out, 2.0)
        return ws
