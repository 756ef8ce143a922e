"""Instructions per message through the MQTT shell (socket protocol -> Connection -> Session ->
commands carried out -> transport write), for a load-independent before/after check of
``proxy/mqtt/``'s asyncio side; :mod:`bench.mqtt_session_instr` measures the session alone.

A real :class:`~proxy.mqtt.server.MqttGateway` (authentication and the broker dial faked, the
transports do nothing) opens one connection, then ``count`` chunks of ``per_chunk`` QoS 0
PUBLISH packets are fed through the client socket's protocol (or the broker's) the way the loop
feeds them: copied into the shared receive buffer, then ``buffer_updated``. With ``--tls`` the
client socket is the TLS side: each client chunk is one TLS record (encrypted beforehand, in
every run) and what goes to the client is encrypted. Run it under callgrind with and without
``--dry`` (everything prepared, nothing fed) and divide the difference by count * per_chunk:
setup, the records' encryption and interpreter start cancel out.

    PYTHONPATH=TREE valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/mqtt_shell_instr.py client_to_broker 1 20000 [--tls] [--dry]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import ssl
import tempfile
from typing import Any

from bench.mqtt_session_micro import ALICE, _Policies, _suback
from proxy.audit import MemoryAudit
from proxy.certs import init_dir
from proxy.config import Config, MqttConfig, OidcConfig, RateLimitConfig
from proxy.mqtt import codec
from proxy.mqtt.packets import MQTT_5, Connect, Subscribe, Subscription
from proxy.mqtt.server import MqttGateway
from proxy.services import Services


def _client_side(tls: bool) -> Any:
    """The client socket's protocol class: in proxy.mqtt.sockets since the shell's split, in
    proxy.mqtt.server before (so that the same script measures both trees)."""
    names = (("proxy.mqtt.sockets", "TlsClientSide"), ("proxy.mqtt.server", "_TlsClientSide")) if tls else \
        (("proxy.mqtt.sockets", "PlainClientSide"), ("proxy.mqtt.server", "_ClientSide"))
    for module, name in names:
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(importlib.import_module(module), name)
    raise SystemExit("no client side found")


class _NullTransport:
    """A socket that takes everything and says nothing (``sink``: keeps what it is given)."""

    def __init__(self) -> None:
        self.sink: list[bytes] | None = None
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.sink is not None:
            self.sink.append(bytes(data))

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


class _TlsClient:
    """The client's end of a TLS connection, on MemoryBIOs."""

    def __init__(self) -> None:
        folder = tempfile.mkdtemp(prefix="keygate-instr-")
        paths = init_dir(folder)
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_context.load_cert_chain(paths["server.crt"], paths["server.key"])
        client_context = ssl.create_default_context(cafile=str(paths["ca.crt"]))
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_context.wrap_bio(self._in, self._out, server_hostname="localhost")

    def handshake(self, to_server: Any, from_server: list[bytes]) -> None:
        while True:
            try:
                self.tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            if self._out.pending:
                to_server(self._out.read())
            if done:
                return
            self._in.write(b"".join(from_server))
            from_server.clear()

    def record(self, plaintext: bytes | memoryview) -> bytes:
        self.tls.write(plaintext)
        return self._out.read()


async def _open(level: int, tls: bool) -> tuple[Any, Any, _TlsClient | None, Any, _NullTransport]:
    # The rate limit still runs per message, but never bites.
    mqtt = MqttConfig(listen="127.0.0.1:0", tls=False, rate_limit=RateLimitConfig(1e9, 10**9))
    config = Config(oidc=OidcConfig(issuer="https://issuer.invalid"), mqtt=mqtt)
    services = Services(config=config, tokens=None, ownership=_Ownership(),  # type: ignore[arg-type]
                        policies=_Policies(), audit=MemoryAudit())  # type: ignore[arg-type]
    gw = _Gateway(services)
    gw.loop = asyncio.get_running_loop()
    gw.audit_writer.start(gw.loop)
    gw._accepting = True
    peer = _TlsClient() if tls else None
    if peer is not None:
        gw.ssl_context = peer.server_context
    client = _client_side(tls)(gw)
    raw = _NullTransport()
    client.connection_made(raw)

    def feed_raw(data: bytes | memoryview) -> None:
        n = len(data)
        if peer is None:
            gw.recv_buffer[:n] = data
        else:
            gw.tls_buffer[:n] = data
        client.buffer_updated(n)

    def feed_client(data: bytes | memoryview) -> None:
        feed_raw(data if peer is None else peer.record(data))

    def feed_broker(data: bytes | memoryview) -> None:
        n = len(data)
        gw.recv_buffer[:n] = data
        gw.broker_proto.buffer_updated(n)

    if peer is not None:
        raw.sink = []
        peer.handshake(feed_raw, raw.sink)
        raw.sink = None  # the client reads nothing more
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
    return feed_raw, feed_broker, peer, client.conn, raw


async def _run(side: str, per_chunk: int, count: int, level: int, tls: bool, dry: bool) -> None:
    feed_raw, feed_broker, peer, conn, raw = await _open(level, tls)
    packet = codec.encode_publish("devices/d1/telemetry", b"x" * 64, qos=0, level=level)
    chunk = memoryview(packet * per_chunk)
    chunks: list[bytes | memoryview]
    if side == "broker_to_client":
        feed, chunks = feed_broker, [chunk] * (count + 1)
    elif peer is None:
        feed, chunks = feed_raw, [chunk] * (count + 1)
    else:
        feed, chunks = feed_raw, [peer.record(chunk) for _ in range(count + 1)]
    feed(chunks[0])  # warm the decision caches: a dry run pays the same setup
    out = raw if side == "broker_to_client" else conn.upstream
    before = out.written
    if not dry:
        for data in chunks[1:]:
            feed(data)
    if conn.closed:
        raise SystemExit(f"the connection closed: {conn.close_reason}")
    if not dry and out.written - before < count * len(chunk):  # (TLS adds its record overhead)
        raise SystemExit(f"only {out.written - before} bytes of {count * len(chunk)} came through")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=("client_to_broker", "broker_to_client"))
    ap.add_argument("per_chunk", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--level", type=int, default=MQTT_5)
    ap.add_argument("--tls", action="store_true", help="the client's socket is the TLS side")
    ap.add_argument("--dry", action="store_true", help="prepare everything, feed nothing (the baseline run)")
    args = ap.parse_args()
    asyncio.run(_run(args.side, args.per_chunk, args.count, args.level, args.tls, args.dry))


if __name__ == "__main__":
    main()
