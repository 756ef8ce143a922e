"""Outside review (s29), area 2: Orion's answer headers with bytes past ASCII, relayed.

Orion echoes the caller's ``Fiware-Correlator`` in its answer, so a client chooses those bytes.
aiohttp's client (an ``https://`` Orion) reads a header as UTF-8 with surrogate escapes; the
lean one (``http://``) read it as Latin-1, and every relay writes UTF-8: a correlator
``caf\\xc3\\xa9`` came back ``caf\\xc3\\x83\\xc2\\xa9`` (encoded twice) on the plain path. A byte that
is not UTF-8 (``\\xff``) became a lone surrogate on the TLS path, which the lean server's head
writer could not encode: a 500 for Orion's answer, and an ERROR with a traceback in the log per
request, where aiohttp's server leaves the byte out (its writer skips surrogates) and relays.

Both clients now read the head alike, and the lean heads leave out what aiohttp's leaves out:
the four pairs of server and client give the client the same answer.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.lean_attacks.rig import OK_BODY, exchange, gateway_pair, ok
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration

VALUES = {"utf-8": b"caf\xc3\xa9", "not utf-8": b"a\xffb"}


def _script(value: bytes):
    async def script(method: str, target: str) -> tuple[bytes, bool]:
        if target.startswith("/v2/entities/a-1"):
            return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nFiware-Correlator: %s\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (value, len(OK_BODY), OK_BODY)), False
        return ok(), False
    return script


@pytest.mark.parametrize("what", sorted(VALUES))
async def test_a_non_ascii_answer_header_is_relayed_alike_on_every_path(tmp_path, oidc, what, caplog):
    value = VALUES[what]
    answers = {}
    for tls in (False, True):
        async with gateway_pair(tmp_path / str(tls), oidc, _script(value),
                                tls=make_pki(tmp_path / f"pki-{tls}") if tls else None) as (_u, gateways, tokens):
            for server in ("lean", "aiohttp"):
                auth = f"Host: k\r\nAuthorization: Bearer {tokens['alice']}\r\n"
                request = f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}Connection: close\r\n\r\n".encode()
                port = gateways[server].port
                assert port is not None
                data, _closed = await exchange(port, request, timeout=6)
                answers[(server, "https" if tls else "http")] = re.sub(rb"\r\nDate: [^\r]*", b"", data)
    for key, data in answers.items():
        print(f"\n[{what}] {key}: {data[:160]!r}")
    assert len(set(answers.values())) == 1, "the paths relay the header differently"
    data = answers[("lean", "http")]
    assert data.startswith(b"HTTP/1.1 200 "), data
    if what == "utf-8":
        assert b"\r\nFiware-Correlator: " + value + b"\r\n" in data   # as Orion sent it
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
