"""Changes at runtime reach connections that are already open.

Deleting a device or revoking a delegation (the ownership API calls these same
service methods), a token running out, and a policy file edited on disk all
change what an open connection may do, at once; a v5 client that
re-authenticates with a fresh token stays connected.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from proxy.mqtt import AUTH_METHOD
from proxy.mqtt.codec import encode_auth
from proxy.mqtt.packets import Prop, Reason
from tests.integration.mqtt_helpers import Sentinel, eventually, raw_connect
from tests.rig.gateway import POLICY_DIR
from tests.rig.mqtt_clients import V5, V311, Paho

pytestmark = pytest.mark.integration

PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"


async def _telemetry_flows(rig, sentinel: Sentinel, dev: str, key: str, payload: bytes) -> bool:
    """Publishes one QoS 1 message as the device; whether the subscriber gets it before the
    sentinel published after it."""
    d = Paho(rig, dev, username=dev, password=key)
    assert await d.connect() == 0
    await d.publish(f"devices/{dev}/telemetry", payload, qos=1)
    await d.close()
    return any(m.payload == payload for m in await sentinel.received())


async def test_revoked_delegation_stops_deliveries_at_once(mqtt_rig):
    rig = mqtt_rig
    dev, k1, _ = await rig.register_device("alice")
    alice = await rig.identity("alice")
    await rig.identity("bob")  # bob has signed in once: "bob" resolves to his sub
    grant = await rig.services.ownership.create_delegation(alice, dev, "bob", "read")
    bob = Paho(rig, "bob-live", username="bob", password=await rig.token("bob"))
    assert await bob.connect() == 0
    assert await bob.subscribe(f"devices/{dev}/telemetry", 1) == [1]
    sentinel = await Sentinel.of(rig, bob, "bob")
    assert await _telemetry_flows(rig, sentinel, dev, k1, b"before")
    await rig.services.ownership.revoke_delegation(alice, dev, grant["id"])
    assert not await _telemetry_flows(rig, sentinel, dev, k1, b"after")
    assert bob.is_connected()
    await bob.close()


async def test_deleted_device_stops_deliveries_at_once(mqtt_rig):
    rig = mqtt_rig
    dev, k1, _ = await rig.register_device("alice")
    alice_sub = Paho(rig, "alice-live", version=V311, username="alice", password=await rig.token("alice"))
    assert await alice_sub.connect() == 0
    assert await alice_sub.subscribe(f"devices/{dev}/telemetry", 1) == [1]
    sentinel = await Sentinel.of(rig, alice_sub, "alice")
    assert await _telemetry_flows(rig, sentinel, dev, k1, b"before")
    await rig.services.ownership.delete_device(await rig.identity("alice"), dev)
    # The device's keys are gone with it; an admin still publishes on its old topic.
    admin = Paho(rig, "admin-ghost", username="admin", password=await rig.token("admin"))
    assert await admin.connect() == 0
    assert await admin.publish(f"devices/{dev}/telemetry", b"ghost", qos=1) in (0, 0x10)
    await admin.close()
    assert await sentinel.received() == []
    raw, code = await raw_connect(rig, V5, dev, dev, k1)
    assert code == 0x86
    await raw.close()
    await alice_sub.close()


async def test_token_expiring_mid_session_disconnects(mqtt_rig):
    """A 2 s token (1 s leeway): v5 gets DISCONNECT 0xA0 (maximum connect time); 3.1.1 is closed."""
    rig = mqtt_rig
    v5, code = await raw_connect(rig, V5, "alice-short", "alice", await rig.token("alice", ttl=2))
    assert code == 0
    v3, code = await raw_connect(rig, V311, "alice-short3", "alice", await rig.token("alice", ttl=2))
    assert code == 0
    # Cut for the token (its reason code and audit line), not by anything later: the keepalive is
    # 30 s, beyond these waits (which only bound a failure; no wall-clock assertion).
    pkt = await v5.read_packet(timeout=6)
    assert pkt == bytes([0xE0, 1, Reason.MAXIMUM_CONNECT_TIME])
    assert await v3.closed_within(2)
    assert rig.audited(action="session", decision="close", reason="token expired")
    await v5.close()
    await v3.close()


async def test_reauthentication_with_a_fresh_token_keeps_the_connection(mqtt_rig):
    rig = mqtt_rig
    c, code = await raw_connect(rig, V5, "alice-reauth", "alice", await rig.token("alice", ttl=2))
    assert code == 0
    fresh = await rig.token("alice")
    await c.send(encode_auth(Reason.REAUTHENTICATE, [(Prop.AUTHENTICATION_METHOD, AUTH_METHOD),
                                                      (Prop.AUTHENTICATION_DATA, fresh.encode())]))
    pkt = await c.read_packet()
    assert pkt[0] == 0xF0 and pkt[2] == Reason.SUCCESS
    await asyncio.sleep(3.5)  # past the first token's expiry plus leeway
    await c.send(PINGREQ)
    assert await c.read_packet() == PINGRESP
    # Another subject's token is refused and ends the connection (DISCONNECT 0x87).
    await c.send(encode_auth(Reason.REAUTHENTICATE, [(Prop.AUTHENTICATION_METHOD, AUTH_METHOD),
                                                      (Prop.AUTHENTICATION_DATA, (await rig.token("bob")).encode())]))
    assert await c.read_packet() == bytes([0xE0, 1, Reason.NOT_AUTHORIZED])
    await c.close()


async def test_policy_file_edited_under_a_running_gateway(mqtt_rig_factory, tmp_path):
    """The watch task reloads the edited set; the next decision on an open connection uses it."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, policy_dir)
    rig = await mqtt_rig_factory(policies_dir=policy_dir)
    policies = rig.services.policies
    watch = asyncio.create_task(policies.watch())
    try:
        dev, _, _ = await rig.register_device("alice")
        alice = Paho(rig, "alice-policy", username="alice", password=await rig.token("alice"))
        assert await alice.connect() == 0
        assert await alice.publish(f"devices/{dev}/cmd/on", b"1", qos=1) in (0, 0x10)
        generation = policies.generation
        text = (policy_dir / "devices.yaml").read_text()
        # Owners keep reading but lose the right to send commands.
        rule = '    subjects: [owner, delegate]          # delegate on publish needs a write delegation\n'
        edited = text.replace(rule + '    mqtt:\n      topics: ["devices/{device}/cmd/#"]',
                              rule + '    mqtt:\n      topics: ["devices/{device}/cmd/none-left"]')
        assert edited != text
        (policy_dir / "devices.yaml").write_text(edited)
        assert await eventually(lambda: policies.generation > generation, timeout=5)
        assert await alice.publish(f"devices/{dev}/cmd/on", b"2", qos=1) == 0x87
        await alice.close()
    finally:
        watch.cancel()
