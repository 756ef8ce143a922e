"""Outside review (s29), area 1: every request to an ``https://`` Orion stays with the Orion it verified.

Each client of ``http.upstream`` sends ``allow_redirects=False`` (the forwarded requests, the
subscription reads, the guard's deletions, the ownership service's calls, ``keygate check``)
but one: the gateway's withdrawal of a subscription it could not keep (``_withdraw``, after a
subscription whose device was deleted meanwhile, or that could not be recorded). aiohttp
follows a redirect by default, to any host and to ``http://``: an answer of 307 sent the
DELETE, with the caller's identity headers and tenant, to another address over a connection
nobody verified, and its status there was taken for Orion's.
"""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.http.gateway import GATEWAY_KEY
from tests.integration.lean_attacks.rig import ScriptedUpstream, gateway_pair, ok
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration

SUB_ID = "5f0c1a2b3c4d5e6f7a8b9c0d"


async def _elsewhere(method: str, target: str) -> tuple[bytes, bool]:
    return b"HTTP/1.1 204 No Content\r\n\r\n", False


async def test_a_withdrawal_is_not_redirected_off_the_verified_orion(tmp_path, oidc, caplog):
    elsewhere = ScriptedUpstream(_elsewhere)   # plain http://, unverified
    await elsewhere.start()

    async def orion(method: str, target: str) -> tuple[bytes, bool]:
        if method == "DELETE":
            return (b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:%d%s\r\nContent-Length: 0\r\n\r\n"
                    % (elsewhere.port, target.encode())), False
        return ok(), False

    try:
        async with gateway_pair(tmp_path, oidc, orion, tls=make_pki(tmp_path / "pki")) as (upstream, gateways, _t):
            handler = gateways["lean"].app[GATEWAY_KEY]
            assert handler.pool is None   # https:// Orion: the aiohttp client
            await handler._withdraw(SUB_ID, CIMultiDict({"X-Keygate-Sub": "alice", "Fiware-Service": "t"}))
            assert any(seen.startswith(b"DELETE /v2/subscriptions/" + SUB_ID.encode()) for seen in upstream.seen)
            assert not elsewhere.seen, f"the withdrawal was sent elsewhere: {elsewhere.seen!r}"
            # Orion did not take it: said so, as the docstring promises (the subscription is left in Orion).
            assert any(SUB_ID in r.getMessage() and r.levelname == "ERROR" for r in caplog.records), caplog.text
    finally:
        await elsewhere.stop()
