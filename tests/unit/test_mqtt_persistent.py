"""Persistent broker sessions per identity and the subscriptions they keep charged."""

from __future__ import annotations

from proxy.config import MqttLimitsConfig
from proxy.mqtt import codec
from proxy.mqtt.packets import MQTT_5, MQTT_311, Prop, get_prop
from proxy.mqtt.persistent import PersistentSessions
from proxy.mqtt.subscriptions import SubscriptionQuota
from tests.unit.test_mqtt_session import ALICE, connect_packet, make, only


def registry(per_identity=3, expiry=100.0):
    now = [0.0]
    quota = SubscriptionQuota(10)
    return PersistentSessions(per_identity, expiry, quota, clock=lambda: now[0]), quota, now


def test_cycling_client_ids_is_capped_per_identity():
    reg, _, _ = registry()
    for i in range(3):
        assert reg.admit("alice", f"c{i}", clean_start=False, expiry=100)
        reg.closed(f"c{i}", [], 100)
    assert not reg.admit("alice", "c3", clean_start=False, expiry=100)  # a fourth: refused
    assert reg.admit("alice", "c0", clean_start=False, expiry=100)  # resuming one: fine
    assert reg.admit("alice", "c9", clean_start=True, expiry=0)  # not persistent: not counted
    assert reg.admit("bob", "b0", clean_start=False, expiry=100)  # per identity
    assert reg.of("alice") == 3


def test_parked_filters_stay_charged_until_expiry_or_clean_start():
    reg, quota, now = registry()
    assert reg.admit("alice", "c0", clean_start=False, expiry=100)
    reg.closed("c0", ["a", "b", "c"], 100)
    assert quota.held("alice") == 3  # the broker keeps them: so does the count
    assert reg.admit("alice", "c0", clean_start=False, expiry=100)
    reg.closed("c0", ["c", "d"], 100)  # the union: a, b, c, d
    assert quota.held("alice") == 4
    assert reg.admit("alice", "c0", clean_start=True, expiry=100)  # the broker starts afresh
    assert quota.held("alice") == 0
    reg.closed("c0", ["x"], 100)
    assert quota.held("alice") == 1
    now[0] = 101.0  # expired at the broker
    assert reg.of("alice") == 0 and quota.held("alice") == 0
    assert reg.admit("alice", "c1", clean_start=False, expiry=100)
    reg.closed("c1", ["y"], 100)
    reg.forget("c1")  # the gateway cleared it
    assert quota.held("alice") == 0 and len(reg) == 0


def test_a_charge_may_exceed_the_quota_and_blocks_new_subscriptions():
    reg, quota, _ = registry()
    reg.admit("alice", "c0", clean_start=False, expiry=100)
    reg.closed("c0", [str(i) for i in range(12)], 100)
    assert quota.held("alice") == 12 and not quota.acquire("alice")


def test_session_caps_the_session_expiry_it_asks_the_broker_for():
    limits = MqttLimitsConfig(persistent_session_expiry_seconds=60)
    asked = []
    s, _, _ = make(MQTT_5, limits=limits)
    s.admit_connect = lambda *a: asked.append(a) or None
    s.client_data(connect_packet(MQTT_5, "c", props=[(Prop.SESSION_EXPIRY_INTERVAL, 0xFFFFFFFF)]))
    acts = s.authenticated(ALICE)
    up = codec.decode_connect(only(acts.to_broker, codec.PacketType.CONNECT).body)
    assert get_prop(up.properties, Prop.SESSION_EXPIRY_INTERVAL) == 60 and s.session_expiry == 60
    assert asked[0][1:] == (s.upstream_client_id, True, 60)


def test_session_refuses_a_connect_the_shell_does_not_admit():
    for level, code in ((MQTT_5, 0x97), (MQTT_311, 3)):
        s, _, _audit = make(level)
        s.admit_connect = lambda *a: "persistent_sessions_per_identity"
        s.client_data(connect_packet(level, "c", clean=False))
        acts = s.authenticated(ALICE)
        assert codec.decode_connack(only(acts.to_client, codec.PacketType.CONNACK).body, level).reason == code
        assert acts.close.reason == "persistent_sessions_per_identity" and not acts.to_broker


def test_a_longer_expiry_at_disconnect_is_capped_upstream():
    from tests.unit.test_mqtt_session import open_session

    limits = MqttLimitsConfig(persistent_session_expiry_seconds=60)
    s, _, _ = open_session(MQTT_5, props=[(Prop.SESSION_EXPIRY_INTERVAL, 10)], limits=limits)
    acts = s.client_data(codec.encode_disconnect(MQTT_5, 0, [(Prop.SESSION_EXPIRY_INTERVAL, 0xFFFFFFFF)]))
    d = codec.decode_disconnect(only(acts.to_broker, codec.PacketType.DISCONNECT).body, MQTT_5)
    assert get_prop(d.properties, Prop.SESSION_EXPIRY_INTERVAL) == 60 and s.session_expiry == 60
    s, _, _ = open_session(MQTT_5, props=[(Prop.SESSION_EXPIRY_INTERVAL, 10)], limits=limits)
    raw = codec.encode_disconnect(MQTT_5, 0, [(Prop.SESSION_EXPIRY_INTERVAL, 30)])
    acts = s.client_data(raw)
    assert b"".join(bytes(x) for x in acts.to_broker) == raw and s.session_expiry == 30
