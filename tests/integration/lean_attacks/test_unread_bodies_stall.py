"""Outside review of the lean server (issue 18), finding 7.

Bodies that arrived in full and that nobody read are
never taken off the connection's unread count, so a keep-alive connection stops reading for good
after 256 KiB of them.

LeanConnection counts body bytes that arrived and were not read (``_unread``) and pauses the socket
at _BODY_HIGH_WATER. After an answer, _serve calls ``discard()`` (which gives the bytes back) only
when the body has not ended: ``if not item.content.is_eof()``. A body that had fully arrived but
that the gateway did not read (a 401, 403, 400 or 404 answered before the body is looked at) keeps
its bytes in ``_unread`` for ever. Once the sum reaches 256 KiB the socket is paused and nothing
resumes it: the requests the client has already sent are never answered, and the connection is
cut by the header deadline. aiohttp drains such bodies and serves the whole sequence.
"""

from __future__ import annotations

import pytest

from tests.integration.lean_attacks.rig import exchange, gateway_pair, ok

pytestmark = pytest.mark.integration

REQUESTS = 100
BODY = 4000   # under the rig's max_body_bytes (4096); 66 of them make 256 KiB


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    return ok(), False


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_denied_requests_with_bodies_are_all_answered_on_one_connection(tmp_path, oidc, server):
    async with gateway_pair(tmp_path, oidc, _script, header_timeout_seconds=2.0) as (_u, gateways, _t):
        port = gateways[server].port
        assert port is not None
        # No credentials: answered 401 before the body is read.
        denied = (f"PATCH /v2/entities/a-1/attrs HTTP/1.1\r\nHost: k\r\nContent-Type: text/plain\r\n"
                  f"Content-Length: {BODY}\r\n\r\n").encode() + b"x" * BODY
        last = b"GET /v2/entities/a-1 HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n"
        data, closed = await exchange(port, denied * REQUESTS + last, timeout=8)
        answers = data.count(b"HTTP/1.1 401")
        print(f"\n[{server}] {answers} of {REQUESTS + 1} requests answered 401; closed={closed}; "
              f"408s: {data.count(b'HTTP/1.1 408')}")
        assert answers == REQUESTS + 1
