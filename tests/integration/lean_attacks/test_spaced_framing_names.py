"""Outside review (s29), area 2: an ``https://`` Orion's framing header with a space before its colon.

Behind TLS the gateway reads Orion with aiohttp's client, whose parser (llhttp in lenient mode)
takes ``Content-Length : 2``, ``Transfer-Encoding : chunked``, ``Connection : close``,
``Upgrade : x`` and ``Proxy-Connection : x``: it frames the body by them, and hands the header
on under its name as written, trailing space included (``"Content-Length "``). ``_relayable``
compared ``name.lower()`` with the hop-by-hop and framing names, so these passed through to the
client beside the gateway's own framing: an answer with both ``Content-Length : 2`` and
``Transfer-Encoding: chunked`` (a client or front proxy that reads the spaced name as the
header, as llhttp's lenient mode does, reads a different body end than one that ignores it),
a second ``Transfer-Encoding``, or a ``Connection``/``Upgrade`` the gateway did not mean.

Each must be dropped as its unspaced spelling is, on both servers: the client gets exactly one
framing header, the gateway's.
"""

from __future__ import annotations

import pytest

from proxy.http.gateway import GATEWAY_KEY
from tests.integration.lean_attacks.rig import OK_BODY, exchange, gateway_pair, ok
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration

_CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(OK_BODY), OK_BODY)
#: name -> Orion's framing lines and body for a-1 (the odd header spelled "Name :")
ODD = {
    "content-length": (b"Content-Length : %d\r\n" % len(OK_BODY), OK_BODY),
    "transfer-encoding": (b"Transfer-Encoding : chunked\r\n", _CHUNKED),
    "connection": (b"Connection : close\r\nContent-Length: %d\r\n" % len(OK_BODY), OK_BODY),
    "upgrade": (b"Upgrade : h2c\r\nContent-Length: %d\r\n" % len(OK_BODY), OK_BODY),
    "proxy-connection": (b"Proxy-Connection : keep-alive\r\nContent-Length: %d\r\n" % len(OK_BODY), OK_BODY),
}


def _script(odd: str):
    async def script(method: str, target: str) -> tuple[bytes, bool]:
        if target.startswith("/v2/entities/a-1"):
            framing, body = ODD[odd]
            return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing + b"\r\n" + body, False
        return ok(), False
    return script


@pytest.mark.parametrize("odd", sorted(ODD))
@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_a_spaced_framing_header_of_orion_is_not_relayed(tmp_path, oidc, server, odd):
    pki = make_pki(tmp_path / "pki")
    async with gateway_pair(tmp_path, oidc, _script(odd), tls=pki) as (upstream, gateways, tokens):
        gateway = gateways[server]
        assert gateway.app[GATEWAY_KEY].pool is None   # https:// Orion: aiohttp's (lenient) client
        auth = f"Host: k\r\nAuthorization: Bearer {tokens['alice']}\r\n"
        request = f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}Connection: close\r\n\r\n".encode()
        assert gateway.port is not None
        data, _closed = await exchange(gateway.port, request, timeout=6)
        print(f"\n[{server}, {odd}] {data!r}")
        assert any(seen.startswith(b"GET /v2/entities/a-1 ") for seen in upstream.seen), "Orion was not asked"
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        names = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]]
        assert not [n for n in names if n != n.strip()], f"{server}: a spaced header name was relayed: {head!r}"
        framing = [n for n in names if n in (b"content-length", b"transfer-encoding")]
        assert len(framing) == 1, f"{server}: the answer is framed by {framing}: {head!r}"
        assert b"upgrade" not in names and b"proxy-connection" not in names, head
        assert OK_BODY in body
