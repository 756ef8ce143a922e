"""Wildcard subscriptions by non-admins receive only what they may read.

The broker delivers everything a filter matches; the gateway checks every
delivery, retained ones included, and quietly completes the QoS 1/2 flows of
the deliveries it drops, so the broker's session for the subscriber stays
healthy (no stuck inflight window, later messages still flow).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.rig.mqtt_clients import V5, V311, Paho, gmqtt_client, mosquitto_sub

pytestmark = pytest.mark.integration


async def _publish(rig, dev: str, key: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
    d = Paho(rig, dev, username=dev, password=key)
    assert await d.connect() == 0
    assert await d.publish(f"devices/{dev}/telemetry", payload, qos=qos, retain=retain) in (0, 0x10)
    await d.close()


@pytest.mark.parametrize("topic_filter,qos,version", [
    ("devices/+/telemetry", 1, V5),
    ("#", 2, V5),
    ("devices/#", 2, V311),
])
async def test_wildcard_receives_only_readable_devices_retained_included(mqtt_rig, topic_filter, qos, version):
    rig = mqtt_rig
    private, kp, _ = await rig.register_device("alice")
    own, ko, _ = await rig.register_device("carol")
    shared, ks, _ = await rig.register_device("alice")
    public, kpub, _ = await rig.register_device("bob", public=True)
    await rig.services.ownership.create_delegation(await rig.identity("alice"), shared, "carol", "read")
    for dev, key in ((private, kp), (own, ko), (shared, ks), (public, kpub)):
        await _publish(rig, dev, key, f"retained-{dev}".encode(), retain=True)
    carol = Paho(rig, "carol-wild", version=version, username="carol", password=await rig.token("carol"))
    assert await carol.connect() == 0
    assert await carol.subscribe(topic_filter, qos) == [qos]
    # Sentinels on carol's own device (not retained): the broker queued the retained messages at
    # the SUBSCRIBE, before them, so whatever arrives before a sentinel is all there is.
    await _publish(rig, own, ko, b"sentinel-retained", qos=qos)
    retained = await carol.received_before(b"sentinel-retained")
    assert {m.topic for m in retained} == {f"devices/{d}/telemetry" for d in (own, shared, public)}
    assert all(m.retain for m in retained)
    for dev, key in ((private, kp), (own, ko), (shared, ks), (public, kpub)):
        await _publish(rig, dev, key, f"live-{dev}".encode(), qos=qos)
    await _publish(rig, own, ko, b"sentinel-live", qos=qos)
    live = await carol.received_before(b"sentinel-live")
    assert sorted(m.payload for m in live) == sorted(f"live-{d}".encode() for d in (own, shared, public))
    assert rig.audited(action="receive", decision="deny", resource=f"devices/{private}/telemetry")
    await carol.close()
    # Clean up the retained messages for the next test (an admin may publish anywhere).
    admin = Paho(rig, "admin-clean", username="admin", password=await rig.token("admin"))
    assert await admin.connect() == 0
    for dev in (private, own, shared, public):
        await admin.publish(f"devices/{dev}/telemetry", b"", qos=1, retain=True)
    await admin.close()


@pytest.mark.parametrize("qos", [1, 2])
async def test_dropped_deliveries_do_not_disturb_the_broker_session(mqtt_rig, qos):
    """Far more dropped QoS 1/2 deliveries than Mosquitto's inflight window (20 by default,
    unlimited here), then allowed ones: they still arrive, in order, on a persistent session."""
    rig = mqtt_rig
    private, kp, _ = await rig.register_device("alice")
    own, ko, _ = await rig.register_device("carol")
    carol = await gmqtt_client(rig, "carol-persist", username="carol", password=await rig.token("carol"),
                               version=V5, clean=False)
    carol.subscribe("devices/+/telemetry", qos=qos)
    await asyncio.wait_for(carol.subacks.get(), 5)  # the SUBACK: the subscription is in place
    d = Paho(rig, private, username=private, password=kp)
    assert await d.connect() == 0
    for i in range(100):
        d.c.publish(f"devices/{private}/telemetry", f"hidden-{i}", qos=qos)
    assert await d.publish(f"devices/{private}/telemetry", b"hidden-last", qos=qos) in (0, 0x10)
    await d.close()
    mine = Paho(rig, own, username=own, password=ko)
    assert await mine.connect() == 0
    for i in range(5):
        assert await mine.publish(f"devices/{own}/telemetry", f"mine-{i}".encode(), qos=qos) in (0, 0x10)
    await mine.close()
    got = []
    for _ in range(5):
        got.append(await asyncio.wait_for(carol.received.get(), 5))
    assert [m.payload for m in got] == [f"mine-{i}".encode() for i in range(5)]
    assert carol.received.empty()
    await carol.disconnect()


async def test_wildcard_with_mosquitto_sub(mqtt_rig):
    rig = mqtt_rig
    private, kp, _ = await rig.register_device("alice")
    own, ko, _ = await rig.register_device("carol")
    sub = await mosquitto_sub(rig, "devices/+/telemetry", qos=1, username="carol",
                              password=await rig.token("carol"), client_id="carol-cli")
    try:
        await _publish(rig, private, kp, b"hidden")
        await _publish(rig, own, ko, b"visible")
        assert await sub.line() == f"devices/{own}/telemetry visible"
        assert await sub.lines_within(0.3) == []
    finally:
        await sub.stop()
