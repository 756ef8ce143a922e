"""Issue 14, the outside attack: what one identity, and what closed sockets, may hold.

* ``connections_per_identity``: one identity opened 60 connections and took every slot;
  now the connection past the limit is refused after authentication (v5 0x97, 3.1.1 3),
  audited folded (lines bounded, counts complete).
* ``lingering_sockets_max``: closed sockets in their lingering close were outside every count
  (1,150 with max_connections 20); beyond the cap a closed socket is aborted.
* pre-authentication refusals folded per address, not per connection.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.config import MqttLimitsConfig
from proxy.mqtt.codec import encode_connect
from proxy.mqtt.packets import MQTT_5, MQTT_311, Connect
from proxy.mqtt.server import LINGER_REFUSED
from tests.integration.mqtt_helpers import connack_reason
from tests.rig.mqtt_clients import RawClient

pytestmark = pytest.mark.integration
LB = {"unauthenticated_per_address": 0, "unauthenticated_rate_per_address": 0}


async def _connect(rig, cid, token, level=MQTT_5):
    c = await RawClient.open(rig)
    await c.send(encode_connect(Connect("MQTT", level, True, 30, cid, "admin", token.encode(), None, [])))
    return c, await c.read_packet()


async def test_connections_per_identity_are_capped_and_refusals_folded(mqtt_rig_factory):
    rig = await mqtt_rig_factory(limits=MqttLimitsConfig(connections_per_identity=3, **LB))
    token = await rig.token("admin")
    held = []
    for i in range(3):
        c, pkt = await _connect(rig, f"c{i}", token)
        assert connack_reason(pkt) == 0
        held.append(c)
    refused = 0
    for i, level in enumerate((MQTT_5, MQTT_311) * 4):
        c, pkt = await _connect(rig, f"x{i}", token, level)
        assert connack_reason(pkt) == (0x97 if level == MQTT_5 else 3), pkt
        assert await c.closed_within(3)
        refused += 1
    rig.gateway._report_refusals(everything=True)
    lines = rig.audited(action="connect", reason="connections_per_identity")
    print(f"\nMEASURED connections_per_identity: 3 held, {refused} refused, {len(lines)} audit lines")
    assert sum(line["count"] for line in lines) == refused and len(lines) < refused
    await held.pop().close()  # a place comes free
    for _ in range(100):  # (its close is seen by the gateway a moment after ours)
        c, pkt = await _connect(rig, "again", token)
        if connack_reason(pkt) == 0:
            break
        await c.closed_within(3)
    assert connack_reason(pkt) == 0
    for client in [*held, c]:
        await client.close()


async def test_lingering_sockets_are_capped(mqtt_rig_factory):
    rig = await mqtt_rig_factory(tls=False, max_connections=20,
                                 limits=MqttLimitsConfig(lingering_sockets_max=5, **LB))
    aborted = LINGER_REFUSED._value.get()
    peak = 0
    writers = []
    for _ in range(40):
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        writer.write(b"\xf0\x00")  # reserved packet type 15: a protocol error, closed by the gateway
        writers.append(writer)  # (never closed by us: the gateway's side would linger)
        try:
            await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            pass
        peak = max(peak, rig.gateway.lingering)
    aborted = LINGER_REFUSED._value.get() - aborted
    print(f"\nMEASURED lingering: peak {peak} lingering sockets (cap 5), {aborted} of 40 aborted instead")
    assert peak <= 5 and aborted >= 1
    for writer in writers:
        writer.close()
