"""The WebSocket listener before authentication: the upgrade head and each WebSocket message
are bounded (``proxy.mqtt.wsguard``), measured against the limits; after the CONNACK the
normal ``max_packet_size`` applies. Plain (no TLS) listener: the bytes are the same."""

from __future__ import annotations

import asyncio
import base64
import os

import aiohttp
import pytest

from proxy.config import MqttLimitsConfig
from proxy.mqtt.packets import MQTT_5
from proxy.mqtt.wsguard import HEAD_MAX_BYTES
from tests.integration.mqtt_helpers import connack_reason, connect_packet, eventually, publish_packet

pytestmark = pytest.mark.integration

OPEN = MqttLimitsConfig(unauthenticated_per_address=0, unauthenticated_rate_per_address=0)


def report(what: str, **figures) -> None:
    print(f"\nMEASURED {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def _upgrade_head(extra: bytes = b"") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n"
            + extra)


def _frame_header(length: int) -> bytes:
    """A masked binary frame's header announcing ``length`` payload bytes (64-bit length)."""
    return b"\x82\xff" + length.to_bytes(8, "big") + b"\x00\x00\x00\x00"


def _frame(payload: bytes) -> bytes:
    return _frame_header(len(payload)) + payload  # mask 0: the payload as it is


async def _open(rig) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", rig.ws_port)


async def _upgraded(rig) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _open(rig)
    writer.write(_upgrade_head(b"\r\n"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def test_a_long_upgrade_head_is_refused_431_at_the_head_budget(mqtt_rig_factory):
    """Headers sent without end: held while under HEAD_MAX_BYTES, answered 431 and closed as
    soon as they pass it (aiohttp alone would take 128 lines of 8 KiB: about 1 MiB)."""
    rig = await mqtt_rig_factory(websocket=True, tls=False, limits=OPEN)
    reader, writer = await _open(rig)
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    sent = len(_upgrade_head())
    writer.write(_upgrade_head())
    while sent + len(line) <= HEAD_MAX_BYTES:
        writer.write(line)
        sent += len(line)
    await writer.drain()
    open_connections = await eventually(lambda: len(rig.gateway.connections))
    assert open_connections == 1  # under the budget: still waiting for the rest of the head
    writer.write(line)
    sent += len(line)
    answer = await asyncio.wait_for(reader.read(), 5)  # to the close
    assert answer.startswith(b"HTTP/1.1 431"), answer[:40]
    assert await eventually(lambda: not rig.gateway.connections)
    report("long upgrade head", sent=sent, limit=HEAD_MAX_BYTES)
    assert sent - len(line) <= HEAD_MAX_BYTES < sent
    assert rig.audited(action="connect", reason="upgrade_head_too_large")
    writer.close()


async def test_a_head_within_the_budget_upgrades(mqtt_rig_factory):
    rig = await mqtt_rig_factory(websocket=True, tls=False, limits=OPEN)
    reader, writer = await _open(rig)
    pad = b"X-Pad: " + b"a" * 8000 + b"\r\n"
    writer.write(_upgrade_head(pad + b"\r\n"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    writer.close()


async def test_a_large_message_before_connack_is_refused_at_its_frame_header(mqtt_rig_factory):
    """After the upgrade and before authentication, a frame announcing 1 MiB is refused at its
    header with close 1009: nothing of its payload is sent, nothing held."""
    rig = await mqtt_rig_factory(websocket=True, tls=False, limits=OPEN)
    limit = rig.config.mqtt.limits.connect_max_bytes
    reader, writer = await _upgraded(rig)
    writer.write(_frame_header(1 << 20))  # the header only: the payload never comes
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer[:2] == b"\x88\x02" and int.from_bytes(answer[2:4], "big") == 1009, answer
    assert await eventually(lambda: not rig.gateway.connections)
    line = rig.audited(action="connect", reason="websocket_message_too_big")[0]
    report("WebSocket message before CONNACK", announced=1 << 20, limit=line["limit"])
    assert line["limit"] == limit
    writer.close()
    # Fragments count as one message: two of half the limit plus one byte each are refused too.
    reader, writer = await _upgraded(rig)
    half = b"\x00" * (limit // 2 + 1)
    writer.write(b"\x02\xff" + len(half).to_bytes(8, "big") + b"\x00" * 4 + half)  # not FIN
    writer.write(b"\x80\xff" + len(half).to_bytes(8, "big") + b"\x00" * 4)  # continuation, FIN
    answer = await asyncio.wait_for(reader.read(), 5)
    assert int.from_bytes(answer[2:4], "big") == 1009
    writer.close()


async def test_messages_up_to_max_packet_size_pass_after_the_connack(mqtt_rig_factory):
    """A CONNECT of exactly connect_max_bytes in one message is accepted; once authenticated
    a 200 KB publish in one message passes (PUBACK)."""
    rig = await mqtt_rig_factory(websocket=True, tls=False, limits=OPEN)
    limit = rig.config.mqtt.limits.connect_max_bytes
    dev, k1, _ = await rig.register_device("alice")
    bare = connect_packet(MQTT_5, dev, dev, k1)
    connect = connect_packet(MQTT_5, dev, dev, k1, properties=[(0x26, ("p", "x" * (limit - len(bare) - 10)))])
    connect = connect_packet(MQTT_5, dev, dev, k1,
                             properties=[(0x26, ("p", "x" * (limit - len(bare) - 10 + limit - len(connect))))])
    assert len(connect) == limit
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"ws://127.0.0.1:{rig.ws_port}/mqtt", protocols=("mqtt",)) as ws:
            await ws.send_bytes(connect)
            connack = await ws.receive_bytes(timeout=5)
            assert connack[0] == 0x20 and connack_reason(connack) == 0
            await ws.send_bytes(publish_packet(f"devices/{dev}/telemetry", b"x" * 200_000, qos=1, packet_id=1))
            puback = await ws.receive_bytes(timeout=5)
            assert puback[0] == 0x40
