"""Outside attack (s29-b), finding 5: a chunked answer's trailer fields relayed as its head's.

llhttp hands a chunked answer's trailer fields to ``on_header`` as it does the head's, and the
lean upstream client appended them to the answer's headers: when the trailer had come by the
time the relay built the client's head (the answer in one read with its head, and always once
the relay reads a small answer ahead, finding 1), Orion's trailer went out as header fields
(a ``Set-Cookie`` among them). aiohttp's client, an ``https://`` Orion's, drops trailer fields
(its headers are the head's). llhttp refuses a framing field in a trailer (Content-Length),
so this is not a desync; the two clients relay different heads.
"""

from __future__ import annotations

import pytest

from tests.integration.lean_attacks.rig import OK_BODY, exchange, gateway_pair, ok

pytestmark = pytest.mark.integration


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    if target.startswith("/v2/entities/a-1"):
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\n{}\r\n0\r\nSet-Cookie: session=orion\r\nX-Trailer: t\r\n\r\n"), False
    return ok(), False


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_a_trailer_is_not_relayed_as_a_header_of_the_answer(tmp_path, oidc, server):
    async with gateway_pair(tmp_path, oidc, _script) as (_upstream, gateways, tokens):
        auth = f"Host: k\r\nAuthorization: Bearer {tokens['alice']}\r\n"
        first = f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}\r\n".encode()
        second = f"GET /v2/entities/a-2 HTTP/1.1\r\n{auth}Connection: close\r\n\r\n".encode()
        port = gateways[server].port
        assert port is not None
        data, _ = await exchange(port, first + second, timeout=5)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), data[:300]
        assert b"Set-Cookie" not in head and b"X-Trailer" not in head, head
        assert b"HTTP/1.1 200 " in rest and rest.endswith(OK_BODY), rest   # the next answer follows, whole
