"""Shared rig for the lean-server attack reproducers: a scripted upstream and a gateway pair.

The upstream answers each path with bytes the test scripts (so it can misbehave as a
crashing or stalling Orion would); the pair is one gateway on the lean server and one on
aiohttp's, on the same services, so each reproducer can show how the two differ. Given a
:class:`Pki`, the upstream speaks TLS (an ``https://`` Orion, which the gateway reaches over
its aiohttp client rather than the lean one).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ownership.api import create_api_app
from proxy.http.gateway import HttpGateway
from tests.integration.test_http_upstream_differential import Recorder
from tests.integration.test_http_upstream_differential import gateway_pair as shared_pair
from tests.rig.pki import Pki

ROOT_DIR = Path(__file__).resolve().parents[2]
OK_BODY = b'{"id":"a-2","type":"Thermometer"}'
#: What the upstream writes for a path: bytes, then whether it closes the connection after.
Script = Callable[[str, str], Awaitable[tuple[bytes, bool]]]


def ok(body: bytes = OK_BODY) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


class ScriptedUpstream(Recorder):
    """The differential test's recording upstream, answering each request as the test decides."""

    def __init__(self, script: Script) -> None:
        super().__init__()
        self.script = script

    async def respond(self, method: str, target: str) -> tuple[bytes, bool]:
        return await self.script(method, target)


class TlsScriptedUpstream(ScriptedUpstream):
    """The scripted upstream behind TLS, with the PKI's server certificate (for 127.0.0.1).

    Its socket is bound when it is made, so that its ``https://`` address can go into the
    gateway's configuration before it starts."""

    def __init__(self, script: Script, pki: Pki) -> None:
        super().__init__(script)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, sock=self.socket, ssl=self.context)


@contextlib.asynccontextmanager
async def gateway_pair(tmp: Path, oidc: Any, script: Script, *, tls: Pki | None = None, **http: Any):
    """(upstream, {"lean": gateway, "aiohttp": gateway}, tokens); alice owns a-1 and a-2, bob b-1.
    With ``tls``, the upstream is an ``https://`` one whose certificate ``tls`` signed, and the
    gateways trust that CA as an operator would say so (``http.upstream_ca``)."""
    def make(services: Any, name: str) -> HttpGateway:
        return HttpGateway(services, create_api_app(services), server=name)

    recorder: ScriptedUpstream = ScriptedUpstream(script)
    if tls is not None:
        recorder = TlsScriptedUpstream(script, tls)
        http["upstream"] = recorder.url
        http["upstream_ca"] = str(tls.ca)
    async with shared_pair(tmp, oidc, make, ("lean", "aiohttp"), recorder=recorder, **http) as made:
        yield made


async def exchange(port: int, data: bytes, timeout: float = 8) -> tuple[bytes, bool]:
    """Send ``data``, read until the gateway closes or ``timeout``: (bytes read, whether it closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    closed = False
    try:
        writer.write(data)
        await writer.drain()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            left = end - loop.time()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
            except ConnectionError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            out += chunk
    finally:
        writer.close()
    return out, closed
