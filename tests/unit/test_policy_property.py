"""The compiled engine against a slow, obviously-correct reference, on random rule sets.

The reference scans every rule, matches each pattern level by level, and
evaluates subjects straight from their definitions. For concrete topics and
paths the engine must agree exactly (decision and deciding rule). For
wildcard subscriptions the engine may answer CHECK_EACH whenever it likes,
but ALLOW must mean every topic under the filter is allowed, and DENY that
none is -- checked over every topic of a small universe that includes the
interesting cases (empty levels, ``$`` levels, device ids, the caller's
username, a level no rule names, one level deeper than any pattern).
"""

import itertools
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.facts import Delegation, DeviceFacts, StaticFacts
from proxy.identity.model import ANONYMOUS, Identity
from proxy.policy import Policies, Verdict
from tests.unit.policy_helpers import to

LEVELS = ["a", "d1", "d2", "alice", "", "$s", "zz"]
PATTERN_LEVELS = ["a", "d1", "alice", "", "$s", "+", "{device}", "{username}", "{client_id}"]
SUBJECTS = ["anyone", "anonymous", "owner", "device", "delegate", "delegate:read", "delegate:write", "public",
            "role:r", "user:alice", "group:g", "scope:s", "client-role:c:r", "admin"]
RELATIONS = {"owner", "device", "delegate", "delegate:read", "delegate:write", "public"}
CLIENT_ID = "a"

IDENTITIES = [
    Identity(kind="user", sub="sub-alice", username="alice", method="token", roles=frozenset({"r"}),
             groups=frozenset({"g"})),
    Identity(kind="user", sub="sub-bob", username="bob", method="token", scopes=frozenset({"s"}),
             client_roles=frozenset({"c:r"})),
    Identity(kind="user", sub="sub-root", username="root", method="token", roles=frozenset({"iot-admin"})),
    Identity(kind="device", sub="device:d1", username="d1", method="device_key", device_id="d1",
             owner_sub="sub-alice"),
    Identity(kind="service", sub="sub-sa-svc", username="svc", method="token", groups=frozenset({"g"})),
    # A user whose name is the service's client id: must not get what was delegated to the service.
    Identity(kind="user", sub="sub-svc", username="svc", method="token"),
    ANONYMOUS,
]


def make_facts(d2_public: bool) -> StaticFacts:
    return StaticFacts([
        DeviceFacts("d1", "sub-alice", "alice"),
        DeviceFacts("d2", "sub-bob", "bob", public=d2_public, delegations=(
            Delegation("x", "d2", to("alice"), "read"), Delegation("y", "d2", to("group:g"), "write"),
            Delegation("z", "d2", to("anonymous"), "read"),
            Delegation("old", "d2", to("root"), "readwrite", expires_at=1.0),
            Delegation("s", "d2", to("service:svc"), "read"))),
    ])


# --------------------------------------------------------------------------- reference


def ref_subject(subject, ident, device_id, facts, want):
    authenticated = ident.kind != "anonymous"
    if subject == "anyone":
        return authenticated
    if subject == "anonymous":
        return not authenticated
    if subject == "admin":
        return "iot-admin" in ident.roles
    if subject.startswith("role:"):
        return subject[5:] in ident.roles
    if subject.startswith("client-role:"):
        return subject[12:] in ident.client_roles
    if subject.startswith("user:"):
        return ident.kind in ("user", "service") and ident.username == subject[5:]
    if subject.startswith("group:"):
        return subject[6:] in ident.groups
    if subject.startswith("scope:"):
        return subject[6:] in ident.scopes
    dev = facts.device(device_id) if device_id else None
    if dev is None:
        return False
    if subject == "owner":
        return authenticated and dev.owner_sub == ident.sub
    if subject == "device":
        return ident.kind == "device" and ident.device_id == device_id
    if subject == "public":
        return authenticated and dev.public
    need = {"delegate": want, "delegate:read": "read", "delegate:write": "write"}[subject]
    for d in dev.delegations:
        if d.expires_at is not None and d.expires_at < time.time():
            continue
        if d.permission != "readwrite" and d.permission != need:
            continue
        g = d.grantee
        if ident.kind == "anonymous":
            if g.kind == "public":
                return True
        elif g.kind == "group":
            if g.id in ident.groups:
                return True
        elif ((g.kind == "user" and ident.kind == "user" and g.id and g.id == ident.sub)
              or (g.kind == "service" and ident.kind == "service" and g.id == ident.username)):
            return True
    return False


def ref_match(pattern, levels, ident, client_id, *, http=False):
    """(matched, device) for one pattern (a list of level strings) and a concrete topic."""
    one, rest = ("*", "**") if http else ("+", "#")
    if not http and levels[0].startswith("$") and pattern[0] in (one, rest, "{device}", "{username}", "{sub}",
                                                                "{client_id}"):
        return False, None
    device = None
    values = {"{username}": ident.username, "{sub}": ident.sub, "{client_id}": client_id}
    for i, p in enumerate(pattern):
        if p == rest:
            return True, device
        if i >= len(levels):
            return False, None
        lv = levels[i]
        if p == one:
            continue
        if p == "{device}":
            if lv == "":
                return False, None
            device = lv
            continue
        if p in values:
            v = values[p]
            if not v or "+" in v or "#" in v or "/" in v or v != lv:
                return False, None
            continue
        if p != lv:
            return False, None
    return len(pattern) == len(levels), device


def ref_decide(rules, question, ident, levels, facts, *, method=None, http=False):
    want = "write" if question == "publish" or (http and method not in ("GET", "HEAD", "OPTIONS")) else "read"
    winners = {"allow": None, "deny": None}
    for r in rules:
        if http:
            if "http" not in r or (r["http"]["methods"] != ["*"] and method not in r["http"]["methods"]):
                continue
            patterns = r["http"]["paths"]
        else:
            if question not in r["actions"]:
                continue
            patterns = r["topics"]
        for pat in patterns:
            ok, dev = ref_match([s for s in pat.split("/") if s] if http else pat.split("/"), levels, ident, CLIENT_ID,
                                http=http)
            if (ok and any(ref_subject(s, ident, dev, facts, want) for s in r["subjects"])
                    and winners[r["effect"]] is None):
                winners[r["effect"]] = r["id"]
    if winners["deny"]:
        return False, winners["deny"]
    if winners["allow"]:
        return True, winners["allow"]
    return False, None


def filter_matches(flt, levels):
    f = flt.split("/")
    if levels[0].startswith("$") and f[0] in ("+", "#"):
        return False
    for i, p in enumerate(f):
        if p == "#":
            return True
        if i >= len(levels):
            return False
        if p != "+" and p != levels[i]:
            return False
    return len(f) == len(levels)


UNIVERSE = [list(t) for n in range(1, 5) for t in itertools.product(LEVELS, repeat=n)]

# --------------------------------------------------------------------------- generators


@st.composite
def topic_patterns(draw):
    n = draw(st.integers(1, 3))
    levels = [draw(st.sampled_from(PATTERN_LEVELS)) for _ in range(n)]
    if levels.count("{device}") > 1:
        first = levels.index("{device}")
        levels = [lv if lv != "{device}" or i == first else "+" for i, lv in enumerate(levels)]
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels) or "a"  # a lone empty level is not a pattern


@st.composite
def rule_sets(draw):
    rules = []
    for i in range(draw(st.integers(0, 8))):
        topics = draw(st.lists(topic_patterns(), min_size=1, max_size=2))
        subjects = draw(st.lists(st.sampled_from(SUBJECTS), min_size=1, max_size=3, unique=True))
        if any(s in RELATIONS for s in subjects):
            topics = [t if "{device}" in t else "{device}/" + t.replace("{device}", "+") for t in topics]
        rules.append({"id": f"r{i}", "effect": draw(st.sampled_from(["allow", "allow", "deny"])),
                      "subjects": subjects, "topics": topics,
                      "actions": draw(st.lists(st.sampled_from(["publish", "subscribe"]), min_size=1, unique=True))})
    return rules


def to_yaml(rules):
    import json

    out = ["version: 1", "rules:"]
    for r in rules:
        out.append(f"  - id: {r['id']}\n    effect: {r['effect']}\n    subjects: {json.dumps(r['subjects'])}\n"
                   f"    mqtt: {{topics: {json.dumps(r['topics'])}, actions: {json.dumps(r['actions'])}}}")
        if "http" in r:
            out.append(f"    http: {{paths: {json.dumps(r['http']['paths'])}, "
                       f"methods: {json.dumps(r['http']['methods'])}}}")
    if not rules:
        out[-1] = "rules: []"
    return "\n".join(out) + "\n"


topics = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join).filter(bool)
# Not "": an empty filter is no MQTT filter at all (denied outright, see test_policy_subscribe.py).
filters = st.lists(st.sampled_from(LEVELS + ["+", "+"]), min_size=1, max_size=3).flatmap(
    lambda lv: st.sampled_from(["/".join(lv), "/".join(lv + ["#"])])).filter(bool)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(SETTINGS, max_examples=300)


@MANY
@given(rules=rule_sets(), topic=topics, who=st.sampled_from(IDENTITIES), public=st.booleans())
def test_publish_and_receive_agree_with_reference(rules, topic, who, public):
    facts = make_facts(public)
    p = Policies.from_text(to_yaml(rules), facts)
    levels = topic.split("/")
    d = p.may_publish(who, topic, client_id=CLIENT_ID)
    assert (d.allowed, d.rule) == ref_decide(rules, "publish", who, levels, facts)
    d = p.may_receive(who, topic, client_id=CLIENT_ID)
    assert (d.allowed, d.rule) == ref_decide(rules, "subscribe", who, levels, facts)


@SETTINGS
@given(rules=rule_sets(), flt=filters, who=st.sampled_from(IDENTITIES), public=st.booleans())
def test_subscribe_verdicts_are_sound(rules, flt, who, public):
    facts = make_facts(public)
    p = Policies.from_text(to_yaml(rules), facts)
    s = p.may_subscribe(who, flt, client_id=CLIENT_ID)
    if "+" not in flt and "#" not in flt:
        assert s.verdict is (Verdict.ALLOW if ref_decide(rules, "subscribe", who, flt.split("/"), facts)[0]
                             else Verdict.DENY)
        return
    under = [t for t in UNIVERSE if filter_matches(flt, t)]
    allowed = [ref_decide(rules, "subscribe", who, t, facts)[0] for t in under]
    if s.verdict is Verdict.ALLOW:
        assert all(allowed), (s, [t for t, a in zip(under, allowed, strict=True) if not a][:3])
    elif s.verdict is Verdict.DENY:
        assert not any(allowed), (s, [t for t, a in zip(under, allowed, strict=True) if a][:3])


HTTP_SEGMENTS = ["v2", "entities", "d1", "d2", "alice", "*", "**", "{device}", "{username}"]


@st.composite
def http_rules(draw):
    rules = draw(rule_sets())
    for r in rules:
        n = draw(st.integers(0, 3))
        segs = [draw(st.sampled_from(HTTP_SEGMENTS)) for _ in range(n)]
        segs = [s for i, s in enumerate(segs) if s != "**" or i == len(segs) - 1]
        if segs.count("{device}") > 1:
            segs = [s for i, s in enumerate(segs) if s != "{device}" or i == segs.index("{device}")]
        if any(s in RELATIONS for s in r["subjects"]) and "{device}" not in segs:
            segs = ["{device}"] + [s for s in segs if s != "{device}"]
        r["http"] = {"paths": ["/" + "/".join(segs)],
                     "methods": draw(st.sampled_from([["*"], ["GET"], ["GET", "POST"], ["DELETE"]]))}
    return rules


@MANY
@given(rules=http_rules(), segs=st.lists(st.sampled_from(["v2", "entities", "d1", "d2", "alice", "zz"]), max_size=4),
       method=st.sampled_from(["GET", "get", "POST", "Delete", "PATCH"]), who=st.sampled_from(IDENTITIES),
       public=st.booleans())
def test_http_agrees_with_reference(rules, segs, method, who, public):
    facts = make_facts(public)
    p = Policies.from_text(to_yaml(rules), facts)
    d = p.may_http(who, method, "/" + "/".join(segs))
    assert (d.allowed, d.rule) == ref_decide(rules, "http", who, segs, facts, method=method.upper(), http=True)
