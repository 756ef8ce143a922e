"""An identity cycling client ids with persistent sessions (3.1.1 clean_session=0; the admin,
who may subscribe to anything) can no longer make Mosquitto hold without bound: the sessions
are capped per identity, and their subscriptions stay charged to the identity's quota after
the close, until a clean start."""

from __future__ import annotations

import pytest

from proxy.config import MqttLimitsConfig
from proxy.mqtt.codec import encode_connect
from proxy.mqtt.packets import MQTT_311, Connect
from tests.integration.mqtt_helpers import connack_reason, suback_reasons, subscribe_packet
from tests.rig.mqtt_clients import RawClient

pytestmark = pytest.mark.integration

LIMITS = MqttLimitsConfig(persistent_sessions_per_identity=3, subscriptions_per_identity=4,
                          unauthenticated_per_address=0, unauthenticated_rate_per_address=0)


async def _connect(rig, client_id: str, token: str, *, clean: bool) -> tuple[RawClient, int | None]:
    c = await RawClient.open(rig)
    await c.send(encode_connect(Connect("MQTT", MQTT_311, clean, 30, client_id, "admin", token.encode(), None, [])))
    pkt = await c.read_packet()
    return c, None if pkt is None else connack_reason(pkt)


async def _subscribe(c: RawClient, *filters: str) -> list[int]:
    await c.send(subscribe_packet(MQTT_311, 1, *((f, 0) for f in filters)))
    suback = await c.read_packet()
    assert suback is not None, "closed instead of a SUBACK"
    return suback_reasons(suback, MQTT_311)


async def test_persistent_sessions_are_capped_and_keep_their_subscriptions_charged(mqtt_rig_factory):
    rig = await mqtt_rig_factory(limits=LIMITS)
    token = await rig.token("admin")
    c, code = await _connect(rig, "p0", token, clean=False)
    assert code == 0
    assert await _subscribe(c, "t/0", "t/a", "t/b") == [0, 0, 0]
    await c.close()
    # Parked at the broker: still charged. A new connection has one slot left of 4.
    c, code = await _connect(rig, "other", token, clean=True)
    assert code == 0
    assert await _subscribe(c, "t/c", "t/d") == [0, 0x80]
    await c.close()
    # Cycling client ids: 3 persistent sessions, the 4th refused (CONNACK 3), and audited.
    for cid in ("p1", "p2"):
        c, code = await _connect(rig, cid, token, clean=False)
        assert code == 0
        await c.close()
    c, code = await _connect(rig, "p3", token, clean=False)
    assert code == 3
    assert await c.closed_within(2)
    held = rig.gateway.persistent.of((await rig.identity("admin")).sub)
    print(f"\nMEASURED persistent sessions: {held} held for admin, limit {LIMITS.persistent_sessions_per_identity}")
    assert held == LIMITS.persistent_sessions_per_identity
    assert rig.audited(action="connect", decision="deny", reason="persistent_sessions_per_identity")
    # A clean start of p0 ends that session at the broker: its slots come back, a new id fits.
    c, code = await _connect(rig, "p0", token, clean=True)
    assert code == 0
    assert await _subscribe(c, "t/c", "t/d") == [0, 0]
    await c.close()
    c, code = await _connect(rig, "p3", token, clean=False)
    assert code == 0
    await c.close()
    for cid in ("p1", "p2", "p3"):  # leave the shared broker clean
        c, _ = await _connect(rig, cid, token, clean=True)
        await c.close()
