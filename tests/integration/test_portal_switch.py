"""``portal.enabled``: one setting turns the portal off; its path then goes to Orion like any other."""

from __future__ import annotations

import dataclasses
import secrets

import aiohttp
import pytest

from proxy.app import Listeners
from proxy.audit import MemoryAudit
from proxy.config import Config, HttpConfig, OidcConfig, OwnershipConfig, PoliciesConfig, PortalConfig, StoreConfig
from tests.rig.gateway import POLICY_DIR, build_services
from tests.rig.ngsi_standin import NgsiStandin

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("enabled", [True, False])
async def test_portal_on_and_off(tmp_path, enabled):
    orion = NgsiStandin()
    await orion.start()
    config = Config(oidc=OidcConfig(issuer="https://issuer.invalid/realms/iot"),
                    http=HttpConfig(listen="127.0.0.1:0", upstream=orion.url, tls=False),
                    store=StoreConfig(path=str(tmp_path / "ownership.db"), key=secrets.token_hex(32)),
                    ownership=OwnershipConfig(orion_lifecycle=False),
                    policies=PoliciesConfig(dir=str(POLICY_DIR), watch=False),
                    portal=dataclasses.replace(PortalConfig(), enabled=enabled), base_dir=str(tmp_path))
    services = await build_services(config, MemoryAudit(), real_tokens=False)
    listeners = Listeners(services)
    try:
        await listeners.start()
        assert listeners.http is not None
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{listeners.http.port}/portal/", allow_redirects=False) as answer:
            body = await answer.text()
            if enabled:
                assert answer.status == 200 and answer.content_type == "text/html"
                assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
                assert "Sign in" in body
            else:   # the NGSI gateway's answer (no token: refused before Orion), not a page
                assert answer.content_type == "application/json" and "Sign in" not in body
                assert "Content-Security-Policy" not in answer.headers
    finally:
        await listeners.stop()
        await services.ownership.close()
        await services.tokens.close()
        await orion.stop()
