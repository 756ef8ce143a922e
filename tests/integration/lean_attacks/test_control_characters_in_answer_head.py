"""Outside review (s29), area 2: control characters in Orion's answer head.

aiohttp's header writer refuses a control character other than tab in the status line, a
header name or a value ("Potential header injection attack"): aiohttp's server answers 500 for
such a relay. The lean server's heads (``lean_answer.plain_head``, ``head_bytes``) wrote them as
they came: llhttp (the lean client) takes ``\\x01``, ``\\x1b`` and ``\\x7f`` in a reason phrase, and
aiohttp's lenient client (``https://``) takes them in header values too. No parser in front of it
lets a CR or LF through today, so nothing splits; the lean heads now refuse what aiohttp's
writer refuses, so that a more lenient parser would not make them the one place that writes it,
and the two servers answer alike.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.lean_attacks.rig import OK_BODY, exchange, gateway_pair, ok
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration

HEADS = {
    "reason": b"HTTP/1.1 200 O\x01K\x1b\x7f\r\nContent-Type: application/json\r\n",
    "value": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Odd: a\x01\x1bb\x7f\r\n",
}


def _script(head: bytes):
    async def script(method: str, target: str) -> tuple[bytes, bool]:
        if target.startswith("/v2/entities/a-1"):
            return head + b"Content-Length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY), False
        return ok(), False
    return script


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("where", sorted(HEADS))
async def test_a_control_character_in_orions_head_is_not_written_to_the_client(tmp_path, oidc, where, tls):
    async with gateway_pair(tmp_path, oidc, _script(HEADS[where]), tls=make_pki(tmp_path / "pki") if tls else None) as (
            _u, gateways, tokens):
        answers = {}
        for server in ("lean", "aiohttp"):
            auth = f"Host: k\r\nAuthorization: Bearer {tokens['alice']}\r\n"
            port = gateways[server].port
            assert port is not None
            data, _closed = await exchange(port, f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}Connection: close\r\n\r\n"
                                           .encode(), timeout=4)
            answers[server] = re.sub(rb"\r\nDate: [^\r]*", b"", data)
            print(f"\n[{where}, tls={tls}] {server}: {data!r}")
            assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", data.partition(b"\r\n\r\n")[0]), server
        assert answers["lean"] == answers["aiohttp"]
