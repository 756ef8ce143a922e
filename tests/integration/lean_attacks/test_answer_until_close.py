"""Outside review (s29), area 2: an Orion answer whose body ends with its connection is relayed whole.

Without Content-Length or chunked framing (an HTTP/1.0 server, or a ``Connection: close``
answer), a body is what comes until the connection closes (RFC 9112 6.3). The lean upstream
client (``http://``) took that close for a break: the client got a chunked answer without its
last chunk and a closed connection, an answer cut short; aiohttp's client (``https://``)
relays it whole.
"""

from __future__ import annotations

import pytest

from tests.integration.lean_attacks.rig import OK_BODY, exchange, gateway_pair, ok
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    if target.startswith("/v2/entities/a-1"):
        return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n" + OK_BODY, True
    return ok(), False


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_a_body_that_ends_with_the_upstream_connection_is_relayed_whole(tmp_path, oidc, server, tls):
    async with gateway_pair(tmp_path, oidc, _script, tls=make_pki(tmp_path / "pki") if tls else None) as (
            _u, gateways, tokens):
        auth = f"Host: k\r\nAuthorization: Bearer {tokens['alice']}\r\n"
        port = gateways[server].port
        assert port is not None
        request = f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}Connection: close\r\n\r\n".encode()
        data, _closed = await exchange(port, request, timeout=4)
        print(f"\n[{server}, tls={tls}] {data!r}")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nTransfer-Encoding: chunked" in head, head
        assert body == b"%x\r\n%s\r\n0\r\n\r\n" % (len(OK_BODY), OK_BODY), "the answer was cut short"
