"""may_subscribe: containment (not matching), for filters with and without wildcards."""

import pytest

from proxy.policy import Verdict
from tests.unit.policy_helpers import anonymous, dev, device, facts, policies, user

A, D, C = Verdict.ALLOW, Verdict.DENY, Verdict.CHECK_EACH

RULES = """
  - id: admins
    subjects: [admin]
    mqtt: {topics: ["#"], actions: [subscribe]}
  - id: owners
    subjects: [owner]
    mqtt: {topics: ["devices/{device}/#"], actions: [subscribe]}
  - id: d1-literal
    subjects: ["user:carol"]
    mqtt: {topics: ["devices/d1/#"], actions: [subscribe]}
  - id: telemetry-plus
    subjects: ["group:viewers"]
    mqtt: {topics: ["devices/+/telemetry"], actions: [subscribe]}
  - id: deep-hash
    subjects: ["user:dora"]
    mqtt: {topics: ["a/b/c/#"], actions: [subscribe]}
  - id: no-private
    effect: deny
    subjects: [anyone]
    mqtt: {topics: ["devices/+/private/#"], actions: [subscribe]}
"""

admin = user("root", roles={"iot-admin"})
alice = user("alice")
carol = user("carol")
viewer = user("val", groups={"viewers"})
dora = user("dora")


@pytest.fixture
def p():
    return policies(RULES, facts(dev("d1", "sub-alice"), dev("d2", "sub-bob")))


@pytest.mark.parametrize("who,flt,verdict,rule", [
    # an admin's '#' contains everything ... except what a deny may hit
    (admin, "#", C, "admins"),                               # no-private overlaps '#'
    (admin, "other/#", A, "admins"),
    (admin, "devices/d1/telemetry", A, "admins"),
    (admin, "devices/+/telemetry", A, "admins"),
    (admin, "devices/d1/private/x", D, "no-private"),        # a concrete topic a deny hits
    (admin, "devices/+/private/#", D, "no-private"),         # a deny that contains the filter
    (admin, "devices/d1/private/#", D, "no-private"),
    (admin, "devices/#", C, "admins"),                       # contains it, but no-private overlaps
    # {device} + relation: a literal device level binds, a wildcard level needs checks per delivery
    (alice, "devices/d1/#", C, "owners"),                    # owner of d1, but devices/d1/private/# is denied
    (alice, "devices/d1/telemetry", A, "owners"),
    (alice, "devices/d1/+", C, "owners"),                    # d1/private (the level itself) is not denied,
                                                             # but the deny's # includes its parent: overlap
    (alice, "devices/d1/+/x", C, "owners"),
    (alice, "devices/d2/#", D, None),                        # not her device: nothing could be delivered
    (alice, "devices/d2/telemetry", D, None),
    (alice, "devices/+/telemetry", C, "owners"),             # {device} under a wildcard: per delivery
    (alice, "devices/#", C, "owners"),
    (alice, "#", C, "owners"),
    (alice, "other/#", D, None),
    # a literal rule: containment, not matching
    (carol, "devices/d1/#", C, "d1-literal"),                # overlaps no-private
    (carol, "devices/d1/telemetry", A, "d1-literal"),
    (carol, "devices/d1/+/x", C, "d1-literal"),              # covered, but devices/d1/private/x is denied
    (carol, "devices/+/#", C, "d1-literal"),                 # devices/d1/# does NOT contain devices/+/#
    (carol, "devices/+/telemetry", C, "d1-literal"),
    (carol, "devices/d2/#", D, None),
    # '+' in the rule contains '+' in the filter (and literals)
    (viewer, "devices/+/telemetry", A, "telemetry-plus"),
    (viewer, "devices/d9/telemetry", A, "telemetry-plus"),
    (viewer, "devices/+/+", C, "telemetry-plus"),
    (viewer, "devices/#", C, "telemetry-plus"),
    (viewer, "devices/+/telemetry/#", C, "telemetry-plus"),  # matches devices/x/telemetry (parent) only
    (viewer, "devices/+/attrs", C, "owners"),                # she might own a device: per delivery
    (user("zed", roles={"x"}), "nothing/+", D, None),
    # '#' at different depths
    (dora, "a/b/c", A, "deep-hash"),                         # '#' includes the parent level
    (dora, "a/b/c/#", A, "deep-hash"),
    (dora, "a/b/c/d/+/#", A, "deep-hash"),
    (dora, "a/b/#", C, "deep-hash"),                         # wider than the rule
    (dora, "a/#", C, "deep-hash"),
    (dora, "a/+/c", C, "deep-hash"),
    (dora, "a/b/+", C, "deep-hash"),                         # a/b/c is under it
    (dora, "a/b/d/#", D, None),
    (dora, "+/b/c/#", C, "deep-hash"),
    # anonymous: nothing, except that a device might be delegated to anonymous callers
    (anonymous, "other/#", D, None),
    (anonymous, "devices/d1/telemetry", D, None),
])
def test_containment(p, who, flt, verdict, rule):
    s = p.may_subscribe(who, flt)
    assert (s.verdict, s.rule) == (verdict, rule), s


def test_a_filter_that_could_reach_a_denied_topic_is_not_allowed_outright(p):
    # devices/d1/+/x matches devices/d1/private/x, which no-private denies: must not be ALLOW.
    assert p.may_subscribe(carol, "devices/d1/+/x").verdict is C
    assert not p.may_receive(carol, "devices/d1/private/x").allowed
    assert p.may_receive(carol, "devices/d1/public/x").allowed


def test_check_each_deliveries(p):
    assert p.may_subscribe(alice, "devices/+/telemetry").verdict is C
    assert p.may_receive(alice, "devices/d1/telemetry").allowed
    assert not p.may_receive(alice, "devices/d2/telemetry").allowed


def test_device_relation_and_placeholders_under_wildcards():
    p = policies("""
  - id: own-cmd
    subjects: [device]
    mqtt: {topics: ["devices/{device}/cmd/#"], actions: [subscribe]}
  - id: inbox
    subjects: [anyone]
    mqtt: {topics: ["inbox/{username}/#"], actions: [subscribe]}
""", facts(dev("d1")))
    d1 = device("d1")
    assert p.may_subscribe(d1, "devices/d1/cmd/#").verdict is A
    assert p.may_subscribe(d1, "devices/d2/cmd/#").verdict is D
    assert p.may_subscribe(d1, "devices/+/cmd/#").verdict is C
    assert p.may_subscribe(alice, "devices/+/cmd/#").verdict is D    # a user is never the device
    assert p.may_subscribe(alice, "inbox/alice/#").verdict is A
    assert p.may_subscribe(alice, "inbox/+/#").verdict is C
    assert p.may_subscribe(alice, "inbox/bob/#").verdict is D


@pytest.mark.parametrize("flt,verdict", [
    ("$SYS/#", D), ("$SYS/broker/uptime", D), ("#", A), ("+/x", A), ("+", A),
])
def test_dollar_topics_in_filters(flt, verdict):
    p = policies("""
  - id: all
    subjects: [anyone]
    mqtt: {topics: ["#"], actions: [subscribe]}
""")
    assert p.may_subscribe(alice, flt).verdict is verdict


def test_dollar_rules_do_not_make_plain_wildcards_check_each():
    # '#' in a filter never matches $SYS topics, so a $SYS deny does not overlap it.
    p = policies("""
  - id: all
    subjects: [anyone]
    mqtt: {topics: ["#", "$SYS/#"], actions: [subscribe]}
  - id: no-sys-clients
    effect: deny
    subjects: [anyone]
    mqtt: {topics: ["$SYS/broker/clients/#"], actions: [subscribe]}
""")
    assert p.may_subscribe(alice, "#").verdict is A
    assert p.may_subscribe(alice, "$SYS/#").verdict is C
    assert p.may_subscribe(alice, "$SYS/broker/clients/+").verdict is D
    assert p.may_subscribe(alice, "$SYS/broker/load/#").verdict is A


def test_share_prefix_must_be_stripped_by_the_gateway():
    p = policies("""
  - id: all
    subjects: [anyone]
    mqtt: {topics: ["#"], actions: [subscribe]}
  - id: owners
    subjects: [owner]
    mqtt: {topics: ["devices/{device}/#"], actions: [subscribe]}
""", facts(dev("d1")))
    # the gateway strips $share/<group>/ and asks about the filter itself
    assert p.may_subscribe(alice, "devices/d1/#").verdict is A
    assert p.may_subscribe(alice, "devices/+/telemetry").verdict is A
    # passed in unstripped, it is refused rather than matched as a $ topic
    for raw in ("$share/g/devices/d1/#", "$share/g/#", "$share"):
        s = p.may_subscribe(alice, raw)
        assert s.verdict is D and "$share" in s.reason


@pytest.mark.parametrize("flt", ["a/#/b", "a/b#", "a+/b", "", "a/\x00"])
def test_invalid_filters_are_denied(flt):
    p = policies("""
  - id: all
    subjects: [anyone]
    mqtt: {topics: ["#"], actions: [subscribe]}
""")
    assert p.may_subscribe(alice, flt).verdict is D


def test_wildcards_in_a_deny_with_relation_make_check_each():
    p = policies("""
  - id: all
    subjects: [anyone]
    mqtt: {topics: ["devices/#"], actions: [subscribe]}
  - id: not-for-delegates
    effect: deny
    subjects: [delegate]
    mqtt: {topics: ["devices/{device}/secret"], actions: [subscribe]}
""", facts(dev("d1", "sub-bob", delegations=[("alice", "read")])))
    assert p.may_subscribe(alice, "devices/+/secret").verdict is C
    assert p.may_subscribe(alice, "devices/d1/secret").verdict is D
    assert p.may_subscribe(alice, "devices/d2/secret").verdict is A
    assert p.may_subscribe(user("zed", roles=()), "devices/d1/secret").verdict is A


def test_a_filter_too_wide_to_decide_cheaply_is_checked_per_delivery():
    from proxy.policy.engine import WALK_BUDGET

    rules = "".join(f"""
  - id: s{k}
    subjects: [anyone]
    mqtt: {{topics: ["sensors/s{k}/+/data"], actions: [subscribe]}}""" for k in range(WALK_BUDGET + 10))
    p = policies(rules)
    # Exactly decided this would be DENY (no sensors/*/x/nothing rule); the walk gives up and
    # answers CHECK_EACH, which stays safe: every delivery is still refused.
    s = p.may_subscribe(alice, "sensors/+/x/nothing")
    assert s.verdict is C and "each delivery is checked" in s.reason
    assert not p.may_receive(alice, "sensors/s1/x/nothing").allowed
    assert p.may_subscribe(alice, "sensors/s7/+/data").verdict is A      # narrow filters stay exact
    assert p.may_subscribe(alice, "other/+").verdict is D


def test_an_empty_filter_is_denied_even_to_an_admin(p):
    # "" is no MQTT topic filter; a rule on "#" must not read it as "every topic".
    d = p.may_subscribe(admin, "", client_id="x")
    assert d.verdict is D and d.reason == "empty topic filter"
