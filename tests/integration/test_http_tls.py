"""The gateway behind TLS: bearer tokens over HTTPS and devices proving themselves by certificate."""

from __future__ import annotations

import ssl

import aiohttp
import pytest

from proxy.http.gateway import HttpGateway
from proxy.tls import client_context
from tests.integration.http_rig import build_services, close_services, gateway_config
from tests.rig.ngsi_standin import NgsiStandin
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration


@pytest.fixture
async def tls_rig(tmp_path, oidc):
    pki = make_pki(tmp_path / "pki")
    standin = NgsiStandin()
    await standin.start()
    config = gateway_config(standin.url, tmp_path, tls={"cert": str(pki.server_cert), "key": str(pki.server_key),
                                                        "client_ca": str(pki.devices_ca)})
    services, tokens = await build_services(config, oidc)
    alice = await services.tokens.validate(tokens["alice"])
    bob = await services.tokens.validate(tokens["bob"])
    await services.ownership.register_device(alice, {"id": "a-1", "type": "Thermometer"})
    await services.ownership.register_device(bob, {"id": "b-1", "type": "Thermometer"})
    for eid in ("a-1", "b-1"):
        standin.tenant("").entities[eid] = {"id": eid, "type": "Thermometer"}
    gateway = HttpGateway(services)
    await gateway.start()
    try:
        yield pki, standin, gateway, tokens
    finally:
        await gateway.stop()
        await close_services(services)
        await standin.stop()


async def _get(pki, gateway, path, *, cert=None, headers=None) -> int:
    ctx = client_context(pki.ca, cert=cert[0] if cert else None, key=cert[1] if cert else None)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://127.0.0.1:{gateway.port}{path}", ssl=ctx, headers=headers) as r:
            return r.status


async def test_bearer_token_over_tls(tls_rig):
    pki, standin, gateway, tokens = tls_rig
    auth = {"Authorization": f"Bearer {tokens['alice']}"}
    assert await _get(pki, gateway, "/v2/entities/a-1", headers=auth) == 200
    assert standin.recorded[-1].headers["X-Forwarded-Proto"] == "https"
    assert await _get(pki, gateway, "/v2/entities/b-1", headers=auth) == 403


async def test_device_certificate_names_the_device(tls_rig):
    pki, standin, gateway, _ = tls_rig
    cert = pki.device_cert("a-1")
    assert await _get(pki, gateway, "/v2/entities/a-1", cert=cert) == 200
    assert standin.recorded[-1].headers["X-Keygate-Device"] == "a-1"
    assert await _get(pki, gateway, "/v2/entities/b-1", cert=cert) == 403


async def test_certificate_for_an_unregistered_device_is_401(tls_rig):
    pki, _, gateway, _ = tls_rig
    assert await _get(pki, gateway, "/v2/entities/a-1", cert=pki.device_cert("ghost")) == 401


async def test_certificate_from_an_untrusted_ca_fails_the_handshake(tls_rig):
    pki, standin, gateway, _ = tls_rig
    # TLS 1.3 reports the refused certificate after the client finished: a reset, not a handshake error.
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await _get(pki, gateway, "/v2/entities/a-1", cert=pki.device_cert("a-1", signed_by_rogue=True))
    assert not standin.recorded


async def test_no_certificate_and_no_token_is_anonymous(tls_rig):
    pki, standin, gateway, _ = tls_rig
    assert await _get(pki, gateway, "/v2/entities/a-1") == 401
    assert not standin.recorded
