"""Shared rig for the lean-server attack reproducers: a scripted upstream and a gateway pair.

The upstream answers each path with bytes the test scripts (so it can misbehave as a
crashing or stalling Orion would); the pair is one gateway on the lean server and one on
aiohttp's, on the same services, so each reproducer can show how the two differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ownership.api import create_api_app
from proxy.http.gateway import HttpGateway
from tests.integration.http_rig import build_services, close_services
from tests.integration.test_http_upstream_differential import _config

ROOT_DIR = Path(__file__).resolve().parents[2]
OK_BODY = b'{"id":"a-2","type":"Thermometer"}'
#: What the upstream writes for a path: bytes, then whether it closes the connection after.
Script = Callable[[str, str], Awaitable[tuple[bytes, bool]]]


def ok(body: bytes = OK_BODY) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


class ScriptedUpstream:
    """An HTTP/1.1 upstream whose answer to each request the test decides."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.seen: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = re.search(rb"(?im)^content-length:\s*(\d+)\r$", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                self.seen.append(head + body)
                method, target = head.split(b" ", 2)[:2]
                data, close = await self.script(method.decode(), target.decode())
                writer.write(data)
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def gateway_pair(tmp: Path, oidc: Any, script: Script, **http: Any):
    """(upstream, {"lean": gateway, "aiohttp": gateway}, tokens); alice owns a-1 and a-2, bob b-1."""
    upstream = ScriptedUpstream(script)
    await upstream.start()
    config = _config(f"http://127.0.0.1:{upstream.port}", tmp)
    if http:
        config = dataclasses.replace(config, http=dataclasses.replace(config.http, **http))
    services, tokens = await build_services(config, oidc)
    alice = await services.tokens.validate(tokens["alice"])
    bob = await services.tokens.validate(tokens["bob"])
    await services.ownership.register_device(alice, {"id": "a-1", "type": "Thermometer"})
    await services.ownership.register_device(alice, {"id": "a-2", "type": "Thermometer"})
    await services.ownership.register_device(bob, {"id": "b-1", "type": "Thermometer"})
    gateways = {name: HttpGateway(services, create_api_app(services), server=name) for name in ("lean", "aiohttp")}
    for gateway in gateways.values():
        await gateway.start()
    try:
        yield upstream, gateways, tokens
    finally:
        for gateway in gateways.values():
            await gateway.stop()
        await close_services(services)
        await upstream.stop()


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
