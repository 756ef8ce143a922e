"""The session's fast paths decide exactly as the full path does.

A chunk of PUBLISH packets whose decisions are cached skips the Frame and
PublishInfo objects and the per-message rate-limiter call
(:mod:`proxy.mqtt.fastpath`). An attacker who could make the two paths disagree could
get past a check, so every test here runs the same traffic through a session
with the fast paths and one without, and requires the same bytes each way, the
same audit lines, the same counts and the same deadlines.

The traffic is built so that the fast paths really run: the CONNECT (and the
broker's CONNACK, the SUBSCRIBE and its SUBACK) in chunks of their own, then a
warm-up chunk with each distinct PUBLISH once (the full path decides and caches
it), then the traffic proper in chunks of whole packets, repeated topics
interleaved with other packets. Only some examples are split at random points
or mutated; a rate limiter sized from the warm-up runs dry in the middle of the
traffic. Each property test counts the examples in which a fast path consumed
bytes and fails if that is fewer than a third of them: a change that quietly
sends every chunk down the full path would otherwise leave these tests
comparing the full path with itself.

Every test runs twice: with the compiled walk (``_walk.c``, what keygate runs) and with the
Python one (its fallback).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import RateLimitConfig
from proxy.mqtt import codec, fastpath
from proxy.mqtt.commands import CountMetrics
from proxy.mqtt.context import ALLOWED_PUBLISH, ALLOWED_RECEIVE, DENY_COUNT, RATE_LIMITED, TO_BROKER, TO_CLIENT
from proxy.mqtt.packets import MQTT_5, MQTT_311, PacketType, Prop, Subscribe, Subscription
from proxy.ratelimit import RateLimiter
from tests.unit.test_mqtt_fuzz import (
    POLICIES,
    REACH_SETTINGS,
    broker_packet,
    client_packet,
    connect_bytes,
    mutated,
    properties_for,
)
from tests.unit.test_mqtt_session import ALICE, Clock, FakePolicies, connack, make, open_session, pub

levels = st.sampled_from([MQTT_311, MQTT_5])
# Allowed and denied topics (POLICIES allows devices/thermo-1/#), none of them a protocol error.
allowed_topics = st.sampled_from(["devices/thermo-1/telemetry", "devices/thermo-1/attrs/temp"])
fast_topics = st.one_of(allowed_topics, st.sampled_from(["devices/thermo-2/cmd", "devices/public-1/telemetry",
                                                         "a/b", "é/ü"]))
# At least this share of a property test's examples must run each fast path.
MIN_FAST_SHARE = 1 / 3
T = PacketType


@pytest.fixture(autouse=True, params=["compiled", "python"])
def walk(request, monkeypatch):
    """The session's fast paths on the compiled walk, then on the Python fallback."""
    if request.param == "compiled":
        try:
            from proxy.mqtt import _walk
        except ImportError:
            pytest.fail("the compiled walk (proxy/mqtt/_walk.c) is not built: run scripts/setup", pytrace=False)
        monkeypatch.setattr(fastpath, "client_publishes", _walk.client_publishes)
        monkeypatch.setattr(fastpath, "broker_deliveries", _walk.broker_deliveries)
    else:
        monkeypatch.setattr(fastpath, "client_publishes", fastpath.py_client_publishes)
        monkeypatch.setattr(fastpath, "broker_deliveries", fastpath.py_broker_deliveries)
    return request.param


@contextlib.contextmanager
def counting_fast_paths(hits: dict):
    """Remember every fast-path call that consumed bytes (the session calls them through the
    module, so the test can watch them without reaching into the session)."""
    real = fastpath.client_publishes, fastpath.broker_deliveries

    def wrap(fn, side):
        def wrapper(mv, *args):
            pos, n = fn(mv, *args)
            if n:
                hits.setdefault(side, []).append(pos)
            return pos, n
        return wrapper

    fastpath.client_publishes, fastpath.broker_deliveries = wrap(real[0], "client"), wrap(real[1], "broker")
    try:
        yield
    finally:
        fastpath.client_publishes, fastpath.broker_deliveries = real


def _run(level, events, *, fast: bool, burst: int | None, **cfg):
    """Feed ``events`` (("client" | "broker", chunk), in order), answering authentication as
    Alice and the broker's CONNACK as success, like the shell."""
    clock = Clock()
    limiter = RateLimiter(1.0, burst, clock=clock) if burst else None
    s, _, audit = make(level, FakePolicies(**POLICIES), clock=clock, rate_limiter=limiter, fast_paths=fast, **cfg)
    to_broker: list = []
    to_client: list = []
    deadlines: list = []

    def apply(acts):
        to_broker.append(b"".join(bytes(x) for x in acts.to_broker))
        to_client.append(b"".join(bytes(x) for x in acts.to_client))
        deadlines.append((s.closed, s.next_deadline(), acts.close))
        if acts.auth is not None:
            apply(s.authenticated(ALICE))
        if acts.open_upstream:
            apply(s.broker_data(connack(level)))

    for side, chunk in events:
        apply(s.client_data(chunk) if side == "client" else s.broker_data(chunk))
    state = (deadlines, s.counts)
    buckets = {k: tuple(v) for k, v in limiter._buckets.items()} if limiter else {}
    return to_broker, to_client, [dict(r, ts=None) for r in audit.records], state, buckets


def assert_same(level, events, burst=None, stats: Counter | None = None, **cfg):
    hits: dict = {}
    with counting_fast_paths(hits):
        fast = _run(level, events, fast=True, burst=burst, **cfg)
    full = _run(level, events, fast=False, burst=burst, **cfg)
    # Chunk by chunk, not only in total: the fast path must not delay or reorder anything.
    assert fast[0] == full[0]
    assert fast[1] == full[1]
    assert fast[2] == full[2]
    assert fast[3] == full[3]
    assert fast[4] == full[4]
    if stats is not None:
        stats["examples"] += 1
        for side in ("client", "broker"):
            if hits.get(side):
                stats[side] += 1


def assert_fast_paths_ran(stats: Counter, side: str, what: str) -> None:
    share = stats[side] / max(stats["examples"], 1)
    print(f"\n{what}: {stats[side]} of {stats['examples']} examples consumed bytes on the {side} fast path "
          f"({share:.0%}; client {stats['client']}, broker {stats['broker']})")
    assert stats["examples"] and share >= MIN_FAST_SHARE, (
        f"the {side} fast path consumed bytes in only {stats[side]} of {stats['examples']} examples "
        f"(at least {MIN_FAST_SHARE:.0%} required): the comparison no longer exercises it")


@st.composite
def fast_publish(draw, level, topics=fast_topics):
    """A publish the fast path may take (cached topic, no properties) or must leave alone."""
    with_props = level == MQTT_5 and draw(st.sampled_from([False, False, False, True]))
    props = draw(properties_for("publish")) if with_props else []
    qos = draw(st.integers(0, 2))
    return codec.encode_publish(draw(topics), draw(st.binary(max_size=20)), qos=qos,
                                packet_id=draw(st.integers(1, 6)) if qos else None, retain=draw(st.booleans()),
                                level=level, properties=props)


@st.composite
def fast_delivery(draw, level, topics=fast_topics):
    qos = draw(st.integers(0, 2))
    return codec.encode_publish(draw(topics), draw(st.binary(max_size=20)), qos=qos,
                                packet_id=draw(st.integers(1, 6)) if qos else None, level=level)


@st.composite
def chunked(draw, distinct: list[bytes], others: list[bytes]) -> tuple[bytes, list[bytes]]:
    """(warm-up chunk, traffic chunks): each distinct publish once, then each repeated and
    interleaved with the other packets, in chunks of whole packets; some examples are also
    cut at a few random points (partial packets), some mutated."""
    packets = [p for p in distinct for _ in range(draw(st.integers(1, 8)))] + others
    packets = draw(st.permutations(packets))
    stream = b"".join(packets)
    ends = [sum(len(p) for p in packets[:i + 1]) for i in range(len(packets))]
    cuts = set(draw(st.lists(st.sampled_from(ends), min_size=1, max_size=8)))
    how = draw(st.sampled_from(["whole", "whole", "split", "mutated"]))
    if how == "split" and len(stream) > 1:
        cuts |= set(draw(st.lists(st.integers(1, len(stream) - 1), min_size=1, max_size=3)))
    elif how == "mutated":
        stream = draw(mutated(stream))
    bounds = [0] + sorted(c for c in cuts if 0 < c < len(stream)) + [len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds) if a < b]
    return b"".join(dict.fromkeys(distinct)), chunks


@st.composite
def client_traffic(draw, level):
    # One publish on an allowed topic at least, so that there is something for the fast path.
    distinct = [draw(fast_publish(level, allowed_topics))] + draw(st.lists(fast_publish(level), max_size=5))
    others = draw(st.lists(client_packet(level), max_size=3))  # may end the session, or re-authenticate
    return draw(chunked(distinct, others))


@st.composite
def broker_traffic(draw, level):
    distinct = [draw(fast_delivery(level, allowed_topics))] + draw(st.lists(fast_delivery(level), max_size=5))
    others = draw(st.lists(broker_packet(level), max_size=3))
    return draw(chunked(distinct, others))


def test_fast_path_matches_full_path_on_client_traffic():
    stats: Counter = Counter()

    @REACH_SETTINGS  # counted: the same examples every run, so a share under the minimum is a change
    @given(st.data(), levels)
    def check(data, level):
        warm, chunks = data.draw(client_traffic(level))
        # No limiter; one dry at once; plenty; the warm-up's worth and a few more, so that the
        # bucket runs dry in the middle of the traffic, on the fast path.
        burst = data.draw(st.sampled_from([None, None, 1, 300, "dry", "dry"]))
        if burst == "dry":
            burst = len(codec.Framer(1 << 20).feed(warm)) + data.draw(st.integers(1, 12))
        events = [("client", connect_bytes(level)), ("client", warm)] + [("client", c) for c in chunks]
        assert_same(level, events, burst, stats)

    check()
    assert_fast_paths_ran(stats, "client", "client traffic")


def test_fast_path_matches_full_path_on_deliveries():
    stats: Counter = Counter()

    @REACH_SETTINGS
    @given(st.data(), levels, st.sampled_from(["devices/+/telemetry", "devices/thermo-1/#", "#"]))
    def check(data, level, topic_filter):
        sub = codec.encode_subscribe(Subscribe(1, [Subscription(topic_filter, 2)]), level)
        suback = codec.encode_suback(codec.Suback(1, [2]), level)
        warm, chunks = data.draw(broker_traffic(level))
        events = [("client", connect_bytes(level)), ("client", sub), ("broker", suback), ("broker", warm)]
        assert_same(level, events + [("broker", c) for c in chunks], stats=stats)

    check()
    assert_fast_paths_ran(stats, "broker", "deliveries")


def test_a_chunk_of_cached_publishes_is_one_slice_to_the_broker():
    s, policies, _ = open_session()
    packet = pub("devices/thermo-1/telemetry")
    s.client_data(packet)  # first: the full path decides and caches
    acts = s.client_data(packet * 100)
    assert [bytes(x) for x in acts.to_broker] == [packet * 100]
    assert len(policies.asked) == 1  # nothing asked again
    # ... and it was the fast path that walked it, to its end:
    hits: dict = {}
    with counting_fast_paths(hits):
        s.client_data(packet * 100)
    assert hits == {"client": [len(packet) * 100]}


def test_fast_path_stops_at_a_denied_topic_and_the_full_path_refuses_it():
    s, _, audit = open_session()
    ok, bad = pub("devices/thermo-1/telemetry"), pub("devices/thermo-2/telemetry")
    s.client_data(ok)
    s.client_data(bad)  # denied: cached as denied
    acts = s.client_data(ok * 3 + bad + ok)
    assert b"".join(bytes(x) for x in acts.to_broker) == ok * 4
    assert len([r for r in audit.records if r["decision"] == "deny"]) == 2


def test_fast_path_never_carries_a_topic_alias_upstream():
    s, _, _ = open_session(MQTT_5)
    aliased = pub("devices/thermo-1/telemetry", level=MQTT_5, props=[(Prop.TOPIC_ALIAS, 1)])
    s.client_data(aliased)
    acts = s.client_data(aliased * 5)
    frames = codec.Framer(1 << 20).feed(b"".join(bytes(x) for x in acts.to_broker))
    assert len(frames) == 5
    assert all(codec.decode_publish(f, MQTT_5).topic_alias is None for f in frames)


def test_rate_limit_runs_dry_inside_a_chunk():
    clock = Clock()
    limiter = RateLimiter(1.0, 5, clock=clock)
    s, _, audit = open_session(rate_limiter=limiter)
    packet = pub("devices/thermo-1/telemetry")
    s.client_data(packet)  # one token spent, decision cached
    acts = s.client_data(packet * 10)
    assert b"".join(bytes(x) for x in acts.to_broker) == packet * 4
    assert [r["reason"] for r in audit.records if r["decision"] == "deny"] == ["rate limit"]
    assert limiter._buckets[ALICE.sub][0] < 1  # nothing handed out beyond the bucket


def test_a_revoked_grant_stops_the_fast_path_at_once():
    s, policies, audit = open_session()
    packet = pub("devices/thermo-1/telemetry")
    s.client_data(packet)
    assert b"".join(bytes(x) for x in s.client_data(packet * 3).to_broker) == packet * 3
    policies.pub.clear()  # e.g. the device was deleted through the API
    s.invalidate()        # what the gateway does on every ownership or policy change
    acts = s.client_data(packet * 3)
    assert not acts.to_broker
    assert len([r for r in audit.records if r["decision"] == "deny"]) == 3


def test_cached_grants_expire_for_the_fast_path_too():
    clock = Clock()
    s, policies, _ = open_session(clock=clock)
    packet = pub("devices/thermo-1/telemetry")
    s.client_data(packet)
    policies.pub.clear()  # a time-bound grant ran out; nobody called invalidate()
    clock.t += 2.0        # past the decision cache's lifetime
    assert not s.client_data(packet * 2).to_broker


def test_a_delivery_check_revoked_stops_the_broker_fast_path():
    policies = FakePolicies(pub=[], sub_check=["devices/+/telemetry"], recv=["devices/thermo-1/#"])
    s, _, _ = open_session(policies=policies)
    s.client_data(codec.encode_subscribe(Subscribe(1, [Subscription("devices/+/telemetry", 0)]), MQTT_311))
    s.broker_data(codec.encode_suback(codec.Suback(1, [0]), MQTT_311))
    delivery = pub("devices/thermo-1/telemetry")
    s.broker_data(delivery)
    assert b"".join(bytes(x) for x in s.broker_data(delivery * 3).to_client) == delivery * 3
    policies.recv.clear()  # the delegation was revoked
    s.invalidate()
    assert not s.broker_data(delivery * 3).to_client


# --------------------------------------------------------------------------- the counts, chunk by chunk
#
# The fast paths return their counts as one shared record per packet count (session._fast_counts),
# the full path counts packet by packet (context.take_counts). The comparisons above hold the two
# to each other in total over a run (the driver's dict of counts); these hold them call by call,
# and to the traffic itself: the PUBLISH packets that went each way, the publishes and deliveries
# of the stream by topic, so a count both paths got wrong fails too. Each call's counts are summed
# from its CountMetrics pairs (a list: a metric named twice in one command counts twice at the
# shell, which adds every pair; the driver's dict would keep one). The shell's side of it:
# test_mqtt_shell_tallies.py.

TALLY_POLICIES = dict(pub=["devices/thermo-1/#"], sub_allow=["devices/thermo-1/#", "devices/thermo-1/telemetry"],
                      sub_check=["devices/+/telemetry"], recv=["devices/thermo-1/#"])
# Subscribed filters: an exact ALLOW grant (the delivery walk's `exact` set), a wildcard ALLOW
# grant, a filter whose every delivery is checked.
tally_filters = st.lists(st.sampled_from(["devices/thermo-1/telemetry", "devices/thermo-1/#",
                                          "devices/+/telemetry"]), min_size=1, max_size=3, unique=True)
# Properties that stop the publish walk without changing what the full path decides (no alias).
harmless_props = st.sampled_from([[(Prop.CONTENT_TYPE, "t")], [(Prop.USER_PROPERTY, ("k", "v"))],
                                  [(Prop.MESSAGE_EXPIRY_INTERVAL, 60)]])


def allowed_topic(topic: bytes) -> bool:
    """What TALLY_POLICIES say of a publish or a delivery on ``topic`` (as sent)."""
    return topic.startswith(b"devices/thermo-1/")


@st.composite
def tally_publish(draw, level: int) -> tuple[bytes, bytes, int]:
    """(packet, topic, QoS): allowed or denied, QoS 0 to 2, sometimes with properties (v5)."""
    topic = draw(fast_topics)
    qos = draw(st.integers(0, 2))
    props = draw(harmless_props) if level == MQTT_5 and draw(st.integers(0, 5)) == 0 else []
    packet = codec.encode_publish(topic, draw(st.binary(max_size=12)), qos=qos,
                                  packet_id=draw(st.integers(1, 6)) if qos else None, retain=draw(st.booleans()),
                                  level=level, properties=props)
    return packet, topic.encode(), qos


@st.composite
def cut_anywhere(draw, packets: list[bytes]) -> list[bytes]:
    """The packets once each, then each repeated (its decision cached by then), shuffled, and cut
    into chunks at packet ends and at random bytes (a packet split across reads)."""
    shuffled = draw(st.permutations([p for p in packets for _ in range(draw(st.integers(1, 6)))]))
    stream = b"".join(shuffled)
    cuts = draw(st.lists(st.sampled_from(list(itertools.accumulate(map(len, shuffled)))), max_size=12))
    # A chunk behind a split packet goes to the full path whole: at most a few splits, so that
    # the walk still gets chunks that start at a packet.
    cuts += draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=4))
    bounds = [0] + sorted({c for c in cuts if 0 < c < len(stream)}) + [len(stream)]
    # First each distinct packet once, whole, as a chunk of its own: the full path decides and
    # caches it (counted like the rest).
    return [b"".join(dict.fromkeys(packets))] + [stream[a:b] for a, b in itertools.pairwise(bounds)]


def summed(commands) -> Counter:
    """One call's counts, per metric and labels, summed over its CountMetrics pairs."""
    total: Counter = Counter()
    for c in commands:
        if isinstance(c, CountMetrics):
            for metric, n in c.counts:
                total[metric] += n
    return total


def publishes_in(chunks: list[bytes]) -> int:
    """The PUBLISH packets in what went one way (whole packets: the session sends no half)."""
    return sum(f.type == T.PUBLISH for f in codec.Framer(1 << 24).feed(b"".join(chunks)))


def _tally_run(level, setup, events, *, fast: bool, burst: int | None):
    """Like _run, with the counts of every call of ``events`` (after ``setup``) kept apart, and
    the bytes of the traffic each way."""
    clock = Clock()
    limiter = RateLimiter(1.0, burst, clock=clock) if burst else None
    s, _, _ = make(level, FakePolicies(**TALLY_POLICIES), clock=clock, rate_limiter=limiter, fast_paths=fast,
                   rate_limit=RateLimitConfig(action="drop"))  # over the rate: counted, and on
    per_call: list[Counter] = []
    sent: dict[str, list[bytes]] = {"client": [], "broker": []}

    def apply(out, record: bool):
        if record:
            per_call.append(summed(out.commands))
            sent["broker"] += [bytes(x) for x in out.to_broker]
            sent["client"] += [bytes(x) for x in out.to_client]
        if out.auth is not None:
            apply(s.authenticated(ALICE), record)
        if out.open_upstream:
            apply(s.broker_data(connack(level)), record)

    for record, (side, chunk) in [(False, e) for e in setup] + [(True, e) for e in events]:
        apply(s.client_data(chunk) if side == "client" else s.broker_data(chunk), record)
    assert not s.closed, "the traffic is meant to keep the connection open"
    return per_call, sent


def assert_same_counts(level, setup, events, *, burst=None, hits: dict | None = None):
    """The fast paths on and off count the same, call by call; returns the totals and the traffic."""
    with counting_fast_paths(hits if hits is not None else {}):
        fast, sent = _tally_run(level, setup, events, fast=True, burst=burst)
    full, full_sent = _tally_run(level, setup, events, fast=False, burst=burst)
    assert sent == full_sent
    for i, (f, g) in enumerate(zip(fast, full, strict=True)):
        assert f == g, f"call {i}: the fast paths counted {dict(f)}, the full path {dict(g)}"
    return sum(fast, Counter()), sent


def test_publish_counts_match_the_full_path_and_the_traffic():
    stats: Counter = Counter()

    @REACH_SETTINGS
    @given(st.data(), levels)
    def check(data, level):
        drawn = data.draw(st.lists(tally_publish(level), min_size=1, max_size=6))
        drawn.append(data.draw(tally_publish(level).filter(lambda p: allowed_topic(p[1]) and p[2] < 2)))
        chunks = data.draw(cut_anywhere([p for p, _, _ in drawn]))
        burst = data.draw(st.sampled_from([None, None, None, 1, 5, 40]))
        hits: dict = {}
        total, sent = assert_same_counts(level, [("client", connect_bytes(level))],
                                         [("client", c) for c in chunks], burst=burst, hits=hits)
        stats["examples"] += 1
        stats["client"] += bool(hits.get("client"))
        # Held to the traffic: every PUBLISH forwarded counted once, as client_to_broker, and every
        # publish of the stream decided once: allowed, denied or over the rate.
        stream = codec.Framer(1 << 20).feed(b"".join(chunks))
        decoded = [codec.decode_publish(f, level) for f in stream]
        assert total[TO_BROKER] == publishes_in(sent["broker"])
        assert total[TO_CLIENT] == 0 and total[ALLOWED_RECEIVE] == 0
        assert total[ALLOWED_PUBLISH] + total[DENY_COUNT["publish"]] + total[RATE_LIMITED] == len(decoded)
        if burst is None:
            allowed = [p for p in decoded if allowed_topic(p.topic)]
            assert total[ALLOWED_PUBLISH] == len(allowed)
            assert total[DENY_COUNT["publish"]] == len(decoded) - len(allowed)
            assert total[TO_BROKER] == sum(p.qos < 2 for p in allowed)  # QoS 2: held until a PUBREL

    check()
    assert_fast_paths_ran(stats, "client", "publish counts")


def test_delivery_counts_match_the_full_path_and_the_traffic():
    stats: Counter = Counter()

    @REACH_SETTINGS
    @given(st.data(), levels, tally_filters)
    def check(data, level, topic_filters):
        sub = codec.encode_subscribe(Subscribe(1, [Subscription(f, 2) for f in topic_filters]), level)
        suback = codec.encode_suback(codec.Suback(1, [2] * len(topic_filters)), level)
        drawn = data.draw(st.lists(fast_delivery(level), min_size=1, max_size=6))
        drawn.append(data.draw(fast_delivery(level, allowed_topics)))
        chunks = data.draw(cut_anywhere(drawn))
        hits: dict = {}
        setup = [("client", connect_bytes(level)), ("client", sub), ("broker", suback)]
        total, sent = assert_same_counts(level, setup, [("broker", c) for c in chunks], hits=hits)
        stats["examples"] += 1
        stats["broker"] += bool(hits.get("broker"))
        stream = [codec.decode_publish(f, level) for f in codec.Framer(1 << 20).feed(b"".join(chunks))]
        allowed = sum(allowed_topic(p.topic) for p in stream)
        assert total[TO_CLIENT] == publishes_in(sent["client"]) == allowed
        assert total[ALLOWED_RECEIVE] == allowed
        assert total[DENY_COUNT["receive"]] == len(stream) - allowed
        assert total[TO_BROKER] == 0 and total[ALLOWED_PUBLISH] == 0

    check()
    assert_fast_paths_ran(stats, "broker", "delivery counts")


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_a_delivery_with_packet_id_0_closes_the_session_on_the_fast_path_too(level):
    """A broker (or whatever answers as one) delivers a QoS 1 PUBLISH with packet id 0 on a topic
    the client may receive: a protocol error. The full path closes the connection and the client
    never sees it; the fast path used to pass it on, the topic being cached as allowed."""
    sub = codec.encode_subscribe(Subscribe(1, [Subscription("devices/+/telemetry", 2)]), level)
    suback = codec.encode_suback(codec.Suback(1, [2]), level)
    good = codec.encode_publish("devices/thermo-1/telemetry", b"x", qos=1, packet_id=7, level=level)
    bad = bytearray(good)
    at = bad.index(b"\x00\x07", 4)
    bad[at:at + 2] = b"\x00\x00"
    events = [("client", connect_bytes(level)), ("client", sub), ("broker", suback), ("broker", good),
              ("broker", good + bytes(bad) + good)]
    hits: dict = {}
    with counting_fast_paths(hits):
        fast = _run(level, events, fast=True, burst=None)
    assert hits.get("broker")  # the fast path walked the last chunk (and took its first packet)
    assert fast[1][-1].startswith(good) and bytes(bad) not in fast[1][-1]
    deadlines = fast[3][0]
    assert deadlines[-1][2] is not None and deadlines[-1][2].reason == "protocol_error"
    assert_same(level, events)


def _patched(packet: bytes, old: bytes, new: bytes) -> bytes:
    at = packet.index(old, 2)
    return packet[:at] + new + packet[at + len(old):]


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_traffic_cut_at_every_byte_is_decided_as_by_the_full_path(level):
    """One stream of everything the walk must take or stop at, cut in two at every byte: allowed
    QoS 0/1 and retained, a denied topic and one a prefix of an allowed one, QoS 2, a topic alias,
    packet id 0, a packet of exactly the maximum size, then one a byte over it; and deliveries
    with the same odd ones."""
    max_size = 64
    t = "devices/thermo-1/telemetry"

    def p(topic=t, qos=0, pid=None, retain=False, payload=b"xy", props=()):
        return codec.encode_publish(topic, payload, qos=qos, packet_id=pid, retain=retain, level=level,
                                    properties=list(props))

    empty = len(p(payload=b""))
    pid0 = _patched(p(qos=1, pid=0x0909), b"\x09\x09", b"\x00\x00")
    denied, prefix = p("devices/thermo-2/telemetry"), p("devices/thermo-1/telemetr")
    alias = [p(props=[(Prop.TOPIC_ALIAS, 1)])] if level == MQTT_5 else []
    warm = p() + p(qos=1, pid=3) + p(retain=True) + denied + prefix
    largest, over = p(payload=b"p" * (max_size - empty)), p(payload=b"p" * (max_size + 1 - empty))
    stream = b"".join([p(), p(), p(qos=1, pid=3), denied, p(), p(retain=True), prefix, largest, p(), p(qos=2, pid=4),
                       *alias, p(), pid0, p(), over, p()])
    start = [("client", connect_bytes(level)), ("client", warm)]
    for cut in range(len(stream) + 1):
        events = start + [("client", c) for c in (stream[:cut], stream[cut:]) if c]
        assert_same(level, events, max_packet_size=max_size)
    sub = codec.encode_subscribe(Subscribe(1, [Subscription("devices/+/telemetry", 2)]), level)
    suback = codec.encode_suback(codec.Suback(1, [2]), level)
    start = [("client", connect_bytes(level)), ("client", sub), ("broker", suback), ("broker", p() + denied)]
    stream = b"".join([p(), p(qos=1, pid=5), p(), denied, p(qos=2, pid=6), p(), pid0, p()])
    for cut in range(len(stream) + 1):
        assert_same(level, start + [("broker", c) for c in (stream[:cut], stream[cut:]) if c])
