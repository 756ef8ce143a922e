"""The NGSI gateway end to end: real sockets, the Orion stand-in behind, every caller kind.

Devices: alice owns a-1 (private) and a-2 (public); bob owns b-1 (carol may
read it) and b-2 (carol may read and write it); the iot-backend service account owns nothing; "orphan"
exists in Orion but is no registered device. Each test names the attack or
the promise it checks, and where it matters, asserts what did *not* reach Orion.
"""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest
from aiohttp import web

from proxy.http.gateway import HttpGateway
from tests.integration.http_rig import HttpRig, build_services, close_services, gateway_config, gateway_with
from tests.rig.ngsi_standin import NgsiStandin

pytestmark = pytest.mark.integration

SUB_ID_LEN = 24


async def _identity(rig: HttpRig, who: str):
    return await rig.services.tokens.validate(rig.tokens[who])


async def populate(rig: HttpRig) -> None:
    own = rig.services.ownership
    alice, bob = await _identity(rig, "alice"), await _identity(rig, "bob")
    _, k1, k2 = await own.register_device(alice, {"id": "a-1", "type": "Thermometer"})
    rig.keys["a-1"] = (k1, k2)
    await own.register_device(alice, {"id": "a-2", "type": "Thermometer", "public": True})
    await own.register_device(bob, {"id": "b-1", "type": "Thermometer"})
    await own.register_device(bob, {"id": "b-2", "type": "Valve"})
    await own.create_delegation(bob, "b-1", "carol", "read")
    await own.create_delegation(bob, "b-2", "carol", "readwrite")
    for eid, etype in (("a-1", "Thermometer"), ("a-2", "Thermometer"), ("b-1", "Thermometer"), ("b-2", "Valve"),
                       ("orphan", "Thermometer")):
        rig.seed(eid, etype)


@pytest.fixture
async def rig(tmp_path, oidc):
    standin = NgsiStandin()
    await standin.start()
    config = gateway_config(standin.url, tmp_path)
    services, tokens = await build_services(config, oidc)
    gateway = HttpGateway(services)
    await gateway.start()
    session = aiohttp.ClientSession()
    r = HttpRig(standin, gateway, services, tokens, session)
    await populate(r)
    r.standin.recorded.clear()
    try:
        yield r
    finally:
        await session.close()
        await gateway.stop()
        await close_services(services)
        await standin.stop()


# --------------------------------------------------------------------------- one entity


ENTITY_PATHS = ["/v2/entities/{id}", "/v2/entities/{id}/attrs", "/v2/entities/{id}/attrs/temperature",
                "/v2/entities/{id}/attrs/temperature/value"]


@pytest.mark.parametrize("who,device,status", [
    ("alice", "a-1", 200),      # owner
    ("carol", "b-1", 200),      # read delegate
    ("carol", "b-2", 200),      # read-write delegate
    ("bob", "a-2", 200),        # public device, other user
    ("admin", "b-1", 200),      # admin
    ("a-1", "a-1", 200),        # the device itself, by key
    ("bob", "a-1", 403),        # other user, private device
    ("backend", "b-1", 403),
    ("a-1", "b-1", 403),        # a device reading another's entity
    (None, "a-1", 401),         # anonymous
    (None, "a-2", 401),         # public means "any authenticated caller", not anonymous
])
async def test_entity_reads(rig, who, device, status):
    for path in ENTITY_PATHS:
        r = await rig.call("GET", path.format(id=device), who)
        assert r.status == status, (path, r.body)
        reached = rig.upstream_saw("GET", path.format(id=device))
        assert bool(reached) == (status == 200)
        if status == 401:
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        if status != 200:
            assert set(r.json()) == {"error", "description"}


@pytest.mark.parametrize("who,device,status", [
    ("alice", "a-1", 204), ("carol", "b-2", 204), ("admin", "b-1", 204),
    ("carol", "b-1", 403),      # read delegate cannot write
    ("bob", "a-2", 403),        # public is read-only
    ("bob", "a-1", 403), (None, "a-1", 401),
])
async def test_entity_writes(rig, who, device, status):
    r = await rig.call("PATCH", f"/v2/entities/{device}/attrs", who, json_body={"temperature": {"value": 30}})
    assert r.status == status, r.body
    assert bool(rig.upstream_saw("PATCH")) == (status == 204)
    if status == 204:
        assert rig.standin.tenant("").entities[device]["temperature"]["value"] == 30


async def test_owner_uses_every_entity_operation(rig):
    assert (await rig.call("POST", "/v2/entities/a-1/attrs", "alice",
                           json_body={"humidity": {"value": 40, "type": "Number"}})).status == 204
    assert (await rig.call("PUT", "/v2/entities/a-1/attrs/humidity/value", "alice", data=b"41",
                           headers={"Content-Type": "text/plain"})).status == 204
    r = await rig.call("GET", "/v2/entities/a-1/attrs/humidity/value", "alice")
    assert r.status == 200 and r.body == b"41"
    assert (await rig.call("DELETE", "/v2/entities/a-1/attrs/humidity", "alice")).status == 204
    assert (await rig.call("DELETE", "/v2/entities/a-1", "bob")).status == 403
    assert (await rig.call("DELETE", "/v2/entities/a-1", "alice")).status == 204
    r = await rig.call("GET", "/v2/entities/a-1", "alice")
    assert r.status == 404 and r.json()["error"] == "NotFound"   # Orion's own answer, passed through


async def test_unregistered_entity_is_only_for_admins(rig):
    assert (await rig.call("GET", "/v2/entities/orphan", "alice")).status == 403
    assert (await rig.call("GET", "/v2/entities/orphan", "admin")).status == 200


# --------------------------------------------------------------------------- creation


async def test_creation_needs_a_writable_registered_id(rig):
    body = {"id": "a-1", "type": "Thermometer", "temperature": {"value": 1}}
    await rig.call("DELETE", "/v2/entities/a-1", "alice")
    rig.standin.recorded.clear()
    assert (await rig.call("POST", "/v2/entities", "bob", json_body=body)).status == 403
    assert (await rig.call("POST", "/v2/entities", "carol", json_body=body)).status == 403
    assert not rig.upstream_saw("POST")
    r = await rig.call("POST", "/v2/entities", "alice", json_body=body)
    assert r.status == 201 and r.headers["Location"] == "/v2/entities/a-1?type=Thermometer"
    r = await rig.call("POST", "/v2/entities", "alice", json_body=body)
    assert r.status == 422 and r.json()["error"] == "Unprocessable"
    r = await rig.call("POST", "/v2/entities?options=upsert", "alice", json_body=body)
    assert r.status == 204
    assert (await rig.call("POST", "/v2/entities?options=upsert", "bob", json_body=body)).status == 403
    # delegates: write delegation upserts, read delegation does not
    assert (await rig.call("POST", "/v2/entities?options=upsert", "carol",
                           json_body={"id": "b-2", "type": "Valve", "open": {"value": True}})).status == 204
    assert (await rig.call("POST", "/v2/entities?options=upsert", "carol",
                           json_body={"id": "b-1", "type": "Thermometer"})).status == 403


async def test_unregistered_ids_are_created_only_by_admins(rig):
    body = {"id": "new-thing", "type": "Thing"}
    assert (await rig.call("POST", "/v2/entities", "alice", json_body=body)).status == 403
    assert (await rig.call("POST", "/v2/entities", None, json_body=body)).status == 401
    assert not rig.upstream_saw("POST")
    assert (await rig.call("POST", "/v2/entities", "admin", json_body=body)).status == 201


async def test_duplicate_json_keys_cannot_smuggle_an_id(rig):
    # Python keeps the last "id", Orion's parser the first: refuse instead of guessing.
    body = b'{"id": "b-1", "type": "Thermometer", "id": "a-1"}'
    r = await rig.call("POST", "/v2/entities?options=upsert", "alice", data=body,
                       headers={"Content-Type": "application/json"})
    assert r.status == 400 and not rig.upstream_saw("POST")


# --------------------------------------------------------------------------- listings


async def _listed(rig, who, query="", **kw) -> tuple[int, list[str], dict[str, str]]:
    r = await rig.call("GET", "/v2/entities" + query, who, **kw)
    return r.status, (sorted(e["id"] for e in r.json()) if r.status == 200 else []), r.headers


@pytest.mark.parametrize("who,expected", [
    ("alice", ["a-1", "a-2"]), ("bob", ["a-2", "b-1", "b-2"]), ("carol", ["a-2", "b-1", "b-2"]),
    ("backend", ["a-2"]), ("a-1", ["a-1", "a-2"]), ("admin", ["a-1", "a-2", "b-1", "b-2", "orphan"]),
])
async def test_listing_returns_only_readable_entities(rig, who, expected):
    status, ids, _ = await _listed(rig, who)
    assert status == 200 and ids == expected
    if who != "admin":
        (seen,) = rig.upstream_saw("GET", "/v2/entities")
        assert "id=" in seen.query            # never an unrestricted question to Orion


async def test_listing_with_id_pattern_and_count(rig):
    status, ids, headers = await _listed(rig, "alice", "?idPattern=.*&options=count")
    assert ids == ["a-1", "a-2"] and headers["Fiware-Total-Count"] == "2"
    status, ids, headers = await _listed(rig, "bob", "?idPattern=^b-&options=count&limit=1")
    assert status == 200 and len(ids) == 1 and headers["Fiware-Total-Count"] == "2"
    status, ids, _ = await _listed(rig, "alice", "?id=a-1,b-1,orphan")
    assert ids == ["a-1"]
    status, ids, _ = await _listed(rig, "alice", "?type=Valve")
    assert status == 200 and ids == []


async def test_listing_with_nothing_readable_never_asks_orion(rig):
    r = await rig.call("GET", "/v2/entities?options=count&idPattern=^zzz", "alice")
    assert r.status == 200 and r.json() == [] and r.headers["Fiware-Total-Count"] == "0"
    r = await rig.call("GET", "/v2/entities?options=count", "bob", headers={"Fiware-Service": "elsewhere"})
    assert r.status == 200 and r.json() == [] and r.headers["Fiware-Total-Count"] == "0"
    assert not rig.upstream_saw("GET", "/v2/entities")


async def test_listing_refuses_dangerous_patterns_and_unknown_parameters(rig):
    assert (await rig.call("GET", "/v2/entities?idPattern=(a%2B)%2B$", "alice")).status == 400
    assert (await rig.call("GET", "/v2/entities?id=a-1&idPattern=.*", "alice")).status == 400
    assert (await rig.call("GET", "/v2/entities?foo=bar", "alice")).status == 400
    assert not rig.upstream_saw()


async def test_anonymous_listing_asks_for_credentials(rig):
    r = await rig.call("GET", "/v2/entities", None)
    assert r.status == 401 and not rig.upstream_saw()


async def test_op_query_is_restricted_like_the_listing(rig):
    r = await rig.call("POST", "/v2/op/query?options=count", "alice", json_body={"entities": [{"idPattern": ".*"}]})
    assert r.status == 200 and sorted(e["id"] for e in r.json()) == ["a-1", "a-2"]
    assert r.headers["Fiware-Total-Count"] == "2"
    (seen,) = rig.upstream_saw("POST", "/v2/op/query")
    assert sorted(e["id"] for e in json.loads(seen.body)["entities"]) == ["a-1", "a-2"]
    r = await rig.call("POST", "/v2/op/query", "alice", json_body={"entities": [{"id": "b-1"}]})
    assert r.status == 200 and r.json() == []
    r = await rig.call("POST", "/v2/op/query", "carol", json_body={"attrs": ["temperature"]})
    assert sorted(e["id"] for e in r.json()) == ["a-2", "b-1", "b-2"]
    r = await rig.call("POST", "/v2/op/query", "admin", json_body={"entities": [{"idPattern": ".*"}]})
    assert len(r.json()) == 5


# --------------------------------------------------------------------------- batch update


async def test_batch_update_mixing_own_and_foreign_is_refused_whole(rig):
    body = {"actionType": "update", "entities": [
        {"id": "a-1", "type": "Thermometer", "temperature": {"value": 99}},
        {"id": "b-1", "type": "Thermometer", "temperature": {"value": 99}}]}
    r = await rig.call("POST", "/v2/op/update", "alice", json_body=body)
    assert r.status == 403
    assert b"b-1" not in r.body and b"a-1" not in r.body
    assert not rig.upstream_saw("POST", "/v2/op/update")
    assert rig.standin.tenant("").entities["a-1"]["temperature"]["value"] == 21.5
    body["entities"] = body["entities"][:1]
    assert (await rig.call("POST", "/v2/op/update", "alice", json_body=body)).status == 204
    assert rig.standin.tenant("").entities["a-1"]["temperature"]["value"] == 99


@pytest.mark.parametrize("who,action,ids,status", [
    ("carol", "update", ["b-2"], 204), ("carol", "update", ["b-1"], 403), ("carol", "delete", ["b-1"], 403),
    ("alice", "append", ["a-1", "new-x"], 403), ("admin", "append", ["a-1", "new-x"], 204),
    ("bob", "delete", ["b-1", "b-2"], 204), (None, "update", ["a-1"], 401),
])
async def test_batch_update_per_caller(rig, who, action, ids, status):
    body = {"actionType": action, "entities": [{"id": i, "type": "Thermometer"} for i in ids]}
    assert (await rig.call("POST", "/v2/op/update", who, json_body=body)).status == status


# --------------------------------------------------------------------------- subscriptions


def subscription(entity: str = "a-1", url: str = "http://93.184.216.34:8080/notify", **notification):
    return {"description": "t", "subject": {"entities": [{"id": entity, "type": "Thermometer"}]},
            "notification": notification or {"http": {"url": url}, "attrs": ["temperature"]}}


async def _subscribe(rig, who, body) -> str:
    r = await rig.call("POST", "/v2/subscriptions", who, json_body=body)
    assert r.status == 201, r.body
    sub_id = r.headers["Location"].rsplit("/", 1)[1]
    assert len(sub_id) == SUB_ID_LEN
    return sub_id


async def test_subscriptions_belong_to_their_creator(rig):
    mine = await _subscribe(rig, "alice", subscription("a-1"))
    bobs = await _subscribe(rig, "bob", subscription("b-1"))
    assert rig.services.ownership.subscription_owner(mine, "") == (await _identity(rig, "alice")).sub
    r = await rig.call("GET", "/v2/subscriptions?options=count", "alice")
    assert [s["id"] for s in r.json()] == [mine] and r.headers["Fiware-Total-Count"] == "1"
    assert [s["id"] for s in (await rig.call("GET", "/v2/subscriptions", "bob")).json()] == [bobs]
    assert {s["id"] for s in (await rig.call("GET", "/v2/subscriptions", "admin")).json()} == {mine, bobs}
    assert (await rig.call("GET", "/v2/subscriptions", "backend")).json() == []
    # someone else's subscription: indistinguishable from none at all
    for method in ("GET", "PATCH", "DELETE"):
        r = await rig.call(method, f"/v2/subscriptions/{mine}", "bob",
                           json_body={"throttling": 1} if method == "PATCH" else None)
        assert r.status == 404 and r.json()["error"] == "NotFound"
    assert not rig.upstream_saw("DELETE") and not rig.upstream_saw("PATCH")
    assert (await rig.call("GET", f"/v2/subscriptions/{mine}", "alice")).json()["id"] == mine
    assert (await rig.call("PATCH", f"/v2/subscriptions/{mine}", "alice", json_body={"throttling": 5})).status == 204
    assert (await rig.call("DELETE", f"/v2/subscriptions/{mine}", "alice")).status == 204
    assert rig.services.ownership.subscription_owner(mine, "") is None


@pytest.mark.parametrize("who,entity,status", [
    ("alice", "a-1", 201), ("carol", "b-1", 201), ("bob", "a-2", 201), ("admin", "orphan", 201),
    ("bob", "a-1", 403), ("backend", "b-2", 403), (None, "a-2", 401),
])
async def test_subscription_creation_needs_read_access(rig, who, entity, status):
    r = await rig.call("POST", "/v2/subscriptions", who, json_body=subscription(entity))
    assert r.status == status, r.body
    assert bool(rig.upstream_saw("POST", "/v2/subscriptions")) == (status == 201)


@pytest.mark.parametrize("url", ["http://127.0.0.1:9100/metrics", "http://localhost:1026/v2/entities",
                                 "http://[::1]/", "http://169.254.169.254/latest/meta-data",
                                 "http://10.0.0.8/", "http://127.1/", "http://93.184.216.34@127.0.0.1/",
                                 "file:///etc/passwd", "http://${host}/x"])
async def test_subscription_to_internal_targets_is_refused(rig, url):
    r = await rig.call("POST", "/v2/subscriptions", "alice", json_body=subscription("a-1", url))
    assert r.status in (400, 403), r.body
    assert not rig.upstream_saw("POST", "/v2/subscriptions")


async def test_subscription_update_cannot_redirect_to_loopback(rig):
    mine = await _subscribe(rig, "alice", subscription("a-1"))
    r = await rig.call("PATCH", f"/v2/subscriptions/{mine}", "alice",
                       json_body={"notification": {"httpCustom": {"url": "http://127.0.0.1:1026/admin"}}})
    assert r.status == 403 and not rig.upstream_saw("PATCH")
    r = await rig.call("PATCH", f"/v2/subscriptions/{mine}", "alice",
                       json_body={"subject": {"entities": [{"id": "b-1"}]}})
    assert r.status == 403 and not rig.upstream_saw("PATCH")


async def test_subscription_patterns_and_foreign_mqtt_topics_are_refused(rig):
    body = subscription("a-1")
    body["subject"]["entities"] = [{"idPattern": ".*"}]
    assert (await rig.call("POST", "/v2/subscriptions", "alice", json_body=body)).status == 403
    assert (await rig.call("POST", "/v2/subscriptions", "admin", json_body=body)).status == 201
    # Orion would publish straight into the broker, past the MQTT gateway.
    body = subscription("a-1", mqtt={"url": "mqtt://93.184.216.34:1883", "topic": "devices/b-1/cmd/open"})
    assert (await rig.call("POST", "/v2/subscriptions", "alice", json_body=body)).status == 403
    body = subscription("a-1", mqtt={"url": "mqtt://93.184.216.34:1883", "topic": "devices/a-1/cmd/x"})
    assert (await rig.call("POST", "/v2/subscriptions", "alice", json_body=body)).status == 201


async def test_a_subscription_that_cannot_be_recorded_is_withdrawn(rig, monkeypatch):
    async def broken(*args, **kw):
        raise OSError("store is gone")

    monkeypatch.setattr(rig.services.ownership, "record_subscription", broken)
    r = await rig.call("POST", "/v2/subscriptions", "alice", json_body=subscription("a-1"))
    assert r.status == 503
    assert rig.upstream_saw("POST", "/v2/subscriptions") and rig.upstream_saw("DELETE")
    assert rig.standin.tenant("").subscriptions == {}


async def test_a_withdrawal_does_not_follow_a_redirect_from_orion(rig, monkeypatch, caplog):
    """The withdrawal's DELETE was the one call to Orion that followed redirects (aiohttp's default):
    an answer of 307 sent it on, with the caller's X-Keygate-* identity headers and tenant, to
    whatever address the Location named. Like every other call to Orion, it now follows none."""
    elsewhere: list[web.Request] = []

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(request)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async def broken(*args, **kw):
            raise OSError("store is gone")

        monkeypatch.setattr(rig.services.ownership, "record_subscription", broken)
        rig.standin.answer("DELETE", "/v2/subscriptions/", lambda request: web.Response(
            status=307, headers={"Location": f"http://127.0.0.1:{port}/stolen{request.path}"}))
        r = await rig.call("POST", "/v2/subscriptions", "alice", json_body=subscription("a-1"))
        assert r.status == 503
        assert rig.upstream_saw("DELETE")   # the withdrawal was sent, and answered with the redirect
        assert elsewhere == []
        # Not taken, so said: the subscription is still at Orion.
        assert any("could not withdraw" in m and "answered 307" in m for m in caplog.messages)
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------- closed endpoints


@pytest.mark.parametrize("method,path", [("GET", "/v2/registrations"), ("POST", "/v2/registrations"),
                                         ("GET", "/v2/types"), ("GET", "/version"), ("GET", "/admin/log"),
                                         ("PUT", "/log/trace"), ("GET", "/statistics"),
                                         ("GET", "/cache/statistics"), ("DELETE", "/statistics")])
async def test_orion_admin_endpoints_are_closed_to_users(rig, method, path):
    for who, status in (("alice", 403), ("a-1", 403), (None, 401)):
        r = await rig.call(method, path, who, json_body={} if method in ("POST", "PUT") else None)
        assert r.status == status
    assert not rig.upstream_saw()


async def test_admins_reach_orion_admin_endpoints(rig):
    assert (await rig.call("GET", "/version", "admin")).json()["orion"]["version"]
    assert (await rig.call("GET", "/v2/types", "admin")).status == 200
    r = await rig.call("POST", "/v2/registrations", "admin", json_body={"dataProvided": {}})
    assert r.status == 201 and r.headers["Location"].startswith("/v2/registrations/")


# --------------------------------------------------------------------------- path and header tricks


@pytest.mark.parametrize("target,status", [
    ("/v2/entities/../registrations", 403),          # resolves to /v2/registrations: closed
    ("/v2/entities/a-1/../../registrations", 403),
    ("/v2/entities/b-1%2F..%2F..%2Fregistrations", 400),
    ("/v2/entities/a-1%2Fattrs", 400),
    ("/v2/entities/%2e%2e/registrations", 400),
    ("/v2/entities/a-1%00", 400),
    ("/../v2/entities/a-1", 400),
    ("/v2/entities/a-1\\..\\b-1", 400),
    ("/v2/entities/b-1;x=1", 400),
    ("/v2/entities/a%2D1", 200),                      # an encoded ordinary character is just that character
])
async def test_path_tricks(rig, target, status):
    r = await rig.raw(f"GET {target} HTTP/1.1\nHost: x\nAuthorization: Bearer {rig.tokens['alice']}\n"
                      "Connection: close")
    assert r.status == status, (target, r.body)
    assert all(s.path in ("/v2/entities/a-1",) for s in rig.upstream_saw())


async def test_double_slash_is_neutralised(rig):
    r = await rig.raw(f"GET //v2/entities HTTP/1.1\nHost: x\nAuthorization: Bearer {rig.tokens['alice']}\n"
                      "Connection: close")
    assert r.status == 200 and sorted(e["id"] for e in json.loads(r.body)) == ["a-1", "a-2"]
    (seen,) = rig.upstream_saw()
    assert seen.path == "/v2/entities" and "id=" in seen.query


async def test_client_forwarding_and_identity_headers_are_replaced(rig):
    r = await rig.call("GET", "/v2/entities/a-1", "bob", headers={
        "X-Forwarded-For": "10.0.0.1", "X-Forwarded-Host": "evil", "X-Forwarded-Proto": "https",
        "Forwarded": "for=10.0.0.1", "X-Real-IP": "10.0.0.1", "X-Keygate-Sub": "sub-alice",
        "X-Keygate-User": "alice", "X-Keygate-Roles": "iot-admin", "X-Auth-Token": "orion-token"})
    assert r.status == 403
    r = await rig.call("GET", "/v2/entities/a-1", "alice", headers={
        "X-Forwarded-For": "10.0.0.1", "X-Keygate-User": "admin", "X-Keygate-Roles": "iot-admin",
        "X-Auth-Token": "orion-token", "Connection": "X-Secret", "X-Secret": "hop",
        "X-HTTP-Method-Override": "DELETE"})
    assert r.status == 200
    (seen,) = rig.upstream_saw()
    h = {k.lower(): v for k, v in seen.headers.items()}
    assert h["x-forwarded-for"] == "127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-keygate-user"] == "alice"
    roles = h["x-keygate-roles"].split(",")
    assert "iot-user" in roles and "iot-admin" not in roles
    assert h["x-keygate-sub"] == (await _identity(rig, "alice")).sub
    for gone in ("authorization", "x-auth-token", "forwarded", "x-real-ip", "x-secret", "x-http-method-override"):
        assert gone not in h


async def test_repeated_query_parameters_are_refused(rig):
    r = await rig.call("GET", "/v2/entities?id=a-1&id=b-1", "alice")
    assert r.status == 400 and not rig.upstream_saw()


async def test_bad_credentials_get_401_without_reason(rig):
    for auth in ("Bearer not-a-token", "Basic " + "YS0xOndyb25n", "Basic !!!", "Digest x", "Bearer "):
        r = await rig.call("GET", "/v2/entities/a-1", headers={"Authorization": auth})
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json() == {"error": "Unauthorized", "description": "not authorized"}
    assert not rig.upstream_saw()
    reasons = [rec["reason"] for rec in rig.audit.records if rec.get("protocol") == "http"]
    assert any("unknown_device_or_key" in x for x in reasons) and any("malformed" in x for x in reasons)


async def test_issuer_down_is_503_not_401(rig, monkeypatch):
    from proxy.identity.model import AuthError, AuthReason

    async def unreachable(token):
        raise AuthError(AuthReason.ISSUER_UNREACHABLE, "connection refused")

    monkeypatch.setattr(rig.services.tokens, "validate", unreachable)
    r = await rig.call("GET", "/v2/entities/a-1", "alice")
    assert r.status == 503 and r.headers["Retry-After"] and not rig.upstream_saw()


async def test_device_key_k2_works_too(rig):
    _, k2 = rig.keys["a-1"]
    auth = "Basic " + base64.b64encode(f"a-1:{k2}".encode()).decode()
    assert (await rig.call("GET", "/v2/entities/a-1", headers={"Authorization": auth})).status == 200


# --------------------------------------------------------------------------- tenancy


async def test_tenant_must_match_the_devices_service(rig):
    own = rig.services.ownership
    alice = await _identity(rig, "alice")
    await own.register_device(alice, {"id": "s-1", "type": "Thermometer", "service": "smartcity"})
    rig.seed("s-1", service="smartcity")
    rig.standin.recorded.clear()   # the registration asked Orion whether s-1 was free
    assert (await rig.call("GET", "/v2/entities/s-1", "alice", headers={"Fiware-Service": "SmartCity"})).status == 200
    (seen,) = rig.upstream_saw()
    assert seen.headers["Fiware-Service"] == "smartcity"
    assert (await rig.call("GET", "/v2/entities/s-1", "alice")).status == 403
    assert (await rig.call("GET", "/v2/entities/a-1", "alice", headers={"Fiware-Service": "smartcity"})).status == 403
    _status, ids, _ = await _listed(rig, "alice", headers={"Fiware-Service": "smartcity"})
    assert ids == ["s-1"]
    assert (await rig.call("GET", "/v2/entities", "alice", headers={"Fiware-Service": "bad-name!"})).status == 400


async def test_service_path_is_checked_for_shape(rig):
    ok = await rig.call("GET", "/v2/entities/a-1", "alice", headers={"Fiware-ServicePath": "/#"})
    assert ok.status == 200
    bad = await rig.call("PATCH", "/v2/entities/a-1/attrs", "alice", json_body={"temperature": {"value": 1}},
                         headers={"Fiware-ServicePath": "/a/#"})
    assert bad.status == 400


async def test_configured_tenant_is_forced(tmp_path, oidc):
    async with gateway_with(tmp_path, oidc, fiware_service="City") as (standin, gateway, services, tokens):
        alice = await services.tokens.validate(tokens["alice"])
        await services.ownership.register_device(alice, {"id": "c-1", "type": "Thermometer"})
        standin.tenant("city").entities["c-1"] = {"id": "c-1", "type": "Thermometer"}
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gateway.port}/v2/entities/c-1",
                         headers={"Authorization": f"Bearer {tokens['alice']}",
                                  "Fiware-Service": "other"}) as r:
            assert r.status == 200
        assert standin.recorded[-1].headers["Fiware-Service"] == "city"


# --------------------------------------------------------------------------- body cap, upstream failures


async def test_body_over_the_cap_is_refused_before_orion(rig):
    big = {"temperature": {"value": "x" * 5000}}
    r = await rig.call("PATCH", "/v2/entities/a-1/attrs", "alice", json_body=big)
    assert r.status == 413 and r.json()["error"] == "RequestEntityTooLarge"

    async def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = await rig.call("PUT", "/v2/entities/a-1/attrs/temperature/value", "alice", data=chunks(),
                       headers={"Content-Type": "text/plain"})
    assert r.status == 413
    r = await rig.call("POST", "/v2/op/update", "alice", data=chunks(), headers={"Content-Type": "application/json"})
    assert r.status == 413
    assert not rig.upstream_saw()


async def test_body_under_the_cap_streams_through(rig):
    async def chunks():
        yield b'{"temperature": '
        yield b'{"value": 7}}'

    r = await rig.call("PATCH", "/v2/entities/a-1/attrs", "alice", data=chunks(),
                       headers={"Content-Type": "application/json"})
    assert r.status == 204
    assert rig.standin.tenant("").entities["a-1"]["temperature"]["value"] == 7


async def test_upstream_down_is_502_and_slow_is_504(tmp_path, oidc):
    from tests.rig.ports import free_port

    slow = web.Application()

    async def hang(request):
        await asyncio.sleep(5)
        return web.Response()

    slow.router.add_route("*", "/{t:.*}", hang)
    runner = web.AppRunner(slow)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        for upstream, status, error in ((f"http://127.0.0.1:{free_port()}", 502, "BadGateway"),
                                        (f"http://127.0.0.1:{runner.addresses[0][1]}", 504, "GatewayTimeout")):
            async with gateway_with(tmp_path / str(status), oidc, upstream, upstream_timeout_seconds=0.3) as (
                    _, gateway, services, tokens):
                alice = await services.tokens.validate(tokens["alice"])
                # adopt: registered without asking Orion, which is down or hangs here
                await services.ownership.register_device(alice, {"id": "a-1", "type": "Thermometer"}, adopt=True)
                async with aiohttp.ClientSession() as s:
                    async with s.get(f"http://127.0.0.1:{gateway.port}/v2/entities/a-1",
                                     headers={"Authorization": f"Bearer {tokens['alice']}"}) as r:
                        assert r.status == status
                        assert (await r.json())["error"] == error
    finally:
        await runner.cleanup()


async def test_large_responses_stream_back_intact(rig):
    rig.seed("a-1", blob="x" * 300_000)
    r = await rig.call("GET", "/v2/entities/a-1/attrs/blob/value", "alice")
    assert r.status == 200 and r.body == b"x" * 300_000
    r = await rig.call("HEAD", "/v2/entities/a-1", "alice")
    assert r.status == 200 and r.body == b""


async def test_cors_for_configured_origins(tmp_path, oidc):
    async with gateway_with(tmp_path, oidc, cors_origins=["https://app.example"]) as (standin, gateway, services,
                                                                                      tokens):
        alice = await services.tokens.validate(tokens["alice"])
        await services.ownership.register_device(alice, {"id": "a-1", "type": "Thermometer"})
        standin.tenant("").entities["a-1"] = {"id": "a-1", "type": "Thermometer"}
        base = f"http://127.0.0.1:{gateway.port}"
        async with aiohttp.ClientSession() as s:
            pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "PATCH"}
            async with s.options(base + "/v2/entities/a-1/attrs", headers=pre) as r:
                assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            async with s.options(base + "/v2/entities/a-1/attrs", headers={**pre, "Origin": "https://evil"}) as r:
                assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
            auth = {"Authorization": f"Bearer {tokens['alice']}"}
            async with s.get(base + "/v2/entities/a-1", headers={**auth, "Origin": "https://app.example"}) as r:
                assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
                assert "Fiware-Total-Count" in r.headers["Access-Control-Expose-Headers"]
            async with s.get(base + "/v2/entities/a-1", headers={**auth, "Origin": "https://evil"}) as r:
                assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
        assert not [x for x in standin.recorded if x.method == "OPTIONS"]


# --------------------------------------------------------------------------- headers back, audit, API mount


async def test_orion_response_headers_reach_the_client(rig):
    r = await rig.call("GET", "/v2/entities?options=count", "alice", headers={"Fiware-Correlator": "corr-1"})
    assert r.headers["Fiware-Total-Count"] == "2" and r.headers["Fiware-Correlator"] == "corr-1"


async def test_every_request_is_audited(rig):
    await rig.call("GET", "/v2/entities/a-1", "alice")
    await rig.call("GET", "/v2/entities/a-1", "bob")
    http = [rec for rec in rig.audit.records if rec.get("protocol") == "http"]
    allow, deny = http[-2], http[-1]
    assert allow["decision"] == "allow" and allow["devices"] == ["a-1"] and allow["upstream_status"] == 200
    assert allow["rule"] and allow["identity"]["username"] == "alice" and allow["latency_ms"] >= 0
    assert deny["decision"] == "deny" and deny["status"] == 403 and deny["upstream_status"] is None
    assert deny["resource"] == "/v2/entities/a-1" and deny["action"] == "GET"


async def test_requests_are_counted(rig):
    from proxy.metrics import REGISTRY

    def count(decision, status):
        return REGISTRY.get_sample_value("keygate_http_requests_total", {"decision": decision, "status": status}) or 0

    before = count("deny", "403"), count("allow", "200")
    await rig.call("GET", "/v2/entities/a-1", "bob")
    await rig.call("GET", "/v2/entities/a-1", "alice")
    assert (count("deny", "403"), count("allow", "200")) == (before[0] + 1, before[1] + 1)


async def test_ownership_api_is_mounted_beside_the_proxy(tmp_path, oidc):
    """Keys and delegations made through the real ownership API, on the gateway's own port,
    are in force on the next NGSI request; nothing under /api/v1 reaches Orion."""
    from ownership.api import create_api_app

    standin = NgsiStandin()
    await standin.start()
    services, tokens = await build_services(gateway_config(standin.url, tmp_path), oidc)
    gateway = HttpGateway(services, create_api_app(services))
    await gateway.start()
    base = f"http://127.0.0.1:{gateway.port}"
    alice = {"Authorization": f"Bearer {tokens['alice']}"}
    bob = {"Authorization": f"Bearer {tokens['bob']}"}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(base + "/api/v1/devices", json={"id": "api-1", "type": "Thermometer"},
                              headers=alice) as r:
                assert r.status == 201
                k1 = (await r.json())["k1"]
            standin.tenant("").entities["api-1"] = {"id": "api-1", "type": "Thermometer"}
            basic = {"Authorization": "Basic " + base64.b64encode(f"api-1:{k1}".encode()).decode()}
            async with s.get(base + "/v2/entities/api-1", headers=basic) as r:
                assert r.status == 200
            async with s.get(base + "/v2/entities/api-1", headers=bob) as r:
                assert r.status == 403
            async with s.post(base + "/api/v1/devices/api-1/delegations", json={"to": "bob", "permission": "read"},
                              headers=alice) as r:
                assert r.status == 201
            async with s.get(base + "/v2/entities/api-1", headers=bob) as r:
                assert r.status == 200
        assert not [x for x in standin.recorded if x.path.startswith("/api")]
    finally:
        await gateway.stop()
        await close_services(services)
        await standin.stop()
