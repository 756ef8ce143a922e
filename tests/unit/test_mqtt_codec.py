"""The MQTT codec: framing limits, strict decoding, and encoders that decode back."""

from __future__ import annotations

import pytest

from proxy.mqtt import codec
from proxy.mqtt.codec import Framer, ProtocolError
from proxy.mqtt.packets import (
    MQTT_5,
    MQTT_31,
    MQTT_311,
    Connect,
    Prop,
    Reason,
    Suback,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
)


def code_of(fn, *args) -> int:
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    return info.value.reason_code


# --------------------------------------------------------------------------- framing


def test_whole_packets_are_slices_of_the_chunk():
    data = bytearray(b"\xc0\x00" + b"\x30\x05\x00\x01ahi" + b"\xd0\x00")
    frames = Framer(100).feed(data)
    assert [f.type for f in frames] == [12, 3, 13]
    assert all(f.raw.obj is data for f in frames)
    assert [(f.start, f.end) for f in frames] == [(0, 2), (2, 9), (9, 11)]
    assert bytes(frames[1].body) == b"\x00\x01ahi"


@pytest.mark.parametrize("cut", range(1, 12))
def test_split_anywhere_gives_the_same_packets(cut):
    data = b"\xc0\x00" + b"\x30\x05\x00\x01ahi" + b"\xd0\x00"
    f = Framer(100)
    frames = f.feed(data[:cut]) + f.feed(data[cut:])
    assert b"".join(bytes(x.raw) for x in frames) == data and len(frames) == 3
    assert f.buffered == 0


def test_one_byte_at_a_time():
    data = codec.encode_publish("a/b", b"x" * 300, qos=1, packet_id=3)
    f = Framer(1000)
    frames = [fr for i in range(len(data)) for fr in f.feed(data[i:i + 1])]
    assert len(frames) == 1 and bytes(frames[0].raw) == data and frames[0].start == -1


def test_fifth_length_byte_refused_at_once():
    f = Framer(1 << 28)
    assert f.feed(b"\x30\xff\xff\xff") == []
    assert code_of(f.feed, b"\xff") == Reason.MALFORMED_PACKET


def test_length_over_the_maximum_refused_before_the_body():
    f = Framer(1000)
    assert code_of(f.feed, b"\x30\xe9\x07") == Reason.PACKET_TOO_LARGE  # 1001 + 3 bytes of header
    f = Framer(1000)
    assert f.feed(b"\x30\xe5\x07") == []  # 997 + 3 = 1000: fine, waits for the body
    assert f.buffered == 3


def test_non_minimal_length_refused():
    assert code_of(Framer(100).feed, b"\xc0\x80\x00") == Reason.MALFORMED_PACKET


@pytest.mark.parametrize("byte1", [0x00, 0x01, 0x11, 0x42, 0x60, 0x80, 0xC1, 0xE1, 0xF2, 0x36, 0x38])
def test_reserved_types_and_flags_refused(byte1):
    assert code_of(Framer(100).feed, bytes([byte1, 0])) == Reason.MALFORMED_PACKET


# --------------------------------------------------------------------------- CONNECT


@pytest.mark.parametrize("level", [MQTT_31, MQTT_311, MQTT_5])
def test_connect_round_trip(level):
    props = [(Prop.SESSION_EXPIRY_INTERVAL, 60), (Prop.USER_PROPERTY, ("a", "1")),
             (Prop.USER_PROPERTY, ("a", "2"))] if level == 5 else []
    will_props = [(Prop.WILL_DELAY_INTERVAL, 5)] if level == 5 else []
    c = Connect("MQIsdp" if level == 3 else "MQTT", level, True, 30, "client-1", "user", b"pw",
                Will("w/t", b"gone", 1, True, will_props), props)
    raw = codec.encode_connect(c)
    assert codec.decode_connect(Framer(1000).feed(raw)[0].body) == c


def _connect_body(**kw) -> memoryview:
    c = Connect("MQTT", kw.pop("level", MQTT_311), True, 30, kw.pop("client_id", "c"), kw.pop("username", None),
                kw.pop("password", None), kw.pop("will", None), kw.pop("props", []))
    return Framer(1 << 20).feed(codec.encode_connect(c))[0].body


def test_connect_violations():
    body = bytearray(_connect_body())
    body[7] |= 0x01  # reserved flag
    assert code_of(codec.decode_connect, memoryview(body)) == Reason.MALFORMED_PACKET
    body = bytearray(_connect_body())
    body[7] |= 0x18  # Will QoS 3
    assert code_of(codec.decode_connect, memoryview(body)) == Reason.MALFORMED_PACKET
    body = bytearray(_connect_body())
    body[7] |= 0x20  # Will retain without a Will
    assert code_of(codec.decode_connect, memoryview(body)) == Reason.MALFORMED_PACKET
    body = bytearray(_connect_body(password=b"p"))
    body[7] &= 0x7F  # password without user name (3.1.1)
    assert code_of(codec.decode_connect, memoryview(body[:-3] + b"\x00\x01p")) == Reason.MALFORMED_PACKET
    assert code_of(codec.decode_connect, memoryview(bytes(_connect_body()) + b"x")) == Reason.MALFORMED_PACKET


@pytest.mark.parametrize("client_id", ["a\x00b", "\ud800", "a\x1fb", "\ufffe"])
def test_client_ids_must_be_clean_utf8(client_id):
    raw = client_id.encode("utf-8", "surrogatepass")
    body = bytes(_connect_body(client_id=""))[:-2] + len(raw).to_bytes(2, "big") + raw
    assert code_of(codec.decode_connect, memoryview(body)) == Reason.MALFORMED_PACKET


def test_will_topic_must_not_hold_wildcards():
    body = _connect_body(will=Will("a/#", b"", 0, False))
    assert code_of(codec.decode_connect, body) == Reason.TOPIC_NAME_INVALID


def test_unknown_level_carries_the_level():
    body = bytearray(_connect_body())
    body[6] = 7
    with pytest.raises(ProtocolError) as info:
        codec.decode_connect(memoryview(body))
    assert info.value.reason_code == Reason.UNSUPPORTED_PROTOCOL_VERSION and info.value.protocol_level == 7


# --------------------------------------------------------------------------- properties


def _v5_connect_with_raw_props(raw_props: bytes) -> memoryview:
    body = b"\x00\x04MQTT\x05\x02\x00\x1e" + codec.encode_varint(len(raw_props)) + raw_props + b"\x00\x01c"
    return memoryview(body)


@pytest.mark.parametrize("raw,code", [
    (b"\x11\x00\x00\x00\x01\x11\x00\x00\x00\x02", Reason.PROTOCOL_ERROR),   # Session Expiry twice
    (b"\x01\x01", Reason.PROTOCOL_ERROR),                                   # PUBLISH-only property in CONNECT
    (b"\x7f\x00", Reason.MALFORMED_PACKET),                                 # unknown property
    (b"\x21\x00\x00", Reason.PROTOCOL_ERROR),                               # Receive Maximum 0
    (b"\x27\x00\x00\x00\x00", Reason.PROTOCOL_ERROR),                       # Maximum Packet Size 0
    (b"\x17\x02", Reason.PROTOCOL_ERROR),                                   # boolean 2
    (b"\x15\x00\x05ab", Reason.MALFORMED_PACKET),                           # string longer than its properties
    (b"\x15\x00\x02\xc0\x80", Reason.MALFORMED_PACKET),                     # overlong UTF-8
])
def test_malformed_properties(raw, code):
    assert code_of(codec.decode_connect, _v5_connect_with_raw_props(raw)) == code


def test_repeatable_properties_are_kept_in_order():
    raw = b"\x26\x00\x01k\x00\x011\x26\x00\x01k\x00\x012"
    c = codec.decode_connect(_v5_connect_with_raw_props(raw))
    assert c.properties == [(Prop.USER_PROPERTY, ("k", "1")), (Prop.USER_PROPERTY, ("k", "2"))]


# --------------------------------------------------------------------------- PUBLISH


def test_publish_fields_without_copying_the_payload():
    raw = codec.encode_publish("a/b", b"payload", qos=2, packet_id=9, retain=True, level=MQTT_5,
                               properties=[(Prop.TOPIC_ALIAS, 3), (Prop.CONTENT_TYPE, "t")])
    frame = Framer(1000).feed(raw)[0]
    info = codec.decode_publish(frame, MQTT_5)
    assert (info.topic, info.qos, info.packet_id, info.retain, info.dup, info.topic_alias) == \
        (b"a/b", 2, 9, True, False, 3)
    assert bytes(frame.raw[info.payload_start:]) == b"payload"
    assert codec.read_publish_properties(frame, info) == [(Prop.TOPIC_ALIAS, 3), (Prop.CONTENT_TYPE, "t")]


def test_publish_topic_alias_zero_refused():
    raw = bytearray(codec.encode_publish("a", b"", level=MQTT_5, properties=[(Prop.TOPIC_ALIAS, 1)]))
    raw[-1] = 0  # alias value 1 -> 0 (the last byte of the property; the payload is empty)
    # MQTT 5.0 3.3.2.3.4: "Topic Alias invalid", not a generic protocol error.
    assert code_of(codec.decode_publish, Framer(100).feed(bytes(raw))[0], MQTT_5) == Reason.TOPIC_ALIAS_INVALID


def test_duplicate_topic_alias_refused():
    raw = b"\x30\x0a\x00\x01a\x06\x23\x00\x01\x23\x00\x02"
    assert code_of(codec.decode_publish, Framer(100).feed(raw)[0], MQTT_5) == Reason.PROTOCOL_ERROR


# --------------------------------------------------------------------------- SUBSCRIBE family


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_subscribe_round_trip(level):
    props = [(Prop.SUBSCRIPTION_IDENTIFIER, 300)] if level == 5 else []
    opts = 0x2E if level == 5 else 2
    s = Subscribe(10, [Subscription("a/+/c", opts), Subscription("$share/g/x/#", 1)], props)
    assert codec.decode_subscribe(Framer(1000).feed(codec.encode_subscribe(s, level))[0].body, level) == s
    sa = Suback(10, [0, 0x87], [(Prop.REASON_STRING, "no")] if level == 5 else [])
    assert codec.decode_suback(Framer(1000).feed(codec.encode_suback(sa, level))[0].body, level) == sa
    u = Unsubscribe(11, ["a/+/c", "b"], [(Prop.USER_PROPERTY, ("x", "y"))] if level == 5 else [])
    assert codec.decode_unsubscribe(Framer(1000).feed(codec.encode_unsubscribe(u, level))[0].body, level) == u


@pytest.mark.parametrize("level,opts,code", [
    (MQTT_311, 3, Reason.MALFORMED_PACKET), (MQTT_311, 4, Reason.MALFORMED_PACKET),
    (MQTT_5, 0x40, Reason.MALFORMED_PACKET), (MQTT_5, 0x30, Reason.PROTOCOL_ERROR)])
def test_subscription_options(level, opts, code):
    body = memoryview(b"\x00\x01" + (b"\x00" if level == 5 else b"") + b"\x00\x01a" + bytes([opts]))
    assert code_of(codec.decode_subscribe, body, level) == code


def test_no_local_on_a_shared_subscription_refused():
    body = memoryview(b"\x00\x01\x00\x00\x0a$share/g/a\x04")
    assert code_of(codec.decode_subscribe, body, MQTT_5) == Reason.PROTOCOL_ERROR


@pytest.mark.parametrize("body", [b"\x00\x00\x00\x01a\x00", b"\x00\x01"])
def test_subscribe_needs_an_id_and_a_filter(body):
    assert code_of(codec.decode_subscribe, memoryview(body), MQTT_311) == Reason.PROTOCOL_ERROR


def test_topic_matching_rules():
    from proxy.mqtt.subscriptions import filter_matches as topic_matches
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+/c", "a/b/c/d")
    assert topic_matches("a/#", "a") and topic_matches("a/#", "a/b/c")
    assert topic_matches("#", "x") and not topic_matches("#", "$SYS/x") and not topic_matches("+/x", "$SYS/x")
    assert topic_matches("$SYS/#", "$SYS/x")


# --------------------------------------------------------------------------- the rest


def test_disconnect_and_auth():
    assert codec.decode_disconnect(memoryview(b""), MQTT_5).reason == 0
    assert codec.decode_disconnect(memoryview(b"\x8e"), MQTT_5).reason == 0x8E
    assert code_of(codec.decode_disconnect, memoryview(b"\x00"), MQTT_311) == Reason.MALFORMED_PACKET
    raw = codec.encode_auth(Reason.REAUTHENTICATE, [(Prop.AUTHENTICATION_METHOD, "m"),
                                                     (Prop.AUTHENTICATION_DATA, b"d")])
    a = codec.decode_auth(Framer(100).feed(raw)[0].body)
    assert a.reason == 0x19 and a.properties[1] == (Prop.AUTHENTICATION_DATA, b"d")
    assert code_of(codec.decode_auth, memoryview(b"\x87\x00")) == Reason.PROTOCOL_ERROR


def test_acks_encode_short_forms():
    assert codec.encode_ack(4, 1, MQTT_5) == b"\x40\x02\x00\x01"
    assert codec.encode_ack(5, 1, MQTT_5, 0x87) == b"\x50\x03\x00\x01\x87"
    assert codec.encode_ack(6, 1, MQTT_311) == b"\x62\x02\x00\x01"
    assert codec.encode_ack(4, 1, MQTT_311, 0x87) == b"\x40\x02\x00\x01"  # 3.1.1 has no reason codes
    assert codec.encode_disconnect(MQTT_311, 0x87) == b"\xe0\x00"


def test_varint_bounds():
    assert codec.encode_varint(268_435_455) == b"\xff\xff\xff\x7f"
    with pytest.raises(ValueError):
        codec.encode_varint(268_435_456)
