"""``http.upstream_ca``: an ``https://`` Orion whose certificate a private CA signed.

The NGSI stand-in behind TLS with a certificate of a throwaway CA (tests/rig/pki.py), the
gateway with the ownership API in front of it, the real OIDC provider and store. With the
setting naming that CA, the gateway, the ownership service's Orion client (asked at
registration) and ``keygate check``'s probe all reach Orion. Without it (the system's store),
or naming a CA that did not sign Orion's certificate, each refuses the handshake: the caller
gets the gateway's 502 (registration its 503), and Orion never sees a request: a gateway
that forwarded to an unverified Orion would hand tokens' owners' data to whoever answers there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ownership.api import create_api_app
from proxy.check import check_orion
from proxy.http.gateway import GATEWAY_KEY, HttpGateway
from tests.integration.http_rig import HttpRig, build_services, close_services, gateway_config
from tests.rig.ngsi_standin import NgsiStandin
from tests.rig.pki import Pki, make_pki

pytestmark = pytest.mark.integration


def serving(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
async def tls_orion(tmp_path) -> AsyncIterator[tuple[NgsiStandin, Pki]]:
    pki = make_pki(tmp_path / "orion-pki")
    standin = NgsiStandin(ssl_context=serving(pki.server_cert, pki.server_key))   # for 127.0.0.1, signed by pki.ca
    await standin.start()
    try:
        yield standin, pki
    finally:
        await standin.stop()


@contextlib.asynccontextmanager
async def gateway_before(standin: NgsiStandin, tmp: Path, oidc: Any, **http: Any) -> AsyncIterator[HttpRig]:
    """The gateway and the ownership API on one listener before ``standin``; the configuration is
    loaded (and checked) as ``serve`` loads it."""
    services, tokens = await build_services(gateway_config(standin.url, tmp, **http), oidc)
    gateway = HttpGateway(services, create_api_app(services))
    session = aiohttp.ClientSession()
    try:
        await gateway.start()
        yield HttpRig(standin, gateway, services, tokens, session)
    finally:
        await session.close()
        await gateway.stop()
        await close_services(services)


async def test_with_the_orion_ca_set_registration_reads_and_the_check_reach_orion(tls_orion, tmp_path, oidc):
    standin, pki = tls_orion
    async with gateway_before(standin, tmp_path, oidc, upstream_ca=str(pki.ca)) as rig:
        assert rig.gateway.app[GATEWAY_KEY].pool is None   # https://: the aiohttp client, not the lean one
        # Registration asks Orion (over TLS) whether the id is taken there.
        r = await rig.call("POST", "/api/v1/devices", "alice", json_body={"id": "ca-1", "type": "Thermometer"})
        assert r.status == 201, r.body
        assert rig.upstream_saw("GET", "/v2/entities/ca-1"), "registration did not ask Orion"
        rig.seed("ca-1", temperature=19.5)
        r = await rig.call("GET", "/v2/entities/ca-1", "alice")
        assert r.status == 200, r.body
        assert r.json()["temperature"]["value"] == 19.5
        result = await check_orion(rig.services.config)
        assert result is not None and result.status == "ok", result


@pytest.mark.parametrize("trust", ["the system store", "a CA that did not sign it"])
async def test_an_orion_certificate_that_does_not_verify_gets_no_request(tls_orion, tmp_path, oidc, trust):
    standin, _ = tls_orion
    http = {} if trust == "the system store" else {"upstream_ca": str(make_pki(tmp_path / "other-pki").ca)}
    async with gateway_before(standin, tmp_path, oidc, **http) as rig:
        r = await rig.call("GET", "/v2/entities/ops-1", "admin")   # authorized: admins read any entity
        assert r.status == 502, r.body
        assert r.json() == {"error": "BadGateway", "description": "the context broker is unreachable"}
        [record] = [e for e in rig.audit.records if e["resource"] == "/v2/entities/ops-1"]
        assert record["decision"] == "allow" and "Certificate" in record["reason"], record
        # The ownership service's Orion client refuses it too: registration cannot ask, so it refuses.
        r = await rig.call("POST", "/api/v1/devices", "alice", json_body={"id": "ca-2", "type": "Thermometer"})
        assert r.status == 503 and r.json()["error"]["code"] == "orion_unreachable", r.body
        assert rig.services.ownership.get_device("ca-2") is None
        result = await check_orion(rig.services.config)
        assert result is not None and result.status == "fail" and "does not verify" in result.detail, \
            result
        assert standin.recorded == [], "Orion was sent a request over a connection it did not prove"


async def test_a_certificate_of_the_same_ca_for_another_host_gets_no_request(tmp_path, oidc):
    """Another service of the same private CA (its certificate for its own name) answering at
    Orion's address, e.g. after a DNS or routing change, is not Orion: the host name is checked."""
    pki = make_pki(tmp_path / "orion-pki")
    standin = NgsiStandin(ssl_context=serving(*pki.server_cert_for("metrics.internal")))
    await standin.start()
    try:
        async with gateway_before(standin, tmp_path, oidc, upstream_ca=str(pki.ca)) as rig:
            r = await rig.call("GET", "/v2/entities/ops-1", "admin")
            assert r.status == 502, r.body
            result = await check_orion(rig.services.config)
            assert result is not None and result.status == "fail" and "mismatch" in result.detail.lower(), result
            assert standin.recorded == [], "Orion's address answered with another host's certificate and was asked"
    finally:
        await standin.stop()


class _Silent:
    """An address that accepts TCP connections and never says a word: a TLS handshake with it
    never completes (Orion hanging at connect)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.accepted = 0

    async def start(self) -> None:
        def accept(_reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"https://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


async def test_an_https_orion_that_hangs_at_connect_is_a_timeout_not_a_busy_pool(tmp_path, oidc):
    """The pool wait and a slow connect raise the same error in aiohttp's client; only the wait
    is the 503 of a busy pool (proxy.http.pool_wait). A connect that hangs with every connection
    free is Orion not answering: 504, as on the lean pool."""
    silent = _Silent()
    await silent.start()
    try:
        async with gateway_before(silent, tmp_path, oidc, upstream_ca=str(make_pki(tmp_path / "pki").ca),
                                  upstream_timeout_seconds=0.5) as rig:
            r = await rig.call("GET", "/v2/entities/ops-1", "admin")
            assert r.status == 504, r.body
            assert r.json()["error"] == "GatewayTimeout"
            assert silent.accepted >= 1   # it did connect: the handshake is what hung
    finally:
        assert silent.server is not None
        silent.server.close()
