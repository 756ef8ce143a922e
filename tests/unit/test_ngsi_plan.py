"""Planning (sans-IO): from an analysed request, the shipped policies and ownership facts to
refuse / answer / forward-rewritten, without sockets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.facts import Delegation, DeviceFacts, Principal, StaticFacts
from proxy.http import ngsi
from proxy.http import plan as planning
from proxy.http.ngsi import NO_BODY, NgsiRequest
from proxy.identity.model import ANONYMOUS, Identity
from proxy.policy import Policies

ROOT = Path(__file__).resolve().parents[2]

ALICE = Identity(kind="user", sub="s-alice", username="alice", method="token", roles=frozenset({"iot-user"}))
BOB = Identity(kind="user", sub="s-bob", username="bob", method="token", roles=frozenset({"iot-user"}))
ADMIN = Identity(kind="user", sub="s-admin", username="admin", method="token", roles=frozenset({"iot-admin"}))


class Subscriptions:
    def __init__(self, owned: dict[tuple[str, str], str]):
        self.owned = owned

    def subscription_owner(self, sid: str, service: str) -> str | None:
        return self.owned.get((sid, service))

    def subscriptions_of(self, sub: str, service: str) -> set[str]:
        return {i for (i, s), o in self.owned.items() if o == sub and s == service}


SID = "5f0c1e2d3b4a596877665544"


@pytest.fixture
def facts():
    _policies.clear()
    return StaticFacts([
        DeviceFacts("a-1", "s-alice", "alice"),
        DeviceFacts("a-2", "s-alice", "alice", public=True),
        DeviceFacts("b-1", "s-bob", "bob",
                    delegations=(Delegation("d1", "b-1", Principal.user("s-alice", "alice"), "read"),)),
        DeviceFacts("c-1", "s-alice", "alice", service="city"),
    ])


_policies: dict[int, Policies] = {}   # one compiled set per facts object (parsing YAML is the slow part)


def decide(facts, identity, method, path, body=NO_BODY, query=(), tenant="", default_service="",
           subs=None):
    req = NgsiRequest(method, path, tuple(query), body)
    policies = _policies.get(id(facts))
    if policies is None:
        policies = _policies[id(facts)] = Policies.from_dir(ROOT / "policies", facts)
    ctx = planning.Context(identity, tenant, default_service, identity.has_role("iot-admin"), facts, policies,
                           Subscriptions(subs or {}))
    return planning.plan(req, ngsi.analyse(req), ctx)


def test_listing_is_rewritten_to_readable_ids(facts):
    p = decide(facts, ALICE, "GET", "/v2/entities", query=[("type", "T"), ("options", "count")])
    assert isinstance(p, planning.Forward)
    assert dict(p.query) == {"type": "T", "options": "count", "id": "a-1,a-2,b-1"}
    p = decide(facts, BOB, "GET", "/v2/entities", query=[("idPattern", "^a")])
    assert dict(p.query) == {"id": "a-2"}


def test_listing_in_another_tenant_sees_only_that_tenant(facts):
    p = decide(facts, ALICE, "GET", "/v2/entities", tenant="city")
    assert dict(p.query) == {"id": "c-1"}


def test_empty_listing_is_answered_here(facts):
    p = decide(facts, ALICE, "GET", "/v2/entities", query=[("options", "count"), ("id", "zzz")])
    assert isinstance(p, planning.Answer) and p.body == [] and p.headers == (("Fiware-Total-Count", "0"),)
    assert p.rule   # the rule that opened the endpoint, for the audit


def test_dangerous_type_patterns_never_reach_orion(facts):
    p = decide(facts, ALICE, "GET", "/v2/entities", query=[("typePattern", "(a+)+$")])
    assert isinstance(p, planning.Deny) and p.status == 400
    p = decide(facts, ALICE, "POST", "/v2/op/query", {"entities": [{"idPattern": ".*", "typePattern": "(a|a)*"}]})
    assert isinstance(p, planning.Deny) and p.status == 400


def test_dangerous_value_patterns_in_q_never_reach_orion(facts):
    p = decide(facts, ALICE, "GET", "/v2/entities", query=[("q", "temperature>1;name~=(a+)+$")])
    assert isinstance(p, planning.Deny) and p.status == 400
    p = decide(facts, ALICE, "POST", "/v2/op/query", {"expression": {"mq": "temperature.unit~='(x|x)*y'"}})
    assert isinstance(p, planning.Deny) and p.status == 400
    p = decide(facts, ALICE, "GET", "/v2/entities", query=[("q", "name~=^room")])
    assert isinstance(p, planning.Forward)


def test_admin_listing_goes_through_unchanged(facts):
    p = decide(facts, ADMIN, "GET", "/v2/entities", query=[("idPattern", ".*")])
    assert isinstance(p, planning.Forward) and p.query == (("idPattern", ".*"),)


def test_long_id_lists_become_an_op_query(facts):
    for i in range(400):
        facts.put(DeviceFacts(f"device-with-a-rather-long-id-{i:04d}", "s-bob", "bob"))
    p = decide(facts, BOB, "GET", "/v2/entities",
               query=[("type", "T"), ("q", "temperature>20"), ("attrs", "temperature"), ("limit", "5")])
    assert isinstance(p, planning.Forward) and p.method == "POST" and p.path == "/v2/op/query"
    body = json.loads(p.body)
    assert len(body["entities"]) == 402 and body["entities"][0]["type"] == "T"
    assert body["expression"] == {"q": "temperature>20"} and body["attrs"] == ["temperature"]
    assert dict(p.query) == {"limit": "5"}


def test_op_query_keeps_the_rest_of_the_body(facts):
    body = {"entities": [{"idPattern": ".*", "type": "T"}], "attrs": ["temperature"],
            "expression": {"q": "temperature>1"}}
    p = decide(facts, BOB, "POST", "/v2/op/query", body)
    sent = json.loads(p.body)
    assert sent["entities"] == [{"id": "a-2", "type": "T"}, {"id": "b-1", "type": "T"}]
    assert sent["attrs"] == ["temperature"] and sent["expression"] == {"q": "temperature>1"}


def test_batch_refusal_names_no_entity(facts):
    body = {"actionType": "update", "entities": [{"id": "a-1"}, {"id": "b-1"}]}
    p = decide(facts, ALICE, "POST", "/v2/op/update", body)
    assert isinstance(p, planning.Deny) and p.status == 403
    assert "a-1" not in p.description and "b-1" not in p.description
    assert p.devices == ("a-1", "b-1")      # the audit log does name them


def test_creation_outside_the_devices_tenant_is_refused(facts):
    assert isinstance(decide(facts, ALICE, "POST", "/v2/entities", {"id": "c-1"}), planning.Deny)
    assert isinstance(decide(facts, ALICE, "POST", "/v2/entities", {"id": "c-1"}, tenant="city"), planning.Forward)
    # a forced tenant is the tenant of devices recorded without one
    assert isinstance(decide(facts, ALICE, "POST", "/v2/entities", {"id": "a-1"}, tenant="city",
                             default_service="City"), planning.Forward)


def test_subscriptions_of_others_look_absent(facts):
    subs = {(SID, ""): "s-alice"}
    p = decide(facts, BOB, "DELETE", f"/v2/subscriptions/{SID}", subs=subs)
    assert isinstance(p, planning.Deny) and p.status == 404
    p = decide(facts, ALICE, "DELETE", f"/v2/subscriptions/{SID}", subs=subs)
    assert isinstance(p, planning.Forward) and p.after == "forget_subscription"
    p = decide(facts, ALICE, "GET", "/v2/subscriptions", subs=subs, query=[("limit", "5"), ("options", "count")])
    assert p.after == "filter_subscriptions" and p.keep == {SID} and p.page == (5, 0, True)
    p = decide(facts, BOB, "GET", "/v2/subscriptions", subs=subs)
    assert isinstance(p, planning.Answer) and p.body == []


def test_subscription_targets_go_to_the_ssrf_check(facts):
    body = {"subject": {"entities": [{"id": "a-1"}]}, "notification": {"http": {"url": "http://x.example/"}}}
    p = decide(facts, ALICE, "POST", "/v2/subscriptions", body)
    assert p.after == "record_subscription"
    assert p.targets == (ngsi.NotificationTarget("http", "http://x.example/"),)


def test_what_is_recorded_for_re_checking(facts):
    # The checked subject goes with the subscription; a PATCH that moves the subject updates it.
    target = {"http": {"url": "http://x.example/"}}
    p = decide(facts, ALICE, "POST", "/v2/subscriptions", {"subject": {"entities": [{"id": "a-1"}]},
                                                           "notification": target})
    assert p.devices == ("a-1",) and not p.unrestricted
    p = decide(facts, ADMIN, "POST", "/v2/subscriptions", {"subject": {"entities": [{"idPattern": ".*"}]},
                                                           "notification": target})
    assert p.after == "record_subscription" and p.unrestricted
    subs = {(SID, ""): "s-alice"}
    p = decide(facts, ALICE, "PATCH", f"/v2/subscriptions/{SID}", {"subject": {"entities": [{"id": "a-2"}]}},
               subs=subs)
    assert p.after == "update_subscription" and p.devices == ("a-2",)
    p = decide(facts, ALICE, "PATCH", f"/v2/subscriptions/{SID}", {"throttling": 5}, subs=subs)
    assert isinstance(p, planning.Forward) and p.after is None


def test_anonymous_gets_nothing(facts):
    for method, path, body in (("GET", "/v2/entities", NO_BODY), ("GET", "/v2/entities/a-2", NO_BODY),
                               ("POST", "/v2/op/query", {}), ("GET", "/v2/subscriptions", NO_BODY)):
        p = decide(facts, ANONYMOUS, method, path, body)
        assert isinstance(p, planning.Deny), path


# --------------------------------------------------------------------------- properties

IDS = ["a-1", "a-2", "b-1", "c-1", "zz", "a b"]
json_leaf = st.none() | st.booleans() | st.integers() | st.sampled_from(IDS + [".*", "^a", "(a+)+", "T"])
json_any = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["id", "idPattern", "type", "entities", "actionType", "attrs", "expression", "q", "subject",
                     "notification", "http", "url"]), inner, max_size=4), max_leaves=12)
selector = st.dictionaries(st.sampled_from(["id", "idPattern", "type"]), st.sampled_from(IDS + [".*", "^b", "T"]),
                           min_size=1, max_size=2)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(who=st.sampled_from([ALICE, BOB, ANONYMOUS]),
       method=st.sampled_from(["GET", "POST", "PATCH", "PUT", "DELETE", "HEAD"]),
       path=st.sampled_from(["/v2/entities", "/v2/op/query", "/v2/op/update", "/v2/entities/b-1",
                             "/v2/entities/a-1/attrs", "/v2/subscriptions", f"/v2/subscriptions/{SID}",
                             "/v2/registrations", "/version"]),
       query=st.lists(st.tuples(st.sampled_from(["id", "idPattern", "type", "options", "limit", "q"]),
                                st.sampled_from(IDS + [".*", "^b", "count", "5", "a-1,b-1"])), max_size=3,
                      unique_by=lambda kv: kv[0]),
       body=st.one_of(st.just(NO_BODY), json_any, st.fixed_dictionaries({"entities": st.lists(selector, max_size=3)})),
       tenant=st.sampled_from(["", "city"]))
def test_no_plan_lets_a_non_admin_read_beyond_its_readable_set(facts, who, method, path, query, body, tenant):
    p = decide(facts, who, method, path, body, query, tenant=tenant)
    assert isinstance(p, (planning.Deny, planning.Answer, planning.Forward))
    readable = {"": {"ALICE": {"a-1", "a-2", "b-1"}, "BOB": {"a-2", "b-1"}},
                "city": {"ALICE": {"c-1"}, "BOB": set()}}[tenant].get(
        {ALICE: "ALICE", BOB: "BOB"}.get(who, ""), set())
    if not isinstance(p, planning.Forward):
        return
    assert not who.is_anonymous                       # nothing is open to anonymous callers
    if p.method == "GET" and p.path == "/v2/entities":
        ids = dict(p.query)["id"].split(",")
        assert ids and set(ids) <= readable
    if p.path == "/v2/op/query":
        entities = json.loads(p.body)["entities"]
        assert entities and all(set(e) - {"type", "typePattern"} == {"id"} for e in entities)
        assert {e["id"] for e in entities} <= readable
    if p.path.startswith("/v2/entities/") and p.devices:
        (device,) = p.devices
        assert device in readable if p.method in ("GET", "HEAD") else facts.device(device).owner_sub == who.sub
    assert p.path not in ("/v2/registrations", "/version")
