"""NGSI request analysis (sans-IO): what each request is, before anyone decides on it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.http import ngsi
from proxy.http.ngsi import NO_BODY, NgsiRequest, analyse
from proxy.http.patterns import UnsafePattern, compile_id_pattern


def a(method: str, path: str, body=NO_BODY, query=()):
    return analyse(NgsiRequest(method, path, tuple(query), body))


@pytest.mark.parametrize("path", ["/v2/entities/t1", "/v2/entities/t1/attrs", "/v2/entities/t1/attrs/temp",
                                  "/v2/entities/t1/attrs/temp/value"])
@pytest.mark.parametrize("method,access", [("GET", "read"), ("HEAD", "read"), ("POST", "write"),
                                           ("PATCH", "write"), ("PUT", "write"), ("DELETE", "write")])
def test_entity_paths_map_to_one_device(path, method, access):
    assert a(method, path) == ngsi.EntityOp("t1", access)


@pytest.mark.parametrize("path", ["/v2/entities/t1/foo", "/v2/entities/t1/attrs/temp/metadata",
                                  "/v2/entities/t1/attrs/temp/value/x", "/v2/entities/t%201"])
def test_other_entity_shapes_are_refused(path):
    assert isinstance(a("GET", path), ngsi.Reject)


@pytest.mark.parametrize("bad_id", ["a b", "a?b", "a#b", "a&b", "a<b", "a'b", "a=b", "a;b", "a(b", "a%2Fb",
                                    "é", "x" * 257, "a\x00b"])
def test_ids_outside_orions_rules_are_refused(bad_id):
    assert isinstance(a("GET", f"/v2/entities/{bad_id}"), ngsi.Reject)
    assert isinstance(a("POST", "/v2/entities", {"id": bad_id, "type": "T"}), ngsi.Reject)


def test_creation_takes_the_id_from_the_body():
    assert a("POST", "/v2/entities", {"id": "t1", "type": "T"}) == ngsi.CreateEntity("t1")
    assert a("POST", "/v2/entities", {"type": "T"}) == ngsi.Reject(400, "BadRequest", "entity id is missing")
    assert a("POST", "/v2/entities", [{"id": "t1"}]).status == 400
    assert a("POST", "/v2/entities").status == 411
    assert a("POST", "/v2/entities", {"id": 5}).status == 400


def test_listing_and_methods_on_the_collection():
    assert a("GET", "/v2/entities") == ngsi.ListEntities()
    assert a("DELETE", "/v2/entities").status == 405


def test_batch_update_maps_each_action_to_its_single_request():
    body = {"actionType": "append", "entities": [{"id": "a", "type": "T"}, {"id": "b", "type": "T"}]}
    assert a("POST", "/v2/op/update", body) == ngsi.BatchUpdate((("a", "POST"), ("b", "POST")))
    body["actionType"] = "delete"
    assert a("POST", "/v2/op/update", body) == ngsi.BatchUpdate((("a", "DELETE"), ("b", "DELETE")))
    body["actionType"] = "explode"
    assert a("POST", "/v2/op/update", body).status == 400
    for odd in (["update"], {"a": 1}, None, 3):   # not a string: a 400, not an unhashable-key crash
        body["actionType"] = odd
        assert a("POST", "/v2/op/update", body).status == 400


def test_batch_update_refuses_patterns_and_missing_ids():
    assert a("POST", "/v2/op/update", {"actionType": "update", "entities": [{"idPattern": ".*"}]}).status == 400
    assert a("POST", "/v2/op/update", {"actionType": "update", "entities": [{"type": "T"}]}).status == 400
    assert a("POST", "/v2/op/update", {"actionType": "update"}).status == 400


def test_op_query_selectors():
    body = {"entities": [{"id": "a", "type": "T"}, {"idPattern": "^b"}]}
    assert a("POST", "/v2/op/query", body) == ngsi.QueryEntities(
        (("a", None, (("type", "T"),)), (None, "^b", ())))
    assert a("POST", "/v2/op/query", {"attrs": ["x"]}) == ngsi.QueryEntities(None)
    assert a("POST", "/v2/op/query", {"entities": [{"id": "a", "idPattern": "b"}]}).status == 400


def test_subscription_creation_collects_subjects_and_targets():
    body = {"subject": {"entities": [{"id": "a"}, {"idPattern": ".*"}]},
            "notification": {"http": {"url": "http://x.example/n"},
                             "mqtt": {"url": "mqtt://b.example:1883", "topic": "devices/a/cmd"}}}
    got = a("POST", "/v2/subscriptions", body)
    assert got == ngsi.CreateSubscription(ngsi.SubscriptionBody(
        ("a",), True, (ngsi.NotificationTarget("http", "http://x.example/n"),
                       ngsi.NotificationTarget("mqtt", "mqtt://b.example:1883", "devices/a/cmd"))))


def test_subscription_creation_needs_subject_and_notification():
    assert a("POST", "/v2/subscriptions", {"notification": {"http": {"url": "http://x"}}}).status == 400
    assert a("POST", "/v2/subscriptions", {"subject": {"entities": [{"id": "a"}]}}).status == 400
    assert a("POST", "/v2/subscriptions", {"subject": {"entities": [{"id": "a"}]},
                                           "notification": {"http": {"url": 5}}}).status == 400


def test_subscription_ids_are_orions_shape():
    sid = "5f0c1e2d3b4a596877665544"
    assert a("GET", f"/v2/subscriptions/{sid}") == ngsi.SubscriptionOp(sid, "GET")
    assert a("DELETE", f"/v2/subscriptions/{sid}") == ngsi.SubscriptionOp(sid, "DELETE")
    assert a("GET", "/v2/subscriptions/not-an-id").status == 404
    patch = a("PATCH", f"/v2/subscriptions/{sid}", {"notification": {"http": {"url": "http://10.0.0.1/"}}})
    assert patch.body.targets == (ngsi.NotificationTarget("http", "http://10.0.0.1/"),)
    assert a("PUT", f"/v2/subscriptions/{sid}").status == 405


@pytest.mark.parametrize("path", ["/v2/registrations", "/v2/types", "/version", "/admin/log", "/log/level",
                                  "/statistics", "/cache/statistics", "/v2", "/v1/contextEntities/x"])
def test_everything_else_is_for_the_policy(path):
    assert a("GET", path) == ngsi.PolicyOnly()


def test_tenant_is_lower_cased_and_checked():
    assert ngsi.tenant_of("SmartCity") == "smartcity"
    assert ngsi.tenant_of(None) == ""
    assert isinstance(ngsi.tenant_of("bad-tenant!"), ngsi.Reject)
    assert isinstance(ngsi.tenant_of("x" * 51), ngsi.Reject)


def test_service_path_grammar():
    assert ngsi.check_service_path("/a/b", query=False) is None
    assert ngsi.check_service_path("/a/#,/b", query=True) is None
    assert ngsi.check_service_path("/a/#", query=False) is not None
    assert ngsi.check_service_path("/a,/b", query=False) is not None
    assert ngsi.check_service_path("a", query=True) is not None
    assert ngsi.check_service_path("/a b", query=True) is not None


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)*b", "(.*)*", r"(a)\1", "(?=x)y", "(?!x)y",
                                     "a*b*c*d*", "x" * 257, "(", "(ab|cd)+"])
def test_dangerous_or_broken_id_patterns_are_refused(pattern):
    with pytest.raises(UnsafePattern):
        compile_id_pattern(pattern)


@pytest.mark.parametrize("pattern", [".*", "^thermo-.*", "^room-[0-9]+-floor-[0-9]+$", "a|b", "(x|y)-[a-z]+"])
def test_ordinary_id_patterns_pass(pattern):
    compile_id_pattern(pattern)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=10)
segments = st.sampled_from(["v2", "entities", "op", "update", "query", "subscriptions", "attrs", "value", "t1",
                            "5f0c1e2d3b4a596877665544", "registrations", "types"])


@settings(max_examples=400, deadline=None)
@given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
       parts=st.lists(segments, max_size=6), body=st.one_of(st.just(NO_BODY), json_values),
       sub=st.fixed_dictionaries({"subject": json_values, "notification": json_values}),
       use_sub=st.booleans())
def test_analysis_is_total(method, parts, body, sub, use_sub):
    """Any request, however odd its body, gets an action or a Reject; nothing raises."""
    action = a(method, "/" + "/".join(parts), sub if use_sub else body)
    assert action is not None
