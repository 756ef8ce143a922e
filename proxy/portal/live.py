"""Live telemetry for the portal: keygate subscribes, as the signed-in person, through its own MQTT listener.

No second copy of any MQTT rule: the feed is an ordinary MQTT 3.1.1 client of
the gateway's own listener, signed in with the person's access token (which
stays on the server). So the subscription is decided by the same policy as
any client's, every delivery passes the same per-message check, a revoked
delegation or an expired token ends the feed exactly as it would end a
client's, and each refusal is audited in the same way. The browser sees only
Server-Sent Events from the portal.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

from proxy.config import Config, parse_hostport
from proxy.mqtt import codec
from proxy.mqtt.packets import MQTT_5, MQTT_311, Connect, PacketType, Subscribe, Subscription

KEEPALIVE_SECONDS = 30
MAX_PACKET = 256 * 1024


class LiveError(Exception):
    """The feed could not start or ended; the message is for a person. The browser tries again."""


class LiveRefused(LiveError):
    """The gateway refused the feed (sign-in or subscription): trying again would not help."""


@dataclass(frozen=True)
class Reading:
    topic: str
    payload: str


def telemetry_topic(device_id: str) -> str:
    return f"devices/{device_id}/telemetry"


def command_topic(device_id: str, name: str) -> str:
    return f"devices/{device_id}/cmd/{name}"


class LiveFeeds:
    def __init__(self, config: Config):
        self._config = config
        self._open: set[asyncio.StreamWriter] = set()

    def _address(self) -> tuple[str, int, ssl.SSLContext | None]:
        mqtt = self._config.mqtt
        if mqtt is None:
            raise LiveError("live data needs the MQTT listener, which this gateway does not run")
        host, port = parse_hostport(mqtt.listen)
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 (every interface: reach it on loopback)
            host = "127.0.0.1"
        context = None
        if mqtt.tls:
            # Our own listener: its own certificate is the one to trust (no name to check on loopback).
            context = ssl.create_default_context(cafile=str(self._config.resolve(self._config.tls.cert)))
            context.check_hostname = False
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN   # its certificate itself is the anchor
        return host, port, context

    @contextlib.asynccontextmanager
    async def _connected(self, token: str, level: int) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                                             asyncio.StreamWriter]]:
        """A connection to the gateway's own MQTT listener, its CONNECT (as the person, with their
        token) written; closed on the way out, and by :meth:`stop`."""
        host, port, context = self._address()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context), 10)
        except (OSError, TimeoutError) as exc:
            raise LiveError("keygate cannot reach its MQTT listener just now") from exc
        self._open.add(writer)
        try:
            writer.write(codec.encode_connect(Connect("MQTT", level, True, KEEPALIVE_SECONDS,
                                                      f"portal-{secrets.token_hex(6)}", "portal", token.encode())))
            yield reader, writer
        finally:
            self._open.discard(writer)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def readings(self, token: str, device_id: str) -> AsyncIterator[Reading]:
        async with self._connected(token, MQTT_311) as (reader, writer):
            writer.write(codec.encode_subscribe(Subscribe(1, [Subscription(telemetry_topic(device_id), 0)]),
                                                MQTT_311))
            await writer.drain()
            framer = codec.Framer(MAX_PACKET)
            pinger = asyncio.create_task(self._ping(writer))
            try:
                async for reading in self._read(reader, framer):
                    yield reading
            finally:
                pinger.cancel()

    async def _read(self, reader: asyncio.StreamReader, framer: codec.Framer) -> AsyncIterator[Reading]:
        while True:
            data = await reader.read(65536)
            if not data:
                raise LiveError("the live feed ended (signed out, access withdrawn or the gateway stopped)")
            try:
                frames = framer.feed(data)
            except codec.ProtocolError as exc:
                raise LiveError("the live feed got a malformed packet") from exc
            for frame in frames:
                if frame.type == PacketType.CONNACK and bytes(frame.body[1:2]) != b"\x00":
                    raise LiveRefused("the gateway refused the live feed's sign-in")
                if frame.type == PacketType.SUBACK and bytes(frame.body[2:3]) == b"\x80":
                    raise LiveRefused("you may not read this device's data")
                if frame.type == PacketType.PUBLISH:
                    info = codec.decode_publish(frame, MQTT_311)
                    payload = bytes(frame.raw[info.payload_start:]).decode("utf-8", errors="replace")
                    yield Reading(codec.topic_from_bytes(info.topic), payload)

    async def send_command(self, token: str, device_id: str, name: str, payload: bytes) -> None:
        """Publish ``payload`` to ``devices/ID/cmd/NAME`` as the person, through the gateway's own
        MQTT listener (v5, QoS 1), so the same policy decides it as any client's publish; returns
        once the gateway accepted it, raises :class:`LiveRefused` when it refused."""
        async with self._connected(token, MQTT_5) as (reader, writer):
            writer.write(codec.encode_publish(command_topic(device_id, name), payload, qos=1, packet_id=1,
                                              level=MQTT_5))
            try:
                await writer.drain()
                framer = codec.Framer(MAX_PACKET)
                async with asyncio.timeout(10):
                    while True:
                        data = await reader.read(65536)
                        if not data:
                            raise LiveError("the gateway ended the connection before it answered")
                        for frame in framer.feed(data):
                            if frame.type == PacketType.CONNACK and bytes(frame.body[1:2]) != b"\x00":
                                raise LiveRefused("the gateway refused the sign-in for this command")
                            if frame.type == PacketType.PUBACK:
                                reason = bytes(frame.body[2:3])   # absent: success
                                if reason and reason[0] >= 0x80:
                                    raise LiveRefused("you may not send this device commands")
                                writer.write(codec.encode_disconnect(MQTT_5))
                                return
            except (codec.ProtocolError, TimeoutError) as exc:
                raise LiveError("the gateway did not answer the command") from exc

    @staticmethod
    async def _ping(writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_SECONDS / 2)
            writer.write(b"\xc0\x00")   # PINGREQ

    async def stop(self) -> None:
        for writer in list(self._open):
            writer.close()
