"""Attacks on the NGSI gateway's input, headers, subscription listing and notification targets.

Devices as in test_http_gateway (alice owns a-1 and a-2, bob owns b-1 and b-2). Each test
names the attack and asserts what did, and did not, reach Orion (the stand-in).
"""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import pytest
from aiohttp import web

from ownership.api import create_api_app
from proxy.audit import AuditLog
from proxy.http.gateway import GATEWAY_KEY, HttpGateway
from tests.integration import test_http_gateway as base
from tests.integration.http_rig import HttpRig, build_services, close_services, gateway_config, gateway_with
from tests.integration.test_http_gateway import _subscribe, populate, subscription
from tests.rig.ngsi_standin import NOTIFIED, NgsiStandin

pytestmark = pytest.mark.integration

rig = base.rig   # the fixture: alice, bob, carol and their devices in front of the stand-in


# --------------------------------------------------------------------------- identity headers


WILMA = ["X-Nick-Name", "X-Display-Name", "X-Roles", "X-Organizations", "X-Eidas-Profile", "X-App-Id"]
OAUTH2_PROXY = ["X-Auth-Request-User", "X-Auth-Request-Email", "X-Auth-Request-Groups",
                "X-Auth-Request-Preferred-Username", "X-Auth-Request-Access-Token", "X-Forwarded-User",
                "X-Forwarded-Email", "X-Forwarded-Groups", "X-Forwarded-Preferred-Username",
                "X-Forwarded-Access-Token", "GAP-Auth"]
REMOTE_USER = ["Remote-User", "X-Remote-User"]
KEYGATE = ["X-Keygate-Device", "X-Keygate-Groups", "X-Keygate-Admin"]   # names the gateway does not set for alice


@pytest.mark.parametrize("family,names", [("wilma", WILMA), ("oauth2-proxy", OAUTH2_PROXY),
                                          ("remote-user", REMOTE_USER), ("keygate", KEYGATE)])
async def test_identity_headers_of_the_ecosystem_never_reach_orion(rig, family, names):
    # alice claims to be bob (and an admin) the way each gateway family would tell a backend
    forged = {name: "bob" if "token" not in name.lower() else "bob-token" for name in names}
    r = await rig.call("GET", "/v2/entities/a-1", "alice", headers=forged)
    assert r.status == 200
    seen = {k.lower() for k in rig.upstream_saw("GET", "/v2/entities/a-1")[-1].headers}
    crossed = seen & {n.lower() for n in names}
    assert not crossed, f"{family} headers crossed: {sorted(crossed)}"


@pytest.mark.parametrize("family,names", [("wilma", WILMA), ("oauth2-proxy", OAUTH2_PROXY),
                                          ("remote-user", REMOTE_USER), ("keygate", KEYGATE)])
async def test_identity_headers_spelled_with_underscores_never_reach_orion(rig, family, names):
    # A CGI/WSGI backend reads X_Keygate_Sub and X-Keygate-Sub as the same HTTP_X_KEYGATE_SUB.
    forged = {name.replace("-", "_"): "bob" for name in names}
    r = await rig.call("GET", "/v2/entities/a-1", "alice", headers=forged)
    assert r.status == 200
    seen = {k.lower().replace("_", "-") for k in rig.upstream_saw("GET", "/v2/entities/a-1")[-1].headers}
    crossed = seen & {n.lower() for n in names}
    assert not crossed, f"{family} headers crossed: {sorted(crossed)}"


async def test_configured_names_are_stripped_too(tmp_path, oidc):
    standin = NgsiStandin()
    await standin.start()
    services, tokens = await build_services(
        gateway_config(standin.url, tmp_path, strip_request_headers=["X-Tenant-User", "x-acl"]), oidc)
    gateway = HttpGateway(services)
    await gateway.start()
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{gateway.port}/version", headers={
                "Authorization": f"Bearer {tokens['admin']}", "X-Tenant-User": "bob", "X-ACL": "all",
                "X-Nick-Name": "bob", "X-Custom": "kept"}) as r:
            assert r.status == 200
        seen = {k.lower() for k in standin.recorded[-1].headers}
        assert "x-tenant-user" not in seen and "x-acl" not in seen and "x-nick-name" not in seen
        assert "x-custom" in seen      # only identity headers go, the rest is the client's
    finally:
        await gateway.stop()
        await close_services(services)
        await standin.stop()


# --------------------------------------------------------------------------- JSON input


def nested(depth: int, leaf=1):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def _batch(value) -> dict:
    # depth: the body 1, entities 2, the entity 3, the attribute 4, then the value's own levels
    return {"actionType": "update", "entities": [{"id": "a-1", "type": "Thermometer",
                                                  "temperature": {"type": "Number", "value": value}}]}


@pytest.mark.parametrize("path", ["/v2/entities", "/v2/op/update", "/v2/op/query", "/v2/subscriptions"])
async def test_deep_nesting_is_a_400_parse_error_not_a_500(tmp_path, oidc, path):
    deep = b"[" * 50_000 + b"]" * 50_000     # raised RecursionError inside json.loads: a 500 and a traceback
    async with gateway_with(tmp_path, oidc, max_body_bytes=1 << 20) as (standin, gateway, _, tokens):
        async with aiohttp.ClientSession() as s:
            for body in (deep, b'{"entities": [{"id": "a-1", "x": ' + deep + b"}]}"):
                async with s.post(f"http://127.0.0.1:{gateway.port}{path}", data=body, headers={
                        "Authorization": f"Bearer {tokens['alice']}", "Content-Type": "application/json"}) as r:
                    reply = await r.json()
                    assert r.status == 400, reply
                assert reply == {"error": "ParseError", "description": "JSON nested deeper than 32 levels"}
        assert not standin.recorded


async def test_nesting_up_to_the_cap_passes_one_more_is_refused(rig):
    limit = rig.services.config.http.max_json_depth
    ok = await rig.call("POST", "/v2/op/update", "alice", json_body=_batch(nested(limit - 4)))
    assert ok.status == 204, ok.body
    over = await rig.call("POST", "/v2/op/update", "alice", json_body=_batch(nested(limit - 3)))
    assert over.status == 400 and over.json()["error"] == "ParseError"
    assert len(rig.upstream_saw("POST", "/v2/op/update")) == 1


@pytest.mark.parametrize("raw,why", [
    ('"\\ud800"', "lone surrogate"),
    ('"x\\udfffy"', "lone surrogate"),
    ('1e400', "out of range"),
    ('-1e400', "out of range"),
    ('1' + '0' * 400, "out of range"),
    ('NaN', "not JSON"),
    ('Infinity', "not JSON"),
    ('-Infinity', "not JSON"),
])
async def test_values_orion_cannot_take_are_refused_in_its_shape(rig, raw, why):
    body = ('{"id": "a-9", "type": "Thermometer", "temperature": {"type": "Number", "value": ' + raw + '}}').encode()
    r = await rig.call("POST", "/v2/entities", "alice", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 400, r.body
    assert r.json()["error"] == "ParseError" and why in r.json()["description"]
    assert not rig.upstream_saw("POST", "/v2/entities")


@pytest.mark.parametrize("method,path,raw", [
    ("PATCH", "/v2/entities/a-1/attrs", '{"temperature": {"type": "Number", "value": %s}}'),
    ("POST", "/v2/entities/a-1/attrs", '{"temperature": {"type": "Number", "value": %s}}'),
    ("PUT", "/v2/entities/a-1/attrs", '{"temperature": {"type": "Number", "value": %s}}'),
    ("PUT", "/v2/entities/a-1/attrs/temperature", '{"type": "Number", "value": %s}'),
    ("PUT", "/v2/entities/a-1/attrs/temperature/value", '%s'),
])
@pytest.mark.parametrize("value,why", [("1e400", "out of range"), ("NaN", "not JSON"), ("[" * 40 + "]" * 40, "nested")])
async def test_attribute_writes_are_checked_too_though_the_decision_does_not_read_them(rig, method, path, raw, value,
                                                                                        why):
    """Issue 15: the attribute writes' bodies streamed to Orion unchecked: 1e400 reached it as Infinity,
    and nesting was not capped. They are now read and checked, then forwarded as sent."""
    r = await rig.call(method, path, "alice", data=(raw % value).encode(), headers={"Content-Type": "application/json"})
    assert r.status == 400, r.body
    assert r.json()["error"] == "ParseError" and why in r.json()["description"]
    assert not rig.upstream_saw(method, path)


async def test_a_checked_attribute_write_is_forwarded_as_sent_and_a_text_value_is_not_parsed(rig):
    sent = b'{ "temperature" : {"type": "Number", "value": 21.50} }'
    r = await rig.call("PATCH", "/v2/entities/a-1/attrs", "alice", data=sent,
                       headers={"Content-Type": "application/json"})
    assert r.status == 204, r.body
    assert rig.upstream_saw("PATCH", "/v2/entities/a-1/attrs")[-1].body == sent
    r = await rig.call("PUT", "/v2/entities/a-1/attrs/temperature/value", "alice", data=b"NaN-ish text",
                       headers={"Content-Type": "text/plain"})
    assert r.status == 204, r.body


async def test_a_valid_surrogate_pair_and_a_big_finite_number_pass(rig):
    body = b'{"actionType": "update", "entities": [{"id": "a-1", "type": "Thermometer", ' \
           b'"label": {"type": "Text", "value": "\\ud83d\\ude00"}, "big": {"type": "Number", "value": 1e308}}]}'
    r = await rig.call("POST", "/v2/op/update", "alice", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 204, r.body
    sent = json.loads(rig.upstream_saw("POST", "/v2/op/update")[-1].body)
    assert sent["entities"][0]["label"]["value"] == "\U0001F600" and sent["entities"][0]["big"]["value"] == 1e308


async def test_ownership_api_refuses_deep_bodies_in_its_own_shape(tmp_path, oidc):
    standin = NgsiStandin()
    await standin.start()
    services, tokens = await build_services(gateway_config(standin.url, tmp_path), oidc)
    gateway = HttpGateway(services, create_api_app(services))
    await gateway.start()
    try:
        body = json.dumps({"id": "d-1", "type": "Thermometer", "location": {"label": nested(40, "x")}})
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{gateway.port}/api/v1/devices", data=body, headers={
                    "Authorization": f"Bearer {tokens['alice']}", "Content-Type": "application/json"}) as r:
                reply = await r.json()
                assert r.status == 400, reply
        assert reply["error"]["code"] == "invalid_json" and "nested deeper than 32" in reply["error"]["message"]
    finally:
        await gateway.stop()
        await close_services(services)
        await standin.stop()


# --------------------------------------------------------------------------- subscription listing


OTHERS = 2500   # the tenant's subscriptions made by others: 3 pages of Orion's 1,000


def _seed_foreign_subscriptions(rig: HttpRig, n: int) -> None:
    subs = rig.standin.tenant("").subscriptions
    for i in range(n):
        sub_id = f"{i:024x}"
        subs[sub_id] = {"id": sub_id, "subject": {"entities": [{"id": "b-1"}]}, "status": "active",
                        "notification": {"http": {"url": "http://93.184.216.34/n"}}}


async def test_listing_costs_orion_what_the_caller_owns_not_the_tenant_list(rig):
    _seed_foreign_subscriptions(rig, OTHERS)
    mine = [await _subscribe(rig, "alice", subscription("a-1")) for _ in range(3)]
    rig.standin.recorded.clear()

    def upstream_reads() -> tuple[int, int]:
        listings = len(rig.upstream_saw("GET", "/v2/subscriptions"))
        by_id = len([r for r in rig.upstream_saw("GET") if r.path.startswith("/v2/subscriptions/")])
        rig.standin.recorded.clear()
        return listings, by_id

    r = await rig.call("GET", "/v2/subscriptions?limit=1", "alice")
    assert [s["id"] for s in r.json()] == mine[:1]
    first = upstream_reads()
    r = await rig.call("GET", "/v2/subscriptions?limit=1&offset=1&options=count", "alice")
    assert [s["id"] for s in r.json()] == mine[1:2] and r.headers["Fiware-Total-Count"] == "3"
    counted = upstream_reads()
    r = await rig.call("GET", "/v2/subscriptions", "alice")
    assert [s["id"] for s in r.json()] == mine        # creation order, as Orion lists them
    everything = upstream_reads()
    print(f"\nGET /v2/subscriptions for a caller with 3 of {OTHERS + 3} subscriptions: upstream requests "
          f"(listings, by id): limit=1 {first}, options=count {counted}, default {everything}; "
          f"before: {OTHERS // 1000 + 1} listing pages of 1,000 on every call")
    assert first == (0, 1) and counted == (0, 3) and everything == (0, 3)
    # someone who owns nothing costs Orion nothing
    r = await rig.call("GET", "/v2/subscriptions?options=count", "bob")
    assert r.json() == [] and r.headers["Fiware-Total-Count"] == "0" and upstream_reads() == (0, 0)


async def test_a_recorded_subscription_orion_lost_is_left_out_and_not_counted(rig):
    mine = [await _subscribe(rig, "alice", subscription("a-1")) for _ in range(3)]
    del rig.standin.tenant("").subscriptions[mine[1]]
    r = await rig.call("GET", "/v2/subscriptions?options=count&limit=2", "alice")
    assert [s["id"] for s in r.json()] == [mine[0], mine[2]] and r.headers["Fiware-Total-Count"] == "2"


async def test_orion_failing_a_subscription_read_is_a_502(rig):
    await _subscribe(rig, "alice", subscription("a-1"))
    await rig.standin.stop()
    r = await rig.call("GET", "/v2/subscriptions", "alice")
    assert r.status == 502 and r.json()["error"] == "BadGateway"


# --------------------------------------------------------------------------- notification targets


class Receiver:
    """An internal notification receiver on loopback, which an operator allow-lists."""

    def __init__(self):
        self.got: list[tuple[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        async def notified(request: web.Request) -> web.Response:
            self.got.append((request.method, request.path))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", notified)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def notify_rig(tmp_path, oidc):
    """The rig with an allow-list holding the receiver, and (an operator's mistake) Orion's own address."""
    standin, receiver = NgsiStandin(), Receiver()
    await standin.start()
    await receiver.start()
    allow = [f"http://127.0.0.1:{receiver.port}/notify", f"http://127.0.0.1:{standin.port}"]
    services, tokens = await build_services(gateway_config(standin.url, tmp_path, notification_allowlist=allow),
                                            oidc)
    gateway = HttpGateway(services)
    await gateway.start()
    session = aiohttp.ClientSession()
    r = HttpRig(standin, gateway, services, tokens, session)
    await populate(r)
    try:
        yield r, receiver
    finally:
        await session.close()
        await gateway.stop()
        await close_services(services)
        await receiver.stop()
        await standin.stop()


def _custom(entity: str, url: str, method: str, payload: dict) -> dict:
    return {"subject": {"entities": [{"id": entity, "type": "Thermometer"}]},
            "notification": {"httpCustom": {"url": url, "method": method, "json": payload}}}


async def test_a_notification_aimed_at_orion_cannot_patch_another_users_entity(notify_rig):
    rig, receiver = notify_rig
    b1_before = json.dumps(rig.standin.tenant("").entities["b-1"], sort_keys=True)
    attack = _custom("a-1", f"{rig.standin.url}/v2/entities/b-1/attrs", "PATCH",
                     {"temperature": {"type": "Number", "value": -273}})
    r = await rig.call("POST", "/v2/subscriptions", "alice", json_body=attack)
    assert r.status == 403 and "context broker itself" in r.json()["description"], r.body
    # the same through a name for the same address, and through a PATCH of a subscription alice owns
    attack["notification"]["httpCustom"]["url"] = f"http://localhost:{rig.standin.port}/v2/entities/b-1/attrs"
    assert (await rig.call("POST", "/v2/subscriptions", "alice", json_body=attack)).status == 403
    legit = await _subscribe(rig, "alice", _custom("a-1", f"http://127.0.0.1:{receiver.port}/notify/a-1", "POST",
                                                    {"changed": "a-1"}))
    r = await rig.call("PATCH", f"/v2/subscriptions/{legit}", "alice", json_body={"notification": {
        "httpCustom": {"url": f"{rig.standin.url}/v2/entities/b-1/attrs", "method": "PATCH"}}})
    assert r.status == 403
    # alice writes her own entity: Orion notifies the receiver, and nothing else
    assert (await rig.call("PATCH", "/v2/entities/a-1/attrs", "alice",
                           json_body={"temperature": {"type": "Number", "value": 30}})).status == 204
    assert receiver.got == [("POST", "/notify/a-1")]
    assert [n[2] for n in rig.standin.app[NOTIFIED]] == [f"http://127.0.0.1:{receiver.port}/notify/a-1"]
    assert json.dumps(rig.standin.tenant("").entities["b-1"], sort_keys=True) == b1_before


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{receiver}/other",          # the listed receiver's host and port, outside its path
    "http://127.0.0.1:{receiver}/notify/../v2",   # climbing out of the path
    "http://127.0.0.1:9100/metrics",              # the receiver's host, another port
    "https://127.0.0.1:{receiver}/notify",        # another scheme
])
async def test_an_allow_listed_receiver_opens_nothing_else_on_its_host(notify_rig, url):
    rig, receiver = notify_rig
    target = url.format(receiver=receiver.port)
    r = await rig.call("POST", "/v2/subscriptions", "alice", json_body=subscription("a-1", target))
    assert r.status == 403, r.body
    assert not rig.upstream_saw("POST", "/v2/subscriptions")


@pytest.mark.parametrize("query,description", [
    ("type=Thermometer&type=Valve", "repeated query parameter"),   # Orion and keygate could read different ones
    ("type=Thermometer&limit=1&type=Valve", "repeated query parameter"),
    ("q=%ff", "invalid query string"),                              # not UTF-8
    ("&".join(f"p{i}=1" for i in range(65)), "invalid query string"),   # past the 64 fields parsed
    ("&".join(f"p{i}=1" for i in range(40)) + "&" + "x" * 300 + "=1&p0=2", "repeated query parameter"),  # a long one
])
async def test_a_query_that_could_be_read_two_ways_is_refused_every_time(rig, query, description):
    """Each query is parsed once and remembered (when short): the refusal must be remembered with
    it, the second request refused as the first, and a query past what is remembered checked the same."""
    for _ in range(3):
        r = await rig.call("GET", f"/v2/entities?{query}", "alice")
        assert r.status == 400 and r.json() == {"error": "BadRequest", "description": description}, r
    assert not rig.upstream_saw()


async def test_a_query_is_forwarded_in_its_order_every_time(rig):
    for _ in range(3):
        r = await rig.call("GET", "/v2/entities?type=Thermometer&options=keyValues&limit=5", "alice")
        assert r.status == 200, r
    queries = [seen.query for seen in rig.upstream_saw("GET")]
    # (the list is narrowed to alice's own ids, after what she asked)
    assert len(queries) == 3 and len(set(queries)) == 1, queries
    assert queries[0].startswith("type=Thermometer&options=keyValues&limit=5&"), queries


async def test_the_same_request_is_planned_for_each_caller_every_time(rig):
    """A request's NGSI analysis is kept (a pure function of method, path and query); what each
    caller may do with it is not: alternating callers on the same request get their own answers."""
    seen = []
    for who in ("alice", "bob", "alice", "carol", "bob", None, "alice"):
        seen.append((await rig.call("GET", "/v2/entities/a-1", who)).status)
    assert seen == [200, 403, 200, 403, 403, 401, 200], seen
    seen = []
    for who in ("bob", "carol", "alice", "carol"):   # bob's b-1: carol may read it (a delegation)
        seen.append((await rig.call("GET", "/v2/entities/b-1/attrs?options=keyValues", who)).status)
    assert seen == [200, 200, 403, 200], seen


def _cached_validations() -> int:
    from proxy.identity.tokens import VALIDATIONS

    return VALIDATIONS.counts[("ok", "cached")]


async def test_a_head_seen_before_is_refused_once_its_token_is_no_longer_valid(rig):
    """The lean server keeps what the gateway derived from a head's bytes; since issue 18 the
    bearer token's digest is among it, so that the same head is known without parsing its
    Authorization header and hashing the token again. The verdict is not kept: the validator's
    cache judges the token on every request (exp, its signing key), and a head whose token has
    expired is refused like any other."""
    before = _cached_validations()
    for _ in range(3):
        assert (await rig.call("GET", "/v2/entities/a-1", "alice")).status == 200
    assert _cached_validations() >= before + 2
    assert any("bearer-digest" in memo for _, memo in rig.gateway.lean_connections.heads.values())
    tokens = rig.services.tokens
    real = tokens.clock
    tokens.clock = lambda: real() + 10 * 86400   # far past exp and any leeway
    try:
        expired = await rig.call("GET", "/v2/entities/a-1", "alice")
        assert expired.status == 401, expired
    finally:
        tokens.clock = real
    assert (await rig.call("GET", "/v2/entities/a-1", "alice")).status == 200


async def test_each_callers_request_is_audited_with_its_own_identity_and_resource(rig):
    """The attack (s30): the gateway's audit records are written by a key naming their body, and
    Outcomes.add handed the log its (decision, status) counter's key in place of the record's: bob's
    allowed GET of b-1 was written as alice's GET of a-1 (her identity, resource and devices), and
    every 403 as the first 403. The rig's MemoryAudit ignores keys, so the gateway here writes to a
    real AuditLog."""
    stream = io.StringIO()
    rig.gateway.app[GATEWAY_KEY].outcomes.audit = AuditLog(stream)
    calls = [("alice", "/v2/entities/a-1"), ("bob", "/v2/entities/b-1"), ("carol", "/v2/entities/a-1"),
             ("bob", "/v2/entities/a-1"), ("alice", "/v2/entities/a-1")]
    for who, path in calls:
        await rig.call("GET", path, who)
    await asyncio.sleep(0.05)   # the records of a turn are written at its end
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["identity"]["username"], r["resource"], r["decision"]) for r in lines] == [
        ("alice", "/v2/entities/a-1", "allow"), ("bob", "/v2/entities/b-1", "allow"),
        ("carol", "/v2/entities/a-1", "deny"), ("bob", "/v2/entities/a-1", "deny"),
        ("alice", "/v2/entities/a-1", "allow")], lines
