"""What one connection can make the gateway hold or compute (``mqtt.limits``), limit by limit:
each test makes the move an attacker would and asserts the refusal and its reason code."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import MqttLimitsConfig, RateLimitConfig
from proxy.mqtt import codec
from proxy.mqtt.codec import ProtocolError
from proxy.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connect,
    PacketType,
    Reason,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
)
from proxy.mqtt.subscriptions import SubscriptionQuota
from proxy.ratelimit import RateLimiter
from tests.unit.mqtt_driver import Outcome
from tests.unit.test_mqtt_session import (
    ALICE,
    BOB,
    Clock,
    FakePolicies,
    connack,
    connect_packet,
    denials,
    make,
    only,
    open_session,
    pub,
    suback_of,
)

T = PacketType
def takes_nothing_more(s) -> bool:
    """The session ended: whatever the client sends now is neither kept nor answered."""
    return s.closed and s.client_data(b"\x30" + codec.encode_varint(1000) + b"x" * 1000).commands == []


LIMITS = MqttLimitsConfig(connect_max_bytes=4096, client_id_max_bytes=64, username_max_bytes=128,
                          topic_max_bytes=100, subscriptions_per_connection=5, subscriptions_per_identity=8)


def connect_header(total_remaining: int) -> bytes:
    return b"\x10" + codec.encode_varint(total_remaining)


def v5_connect_start(remaining: int) -> bytes:
    """The first bytes of a v5 CONNECT announcing ``remaining`` bytes: header, name, level."""
    return connect_header(remaining) + b"\x00\x04MQTT\x05\x02\x00\x1e"


def unsuback_reasons(acts, level) -> list[int]:
    f = only(acts.to_client, T.UNSUBACK)
    body = bytes(f.body)
    return list(body[3:]) if level == MQTT_5 else []


# --------------------------------------------------------------------------- before authentication


def test_oversized_connect_is_refused_at_its_fixed_header_v5():
    """A CONNECT announcing 1 MiB: answered CONNACK 0x95 as soon as its level byte is in;
    nothing of its body is buffered and no credential is asked about."""
    s, _, audit = make(MQTT_5, limits=LIMITS)
    acts = s.client_data(v5_connect_start(1 << 20))
    assert codec.decode_connack(only(acts.to_client, T.CONNACK).body, MQTT_5).reason == Reason.PACKET_TOO_LARGE
    assert acts.close is not None and acts.auth is None
    assert denials(audit, "connect")[0]["reason_code"] == Reason.PACKET_TOO_LARGE
    assert takes_nothing_more(s)


def test_oversized_connect_waits_only_for_its_level_byte():
    """The header alone says the size; the answer waits for the version (a dozen bytes), and
    those few bytes are all the session holds meanwhile."""
    s, _, _ = make(MQTT_5, limits=LIMITS)
    start = v5_connect_start(1 << 20)
    acts = s.client_data(start[:5])
    assert not acts.to_client and acts.close is None and not s.closed
    acts = s.client_data(start[5:] + b"x" * 60_000)  # whatever else comes is not kept
    assert codec.decode_connack(only(acts.to_client, T.CONNACK).body, MQTT_5).reason == Reason.PACKET_TOO_LARGE
    assert acts.close is not None and takes_nothing_more(s)


def test_oversized_connect_v3_is_a_plain_close():
    s, _, audit = make(MQTT_311, limits=LIMITS)
    big = connect_packet(MQTT_311, "c", password=b"x" * 5000)
    acts = s.client_data(big)
    assert acts.to_client == [] and acts.close is not None and acts.auth is None
    assert denials(audit, "connect")


def test_connect_at_the_limit_is_accepted():
    s, _, _ = make(MQTT_5, limits=LIMITS)
    filler = 1000 + LIMITS.connect_max_bytes - len(connect_packet(MQTT_5, "c", password=b"x" * 1000))
    packet = connect_packet(MQTT_5, "c", password=b"x" * filler)
    assert len(packet) == LIMITS.connect_max_bytes
    acts = s.client_data(packet)
    assert acts.auth is not None and acts.close is None


def test_preauth_limit_never_exceeds_the_packet_size():
    s, _, _ = make(MQTT_5, max_packet_size=1000, limits=LIMITS)
    acts = s.client_data(connect_packet(MQTT_5, "c", password=b"x" * 2000))
    assert codec.decode_connack(only(acts.to_client, T.CONNACK).body, MQTT_5).reason == Reason.PACKET_TOO_LARGE


def test_what_waits_for_authentication_is_bounded_by_the_preauth_limit():
    """Publishes pipelined behind the CONNECT are held only up to connect_max_bytes (not
    max_packet_size + 64 KiB), and a packet over it is refused at its header."""
    s, _, _ = make(MQTT_5, limits=LIMITS)
    assert s.client_data(connect_packet(MQTT_5)).auth is not None
    accepted = 0  # bytes of the publishes held (taken without a refusal) before the one refused
    for _ in range(10):
        packet = pub("devices/thermo-1/t", b"x" * 900, level=MQTT_5)
        acts = s.client_data(packet)
        if acts.close:
            break
        accepted += len(packet)
    assert acts.close is not None and acts.close.reason == "buffer_full"
    assert 0 < accepted <= LIMITS.connect_max_bytes
    assert codec.decode_connack(only(acts.to_client, T.CONNACK).body, MQTT_5).reason == Reason.QUOTA_EXCEEDED
    s, _, _ = make(MQTT_5, limits=LIMITS)
    s.client_data(connect_packet(MQTT_5))
    acts = s.client_data(b"\x30" + codec.encode_varint(100_000))  # announced, never sent
    assert codec.decode_connack(only(acts.to_client, T.CONNACK).body, MQTT_5).reason == Reason.PACKET_TOO_LARGE
    assert acts.close is not None and takes_nothing_more(s)


def test_preauth_budget_counts_held_packet_overhead():
    """Many tiny packets behind the CONNECT: each held one costs its bookkeeping too, so the
    count of packets held stays at what the budget allows, not budget / 2 bytes (PINGREQs)."""
    from proxy.mqtt.session import HELD_PACKET_OVERHEAD

    s, _, _ = make(MQTT_5, limits=LIMITS)
    assert s.client_data(connect_packet(MQTT_5)).auth is not None
    acts = s.client_data(b"\xc0\x00" * 1000)  # 2 KB of PINGREQs: 1000 packets held at ~300 B each
    assert acts.close is not None and acts.close.reason == "buffer_full"
    assert codec.decode_connack(only(acts.to_client, T.CONNACK).body, MQTT_5).reason == Reason.QUOTA_EXCEEDED
    # Dropped with the refusal: a late authentication and CONNACK release nothing to the broker.
    assert s.authenticated(ALICE) == Outcome() and s.broker_data(connack(MQTT_5)) == Outcome()
    s, _, _ = make(MQTT_5, limits=LIMITS)
    s.client_data(connect_packet(MQTT_5))
    held = 0
    for _ in range(1000):
        acts = s.client_data(b"\xc0\x00")
        if acts.close:
            break
        held += 1
    assert held * (2 + HELD_PACKET_OVERHEAD) <= LIMITS.connect_max_bytes < (held + 1) * (2 + HELD_PACKET_OVERHEAD)


def test_preauth_budget_counts_the_partial_packet():
    """Held packets plus a partial one in the framer: together they may not pass the budget
    (each alone is under it)."""
    s, _, audit = make(MQTT_5, limits=LIMITS)
    s.client_data(connect_packet(MQTT_5))
    acts = s.client_data(pub("devices/thermo-1/t", b"x" * 3000, level=MQTT_5))
    assert acts.close is None
    partial = pub("devices/thermo-1/t", b"x" * 3000, level=MQTT_5)
    acts = s.client_data(partial[:2000])  # 3 KB held + 2 KB partial > 4 KiB
    assert acts.close is not None and acts.close.reason == "buffer_full"
    assert codec.decode_connack(only(acts.to_client, T.CONNACK).body, MQTT_5).reason == Reason.QUOTA_EXCEEDED
    assert denials(audit, "connect")[-1]["held"] > LIMITS.connect_max_bytes
    # 3.1.1: CONNACK 3 (server unavailable), the code it has for it
    s, _, _ = make(MQTT_311, limits=LIMITS)
    s.client_data(connect_packet(MQTT_311) + pub("devices/thermo-1/t", b"x" * 3000) + partial[:2000])
    assert s.closed


def test_packets_up_to_max_packet_size_pass_once_authenticated():
    s, _, _ = open_session(MQTT_5, limits=LIMITS)
    raw = pub("devices/thermo-1/t", b"x" * 10_000, level=MQTT_5)
    acts = s.client_data(raw)
    assert acts.close is None and b"".join(bytes(x) for x in acts.to_broker) == raw


@pytest.mark.parametrize("level,code", [(MQTT_5, Reason.CLIENT_IDENTIFIER_NOT_VALID), (MQTT_311, 0x02)])
def test_long_client_id_is_refused_before_any_credential_check(level, code):
    # Not even valid UTF-8: the length is checked before the string is decoded.
    raw_id = b"\xff" * (LIMITS.client_id_max_bytes + 1)
    packet = connect_packet(level, "X" * len(raw_id)).replace(b"X" * len(raw_id), raw_id)
    s, _, audit = make(level, limits=LIMITS)
    acts = s.client_data(packet)
    assert acts.auth is None and acts.close is not None
    assert codec.decode_connack(only(acts.to_client, T.CONNACK).body, level).reason == code
    assert "client id of 65 bytes exceeds the limit of 64" in denials(audit, "connect")[0]["reason"]
    s, _, _ = make(level, limits=LIMITS)
    assert s.client_data(connect_packet(level, "c" * LIMITS.client_id_max_bytes)).auth is not None


@pytest.mark.parametrize("level,code", [(MQTT_5, Reason.BAD_USER_NAME_OR_PASSWORD), (MQTT_311, 0x04)])
def test_long_user_name_is_refused_before_any_credential_check(level, code):
    s, _, audit = make(level, limits=LIMITS)
    acts = s.client_data(connect_packet(level, username="u" * (LIMITS.username_max_bytes + 1)))
    assert acts.auth is None and acts.close is not None
    assert codec.decode_connack(only(acts.to_client, T.CONNACK).body, level).reason == code
    assert "user name of 129 bytes" in denials(audit, "connect")[0]["reason"]
    s, _, _ = make(level, limits=LIMITS)
    assert s.client_data(connect_packet(level, username="u" * LIMITS.username_max_bytes)).auth is not None


def test_long_will_topic_is_refused_before_any_credential_check():
    will = Will("w" * (LIMITS.topic_max_bytes + 1), b"bye", 0, False)
    s, _, audit = make(MQTT_5, limits=LIMITS)
    acts = s.client_data(connect_packet(MQTT_5, will=will))
    assert acts.auth is None
    assert codec.decode_connack(only(acts.to_client, T.CONNACK).body, MQTT_5).reason == Reason.TOPIC_NAME_INVALID
    assert "Will topic of 101 bytes" in denials(audit, "connect")[0]["reason"]
    # 3.1.1 has no CONNACK code for a topic: a plain close, as for a Will topic with a wildcard.
    s, _, _ = make(MQTT_311, limits=LIMITS)
    acts = s.client_data(connect_packet(MQTT_311, will=will))
    assert acts.auth is None and acts.to_client == [] and acts.close is not None
    s, _, _ = make(MQTT_5, limits=LIMITS)
    ok = Will("w" * LIMITS.topic_max_bytes, b"bye", 0, False)
    assert s.client_data(connect_packet(MQTT_5, will=ok)).auth is not None


# --------------------------------------------------------------------------- after authentication


@pytest.mark.parametrize("level", [MQTT_5, MQTT_311])
def test_long_publish_topic_ends_the_connection_before_the_policy(level):
    p = FakePolicies(pub=["#"])
    s, _, audit = open_session(level, policies=p, limits=LIMITS)
    asked = len(p.asked)
    acts = s.client_data(pub("t" * (LIMITS.topic_max_bytes + 1), qos=1, level=level))
    assert acts.to_broker == [] and acts.close is not None
    if level == MQTT_5:
        assert bytes(acts.to_client[0]) == b"\xe0\x01\x90"  # DISCONNECT topic name invalid
    else:
        assert acts.to_client == []
    assert len(p.asked) == asked and takes_nothing_more(s)
    assert denials(audit, "publish")[0]["reason_code"] == Reason.TOPIC_NAME_INVALID
    s, _, _ = open_session(level, policies=p, limits=LIMITS)
    assert s.client_data(pub("t" * LIMITS.topic_max_bytes, level=level)).to_broker


@pytest.mark.parametrize("level,code", [(MQTT_5, Reason.TOPIC_FILTER_INVALID), (MQTT_311, 0x80)])
def test_long_subscribe_filter_is_refused_alone_and_never_asked(level, code):
    p = FakePolicies(sub_allow=["a/1"])
    s, _, audit = open_session(level, policies=p, limits=LIMITS)
    long_filter = "f" * (LIMITS.topic_max_bytes + 1)
    acts = s.client_data(codec.encode_subscribe(
        Subscribe(1, [Subscription(long_filter, 0), Subscription("a/1", 0)]), level))
    up = codec.decode_subscribe(only(acts.to_broker, T.SUBSCRIBE).body, level)
    assert [x.topic_filter for x in up.subscriptions] == ["a/1"]
    assert ("subscribe", long_filter) not in p.asked
    assert suback_of(s.broker_data(codec.encode_suback(codec.Suback(1, [0]), level)), level) == [code, 0]
    line = denials(audit, "subscribe")[0]
    assert "101 bytes" in line["reason"] and len(line["resource"]) <= 64


def test_long_subscribe_filter_is_not_decoded():
    """Invalid UTF-8 in an over-long filter costs no decoding: it is refused by length."""
    body = b"\x00\x01" + b"\x00\x65" + b"\xff" * 101 + b"\x00"
    sub = codec.decode_subscribe(memoryview(body), MQTT_311, 100)
    assert sub.subscriptions[0].too_long == 101
    with pytest.raises(ProtocolError):
        codec.decode_subscribe(memoryview(body), MQTT_311)


@pytest.mark.parametrize("level", [MQTT_5, MQTT_311])
def test_long_unsubscribe_filter_ends_the_connection(level):
    s, _, audit = open_session(level, limits=LIMITS)
    acts = s.client_data(codec.encode_unsubscribe(Unsubscribe(2, ["u" * (LIMITS.topic_max_bytes + 1)]), level))
    assert acts.to_broker == [] and acts.close is not None
    if level == MQTT_5:
        assert bytes(acts.to_client[0]) == b"\xe0\x01\x8f"  # DISCONNECT topic filter invalid
    assert denials(audit, "unsubscribe")


def test_subscriptions_per_connection_come_from_the_config():
    p = FakePolicies(sub_allow=[f"a/{i}" for i in range(10)])
    s, _, _audit = open_session(MQTT_311, policies=p, limits=LIMITS)
    subs = [Subscription(f"a/{i}", 0) for i in range(7)]
    acts = s.client_data(codec.encode_subscribe(Subscribe(1, subs), MQTT_311))
    up = codec.decode_subscribe(only(acts.to_broker, T.SUBSCRIBE).body, MQTT_311)
    assert len(up.subscriptions) == LIMITS.subscriptions_per_connection
    assert suback_of(s.broker_data(codec.encode_suback(codec.Suback(1, [0] * 5), MQTT_311)), MQTT_311) == \
        [0] * 5 + [0x80, 0x80]
    # A re-subscription of a held filter costs nothing.
    acts = s.client_data(codec.encode_subscribe(Subscribe(2, [Subscription("a/0", 1)]), MQTT_311))
    assert only(acts.to_broker, T.SUBSCRIBE)


def quota_session(quota, identity, level=MQTT_5, **kw):
    s, _p, audit = make(level, FakePolicies(sub_allow=[f"a/{i}" for i in range(20)]), limits=LIMITS,
                        subscription_quota=quota, **kw)
    s.client_data(connect_packet(level))
    s.authenticated(identity)
    s.broker_data(connack(level))
    return s, audit


def subscribe(s, pid, *filters, level=MQTT_5):
    """The SUBACK codes the client gets (the broker grants whatever reaches it)."""
    acts = s.client_data(codec.encode_subscribe(Subscribe(pid, [Subscription(f, 0) for f in filters]), level))
    if acts.to_client:
        return suback_of(acts, level)
    up = codec.decode_subscribe(only(acts.to_broker, T.SUBSCRIBE).body, level)
    return suback_of(s.broker_data(codec.encode_suback(codec.Suback(pid, [0] * len(up.subscriptions)), level)), level)


def test_subscriptions_per_identity_across_connections():
    """Two connections of alice share 8 slots; bob has his own; a close or an UNSUBSCRIBE
    gives slots back."""
    quota = SubscriptionQuota(LIMITS.subscriptions_per_identity)
    first, _ = quota_session(quota, ALICE)
    second, audit = quota_session(quota, ALICE)
    other, _ = quota_session(quota, BOB)
    assert subscribe(first, 1, "a/0", "a/1", "a/2", "a/3", "a/4") == [0] * 5
    assert subscribe(second, 1, "a/5", "a/6", "a/7", "a/8") == [0, 0, 0, 0x97]
    assert quota.held(ALICE.sub) == 8
    assert "identity" in denials(audit, "subscribe")[0]["reason"]
    assert subscribe(other, 1, "a/0", "a/1") == [0, 0]
    first.client_data(codec.encode_unsubscribe(Unsubscribe(2, ["a/0", "a/1", "nothing"]), MQTT_5))
    assert quota.held(ALICE.sub) == 6
    assert subscribe(second, 2, "a/9", "a/10") == [0, 0]
    first.client_closed()
    assert quota.held(ALICE.sub) == 5
    third, _ = quota_session(quota, ALICE)
    assert subscribe(third, 1, "a/11", "a/12", "a/13", "a/14") == [0, 0, 0, 0x97]
    second.client_data(codec.encode_disconnect(MQTT_5))
    third.tick()  # still open: its 3 stay held
    assert quota.held(ALICE.sub) == 3 and quota.held(BOB.sub) == 2


def test_denied_filters_take_no_slot():
    quota = SubscriptionQuota(2)
    s, _ = quota_session(quota, ALICE)
    assert subscribe(s, 1, "x/denied", "a/1") == [0x87, 0]
    assert quota.held(ALICE.sub) == 1


# --------------------------------------------------------------------------- SUBSCRIBE / UNSUBSCRIBE floods


@pytest.mark.parametrize("level", [MQTT_5, MQTT_311])
def test_subscribe_filters_are_charged_to_the_rate_limit(level):
    clock = Clock()
    limiter = RateLimiter(1, 4, clock=clock)
    p = FakePolicies(sub_allow=[f"a/{i}" for i in range(20)])
    s, _, audit = open_session(level, policies=p, clock=clock, rate_limiter=limiter,
                               rate_limit=RateLimitConfig(1, 4, "drop"))
    assert subscribe(s, 1, "a/1", "a/2", "a/3", level=level) == [0, 0, 0]
    asked = len(p.asked)
    for pid in range(2, 12):  # each asks for 2 tokens; 1 is left
        acts = s.client_data(codec.encode_subscribe(Subscribe(pid, [Subscription("a/4", 0),
                                                                     Subscription("a/5", 0)]), level))
        assert acts.to_broker == [] and acts.close is None
        assert suback_of(acts, level) == [0x97 if level == MQTT_5 else 0x80] * 2
    assert len(p.asked) == asked  # refused before the policy
    lines = [r for r in denials(audit, "subscribe") if r["reason"] == "rate limit"]
    assert len(lines) == 1 and lines[0]["count"] == 1  # one line per second
    clock.t += 0.5
    s.client_closed()
    lines = [r for r in denials(audit, "subscribe") if r["reason"] == "rate limit"]
    assert [r["count"] for r in lines] == [1, 9]  # the rest is written at close: nothing lost


def test_subscribe_over_the_rate_disconnects_with_0x96():
    clock = Clock()
    s, _, _ = open_session(MQTT_5, clock=clock, rate_limiter=RateLimiter(1, 1, clock=clock))
    acts = s.client_data(codec.encode_subscribe(Subscribe(1, [Subscription("a", 0), Subscription("b", 0)]), 5))
    assert bytes(acts.to_client[0]) == b"\xe0\x01\x96" and acts.close is not None


@pytest.mark.parametrize("level", [MQTT_5, MQTT_311])
def test_unsubscribe_flood_is_rate_limited_and_audited(level):
    clock = Clock()
    limiter = RateLimiter(1, 3, clock=clock)
    s, _, audit = open_session(level, clock=clock, rate_limiter=limiter, rate_limit=RateLimitConfig(1, 3, "drop"))
    acts = s.client_data(codec.encode_unsubscribe(Unsubscribe(1, ["a", "b", "c"]), level))
    assert only(acts.to_broker, T.UNSUBSCRIBE)
    acts = s.client_data(codec.encode_unsubscribe(Unsubscribe(2, ["a"]), level))
    assert acts.to_broker == []
    if level == MQTT_5:
        assert unsuback_reasons(acts, level) == [Reason.UNSPECIFIED_ERROR] and acts.close is None
    else:  # a 3.1.1 UNSUBACK cannot refuse
        assert acts.close is not None and acts.close.reason == "rate_limited"
    assert [r["reason"] for r in denials(audit, "unsubscribe")] == ["rate limit"]


def test_unsubscribe_over_the_rate_disconnects_with_0x96():
    clock = Clock()
    s, _, _ = open_session(MQTT_5, clock=clock, rate_limiter=RateLimiter(1, 1, clock=clock))
    acts = s.client_data(codec.encode_unsubscribe(Unsubscribe(1, ["a", "b"]), 5))
    assert bytes(acts.to_client[0]) == b"\xe0\x01\x96" and acts.close is not None


def test_a_thousand_long_filter_subscribes_write_two_audit_lines():
    clock = Clock()
    s, p, audit = open_session(MQTT_5, clock=clock, limits=LIMITS)
    long_filter = "#" + "f" * 5000
    for pid in range(1, 1001):
        acts = s.client_data(codec.encode_subscribe(Subscribe(pid, [Subscription(long_filter, 0)]), 5))
        assert suback_of(acts, 5) == [Reason.TOPIC_FILTER_INVALID]
    assert not [q for q in p.asked if q[0] == "subscribe"]
    s.client_closed()
    lines = denials(audit, "subscribe")
    assert [r["count"] for r in lines] == [1, 999]
    assert all(len(r["resource"]) <= 64 for r in lines)


# --------------------------------------------------------------------------- decision caches in bytes


# What a cache holds is seen from the policy questions: a topic decided again was not cached. A
# connection's first topic stays cached while the cache has room; the count of other distinct
# topics after which it is asked about again is what the cache held.

LONG_TOPIC = 3000  # bytes of each topic: 64 KiB of topics is 21 of them


def cached_topics(feed, kind: str) -> int:
    """How many distinct long topics a fresh connection's cache holds before it lets the first go."""
    for n in range(1, 100):
        p = FakePolicies(pub=["#"], recv=["#"])
        s, _, _ = open_session(MQTT_311, policies=p, limits=MqttLimitsConfig(topic_max_bytes=4000))
        topics = [f"{i:04d}" + "t" * LONG_TOPIC for i in range(n + 1)]
        for t in topics:
            feed(s, pub(t))
        feed(s, pub(topics[0]))
        if [q[1] for q in p.asked if q[0] == kind].count(topics[0]) == 2:
            return n
    raise AssertionError("the cache never let its first topic go")


def test_publish_cache_is_bounded_in_bytes():
    held = cached_topics(lambda s, raw: s.client_data(raw), "publish")
    assert held >= 1 and held * (4 + LONG_TOPIC) <= 64 * 1024


def test_delivery_cache_is_bounded_in_bytes():
    held = cached_topics(lambda s, raw: s.broker_data(raw), "receive")
    assert held >= 1 and held * (4 + LONG_TOPIC) <= 64 * 1024


# --------------------------------------------------------------------------- the UTF-8 rule


_NONCHARS = "".join(chr(p) for plane in range(17) for p in (plane * 0x10000 + 0xFFFE, plane * 0x10000 + 0xFFFF))
# The rule as the regular expression the codec used to check it with: the reference.
_REFERENCE = re.compile("[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef" + re.escape(_NONCHARS) + "]")
_SPECIAL = st.sampled_from([*"\x00\x1f\x7f\x80\x9f\xa0\ufdcf\ufdd0\ufdef\ufdf0\ufffd\ufffe\uffff\ue000",
                            "\U0001fffe", "\U0001ffff", "\U0001fffd", "\U0010fffe", "\U0010ffff", "\U0001ffbe",
                            "\u3fff", "\u0fff", "é", "a", "/"])

_NOT_SURROGATES = st.characters(exclude_categories=["Cs"])  # UTF-8 cannot encode a lone surrogate


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(_SPECIAL, _NOT_SURROGATES), max_size=12).map("".join))
def test_strict_check_matches_the_reference_rule(text):
    raw = text.encode("utf-8")
    assert codec.has_forbidden_code_point(text, raw) == bool(_REFERENCE.search(text))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=12) | st.lists(_SPECIAL, max_size=6).map(lambda x: "".join(x).encode()))
def test_strict_decode_matches_the_reference_on_any_bytes(raw):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    expected_ok = text is not None and not _REFERENCE.search(text)
    try:
        got = codec.decode_utf8(raw, "t", strict=True)
    except ProtocolError as exc:
        assert not expected_ok and exc.reason_code == Reason.MALFORMED_PACKET
    else:
        assert expected_ok and got == text


def test_every_code_point_alone_and_in_company():
    for cp in list(range(0, 0x3000)) + list(range(0xFD00, 0x10000)) + \
            [p for plane in range(1, 17) for p in range(plane * 0x10000 + 0xFFF0, plane * 0x10000 + 0x10000)]:
        if 0xD800 <= cp <= 0xDFFF:
            continue
        for text in (chr(cp), "\u00a0" + chr(cp) + "a"):
            assert codec.has_forbidden_code_point(text, text.encode()) == bool(_REFERENCE.search(text)), hex(cp)


def test_peek_connect_level():
    packet = codec.encode_connect(Connect("MQTT", 5, True, 30, "c"))
    assert [codec.peek_connect_level(packet[:n]) for n in (1, 2, 4, 8)] == [None, None, None, None]
    assert codec.peek_connect_level(packet[:9]) == 5
    assert codec.peek_connect_level(codec.encode_connect(Connect("MQIsdp", 3, True, 30, "c"))) == 3
    assert codec.peek_connect_level(b"\x10\x80\x80\x40\x00\x04HTTP\x05") == 0


@pytest.mark.parametrize("key,value,message", [
    ("connect_max_bytes", 0, "must be at least 1"),
    ("topic_max_bytes", -1, "must be at least 1"),
    ("subscriptions_per_identity", 0, "must be at least 1"),
    ("client_id_max_bytes", 22, "must be at least 23"),  # [MQTT-3.1.3-5]
])
def test_limits_are_checked_at_start(key, value, message):
    from proxy.config import ConfigError, load_config_text
    text = f"oidc:\n  issuer: https://kc.example.org/realms/iot\nmqtt:\n  tls: false\n  limits:\n    {key}: {value}\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "proxy.yaml")
    assert str(info.value) == f"proxy.yaml: mqtt.limits.{key}: {message}"
