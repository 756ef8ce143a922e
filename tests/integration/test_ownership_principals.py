"""Typed principals over the ownership API (issue 15, items 2 and 3).

Users, services, groups and the public are separate name spaces: a delegation names one kind,
matches only callers of that kind, and GDPR export and erasure select by the caller's own sub,
never by a user name that someone else (or a word such as "anonymous") may share.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest

from proxy.facts import PUBLIC, Principal
from proxy.identity.model import ANONYMOUS, AuthError, AuthReason, Identity
from proxy.identity.tokens import TokenValidator
from proxy.policy.subjects import Want, relation_holds
from tests.rig.ownership import _harness, open_service, ownership_config


def user(sub: str, name: str, **kw) -> Identity:
    return Identity(kind="user", sub=sub, username=name, method="token", roles=frozenset({"iot-user"}), **kw)


CALLERS = {
    "alice": user("sub-alice", "alice", groups=frozenset({"lab"})),
    "bob": user("sub-bob", "bob"),
    # Users whose names are another kind's words: they must get nothing meant for that kind.
    "anon-named": user("sub-anon", "anonymous"),
    "group-named": user("sub-grouplab", "group:lab"),
    "service-named": user("sub-iotb-user", "iot-backend"),
    "sa-named": user("sub-sa-user", "service-account-iot-backend"),
    "service": Identity(kind="service", sub="sub-sa-iot-backend", username="iot-backend", method="token",
                        azp="iot-backend"),
    "dave": user("sub-dave", "dave"),
    "dave-2": user("sub-dave-2", "dave"),       # a second user who later goes by "dave"
    "dave-renamed": user("sub-dave", "david"),  # the first dave, after renaming himself
}


class LabelTokens:
    """Opaque tokens by label (several callers share a user name here)."""

    ready = True

    def __init__(self) -> None:
        self.tokens = {label: secrets.token_urlsafe(16) for label in CALLERS}
        self.identities = {tok: CALLERS[label] for label, tok in self.tokens.items()}

    async def validate(self, token: str) -> Identity:
        try:
            return self.identities[token]
        except KeyError:
            raise AuthError(AuthReason.BAD_SIGNATURE) from None


@pytest.fixture
async def api(tmp_path):
    tokens = LabelTokens()
    async with _harness(ownership_config(tmp_path), tokens, tokens.tokens.__getitem__, signed_in=False) as h:
        yield h


async def sign_in(api, *labels: str) -> None:
    for label in labels:
        assert (await api.call("GET", "/devices", as_=label)).status == 200


async def delegate(api, device: str, to, permission: str = "read", *, as_: str = "alice"):
    r = await api.call("POST", f"/devices/{device}/delegations", as_=as_, json={"to": to, "permission": permission})
    return r.status, await r.json()


def holds(api, device: str, who: Identity, want: Want = "read") -> bool:
    return relation_holds("delegate", who, api.ownership.facts.device(device), want, api.ownership.now())


# ---------------------------------------------------------------- GDPR by sub


async def test_export_and_erasure_never_select_by_user_name(api):
    """The attack of issue 15: users named "anonymous", "group:lab" or a service's client id
    exported the delegations made to the public, the group or the service, and erased them."""
    await sign_in(api, "alice", "bob", "anon-named", "group-named", "service-named")
    await api.register("alice", "dev-a")
    for to in ("anonymous", "group:lab", {"service": "iot-backend"}, "bob"):
        assert (await delegate(api, "dev-a", to))[0] == 201
    before = [d["to"] for d in (await (await api.call("GET", "/devices/dev-a/delegations", as_="alice")).json())[
        "delegations"]]
    assert len(before) == 4
    for attacker in ("anon-named", "group-named", "service-named"):
        data = await (await api.call("GET", "/me/data", as_=attacker)).json()
        assert data["delegations_received"] == [], attacker
        erased = (await (await api.call("DELETE", "/me/data", as_=attacker)).json())["erased"]
        assert erased["delegations"] == 0, attacker
    after = [d["to"] for d in (await (await api.call("GET", "/devices/dev-a/delegations", as_="alice")).json())[
        "delegations"]]
    assert after == before
    # bob's own grant is his by sub: he sees it, and erasing him removes only it.
    data = await (await api.call("GET", "/me/data", as_="bob")).json()
    assert [d["to"] for d in data["delegations_received"]] == [{"user": "sub-bob", "username": "bob"}]
    assert (await (await api.call("DELETE", "/me/data", as_="bob")).json())["erased"]["delegations"] == 1
    assert len(api.ownership.delegations_of("dev-a")) == 3


async def test_a_user_whose_name_is_a_keyword_is_named_by_sub(api):
    await sign_in(api, "alice", "anon-named")
    await api.register("alice", "dev-a")
    status, grant = await delegate(api, "dev-a", {"user": "sub-anon"})
    assert status == 201 and grant["to"] == {"user": "sub-anon", "username": "anonymous"}
    data = await (await api.call("GET", "/me/data", as_="anon-named")).json()
    assert [d["device"] for d in data["delegations_received"]] == ["dev-a"]
    assert holds(api, "dev-a", CALLERS["anon-named"]) and not holds(api, "dev-a", ANONYMOUS)


# ---------------------------------------------------------------- each kind matches its own kind


async def test_a_delegation_to_a_service_matches_only_that_service(api):
    await sign_in(api, "alice")
    await api.register("alice", "dev-a")
    assert (await delegate(api, "dev-a", {"service": "iot-backend"}, "write"))[0] == 201
    assert holds(api, "dev-a", CALLERS["service"], "write")
    # Users named after the client, or after Keycloak's service-account user: nothing.
    assert not holds(api, "dev-a", CALLERS["service-named"], "write")
    assert not holds(api, "dev-a", CALLERS["sa-named"], "write")
    assert not holds(api, "dev-a", ANONYMOUS, "write")
    listed = [d for _, grants in api.ownership.delegated_to(CALLERS["service-named"]) for d in grants]
    assert listed == []
    assert [r["id"] for r, _ in api.ownership.delegated_to(CALLERS["service"])] == ["dev-a"]


async def test_a_delegation_to_a_user_matches_only_that_user_by_sub(api):
    await sign_in(api, "alice", "bob")
    await api.register("alice", "dev-a")
    assert (await delegate(api, "dev-a", "bob"))[0] == 201
    assert holds(api, "dev-a", CALLERS["bob"])
    # A service account, or another user, calling itself bob: nothing.
    assert not holds(api, "dev-a", Identity(kind="service", sub="sub-sa-bob", username="bob", method="token"))
    assert not holds(api, "dev-a", user("sub-other", "bob"))
    assert not holds(api, "dev-a", Identity(kind="device", sub="sub-bob", username="bob", method="device_key",
                                            device_id="bob"))


async def test_group_and_public_delegations(api):
    await sign_in(api, "alice")
    await api.register("alice", "dev-a")
    await api.register("alice", "dev-b")
    assert (await delegate(api, "dev-a", {"group": "lab"}))[0] == 201
    assert (await delegate(api, "dev-b", {"public": True}))[0] == 201
    assert holds(api, "dev-a", user("sub-x", "x", groups=frozenset({"lab"})))
    assert not holds(api, "dev-a", CALLERS["group-named"]) and not holds(api, "dev-a", ANONYMOUS)
    assert holds(api, "dev-b", ANONYMOUS) and not holds(api, "dev-b", CALLERS["anon-named"])
    grants = api.ownership.delegations_of("dev-b")
    assert [g["grantee_kind"] for g in grants] == ["public"]
    assert api.ownership.facts.device("dev-b").delegations[0].grantee == PUBLIC


# ---------------------------------------------------------------- user names resolved to subs


async def test_a_user_name_resolves_through_the_users_seen(api):
    await sign_in(api, "alice")
    await api.register("alice", "dev-a")
    status, body = await delegate(api, "dev-a", "dave")
    assert (status, body["error"]["code"]) == (404, "unknown_user")
    assert '{"user": SUB}' in body["error"]["message"]
    await sign_in(api, "dave")
    status, grant = await delegate(api, "dev-a", "dave")
    assert status == 201 and grant["to"] == {"user": "sub-dave", "username": "dave"}
    # Another user takes the name "dave" too: the grant stays with the first; the name is now ambiguous.
    await sign_in(api, "dave-2")
    assert holds(api, "dev-a", CALLERS["dave"]) and not holds(api, "dev-a", CALLERS["dave-2"])
    status, body = await delegate(api, "dev-a", "dave", "write")
    assert (status, body["error"]["code"]) == (409, "ambiguous_user")
    # The first dave renames himself: the grant is still his, shown under his new name.
    await sign_in(api, "dave-renamed")
    assert holds(api, "dev-a", CALLERS["dave-renamed"])
    listed = (await (await api.call("GET", "/devices/dev-a/delegations", as_="alice")).json())["delegations"]
    assert [d["to"] for d in listed] == [{"user": "sub-dave", "username": "david"}]
    status, grant = await delegate(api, "dev-a", "dave", "write")  # only dave-2 goes by "dave" now
    assert status == 201 and grant["to"]["user"] == "sub-dave-2"


async def test_a_sub_not_seen_yet_is_accepted_and_named_once_seen(api):
    await sign_in(api, "alice")
    await api.register("alice", "dev-a")
    status, grant = await delegate(api, "dev-a", {"user": "sub-bob"})
    assert status == 201 and grant["to"] == {"user": "sub-bob", "username": None}
    await sign_in(api, "bob")
    listed = (await (await api.call("GET", "/devices/dev-a/delegations", as_="alice")).json())["delegations"]
    assert [d["to"] for d in listed] == [{"user": "sub-bob", "username": "bob"}]


async def test_the_owner_cannot_delegate_to_themselves_by_sub(api):
    await sign_in(api, "alice")
    await api.register("alice", "dev-a")
    status, body = await delegate(api, "dev-a", {"user": "sub-alice"})
    assert (status, body["error"]["code"]) == (400, "invalid_field")


async def test_users_seen_only_through_a_token_can_be_named(tmp_path, token_factory):
    """A user who only ever used MQTT or NGSI (never the API) is learned from the token validator."""
    service = await open_service(ownership_config(tmp_path), signed_in=False)
    tokens = TokenValidator(token_factory.oidc_config())
    await tokens.start()
    try:
        tokens.observers.append(service.saw_identity)
        await tokens.validate(token_factory.valid(preferred_username="erin", sub="sub-erin"))
        await asyncio.gather(*service._remembering)
        assert service.resolve_grantee("erin") == Principal.user("sub-erin", "erin")
        # Service accounts are not users: their client id never resolves as a user name.
        await tokens.validate(token_factory.service_token("fleet"))
        await asyncio.gather(*service._remembering)
        with pytest.raises(Exception) as err:
            service.resolve_grantee("fleet")
        assert getattr(err.value, "code", "") == "unknown_user"
    finally:
        await tokens.close()
        await service.close()
