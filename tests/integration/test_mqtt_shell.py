"""The asyncio shell: WebSocket transport, plain TCP and unix-socket upstream, backpressure,
graceful shutdown and metrics."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import aiohttp
import pytest

from proxy.metrics import REGISTRY
from proxy.mqtt.packets import MQTT_5, MQTT_311
from proxy.mqtt.sockets import RECV_BUFFER_SIZE, WRITE_HIGH
from tests.integration.mqtt_helpers import (
    connect_packet,
    eventually,
    publish_packet,
    raw_connect,
    suback_reasons,
    subscribe_packet,
)
from tests.rig.mqtt_clients import V5, V311, Paho, RawClient

pytestmark = pytest.mark.integration


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_websocket_frames_may_split_and_join_packets(mqtt_rig_factory):
    rig = await mqtt_rig_factory(websocket=True)
    dev, k1, _ = await rig.register_device("alice")
    connect = connect_packet(MQTT_5, "alice-ws", "alice", await rig.token("alice"))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"wss://127.0.0.1:{rig.ws_port}/mqtt", protocols=("mqtt",),
                                   ssl=rig.client_ssl()) as ws:
            assert ws.protocol == "mqtt"
            # CONNECT split across three frames.
            for part in (connect[:3], connect[3:20], connect[20:]):
                await ws.send_bytes(part)
            stream = bytearray(await ws.receive_bytes(timeout=5))
            assert stream[0] == 0x20 and stream[3] == 0
            # SUBSCRIBE and a PINGREQ joined in one frame.
            await ws.send_bytes(subscribe_packet(MQTT_5, 1, (f"devices/{dev}/telemetry", 0)) + b"\xc0\x00")
            stream = bytearray()
            while b"\xd0\x00" not in stream:
                stream += await ws.receive_bytes(timeout=5)
            assert stream.startswith(b"\x90") and suback_reasons(bytes(stream[:-2]), MQTT_5) == [0]
            d = Paho(rig, dev, username=dev, password=k1)
            assert await d.connect() == 0
            await d.publish(f"devices/{dev}/telemetry", b"over-ws", qos=1)
            await d.close()
            stream = bytearray()
            while b"over-ws" not in stream:
                stream += await ws.receive_bytes(timeout=5)
            assert stream[0] == 0x30
    assert _metric("keygate_mqtt_connections_total", transport="websocket") >= 1


async def test_websocket_with_paho(mqtt_rig_factory):
    rig = await mqtt_rig_factory(websocket=True)
    dev, k1, _ = await rig.register_device("alice")
    c = Paho(rig, "alice-paho-ws", username="alice", password=await rig.token("alice"), port=rig.ws_port,
             transport="websockets")
    c.c.ws_set_options(path="/mqtt")
    assert await c.connect() == 0
    assert await c.subscribe(f"devices/{dev}/telemetry", 1) == [1]
    d = Paho(rig, dev, username=dev, password=k1)
    assert await d.connect() == 0
    await d.publish(f"devices/{dev}/telemetry", b"paho-ws", qos=1)
    assert (await c.receive()).payload == b"paho-ws"
    await d.close()
    await c.close()


async def test_plain_tcp_listener_and_unix_socket_upstream(mqtt_rig_factory, mosquitto_factory):
    """``mqtt.tls: false`` (benchmarks, or behind another TLS terminator) and ``unix:/path``."""
    # A short path (sun_path holds 108 bytes) that Mosquitto can write after dropping root.
    folder = Path(tempfile.mkdtemp(prefix="kg-mq-"))
    folder.chmod(0o777)
    sock = folder / "broker.sock"
    broker = mosquitto_factory([f"listener 0 {sock}", "allow_anonymous true"])
    rig = await mqtt_rig_factory(tls=False, broker=f"unix:{sock}")
    assert broker.proc.poll() is None
    dev, k1, _ = await rig.register_device("alice")
    sub = Paho(rig, "alice-plain", version=V311, username="alice", password=await rig.token("alice"))
    assert await sub.connect() == 0
    assert await sub.subscribe(f"devices/{dev}/telemetry", 2) == [2]
    d = Paho(rig, dev, version=V311, username=dev, password=k1)
    assert await d.connect() == 0
    await d.publish(f"devices/{dev}/telemetry", b"plain", qos=2)
    assert (await sub.receive()).payload == b"plain"
    await d.close()
    await sub.close()
    broker.stop()
    shutil.rmtree(folder, ignore_errors=True)


async def test_graceful_shutdown(mqtt_rig):
    rig = mqtt_rig
    v5, code = await raw_connect(rig, V5, "carol-bye", "carol", await rig.token("carol"))
    assert code == 0
    v3, code = await raw_connect(rig, V311, "carol-bye3", "carol", await rig.token("carol"))
    assert code == 0
    waiting = await RawClient.open(rig)  # connected, no CONNECT yet
    await rig.gateway.stop()
    assert await v5.read_packet() == b"\xe0\x01\x8b"  # DISCONNECT server shutting down
    assert await v5.closed_within(2)
    assert await v3.closed_within(2)
    assert await waiting.closed_within(2)
    assert not rig.gateway.connections
    with pytest.raises(OSError):
        await RawClient.open(rig)
    for c in (v5, v3, waiting):
        await c.close()


async def test_slow_subscriber_pauses_the_broker_side(mqtt_rig):
    """A subscriber that stops reading: the gateway stops reading from its broker connection
    instead of queueing, and nothing is lost once the subscriber reads again."""
    rig = mqtt_rig
    dev, k1, _ = await rig.register_device("alice")
    sub, code = await raw_connect(rig, V311, "alice-slow", "alice", await rig.token("alice"))
    assert code == 0
    await sub.send(subscribe_packet(MQTT_311, 1, (f"devices/{dev}/telemetry", 0)))
    assert suback_reasons(await sub.read_packet(), MQTT_311) == [0]
    conn = next(c for c in rig.gateway.connections if c.session.client_id == "alice-slow")
    pub, code = await raw_connect(rig, V311, dev, dev, k1)
    assert code == 0
    payload = b"x" * 32768
    count = 200  # 6.5 MB, far beyond every buffer on the way
    for _ in range(count):
        await pub.send(publish_packet(f"devices/{dev}/telemetry", payload, level=MQTT_311))
    assert await eventually(lambda: conn._broker_paused, timeout=5)
    # Bounded: the high-water mark plus at most one read of the broker side (and TLS framing).
    assert conn.client.get_write_buffer_size() < WRITE_HIGH + RECV_BUFFER_SIZE + 65536
    received = 0
    while received < count:
        pkt = await sub.read_packet(timeout=5)
        assert pkt is not None and pkt[0] == 0x30
        received += 1
    assert not conn._broker_paused
    for c in (sub, pub):
        await c.close()


async def test_connection_metrics(mqtt_rig):
    rig = mqtt_rig
    before_total = _metric("keygate_mqtt_connections_total", transport="tcp")
    before_bytes = _metric("keygate_mqtt_bytes_total", direction="client_to_broker")
    c, code = await raw_connect(rig, V5, "carol-metrics", "carol", await rig.token("carol"))
    assert code == 0
    assert _metric("keygate_mqtt_connections_active") >= 1
    assert _metric("keygate_mqtt_connections_total", transport="tcp") == before_total + 1
    assert _metric("keygate_mqtt_bytes_total", direction="client_to_broker") > before_bytes
    assert _metric("keygate_mqtt_authentications_total", method="token", result="ok") >= 1
    await c.close()
    await eventually(lambda: not rig.gateway.connections)


async def test_bulk_publishes_are_counted_exactly(mqtt_rig):
    """A publisher writes its publishes in bursts: the gateway reads each in one chunk of many, the
    case of its fast paths, which count such a chunk in one record. The messages and decisions
    metrics move by exactly the number published, each way, counted at the gateway on real sockets
    (the subscriber's deliveries and the broker's PUBACK of the last one say they all went through)."""
    rig = mqtt_rig
    dev, k1, _ = await rig.register_device("alice")
    topic = f"devices/{dev}/telemetry"
    sub, code = await raw_connect(rig, V311, "alice-tallies", "alice", await rig.token("alice"))
    assert code == 0
    await sub.send(subscribe_packet(MQTT_311, 1, (topic, 0)))
    assert suback_reasons(await sub.read_packet(), MQTT_311) == [0]
    pub, code = await raw_connect(rig, V311, dev, dev, k1)
    assert code == 0
    # One first, alone (QoS 0, as the bulk): its decision is cached, so the bulk's first read is
    # the fast path's. Its delivery says it went through.
    await pub.send(publish_packet(topic, b"first", level=MQTT_311))
    assert (await sub.read_packet() or b"").endswith(b"first")
    counted = [("keygate_mqtt_messages_total", {"direction": "client_to_broker"}),
               ("keygate_mqtt_messages_total", {"direction": "broker_to_client"}),
               ("keygate_mqtt_decisions_total", {"action": "publish", "result": "allow"}),
               ("keygate_mqtt_decisions_total", {"action": "receive", "result": "allow"}),
               ("keygate_mqtt_decisions_total", {"action": "publish", "result": "deny"}),
               ("keygate_mqtt_decisions_total", {"action": "receive", "result": "deny"})]
    before = [_metric(name, **labels) for name, labels in counted]
    # Six bursts of 50, each written at once and read by the gateway whole (the fast path walks it
    # to its end: one count record for all 50), the subscriber's 50 deliveries awaited before the
    # next; then one more, QoS 1, whose PUBACK says the broker had them all. Under the rate
    # limit's burst (400).
    n = 6 * 50 + 1
    for burst in range(6):
        await pub.send(b"".join(publish_packet(topic, b"reading %d.%02d" % (burst, i), level=MQTT_311)
                                for i in range(50)))
        for i in range(50):
            pkt = await sub.read_packet()
            assert pkt is not None and pkt[0] == 0x30 and pkt.endswith(b"reading %d.%02d" % (burst, i)), pkt
    await pub.send(publish_packet(topic, b"last", level=MQTT_311, qos=1, packet_id=1))
    assert await pub.read_packet() == b"\x40\x02\x00\x01"
    assert (await sub.read_packet() or b"").endswith(b"last")
    after = [_metric(name, **labels) for name, labels in counted]
    assert [a - b for a, b in zip(after, before, strict=True)] == [n, n, n, n, 0, 0]
    # The fast paths took part on both connections (else this counted the full path only).
    conns = {c.session.client_id: c for c in rig.gateway.connections}
    assert conns[dev].session.fast_path_chunks > 0
    assert conns["alice-tallies"].session.fast_path_chunks > 0
    for c in (sub, pub):
        await c.close()


async def test_keepalive_is_enforced_by_the_connection_timer(mqtt_rig):
    """Keepalive 1 s: silent for 1.5 s -> v5 DISCONNECT 0x8D (keep alive timeout); traffic keeps it open."""
    rig = mqtt_rig
    token = await rig.token("carol")
    busy, code = await raw_connect(rig, V5, "carol-busy", "carol", token, keepalive=1)
    assert code == 0
    quiet, code = await raw_connect(rig, V5, "carol-quiet", "carol", token, keepalive=1)
    assert code == 0
    for _ in range(4):
        await busy.send(b"\xc0\x00")
        assert await busy.read_packet() == b"\xd0\x00"
        await asyncio.sleep(0.5)
    # The broker is given twice the keepalive, so it is always the gateway's timer that cuts the
    # quiet client, with 0x8D, at 1.5x its keepalive; the busy one stays.
    assert await quiet.read_packet(timeout=3) == b"\xe0\x01\x8d"
    assert await quiet.closed_within(1)
    for c in (busy, quiet):
        await c.close()


async def test_websocket_without_the_mqtt_subprotocol_is_closed(mqtt_rig_factory):
    rig = await mqtt_rig_factory(websocket=True)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"wss://127.0.0.1:{rig.ws_port}/mqtt", ssl=rig.client_ssl()) as ws:
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    # The socket was a Connection from accept (counted, under its deadline); it goes with the socket.
    assert await eventually(lambda: not rig.gateway.connections)
