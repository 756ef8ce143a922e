"""A client closed for flooding gets a reconnect back-off: its address is refused at accept,
before any TLS handshake, and its identity right after authentication (v5 CONNACK 0x97,
3.1.1 CONNACK 3), both audited folded. The back-off here is long (30 s) so that the
reconnects surely fall inside it: no timing in the assertions."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from proxy.config import MqttLimitsConfig, RateLimitConfig
from proxy.metrics import REGISTRY
from proxy.mqtt.packets import MQTT_5, MQTT_311
from tests.integration.mqtt_helpers import connack_reason, connect_packet, publish_packet
from tests.rig.mqtt_clients import RawClient

pytestmark = pytest.mark.integration

PENALTY = MqttLimitsConfig(reconnect_penalty_initial_seconds=30, reconnect_penalty_max_seconds=60)


def _refused() -> float:
    return REGISTRY.get_sample_value("keygate_mqtt_connections_refused_total", {"reason": "reconnect_penalty"}) or 0.0


async def _client(rig, source: str) -> RawClient:
    ctx = rig.client_ssl()
    r, w = await asyncio.open_connection("127.0.0.1", rig.port, ssl=ctx, server_hostname="localhost",
                                         local_addr=(source, 0))
    return RawClient(r, w)


async def _flood_until_closed(rig, source: str, dev: str, key: str) -> None:
    c = await _client(rig, source)
    await c.send(connect_packet(MQTT_5, dev, dev, key))
    connack = await c.read_packet()
    assert connack is not None and connack_reason(connack) == 0
    await c.send(b"".join(publish_packet(f"devices/{dev}/telemetry", b"x") for _ in range(50)))
    while (pkt := await c.read_packet()) is not None and pkt[0] != 0xE0:
        pass
    assert pkt is not None and pkt[2] == 0x96  # DISCONNECT message rate too high
    assert await c.closed_within(2)
    await c.close()


async def test_a_flooder_is_refused_before_tls_and_after_authentication(mqtt_rig_factory):
    rig = await mqtt_rig_factory(rate_limit=RateLimitConfig(messages_per_second=1, burst=10, action="disconnect"),
                                 limits=PENALTY)
    dev, k1, _ = await rig.register_device("alice")
    before = _refused()
    await _flood_until_closed(rig, "127.0.0.2", dev, k1)
    # The same address again, 20 times: each refused at accept, no TLS handshake done.
    failed = 0
    for _ in range(20):
        try:
            c = await _client(rig, "127.0.0.2")
        except (OSError, ssl.SSLError):
            failed += 1
            continue
        assert await c.closed_within(2)  # (the handshake may seem to succeed on a reset race: never a CONNACK)
        failed += 1
        await c.close()
    assert failed == 20
    # The same identity from another address: authenticated, then refused with 0x97 / 3.
    for level, code in ((MQTT_5, 0x97), (MQTT_311, 3)):
        c = await _client(rig, "127.0.0.3")
        await c.send(connect_packet(level, dev, dev, k1))
        pkt = await c.read_packet()
        assert pkt is not None and connack_reason(pkt) == code
        assert await c.closed_within(2)
        await c.close()
    refused = _refused() - before
    print(f"\nMEASURED reconnect penalty: {refused:.0f} refused (20 at accept, 2 after authentication)")
    assert refused == 22
    # Folded: far fewer lines than refusals, and every refusal counted (the rest at the next report).
    rig.gateway._report_refusals(everything=True)
    lines = rig.audited(action="connect", reason="reconnect_penalty")
    assert sum(line.get("count", 1) for line in lines) == 22 and len(lines) <= 4
    # Another identity from a clean address is not affected.
    dev2, k2, _ = await rig.register_device("bob")
    c = await _client(rig, "127.0.0.4")
    await c.send(connect_packet(MQTT_5, dev2, dev2, k2))
    assert connack_reason(await c.read_packet()) == 0
    await c.close()
