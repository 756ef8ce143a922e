"""The engine's concrete decisions: every subject, placeholder, deny-overrides, $ topics, HTTP."""

import time

import pytest

from proxy.facts import Delegation
from proxy.policy import NO_RULE, Decision, Verdict
from tests.unit.policy_helpers import anonymous, dev, device, facts, policies, service, to, user

SUBJECT_RULES = """
  - id: r-anyone
    subjects: [anyone]
    mqtt: {topics: ["s/anyone"], actions: [publish]}
  - id: r-anonymous
    subjects: [anonymous]
    mqtt: {topics: ["s/anonymous"], actions: [publish]}
  - id: r-role
    subjects: ["role:ops"]
    mqtt: {topics: ["s/role"], actions: [publish]}
  - id: r-client-role
    subjects: ["client-role:app:writer"]
    mqtt: {topics: ["s/client-role"], actions: [publish]}
  - id: r-user
    subjects: ["user:alice"]
    mqtt: {topics: ["s/user"], actions: [publish]}
  - id: r-group
    subjects: ["group:lab"]
    mqtt: {topics: ["s/group"], actions: [publish]}
  - id: r-scope
    subjects: ["scope:iot.write"]
    mqtt: {topics: ["s/scope"], actions: [publish]}
  - id: r-admin
    subjects: [admin]
    mqtt: {topics: ["s/admin"], actions: [publish]}
  - id: r-owner
    subjects: [owner]
    mqtt: {topics: ["owner/{device}"], actions: [publish, subscribe]}
  - id: r-device
    subjects: [device]
    mqtt: {topics: ["device/{device}"], actions: [publish]}
  - id: r-delegate
    subjects: [delegate]
    mqtt: {topics: ["delegate/{device}"], actions: [publish, subscribe]}
  - id: r-delegate-read
    subjects: ["delegate:read"]
    mqtt: {topics: ["delegate-read/{device}"], actions: [publish]}
  - id: r-delegate-write
    subjects: ["delegate:write"]
    mqtt: {topics: ["delegate-write/{device}"], actions: [subscribe]}
  - id: r-public
    subjects: [public]
    mqtt: {topics: ["public/{device}"], actions: [subscribe]}
"""


@pytest.fixture
def world():
    f = facts(dev("d1", "sub-alice"),
              dev("d2", "sub-bob", delegations=[("alice", "read"), ("group:lab", "write"), ("anonymous", "read")]),
              dev("d3", "sub-bob", public=True),
              dev("d4", "sub-bob",
                  delegations=[Delegation("x", "d4", to("alice"), "readwrite", expires_at=time.time() - 1)]))
    return policies(SUBJECT_RULES, f)


def pub(p, who, topic, **kw) -> Decision:
    return p.may_publish(who, topic, **kw)


@pytest.mark.parametrize("who,topic,allowed", [
    (user("alice"), "s/anyone", True),
    (device("d1"), "s/anyone", True),
    (anonymous, "s/anyone", False),              # anyone = authenticated only
    (anonymous, "s/anonymous", True),
    (user("alice"), "s/anonymous", False),       # anonymous = unauthenticated only
    (user("x", roles={"ops"}), "s/role", True),
    (user("x", roles={"ops2"}), "s/role", False),
    (user("x", client_roles={"ops"}), "s/role", False),     # a client role is not a realm role
    (user("x", client_roles={"app:writer"}), "s/client-role", True),
    (user("x", client_roles={"other:writer"}), "s/client-role", False),
    (user("x", roles={"app:writer"}), "s/client-role", False),
    (user("alice"), "s/user", True),
    (user("bob"), "s/user", False),
    (device("alice"), "s/user", False),          # a device named like a user is not that user
    (service("alice"), "s/user", True),          # a service account's username is its client id
    (user("x", groups={"lab"}), "s/group", True),
    (user("x", groups={"lab2"}), "s/group", False),
    (user("x", scopes={"iot.write"}), "s/scope", True),
    (user("x", scopes={"iot.read"}), "s/scope", False),
    (user("x", roles={"iot-admin"}), "s/admin", True),
    (user("x", roles={"admin"}), "s/admin", False),
])
def test_identity_subjects(world, who, topic, allowed):
    d = pub(world, who, topic)
    assert d.allowed is allowed, d
    if allowed:
        assert d.rule == "r-" + topic.split("/")[1]
    else:
        assert (d.rule, d.reason) == (None, NO_RULE)


def test_admin_subject_follows_the_configured_role():
    p = policies(SUBJECT_RULES, admin_role="platform-admin")
    assert p.may_publish(user("x", roles={"platform-admin"}), "s/admin").allowed
    assert not p.may_publish(user("x", roles={"iot-admin"}), "s/admin").allowed


@pytest.mark.parametrize("who,action,topic,allowed", [
    (user("alice"), "publish", "owner/d1", True),
    (user("bob"), "publish", "owner/d1", False),
    (user("alice"), "publish", "owner/nosuch", False),      # unknown device: no relation
    (device("d1"), "publish", "owner/d1", False),           # a device does not own itself
    (anonymous, "publish", "owner/d1", False),
    (device("d1"), "publish", "device/d1", True),
    (device("d1"), "publish", "device/d2", False),
    (user("d1"), "publish", "device/d1", False),            # a user named like the device is not it
    (user("alice"), "receive", "delegate/d2", True),        # read delegation, read action
    (user("alice"), "publish", "delegate/d2", False),       # read delegation, write action
    (user("x", groups={"lab"}), "publish", "delegate/d2", True),  # group write delegation
    (user("x", groups={"lab"}), "receive", "delegate/d2", False),
    (anonymous, "receive", "delegate/d2", True),            # delegated to anonymous
    (user("bob2"), "receive", "delegate/d2", False),        # "anonymous" grantee is for anonymous callers only
    (device("alice"), "receive", "delegate/d2", False),     # a device named like the grantee is not the user
    (user("alice"), "receive", "delegate/d4", False),       # expired delegation
    (user("alice"), "publish", "delegate-read/d2", True),   # delegate:read holds whatever the action
    (user("x", groups={"lab"}), "publish", "delegate-read/d2", False),
    (user("x", groups={"lab"}), "receive", "delegate-write/d2", True),
    (user("alice"), "receive", "delegate-write/d2", False),
    (user("alice"), "receive", "public/d3", True),
    (device("d1"), "receive", "public/d3", True),
    (anonymous, "receive", "public/d3", False),             # public needs an authenticated caller
    (user("alice"), "receive", "public/d2", False),
])
def test_relation_subjects(world, who, action, topic, allowed):
    if action == "publish":
        d = world.may_publish(who, topic)
    else:
        d = world.may_receive(who, topic)
    assert d.allowed is allowed, d
    if allowed:
        assert d.device == topic.split("/")[1]


def test_relation_without_device_in_pattern_is_refused():
    from proxy.policy import PolicyError

    with pytest.raises(PolicyError, match=r"test.yaml:\d+:\d+: .*owner is a relation"):
        policies("""
  - id: bad
    subjects: [owner]
    mqtt: {topics: ["devices/+/x"], actions: [publish]}
""")


PLACEHOLDERS = """
  - id: by-sub
    subjects: [anyone]
    mqtt: {topics: ["users/{sub}/#"], actions: [publish, subscribe]}
  - id: by-username
    subjects: [anyone]
    mqtt: {topics: ["home/{username}/+"], actions: [publish, subscribe]}
  - id: by-client
    subjects: [anyone]
    mqtt: {topics: ["clients/{client_id}"], actions: [publish, subscribe]}
    http: {paths: ["/me/{username}/**"], methods: [GET]}
"""


@pytest.mark.parametrize("who,topic,client_id,allowed", [
    (user("alice"), "users/sub-alice/x/y", "", True),
    (user("alice"), "users/sub-bob/x", "", False),
    (user("alice"), "home/alice/door", "", True),
    (user("alice"), "home/bob/door", "", False),
    (user("alice"), "clients/c1", "c1", True),
    (user("alice"), "clients/c2", "c1", False),
    (user("alice"), "clients/", "", False),          # an empty client id never matches an empty level
    # Crafted values cannot widen a rule: a value holding + # / never matches anything.
    (user("+"), "home/+/door", "", False),
    (user("a/b"), "home/a/b/door", "", False),
    (user("#"), "home/x/door", "", False),
    (user("alice"), "clients/x", "+", False),
    (user("alice"), "clients/a/b", "a/b", False),
    (user("alice", sub="s/../x"), "users/s/../x/y", "", False),
    (anonymous, "clients/c1", "c1", False),
])
def test_placeholders(who, topic, client_id, allowed):
    p = policies(PLACEHOLDERS)
    assert p.may_publish(who, topic, client_id=client_id).allowed is allowed


def test_placeholder_values_with_wildcards_cannot_widen_a_subscription():
    p = policies(PLACEHOLDERS)
    # username "+" would turn home/{username}/+ into home/+/+ if substituted naively
    assert p.may_subscribe(user("+"), "home/+/+").verdict is Verdict.DENY
    assert p.may_subscribe(user("#"), "home/#").verdict is Verdict.DENY
    assert p.may_subscribe(user("alice"), "home/alice/+").verdict is Verdict.ALLOW
    assert p.may_subscribe(user("alice"), "clients/+", client_id="+").verdict is Verdict.DENY


def test_placeholder_in_http_path():
    p = policies(PLACEHOLDERS)
    assert p.may_http(user("alice"), "GET", "/me/alice/settings").allowed
    assert not p.may_http(user("alice"), "GET", "/me/bob/settings").allowed
    assert not p.may_http(user("alice"), "GET", "/me/alice/../bob/settings").allowed


DENY_RULES = """
  - id: everyone-reads
    subjects: [anyone]
    mqtt: {topics: ["plant/#"], actions: [subscribe, publish]}
  - id: owners
    subjects: [owner]
    mqtt: {topics: ["plant/{device}/#"], actions: [subscribe, publish]}
  - id: no-secrets
    effect: deny
    subjects: [anyone]
    mqtt: {topics: ["plant/secret/#", "plant/+/private"], actions: [subscribe, publish]}
  - id: no-retained-alarms
    effect: deny
    subjects: [anyone]
    mqtt: {topics: ["plant/alarm"], actions: [publish], retain: true}
  - id: qos-limited
    subjects: [anyone]
    mqtt: {topics: ["limited/x"], actions: [publish], qos: [0, 1]}
"""


def test_deny_beats_every_allow_regardless_of_order():
    p = policies(DENY_RULES, facts(dev("secret", "sub-alice")))
    d = p.may_publish(user("alice"), "plant/secret/x")
    assert (d.allowed, d.rule) == (False, "no-secrets")
    assert p.may_receive(user("alice"), "plant/d9/private").rule == "no-secrets"
    assert p.may_publish(user("alice"), "plant/d9/public").rule == "everyone-reads"


def test_the_first_allow_in_file_order_is_reported():
    p = policies(DENY_RULES, facts(dev("d1", "sub-alice")))
    assert p.may_publish(user("alice"), "plant/d1/x").rule == "everyone-reads"


def test_publish_conditions():
    p = policies(DENY_RULES)
    assert p.may_publish(user("a"), "plant/alarm").allowed
    d = p.may_publish(user("a"), "plant/alarm", retain=True)
    assert (d.allowed, d.rule) == (False, "no-retained-alarms")
    assert p.may_publish(user("a"), "limited/x", qos=1).allowed
    assert not p.may_publish(user("a"), "limited/x", qos=2).allowed


DOLLAR = """
  - id: all
    subjects: [anyone]
    mqtt: {topics: ["#"], actions: [publish, subscribe]}
  - id: plus-first
    subjects: [anyone]
    mqtt: {topics: ["+/status"], actions: [publish, subscribe]}
  - id: device-first
    subjects: [owner]
    mqtt: {topics: ["{device}/status"], actions: [publish]}
  - id: user-first
    subjects: [anyone]
    mqtt: {topics: ["{username}/inbox"], actions: [publish]}
"""


@pytest.mark.parametrize("topic", ["$SYS/broker/uptime", "$CONTROL/dynamic-security/v1", "$SYS", "$x/status",
                                   "$share/g/t"])
def test_wildcards_and_placeholders_never_match_dollar_topics(topic):
    p = policies(DOLLAR, facts(dev("$x", "sub-alice")))
    assert not p.may_publish(user("alice"), topic).allowed
    assert not p.may_receive(user("alice"), topic).allowed
    assert not p.may_publish(user("$x"), "$x/inbox").allowed


def test_a_literal_dollar_rule_opens_it():
    p = policies(DOLLAR + """
  - id: sys
    subjects: ["role:ops"]
    mqtt: {topics: ["$SYS/#"], actions: [subscribe]}
""")
    assert p.may_receive(user("o", roles={"ops"}), "$SYS/broker/uptime").rule == "sys"
    assert not p.may_receive(user("alice"), "$SYS/broker/uptime").allowed


@pytest.mark.parametrize("topic", ["", "a/+", "a/#", "a\x00b"])
def test_invalid_topic_names_are_denied(topic):
    p = policies(DOLLAR)
    assert not p.may_publish(user("alice"), topic).allowed
    assert not p.may_receive(user("alice"), topic).allowed


def test_empty_levels_match_plus_but_not_device():
    p = policies("""
  - id: plus
    subjects: [anyone]
    mqtt: {topics: ["a/+/b"], actions: [publish]}
  - id: dev
    subjects: [role:ops]
    mqtt: {topics: ["x/{device}/b"], actions: [publish]}
""")
    assert p.may_publish(user("u"), "a//b").allowed
    assert not p.may_publish(user("u", roles={"ops"}), "x//b").allowed
    assert p.may_publish(user("u", roles={"ops"}), "x/d/b").device == "d"


HTTP = """
  - id: entities
    subjects: [owner, delegate]
    http: {paths: ["/v2/entities/{device}", "/v2/entities/{device}/**"], methods: ["*"]}
  - id: list
    subjects: [anyone]
    http: {paths: ["/v2/entities"], methods: [GET]}
  - id: one-level
    subjects: [anyone]
    http: {paths: ["/v2/subscriptions/*"], methods: [get, delete]}
  - id: admin
    subjects: [admin]
    http: {paths: ["/**"], methods: ["*"]}
"""


@pytest.mark.parametrize("who,method,path,rule", [
    (user("alice"), "GET", "/v2/entities/d1", "entities"),
    (user("alice"), "get", "/v2/entities/d1/attrs/temp/value", "entities"),
    (user("alice"), "DeLeTe", "/v2/entities/d1", "entities"),
    (user("alice"), "GET", "/v2/entities/d1/", "entities"),            # trailing slash
    (user("alice"), "GET", "/v2//entities//d1", "entities"),           # duplicate slashes
    (user("alice"), "GET", "/v2/entities", "list"),
    (user("alice"), "POST", "/v2/entities", None),
    (user("bob"), "GET", "/v2/entities/d2", "entities"),               # read delegate, read method
    (user("bob"), "HEAD", "/v2/entities/d2", "entities"),
    (user("bob"), "PATCH", "/v2/entities/d2/attrs", None),             # read delegate, write method
    (user("bob"), "GET", "/v2/entities/d1", None),
    (user("alice"), "GET", "/v2/entities/d1/../d2", None),             # dot segments resolved before matching
    (user("alice"), "GET", "/v2/entities/../admin", None),
    (user("alice"), "GET", "/v2/entities/%2e%2e/admin", None),
    (user("alice"), "GET", "/v2/entities/d1%2F..%2Fd2", None),         # encoded slash refused
    (user("alice"), "GET", "/v2/entities/d1/%2e%2e/%2e%2e/admin", None),
    (user("alice"), "GET", "/v2/subscriptions/abc", "one-level"),
    (user("alice"), "Delete", "/v2/subscriptions/abc", "one-level"),
    (user("alice"), "PATCH", "/v2/subscriptions/abc", None),
    (user("alice"), "GET", "/v2/subscriptions/abc/def", None),          # * is one segment
    (user("alice"), "GET", "/v2/subscriptions", None),
    (user("root", roles={"iot-admin"}), "GET", "/", "admin"),           # ** is any depth, even none
    (user("root", roles={"iot-admin"}), "PUT", "/admin/log", "admin"),
    (user("root", roles={"iot-admin"}), "GET", "/a/%2e%2e/b", None),    # refused before any rule
    (user("alice"), "G ET", "/v2/entities", None),                      # not a method
    (anonymous, "GET", "/v2/entities", None),
])
def test_http(who, method, path, rule):
    p = policies(HTTP, facts(dev("d1", "sub-alice"), dev("d2", "sub-carol", delegations=[("bob", "read")])))
    d = p.may_http(who, method, path)
    assert d.rule == rule, d
    assert d.allowed is (rule is not None)


def test_http_names_the_device():
    p = policies(HTTP, facts(dev("d1", "sub-alice")))
    assert p.may_http(user("alice"), "GET", "/v2/entities/d1/attrs").device == "d1"


def test_refused_path_reason_is_given():
    p = policies(HTTP)
    d = p.may_http(user("root", roles={"iot-admin"}), "GET", "/v2/%2e%2e/x")
    assert not d.allowed and d.reason.startswith("path refused")


def test_decision_cannot_be_used_as_a_boolean():
    p = policies(HTTP)
    with pytest.raises(TypeError):
        bool(p.may_http(anonymous, "GET", "/"))
    with pytest.raises(TypeError):
        bool(p.may_subscribe(anonymous, "#"))


def test_ownership_changes_are_seen_at_once():
    f = facts()
    p = policies(HTTP, f)
    assert not p.may_http(user("alice"), "GET", "/v2/entities/d1").allowed
    f.put(dev("d1", "sub-alice"))
    assert p.may_http(user("alice"), "GET", "/v2/entities/d1").allowed
    f.remove("d1")
    assert not p.may_http(user("alice"), "GET", "/v2/entities/d1").allowed


def test_cached_decisions_expire_with_the_delegation():
    now = [1_000.0]  # the engine's wall clock, moved by the test (no sleep)
    f = facts(dev("d1", "sub-bob", delegations=[Delegation("x", "d1", to("alice"), "read",
                                                           expires_at=1_000.3)]))
    p = policies(HTTP, f, clock=lambda: now[0])
    assert p.may_http(user("alice"), "GET", "/v2/entities/d1").allowed
    assert p.may_http(user("alice"), "GET", "/v2/entities/d1").allowed   # a cache hit
    now[0] = 1_000.35
    assert not p.may_http(user("alice"), "GET", "/v2/entities/d1").allowed


def test_cache_is_keyed_on_the_whole_identity():
    p = policies(SUBJECT_RULES)
    assert p.may_publish(user("x", roles={"ops"}), "s/role").allowed
    assert not p.may_publish(user("x"), "s/role").allowed                # same name, fewer roles
    assert p.may_publish(user("x", roles={"ops"}), "s/role").allowed


def test_a_full_cache_is_dropped_not_grown():
    from proxy.policy.engine import CompiledPolicies

    p = policies(SUBJECT_RULES)
    small = CompiledPolicies(p.source, p.compiled.facts, cache_size=3)
    for i in range(10):
        small.may_publish(user(f"u{i}"), "s/anyone")
    assert len(small._cache) <= 3


def test_long_filters_keep_the_decision_cache_within_its_byte_budget():
    """1,000 distinct 65 KB filters (about 65 MB of keys) are well under the 50,000-entry cap; the
    byte budget drops the cache instead of keeping them all. Measured with tracemalloc."""
    import tracemalloc

    from proxy.policy.engine import CACHE_MAX_BYTES

    p = policies(SUBJECT_RULES)
    compiled = p.compiled
    alice = user("alice")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        peak_held = 0
        for i in range(1000):
            d = p.may_subscribe(alice, f"long/{i}/" + "x" * 65_000)
            assert d.verdict is Verdict.DENY
            assert compiled.cache_bytes <= CACHE_MAX_BYTES
            peak_held = max(peak_held, tracemalloc.get_traced_memory()[0] - before)
    finally:
        tracemalloc.stop()
    assert peak_held <= CACHE_MAX_BYTES + 1024 * 1024, peak_held  # the budget, plus one filter in flight
    held = sum(len(k[2]) for k in compiled._cache)
    assert held <= CACHE_MAX_BYTES


def test_an_answer_larger_than_the_whole_budget_is_answered_not_kept():
    from proxy.policy.engine import CompiledPolicies

    p = policies(SUBJECT_RULES)
    small = CompiledPolicies(p.source, p.compiled.facts, cache_max_bytes=2000)
    assert small.may_publish(user("alice"), "s/anyone").allowed
    assert len(small._cache) == 1
    assert not small.may_publish(user("alice"), "s/" + "x" * 4000).allowed
    assert small.cache_bytes <= 2000
    assert len(small._cache) == 1  # the short answer stays


def test_an_expired_answer_replaced_in_the_cache_is_not_counted_twice():
    from proxy.policy.engine import CACHE_SECONDS, CompiledPolicies

    now = [1000.0]
    p = policies(SUBJECT_RULES)
    engine = CompiledPolicies(p.source, p.compiled.facts, clock=lambda: now[0])
    engine.may_publish(user("alice"), "s/anyone")
    held = engine.cache_bytes
    for _ in range(5):
        now[0] += CACHE_SECONDS + 1
        engine.may_publish(user("alice"), "s/anyone")
    assert engine.cache_bytes == held


def test_the_byte_budget_survives_a_reload(tmp_path):
    from proxy.facts import StaticFacts
    from proxy.policy import Policies

    (tmp_path / "p.yaml").write_text("version: 1\nrules:\n" + SUBJECT_RULES)
    held = Policies.from_dir(tmp_path, StaticFacts(), cache_max_bytes=12345)
    assert held.compiled.cache_max_bytes == 12345
    (tmp_path / "p.yaml").write_text("version: 1\nrules:\n" + SUBJECT_RULES.replace("s/anyone", "s/any"))
    assert held.reload()
    assert held.compiled.cache_max_bytes == 12345
