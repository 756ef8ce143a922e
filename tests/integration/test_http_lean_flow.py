"""The lean server's flow control: a client that pipelines requests with large bodies and reads
no answer holds at most about one body's high-water mark of them in the gateway, not one body per
request read ahead (the pipelining cap times ``max_body_bytes``), and a body nobody reads (a
refused write) is read off the socket and dropped, not kept."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from ownership.api import create_api_app
from proxy.http import lean_server
from proxy.http.gateway import HttpGateway
from tests.integration.http_rig import build_services, close_services, gateway_config
from tests.rig.ngsi_standin import NgsiStandin

pytestmark = pytest.mark.integration

MAX_PIPELINED = 8
BODY = 400 * 1024
BIG_ATTRIBUTE = 64 * 1024


@pytest.fixture
async def gateway(tmp_path, oidc):
    standin = NgsiStandin()
    await standin.start()
    config = gateway_config(standin.url, tmp_path, max_pipelined_requests=MAX_PIPELINED, max_body_bytes=1 << 20,
                            write_timeout_seconds=3, header_timeout_seconds=5, body_timeout_seconds=5)
    services, tokens = await build_services(config, oidc)
    alice = await services.tokens.validate(tokens["alice"])
    await services.ownership.register_device(alice, {"id": "a-1", "type": "Thermometer"})
    bob = await services.tokens.validate(tokens["bob"])
    await services.ownership.register_device(bob, {"id": "b-1", "type": "Thermometer"})
    for entity in ("a-1", "b-1"):
        standin.tenant("").entities[entity] = {"id": entity, "type": "Thermometer",
                                               "blob": {"type": "Text", "value": "x" * BIG_ATTRIBUTE}}
    gw = HttpGateway(services, create_api_app(services))
    await gw.start()
    try:
        yield gw, tokens
    finally:
        await gw.stop()
        await close_services(services)
        await standin.stop()


async def _stalled_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # reads nothing: the answers back up
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


def _patch(token: str, entity: str) -> bytes:
    body = json.dumps({"blob": {"type": "Text", "value": "y" * BODY}}).encode()
    return (f"PATCH /v2/entities/{entity}/attrs HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def _put(token: str, entity: str) -> bytes:
    body = b"z" * BODY
    return (f"PUT /v2/entities/{entity}/attrs/blob/value HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _peak_buffered(gw: HttpGateway, seconds: float) -> int:
    peak, until = 0, time.monotonic() + seconds
    while time.monotonic() < until:
        for connection in gw.lean_connections:
            peak = max(peak, connection.buffered_bytes)
        await asyncio.sleep(0.005)
    return peak


async def test_pipelined_bodies_are_held_to_the_high_water_mark(gateway):
    gw, tokens = gateway
    get = f"GET /v2/entities/a-1 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {tokens['alice']}\r\n\r\n".encode()
    _reader, writer = await _stalled_client(gw.port)
    try:
        # Answers to the reads fill the buffers and stall the gateway; the writes behind them wait, bodies and all.
        writer.write(get * 40 + _patch(tokens["alice"], "a-1") * MAX_PIPELINED)
        peak = await _peak_buffered(gw, 2.0)
    finally:
        writer.transport.abort()
    print(f"\n{MAX_PIPELINED} bodies of {BODY // 1024} KiB pipelined behind stalled answers: at most "
          f"{peak // 1024} KiB of them held (high-water mark {lean_server._BODY_HIGH_WATER // 1024} KiB)")
    assert peak > lean_server._BODY_HIGH_WATER // 2   # the bodies did arrive
    # plus what one read of the socket may bring (the stdlib loop reads up to 256 KiB at a time); without
    # the mark, every body read ahead is held: MAX_PIPELINED x 400 KiB
    assert peak <= lean_server._BODY_HIGH_WATER + 256 * 1024 + 8192


async def test_a_refused_writes_body_is_dropped_and_the_connection_goes_on(gateway):
    gw, tokens = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        # alice may not write bob's device: refused 403 before the body (streamed to Orion when allowed)
        # is read; the body is then skipped.
        writer.write(_put(tokens["alice"], "b-1")[:200000])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 403 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(_put(tokens["alice"], "b-1")[200000:])   # the rest of that body
        peak = await _peak_buffered(gw, 0.3)
        assert peak < 65536 + 4096   # read and dropped, not kept for nobody
        writer.write(f"GET /v2/entities/a-1 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {tokens['alice']}\r\n"
                     "Connection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")   # the skipped body was not read as a head
    finally:
        writer.close()
