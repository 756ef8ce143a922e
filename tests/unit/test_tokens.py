"""Token validation against the token factory's issuer: every attack and its reason."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
import uuid

import pytest

from proxy.config import ServiceAccountsConfig
from proxy.identity.jwks import parse_jwks
from proxy.identity.model import AuthError, AuthReason
from proxy.identity.tokens import TokenValidator, claim_path, token_digest
from proxy.metrics import REGISTRY, readiness
from tests.rig.token_factory import b64json, public_jwk


class Clock:
    """A settable wall clock shared by the validator and the factory."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(token_factory) -> Clock:
    c = Clock()
    token_factory.clock = c
    return c


@pytest.fixture
async def make_validator(token_factory, clock):
    started: list[TokenValidator] = []

    async def make(**overrides) -> TokenValidator:
        v = TokenValidator(token_factory.oidc_config(**overrides), clock=clock)
        await v.start()
        started.append(v)
        return v

    yield make
    for v in started:
        await v.close()


@pytest.fixture
async def validator(make_validator) -> TokenValidator:
    return await make_validator()


async def rejected(validator: TokenValidator, token: str) -> AuthError:
    with pytest.raises(AuthError) as info:
        await validator.validate(token)
    return info.value


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ----------------------------------------------------------------------------- identities


async def test_keycloak_user_token_becomes_the_right_identity(validator, token_factory):
    ident = await validator.validate(token_factory.valid())
    assert ident.kind == "user" and ident.method == "token"
    assert ident.username == "alice"
    assert ident.sub == "0b6e1b2e-3f0d-4c50-9f84-8c1c1e8f2a11"
    # realm_access.roles and resource_access.iot-proxy.roles (a client id with a dash)
    assert ident.roles == {"iot-user", "default-roles-test", "reader"}
    assert ident.client_roles == {"iot-proxy:reader", "account:view-profile"}
    assert ident.scopes == {"openid", "profile", "email"}
    assert ident.groups == {"users", "fleet/north"}
    assert ident.azp == "iot-portal"
    assert ident.expires_at == token_factory.claims()["exp"]


async def test_es256_token_validates(validator, token_factory):
    assert (await validator.validate(token_factory.valid(alg="ES256"))).username == "alice"


async def test_service_account_is_known_by_its_client_id(validator, token_factory):
    ident = await validator.validate(token_factory.service_token("fleet-manager"))
    assert ident.kind == "service"
    assert ident.username == "fleet-manager" and ident.azp == "fleet-manager"
    assert ident.roles == {"iot-service"}


async def test_keycloak_service_account_with_the_older_clientId_claim(validator, token_factory):
    ident = await validator.validate(token_factory.service_token("fleet-manager", client_id=None,
                                                                 clientId="fleet-manager"))
    assert ident.kind == "service" and ident.username == "fleet-manager"


async def test_a_service_account_name_without_the_client_id_claim_is_a_user(validator, token_factory):
    """Keycloak's marker is the name and the client_id claim together: a user who chose the name
    "service-account-fleet-manager" (or whose provider allows any) stays a user."""
    ident = await validator.validate(token_factory.service_token("fleet-manager", client_id=None))
    assert ident.kind == "user" and ident.username == "service-account-fleet-manager"


async def test_a_user_named_service_account_x_is_not_taken_for_the_client_they_logged_in_through(
        validator, token_factory):
    """The name must be service-account-<that token's client id>."""
    ident = await validator.validate(token_factory.valid(preferred_username="service-account-x", azp="iot-portal",
                                                         client_id="iot-portal"))
    assert ident.kind == "user" and ident.username == "service-account-x"


async def test_rfc9068_user_token_with_client_id_is_a_users(validator, token_factory):
    """RFC 9068 makes client_id a claim of every JWT access token: a user's stays a user's, with
    the user's own name, so two users of one client never share one."""
    idents = [await validator.validate(token_factory.valid(preferred_username=name, sub=f"sub-{name}",
                                                           client_id="iot-portal", azp="iot-portal"))
              for name in ("alice", "bob")]
    assert [(i.kind, i.username, i.sub) for i in idents] == [("user", "alice", "sub-alice"), ("user", "bob", "sub-bob")]
    assert all(i.azp == "iot-portal" for i in idents)


async def test_a_user_without_a_name_claim_is_known_by_sub_not_by_client(validator, token_factory):
    ident = await validator.validate(token_factory.valid(preferred_username=None, sub="sub-x", client_id="iot-portal"))
    assert ident.kind == "user" and ident.username == "sub-x"


async def test_sub_equals_client_id_rule(make_validator, token_factory):
    """Providers that say "service" by sub == client id (Okta, others): only with the setting."""
    claims = dict(sub="iot-backend", client_id="iot-backend", azp="iot-backend", preferred_username=None)
    default = await make_validator()
    assert (await default.validate(token_factory.valid(**claims))).kind == "user"
    v = await make_validator(service_accounts=ServiceAccountsConfig(sub_equals_client_id=True))
    ident = await v.validate(token_factory.valid(**claims))
    assert ident.kind == "service" and ident.username == "iot-backend"
    user = await v.validate(token_factory.valid(sub="sub-alice", client_id="iot-backend", preferred_username="alice"))
    assert user.kind == "user" and user.username == "alice"


async def test_gty_client_credentials_rule(make_validator, token_factory):
    """Auth0 marks client-credentials tokens with gty; its sub is "<client id>@clients"."""
    claims = dict(sub="iot-backend@clients", azp="iot-backend", gty="client-credentials", preferred_username=None)
    assert (await (await make_validator()).validate(token_factory.valid(**claims))).kind == "user"
    v = await make_validator(service_accounts=ServiceAccountsConfig(gty=("client-credentials",)))
    ident = await v.validate(token_factory.valid(**claims))
    assert ident.kind == "service" and ident.username == "iot-backend"
    password = await v.validate(token_factory.valid(sub="auth0|alice", azp="iot-backend", gty="password",
                                                    preferred_username="alice"))
    assert password.kind == "user" and password.username == "alice"


async def test_the_keycloak_rule_can_be_switched_off(make_validator, token_factory):
    v = await make_validator(service_accounts=ServiceAccountsConfig(keycloak=False))
    assert (await v.validate(token_factory.service_token("fleet-manager"))).kind == "user"


async def test_a_lone_surrogate_in_the_user_name_is_refused(validator, token_factory):
    with pytest.raises(AuthError) as err:
        await validator.validate(token_factory.valid(preferred_username="al\ud800ice"))
    assert err.value.reason is AuthReason.MALFORMED


async def test_username_claim_is_configurable(make_validator, token_factory):
    v = await make_validator(username_claim="email")
    assert (await v.validate(token_factory.valid(email="alice@example.org"))).username == "alice@example.org"


def test_claim_paths_split_on_dots_only():
    claims = {"resource_access": {"iot-proxy": {"roles": ["a"]}}, "realm_access": {"roles": "not-a-list"}}
    assert claim_path(claims, "resource_access.iot-proxy.roles") == ["a"]
    assert claim_path(claims, "resource_access.missing.roles") is None
    assert claim_path(claims, "realm_access.roles.deeper") is None


async def test_roles_of_the_wrong_type_are_ignored_not_trusted(validator, token_factory):
    ident = await validator.validate(token_factory.valid(realm_access={"roles": [["iot-admin"], 7, "iot-user"]}))
    assert ident.roles == {"iot-user", "reader"}


# ----------------------------------------------------------------------------- rejections


@pytest.mark.parametrize("forge, reason", [
    ("expired", AuthReason.EXPIRED),
    ("not_yet_valid", AuthReason.NOT_YET_VALID),
    ("issued_in_future", AuthReason.NOT_YET_VALID),
    ("wrong_issuer", AuthReason.WRONG_ISSUER),
    ("wrong_audience", AuthReason.WRONG_AUDIENCE),
    ("id_token", AuthReason.NOT_AN_ACCESS_TOKEN),
    ("refresh_token", AuthReason.NOT_AN_ACCESS_TOKEN),
    ("rs256_refresh_typ", AuthReason.NOT_AN_ACCESS_TOKEN),
    ("alg_none", AuthReason.ALGORITHM_NOT_ALLOWED),
    ("hs256_with_public_key", AuthReason.ALGORITHM_NOT_ALLOWED),
    ("unknown_kid", AuthReason.UNKNOWN_KID),
    ("wrong_key", AuthReason.BAD_SIGNATURE),
    ("rotated", AuthReason.UNKNOWN_KID),
    ("tampered", AuthReason.BAD_SIGNATURE),
    ("alg_key_mismatch", AuthReason.ALGORITHM_NOT_ALLOWED),
])
async def test_forged_or_wrong_tokens_are_rejected_with_their_reason(validator, token_factory, forge, reason):
    before = sample("keygate_token_validations_total", result="rejected", reason=reason.value)
    err = await rejected(validator, getattr(token_factory, forge)())
    assert err.reason is reason
    assert sample("keygate_token_validations_total", result="rejected", reason=reason.value) == before + 1


@pytest.mark.parametrize("aud", ["iot-proxy", ["iot-proxy"], ["account", "iot-proxy"]])
async def test_audience_as_string_or_list(validator, token_factory, aud):
    assert (await validator.validate(token_factory.valid(aud=aud))).username == "alice"


@pytest.mark.parametrize("aud", [None, "account", ["account"], [], 42, {"iot-proxy": 1}])
async def test_audience_missing_or_foreign_is_rejected(validator, token_factory, aud):
    assert (await rejected(validator, token_factory.valid(aud=aud))).reason is AuthReason.WRONG_AUDIENCE


async def test_without_configured_audience_aud_is_not_required(make_validator, token_factory):
    v = await make_validator(audience="")
    assert (await v.validate(token_factory.valid(aud=None))).username == "alice"


@pytest.mark.parametrize("claim, reason", [
    ("sub", AuthReason.MISSING_CLAIM), ("exp", AuthReason.MISSING_CLAIM),
    ("typ", AuthReason.NOT_AN_ACCESS_TOKEN), ("iss", AuthReason.WRONG_ISSUER),
])
async def test_missing_claims(validator, token_factory, claim, reason):
    assert (await rejected(validator, token_factory.valid(**{claim: None}))).reason is reason


@pytest.mark.parametrize("exp", ["tomorrow", True, [1]])
async def test_non_numeric_exp_is_malformed(validator, token_factory, exp):
    assert (await rejected(validator, token_factory.valid(exp=exp))).reason is AuthReason.MALFORMED


async def test_leeway_applies_to_exp_and_nbf(validator, token_factory, clock):
    now = int(clock())
    assert await validator.validate(token_factory.valid(exp=now - 10, iat=now - 300))  # leeway 30 s
    assert await validator.validate(token_factory.valid(nbf=now + 10))
    assert (await rejected(validator, token_factory.valid(exp=now - 31))).reason is AuthReason.EXPIRED
    assert (await rejected(validator, token_factory.valid(nbf=now + 31))).reason is AuthReason.NOT_YET_VALID


@pytest.mark.parametrize("token", [
    "", "abc", "a.b", "a.b.c.d", "!!.??.**", "e30.e30.", "W10.e30.AAAA",  # e30 = {}, W10 = []
    b64json({"alg": "RS256", "kid": 1}) + ".e30.AAAA",
    b64json({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"], "exp": 1}) + ".e30.AAAA",
    "x" * 20000,
])
async def test_garbage_is_malformed(validator, token):
    assert (await rejected(validator, token)).reason is AuthReason.MALFORMED


async def test_valid_signature_over_non_object_payload_is_malformed(validator, token_factory):
    import jwt as pyjwt

    token = pyjwt.api_jws.encode(b"[1,2]", token_factory.keys.rsa, algorithm="RS256", headers={"kid": "rsa-1"})
    assert (await rejected(validator, token)).reason is AuthReason.MALFORMED


async def test_keys_embedded_in_the_header_are_never_trusted(validator, token_factory):
    # jwk / jku / x5u let a token name its own key: only the issuer's JWKS counts.
    stranger = token_factory.keys.stranger
    attacker_jwk = public_jwk(stranger, "rsa-1", "RS256")
    for headers in ({"jwk": attacker_jwk}, {"jku": "http://127.0.0.1:9/evil-jwks.json"},
                    {"x5u": "http://127.0.0.1:9/evil.pem"}):
        token = token_factory.token(kid="rsa-1", key=stranger, headers=headers)
        assert (await rejected(validator, token)).reason is AuthReason.BAD_SIGNATURE
    assert token_factory.jwks_fetches == 1


async def test_algorithm_allow_list_is_honoured(make_validator, token_factory):
    v = await make_validator(algorithms=("RS256",))
    assert (await rejected(v, token_factory.valid(alg="ES256"))).reason is AuthReason.ALGORITHM_NOT_ALLOWED
    assert await v.validate(token_factory.valid(alg="RS256"))


async def test_ps256_with_an_rs256_only_key_is_refused(validator, token_factory):
    # The JWK says alg RS256: the same RSA key must not verify a PS256 signature.
    token = token_factory.token(alg="PS256", kid="rsa-1")
    assert (await rejected(validator, token)).reason is AuthReason.ALGORITHM_NOT_ALLOWED


async def test_token_without_kid_uses_the_only_fitting_key(validator, token_factory):
    assert await validator.validate(token_factory.token(alg="ES256", kid=None))  # one EC key
    # Two RSA keys published: without a kid the choice would be the attacker's.
    token_factory.rotate()
    await validator.keyset.refresh(validator._session)
    assert (await rejected(validator, token_factory.token(kid=None))).reason is AuthReason.UNKNOWN_KID


# ----------------------------------------------------------------------------- JWKS refresh


async def test_random_unknown_kids_cause_at_most_one_fetch_per_cooldown(validator, token_factory, clock):
    assert token_factory.jwks_fetches == 1  # start()

    # Signing 1,000 tokens would take seconds; the kid is looked up before any signature is checked.
    _, payload, signature = token_factory.valid().split(".")

    async def flood() -> None:
        tokens = [f"{b64json({'alg': 'RS256', 'kid': f'forged-{uuid.uuid4().hex}'})}.{payload}.{signature}"
                  for _ in range(1000)]
        results = await asyncio.gather(*(validator.validate(t) for t in tokens), return_exceptions=True)
        assert all(isinstance(r, AuthError) and r.reason is AuthReason.UNKNOWN_KID for r in results)

    await flood()                      # within the cooldown of the start-up fetch
    assert token_factory.jwks_fetches == 1
    clock.advance(31)
    await flood()                      # 1,000 concurrent unknown kids share one refresh
    assert token_factory.jwks_fetches == 2
    clock.advance(15)
    await flood()
    assert token_factory.jwks_fetches == 2
    clock.advance(16)
    await flood()
    assert token_factory.jwks_fetches == 3


async def test_rotated_key_is_picked_up_by_one_refresh(validator, token_factory, clock):
    old = token_factory.valid()
    token_factory.rotate()
    clock.advance(31)
    assert (await validator.validate(token_factory.rotated())).username == "alice"
    assert token_factory.jwks_fetches == 2
    assert await validator.validate(old)  # the old key is still published
    assert await validator.validate(token_factory.rotated(jti="another"))
    assert token_factory.jwks_fetches == 2


async def test_periodic_refresh(make_validator, token_factory):
    v = await make_validator(jwks_refresh_seconds=0.05)
    token_factory.rotate()
    for _ in range(100):
        if "rsa-rotated" in v.keyset.keys:
            break
        await asyncio.sleep(0.02)
    assert "rsa-rotated" in v.keyset.keys


async def test_last_good_key_set_is_kept_while_the_issuer_is_down(validator, token_factory, clock):
    token_factory.set_down()
    clock.advance(31)
    assert not await validator.keyset.refresh(validator._session)
    assert validator.ready
    assert (await validator.validate(token_factory.valid())).username == "alice"
    assert (await rejected(validator, token_factory.unknown_kid())).reason is AuthReason.UNKNOWN_KID


async def test_oversized_jwks_is_refused_and_the_last_good_set_kept(validator, token_factory, clock):
    token_factory.publish({"keys": [public_jwk(token_factory.keys.rotated, "rsa-rotated", "RS256")],
                           "padding": "x" * (1 << 20)})
    clock.advance(31)
    assert not await validator.keyset.refresh(validator._session)
    assert "larger than" in validator.keyset.last_error
    assert set(validator.keyset.keys) == {"rsa-1", "ec-1"}


async def test_issuer_down_at_start_then_up(make_validator, token_factory):
    token_factory.set_down()
    v = await make_validator()  # does not raise
    assert not v.ready
    ready, checks = readiness()
    assert not ready and checks["oidc"].startswith("not ready")
    assert (await rejected(v, token_factory.valid())).reason is AuthReason.ISSUER_UNREACHABLE
    token_factory.set_down(False)
    for _ in range(100):  # the background loop retries after 1 s
        if v.ready:
            break
        await asyncio.sleep(0.05)
    assert v.ready and readiness()[1]["oidc"].startswith("ok")
    assert (await v.validate(token_factory.valid())).username == "alice"


async def test_discovery_url_overrides_the_issuer_location(make_validator, token_factory):
    v = await make_validator(discovery_url=token_factory.discovery_url)
    assert v.ready and token_factory.discovery_fetches == 1


def test_jwks_parsing_keeps_only_signature_keys_for_allowed_algorithms(token_factory):
    keys = token_factory.keys
    doc = {"keys": [
        public_jwk(keys.rsa, "good-rsa", "RS256"),
        public_jwk(keys.ec, "good-ec", "ES256"),
        {**public_jwk(keys.rsa, "enc", "RS256"), "use": "enc"},
        {"kty": "oct", "kid": "hmac", "k": base64.urlsafe_b64encode(b"secret").decode(), "alg": "HS256"},
        {**public_jwk(keys.rsa, "rs512", "RS512")},               # not in the allow-list
        {"kty": "RSA", "kid": "broken", "n": "AAAA", "e": "!!"},  # malformed
        {**public_jwk(keys.rsa, "noalg", "RS256"), "alg": None},
        "not a key",
    ]}
    doc["keys"][6].pop("alg")
    parsed = parse_jwks(doc, ("RS256", "ES256"))
    assert set(parsed) == {"good-rsa", "good-ec", "noalg"}
    assert parsed["noalg"].fits("RS256") and not parsed["noalg"].fits("ES256")
    assert not parsed["good-ec"].fits("ES384")


# ----------------------------------------------------------------------------- cache


async def test_cache_hit_returns_the_same_identity(validator, token_factory):
    token = token_factory.valid()
    first = await validator.validate(token)
    before = sample("keygate_token_validations_total", result="ok", reason="cached")
    assert await validator.validate(token) is first
    assert sample("keygate_token_validations_total", result="ok", reason="cached") == before + 1


async def test_cache_never_outlives_exp(validator, token_factory, clock):
    now = int(clock())
    token = token_factory.valid(exp=now + 60)
    await validator.validate(token)
    clock.advance(61)  # past exp, within leeway: re-validated, not served from the cache
    fresh = sample("keygate_token_validations_total", result="ok", reason="")
    cached = sample("keygate_token_validations_total", result="ok", reason="cached")
    await validator.validate(token)
    assert sample("keygate_token_validations_total", result="ok", reason="") == fresh + 1
    assert sample("keygate_token_validations_total", result="ok", reason="cached") == cached
    clock.advance(30)
    assert (await rejected(validator, token)).reason is AuthReason.EXPIRED


async def test_cache_is_bounded(make_validator, token_factory):
    v = await make_validator(token_cache_size=3)
    for i in range(5):
        await v.validate(token_factory.valid(jti=f"t{i}"))
    assert len(v._cache) == 3


async def test_cached_token_dies_with_its_key(validator, token_factory, clock):
    token = token_factory.valid()
    await validator.validate(token)
    token_factory.publish({"keys": [public_jwk(token_factory.keys.ec, "ec-1", "ES256")]})  # rsa-1 withdrawn
    clock.advance(31)
    assert await validator.keyset.refresh(validator._session)
    assert validator.cached(token_digest(token)) is None   # nor known by its digest (a head seen before)
    assert (await rejected(validator, token)).reason is AuthReason.UNKNOWN_KID


# A head the HTTP gateway has seen before is known by its token's digest (TokenValidator.cached):
# the same cache, the same checks, or None and the whole validation.

async def test_a_digest_is_answered_from_the_cache_as_the_token_is(validator, token_factory):
    token = token_factory.valid()
    assert validator.cached(token_digest(token)) is None   # never validated: nothing to know it by
    first = await validator.validate(token)
    before = sample("keygate_token_validations_total", result="ok", reason="cached")
    assert validator.cached(token_digest(token)) is first
    assert sample("keygate_token_validations_total", result="ok", reason="cached") == before + 1
    assert validator.cached(token_digest(token_factory.valid(jti="other"))) is None


async def test_a_digest_is_not_answered_past_exp(validator, token_factory, clock):
    token = token_factory.valid(exp=int(clock()) + 60)
    await validator.validate(token)
    clock.advance(61)
    assert validator.cached(token_digest(token)) is None
    assert token_digest(token) not in validator._cache


async def test_a_digest_is_never_answered_when_every_request_is_introspected(make_validator, token_factory):
    v = await make_validator(introspection=True, always=True)
    token = token_factory.valid()
    token_factory.set_introspection(token)
    assert await v.validate(token)
    assert v.cached(token_digest(token)) is None   # validate() asks the introspection endpoint


# ----------------------------------------------------------------------------- introspection


async def test_opaque_token_is_introspected(make_validator, token_factory):
    v = await make_validator(introspection=True)
    ident = await v.validate(token_factory.opaque(preferred_username="bob", sub="bob-sub"))
    assert ident.method == "introspection" and ident.username == "bob" and ident.sub == "bob-sub"


async def test_opaque_token_without_introspection_is_malformed(validator, token_factory):
    assert (await rejected(validator, token_factory.opaque())).reason is AuthReason.MALFORMED


async def test_inactive_opaque_token_is_revoked(make_validator, token_factory):
    v = await make_validator(introspection=True)
    assert (await rejected(v, token_factory.opaque(active=False))).reason is AuthReason.REVOKED


async def test_introspection_answer_must_be_an_access_token_of_our_issuer(make_validator, token_factory):
    v = await make_validator(introspection=True)
    assert (await rejected(v, token_factory.opaque(typ="Refresh"))).reason is AuthReason.NOT_AN_ACCESS_TOKEN
    assert (await rejected(v, token_factory.opaque(iss="https://evil.example"))).reason is AuthReason.WRONG_ISSUER
    assert (await rejected(v, token_factory.opaque(aud="other"))).reason is AuthReason.WRONG_AUDIENCE


async def test_lightweight_jwt_without_sub_is_completed_by_introspection(make_validator, token_factory):
    v = await make_validator(introspection=True)
    token = token_factory.valid(sub=None, preferred_username=None)
    token_factory.set_introspection(token, sub="light-sub", preferred_username="light")
    ident = await v.validate(token)
    assert (ident.sub, ident.username, ident.method) == ("light-sub", "light", "introspection")
    assert ident.roles == {"iot-user", "default-roles-test", "reader"}  # signed claims kept


async def test_always_introspect_catches_revocation(make_validator, token_factory, clock):
    v = await make_validator(introspection=True, always=True)
    token = token_factory.valid()
    token_factory.set_introspection(token)
    assert await v.validate(token)
    assert await v.validate(token)
    assert token_factory.introspections == 1  # cached briefly
    token_factory.set_introspection(token, active=False)
    clock.advance(11)  # past cache_seconds
    assert (await rejected(v, token)).reason is AuthReason.REVOKED


async def test_introspection_with_a_wrong_secret_is_unreachable_not_allowed(make_validator, token_factory):
    from proxy.config import IntrospectionConfig

    v = TokenValidator(dataclasses.replace(token_factory.oidc_config(), introspection=IntrospectionConfig(
        enabled=True, client_id="iot-proxy", client_secret="wrong")))
    await v.start()
    try:
        assert (await rejected(v, token_factory.opaque())).reason is AuthReason.ISSUER_UNREACHABLE
    finally:
        await v.close()


def test_error_reasons_are_json_safe():
    assert json.dumps([r.value for r in AuthReason])


async def test_introspection_secret_from_a_file(token_factory, tmp_path):
    from proxy.config import ConfigError, IntrospectionConfig

    (tmp_path / "secret").write_text("factory-introspection-secret\n")
    intro = IntrospectionConfig(enabled=True, client_id="iot-proxy", client_secret_file="secret")
    v = TokenValidator(dataclasses.replace(token_factory.oidc_config(), introspection=intro), base_dir=tmp_path)
    await v.start()
    try:
        assert (await v.validate(token_factory.opaque())).method == "introspection"
    finally:
        await v.close()
    missing = TokenValidator(dataclasses.replace(token_factory.oidc_config(), introspection=dataclasses.replace(
        intro, client_secret_file="nope")), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"nope: cannot read secret"):
        await missing.start()
