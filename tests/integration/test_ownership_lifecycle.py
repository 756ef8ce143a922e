"""A device id is no claim on what Orion holds, and a deleted device leaves nothing behind.

Through the ownership API and the NGSI gateway on one real listener, the real
test OIDC provider, the SQLCipher store, and the Orion stand-in. Each test is
one attack of issue 15 item 1, and fails on the behaviour before it: a deleted
device's entity stayed in Orion for the next registrant to read; registering
the id of an operator-made entity claimed it; ``POST /devices`` took any
tenant in ``service``; a deletion while Orion was down left the entity behind
with the id free.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ownership.api import create_api_app
from ownership.orion import OrionClient, OrionUnavailable
from proxy.config import ConfigError, load_config_text
from proxy.http.gateway import GATEWAY_KEY, HttpGateway
from tests.integration.http_rig import HttpRig, build_services, close_services
from tests.integration.test_http_gateway import _subscribe, subscription
from tests.rig.ngsi_standin import TENANTS, NgsiStandin

pytestmark = pytest.mark.integration

API = "/api/v1"
RETRY = 0.1          # ownership.removal_retry_seconds here (default 1)
RETRY_MAX = 0.4      # ownership.removal_retry_max_seconds here (default 60)
GRACE = 2.0          # ownership.unsettled_write_grace_seconds here (default 120)
BOUND = 10.0         # bounds every wait; no timing assertion rests on it


def lifecycle_config(upstream: str, tmp: Path) -> Any:
    text = json.dumps({
        "oidc": {"issuer": "http://127.0.0.1:1/realms/iot"},
        "http": {"listen": "127.0.0.1:0", "tls": False, "upstream": upstream, "upstream_timeout_seconds": 2},
        "store": {"path": str(tmp / "ownership.db"), "key": "${KEYGATE_TEST_STORE_KEY}"},
        "ownership": {"tenants_by_role": {"iot-admin": ["Plant"]},
                      "removal_retry_seconds": RETRY, "removal_retry_max_seconds": RETRY_MAX,
                      "unsettled_write_grace_seconds": GRACE},
    })
    return load_config_text(text, env={"KEYGATE_TEST_STORE_KEY": "lifecycle-test-key"})


async def start_rig(standin: NgsiStandin, tmp: Path, oidc: Any, session: aiohttp.ClientSession) -> HttpRig:
    services, tokens = await build_services(lifecycle_config(standin.url, tmp), oidc)
    gateway = HttpGateway(services, create_api_app(services))
    await gateway.start()
    return HttpRig(standin, gateway, services, tokens, session)


async def stop_rig(rig: HttpRig) -> None:
    await rig.gateway.stop()
    await close_services(rig.services)


@pytest.fixture
async def rig(tmp_path, oidc):
    standin = NgsiStandin()
    await standin.start()
    session = aiohttp.ClientSession()
    r = await start_rig(standin, tmp_path, oidc, session)
    try:
        yield r
    finally:
        await stop_rig(r)
        await session.close()
        await r.standin.stop()   # the one running now (a test may have replaced it)


async def register(rig: HttpRig, who: str, **body: Any):
    return await rig.call("POST", f"{API}/devices", who, json_body={"type": "Thermometer", **body})


async def sub_of(rig: HttpRig, who: str) -> str:
    return (await rig.services.tokens.validate(rig.tokens[who])).sub


def entities(rig: HttpRig, tenant: str = "") -> dict[str, Any]:
    return rig.standin.tenant(tenant).entities


async def alice_device_with_data(rig: HttpRig, device_id: str) -> str:
    """alice registers a device, writes its entity through the gateway and subscribes to it."""
    assert (await register(rig, "alice", id=device_id)).status == 201
    r = await rig.call("POST", "/v2/entities", "alice", json_body={
        "id": device_id, "type": "Thermometer", "secret": {"type": "Text", "value": "alice's reading"}})
    assert r.status == 201, r.body
    return await _subscribe(rig, "alice", subscription(device_id))


async def restart_standin(rig: HttpRig) -> float:
    """Orion comes back on the same port with the data it had; returns when it listens."""
    old = rig.standin
    new = NgsiStandin(port=old.port)
    new.app[TENANTS] = old.app[TENANTS]
    await new.start()
    rig.standin = new
    return time.monotonic()


# --------------------------------------------------------------------------- deletion leaves nothing behind


async def test_the_next_owner_of_a_deleted_id_reads_nothing_of_the_old_one(rig):
    sub_id = await alice_device_with_data(rig, "lc-1")
    rig.standin.recorded.clear()
    t0 = time.monotonic()
    assert (await rig.call("DELETE", f"{API}/devices/lc-1", "alice")).status == 204
    deletion_seconds = time.monotonic() - t0
    # Gone from Orion by the time the 204 is sent: the entity and the subscription on it.
    assert "lc-1" not in entities(rig)
    assert sub_id not in rig.standin.tenant("").subscriptions
    assert rig.services.ownership.subscription_owner(sub_id, "") is None
    calls = [(r.method, r.path) for r in rig.standin.recorded]
    assert ("DELETE", "/v2/entities/lc-1") in calls and ("DELETE", f"/v2/subscriptions/{sub_id}") in calls
    assert await rig.services.ownership.pending_removals() == []
    print(f"deletion: {len(calls)} Orion calls, {deletion_seconds * 1000:.1f} ms")

    # bob takes the id: it is free and empty.
    r = await register(rig, "bob", id="lc-1")
    assert r.status == 201, r.body
    r = await rig.call("GET", "/v2/entities/lc-1", "bob")
    assert r.status == 404 and b"alice" not in r.body


async def test_an_entity_written_under_another_service_path_is_deleted_too(rig):
    """Issue 15, F1: Orion applies a DELETE without Fiware-ServicePath to "/" only, while the existence
    check looks at "/#". An entity alice wrote under /hidden outlived her device and kept the id
    unregistrable forever; under both paths at once, neither may survive."""
    assert (await register(rig, "alice", id="lc-sp")).status == 201
    for path in ("/hidden/deeper", "/"):
        r = await rig.call("POST", "/v2/entities", "alice", headers={"Fiware-ServicePath": path}, json_body={
            "id": "lc-sp", "type": "Thermometer", "secret": {"type": "Text", "value": f"alice's, under {path}"}})
        assert r.status == 201, r.body
    assert "lc-sp" in rig.standin.tenant("").paths["/hidden/deeper"]
    assert (await rig.call("DELETE", f"{API}/devices/lc-sp", "alice")).status == 204
    assert not [p for p, held in rig.standin.tenant("").paths.items() if "lc-sp" in held]
    assert await rig.services.ownership.pending_removals() == []
    assert (await register(rig, "bob", id="lc-sp")).status == 201
    r = await rig.call("GET", "/v2/entities/lc-sp", "bob")
    assert r.status == 404 and b"alice" not in r.body


async def test_erasure_removes_the_users_entities_and_subscriptions_only(rig):
    mine = await alice_device_with_data(rig, "lc-e1")
    assert (await register(rig, "bob", id="lc-b1")).status == 201
    r = await rig.call("POST", "/v2/entities", "bob", json_body={"id": "lc-b1", "type": "Thermometer"})
    assert r.status == 201
    bobs = await _subscribe(rig, "bob", subscription("lc-b1"))
    # alice also subscribes to bob's device once he lets her read it: her subscription goes with her.
    bob = await rig.services.tokens.validate(rig.tokens["bob"])
    await rig.services.ownership.create_delegation(bob, "lc-b1", "alice", "read")
    hers_on_bobs = await _subscribe(rig, "alice", subscription("lc-b1"))

    r = await rig.call("DELETE", f"{API}/me/data", "alice")
    assert r.status == 200, r.body
    subs = rig.standin.tenant("").subscriptions
    assert "lc-e1" not in entities(rig) and mine not in subs and hers_on_bobs not in subs
    assert "lc-b1" in entities(rig) and bobs in subs
    assert await rig.services.ownership.pending_removals() == []
    assert (await register(rig, "carol", id="lc-e1")).status == 201


# --------------------------------------------------------------------------- registration cannot claim


async def test_an_operator_made_entity_cannot_be_claimed_by_registering_its_id(rig):
    rig.seed("ops-1", "Thermometer", secret="operator data")
    r = await register(rig, "bob", id="ops-1")
    assert r.status == 409, r.body
    assert r.json()["error"]["code"] == "conflict" and "already exists" in r.json()["error"]["message"]
    assert rig.services.ownership.get_device("ops-1") is None
    assert (await rig.call("GET", "/v2/entities/ops-1", "bob")).status == 403   # still admin-only
    # The same id in another tenant is no obstacle: the check asks the tenant the device would live in.
    rig.seed("ops-2", "Thermometer", service="plant")
    assert (await register(rig, "bob", id="ops-2")).status == 201
    assert [r.headers.get("Fiware-Service") for r in rig.upstream_saw("GET", "/v2/entities/ops-2")] == [None]


async def test_only_an_admin_adopts_an_existing_entity_and_names_the_owner(rig):
    rig.seed("ops-3", "Thermometer", secret="operator data")
    bob = await sub_of(rig, "bob")
    r = await register(rig, "alice", id="ops-3", adopt=True)
    assert r.status == 403 and r.json()["error"]["code"] == "forbidden"
    r = await register(rig, "alice", id="ops-3", owner=bob)
    assert r.status == 403
    assert (await register(rig, "admin", id="ops-3")).status == 409   # admins too, unless they say adopt
    r = await register(rig, "admin", id="ops-3", adopt=True, owner=bob, owner_username="bob")
    assert r.status == 201, r.body
    assert r.json()["owner"] == {"sub": bob, "username": "bob"}
    r = await rig.call("GET", "/v2/entities/ops-3", "bob")
    assert r.status == 200 and r.json()["secret"]["value"] == "operator data"
    adopted = [e for e in rig.audit.records if e["action"] == "device.register" and e["resource"] == "ops-3"
               and e["decision"] == "allow"]
    assert adopted and adopted[-1]["adopted"] is True and adopted[-1]["identity"]["username"] == "admin"


async def test_registration_is_refused_when_orion_cannot_be_asked(rig):
    await rig.standin.stop()
    t0 = time.monotonic()
    r = await register(rig, "alice", id="lc-down")
    refused_in = time.monotonic() - t0
    assert r.status == 503, r.body
    assert r.json()["error"]["code"] == "orion_unreachable" and r.headers["Retry-After"] == "5"
    assert rig.services.ownership.get_device("lc-down") is None
    upstream_timeout = rig.services.config.http.upstream_timeout_seconds
    print(f"refusal with Orion down took {refused_in * 1000:.1f} ms (upstream timeout {upstream_timeout} s)")
    assert refused_in < upstream_timeout + 1.0
    await restart_standin(rig)
    assert (await register(rig, "alice", id="lc-down")).status == 201


# --------------------------------------------------------------------------- the tenant is not a free field


async def test_a_tenant_the_caller_may_not_use_is_refused(rig):
    rig.seed("t-1", "Thermometer", service="othertenant", secret="other tenant's data")
    r = await register(rig, "alice", id="t-1", service="othertenant")
    assert r.status == 403, r.body
    assert r.json()["error"]["code"] == "tenant_not_allowed"
    assert rig.services.ownership.get_device("t-1") is None
    assert not rig.upstream_saw("GET", "/v2/entities/t-1")   # refused before anything was asked
    # A role may be allowed more (ownership.tenants_by_role: {iot-admin: [Plant]}); tenants are lower-case.
    assert (await register(rig, "alice", id="t-2", service="Plant")).status == 403
    r = await register(rig, "admin", id="t-2", service="Plant")
    assert r.status == 201 and r.json()["service"] == "plant"
    r = await register(rig, "alice", id="t-3", service="")
    assert r.status == 201 and r.json()["service"] == ""


# --------------------------------------------------------------------------- Orion down during deletion


async def wait_until_settled(rig: HttpRig) -> float:
    deadline = time.monotonic() + BOUND
    while await rig.services.ownership.pending_removals() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await rig.services.ownership.pending_removals() == [], "clean-up never completed"
    return time.monotonic()


async def test_orion_down_during_deletion_is_completed_later_and_the_id_blocked_meanwhile(rig):
    sub_id = await alice_device_with_data(rig, "lc-2")
    await rig.standin.stop()
    assert (await rig.call("DELETE", f"{API}/devices/lc-2", "alice")).status == 204
    # Nothing half-done is visible: the device is gone from the API, its id not registrable.
    assert (await rig.call("GET", f"{API}/devices/lc-2", "alice")).status == 404
    pending = await rig.services.ownership.pending_removals()
    assert {(p["kind"], p["target"]) for p in pending} == {("entity", "lc-2"), ("subscription", sub_id)}
    for who, extra in (("bob", {}), ("admin", {"adopt": True})):
        r = await register(rig, who, id="lc-2", **extra)
        assert r.status == 409, r.body
        assert "still being removed" in r.json()["error"]["message"]
    await asyncio.sleep(3 * RETRY_MAX)   # Orion stays down a while: the loop keeps trying, backing off
    attempts_while_down = max(p["attempts"] for p in await rig.services.ownership.pending_removals())

    back = await restart_standin(rig)
    done = await wait_until_settled(rig)
    print(f"Orion down ~{3 * RETRY_MAX:.1f} s: {attempts_while_down} attempts per item; "
          f"completed {done - back:.2f} s after it came back (retry cap {RETRY_MAX} s)")
    # Backing off: far fewer attempts than a tight loop, and never slower than the cap to notice.
    assert 1 <= attempts_while_down <= 1 + (3 * RETRY_MAX) / RETRY
    assert done - back <= RETRY_MAX + 1.0
    assert "lc-2" not in entities(rig) and sub_id not in rig.standin.tenant("").subscriptions
    assert rig.services.ownership.subscription_owner(sub_id, "") is None
    r = await register(rig, "bob", id="lc-2")
    assert r.status == 201, r.body
    r = await rig.call("GET", "/v2/entities/lc-2", "bob")
    assert r.status == 404 and b"alice" not in r.body


async def test_clean_up_owed_survives_a_restart(rig, tmp_path, oidc):
    await alice_device_with_data(rig, "lc-3")
    await rig.standin.stop()
    assert (await rig.call("DELETE", f"{API}/me/data", "alice")).status == 200
    assert await rig.services.ownership.pending_removals()
    await stop_rig(rig)               # keygate restarts while Orion is still down

    new = await start_rig(rig.standin, tmp_path, oidc, rig.session)
    rig.gateway, rig.services, rig.tokens = new.gateway, new.services, new.tokens
    assert {p["target"] for p in await rig.services.ownership.pending_removals()} >= {"lc-3"}
    r = await register(rig, "bob", id="lc-3")
    assert r.status == 409 and "still being removed" in r.json()["error"]["message"]
    await restart_standin(rig)
    await wait_until_settled(rig)     # the new process's retry loop finishes what the old one owed
    assert "lc-3" not in entities(rig)
    assert (await register(rig, "carol", id="lc-3")).status == 201


# --------------------------------------------------------------------------- the Orion client's edge cases


async def test_entities_sharing_an_id_are_each_deleted_and_an_odd_answer_is_no_answer():
    """Orion answers 409 to an untyped DELETE when several entities share the id (different types):
    each is then deleted by type. A 500 is neither "exists" nor "free"."""
    held = {("dup", "A"), ("dup", "B")}
    seen: list[str] = []

    async def entity(request: web.Request) -> web.Response:
        eid, etype = request.match_info["id"], request.query.get("type")
        seen.append(f"{request.method} {eid} {etype} {request.headers.get('Fiware-Service')}")
        if eid == "broken":
            return web.json_response({"error": "InternalError"}, status=500)
        mine = {k for k in held if k[0] == eid and etype in (None, k[1])}
        if len(mine) > 1:
            return web.json_response({"error": "TooManyResults"}, status=409)
        if not mine:
            return web.json_response({"error": "NotFound"}, status=404)
        if request.method == "DELETE":
            held.difference_update(mine)
            return web.Response(status=204)
        return web.json_response({"id": eid, "type": next(iter(mine))[1]})

    async def listing(request: web.Request) -> web.Response:
        if request.query["idPattern"] != "^dup$":
            return web.json_response({"error": "InternalError"}, status=500)
        assert "servicePath" in request.query["attrs"].split(",")
        return web.json_response([{"id": i, "type": t, "servicePath": {"type": "Text", "value": "/", "metadata": {}}}
                                  for i, t in sorted(held)])

    app = web.Application()
    app.router.add_route("*", "/v2/entities/{id}", entity)
    app.router.add_get("/v2/entities", listing)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    client = OrionClient(f"http://127.0.0.1:{runner.addresses[0][1]}", timeout_seconds=2)
    try:
        assert await client.entity_exists("dup", "t1")
        await client.delete_entity("dup", "t1")
        assert not held and not await client.entity_exists("dup", "t1")
        assert "DELETE dup A t1" in seen and "DELETE dup B t1" in seen
        with pytest.raises(OrionUnavailable):
            await client.entity_exists("broken", "")
        with pytest.raises(OrionUnavailable):
            await client.delete_entity("broken", "")
    finally:
        await client.close()
        await runner.cleanup()


@pytest.mark.parametrize("ownership,message", [
    ({"tenants_by_role": {"r": ["bad tenant"]}}, "ownership.tenants_by_role.r[0]: a tenant is 1 to 50"),
    ({"removal_retry_seconds": 0}, "ownership.removal_retry_seconds: must be above 0"),
    ({"removal_retry_seconds": 5, "removal_retry_max_seconds": 1}, "at most ownership.removal_retry_max_seconds"),
    ({"unsettled_write_grace_seconds": 0}, "ownership.unsettled_write_grace_seconds: must be above 0"),
])
def test_bad_lifecycle_settings_are_refused_at_load(ownership, message):
    text = json.dumps({"oidc": {"issuer": "http://127.0.0.1:1/realms/iot"}, "ownership": ownership})
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    assert message in str(info.value)


async def test_broker_clean_up_that_fails_is_retried_and_the_id_blocked_meanwhile(rig):
    """The MQTT gateway's clean-up of a deleted device (its retained messages and session at the
    broker) is owed like Orion's: while the broker cannot take it, the id is not registrable."""
    broker_up = False
    cleared: list[str] = []

    async def clearer(device_id: str) -> None:
        if not broker_up:
            raise ConnectionRefusedError("broker down")
        cleared.append(device_id)

    rig.services.ownership.set_broker_clearer(clearer)
    assert (await register(rig, "alice", id="lc-mqtt")).status == 201
    assert (await rig.call("DELETE", f"{API}/devices/lc-mqtt", "alice")).status == 204
    kinds = {(p["kind"], p["target"]) for p in await rig.services.ownership.pending_removals()}
    assert ("broker", "lc-mqtt") in kinds
    r = await register(rig, "bob", id="lc-mqtt")
    assert r.status == 409 and "still being removed" in r.json()["error"]["message"], r.body
    broker_up = True
    await wait_until_settled(rig)
    assert cleared == ["lc-mqtt"]
    assert (await register(rig, "bob", id="lc-mqtt")).status == 201


# --------------------------------------------------------------------------- races with the deletion


async def until(condition: Any) -> None:
    """Wait (bounded) for a state the test cannot be told about by an event."""
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_a_write_on_its_way_when_the_device_is_deleted_does_not_survive_the_deletion(rig):
    """Issue 15, F2: a create already forwarded when the DELETE commits reached Orion after the
    clean-up had looked: the entity was left behind and the id blocked. The clean-up now waits for
    writes in flight on the id; new writes on it are refused once the deletion has begun."""
    assert (await register(rig, "alice", id="lc-race")).status == 201
    held = rig.standin.hold("POST", "/v2/entities")
    write = asyncio.create_task(rig.call("POST", "/v2/entities", "alice", json_body={
        "id": "lc-race", "type": "Thermometer", "secret": {"type": "Text", "value": "alice's, late"}}))
    await asyncio.wait_for(held.arrived.wait(), BOUND)
    deletion = asyncio.create_task(rig.call("DELETE", f"{API}/devices/lc-race", "alice"))
    await until(lambda: rig.services.ownership.writes.closed("lc-race"))
    late = await rig.call("PATCH", "/v2/entities/lc-race/attrs", "alice",
                          json_body={"secret": {"type": "Text", "value": "alice's, later"}})
    assert late.status in (403, 404, 409), late
    held.release.set()
    assert (await write).status == 201
    assert (await deletion).status == 204
    assert not [p for p, ents in rig.standin.tenant("").paths.items() if "lc-race" in ents]
    assert (await register(rig, "bob", id="lc-race")).status == 201


async def test_a_subscription_made_while_its_device_is_deleted_is_withdrawn(rig):
    """Issue 15, F3: a subscription Orion was still making when the device's deletion committed was
    recorded after the clean-up; whoever registered the id next had their data notified to the old
    owner. It is now checked again once recorded, and withdrawn at Orion when its device is going."""
    assert (await register(rig, "alice", id="lc-subrace")).status == 201
    held = rig.standin.hold("POST", "/v2/subscriptions")
    making = asyncio.create_task(rig.call("POST", "/v2/subscriptions", "alice", json_body=subscription("lc-subrace")))
    await asyncio.wait_for(held.arrived.wait(), BOUND)
    deletion = asyncio.create_task(rig.call("DELETE", f"{API}/devices/lc-subrace", "alice"))
    await until(lambda: rig.services.ownership.writes.closed("lc-subrace"))
    held.release.set()
    made = await making
    assert made.status == 409 and b"withdrawn" in made.body, made
    assert (await deletion).status == 204
    assert rig.standin.tenant("").subscriptions == {}
    assert rig.services.ownership.subscriptions_of(await sub_of(rig, "alice"), "") == set()
    assert (await register(rig, "bob", id="lc-subrace")).status == 201


async def test_a_subscription_moved_onto_a_device_being_deleted_is_withdrawn(rig):
    """Issue 15 (attack15): a PATCH moving a subscription's subject onto a device, in flight while
    that device is deleted, was recorded after the clean-up; the next owner of the id had their data
    notified to the old one. The new subject is now checked again once recorded, as a new one is."""
    assert (await register(rig, "alice", id="lc-px")).status == 201
    assert (await register(rig, "alice", id="lc-py")).status == 201
    sub = await _subscribe(rig, "alice", subscription("lc-py"))
    # The subscription guard's later round would also catch it; this is about the gateway's own check.
    await rig.gateway.app[GATEWAY_KEY].guard.stop()
    held = rig.standin.hold("PATCH", f"/v2/subscriptions/{sub}")
    patch = asyncio.create_task(rig.call("PATCH", f"/v2/subscriptions/{sub}", "alice", json_body={
        "subject": {"entities": [{"id": "lc-px", "type": "Thermometer"}]}}))
    await asyncio.wait_for(held.arrived.wait(), BOUND)
    deletion = asyncio.create_task(rig.call("DELETE", f"{API}/devices/lc-px", "alice"))
    await until(lambda: rig.services.ownership.writes.closed("lc-px"))
    held.release.set()
    moved = await patch
    assert (await deletion).status == 204
    assert moved.status == 409 and b"withdrawn" in moved.body, moved
    assert rig.standin.tenant("").subscriptions == {}
    assert rig.services.ownership.subscriptions_of(await sub_of(rig, "alice"), "") == set()


async def test_a_write_that_timed_out_at_the_gateway_does_not_land_after_the_clean_up(rig):
    """Issue 15 (attack15): a write Orion was slower to answer than http.upstream_timeout_seconds was
    answered 504 and no longer counted, but Orion still applied it after the deletion's clean-up had
    looked: the entity stayed for the id's next owner. Its id now stays unsettled for
    ownership.unsettled_write_grace_seconds: the clean-up stays owed (the id blocked) and runs after."""
    assert (await register(rig, "alice", id="lc-slow")).status == 201
    held = rig.standin.hold("POST", "/v2/entities")
    write = await rig.call("POST", "/v2/entities", "alice", json_body={
        "id": "lc-slow", "type": "Thermometer", "secret": {"type": "Text", "value": "alice's, slow"}})
    assert write.status == 504
    assert (await rig.call("DELETE", f"{API}/devices/lc-slow", "alice")).status == 204
    held.release.set()
    await until(lambda: "lc-slow" in entities(rig))           # Orion applies the write after all
    assert (await register(rig, "bob", id="lc-slow")).status == 409   # the clean-up is still owed
    await wait_until_settled(rig)
    assert "lc-slow" not in entities(rig)
    assert (await register(rig, "bob", id="lc-slow")).status == 201


async def _create_held_at_orion(rig: HttpRig, who: str, body: bytes) -> tuple[Any, asyncio.StreamWriter]:
    """``who``'s POST /v2/entities of ``body``, sent raw on a connection of its own; back once Orion
    holds it (the hold, to release; the connection, to close)."""
    held = rig.standin.hold("POST", "/v2/entities")
    _reader, writer = await asyncio.open_connection("127.0.0.1", rig.gateway.port)
    writer.write((f"POST /v2/entities HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {rig.tokens[who]}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    await writer.drain()
    await asyncio.wait_for(held.arrived.wait(), BOUND)
    return held, writer


async def _deleted_before_the_write_lands(rig: HttpRig, held: Any, device_id: str) -> None:
    """alice deletes ``device_id`` while Orion holds a write creating it, then Orion applies the
    write: the deletion's clean-up must still remove the entity, and the id be free only after."""
    assert (await rig.call("DELETE", f"{API}/devices/{device_id}", "alice")).status == 204
    held.release.set()
    await until(lambda: device_id in entities(rig))            # Orion applies the write after all
    await wait_until_settled(rig)
    assert device_id not in entities(rig)
    assert (await register(rig, "carol", id=device_id)).status == 201


async def test_a_write_whose_client_hung_up_does_not_land_after_the_clean_up(rig):
    """Issue 15 (attack15): bob, with a delegated write, sends a write and hangs up while Orion is slow;
    the gateway stopped counting it when it stopped waiting for Orion, though Orion still took it,
    after alice's deletion of the device had cleaned up. The id now stays unsettled: the clean-up
    stays owed and runs once the write can no longer land."""
    assert (await register(rig, "alice", id="lc-hup")).status == 201
    grant = await rig.call("POST", f"{API}/devices/lc-hup/delegations", "alice",
                           json_body={"to": "bob", "permission": "write"})
    assert grant.status == 201, grant
    held, writer = await _create_held_at_orion(
        rig, "bob", b'{"id": "lc-hup", "type": "Thermometer", "bobs": {"type": "Text", "value": "bob was here"}}')
    writer.close()
    await writer.wait_closed()
    # the gateway is done with bob's request (it gave up on Orion), not Orion
    await until(lambda: any(r.get("protocol") == "http" and r.get("resource") == "/v2/entities"
                            and r.get("action") == "POST" for r in rig.audit.records))
    await _deleted_before_the_write_lands(rig, held, "lc-hup")


async def test_a_write_whose_handler_is_cancelled_does_not_land_after_the_clean_up(rig):
    """A counted write runs in its handler's own task (no task and shield of its own since issue 18):
    a handler cancelled while Orion holds the write (the gateway stopping, its grace for answers
    over) leaves the write's outcome unknown, so its id stays unsettled: alice's deletion cleans up
    once the write can no longer land, not when the count ended at the cancellation."""
    assert (await register(rig, "alice", id="lc-cut")).status == 201
    held, writer = await _create_held_at_orion(
        rig, "alice", b'{"id": "lc-cut", "type": "Thermometer", "late": {"type": "Text", "value": "after the cut"}}')
    writes = rig.services.ownership.writes
    assert writes._count["lc-cut"] == 1   # counted while Orion holds it
    serving = [c for c in rig.gateway.lean_connections if c._current is not None]
    assert len(serving) == 1, serving
    serving[0]._task.cancel()
    await until(lambda: serving[0]._task.done())
    assert not writes._count["lc-cut"], "the cancelled write is still counted"
    await _deleted_before_the_write_lands(rig, held, "lc-cut")
    writer.close()


async def test_a_subscription_made_while_its_creator_erases_their_data_is_withdrawn(rig):
    """Issue 15 (attack15): carol subscribes to bob's public device, Orion is slow, and carol erases her
    data meanwhile: the subscription was recorded after the erasure and kept notifying her. A row
    tied to a user whose erasure ran since the request began is now taken back."""
    assert (await register(rig, "bob", id="lc-pub", public=True)).status == 201
    held = rig.standin.hold("POST", "/v2/subscriptions")
    making = asyncio.create_task(rig.call("POST", "/v2/subscriptions", "carol", json_body=subscription("lc-pub")))
    await asyncio.wait_for(held.arrived.wait(), BOUND)
    assert (await rig.call("DELETE", f"{API}/me/data", "carol")).status == 200
    held.release.set()
    made = await making
    assert made.status == 409 and b"erased" in made.body, made
    carol = await rig.services.tokens.validate(rig.tokens["carol"])
    assert await rig.services.ownership.rows_about(carol.sub, carol.username) == 0
    assert rig.standin.tenant("").subscriptions == {}


async def test_a_registration_on_its_way_during_its_owners_erasure_is_not_kept(rig):
    """Issue 15 (attack15): carol registers a device while Orion is slow to say whether the id is free,
    and erases her data meanwhile: the device was inserted after the erasure. It is now taken back
    out (and a registration while her erasure runs is refused)."""
    held = rig.standin.hold("GET", "/v2/entities/lc-era")
    registering = asyncio.create_task(register(rig, "carol", id="lc-era"))
    await asyncio.wait_for(held.arrived.wait(), BOUND)
    assert (await rig.call("DELETE", f"{API}/me/data", "carol")).status == 200
    held.release.set()
    registered = await registering
    assert registered.status == 409 and b"erased" in registered.body, registered
    carol = await rig.services.tokens.validate(rig.tokens["carol"])
    assert await rig.services.ownership.rows_about(carol.sub, carol.username) == 0
    await wait_until_settled(rig)
    assert (await register(rig, "carol", id="lc-era")).status == 201   # afterwards, a new start
