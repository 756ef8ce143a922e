"""Outside review of the lean server (issue 18), finding 5: a head sent a byte at a time. Each read
of a head without its end makes the lean server scan the head from its start, so a dripped head
would cost it quadratic time; after a few such reads the head is aiohttp's, whose parser reads it
incrementally, and the request is still answered."""

from __future__ import annotations

import asyncio

import pytest

from proxy.http import lean_server
from tests.integration.lean_attacks.rig import gateway_pair, ok

pytestmark = pytest.mark.integration


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    return ok(), False


async def test_a_dripped_head_is_read_by_aiohttp_after_a_few_reads_and_answered(tmp_path, oidc):
    async with gateway_pair(tmp_path, oidc, _script) as (_upstream, gateways, tokens):
        lean = gateways["lean"]
        head = (f"GET /v2/entities/a-1 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {tokens['alice']}\r\n"
                "Connection: close\r\n\r\n").encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", lean.port)
        try:
            for i in range(len(head)):
                writer.write(head[i:i + 1])
                await writer.drain()
                if i < 2 * lean_server._MAX_PARTIAL_READS:
                    await asyncio.sleep(0.01)   # one segment each, for the first reads
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200 ")
        tally = lean.lean_connections
        assert tally.handed_over == 1 and tally.served == 0   # not scanned here once per byte
