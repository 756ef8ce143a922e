"""A clean-start takeover of one's own persistent session stays counted (issue 14, the outside
attack): the kicked connection's late close cannot end the count of its live successor, and the
successor's filters stay charged when it parks."""

from __future__ import annotations

import pytest

from proxy.config import MqttLimitsConfig
from proxy.mqtt.codec import encode_connect
from proxy.mqtt.packets import MQTT_5, Connect
from tests.integration.mqtt_helpers import connack_reason, suback_reasons, subscribe_packet
from tests.rig.mqtt_clients import RawClient

pytestmark = pytest.mark.integration
LIMITS = MqttLimitsConfig(persistent_sessions_per_identity=2, subscriptions_per_identity=4,
                          subscriptions_per_connection=4,
                          unauthenticated_per_address=0, unauthenticated_rate_per_address=0)
QUOTA = 0x97


async def _connect(rig, cid, token, *, clean, expiry):
    c = await RawClient.open(rig)
    await c.send(encode_connect(Connect("MQTT", MQTT_5, clean, 30, cid, "admin", token.encode(), None,
                                        [(0x11, expiry)] if expiry else [])))
    return c, await c.read_packet()


async def test_clean_start_takeovers_cannot_park_sessions_beyond_the_limits(mqtt_rig_factory):
    rig = await mqtt_rig_factory(limits=LIMITS)
    token = await rig.token("admin")
    sub = (await rig.identity("admin")).sub
    persistent, quota = rig.gateway.persistent, rig.gateway.subscription_quota
    now = [persistent.clock()]
    persistent.clock = lambda: now[0]  # the 1 s expiry lapses without a sleep
    for i in range(2):
        c1, pkt = await _connect(rig, f"z{i}", token, clean=False, expiry=1)
        assert connack_reason(pkt) == 0, pkt
        c2, pkt = await _connect(rig, f"z{i}", token, clean=True, expiry=604800)
        assert connack_reason(pkt) == 0, pkt
        assert await c1.closed_within(3)  # taken over: its close comes after c2 is live
        await c2.send(subscribe_packet(MQTT_5, 1, *((f"t/{i}/{j}", 0) for j in range(4))))
        reasons = suback_reasons(await c2.read_packet(), MQTT_5)
        assert reasons == ([0] * 4 if i == 0 else [QUOTA] * 4)  # the first session's 4 stay charged
        now[0] += 2.0  # c1's own expiry is over; c2's session is not
        assert persistent.of(sub) == i + 1
        await c2.send(b"\xe0\x00")  # DISCONNECT: the session parks at the broker for 7 days
        assert await c2.closed_within(3)
    now[0] += 3600.0
    assert persistent.of(sub) == 2 and quota.held(sub) == 4
    c3, pkt = await _connect(rig, "z2", token, clean=False, expiry=1)  # a third: refused
    assert connack_reason(pkt) == QUOTA
    await c3.close()


async def test_a_taken_over_session_parks_its_filters_charged(mqtt_rig_factory):
    rig = await mqtt_rig_factory(limits=LIMITS)
    token = await rig.token("admin")
    sub = (await rig.identity("admin")).sub
    quota = rig.gateway.subscription_quota
    c1, pkt = await _connect(rig, "s0", token, clean=False, expiry=3600)
    assert connack_reason(pkt) == 0
    c2, pkt = await _connect(rig, "s0", token, clean=True, expiry=3600)
    assert connack_reason(pkt) == 0
    assert await c1.closed_within(3)
    await c2.send(subscribe_packet(MQTT_5, 1, *((f"t/{j}", 0) for j in range(4))))
    assert suback_reasons(await c2.read_packet(), MQTT_5) == [0] * 4
    await c2.send(b"\xe0\x00")
    assert await c2.closed_within(3)
    live, pkt = await _connect(rig, "live", token, clean=True, expiry=0)
    assert connack_reason(pkt) == 0 and quota.held(sub) == 4  # the parked session's 4 filters
    await live.send(subscribe_packet(MQTT_5, 1, ("u/0", 0)))
    assert suback_reasons(await live.read_packet(), MQTT_5) == [QUOTA]
    await live.close()
