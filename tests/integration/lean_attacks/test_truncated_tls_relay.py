"""Issue 18 follow-up: an ``https://`` Orion's answer cut short mid-body ends the client connection.

test_truncated_relay.py shows it for a plain ``http://`` Orion (the lean upstream client,
:meth:`HttpGateway._relay_lean`). Behind TLS the gateway keeps its aiohttp client and relays
through :meth:`HttpGateway._relay`, which has a fix of its own: on aiohttp's server the answer
broken off after its head closes the client's transport (``_broken_off``); on the lean server
:meth:`LeanRequest.relay` marks the connection ``close_after``. Without either, the client still
waits for the rest of the declared body, and the next answer on the connection (or an error
head written after the first head) is read as those missing bytes: a desync that, behind a
connection-sharing front proxy, hands one user's answer to another.
"""

from __future__ import annotations

import pytest

from proxy.http.gateway import GATEWAY_KEY
from tests.integration.lean_attacks.rig import OK_BODY, exchange, gateway_pair, ok
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration

DECLARED = 200
CUT = b'{"id":"a-1'


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    if target.startswith("/v2/entities/a-1"):
        # Orion announces 200 body bytes, sends 10, and closes (its TLS session ends cleanly).
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % DECLARED
        return head + CUT, True
    return ok(), False


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_a_truncated_tls_upstream_answer_closes_the_client_connection(tmp_path, oidc, server):
    pki = make_pki(tmp_path / "pki")
    async with gateway_pair(tmp_path, oidc, _script, tls=pki) as (upstream, gateways, tokens):
        gateway = gateways[server]
        assert gateway.app[GATEWAY_KEY].pool is None   # https:// Orion: the aiohttp client, so _relay
        auth = f"Host: k\r\nAuthorization: Bearer {tokens['alice']}\r\n"
        first = f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}\r\n".encode()
        second = f"GET /v2/entities/a-2 HTTP/1.1\r\n{auth}\r\n".encode()
        assert gateway.port is not None
        data, closed = await exchange(gateway.port, first + second, timeout=6)
        print(f"\n[{server}, https upstream] closed={closed} read {len(data)} bytes:\n{data!r}")
        assert any(seen.startswith(b"GET /v2/entities/a-1 ") for seen in upstream.seen), "Orion was not asked"
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"Content-Length: %d" % DECLARED in head
        assert rest.startswith(CUT), rest   # the cut answer's head and what there was of its body went out
        # Whatever follows must not be a second answer (an error head, or the a-2 answer)
        # spliced into the 190 missing body bytes: the connection must end instead.
        assert b"HTTP/1.1 " not in rest, f"{server}: another answer was written into the cut body (desync)"
        assert OK_BODY not in rest, f"{server}: the next request's answer was written into the cut body"
        assert closed, f"{server}: the connection stayed open after a cut answer"
