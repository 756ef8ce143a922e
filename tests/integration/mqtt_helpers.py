"""Small helpers the MQTT integration tests share (raw packets, waiting)."""

from __future__ import annotations

import asyncio
import time

from proxy.mqtt.codec import encode_connect, encode_publish, encode_subscribe
from proxy.mqtt.packets import MQTT_5, Connect, Subscribe, Subscription, Will
from tests.rig.mqtt_clients import Message, Paho, RawClient


def connect_packet(level: int, client_id: str, username: str | None, password: str | None, *,
                   will: Will | None = None, properties=(), keepalive: int = 30) -> bytes:
    return encode_connect(Connect("MQTT", level, True, keepalive, client_id, username,
                                  password.encode() if password is not None else None, will,
                                  list(properties)))


async def raw_connect(rig, level: int, client_id: str, username: str | None, password: str | None,
                      **kw) -> tuple[RawClient, int | None]:
    """A raw client after CONNECT; the CONNACK reason code (None when closed without one)."""
    c = await RawClient.open(rig)
    await c.send(connect_packet(level, client_id, username, password, **kw))
    pkt = await c.read_packet()
    if pkt is None:
        return c, None
    assert pkt[0] == 0x20, pkt
    return c, connack_reason(pkt)


def connack_reason(pkt: bytes) -> int:
    i = 1
    while pkt[i] & 0x80:
        i += 1
    return pkt[i + 2]


def subscribe_packet(level: int, packet_id: int, *filters: tuple[str, int]) -> bytes:
    return encode_subscribe(Subscribe(packet_id, [Subscription(f, q) for f, q in filters]), level)


def publish_packet(topic: str, payload: bytes, *, level: int = MQTT_5, qos: int = 0, packet_id: int | None = None,
                   retain: bool = False, properties=()) -> bytes:
    return encode_publish(topic, payload, qos=qos, retain=retain, packet_id=packet_id, level=level,
                          properties=list(properties))


def suback_reasons(pkt: bytes, level: int) -> list[int]:
    i = 1
    while pkt[i] & 0x80:
        i += 1
    i += 1 + 2  # past the length and the packet id
    if level == MQTT_5:
        plen, shift = 0, 0
        while True:
            b = pkt[i]
            plen |= (b & 0x7F) << shift
            i += 1
            shift += 7
            if not b & 0x80:
                break
        i += plen
    return list(pkt[i:])


async def eventually(check, timeout: float = 3.0, interval: float = 0.05):
    """Polls ``check()`` until it returns something truthy; returns it (or the last value)."""
    end = time.monotonic() + timeout
    value = check()
    while not value and time.monotonic() < end:
        await asyncio.sleep(interval)
        value = check()
    return value


class Sentinel:
    """A device of the subscriber's own owner, whose telemetry the subscriber reads: published
    after what must (or must not) arrive, its arrival ends the wait for what came before it,
    instead of a wait of some seconds that passes when delivery is merely slow."""

    def __init__(self, rig, subscriber: Paho, dev: str, key: str):
        self.rig, self.subscriber, self.dev, self.key = rig, subscriber, dev, key
        self.sent = 0

    @classmethod
    async def of(cls, rig, subscriber: Paho, owner: str) -> Sentinel:
        dev, key, _ = await rig.register_device(owner)
        assert await subscriber.subscribe(f"devices/{dev}/telemetry", 1) == [1]  # the SUBACK: in place
        return cls(rig, subscriber, dev, key)

    async def received(self) -> list[Message]:
        """Publish the next sentinel (QoS 1, acknowledged); what the subscriber got before it."""
        self.sent += 1
        payload = f"sentinel-{self.sent}".encode()
        d = Paho(self.rig, self.dev, username=self.dev, password=self.key)
        assert await d.connect() == 0
        assert await d.publish(f"devices/{self.dev}/telemetry", payload, qos=1) == 0
        await d.close()
        return await self.subscriber.received_before(payload)
