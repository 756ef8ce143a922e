"""Instructions per message through the MQTT shell (socket protocol -> Connection -> Session ->
commands carried out -> transport write), for a load-independent before/after check of
``proxy/mqtt/``'s asyncio side; :mod:`bench.mqtt_session_instr` measures the session alone.

A real :class:`~proxy.mqtt.server.MqttGateway` (authentication and the broker dial faked, the
transports do nothing) opens one connection, then ``count`` chunks of ``per_chunk`` QoS 0
PUBLISH packets are fed through the plain client socket's protocol (or the broker's) the way
the loop feeds them: copied into the shared receive buffer, then ``buffer_updated``. Run it
under callgrind with ``count`` N and 0 and divide the difference by N * per_chunk: setup and
interpreter start cancel out.

    PYTHONPATH=TREE valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/mqtt_shell_instr.py client_to_broker 1 20000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
from typing import Any

from bench.mqtt_session_micro import ALICE, _Policies, _suback
from proxy.audit import MemoryAudit
from proxy.config import Config, MqttConfig, OidcConfig, RateLimitConfig
from proxy.mqtt import codec
from proxy.mqtt.packets import MQTT_5, Connect, Subscribe, Subscription
from proxy.mqtt.server import MqttGateway
from proxy.services import Services


def _plain_client_side() -> Any:
    """The plain client socket's protocol class: in proxy.mqtt.sockets since the shell's split,
    in proxy.mqtt.server before (so the same script measures both trees)."""
    for module, name in (("proxy.mqtt.sockets", "PlainClientSide"), ("proxy.mqtt.server", "_ClientSide")):
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(importlib.import_module(module), name)
    raise SystemExit("no plain client side found")


class _NullTransport:
    """A socket that takes everything and says nothing."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def can_write_eof(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000)}.get(name, default)


class _Ownership:
    def credential_problem(self, identity: Any) -> None:
        return None


class _Gateway(MqttGateway):
    broker_proto: Any = None

    async def authenticate(self, request: Any, transport: Any) -> tuple[str, Any]:
        return "token", ALICE

    async def connect_upstream(self, factory: Any) -> tuple[Any, Any]:
        proto = factory()
        up = _NullTransport()
        proto.connection_made(up)
        self.broker_proto = proto
        return up, proto


async def _open(level: int) -> tuple[Any, Any, Any]:
    # The rate limit still runs per message, but never bites.
    mqtt = MqttConfig(listen="127.0.0.1:0", tls=False, rate_limit=RateLimitConfig(1e9, 10**9))
    config = Config(oidc=OidcConfig(issuer="https://issuer.invalid"), mqtt=mqtt)
    services = Services(config=config, tokens=None, ownership=_Ownership(),  # type: ignore[arg-type]
                        policies=_Policies(), audit=MemoryAudit())  # type: ignore[arg-type]
    gw = _Gateway(services)
    gw.loop = asyncio.get_running_loop()
    gw.audit_writer.start(gw.loop)
    gw._accepting = True
    client = _plain_client_side()(gw)
    client.connection_made(_NullTransport())

    def feed_client(data: bytes | memoryview) -> None:
        n = len(data)
        gw.recv_buffer[:n] = data
        client.buffer_updated(n)

    def feed_broker(data: bytes | memoryview) -> None:
        n = len(data)
        gw.recv_buffer[:n] = data
        gw.broker_proto.buffer_updated(n)

    feed_client(codec.encode_connect(Connect("MQTT", level, True, 60, "bench", "alice", b"t")))
    for _ in range(50):
        await asyncio.sleep(0)
        if gw.broker_proto is not None:
            break
    feed_broker(codec.encode_connack(False, 0, level))
    feed_client(codec.encode_subscribe(Subscribe(1, [Subscription("devices/d1/telemetry", 0)]), level))
    feed_broker(_suback(level))
    if client.conn is None or client.conn.closed:
        raise SystemExit(f"the connection did not open: {client.conn and client.conn.close_reason}")
    return feed_client, feed_broker, client.conn


async def _run(side: str, per_chunk: int, count: int, level: int) -> None:
    feed_client, feed_broker, conn = await _open(level)
    packet = codec.encode_publish("devices/d1/telemetry", b"x" * 64, qos=0, level=level)
    chunk = memoryview(packet * per_chunk)
    feed = feed_client if side == "client_to_broker" else feed_broker
    feed(chunk)  # warm the decision caches: a run of 0 pays the same setup
    for _ in range(count):
        feed(chunk)
    if conn.closed:
        raise SystemExit(f"the connection closed: {conn.close_reason}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=("client_to_broker", "broker_to_client"))
    ap.add_argument("per_chunk", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--level", type=int, default=MQTT_5)
    args = ap.parse_args()
    asyncio.run(_run(args.side, args.per_chunk, args.count, args.level))


if __name__ == "__main__":
    main()
