"""Hypothesis against the running gateway: whatever arrives, the answer is never a 500.

Requests are written byte for byte on a socket (so odd paths are not tidied
by a client library) with paths built from NGSI segments and tricks, odd
queries, tenant headers, every kind of credential, and bodies that are
random JSON, NGSI-shaped JSON or garbage. Bounded to a few hundred examples.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.integration.test_http_gateway import rig  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration

SEGMENTS = ["v2", "entities", "a-1", "b-1", "orphan", "attrs", "temperature", "value", "op", "update", "query",
            "subscriptions", "registrations", "types", "version", "admin", "log", "statistics", "cache",
            "5f0c1e2d3b4a596877665544", "..", ".", "", "%2F", "%2e%2e", "%00", "%ZZ", "%C3%A9", "a%20b", "*", "~",
            "a;b", "%3F", "%23", "x" * 300]
VALID_PATHS = ["/v2/entities", "/v2/entities/a-1", "/v2/entities/b-1/attrs", "/v2/entities/a-2/attrs/temperature",
               "/v2/entities/a-1/attrs/temperature/value", "/v2/op/update", "/v2/op/query", "/v2/subscriptions",
               "/v2/subscriptions/5f0c1e2d3b4a596877665544", "/version", "/v2/types", "/v2/registrations"]
QUERY_KEYS = ["id", "idPattern", "type", "q", "limit", "offset", "options", "attrs", "typePattern", "orderBy",
              "zzz", ""]
QUERY_VALUES = ["a-1", ".*", "(a+)+$", "count", "upsert", "keyValues", "-1", "99999", "x" * 300, "%FF", "a,b,,",
                "Thermometer", "[", "^b-", ""]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "type", "idPattern", "entities", "actionType", "subject", "notification", "http",
                         "url", "mqtt", "topic", "attrs", "value", "expression", "q"]) | st.text(max_size=5),
        inner, max_size=4),
    max_leaves=12)

ngsi_bodies = st.one_of(
    st.fixed_dictionaries({"actionType": st.sampled_from(["append", "update", "delete", "replace", "x"]),
                           "entities": st.lists(st.fixed_dictionaries({"id": st.sampled_from(["a-1", "b-1", "n"]),
                                                                       "type": st.just("T")}), max_size=3)}),
    st.fixed_dictionaries({"subject": st.fixed_dictionaries({"entities": st.lists(
        st.one_of(st.fixed_dictionaries({"id": st.sampled_from(["a-1", "b-1", "a b"])}),
                  st.fixed_dictionaries({"idPattern": st.sampled_from([".*", "(a*)*"])})), max_size=2)}),
        "notification": st.dictionaries(st.sampled_from(["http", "httpCustom", "mqtt"]), st.fixed_dictionaries(
            {"url": st.sampled_from(["http://93.184.216.34/", "http://127.0.0.1/", "mqtt://[::1]", "ftp://x",
                                     "http://[bad", "http://a@b/", "http://x:99999/"]),
             "topic": st.sampled_from(["devices/a-1/cmd", "devices/b-1/cmd", "#"])}), min_size=1, max_size=2)}),
    st.fixed_dictionaries({"id": st.sampled_from(["a-1", "b-1", "new", 5, ""]), "type": st.just("T")}),
    st.fixed_dictionaries({"entities": st.lists(st.fixed_dictionaries(
        {"idPattern": st.sampled_from([".*", "^a", "(", "(x+)+"])}), max_size=2)}),
)

bodies = st.one_of(st.just(b""), json_values.map(lambda v: json.dumps(v).encode()),
                   ngsi_bodies.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64),
                   st.just(b'{"id": "a-1", "id": "b-1"}'), st.just(b"[NaN]"))


@st.composite
def requests(draw):
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]))
    if draw(st.booleans()):
        path = draw(st.sampled_from(VALID_PATHS))
    else:
        parts = draw(st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=6))
        if draw(st.booleans()):
            parts = ["v2", "entities"] + parts[:3]
        path = "/" + "/".join(parts)
    pairs = draw(st.lists(st.tuples(st.sampled_from(QUERY_KEYS), st.sampled_from(QUERY_VALUES)), max_size=3,
                          unique_by=lambda kv: kv[0]))
    query = "&".join(f"{k}={v}" for k, v in pairs)
    headers = {}
    who = draw(st.sampled_from(["alice", "bob", "carol", "admin", "a-1", None, "garbage", "basic-garbage"]))
    if draw(st.booleans()):
        headers["Fiware-Service"] = draw(st.sampled_from(["", "SmartCity", "bad name", "x" * 60, "é"]))
    if draw(st.booleans()):
        headers["Fiware-ServicePath"] = draw(st.sampled_from(["/", "/#", "/a/b", "a", "/a,/b", "//", "/" + "x" * 60]))
    if draw(st.booleans()):
        headers["X-Keygate-User"] = "admin"
    return method, path + ("?" + query if query else ""), who, headers, draw(bodies)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
async def test_no_request_makes_the_gateway_fail(rig, request):
    method, target, who, headers, body = request
    if who == "garbage":
        headers["Authorization"] = "Bearer eyJ.garbage.x"
    elif who == "basic-garbage":
        headers["Authorization"] = "Basic YTpi"
    else:
        headers.update(rig.auth(who))
    head = f"{method} {target} HTTP/1.1\nHost: gw\nConnection: close\nContent-Type: application/json\n"
    head += "".join(f"{k}: {v}\n" for k, v in headers.items())
    head += f"Content-Length: {len(body)}"
    reply = await rig.raw(head.encode("utf-8").decode("latin-1"), body)
    event(f"status {reply.status}")
    assert reply.status < 500 or reply.status in (502, 504), (method, target, who, headers, body, reply)
    if reply.status >= 400 and method != "HEAD" and reply.body:
        assert set(json.loads(reply.body)) == {"error", "description"}
