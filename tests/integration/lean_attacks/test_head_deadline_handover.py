"""Outside review of the lean server (issue 18), finding 4.

A head handed to aiohttp part-way restarts the header deadline.

LeanConnection arms ``header_timeout_seconds`` at connect. A head still arriving is handed to
aiohttp's handler as soon as it can no longer be one the lean server serves (longer than
lean_head.MAX_HEAD, 16 KiB, without its end); DeadlineRequestHandler.connection_made then starts
its own header deadline from that moment. A client that drips its head for almost the whole
deadline, then sends 16 KiB of valid header lines, gets a second full deadline: about twice
``header_timeout_seconds`` per connection to hold a slot with one head (aiohttp alone: one).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.lean_attacks.rig import gateway_pair, ok

pytestmark = pytest.mark.integration

DEADLINE = 1.0


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    return ok(), False


async def _time_to_close(port: int) -> float:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = loop.time()
    try:
        writer.write(b"GET /v2/entities/a-1 HTTP/1.1\r\nHost: k\r\n")
        await asyncio.sleep(DEADLINE * 0.8)
        pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 8000) for i in range(3))   # > 16 KiB, each field valid
        writer.write(pad)
        await writer.drain()
        await asyncio.wait_for(reader.read(), DEADLINE * 5)
        return loop.time() - start
    finally:
        writer.close()


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_a_head_is_timed_from_the_connection_even_after_a_hand_over(tmp_path, oidc, server):
    async with gateway_pair(tmp_path, oidc, _script, header_timeout_seconds=DEADLINE) as (_u, gateways, _t):
        port = gateways[server].port
        assert port is not None
        took = await _time_to_close(port)
        print(f"\n[{server}] a dripped head was cut after {took:.2f} s (header_timeout_seconds={DEADLINE})")
        assert took < DEADLINE * 1.5, "the head deadline was restarted"
