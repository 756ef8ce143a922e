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
from proxy.mqtt.shell_metrics import LINGER_REFUSED
from tests.integration.mqtt_helpers import connack_reason, eventually
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
    sub = (await rig.identity("admin")).sub
    assert await eventually(lambda: rig.gateway._connections_of.get(sub) == 2)  # (its close reaches the gateway)
    c, pkt = await _connect(rig, "again", token)
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


async def test_qos2_holds_are_bounded_per_identity_across_connections(mqtt_rig_factory):
    """The attack parked a 1 MiB QoS 2 publish on each of 60 connections of one identity (62 MB).
    With qos2_hold_bytes_per_identity of one packet, a second connection's hold is refused
    (PUBREC 0x97) until the first is released."""
    from tests.integration.mqtt_helpers import connect_packet, publish_packet

    budget = 1_048_576
    rig = await mqtt_rig_factory(limits=MqttLimitsConfig(qos2_hold_bytes_per_identity=budget, **LB))
    dev, _, _ = await rig.register_device("alice")
    token = await rig.token("alice")
    payload = b"x" * 700_000
    clients = []
    for i in range(2):
        c = await RawClient.open(rig)
        await c.send(connect_packet(MQTT_5, f"a{i}", "alice", token))
        assert connack_reason(await c.read_packet()) == 0
        clients.append(c)
    a, b = clients
    await a.send(publish_packet(f"devices/{dev}/cmd/x", payload, qos=2, packet_id=1))
    assert (await a.read_packet())[:4] == b"\x50\x02\x00\x01"  # PUBREC, held
    await b.send(publish_packet(f"devices/{dev}/cmd/x", payload, qos=2, packet_id=1))
    rec = await b.read_packet()
    assert rec[0] == 0x50 and rec[4] == 0x97, rec  # over the identity's budget
    held = rig.gateway.qos2_budget.held(rig_sub := (await rig.identity("alice")).sub)
    print(f"\nMEASURED qos2 per identity: {held} B held across 2 connections, budget {budget}")
    assert len(payload) < held <= budget  # a's publish is held, b's refused
    await a.close()  # its hold is dropped with it
    assert await eventually(lambda: not rig.gateway.qos2_budget.held(rig_sub))  # (its close reaches the gateway)
    await b.send(publish_packet(f"devices/{dev}/cmd/x", payload, qos=2, packet_id=2))
    assert (await b.read_packet())[:4] == b"\x50\x02\x00\x02"
    await b.close()
