"""Outside review of the lean server (issue 18), finding 6.

Both servers): a client that stops reading with less than the write buffer's high
water left in user space holds its connection and its max_connections slot for ever.

The write deadline is armed only in pause_writing, i.e. once more than 64 KiB wait in the
transport's buffer. A client that shrinks its receive window to zero and leaves less than
that unsent, then goes quiet, is closed by the header deadline with transport.close(), which
waits for the buffer to drain: it never does, no timer aborts it, and connection_lost (which
gives the slot back) never comes. The client calibrates how much to leave (here the test reads
the server's buffer size in place of that calibration).
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.integration.lean_attacks.rig import gateway_pair, ok

pytestmark = pytest.mark.integration

TIMEOUT = 0.5


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    return ok(), False


def _server_buffered(gateway) -> int:
    return max((c.transport.get_write_buffer_size() for c in gateway.connections() if c.transport is not None),
               default=0)


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_a_client_that_reads_nothing_is_closed_within_the_deadlines(tmp_path, oidc, server):
    async with gateway_pair(tmp_path, oidc, _script, header_timeout_seconds=TIMEOUT,
                            write_timeout_seconds=TIMEOUT) as (_u, gateways, _t):
        gateway = gateways[server]
        assert gateway.port is not None and gateway.site is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)   # a tiny window, never read
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
        denied = b"GET /v2/entities/a-1 HTTP/1.1\r\nHost: k\r\n\r\n"   # answered 401: no credentials needed
        try:
            for _ in range(4000):
                sock.send(denied * 16)
                await asyncio.sleep(0.002)
                if _server_buffered(gateway) > 16 * 1024:   # well under the 64 KiB high water
                    break
            buffered = _server_buffered(gateway)
            await asyncio.sleep(TIMEOUT * 8)   # header and write deadlines, several times over
            still = gateway.site.open_connections
            print(f"\n[{server}] {buffered} bytes left in the server's buffer; after {TIMEOUT * 8:g} s "
                  f"open connections: {still}")
            assert still == 0, "the connection and its slot are held with no deadline left"
        finally:
            sock.close()
