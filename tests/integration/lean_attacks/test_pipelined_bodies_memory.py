"""Outside review of the lean server (issue 18), finding 3.

The pipelining cap counts requests, not bytes: one connection makes the lean server
hold max_pipelined_requests x max_body_bytes of bodies (16 MiB with the defaults).

LeanConnection._parse feeds every body byte into its request's LeanBody as it arrives and never
pauses the socket for a body; only at a head boundary does it compare the queue with
``max_pipelined_requests``. While one answer is slow (a slow Orion, or a client that does not read
its answers until the write deadline), a client pipelines 16 writes with 1 MiB bodies each and
the server buffers all of them: at ``max_connections`` = 1000 that is 16 GiB. aiohttp's server
stops reading when a body's stream holds more than its read buffer (2 x 64 KiB) and so buffers a
few hundred KiB per connection in the same case.

Status on main c41ab5c: fixed by 7cc3609 (_BODY_HIGH_WATER, 256 KiB for all bodies of a
connection): both tests pass (about 0.5 MiB held, with the unparsed buffer, against 16 MiB before).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.lean_attacks.rig import gateway_pair, ok

pytestmark = pytest.mark.integration

MAX_BODY = 1 << 20   # the default http.max_body_bytes
PIPELINED = 16       # the default http.max_pipelined_requests
release = asyncio.Event()


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    if target.startswith("/v2/entities/a-1") and method == "GET":
        await release.wait()   # a slow Orion: the first answer waits
    if method == "PATCH":
        return b"HTTP/1.1 204 No Content\r\n\r\n", False
    return ok(), False


def _slow_read_then_writes(token: str) -> bytes:
    """A read Orion holds up, then PIPELINED writes with MAX_BODY bodies queued behind it."""
    auth = f"Host: k\r\nAuthorization: Bearer {token}\r\n"
    slow = f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}\r\n".encode()
    body = b"x" * MAX_BODY   # not JSON on purpose: the gateway streams it, it does not parse it
    write = (f"PATCH /v2/entities/a-2/attrs HTTP/1.1\r\n{auth}Content-Type: text/plain\r\n"
             f"Content-Length: {MAX_BODY}\r\n\r\n").encode() + body
    return slow + write * PIPELINED


async def test_one_connection_cannot_make_the_lean_server_buffer_its_pipelined_bodies(tmp_path, oidc):
    release.clear()
    async with gateway_pair(tmp_path, oidc, _script, max_body_bytes=MAX_BODY,
                            upstream_timeout_seconds=30) as (_upstream, gateways, tokens):
        lean = gateways["lean"]
        assert lean.port is not None
        _reader, writer = await asyncio.open_connection("127.0.0.1", lean.port)
        try:
            writer.write(_slow_read_then_writes(tokens["alice"]))
            (connection,) = lean.lean_connections.open
            peak = 0
            for _ in range(100):   # up to 5 s for the bytes to arrive
                await asyncio.sleep(0.05)
                peak = max(peak, connection.buffered_bytes)
                if connection.queued >= PIPELINED and peak >= PIPELINED * MAX_BODY:
                    break
            print(f"\nlean server holds {peak} body bytes for one connection "
                  f"({connection.queued} requests queued behind a slow answer)")
            assert peak <= 4 * MAX_BODY, f"one connection holds {peak / (1 << 20):.1f} MiB of request bodies"
        finally:
            release.set()
            writer.close()


def _aiohttp_held_bytes(handler) -> int:
    held = sum(getattr(payload, "_size", 0) for _, payload in handler._messages)
    request = handler._current_request
    if request is not None:
        held += getattr(request.content, "_size", 0)
    return held


async def test_aiohttp_buffers_little_in_the_same_case(tmp_path, oidc):
    """The comparison: aiohttp's server in front of the same slow Orion (this test passes)."""
    release.clear()
    async with gateway_pair(tmp_path, oidc, _script, max_body_bytes=MAX_BODY,
                            upstream_timeout_seconds=30) as (_upstream, gateways, tokens):
        gateway = gateways["aiohttp"]
        assert gateway.port is not None
        _reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(_slow_read_then_writes(tokens["alice"]))
            peak = 0
            for _ in range(40):   # 2 s
                await asyncio.sleep(0.05)
                for handler in gateway.connections():
                    peak = max(peak, _aiohttp_held_bytes(handler))
            handlers = gateway.connections()
            print(f"\naiohttp holds {peak} body bytes for one connection "
                  f"({len(handlers)} open, {[h.queued for h in handlers]} queued)")
            assert peak <= 4 * MAX_BODY
        finally:
            release.set()
            writer.close()
