"""Clients that send without reading, and floods of connections, against the HTTP listener.

Measured, plain and over TLS: a client pipelining thousands of requests and
never reading its answers holds at most ``http.max_pipelined_requests``
parsed requests and a bounded write buffer at the gateway, and is closed once
its answers have not moved for ``http.write_timeout_seconds``; connections past
``http.max_connections`` are aborted at accept. A legitimate client gets its
200 meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from typing import Any

import pytest

from ownership.api import create_api_app
from proxy.http.gateway import HttpGateway
from proxy.tls import client_context
from tests.integration.http_rig import build_services, close_services, gateway_config
from tests.rig.ngsi_standin import NgsiStandin
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration

MAX_PIPELINED = 4
WRITE_TIMEOUT = 1.0
MAX_CONNECTIONS = 8
N_PIPELINED = 3000
BIG_ATTRIBUTE = 64 * 1024    # each answer is this large, so the client's unread answers fill the buffers fast
HIGH_WATER = 64 * 1024       # the transports' default high-water mark


@pytest.fixture(params=["tls", "plain", "tls-aiohttp-server", "plain-aiohttp-server"])
async def gateway(request, tmp_path, oidc):
    # The lean server takes NGSI connections; aiohttp's (the one connections are handed over to) as well.
    pki = make_pki(tmp_path / "pki")
    standin = NgsiStandin()
    await standin.start()
    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key)} if request.param.startswith("tls") else None
    config = gateway_config(standin.url, tmp_path, tls=tls, max_pipelined_requests=MAX_PIPELINED,
                            write_timeout_seconds=WRITE_TIMEOUT, max_connections=MAX_CONNECTIONS,
                            header_timeout_seconds=5, body_timeout_seconds=5)
    services, tokens = await build_services(config, oidc)
    alice = await services.tokens.validate(tokens["alice"])
    await services.ownership.register_device(alice, {"id": "a-1", "type": "Thermometer"})
    standin.tenant("").entities["a-1"] = {"id": "a-1", "type": "Thermometer",
                                          "blob": {"type": "Text", "value": "x" * BIG_ATTRIBUTE}}
    gw = HttpGateway(services, create_api_app(services),
                     server="aiohttp" if request.param.endswith("aiohttp-server") else "lean")
    await gw.start()
    try:
        yield gw, tokens, client_context(pki.ca) if tls else None
    finally:
        await gw.stop()
        await close_services(services)
        await standin.stop()


async def _open(port: int, ctx: ssl.SSLContext | None, *, rcvbuf: int | None = None) -> Any:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:   # a client that reads nothing: a small window, so the gateway's buffers fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="localhost" if ctx else None,
                                         limit=4096)


async def _legit_get(port: int, ctx: ssl.SSLContext | None, token: str) -> int:
    reader, writer = await _open(port, ctx)
    try:
        writer.write(f"GET /v2/entities/a-1?attrs=type HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


def _handlers(gw: HttpGateway) -> list[Any]:
    return gw.connections()


async def test_a_client_pipelining_without_reading_is_bounded_then_closed(gateway):
    gw, tokens, ctx = gateway
    request = (f"GET /v2/entities/a-1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tokens['alice']}\r\n\r\n"
               ).encode()
    _, writer = await _open(gw.port, ctx, rcvbuf=4096)
    writer.write(request * N_PIPELINED)   # written as far as the gateway reads; never drained, never read
    started = time.monotonic()
    peak_queued = peak_buffered = 0
    attacker = None
    legit_task = None
    while time.monotonic() - started < 15:
        handlers = _handlers(gw)
        if attacker is None and handlers:
            attacker = handlers[0]
            legit_task = asyncio.create_task(_legit_get(gw.port, ctx, tokens["alice"]))   # while it is held
        if attacker is not None:
            peak_queued = max(peak_queued, attacker.peak_queued, attacker.queued)
            if attacker.transport is not None:
                peak_buffered = max(peak_buffered, attacker.transport.get_write_buffer_size())
            if attacker not in handlers:
                break   # closed by the gateway
        await asyncio.sleep(0.01)
    held_for = time.monotonic() - started
    assert legit_task is not None
    legit = await legit_task
    served = attacker.request_count if attacker is not None else 0
    writer.transport.abort()
    print(f"\npipelining {N_PIPELINED} requests, never reading: {served} parsed, at most {peak_queued} queued "
          f"(max_pipelined_requests {MAX_PIPELINED}), at most {peak_buffered} bytes of answers buffered; "
          f"closed after {held_for:.2f} s (write_timeout {WRITE_TIMEOUT} s); legitimate request meanwhile: {legit}")
    assert attacker is not None and attacker not in _handlers(gw), "the stalled connection was not closed"
    assert 0 < peak_queued <= MAX_PIPELINED
    assert served < N_PIPELINED / 10
    assert peak_buffered <= HIGH_WATER + 2 * BIG_ATTRIBUTE + 16384
    assert legit == 200


async def test_connections_past_max_connections_are_aborted_at_accept(gateway):
    gw, tokens, ctx = gateway
    held = [await _open(gw.port, ctx) for _ in range(MAX_CONNECTIONS)]
    for _, writer in held:   # each one made it to the HTTP handler (TLS handshake done)
        writer.write(b"GET /v2/version")   # part of a head: held until header_timeout
    await asyncio.sleep(0)
    assert gw.site is not None and gw.site.open_connections == MAX_CONNECTIONS
    refused_in: list[float] = []
    for _ in range(20):   # plain TCP, no TLS: the refusal comes before any handshake
        started = time.monotonic()
        raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", gw.port)
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(raw_reader.read(100), 5) == b""
        refused_in.append(time.monotonic() - started)
        raw_writer.close()
    assert gw.site.open_connections == MAX_CONNECTIONS
    for _, writer in held:
        writer.transport.abort()
    for _ in range(100):
        if gw.site.open_connections == 0:
            break
        await asyncio.sleep(0.02)
    status = await _legit_get(gw.port, ctx, tokens["alice"])
    print(f"\n{MAX_CONNECTIONS} connections held: 20 more refused at accept in at most "
          f"{max(refused_in) * 1000:.0f} ms each; after the held ones closed: {status}")
    assert gw.site.open_connections <= 1
    assert status == 200
