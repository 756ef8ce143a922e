"""Outside review of the lean server (issue 18), finding 1.

An upstream answer cut short mid-body leaves the lean connection open and desynced.

On the lean server, once :meth:`LeanRequest.relay` has written the head (with Orion's
Content-Length) and part of the body, an error from the upstream (Orion closes the connection
mid-body, or stalls past upstream_timeout_seconds) propagates to GatewayHandler.handle, which
turns it into a 500 ``web.Response``. LeanConnection._answer sees ``request.answered`` and writes
nothing, and keeps the connection alive: the client still waits for the rest of the declared
body, and the next answer on the connection is read as those missing bytes. Behind a
connection-sharing front proxy, one user's answer becomes part of another's (response queue
poisoning).

Status on main c41ab5c: the lean server is fixed by 7cc3609 (LeanRequest.relay sets close_after:
the [lean] case passes). aiohttp's server, which still serves every connection the lean server
hands over (and ``server="aiohttp"``), is worse: GatewayHandler.handle returns a fresh 500 after
the StreamResponse was prepared, aiohttp writes that 500's head *inside* the cut body and keeps
the connection: the [aiohttp] case fails. Pre-existing in _relay_lean/_relay, not the lean server's.
"""

from __future__ import annotations

import pytest

from tests.integration.lean_attacks.rig import OK_BODY, exchange, gateway_pair, ok

pytestmark = pytest.mark.integration

DECLARED = 200


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    if target.startswith("/v2/entities/a-1"):
        # Orion dies after 10 of the 200 body bytes it announced.
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % DECLARED
        return head + b'{"id":"a-1', True
    return ok(), False


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_a_truncated_upstream_answer_closes_the_client_connection(tmp_path, oidc, server):
    async with gateway_pair(tmp_path, oidc, _script) as (_upstream, gateways, tokens):
        auth = f"Host: k\r\nAuthorization: Bearer {tokens['alice']}\r\n"
        first = f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}\r\n".encode()
        second = f"GET /v2/entities/a-2 HTTP/1.1\r\n{auth}\r\n".encode()
        port = gateways[server].port
        assert port is not None
        data, closed = await exchange(port, first + second, timeout=6)
        head, _, rest = data.partition(b"\r\n\r\n")
        print(f"\n[{server}] closed={closed} read {len(data)} bytes:\n{data!r}")
        assert b"Content-Length: %d" % DECLARED in head
        # The declared body is 200 bytes; only 10 came from Orion. Whatever follows must not be
        # another answer spliced into that body: the connection must end instead.
        assert OK_BODY not in rest, f"{server}: the next answer was written into the cut body (desync)"
        assert closed, f"{server}: the connection stayed open after a cut answer"


async def test_a_connection_handed_to_aiohttp_is_desynced_by_a_truncated_answer(tmp_path, oidc):
    """The default server ("lean"): a first head the lean server does not take (a dot segment)
    hands the connection to aiohttp, and the cut answer that follows desyncs it as above."""
    async with gateway_pair(tmp_path, oidc, _script) as (_upstream, gateways, tokens):
        auth = f"Host: k\r\nAuthorization: Bearer {tokens['alice']}\r\n"
        odd = f"GET /v2/./entities/a-2 HTTP/1.1\r\n{auth}\r\n".encode()
        first = f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}\r\n".encode()
        second = f"GET /v2/entities/a-2 HTTP/1.1\r\n{auth}\r\n".encode()
        lean = gateways["lean"]
        assert lean.port is not None
        data, closed = await exchange(lean.port, odd + first + second, timeout=6)
        print(f"\n[lean, handed over] closed={closed} handed_over={lean.lean_connections.handed_over}:\n{data!r}")
        assert lean.lean_connections.handed_over == 1
        _, _, cut = data.partition(b"Content-Length: %d\r\n" % DECLARED)
        assert cut, "the cut answer was not seen"
        assert b"HTTP/1.1 " not in cut.partition(b"\r\n\r\n")[2], "another answer was written into the cut body"
