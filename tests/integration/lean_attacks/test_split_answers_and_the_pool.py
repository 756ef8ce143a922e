"""Outside attack on e8469a6 (s29-b), finding 1: an answer Orion sent in more than one read.

e8469a6 gives Orion's connection back before the client is written to when the answer is
``complete``, and keeps it for as long as the client reads otherwise. ``complete`` was asked as
soon as the answer's head was in: the answer is whole then only if Orion's bytes came in the
same read as its head. Over a network (segments, Orion writing its body after its head) a small
answer is not whole at that moment, so it went the streamed way and kept its connection to
Orion until a client that reads nothing let it go: slow readers asking for ordinary answers
took every connection, and everyone else was answered 503, as before e8469a6.

The upstream here writes each answer's head and the first KiB of its body, then the rest 50 ms
later; the pool has one connection.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import pytest

import proxy.http.gateway as gateway_module
from ownership.api import create_api_app
from proxy.http.gateway import HttpGateway
from tests.integration.lean_attacks.rig import ScriptedUpstream, exchange, ok
from tests.integration.test_http_upstream_differential import gateway_pair as shared_pair

pytestmark = pytest.mark.integration

WHOLE = b'{"id":"a-1","type":"Thermometer","blob":{"type":"Text","value":"' + b"x" * 200_000 + b'"}}'


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    return (ok(WHOLE) if target.startswith("/v2/entities/a-1") else ok()), False


class _SplitWriter:
    """A stream writer that sends an answer's head and the first KiB of its body, the rest later."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._rest = b""

    def write(self, data: bytes) -> None:
        cut = data.find(b"\r\n\r\n") + 4 + 1024
        self._writer.write(data[:cut])
        self._rest = data[cut:]

    async def drain(self) -> None:
        await self._writer.drain()
        if self._rest:
            await asyncio.sleep(0.05)
            rest, self._rest = self._rest, b""
            self._writer.write(rest)
            await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


class SplitUpstream(ScriptedUpstream):
    async def _serve(self, reader: asyncio.StreamReader, writer: Any) -> None:
        await super()._serve(reader, cast(asyncio.StreamWriter, _SplitWriter(writer)))


def _server_buffered(gateway: HttpGateway) -> int:
    return max((c.transport.get_write_buffer_size() for c in gateway.connections() if c.transport is not None),
               default=0)


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_an_answer_orion_sent_in_two_reads_holds_no_connection_for_a_client_that_does_not_read(
        tmp_path, oidc, server, monkeypatch):
    monkeypatch.setattr(gateway_module, "_UPSTREAM_CONNECTIONS", gateway_module._SIDE_CONNECTIONS + 1)

    def make(services: Any, name: str) -> HttpGateway:
        return HttpGateway(services, create_api_app(services), server=name)

    async with shared_pair(tmp_path, oidc, make, ("lean", "aiohttp"), recorder=SplitUpstream(_script),
                           upstream_timeout_seconds=20) as (_u, gateways, tokens):
        gateway = gateways[server]
        assert gateway.port is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", gateway.port))
        sock.send(f"GET /v2/entities/a-1 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {tokens['alice']}\r\n\r\n"
                  .encode() * 40)   # and reads nothing
        try:
            end = loop.time() + 15
            while not _server_buffered(gateway):   # an answer waits in the gateway for it to read
                assert loop.time() < end, "the slow reader's answers never filled the kernel's buffers"
                await asyncio.sleep(0.01)
            good = f"GET /v2/entities/a-2 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {tokens['alice']}\r\n" \
                   "Connection: close\r\n\r\n"
            answer, _ = await exchange(gateway.port, good.encode(), timeout=5)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            assert _server_buffered(gateway) > 0   # the slow reader still not served: it held no connection
        finally:
            sock.close()
