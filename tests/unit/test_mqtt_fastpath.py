"""The session's fast paths decide exactly as the full path does.

A chunk of PUBLISH packets whose decisions are cached skips the Frame and
PublishInfo objects and the per-message rate-limiter call (Session._client_fast,
Session._broker_fast). An attacker who could make the two paths disagree could
get past a check, so every test here runs the same traffic through a session
with the fast paths and one without, and requires the same bytes each way, the
same audit lines and the same state: random and mutated streams split at random
points, with repeated topics so that the fast paths actually run, and a rate
limiter tight enough to run dry in the middle of a chunk.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.mqtt import codec
from proxy.mqtt.packets import MQTT_5, MQTT_311, Prop, Subscribe, Subscription
from proxy.mqtt.session import Actions, RateLimiter
from tests.unit.test_mqtt_fuzz import (
    POLICIES, SETTINGS, broker_packet, client_packet, connect_bytes, mutated, splits,
)
from tests.unit.test_mqtt_session import ALICE, Clock, FakePolicies, connack, make, open_session, pub

levels = st.sampled_from([MQTT_311, MQTT_5])


def _run(level, client_chunks, broker_chunks, *, fast: bool, burst: int | None):
    clock = Clock()
    limiter = RateLimiter(1.0, burst, clock=clock) if burst else None
    s, _, audit = make(level, FakePolicies(**POLICIES), clock=clock, rate_limiter=limiter)
    s.fast_paths = fast
    to_broker: list = []
    to_client: list = []

    def apply(acts):
        to_broker.append(b"".join(bytes(x) for x in acts.to_broker))
        to_client.append(b"".join(bytes(x) for x in acts.to_client))
        if acts.auth is not None:
            apply(s.authenticated(ALICE))
        if acts.open_upstream:
            apply(s.broker_data(connack(level)))

    rest_c, rest_b = list(client_chunks), list(broker_chunks)
    while rest_c or rest_b:
        if rest_c:
            apply(s.client_data(rest_c.pop(0)))
        if rest_b:
            apply(s.broker_data(rest_b.pop(0)))
    state = (s.closed, s._published, s._forwarded, s._delivered, s._handed, sorted(s._client_qos2_answered),
             sorted(s._broker_qos2_dropped), s._last_rx)
    buckets = {k: tuple(v) for k, v in limiter._buckets.items()} if limiter else {}
    return to_broker, to_client, [dict(r, ts=None) for r in audit.records], state, buckets


def assert_same(level, client_chunks, broker_chunks, burst=None):
    fast = _run(level, client_chunks, broker_chunks, fast=True, burst=burst)
    full = _run(level, client_chunks, broker_chunks, fast=False, burst=burst)
    # Chunk by chunk, not only in total: the fast path must not delay or reorder anything.
    assert fast[0] == full[0]
    assert fast[1] == full[1]
    assert fast[2] == full[2]
    assert fast[3] == full[3]
    assert fast[4] == full[4]


@st.composite
def busy_client(draw, level):
    """A publisher repeating a few topics (so decisions are cached), with other packets mixed in."""
    packets = [connect_bytes(level)]
    for _ in range(draw(st.integers(1, 6))):
        packets += [draw(client_packet(level))] * draw(st.integers(1, 8))
    return b"".join(packets)


@SETTINGS
@given(st.data(), levels, st.sampled_from([None, 1, 3, 300]))
def test_fast_path_matches_full_path_on_client_traffic(data, level, burst):
    stream = data.draw(busy_client(level))
    if data.draw(st.booleans()):
        stream = data.draw(mutated(stream))
    assert_same(level, data.draw(splits(stream)), [], burst)


@SETTINGS
@given(st.data(), levels, st.sampled_from(["devices/+/telemetry", "devices/thermo-1/#", "#"]))
def test_fast_path_matches_full_path_on_deliveries(data, level, topic_filter):
    sub = codec.encode_subscribe(Subscribe(1, [Subscription(topic_filter, 2)]), level)
    packets = []
    for _ in range(data.draw(st.integers(1, 6))):
        packets += [data.draw(broker_packet(level))] * data.draw(st.integers(1, 8))
    stream = b"".join(packets)
    if data.draw(st.booleans()):
        stream = data.draw(mutated(stream))
    assert_same(level, [connect_bytes(level), sub], data.draw(splits(stream)))


def test_a_chunk_of_cached_publishes_is_one_slice_to_the_broker():
    s, policies, _ = open_session()
    packet = pub("devices/thermo-1/telemetry")
    s.client_data(packet)  # first: the full path decides and caches
    acts = s.client_data(packet * 100)
    assert [bytes(x) for x in acts.to_broker] == [packet * 100]
    assert len(policies.asked) == 1  # nothing asked again
    # ... and it was the fast path that walked it, to its end:
    assert s._client_fast(Actions(), memoryview(packet * 100)) == len(packet) * 100


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
