"""In-process micro-benchmark of the MQTT session's data path (no sockets).

Replays chunks of cached PUBLISH packets through one open :class:`~proxy.mqtt.session.Session`,
client to broker and broker to client, and prints messages per second (the best of ``--reps``).
A before/after check for changes to ``proxy/mqtt/``: run it on both trees, same machine, same load.

    python -m bench.mqtt_session_micro [--reps 5] [--messages 400000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from proxy.audit import MemoryAudit
from proxy.config import MqttConfig
from proxy.identity.model import Identity
from proxy.mqtt import codec
from proxy.mqtt.packets import MQTT_5, Connect, Subscribe, Subscription

ALICE = Identity(kind="user", sub="sub-alice", username="alice", method="token", expires_at=None)


class _Allow:
    allowed = True
    rule = "r"
    reason = ""
    until = None
    devices: frozenset[str] = frozenset()
    verdict = None


class _Policies:
    """Allows everything (the decisions are cached after the first packet anyway)."""

    def __init__(self) -> None:
        from proxy.policy.decision import Verdict
        self.sub = _Allow()
        self.sub.verdict = Verdict.ALLOW  # type: ignore[assignment]

    def may_publish(self, *a: Any, **k: Any) -> _Allow:
        return _Allow()

    def may_receive(self, *a: Any, **k: Any) -> _Allow:
        return _Allow()

    def may_subscribe(self, *a: Any, **k: Any) -> _Allow:
        return self.sub


def _driver(session: Any) -> tuple[Any, Any, Any]:
    """(client(data), broker(data), authenticated(identity)) for either session API."""
    if hasattr(session, "handle"):
        from proxy.mqtt import events as ev
        return (lambda d: session.handle(ev.ClientData(d)), lambda d: session.handle(ev.BrokerData(d)),
                lambda i: session.handle(ev.Authenticated(i)))
    return session.client_data, session.broker_data, session.authenticated


def open_session(level: int) -> tuple[Any, Any]:
    import inspect

    from proxy.mqtt.session import Session
    kw: dict[str, Any] = {"audit": MemoryAudit()} if "audit" in inspect.signature(Session).parameters else {}
    s = Session(config=MqttConfig(tls=False), policies=_Policies(), **kw)  # type: ignore[arg-type]
    client, broker, auth = _driver(s)
    client(codec.encode_connect(Connect("MQTT", level, True, 60, "bench", "alice", b"t")))
    auth(ALICE)
    broker(codec.encode_connack(False, 0, level))
    client(codec.encode_subscribe(Subscribe(1, [Subscription("devices/d1/telemetry", 0)]), level))
    broker(_suback(level))
    return client, broker


def _suback(level: int) -> bytes:
    from proxy.mqtt.packets import Suback
    return codec.encode_suback(Suback(1, [0]), level)


def run(level: int, messages: int, reps: int, chunk_packets: int = 64) -> dict[str, float]:
    packet = codec.encode_publish("devices/d1/telemetry", b"x" * 64, qos=0, level=level)
    chunk = memoryview(packet * chunk_packets)
    chunks = max(1, messages // chunk_packets)
    best: dict[str, float] = {}
    for _ in range(reps):
        client, broker = open_session(level)
        for side, feed in (("client_to_broker", client), ("broker_to_client", broker)):
            feed(chunk)  # warm the decision caches
            t0 = time.perf_counter()
            for _ in range(chunks):
                feed(chunk)
            rate = chunks * chunk_packets / (time.perf_counter() - t0)
            best[side] = max(best.get(side, 0.0), rate)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--messages", type=int, default=400_000)
    args = ap.parse_args()
    for per_chunk in (64, 1):  # busy connections (the fast paths) and one packet per read
        for level in (4, MQTT_5):
            messages = args.messages if per_chunk > 1 else args.messages // 8
            for side, rate in run(level, messages, args.reps, per_chunk).items():
                print(f"mqtt{level} {per_chunk:2d}/chunk {side:18s} {rate / 1e6:6.3f} M msg/s")


if __name__ == "__main__":
    main()
