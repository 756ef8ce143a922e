"""The gateway behind TLS: bearer tokens over HTTPS and devices proving themselves by an enrolled certificate."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.http.gateway import HttpGateway
from proxy.identity.model import Identity
from proxy.tls import client_context
from tests.integration.http_rig import build_services, close_services, gateway_config
from tests.rig.ngsi_standin import NgsiStandin
from tests.rig.pki import Pki, enroll, make_pki

pytestmark = pytest.mark.integration


@dataclass
class TlsRig:
    pki: Pki
    standin: NgsiStandin
    gateway: HttpGateway
    services: Any
    tokens: dict[str, str]
    alice: Identity
    bob: Identity
    enrolled: tuple[Path, Path]   # a-1's enrolled certificate and key


@pytest.fixture
async def tls_rig(tmp_path, oidc):
    pki = make_pki(tmp_path / "pki")
    standin = NgsiStandin()
    await standin.start()
    config = gateway_config(standin.url, tmp_path, tls={"cert": str(pki.server_cert), "key": str(pki.server_key),
                                                        "client_ca": str(pki.devices_ca),
                                                        "client_ca_key": str(pki.devices_ca_key)})
    services, tokens = await build_services(config, oidc)
    alice = await services.tokens.validate(tokens["alice"])
    bob = await services.tokens.validate(tokens["bob"])
    await services.ownership.register_device(alice, {"id": "a-1", "type": "Thermometer"})
    await services.ownership.register_device(bob, {"id": "b-1", "type": "Thermometer"})
    for eid in ("a-1", "b-1"):
        standin.tenant("").entities[eid] = {"id": eid, "type": "Thermometer"}
    standin.recorded.clear()   # the registrations asked Orion whether the ids were free
    gateway = HttpGateway(services)
    await gateway.start()
    try:
        cert = await enroll(services.ownership, alice, "a-1", pki.dir)
        yield TlsRig(pki, standin, gateway, services, tokens, alice, bob, cert)
    finally:
        await gateway.stop()
        await close_services(services)
        await standin.stop()


async def _get(rig: TlsRig, path: str, *, cert=None, headers=None) -> int:
    ctx = client_context(rig.pki.ca, cert=cert[0] if cert else None, key=cert[1] if cert else None)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"https://127.0.0.1:{rig.gateway.port}{path}", ssl=ctx, headers=headers) as r:
            return r.status


async def test_bearer_token_over_tls(tls_rig):
    auth = {"Authorization": f"Bearer {tls_rig.tokens['alice']}"}
    assert await _get(tls_rig, "/v2/entities/a-1", headers=auth) == 200
    assert tls_rig.standin.recorded[-1].headers["X-Forwarded-Proto"] == "https"
    assert await _get(tls_rig, "/v2/entities/b-1", headers=auth) == 403


async def test_enrolled_device_certificate_names_the_device(tls_rig):
    assert await _get(tls_rig, "/v2/entities/a-1", cert=tls_rig.enrolled) == 200
    assert tls_rig.standin.recorded[-1].headers["X-Keygate-Device"] == "a-1"
    assert await _get(tls_rig, "/v2/entities/b-1", cert=tls_rig.enrolled) == 403
    allowed = [r for r in tls_rig.services.audit.records if r.get("decision") == "allow" and r.get("identity")
               and r["identity"].get("method") == "certificate"]
    assert allowed and allowed[-1]["identity"]["username"] == "a-1"


async def test_a_ca_signed_certificate_that_was_not_enrolled_is_401(tls_rig):
    assert await _get(tls_rig, "/v2/entities/a-1", cert=tls_rig.pki.device_cert("a-1")) == 401
    assert not tls_rig.standin.recorded


async def test_a_revoked_certificate_is_401_on_the_next_request(tls_rig):
    assert await _get(tls_rig, "/v2/entities/a-1", cert=tls_rig.enrolled) == 200
    await tls_rig.services.ownership.revoke_certificates(tls_rig.alice, "a-1")
    assert await _get(tls_rig, "/v2/entities/a-1", cert=tls_rig.enrolled) == 401


async def test_a_certificate_does_not_outlive_its_registration(tls_rig):
    """alice's device is deleted and bob registers its id: alice's certificate opens nothing."""
    ownership = tls_rig.services.ownership
    await ownership.delete_device(tls_rig.alice, "a-1")
    await ownership.register_device(tls_rig.bob, {"id": "a-1", "type": "Thermometer"})
    tls_rig.standin.recorded.clear()   # the deletion's and the registration's own calls to Orion
    assert await _get(tls_rig, "/v2/entities/a-1", cert=tls_rig.enrolled) == 401
    assert not tls_rig.standin.recorded


async def test_certificate_for_an_unregistered_device_is_401(tls_rig):
    assert await _get(tls_rig, "/v2/entities/a-1", cert=tls_rig.pki.device_cert("ghost")) == 401


async def test_certificate_from_an_untrusted_ca_fails_the_handshake(tls_rig):
    # TLS 1.3 reports the refused certificate after the client finished: a reset, not a handshake error.
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await _get(tls_rig, "/v2/entities/a-1", cert=tls_rig.pki.device_cert("a-1", signed_by_rogue=True))
    assert not tls_rig.standin.recorded


async def test_no_certificate_and_no_token_is_anonymous(tls_rig):
    assert await _get(tls_rig, "/v2/entities/a-1") == 401
    assert not tls_rig.standin.recorded
