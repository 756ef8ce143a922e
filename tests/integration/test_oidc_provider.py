"""The token validator against a real OpenID Connect provider (npm oidc-provider, Keycloak-shaped)."""

from __future__ import annotations

import time

import pytest

from proxy.identity.model import AuthError, AuthReason
from proxy.identity.tokens import TokenValidator
from proxy.metrics import REGISTRY

pytestmark = pytest.mark.integration


class ShiftedClock:
    """Real time plus an offset, to step past the unknown-kid cooldown without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def jwks_fetches() -> float:
    return REGISTRY.get_sample_value("keygate_jwks_fetches_total", {"document": "jwks", "result": "ok"}) or 0.0


@pytest.fixture
async def validators(oidc):
    made: list[TokenValidator] = []

    async def make(**kw) -> TokenValidator:
        clock = kw.pop("clock", time.time)
        v = TokenValidator(oidc.oidc_config(**kw), clock=clock)
        await v.start()
        made.append(v)
        return v

    yield make
    for v in made:
        await v.close()


async def test_password_grant_token_validates_into_the_user(oidc, validators):
    v = await validators()
    assert v.ready
    alice = await v.validate(oidc.password_token("alice"))
    assert alice.kind == "user" and alice.method == "token"
    assert alice.username == "alice" and alice.sub == oidc.user_sub("alice")
    assert alice.azp == "iot-portal"
    assert {"iot-user", "reader"} <= alice.roles and "iot-admin" not in alice.roles
    assert "iot-proxy:reader" in alice.client_roles
    assert alice.groups == {"users"}
    assert {"openid", "profile", "email"} <= alice.scopes
    assert alice.expires_at is not None and alice.expires_at > time.time()

    admin = await v.validate(oidc.password_token("admin"))
    assert admin.username == "admin" and "iot-admin" in admin.roles and "iot-user" not in admin.roles


async def test_client_credentials_token_validates_into_the_service_account(oidc, validators):
    v = await validators()
    svc = await v.validate(oidc.client_token("iot-backend"))
    assert svc.kind == "service"
    assert svc.username == "iot-backend" and svc.azp == "iot-backend"
    assert "iot-service" in svc.roles


async def test_wrong_password_gets_no_token(oidc):
    from tests.rig.oidc import OidcProviderError

    with pytest.raises(OidcProviderError, match="HTTP 400"):
        oidc.password_token("alice", password="guess")


async def test_audience_pinning_against_the_real_tokens(oidc, validators):
    v = await validators(audience="some-other-api")
    with pytest.raises(AuthError) as info:
        await v.validate(oidc.password_token("bob"))
    assert info.value.reason is AuthReason.WRONG_AUDIENCE


async def test_new_tokens_validate_after_key_rotation_through_one_jwks_refresh(oidc, validators):
    clock = ShiftedClock()
    v = await validators(clock=clock)
    before_rotation = oidc.password_token("carol")
    assert (await v.validate(before_rotation)).username == "carol"
    old_kid = oidc.signing_kid

    new_kid = oidc.restart_with_rotated_key()
    assert new_kid != old_kid
    fetched = jwks_fetches()
    clock.offset = 31.0  # past the unknown-kid cooldown of the start-up fetch
    after_rotation = oidc.password_token("carol")
    assert (await v.validate(after_rotation)).username == "carol"
    assert jwks_fetches() == fetched + 1
    assert set(v.keyset.keys) >= {old_kid, new_kid}
    # More new tokens and the old one: no further fetch.
    assert (await v.validate(oidc.password_token("alice"))).username == "alice"
    assert (await v.validate(before_rotation)).username == "carol"
    assert jwks_fetches() == fetched + 1


async def test_revoked_token_fails_when_introspection_is_on(oidc, validators):
    v = await validators(introspection=True, always=True, introspection_cache_seconds=0)
    token = oidc.password_token("bob")
    assert (await v.validate(token)).username == "bob"
    oidc.revoke(token)
    assert oidc.introspect(token) == {"active": False}
    with pytest.raises(AuthError) as info:
        await v.validate(token)
    assert info.value.reason is AuthReason.REVOKED


async def test_revoked_token_without_introspection_still_validates_until_exp(oidc, validators):
    # Why oidc.introspection.always exists: a JWT is checked locally.
    v = await validators()
    token = oidc.password_token("bob")
    oidc.revoke(token)
    assert (await v.validate(token)).username == "bob"


async def test_provider_introspects_its_jwt_access_tokens(oidc):
    answer = oidc.introspect(oidc.password_token("alice"))
    assert answer["active"] is True and answer["username"] == "alice" and answer["typ"] == "Bearer"


async def test_the_rigs_proxy_yaml_snippet_loads_and_validates(oidc):
    from proxy.config import load_config_text

    cfg = load_config_text(oidc.config_yaml(), env={})
    assert cfg.oidc.issuer == oidc.issuer and cfg.oidc.introspection.client_secret
    v = TokenValidator(cfg.oidc)
    await v.start()
    try:
        assert (await v.validate(oidc.password_token("alice"))).roles >= {"iot-user", "reader"}
    finally:
        await v.close()


@pytest.fixture(scope="module")
def rfc9068_oidc(tmp_path_factory):
    """The same provider issuing RFC 9068 access tokens: client_id in users' tokens too."""
    from tests.rig.oidc import OidcProvider
    provider = OidcProvider(tmp_path_factory.mktemp("oidc-rfc9068"), rfc9068=True)
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


async def test_rfc9068_user_tokens_with_client_id_stay_users(rfc9068_oidc):
    """Issue 15 item 3: with client_id in every access token, every user was taken for a service
    named after the client, and all users of one client shared one user name."""
    import base64
    import json
    v = TokenValidator(rfc9068_oidc.oidc_config())
    await v.start()
    try:
        tokens = {name: rfc9068_oidc.password_token(name) for name in ("alice", "bob")}
        payload = tokens["alice"].split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert claims["client_id"] == "iot-portal"  # the provider really does put it there
        idents = {name: await v.validate(tok) for name, tok in tokens.items()}
        assert {(i.kind, i.username, i.sub) for i in idents.values()} == {
            ("user", name, rfc9068_oidc.user_sub(name)) for name in ("alice", "bob")}
        svc = await v.validate(rfc9068_oidc.client_token("iot-backend"))
        assert (svc.kind, svc.username) == ("service", "iot-backend")
    finally:
        await v.close()
