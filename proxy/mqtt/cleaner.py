"""What a deleted device leaves at the broker, removed: retained messages and its session.

When a device is deleted its id becomes free; whoever registers it next must
start empty. The broker still holds what the old registration put there: the
retained messages under the device's topics (as the policies bind them through
``{device}``) and, if the device connected with a persistent session, that
session with its subscriptions and queued messages.

:func:`clear_device` connects to the broker as the device's client id with a
clean session (which ends the old session [MQTT-3.1.2-6]), subscribes to the
device's filters at QoS 0, and collects the retained messages the broker sends
for the new subscription: they all come before the answer to a PINGREQ sent
right after the SUBSCRIBE, since the broker handles a connection's packets in
order. It then publishes an empty retained message on each of those topics
(which deletes it [MQTT-3.3.1-10]), waits for the PUBACKs and disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from proxy.config import MqttConfig, parse_hostport
from proxy.mqtt import codec
from proxy.mqtt.codec import Framer
from proxy.mqtt.packets import MQTT_311, Connect, PacketType, Subscribe, Subscription

__all__ = ["clear_device"]

log = logging.getLogger("keygate.mqtt")

T = PacketType
_PINGREQ = b"\xc0\x00"
_WINDOW = 1000  # clearing publishes in flight at once


async def clear_device(mqtt: MqttConfig, device_id: str, filters: list[str], *,
                       upstream_password: str = "", timeout: float = 10.0) -> list[str]:
    """Clear the device's session and retained messages; the topics cleared. Raises
    ``OSError`` / ``asyncio.TimeoutError`` / :class:`codec.ProtocolError` when the broker
    cannot be reached or misbehaves."""
    return await asyncio.wait_for(_clear(mqtt, device_id, filters, upstream_password), timeout)


async def dial_broker(upstream: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream connection to ``mqtt.upstream`` (``host:port`` or ``unix:/path``), as the gateway's own."""
    if upstream.startswith("unix:"):
        return await asyncio.open_unix_connection(upstream[5:])
    return await asyncio.open_connection(*parse_hostport(upstream))


async def _clear(mqtt: MqttConfig, device_id: str, filters: list[str], password: str) -> list[str]:
    reader, writer = await dial_broker(mqtt.upstream)
    try:
        packets = _Packets(reader)
        username = mqtt.upstream_username or None
        writer.write(codec.encode_connect(Connect(
            "MQTT", MQTT_311, True, 30, device_id, username,
            password.encode() if username and password else None, None, [])))
        connack = await packets.next()
        if connack.type != T.CONNACK or codec.decode_connack(connack.body, MQTT_311).reason:
            raise codec.ProtocolError(0x80, "the broker refused the clean-up connection")
        topics: list[bytes] = []
        if filters:
            subs = [Subscription(f, 0) for f in filters]
            writer.write(codec.encode_subscribe(Subscribe(1, subs), MQTT_311) + _PINGREQ)
            while True:
                frame = await packets.next()
                if frame.type == T.PINGRESP:
                    break
                if frame.type == T.PUBLISH and frame.flags & 1:  # retained, sent for the new subscription
                    topics.append(bytes(codec.decode_publish(frame, MQTT_311, check_topic=False).topic))
        # Packet ids are 16 bits: at most _WINDOW clearing publishes are in flight, their ids reused.
        pending: set[int] = set()
        free = list(range(_WINDOW, 0, -1))
        for topic in dict.fromkeys(topics):
            while not free:
                frame = await packets.next()
                if frame.type == T.PUBACK:
                    pid = codec.packet_id_of(frame, MQTT_311)
                    if pid in pending:
                        pending.discard(pid)
                        free.append(pid)
            pid = free.pop()
            pending.add(pid)
            writer.write(codec.publish_head(topic, qos=1, retain=True, dup=False, packet_id=pid,
                                            level=MQTT_311, properties=(), payload_len=0))
        while pending:
            frame = await packets.next()
            if frame.type == T.PUBACK:
                pending.discard(codec.packet_id_of(frame, MQTT_311))
        writer.write(codec.encode_disconnect(MQTT_311))
        await writer.drain()
        return [t.decode("utf-8", "replace") for t in dict.fromkeys(topics)]
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class _Packets:
    """Whole packets from a stream."""

    def __init__(self, reader: asyncio.StreamReader):
        self._reader = reader
        self._framer = Framer(codec.MAX_REMAINING_LENGTH + 5)
        self._ready: list[codec.Frame] = []

    async def next(self) -> codec.Frame:
        while not self._ready:
            data = await self._reader.read(65536)
            if not data:
                raise ConnectionResetError("the broker closed the clean-up connection")
            self._ready = [codec.Frame(f.type, f.flags, memoryview(bytes(f.raw)), f.body_start, -1, -1)
                           for f in self._framer.feed(data)]
        return self._ready.pop(0)
