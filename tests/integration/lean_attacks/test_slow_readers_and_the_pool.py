"""The gap the s29 outside review left documented: clients reading slowly and Orion's connections.

The lean upstream pool opens at most so many connections to Orion. A client that reads its
answer slowly held one of them for as long as it took (the connection went back only once the
answer was written), and a request that found them all taken waited for one with no deadline.
Two promises now:

* an answer Orion has sent whole (its usual small one) gives its Orion connection back before
  the client is written to: a client that does not read holds only its own connection;
* a request that finds every connection taken (large answers, relayed as slowly as their clients
  read them) is answered 503 within ``http.upstream_timeout_seconds``, and was not sent.

The pool here has one connection (``_UPSTREAM_CONNECTIONS``), so one slow reader takes it all.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

import proxy.http.gateway as gateway_module
from tests.integration.lean_attacks.rig import exchange, gateway_pair, ok
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration

WHOLE = b'{"id":"a-1","type":"Thermometer","blob":{"type":"Text","value":"' + b"x" * 200_000 + b'"}}'
STREAMED = 4 * 1024 * 1024   # past what the lean client reads ahead (256 KiB): relayed as read


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    if target.startswith("/v2/entities/a-1"):
        return ok(WHOLE), False
    if target.startswith("/v2/entities/b-1"):
        return ok(b"y" * STREAMED), False
    return ok(), False


def _server_buffered(gateway) -> int:
    return max((c.transport.get_write_buffer_size() for c in gateway.connections() if c.transport is not None),
               default=0)


async def _slow_reader(port: int, token: str, entity: str, times: int) -> socket.socket:
    """A client that asks for ``entity`` ``times`` over, pipelined, and reads nothing (a tiny
    receive window): past what the kernel's socket buffers take (they grow to a few MiB on
    loopback), an answer waits in the gateway for it to read."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    sock.send(f"GET /v2/entities/{entity} HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
              * times)
    return sock


@pytest.fixture
def one_orion_connection(monkeypatch):
    monkeypatch.setattr(gateway_module, "_UPSTREAM_CONNECTIONS", gateway_module._SIDE_CONNECTIONS + 1)


async def _until(check, seconds: float = 5) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not check():
        assert loop.time() < end, "not within the bound"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_a_whole_answer_a_client_does_not_read_holds_no_connection_to_orion(tmp_path, oidc, server,
                                                                                  one_orion_connection):
    async with gateway_pair(tmp_path, oidc, _script, upstream_timeout_seconds=20) as (_u, gateways, tokens):
        gateway = gateways[server]
        assert gateway.port is not None
        slow = await _slow_reader(gateway.port, tokens["alice"], "a-1", 40)
        try:
            await _until(lambda: _server_buffered(gateway) > 0, 10)   # an answer waits for it to read
            good = f"GET /v2/entities/a-2 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {tokens['alice']}\r\n" \
                   "Connection: close\r\n\r\n"
            answer, _ = await exchange(gateway.port, good.encode(), timeout=5)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            assert _server_buffered(gateway) > 0   # the slow reader's answer still waiting: it was held meanwhile
        finally:
            slow.close()


async def _answer_while_the_pool_is_taken(gateway, upstream, tokens) -> bytes:
    """Bob reads a large answer as slowly as he can, holding the one connection to Orion; Alice's
    request meanwhile is answered (within the 1 s of upstream_timeout_seconds and well before the
    write deadline, 30 s, would end Bob's) and never sent: the answer she gets."""
    assert gateway.port is not None
    slow = await _slow_reader(gateway.port, tokens["bob"], "b-1", 1)
    try:
        await _until(lambda: _server_buffered(gateway) > 0)
        sent = len(upstream.seen)
        good = f"GET /v2/entities/a-2 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {tokens['alice']}\r\n" \
               "Connection: close\r\n\r\n"
        loop = asyncio.get_running_loop()
        began = loop.time()
        answer, _ = await exchange(gateway.port, good.encode(), timeout=10)
        assert loop.time() - began < 8, "Alice waited for Bob's slow read"
        assert len(upstream.seen) == sent   # not sent to Orion: its outcome is known
        return answer
    finally:
        slow.close()


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_a_request_finding_every_orion_connection_taken_is_answered_503_in_time(tmp_path, oidc, server,
                                                                                       one_orion_connection):
    async with gateway_pair(tmp_path, oidc, _script, upstream_timeout_seconds=1) as (upstream, gateways, tokens):
        answer = await _answer_while_the_pool_is_taken(gateways[server], upstream, tokens)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"Retry-After: 1" in answer


async def test_on_an_https_orion_a_request_finding_every_connection_taken_is_answered_in_time(tmp_path, oidc,
                                                                                            monkeypatch):
    """The same on the aiohttp client (an https:// Orion): its pool wait runs under its ``connect``
    timeout, whose error is the same as a slow connect's; proxy.http.pool_wait tells them apart, so
    the answer is the same 503 as the lean pool's, and the request was not sent."""
    monkeypatch.setattr(gateway_module, "_UPSTREAM_CONNECTIONS", 1)
    async with gateway_pair(tmp_path, oidc, _script, tls=make_pki(tmp_path / "pki"),
                            upstream_timeout_seconds=1) as (upstream, gateways, tokens):
        answer = await _answer_while_the_pool_is_taken(gateways["lean"], upstream, tokens)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"Retry-After: 1" in answer
