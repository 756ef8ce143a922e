"""The ownership REST API over real HTTP: every endpoint, every refusal, every view
(owner, other user, admin, delegate)."""

from __future__ import annotations

import json
import time

import pytest

from proxy.facts import Principal
from proxy.identity.model import AuthError
from tests.rig.ownership import set_quota_override

pytestmark = pytest.mark.integration


async def error_of(r) -> tuple[int, str]:
    body = await r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return r.status, body["error"]["code"]


# ---------------------------------------------------------------- register


async def test_register_returns_keys_addresses_and_location(ownership_api):
    r = await ownership_api.call("POST", "/devices", as_="alice", json={
        "id": "urn:ngsi-ld:Thermo:1", "type": "Thermometer", "name": "Kitchen", "model": "T-1000",
        "location": {"lat": 43.77, "lon": 11.25, "label": "Florence lab"}, "public": False})
    assert r.status == 201
    body = await r.json()
    assert r.headers["Location"] == "/api/v1/devices/urn:ngsi-ld:Thermo:1"
    assert r.headers["Cache-Control"] == "no-store"
    assert body["mqtt"] == "mqtts://gw.test:8883" and body["http"] == "https://gw.test:8443"
    assert body["k1"] != body["k2"] and len(body["k1"]) >= 43 and len(body["k2"]) >= 43
    assert body["owner"] == {"sub": await ownership_api.sub("alice"), "username": "alice"}
    assert body["location"]["label"] == "Florence lab"
    # Both keys work at once for the device, and identify its owner.
    for key in (body["k1"], body["k2"]):
        ident = await ownership_api.ownership.authenticate_device_key("urn:ngsi-ld:Thermo:1", key)
        assert ident.kind == "device" and ident.owner_username == "alice"
    # The keys are shown once: GET never returns them.
    got = await (await ownership_api.call("GET", "/devices/urn:ngsi-ld:Thermo:1", as_="alice")).json()
    assert "k1" not in got and "k2" not in got


async def test_register_audited_without_keys(ownership_api):
    body = await ownership_api.register("alice", "dev-a")
    records = [r for r in ownership_api.audit.records if r["action"] == "device.register"]
    assert records and records[-1]["resource"] == "dev-a" and records[-1]["identity"]["username"] == "alice"
    dumped = json.dumps(ownership_api.audit.records)
    assert body["k1"] not in dumped and body["k2"] not in dumped


async def test_register_taken_id_is_409_even_for_another_user(ownership_api):
    await ownership_api.register("alice", "dev-a")
    r = await ownership_api.call("POST", "/devices", as_="bob", json={"id": "dev-a", "type": "Sensor"})
    assert await error_of(r) == (409, "conflict")


@pytest.mark.parametrize("bad_id", ["", "a b", "a/b", "a#b", "a?b", "a&b", "a<b", 'a"b', "a'b", "a=b", "a;b",
                                    "a(b", "a)b", "tab\there", "é", "x" * 257, 42, None])
async def test_register_refuses_ids_orion_would_refuse(ownership_api, bad_id):
    r = await ownership_api.call("POST", "/devices", as_="alice", json={"id": bad_id, "type": "Sensor"})
    assert await error_of(r) == (400, "invalid_field")


async def test_location_in_words_or_coordinates(ownership_api):
    body = await ownership_api.register("alice", "dev-words", location="hall")
    assert body["location"] == "hall"
    r = await ownership_api.call("PATCH", "/devices/dev-words", as_="alice", json={"location": {"lat": 1, "lon": 2}})
    assert (await r.json())["location"] == {"lat": 1, "lon": 2}
    assert (await ownership_api.ownership.load_device("dev-words"))["location"] == {"lat": 1, "lon": 2}


async def test_sql_in_fields_is_data(ownership_api):
    name = "Robert'); DROP TABLE devices;--"
    await ownership_api.register("alice", "dev-sql", name=name, model="' OR '1'='1")
    stored = await ownership_api.ownership.load_device("dev-sql")
    assert stored["name"] == name and stored["model"] == "' OR '1'='1"
    r = await ownership_api.call("GET", "/devices/dev-sql' OR '1'='1", as_="bob")
    assert await error_of(r) == (404, "not_found")
    assert len((await (await ownership_api.call("GET", "/devices", as_="alice")).json())["devices"]) == 1


async def test_register_accepts_an_id_of_256_characters_and_orion_punctuation(ownership_api):
    await ownership_api.register("alice", "x" * 256)
    await ownership_api.register("alice", "urn:a.b-c_d@e{f}[g]|~!$*+,^`")


@pytest.mark.parametrize("device_id", ["\\d+", "a\\", "a%2e", ".", ".."])
async def test_register_refuses_an_id_the_ngsi_gateway_refuses(ownership_api, device_id):
    """Issue 15 (attack15): these registered (201) but their entity was refused by the NGSI side (403)."""
    r = await ownership_api.call("POST", "/devices", as_="alice", json={"id": device_id, "type": "Sensor"})
    assert await error_of(r) == (400, "invalid_field")


@pytest.mark.parametrize("body, code", [
    ({"id": "d", "type": "Sensor", "colour": "red"}, "unknown_field"),
    ({"id": "d"}, "missing_field"),
    ({"type": "Sensor"}, "missing_field"),
    ({"id": "d", "type": "Sensor", "name": "n" * 257}, "invalid_field"),
    ({"id": "d", "type": "Sensor", "name": "bell\x07"}, "invalid_field"),
    ({"id": "d", "type": "Sensor", "model": 7}, "invalid_field"),
    ({"id": "d", "type": "Sensor", "public": "yes"}, "invalid_field"),
    ({"id": "d", "type": "Sensor", "location": {"lat": 91, "lon": 0}}, "invalid_field"),
    ({"id": "d", "type": "Sensor", "location": {"lat": 1}}, "invalid_field"),
    ({"id": "d", "type": "Sensor", "location": {"lat": 1, "lon": 1, "x": 1}}, "invalid_field"),
    ({"id": "d", "type": "Sensor", "location": [1, 2]}, "invalid_field"),
    ({"id": "d", "type": "Sensor", "location": "x" * 257}, "invalid_field"),
    ({"id": "d", "type": "Sensor", "location": "line\nbreak"}, "invalid_field"),
    ({"id": "d", "type": "Sensor", "service": "no spaces"}, "invalid_field"),
    ({"id": "d", "type": "Sensor", "service": "tenant\n"}, "invalid_field"),
    ({"id": "d", "type": "a/b"}, "invalid_field"),
])
async def test_register_validation(ownership_api, body, code):
    r = await ownership_api.call("POST", "/devices", as_="alice", json=body)
    assert await error_of(r) == (400, code)
    assert ownership_api.ownership.get_device("d") is None


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"id": NaN}', b"[" * 10000])
async def test_malformed_json_is_400(ownership_api, raw):
    r = await ownership_api.call("POST", "/devices", as_="alice", data=raw,
                                 headers={"Content-Type": "application/json"})
    assert await error_of(r) == (400, "invalid_json")


async def test_wrong_content_type_is_415(ownership_api):
    r = await ownership_api.call("POST", "/devices", as_="alice", data=b"id=d&type=S",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert await error_of(r) == (415, "unsupported_media_type")


async def test_body_over_the_limit_is_413(ownership_api):
    big = json.dumps({"id": "d", "type": "S", "name": "x" * 20000}).encode()
    r = await ownership_api.call("POST", "/devices", as_="alice", data=big,
                                 headers={"Content-Type": "application/json"})
    assert await error_of(r) == (413, "body_too_large")

    async def chunks():  # no Content-Length: the limit holds for a streamed body too
        for _ in range(40):
            yield b" " * 1024
    r = await ownership_api.call("POST", "/devices", as_="alice", data=chunks(),
                                 headers={"Content-Type": "application/json"})
    assert await error_of(r) == (413, "body_too_large")


async def test_a_body_sent_in_small_chunks_is_read_whole(ownership_api):
    body = json.dumps({"id": "chunked", "type": "Sensor", "name": "n" * 200}).encode()

    async def trickle():
        for i in range(0, len(body), 7):
            yield body[i:i + 7]
    r = await ownership_api.call("POST", "/devices", as_="alice", data=trickle(),
                                 headers={"Content-Type": "application/json"})
    assert r.status == 201, await r.text()


async def test_quota_per_user_and_role_override(ownership_api):
    for i in range(5):
        await ownership_api.register("alice", f"q-{i}")
    r = await ownership_api.call("POST", "/devices", as_="alice", json={"id": "q-5", "type": "S"})
    assert await error_of(r) == (403, "quota_exceeded")
    assert ownership_api.ownership.get_device("q-5") is None
    assert any(rec["action"] == "device.register" and rec["decision"] == "deny"
               for rec in ownership_api.audit.records)
    # The admin role's override (50) is higher than the default (5).
    for i in range(6):
        await ownership_api.register("admin", f"qa-{i}")
    # Deleting one frees a slot.
    assert (await ownership_api.call("DELETE", "/devices/q-0", as_="alice")).status == 204
    await ownership_api.register("alice", "q-5")


async def test_per_user_quota_override_in_store(ownership_api):
    await set_quota_override(ownership_api.ownership, await ownership_api.sub("carol"), 1)
    await ownership_api.register("carol", "c-1")
    r = await ownership_api.call("POST", "/devices", as_="carol", json={"id": "c-2", "type": "S"})
    assert await error_of(r) == (403, "quota_exceeded")


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic YWxpY2U6cHc=", "Bearer not-a-token"])
async def test_every_route_needs_a_valid_token(ownership_api, header):
    await ownership_api.register("alice", "dev-a")
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("GET", "/devices"), ("POST", "/devices"), ("GET", "/devices/dev-a"),
                         ("PATCH", "/devices/dev-a"), ("DELETE", "/devices/dev-a"),
                         ("POST", "/devices/dev-a/keys/k1"), ("GET", "/devices/dev-a/delegations"),
                         ("POST", "/devices/dev-a/delegations"), ("DELETE", "/devices/dev-a/delegations/x"),
                         ("GET", "/me/data"), ("DELETE", "/me/data")):
        r = await ownership_api.call(method, path, headers=headers, json={})
        status, code = await error_of(r)
        assert status == 401 and code in ("unauthorized", "invalid_token"), (method, path)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert ownership_api.ownership.get_device("dev-a") is not None


async def test_issuer_unreachable_is_503(tmp_path, oidc):
    """A real validator whose issuer is down: a valid-looking token cannot be checked."""
    import dataclasses

    from proxy.identity.tokens import TokenValidator
    from tests.rig.ownership import _harness, rig_config
    from tests.rig.ports import free_port
    config = rig_config(tmp_path, oidc)
    dead = dataclasses.replace(config.oidc, issuer=f"http://127.0.0.1:{free_port()}/realms/iot",
                               http_timeout_seconds=1.0)
    tokens = TokenValidator(dead)
    await tokens.start()
    try:
        async with _harness(config, tokens, lambda name: oidc.password_token(name)) as api:
            r = await api.call("GET", "/devices", as_="alice")
            assert await error_of(r) == (503, "issuer_unreachable")
            assert r.headers["Retry-After"] == "5"
    finally:
        await tokens.close()


async def test_device_identities_cannot_use_the_api(ownership_api_table):
    from proxy.identity.model import Identity
    tokens = ownership_api_table.services.tokens
    tokens.tokens["device-token"] = Identity(kind="device", sub="device:x", username="x", method="device_key")
    r = await ownership_api_table.client.get("/api/v1/devices", headers={"Authorization": "Bearer device-token"})
    assert await error_of(r) == (403, "forbidden")


async def test_a_service_account_may_register_devices(ownership_api, oidc):
    token = oidc.client_token("iot-backend")
    r = await ownership_api.client.post("/api/v1/devices", json={"id": "svc-dev", "type": "S"},
                                        headers={"Authorization": f"Bearer {token}"})
    assert r.status == 201
    assert (await r.json())["owner"]["username"] == (await ownership_api.services.tokens.validate(token)).username


async def test_a_forged_token_is_refused(ownership_api, oidc):
    """alice promotes herself to admin by editing her token's claims: the signature no longer matches."""
    import base64
    header, payload, signature = oidc.password_token("alice").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["realm_access"] = {"roles": ["iot-admin"]}
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    for token in (f"{header}.{forged_payload}.{signature}", f"{header}.{payload}.{signature[:-4]}AAAA"):
        r = await ownership_api.client.get("/api/v1/devices?include=all",
                                           headers={"Authorization": f"Bearer {token}"})
        assert await error_of(r) == (401, "invalid_token")


async def test_openapi_needs_no_token(ownership_api):
    r = await ownership_api.call("GET", "/openapi.json")
    assert r.status == 200 and (await r.json())["openapi"].startswith("3.")


# ---------------------------------------------------------------- views


async def test_owner_other_user_and_admin_views(ownership_api):
    await ownership_api.register("alice", "dev-a", name="Alice's")
    # Owner: sees and manages it.
    r = await ownership_api.call("GET", "/devices/dev-a", as_="alice")
    assert r.status == 200 and (await r.json())["name"] == "Alice's"
    # Another user: 404 on every route, exactly as for a device that does not exist.
    for method, path, body in (("GET", "/devices/dev-a", None), ("PATCH", "/devices/dev-a", {"name": "x"}),
                               ("DELETE", "/devices/dev-a", None), ("POST", "/devices/dev-a/keys/k1", None),
                               ("GET", "/devices/dev-a/delegations", None),
                               ("POST", "/devices/dev-a/delegations", {"to": "bob", "permission": "read"}),
                               ("DELETE", "/devices/dev-a/delegations/abc", None)):
        r = await ownership_api.call(method, path, as_="bob", json=body)
        missing = await ownership_api.call(method, path.replace("dev-a", "no-such"), as_="bob", json=body)
        assert await error_of(r) == (404, "not_found") == await error_of(missing), (method, path)
        assert (await r.json()) == (await missing.json())
    assert (await (await ownership_api.call("GET", "/devices", as_="bob")).json())["devices"] == []
    # Admin: reads, changes and lists every device.
    r = await ownership_api.call("GET", "/devices/dev-a", as_="admin")
    assert r.status == 200 and (await r.json())["owner"]["username"] == "alice"
    r = await ownership_api.call("PATCH", "/devices/dev-a", as_="admin", json={"name": "by admin"})
    assert r.status == 200 and (await r.json())["name"] == "by admin"
    listed = await (await ownership_api.call("GET", "/devices?include=all", as_="admin")).json()
    assert [d["id"] for d in listed["devices"]] == ["dev-a"] and listed["devices"][0]["relation"] == "admin"
    r = await ownership_api.call("GET", "/devices?include=all", as_="alice")
    assert await error_of(r) == (403, "forbidden")
    assert (await ownership_api.call("DELETE", "/devices/dev-a", as_="admin")).status == 204
    assert ownership_api.ownership.facts.device("dev-a") is None


async def test_list_own_and_delegated(ownership_api):
    await ownership_api.register("alice", "a-1")
    await ownership_api.register("alice", "a-2")
    await ownership_api.register("bob", "b-1")
    r = await ownership_api.call("POST", "/devices/b-1/delegations", as_="bob", json={"to": "alice",
                                                                                        "permission": "read"})
    assert r.status == 201
    own = await (await ownership_api.call("GET", "/devices", as_="alice")).json()
    assert [(d["id"], d["relation"]) for d in own["devices"]] == [("a-1", "owner"), ("a-2", "owner")]
    both = await (await ownership_api.call("GET", "/devices?include=delegated", as_="alice")).json()
    assert [(d["id"], d["relation"]) for d in both["devices"]] == [
        ("a-1", "owner"), ("a-2", "owner"), ("b-1", "delegate")]
    assert both["devices"][2]["permissions"] == ["read"]
    # The delegate sees it in the list only; it cannot manage it.
    assert (await ownership_api.call("GET", "/devices/b-1", as_="alice")).status == 404
    for query in ("?include=everything", "?page=2"):
        r = await ownership_api.call("GET", f"/devices{query}", as_="alice")
        assert (await error_of(r))[0] == 400


async def test_group_delegation_reaches_group_members(ownership_api):
    await ownership_api.register("carol", "c-1")
    r = await ownership_api.call("POST", "/devices/c-1/delegations", as_="carol",
                                 json={"to": "group:users", "permission": "readwrite"})
    assert r.status == 201
    for user in ("alice", "bob"):
        listed = await (await ownership_api.call("GET", "/devices?include=delegated", as_=user)).json()
        assert [d["id"] for d in listed["devices"]] == ["c-1"]
    facts = ownership_api.ownership.facts
    alice = await ownership_api.sub("alice")
    assert facts.readable_devices("alice", alice, ["users"]) == {"c-1"}
    assert facts.readable_devices("alice", alice, []) == set()


# ---------------------------------------------------------------- patch / delete


async def test_patch_changes_fields_and_facts_at_once(ownership_api):
    await ownership_api.register("alice", "dev-a", name="old", location={"lat": 1, "lon": 2})
    gen = ownership_api.ownership.facts.generation
    seen = []
    ownership_api.ownership.facts.subscribe(seen.append)
    r = await ownership_api.call("PATCH", "/devices/dev-a", as_="alice",
                                 json={"name": "new", "public": True, "location": None, "model": "M2"})
    body = await r.json()
    assert r.status == 200 and body["name"] == "new" and body["public"] is True and body["location"] is None
    assert ownership_api.ownership.facts.device("dev-a").public is True
    assert ownership_api.ownership.facts.generation > gen and seen == [{"dev-a"}]
    stored = await ownership_api.ownership.load_device("dev-a")
    assert stored["name"] == "new" and stored["model"] == "M2" and stored["public"] is True


@pytest.mark.parametrize("body, status, code", [
    ({"id": "other"}, 400, "unknown_field"),
    ({"owner": "bob"}, 400, "unknown_field"),
    ({"type": None}, 400, "invalid_field"),
    ({"public": 1}, 400, "invalid_field"),
    ([], 400, "invalid_json"),
])
async def test_patch_refusals(ownership_api, body, status, code):
    await ownership_api.register("alice", "dev-a")
    r = await ownership_api.call("PATCH", "/devices/dev-a", as_="alice", json=body)
    assert await error_of(r) == (status, code)


async def test_patch_accepts_merge_patch_and_refuses_text(ownership_api):
    await ownership_api.register("alice", "dev-a")
    r = await ownership_api.call("PATCH", "/devices/dev-a", as_="alice", data=b'{"name": "m"}',
                                 headers={"Content-Type": "application/merge-patch+json"})
    assert r.status == 200
    r = await ownership_api.call("PATCH", "/devices/dev-a", as_="alice", data=b'{"name": "m"}',
                                 headers={"Content-Type": "text/plain"})
    assert await error_of(r) == (415, "unsupported_media_type")


async def test_delete_removes_device_keys_and_delegations(ownership_api):
    body = await ownership_api.register("alice", "dev-a")
    await ownership_api.call("POST", "/devices/dev-a/delegations", as_="alice", json={"to": "bob",
                                                                                        "permission": "read"})
    assert (await ownership_api.call("DELETE", "/devices/dev-a", as_="alice")).status == 204
    assert (await ownership_api.call("GET", "/devices/dev-a", as_="alice")).status == 404
    assert (await ownership_api.call("DELETE", "/devices/dev-a", as_="alice")).status == 404
    with pytest.raises(AuthError):
        await ownership_api.ownership.authenticate_device_key("dev-a", body["k1"])
    assert ownership_api.ownership.facts.readable_devices("bob", await ownership_api.sub("bob")) == set()
    assert await ownership_api.ownership.load_device("dev-a") is None


# ---------------------------------------------------------------- keys


async def test_rotated_k1_stops_working_while_k2_keeps_working(ownership_api):
    body = await ownership_api.register("alice", "dev-a")
    r = await ownership_api.call("POST", "/devices/dev-a/keys/k1", as_="alice")
    assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
    rotated = await r.json()
    assert rotated["slot"] == "k1" and rotated["device"] == "dev-a"
    new_k1 = rotated["key"]
    assert new_k1 not in (body["k1"], body["k2"])
    service = ownership_api.ownership
    with pytest.raises(AuthError) as err:
        await service.authenticate_device_key("dev-a", body["k1"])
    assert err.value.reason.value == "unknown_device_or_key"
    assert (await service.authenticate_device_key("dev-a", body["k2"])).device_id == "dev-a"
    assert (await service.authenticate_device_key("dev-a", new_k1)).device_id == "dev-a"
    assert new_k1 not in json.dumps(ownership_api.audit.records)
    r = await ownership_api.call("POST", "/devices/dev-a/keys/k3", as_="alice")
    assert await error_of(r) == (404, "not_found")
    r = await ownership_api.call("POST", "/devices/dev-a/keys/k2", as_="admin")
    assert r.status == 200
    with pytest.raises(AuthError):
        await service.authenticate_device_key("dev-a", body["k2"])


# ---------------------------------------------------------------- delegations


async def test_delegation_create_list_revoke(ownership_api):
    await ownership_api.register("alice", "dev-a")
    facts = ownership_api.ownership.facts
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    r = await ownership_api.call("POST", "/devices/dev-a/delegations", as_="alice",
                                 json={"to": "bob", "permission": "read", "expires_at": later})
    assert r.status == 201
    grant = await r.json()
    assert r.headers["Location"] == f"/api/v1/devices/dev-a/delegations/{grant['id']}"
    bob = await ownership_api.sub("bob")
    # Stored, and shown, as the user bob is: his sub (with his name for display).
    assert grant["to"] == {"user": bob, "username": "bob"}
    assert grant["active"] is True and grant["expires_at"] == later
    assert grant["granted_by"] == "alice"
    assert "dev-a" in facts.readable_devices("bob", bob)
    assert [d.grantee for d in facts.device("dev-a").delegations] == [Principal.user(bob, "bob")]
    r = await ownership_api.call("POST", "/devices/dev-a/delegations", as_="alice",
                                 json={"to": "anonymous", "permission": "write"})
    assert r.status == 201
    listed = await (await ownership_api.call("GET", "/devices/dev-a/delegations", as_="alice")).json()
    assert [d["to"] for d in listed["delegations"]] == [{"user": bob, "username": "bob"}, {"public": True}]
    assert (await ownership_api.call("GET", "/devices/dev-a/delegations", as_="admin")).status == 200
    r = await ownership_api.call("DELETE", f"/devices/dev-a/delegations/{grant['id']}", as_="alice")
    assert r.status == 204
    assert "dev-a" not in facts.readable_devices("bob", bob)
    r = await ownership_api.call("DELETE", f"/devices/dev-a/delegations/{grant['id']}", as_="alice")
    assert await error_of(r) == (404, "not_found")
    actions = [rec["action"] for rec in ownership_api.audit.records]
    assert "delegation.create" in actions and "delegation.revoke" in actions


@pytest.mark.parametrize("body, code", [
    ({"to": "bob"}, "missing_field"),
    ({"permission": "read"}, "missing_field"),
    ({"to": "bob", "permission": "admin"}, "invalid_field"),
    ({"to": "bob", "permission": "read", "expires_at": "tomorrow"}, "invalid_field"),
    ({"to": "bob", "permission": "read", "expires_at": "2020-01-01T00:00:00Z"}, "invalid_field"),
    ({"to": "bob", "permission": "read", "expires_at": "2099-01-01T00:00:00"}, "invalid_field"),
    # Year 10000 once in UTC: stored, it made the grantee's GET /me/data answer 500 for good.
    ({"to": "bob", "permission": "read", "expires_at": "9999-12-31T23:59:59-12:00"}, "invalid_field"),
    ({"to": "bob", "permission": "read", "expires_at": 12}, "invalid_field"),
    ({"to": "", "permission": "read"}, "invalid_field"),
    ({"to": "b o b", "permission": "read"}, "invalid_field"),
    ({"to": {"user": "a", "service": "b"}, "permission": "read"}, "invalid_field"),
    ({"to": {"public": False}, "permission": "read"}, "invalid_field"),
    ({"to": {"robot": "r2"}, "permission": "read"}, "invalid_field"),
    ({"to": ["bob"], "permission": "read"}, "invalid_field"),
    ({"to": "alice", "permission": "read"}, "invalid_field"),
    ({"to": "bob", "permission": "read", "why": "because"}, "unknown_field"),
])
async def test_delegation_validation(ownership_api, body, code):
    await ownership_api.register("alice", "dev-a")
    r = await ownership_api.call("POST", "/devices/dev-a/delegations", as_="alice", json=body)
    assert await error_of(r) == (400, code)
    assert ownership_api.ownership.delegations_of("dev-a") == []


async def test_expired_delegation_grants_nothing(ownership_api):
    await ownership_api.register("alice", "dev-a")
    service = ownership_api.ownership
    alice = await ownership_api.identity("alice")
    await service.create_delegation(alice, "dev-a", "bob", "readwrite", expires_at=time.time() - 1)
    await service.create_delegation(alice, "dev-a", "group:users", "read", expires_at=time.time() - 1)
    assert service.facts.readable_devices("bob", await ownership_api.sub("bob"), ["users"]) == set()
    (grant, _) = service.facts.device("dev-a").delegations
    assert not grant.active()
    listed = await (await ownership_api.call("GET", "/devices?include=delegated", as_="bob")).json()
    assert listed["devices"] == []
    shown = await (await ownership_api.call("GET", "/devices/dev-a/delegations", as_="alice")).json()
    assert [d["active"] for d in shown["delegations"]] == [False, False]


# ---------------------------------------------------------------- GDPR


async def test_export_contains_everything_about_the_caller(ownership_api):
    alice = await ownership_api.identity("alice")
    service = ownership_api.ownership
    await ownership_api.register("alice", "dev-a", name="Kitchen", location={"lat": 1, "lon": 2, "label": "home"})
    await ownership_api.register("bob", "dev-b")
    await ownership_api.call("POST", "/devices/dev-a/delegations", as_="alice", json={"to": "bob",
                                                                                        "permission": "read"})
    await ownership_api.call("POST", "/devices/dev-b/delegations", as_="bob", json={"to": "alice",
                                                                                      "permission": "write"})
    await service.record_subscription("sub-123", alice, "")
    await set_quota_override(service, alice.sub, 3)
    r = await ownership_api.call("GET", "/me/data", as_="alice")
    assert r.status == 200
    assert r.headers["Content-Disposition"] == 'attachment; filename="keygate-data-alice.json"'
    data = json.loads(await r.read())
    assert data["user"] == {"sub": alice.sub, "username": "alice"}
    (dev,) = data["devices"]
    assert dev["id"] == "dev-a" and dev["name"] == "Kitchen" and dev["location"]["label"] == "home"
    assert [k["slot"] for k in dev["keys"]] == ["k1", "k2"] and all("hash" not in k for k in dev["keys"])
    assert [d["to"] for d in dev["delegations"]] == [{"user": await ownership_api.sub("bob"), "username": "bob"}]
    assert [d["device"] for d in data["delegations_granted"]] == ["dev-a"]
    assert [d["device"] for d in data["delegations_received"]] == ["dev-b"]
    assert data["subscriptions"][0]["id"] == "sub-123"
    assert data["quota"] == {"max_devices": 3}
    assert data["known_user"]["username"] == "alice"
    assert "dev-b" not in json.dumps(data["devices"])


async def test_erasure_leaves_no_row_about_the_user(ownership_api):
    alice = await ownership_api.identity("alice")
    service = ownership_api.ownership
    body = await ownership_api.register("alice", "dev-a")
    await ownership_api.register("bob", "dev-b")
    await ownership_api.call("POST", "/devices/dev-a/delegations", as_="alice", json={"to": "bob",
                                                                                        "permission": "read"})
    await ownership_api.call("POST", "/devices/dev-b/delegations", as_="bob", json={"to": "alice",
                                                                                      "permission": "read"})
    await ownership_api.call("POST", "/devices/dev-b/delegations", as_="bob", json={"to": "carol",
                                                                                      "permission": "read"})
    await service.record_subscription("sub-1", alice, "")
    await set_quota_override(service, alice.sub, 3)
    assert await service.rows_about(alice.sub, "alice") > 0

    r = await ownership_api.call("DELETE", "/me/data", as_="alice")
    assert r.status == 200
    erased = (await r.json())["erased"]
    assert erased == {"devices": 1, "keys": 2, "certificates": 0, "delegations": 2, "subscriptions": 1, "quotas": 1,
                      "known_users": 1}
    assert await service.rows_about(alice.sub, "alice") == 0
    assert service.facts.device("dev-a") is None
    assert service.subscription_owner("sub-1", "") is None
    assert service.facts.readable_devices("alice", alice.sub) == set()
    with pytest.raises(AuthError):
        await service.authenticate_device_key("dev-a", body["k1"])
    # Other people's records stay.
    assert [d.grantee for d in service.facts.device("dev-b").delegations] == [
        Principal.user(await ownership_api.sub("carol"), "carol")]
    data = await (await ownership_api.call("GET", "/me/data", as_="alice")).json()
    assert data["devices"] == data["delegations_granted"] == data["delegations_received"] == []
    assert data["quota"] is None and data["subscriptions"] == []
    assert "keygate-data" not in json.dumps(ownership_api.audit.records)


# ---------------------------------------------------------------- errors


async def test_unknown_routes_and_methods_answer_json(ownership_api):
    r = await ownership_api.call("GET", "/nothing-here", as_="alice")
    assert (await error_of(r))[0] == 404
    r = await ownership_api.call("PUT", "/devices", as_="alice", json={})
    assert await error_of(r) == (405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]


async def test_unexpected_exception_is_a_500_without_traceback(ownership_api, monkeypatch):
    async def boom(*a, **kw):
        raise RuntimeError("secret internals /srv/keygate/store.py line 12")
    monkeypatch.setattr(ownership_api.ownership, "export_user_data", boom)
    r = await ownership_api.call("GET", "/me/data", as_="alice")
    assert await error_of(r) == (500, "internal")
    text = await r.text()
    assert "secret internals" not in text and "Traceback" not in text
