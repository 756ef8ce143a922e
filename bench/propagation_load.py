"""The propagation scenario's clients: revocations through gateway A, deliveries on B and C.

``python -m bench.propagation_load spec.json`` (the spec from bench/propagation_stack.py) prints
one JSON line. What it does, with real MQTT clients (paho) and the real ownership API:

1. The owner registers a device through A's API; the grantee signs in once (so the owner can
   name them). The device publishes through A every ``interval_s`` (QoS 0), each payload
   ``"<seq> <send time>"``.
2. Each cycle: the owner grants the grantee ``read`` through A, and the cycle waits until B and
   C hold it (the first cycle then subscribes the grantee through B and through C to the
   device's topic; the subscriptions stay open from then on) and both subscribers receive again
   (resubscribing, counted, if one does not). Then it revokes through A and records, on
   CLOCK_MONOTONIC (one clock for every thread here), the moment the request was sent
   (``t_sent``) and the moment the API answered (``t_ans``: the revocation is committed by then;
   that moment stands for the commit), and polls B's and C's ``/readyz`` until each says ``change feed at N`` with N at
   least the revocation's sequence number (``t_held``, an upper bound on when that gateway
   re-checked its open connections). The device goes on publishing; the cycle ends when neither
   subscriber has received anything for ``quiet_s`` (longer than store.feed_max_silence_seconds:
   by then a gateway that missed the notification has caught up or failed closed).
3. Per subscriber: the time until its last delivery (from ``t_ans`` and from ``t_sent``), and
   every delivery of a message published after ``t_sent``, sorted by its send time ``t_pub``:

   * ``t_pub < t_ans``: **in flight** at the revocation (published while the request was on
     its way: the commit is somewhere in that span, so these are not counted against it);
   * ``t_ans <= t_pub < t_held``: **after the commit**, published before that gateway held the
     change: the propagation window, what "deliveries after revocation" counts (bounded by how
     long the feed takes, a few ms, times the publish rate);
   * ``t_pub >= t_held``: **after held**: a gateway delivered a message it received after it
     had applied the revocation. There must be none (a violation);
   * anything received after the quiet window began, before the next grant: **late** (none).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import re
import ssl
import statistics
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

DEVICE = "prop-device"
TOPIC = f"devices/{DEVICE}/telemetry"
GRANTEE = "prop-grantee"


class Api:
    """The ownership API of one gateway, one fresh TLS connection per call (connected before the clock starts)."""

    def __init__(self, port: int, ctx: ssl.SSLContext):
        self.port, self.ctx = port, ctx

    def call(self, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict, float, float]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=15)
        try:
            conn.connect()
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Authorization": f"Bearer {token}", **({"Content-Type": "application/json"} if data else {})}
            t_sent = time.monotonic()
            conn.request(method, f"/api/v1{path}", body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            t_ans = time.monotonic()
        finally:
            conn.close()
        return resp.status, (json.loads(raw) if raw else {}), t_sent, t_ans


def _client(client_id: str, username: str, password: str, ctx: ssl.SSLContext) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    c.username_pw_set(username, password)
    c.tls_set_context(ctx)
    return c


def _connect(c: paho.Client, port: int, what: str) -> None:
    done = threading.Event()
    codes: list[Any] = []

    def on_connect(_c, _u, _flags, rc, _props) -> None:
        codes.append(rc)
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port, keepalive=60)
    c.loop_start()
    if not done.wait(15) or codes[0] != 0:
        raise RuntimeError(f"{what}: CONNACK {codes[0] if codes else 'none'}")


class Subscriber:
    """The grantee on one gateway; ``got`` holds (received at, seq, sent at) of every delivery."""

    def __init__(self, gateway: dict, token: str, ctx: ssl.SSLContext):
        self.name = gateway["name"]
        self.got: list[tuple[float, int, float]] = []
        self.resubscribed = 0
        self._subacks: dict[int, threading.Event] = {}
        self.c = _client(f"{GRANTEE}-on-{self.name}", "bench", token, ctx)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda _c, _u, mid, _rc, _p: self._subacks.setdefault(mid, threading.Event()).set()
        _connect(self.c, gateway["mqtt_port"], f"subscriber on {self.name}")
        self.subscribe()

    def _on_message(self, _c, _u, msg) -> None:
        now = time.monotonic()
        seq, sent = msg.payload.split()
        self.got.append((now, int(seq), float(sent)))

    def subscribe(self) -> None:
        rc, mid = self.c.subscribe(TOPIC, 0)
        if mid is None or not self._subacks.setdefault(mid, threading.Event()).wait(10):
            raise RuntimeError(f"subscriber on {self.name}: no SUBACK ({rc})")

    def resubscribe(self) -> None:
        self.resubscribed += 1
        self.c.unsubscribe(TOPIC)
        self.subscribe()

    def last(self) -> float:
        return self.got[-1][0] if self.got else 0.0

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Publisher(threading.Thread):
    """The device on gateway A: ``"<seq> <send time>"`` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, gateway: dict, key: str, ctx: ssl.SSLContext, interval: float):
        super().__init__(daemon=True, name="propagation-publisher")
        self.interval = interval
        self.seq = 0
        self._halt = threading.Event()
        self.c = _client(DEVICE, DEVICE, key, ctx)
        _connect(self.c, gateway["mqtt_port"], "publisher on A")

    def run(self) -> None:
        start = time.monotonic()
        while not self._halt.is_set():
            self.seq += 1
            self.c.publish(TOPIC, f"{self.seq} {time.monotonic():.6f}".encode(), qos=0)
            due = start + self.seq * self.interval
            behind = due - time.monotonic()
            if behind > 0:
                time.sleep(behind)
            elif behind < -10 * self.interval:  # stalled (a loaded machine): no burst to catch up
                start = time.monotonic() - self.seq * self.interval

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.c.disconnect()
        self.c.loop_stop()


def feed_at(metrics_port: int) -> int:
    """The last change a gateway's facts include (its /readyz: ``change feed at N``); -1 when not said."""
    conn = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=5)
    try:
        conn.request("GET", "/readyz")
        body = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    m = re.search(r"change feed at (\d+)", body.get("checks", {}).get("change feed", ""))
    return int(m.group(1)) if m else -1


def wait_held(metrics_port: int, seq: int, timeout: float) -> float | None:
    """When the gateway first said it holds change ``seq`` (an upper bound), or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if feed_at(metrics_port) >= seq:
            return time.monotonic()
        time.sleep(0.002)
    return None


class Store:
    """The newest sequence number in the change feed, read from PostgreSQL itself."""

    def __init__(self, dsn: str):
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True)

    def newest(self) -> int:
        row = self.conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()
        return int(row[0]) if row else 0


def quantile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": statistics.median(values), "p99": quantile(values, 0.99), "max": max(values)}


async def _until(pred, timeout: float, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


async def _resumed(subs: list[Subscriber], since: float) -> None:
    """Each subscriber receives a message sent after ``since`` (resubscribing once if it does not)."""
    for s in subs:
        if not await _until(lambda s=s: bool(s.got) and s.got[-1][2] > since, 3.0):
            await asyncio.to_thread(s.resubscribe)
            if not await _until(lambda s=s: bool(s.got) and s.got[-1][2] > since, 5.0):
                raise RuntimeError(f"deliveries on {s.name} did not resume after the grant")


async def cycle(spec: dict, api: Api, store: Store, subs: list[Subscriber], others: list[dict],
                pub: Publisher, ctx: ssl.SSLContext) -> dict[str, Any]:
    owner = spec["tokens"]["owner"]
    status, grant, _, t_granted = await asyncio.to_thread(
        api.call, "POST", f"/devices/{DEVICE}/delegations", owner, {"to": GRANTEE, "permission": "read"})
    if status != 201:
        raise RuntimeError(f"grant: {status} {grant}")
    seq = await asyncio.to_thread(store.newest)
    for gw in others:
        if await asyncio.to_thread(wait_held, gw["metrics_port"], seq, 10) is None:
            raise RuntimeError(f"gateway {gw['name']} did not hold the grant (change {seq}) in 10 s")
    if not subs:  # the first grant is in force on B and C: subscribe (before it, SUBACK would refuse)
        subs.extend([await asyncio.to_thread(Subscriber, gw, spec["tokens"]["grantee"], ctx) for gw in others])
    resubscribed = sum(s.resubscribed for s in subs)
    await _resumed(subs, t_granted)
    resubscribed = sum(s.resubscribed for s in subs) - resubscribed
    marks = [len(s.got) for s in subs]

    status, body, t_sent, t_ans = await asyncio.to_thread(
        api.call, "DELETE", f"/devices/{DEVICE}/delegations/{grant['id']}", owner)
    if status != 204:
        raise RuntimeError(f"revoke: {status} {body}")
    seq = await asyncio.to_thread(store.newest)
    held = await asyncio.gather(*(asyncio.to_thread(wait_held, gw["metrics_port"], seq, 10) for gw in others))

    quiet = spec["quiet_s"]
    published_before = pub.seq
    settled = await _until(lambda: all(time.monotonic() - max(s.last(), t_ans) >= quiet for s in subs),
                           quiet + 10, step=0.02)
    published = pub.seq - published_before
    if published < 0.5 * quiet / pub.interval:
        raise RuntimeError(f"the publisher stalled during the quiet window ({published} messages)")
    ends = [len(s.got) for s in subs]
    await asyncio.sleep(0.05)  # anything straggling in after the quiet window is late

    out: dict[str, Any] = {"t_sent": t_sent, "t_ans": t_ans, "seq": seq, "observed": settled and None not in held,
                           "request_ms": 1000 * (t_ans - t_sent), "resubscribed": resubscribed, "gateways": {}}
    for s, gw, t_held, mark, end in zip(subs, others, held, marks, ends, strict=True):
        after = [g for g in s.got[mark:end] if g[2] >= t_sent]
        out["gateways"][gw["name"]] = {
            "last_from_answer_ms": 1000 * (s.last() - t_ans) if s.got else None,
            "last_from_sent_ms": 1000 * (s.last() - t_sent) if s.got else None,
            "held_from_answer_ms": 1000 * (t_held - t_ans) if t_held is not None else None,
            "in_flight": sum(1 for g in after if g[2] < t_ans),
            "after_commit": sum(1 for g in after if g[2] >= t_ans),
            "after_held": sum(1 for g in after if t_held is None or g[2] >= t_held),
            "late": len(s.got) - end,
        }
    return out


async def run(spec: dict) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=spec["ca"])
    a, *others = spec["gateways"]
    api = Api(a["http_port"], ctx)
    tokens = spec["tokens"]
    status, _, _, _ = await asyncio.to_thread(api.call, "GET", "/devices", tokens["grantee"])  # signs in
    if status != 200:
        raise RuntimeError(f"the grantee's sign-in: {status}")
    status, created, _, _ = await asyncio.to_thread(api.call, "POST", "/devices", tokens["owner"],
                                                    {"id": DEVICE, "type": "Sensor"})
    if status != 201:
        raise RuntimeError(f"registration: {status} {created}")
    store = await asyncio.to_thread(Store, spec["dsn"])
    subs: list[Subscriber] = []  # made once the first grant holds
    pub = await asyncio.to_thread(Publisher, a, created["k1"], ctx, spec.get("interval_s", 0.002))
    pub.start()
    cycles: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for _ in range(spec["revocations"]):
            cycles.append(await cycle(spec, api, store, subs, others, pub, ctx))
    finally:
        pub.stop()
        for s in subs:
            s.close()
    return report(cycles, subs, pub, time.monotonic() - started, spec)


def report(cycles: list[dict[str, Any]], subs: list[Subscriber], pub: Publisher, elapsed: float,
           spec: dict) -> dict[str, Any]:
    def slowest(key: str) -> list[float]:
        return [max(g[key] for g in c["gateways"].values()) for c in cycles
                if all(g[key] is not None for g in c["gateways"].values())]

    def total(key: str) -> int:
        return sum(g[key] for c in cycles for g in c["gateways"].values())

    observed = sum(1 for c in cycles if c["observed"])
    return {
        "completed": observed == len(cycles) == spec["revocations"],
        "gateways": len(spec["gateways"]), "revocations": len(cycles), "observed": observed,
        "last_delivery_ms": summary(slowest("last_from_answer_ms")),
        "last_delivery_from_sent_ms": summary(slowest("last_from_sent_ms")),
        "held_ms": summary(slowest("held_from_answer_ms")),
        "request_ms": summary([c["request_ms"] for c in cycles]),
        "in_flight": total("in_flight"), "after_commit": total("after_commit"),
        "after_held": total("after_held"), "late": total("late"),
        "resubscribed": sum(s.resubscribed for s in subs), "published": pub.seq,
        "publish_rate": pub.seq / elapsed if elapsed else 0.0, "interval_ms": 1000 * pub.interval,
        "quiet_s": spec["quiet_s"], "elapsed_s": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    from bench.mqttload import run_main

    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
