"""Owners, devices, delegates and strangers through the gateway, with three real clients.

Real Mosquitto behind, the real OIDC provider's tokens, the real ownership
store and the shipped policies: a device publishes ``devices/{id}/telemetry``
and reads ``devices/{id}/cmd/#``; its owner and read delegates read the
telemetry; the owner and write delegates send commands.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.mqtt_helpers import publish_packet, raw_connect
from tests.rig.mqtt_clients import V5, V311, Paho, gmqtt_client, mosquitto_pub, mosquitto_sub

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87
V3_SUBACK_FAILURE = 0x80


@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_owner_reads_device_telemetry_paho_v5(mqtt_rig, qos):
    rig = mqtt_rig
    dev, k1, _ = await rig.register_device("alice")
    owner = Paho(rig, "alice-phone", username="alice", password=await rig.token("alice"))
    device = Paho(rig, dev, username=dev, password=k1)
    try:
        assert await owner.connect() == 0
        assert await owner.subscribe(f"devices/{dev}/telemetry", qos) == [qos]
        assert await device.connect() == 0
        ack = await device.publish(f"devices/{dev}/telemetry", b'{"t": 21.5}', qos=qos)
        assert ack == (None if qos == 0 else 0)
        msg = await owner.receive()
        assert (msg.topic, msg.payload, msg.qos) == (f"devices/{dev}/telemetry", b'{"t": 21.5}', qos)
    finally:
        await device.close()
        await owner.close()


async def test_owner_commands_device_gmqtt_v311_with_k2(mqtt_rig):
    """gmqtt, MQTT 3.1.1: the device logs in with K2 and receives its owner's QoS 1 command."""
    rig = mqtt_rig
    dev, _, k2 = await rig.register_device("alice")
    device = await gmqtt_client(rig, dev, username=dev, password=k2, version=V311)
    owner = await gmqtt_client(rig, "alice-console", username="alice", password=await rig.token("alice"),
                               version=V311)
    try:
        device.subscribe(f"devices/{dev}/cmd/#", qos=1)
        await asyncio.wait_for(device.subacks.get(), 5)  # the SUBACK: the subscription is in place
        owner.publish(f"devices/{dev}/cmd/reboot", b"now", qos=1)
        msg = await asyncio.wait_for(device.received.get(), 5)
        assert (msg.topic, msg.payload) == (f"devices/{dev}/cmd/reboot", b"now")
        owner.subscribe(f"devices/{dev}/telemetry", qos=1)
        await asyncio.wait_for(owner.subacks.get(), 5)
        device.publish(f"devices/{dev}/telemetry", b"after-subscribe", qos=1)
        msg = await asyncio.wait_for(owner.received.get(), 5)
        assert msg.payload == b"after-subscribe"
        # Let the device's PUBACK land first: gmqtt closes TLS at once on disconnect and raises
        # if a record arrives after its close_notify.
        await asyncio.sleep(0.3)
    finally:
        await device.disconnect()
        await owner.disconnect()


@pytest.mark.parametrize("version", [V311, V5])
async def test_device_certificate_with_mosquitto_cli(mqtt_rig, version):
    """mosquitto_pub with an enrolled device certificate (no password), mosquitto_sub with the owner's token."""
    rig = mqtt_rig
    dev, _, _ = await rig.register_device("alice")
    cert = await rig.enroll("alice", dev)
    sub = await mosquitto_sub(rig, f"devices/{dev}/telemetry", qos=2, username="alice",
                              password=await rig.token("alice"), client_id="alice-cli", version=version)
    try:
        status, err = await mosquitto_pub(rig, f"devices/{dev}/telemetry", "from-cert", qos=2, cert=cert,
                                          client_id=dev, version=version)
        assert status == 0, err
        assert await sub.line() == f"devices/{dev}/telemetry from-cert"
    finally:
        await sub.stop()
    assert rig.audited(action="connect", decision="allow", resource=dev)[-1]["identity"]["method"] == "certificate"


async def test_certificate_from_an_untrusted_ca_is_refused(mqtt_rig):
    rig = mqtt_rig
    dev, _, _ = await rig.register_device("alice")
    rogue = rig.pki.device_cert(dev, signed_by_rogue=True)
    status, _err = await mosquitto_pub(rig, f"devices/{dev}/telemetry", "x", cert=rogue, client_id=dev)
    assert status != 0
    assert not rig.audited(action="connect", decision="allow", resource=dev)


@pytest.mark.parametrize("version", [V311, V5])
async def test_both_device_keys_work_and_a_wrong_one_is_refused(mqtt_rig, version):
    rig = mqtt_rig
    dev, k1, k2 = await rig.register_device("alice")
    for key in (k1, k2):
        c = Paho(rig, dev, version=version, username=dev, password=key)
        assert await c.connect() == 0
        await c.close()
    # Bad user name or password: 0x86 (v5), return code 4 (3.1.1) -- read off the wire,
    # since paho reports 3.1.1 return codes translated to v5 reason codes.
    raw, code = await raw_connect(rig, version, dev, dev, k1[:-2] + "xx")
    assert code == (0x86 if version == V5 else 4)
    assert await raw.closed_within(2)
    await raw.close()
    status, err = await mosquitto_pub(rig, f"devices/{dev}/telemetry", "x", username=dev, password="nope",
                                      client_id=dev, version=version)
    assert status != 0 and ("not authori" in err.lower() or "bad user name" in err.lower()), err


async def test_another_user_is_refused_with_reason_codes(mqtt_rig):
    """bob cannot read, command, or log in as alice's device."""
    rig = mqtt_rig
    dev, _k1, _ = await rig.register_device("alice")
    bob_token = await rig.token("bob")
    v5 = Paho(rig, "bob-1", username="bob", password=bob_token)
    v3 = Paho(rig, "bob-2", version=V311, username="bob", password=bob_token)
    try:
        assert await v5.connect() == 0 and await v3.connect() == 0
        assert await v5.subscribe(f"devices/{dev}/telemetry", 1) == [NOT_AUTHORIZED]
        assert await v3.subscribe(f"devices/{dev}/telemetry", 1) == [V3_SUBACK_FAILURE]
        assert await v5.publish(f"devices/{dev}/cmd/open", b"x", qos=1) == NOT_AUTHORIZED
        # QoS 2 on the wire (paho reports the PUBCOMP's code, not the PUBREC's).
        raw, code = await raw_connect(rig, V5, "bob-raw", "bob", bob_token)
        assert code == 0
        await raw.send(publish_packet(f"devices/{dev}/cmd/open", b"x", qos=2, packet_id=7))
        assert await raw.read_packet() == bytes([0x50, 3, 0, 7, NOT_AUTHORIZED])  # PUBREC 0x87
        await raw.close()
        # 3.1.1 has no negative acknowledgement: acknowledged, dropped and audited.
        assert await v3.publish(f"devices/{dev}/cmd/open", b"x", qos=1) == 0
        assert len(rig.audited(action="publish", decision="deny", resource=f"devices/{dev}/cmd/open")) == 3
    finally:
        await v5.close()
        await v3.close()
    # At connect time: bob's token is no device key (user name = the device id).
    impostor = Paho(rig, dev, username=dev, password=bob_token)
    assert await impostor.connect() == 0x86
    await impostor.close()


async def test_read_delegate_reads_but_cannot_write(mqtt_rig):
    rig = mqtt_rig
    dev, k1, _ = await rig.register_device("alice")
    await rig.identity("bob")  # bob has signed in once: "bob" resolves to his sub
    await rig.services.ownership.create_delegation(await rig.identity("alice"), dev, "bob", "read")
    bob = Paho(rig, "bob-viewer", username="bob", password=await rig.token("bob"))
    device = Paho(rig, dev, username=dev, password=k1)
    try:
        assert await bob.connect() == 0 and await device.connect() == 0
        assert await bob.subscribe(f"devices/{dev}/telemetry", 1) == [1]
        assert await device.publish(f"devices/{dev}/telemetry", b"shared", qos=1) == 0
        assert (await bob.receive()).payload == b"shared"
        assert await bob.publish(f"devices/{dev}/cmd/open", b"x", qos=1) == NOT_AUTHORIZED
        assert await bob.publish(f"devices/{dev}/telemetry", b"fake", qos=1) == NOT_AUTHORIZED
    finally:
        await bob.close()
        await device.close()
