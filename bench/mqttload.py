"""The MQTT load generator: raw asyncio sockets and pre-encoded MQTT 3.1.1 packets.

Runs in its own process (``python -m bench.mqttload SPEC.json``), so that its
CPU never counts as the gateway's or the broker's. A client library would be
the bottleneck long before the gateway is: here publishers write packets that
were encoded before the clock started, many per ``write`` (bulk) or exactly
one per ``write`` (the CPU scenario), and receivers walk only the fixed
header of each packet, unless the scenario needs the payload (in-order checks,
latency stamps).

The spec is a JSON object with ``mode`` and the mode's fields (see the
``run_*`` functions). The result is one JSON line on stdout. Modes that the
orchestrator must synchronise with (CPU sampling, idle connections) print
``READY`` and wait for a line on stdin before going on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

# --------------------------------------------------------------------------- packets (MQTT 3.1.1)

PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _fixed(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, username: str | None, password: str | None, keepalive: int = 600) -> bytes:
    flags = 0x02  # clean session
    payload = _str(client_id)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    return _fixed(0x10, _str(b"MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + payload)


def subscribe_packet(pid: int, topic_filter: str, qos: int) -> bytes:
    return _fixed(0x82, struct.pack("!H", pid) + _str(topic_filter) + bytes([qos]))


def publish_packet(topic: bytes, payload: bytes, qos: int = 0, pid: int = 0) -> bytes:
    body = _str(topic) + (struct.pack("!H", pid) if qos else b"") + payload
    return _fixed(0x30 | (qos << 1), body)


def ack_packet(kind: int, pid: int) -> bytes:
    """PUBACK (4), PUBREC (5), PUBREL (6, flags 0b0010), PUBCOMP (7)."""
    return bytes([(kind << 4) | (0x02 if kind == 6 else 0), 2]) + pid.to_bytes(2, "big")


# --------------------------------------------------------------------------- one connection


class MqttError(Exception):
    pass


class Client(asyncio.Protocol):
    """One MQTT connection. Parses fixed headers and hands PUBLISHes to ``on_publish``.

    ``on_publish(first_byte, buf, start, end)`` gets the packet body as
    ``buf[start:end]`` (``buf`` is only valid during the call). QoS 1/2
    deliveries are acknowledged here, batched into one write per chunk.
    """

    # Set by connection_made: a Client is handed out (open_client) only once connected.
    transport: asyncio.Transport

    def __init__(self) -> None:
        self.buf = bytearray()
        loop = asyncio.get_running_loop()
        self.connack: asyncio.Future = loop.create_future()
        self.suback: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()
        self.pong: asyncio.Future | None = None
        self.on_publish: Callable[[int, bytearray, int, int], None] | None = None
        self.on_ack: Callable[[int, int], None] | None = None
        self.published = 0            # PUBLISH packets received
        self._can_write = asyncio.Event()
        self._can_write.set()

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        for fut in (self.connack, self.suback, self.pong):
            if fut is not None and not fut.done():
                fut.set_exception(MqttError(f"connection lost: {exc or 'closed by peer'}"))
                fut.exception()  # whoever awaits it still gets it; nobody waiting is fine too
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        n = len(buf)
        pos = 0
        acks: list[bytes] | None = None
        on_publish = self.on_publish
        count = 0
        while n - pos >= 2:
            b0 = buf[pos]
            b = buf[pos + 1]
            if b < 128:  # the common case: a one-byte remaining length
                start = pos + 2
                end = start + b
            else:
                rl, shift, i = 0, 0, pos + 1
                while i < n and i < pos + 5:
                    b = buf[i]
                    rl |= (b & 0x7F) << shift
                    shift += 7
                    i += 1
                    if b < 128:
                        break
                if b >= 128:  # length not complete yet
                    break
                start = i
                end = start + rl
            if end > n:
                break
            kind = b0 >> 4
            if kind == 3:
                count += 1
                if on_publish is not None:
                    on_publish(b0, buf, start, end)
                qos = (b0 >> 1) & 3
                if qos:
                    tlen = (buf[start] << 8) | buf[start + 1]
                    pid = (buf[start + 2 + tlen] << 8) | buf[start + 3 + tlen]
                    if acks is None:
                        acks = []
                    acks.append(ack_packet(4 if qos == 1 else 5, pid))
            elif kind in (4, 5, 7):
                pid = (buf[start] << 8) | buf[start + 1]
                if kind == 5:  # PUBREC for our QoS 2 PUBLISH: release it (batched below)
                    if acks is None:
                        acks = []
                    acks.append(ack_packet(6, pid))
                if self.on_ack is not None:
                    self.on_ack(kind, pid)
            elif kind == 6:  # PUBREL to a QoS 2 receiver: complete it
                pid = (buf[start] << 8) | buf[start + 1]
                if acks is None:
                    acks = []
                acks.append(ack_packet(7, pid))
            elif kind == 2:
                rc = buf[start + 1]
                if not self.connack.done():
                    if rc == 0:
                        self.connack.set_result(rc)
                    else:
                        self.connack.set_exception(MqttError(f"CONNACK refused, code {rc}"))
            elif kind == 9:
                if not self.suback.done():
                    self.suback.set_result(bytes(buf[start + 2:end]))
            elif kind == 13 and self.pong is not None and not self.pong.done():
                self.pong.set_result(None)
            pos = end
        if pos:
            del buf[:pos]
        self.published += count
        if acks:
            self.transport.write(b"".join(acks))

    # -- helpers
    async def drain(self) -> None:
        if not self._can_write.is_set():
            await self._can_write.wait()

    async def ping(self) -> None:
        self.pong = asyncio.get_running_loop().create_future()
        self.transport.write(PINGREQ)
        await self.pong

    async def subscribe(self, topic_filter: str, qos: int) -> None:
        self.transport.write(subscribe_packet(1, topic_filter, qos))
        codes = await self.suback
        if not codes or codes[0] >= 0x80:
            raise MqttError(f"SUBSCRIBE {topic_filter!r} refused: {codes.hex()}")

    def disconnect(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(DISCONNECT)
            self.transport.close()


_ssl_contexts: dict[str, ssl.SSLContext] = {}


def client_ssl(ca: str) -> ssl.SSLContext:
    ctx = _ssl_contexts.get(ca)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=ca)
        _ssl_contexts[ca] = ctx
    return ctx


async def open_client(target: dict, cred: dict, *, timeout: float = 30.0, keepalive: int = 600) -> Client:
    """Connect (TCP or TLS), send CONNECT, wait for CONNACK 0."""
    loop = asyncio.get_running_loop()
    ssl_ctx = client_ssl(target["ca"]) if target.get("tls") else None
    transport, client = await asyncio.wait_for(loop.create_connection(
        Client, target["host"], target["port"], ssl=ssl_ctx,
        server_hostname="localhost" if ssl_ctx else None), timeout)
    transport.write(connect_packet(cred["client_id"], cred.get("username"), cred.get("password"), keepalive))
    try:
        await asyncio.wait_for(client.connack, timeout)
    except BaseException:
        transport.abort()
        raise
    return client


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --------------------------------------------------------------------------- modes


class Window:
    """Publisher flow control: at most ``size`` messages not yet confirmed."""

    def __init__(self, size: int):
        self.size = size
        self.confirmed = 0
        self._event = asyncio.Event()

    def confirm(self, n: int = 1) -> None:
        self.confirmed += n
        self._event.set()

    async def wait_below(self, sent: int) -> None:
        while sent - self.confirmed >= self.size:
            self._event.clear()
            await self._event.wait()


def _publisher_acks(client: Client, qos: int, window: Window) -> None:
    """QoS 1: PUBACK confirms; QoS 2: PUBCOMP confirms (the client answers PUBREC itself)."""
    done_kind = 4 if qos == 1 else 7

    def on_ack(kind: int, pid: int) -> None:
        if kind == done_kind:
            window.confirm()
    if qos:
        client.on_ack = on_ack


async def run_sipmba(spec: dict) -> dict:
    """One publisher, one subscriber, ``messages`` x "hello i" in order at ``qos``.

    The subscriber checks every payload against the next expected one and
    counts what is missing, repeated or out of order.
    """
    qos, total, topic = spec["qos"], spec["messages"], spec["topic"].encode()
    sub = await open_client(spec["target"], spec["sub"])
    await sub.subscribe(spec["topic"], qos)
    pub = await open_client(spec["target"], spec["pub"])
    state = {"next": 1, "in_order": 0, "out_of_order": 0, "last": 0.0}
    done = asyncio.get_running_loop().create_future()
    tlen = len(topic)

    def on_publish(b0: int, buf: bytearray, start: int, end: int) -> None:
        off = start + 2 + tlen + (2 if b0 & 0x06 else 0)
        payload = bytes(buf[off:end])
        i = int(payload[6:])
        if i == state["next"] and payload[:6] == b"hello ":
            state["in_order"] += 1
            state["next"] = i + 1
        else:
            state["out_of_order"] += 1
            state["next"] = max(state["next"], i + 1)
        if i >= total:
            state["last"] = time.perf_counter()
            if not done.done():
                done.set_result(None)
    sub.on_publish = on_publish

    window = Window(spec.get("window", 1000) if qos else 1 << 62)
    _publisher_acks(pub, qos, window)
    batch = spec.get("batch", 64)
    # Every packet encoded before the clock starts: the publisher only writes.
    chunks = []
    for i in range(1, total + 1, batch):
        hi = min(total, i + batch - 1)
        chunks.append((hi, b"".join(publish_packet(topic, b"hello %d" % k, qos, (k - 1) % 65535 + 1)
                                    for k in range(i, hi + 1))))
    t0 = time.perf_counter()
    write = pub.transport.write
    for hi, chunk in chunks:
        if qos and hi - window.confirmed > window.size:
            await window.wait_below(hi)
        write(chunk)
        if not pub._can_write.is_set():
            await pub.drain()
    del chunks
    t_sent = time.perf_counter()
    # Done when the last message arrives, or (it was lost) when nothing has arrived for 3 s.
    timed_out = False
    deadline = time.perf_counter() + spec.get("timeout", 120)
    seen, quiet_since = -1, time.perf_counter()
    while not done.done():
        now = time.perf_counter()
        if sub.published != seen:
            seen, quiet_since = sub.published, now
        elif now - quiet_since > 3.0:
            break
        if now > deadline:
            timed_out = True
            break
        await asyncio.sleep(0.05)
    if not done.done():
        state["last"] = quiet_since
    # Let late duplicates show up before counting.
    if qos:
        await asyncio.wait_for(window.wait_below(1), 10) if not timed_out else None
    end = state["last"] or time.perf_counter()
    received = sub.published
    pub.disconnect()
    sub.disconnect()
    return {"messages": total, "received": received, "in_order": state["in_order"],
            "out_of_order": state["out_of_order"], "lost": total - state["in_order"],
            "elapsed_s": end - t0, "publish_s": t_sent - t0, "completed": not timed_out}


async def run_ingest(spec: dict) -> dict:
    """Many publishers as fast as the path allows; one counting subscriber on the broker.

    ``window`` bounds messages published but not yet counted, so no queue
    anywhere grows without bound and what is measured is the sustained rate.
    """
    qos, per_pub = spec["qos"], spec["messages_per_publisher"]
    counter = await open_client(spec["counter_target"], spec["counter"])
    await counter.subscribe(spec["counter_filter"], 0)
    pubs = [await open_client(spec["target"], p) for p in spec["publishers"]]
    total = per_pub * len(pubs)
    window = Window(spec.get("window", 20000))
    done = asyncio.get_running_loop().create_future()
    state = {"last": 0.0, "acks": 0, "sent": 0}

    def on_count(b0: int, buf: bytearray, start: int, end: int) -> None:
        window.confirmed += 1
        if window.confirmed >= total and not done.done():
            state["last"] = time.perf_counter()
            done.set_result(None)

    def on_ack(kind: int, pid: int) -> None:
        state["acks"] += 1
    counter.on_publish = on_count
    batch = spec.get("batch", 50)
    payload = b"x" * spec.get("payload_bytes", 32)
    # QoS 1: packet ids cycle through 1..60000; only as many blocks as will be sent.
    blocks = max(1, min(60000 // batch, -(-per_pub // batch)))

    def chunks_for(topic: bytes) -> list[bytes]:
        if not qos:
            return [publish_packet(topic, payload) * batch]
        return [b"".join(publish_packet(topic, payload, qos, j * batch + k + 1) for k in range(batch))
                for j in range(blocks)]

    async def publish(client: Client, topic: bytes, mine: list[bytes]) -> None:
        if qos:
            client.on_ack = on_ack
        write = client.transport.write
        sent = j = 0
        while sent < per_pub:
            n = min(batch, per_pub - sent)
            while state["sent"] + n - window.confirmed > window.size:
                window._event.clear()
                await asyncio.sleep(0.0005)
            write(mine[j % len(mine)] if n == batch else
                  b"".join(publish_packet(topic, payload, qos, 65000 + k if qos else 0) for k in range(n)))
            j += 1
            sent += n
            state["sent"] += n
            await client.drain()
    encoded = [chunks_for(p["topic"].encode()) for p in spec["publishers"]]  # before the clock starts
    t0 = time.perf_counter()
    await asyncio.gather(*(publish(c, p["topic"].encode(), e)
                           for c, p, e in zip(pubs, spec["publishers"], encoded, strict=True)))
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(done), spec.get("timeout", 60))
    except TimeoutError:
        timed_out = True
    end = state["last"] or time.perf_counter()
    if qos:
        deadline = time.perf_counter() + 5
        while state["acks"] < total and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
    received = counter.published
    for p in pubs:
        p.disconnect()
    counter.disconnect()
    return {"sent": total, "received": received, "elapsed_s": end - t0,
            "rate": received / (end - t0) if end > t0 else 0.0,
            "completed": not timed_out and received == total and (not qos or state["acks"] == total),
            "pubacks": state["acks"]}


async def run_fanout(spec: dict) -> dict:
    """One publisher, N wildcard subscribers; throughput counted in deliveries/s.

    ``subscribers`` entries with ``expect: false`` are there to prove the
    filter (through keygate they must receive nothing) and are left out of the
    window and the rate.
    """
    total = spec["messages"]
    subs = []
    for s in spec["subscribers"]:
        c = await open_client(spec["sub_target"], s)
        await c.subscribe(s["filter"], 0)
        subs.append((c, s.get("expect", True)))
    pub = await open_client(spec["pub_target"], spec["publisher"])
    expecting = [c for c, e in subs if e]
    topics = [t.encode() for t in spec["topics"]]
    payload = b"y" * spec.get("payload_bytes", 32)
    batch = spec.get("batch", 20)
    cycle = b"".join(publish_packet(topics[k % len(topics)], payload) for k in range(batch * len(topics)))
    window_size = spec.get("window", 2000)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    sent = 0
    j = 0
    per_cycle = batch * len(topics)
    while sent < total:
        n = min(per_cycle, total - sent)
        while sent + n - min(c.published for c in expecting) > window_size:
            await asyncio.sleep(0.0005)
        if n == per_cycle:
            pub.transport.write(cycle)
        else:
            pub.transport.write(b"".join(publish_packet(topics[k % len(topics)], payload) for k in range(n)))
        sent += n
        j += 1
        await pub.drain()
    deadline = loop.time() + spec.get("timeout", 60)
    while min(c.published for c in expecting) < total and loop.time() < deadline:
        await asyncio.sleep(0.001)
    end = time.perf_counter()
    # Give a filtered subscriber a moment to receive what it must not.
    await asyncio.sleep(0.2)
    counts = [c.published for c, _ in subs]
    deliveries = sum(c.published for c in expecting)
    pub.disconnect()
    for c, _ in subs:
        c.disconnect()
    return {"messages": total, "subscribers": len(expecting), "deliveries": deliveries,
            "expected_deliveries": total * len(expecting), "counts": counts,
            "unexpected": sum(c.published for c, e in subs if not e),
            "elapsed_s": end - t0, "rate": deliveries / (end - t0),
            "completed": deliveries == total * len(expecting)}


async def run_latency(spec: dict) -> dict:
    """Publish at a fixed rate; the payload carries the send time (CLOCK_MONOTONIC, shared
    by every process on the machine); the subscriber records receive - send."""
    rate, duration, topic = spec["rate"], spec["duration_s"], spec["topic"].encode()
    sub = await open_client(spec["target"], spec["sub"])
    await sub.subscribe(spec["topic"], 0)
    pub = await open_client(spec["target"], spec["pub"])
    lat: list[int] = []
    tlen = len(topic)
    # Only messages stamped from here on are measured: a warm-up message delivered late (more than
    # the pause below, on a loaded machine) was counted as one of the run's, received > sent.
    measured_from = [1 << 63]

    def on_publish(b0: int, buf: bytearray, start: int, end: int) -> None:
        now = time.monotonic_ns()
        off = start + 2 + tlen
        stamp = int.from_bytes(buf[off:off + 8], "big")
        if stamp >= measured_from[0]:
            lat.append(now - stamp)
    sub.on_publish = on_publish
    total = int(rate * duration)
    pad = b"p" * max(0, spec.get("payload_bytes", 32) - 8)
    # Warm-up: a few messages outside the measurement.
    for _ in range(20):
        pub.transport.write(publish_packet(topic, time.monotonic_ns().to_bytes(8, "big") + pad))
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.1)
    measured_from[0] = time.monotonic_ns()
    lat.clear()
    sub.published = 0
    interval = 1.0 / rate
    start = time.monotonic()
    sent = 0
    write = pub.transport.write
    while sent < total:
        due = int((time.monotonic() - start) / interval) + 1
        due = min(due, total)
        while sent < due:
            # Stamped at the moment of the write: one message per write, as a sensor sends.
            write(publish_packet(topic, time.monotonic_ns().to_bytes(8, "big") + pad))
            sent += 1
        next_at = start + sent * interval
        delay = next_at - time.monotonic()
        await asyncio.sleep(delay if delay > 0 else 0)
    deadline = time.monotonic() + spec.get("timeout", 10)
    while len(lat) < total and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    pub.disconnect()
    sub.disconnect()
    lat_us = sorted(x / 1000.0 for x in lat)

    def pct(p: float) -> float:
        if not lat_us:
            return float("nan")
        return lat_us[min(len(lat_us) - 1, int(p / 100.0 * len(lat_us)))]
    # Percentiles spaced evenly in -log10(1 - p) up to p99.99, to draw the tail (HdrHistogram style).
    ps = [100.0 * (1 - 10 ** (-4.0 * k / 200)) for k in range(201)]
    q = [[p, pct(p)] for p in ps] if lat_us else []
    return {"sent": total, "received": len(lat), "p50_us": pct(50), "p99_us": pct(99), "p999_us": pct(99.9),
            "max_us": lat_us[-1] if lat_us else float("nan"), "quantiles_us": q,
            "achieved_rate": total / (time.monotonic() - start), "completed": len(lat) == total}


async def _connect_probe(target: dict, cred: dict, timeout: float) -> float | None:
    """Seconds from the TCP connect to CONNACK 0 of one fresh connection, None when it failed."""
    t = time.perf_counter()
    try:
        c = await open_client(target, cred, timeout=timeout)
    except (TimeoutError, OSError, MqttError, ssl.SSLError):
        return None
    elapsed = time.perf_counter() - t
    c.disconnect()
    return elapsed


async def _http_probe(http: dict, timeout: float) -> float | None:
    """Seconds for one HTTPS GET on a fresh connection (TLS, request, whole answer), None unless 200."""
    t = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            http["host"], http["port"], ssl=client_ssl(http["ca"]), server_hostname="localhost"), timeout)
        writer.write(f"GET {http['path']} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {http['token']}"
                     "\r\nAccept: application/json\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(-1), timeout)
        writer.close()
    except (TimeoutError, OSError, ssl.SSLError):
        return None
    return time.perf_counter() - t if answer.startswith(b"HTTP/1.1 200") else None


async def run_legit(spec: dict) -> dict:
    """The legitimate client of the "under attack" scenario: message latency at a fixed rate
    (as ``latency``) while, beside it, a fresh connection is opened every ``probe_interval_s``
    and timed to its CONNACK, and (when ``http`` is given) one HTTPS GET timed likewise."""
    interval = spec.get("probe_interval_s", 0.25)
    probe_timeout = spec.get("probe_timeout_s", 5.0)
    connects: list[float | None] = []
    gets: list[float | None] = []
    stop = asyncio.Event()

    async def probes(results: list, probe) -> None:
        k = 0
        while not stop.is_set():
            results.append(await probe(k))
            k += 1
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
    prefix = spec.get("probe_client_id", "legit-probe")
    tasks = [asyncio.ensure_future(probes(connects, lambda k: _connect_probe(
        spec["target"], {**spec["probe"], "client_id": f"{prefix}-{k}"}, probe_timeout)))]
    if spec.get("http"):
        tasks.append(asyncio.ensure_future(probes(gets, lambda k: _http_probe(spec["http"], probe_timeout))))
    try:
        res = await run_latency(spec)
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    def ms(values: list[float | None]) -> dict:
        ok = sorted(1000 * v for v in values if v is not None)
        return {"n": len(values), "failed": len(values) - len(ok),
                "median_ms": ok[len(ok) // 2] if ok else float("nan"), "max_ms": ok[-1] if ok else float("nan")}
    res.pop("quantiles_us", None)
    return {**res, "connect": ms(connects), "http": ms(gets) if spec.get("http") else None}


async def _wait_stdin_line() -> str:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, sys.stdin.readline)


async def run_cpu(spec: dict) -> dict:
    """Many clients, each PUBLISH in its own write, at a fixed total rate.

    Prints READY once every client is connected and waits for a line on stdin,
    so the orchestrator samples the gateway's / broker's CPU time around the
    sending only. A PINGREQ per client at the end proves the broker has read
    everything sent before it (one TCP stream, processed in order).
    """
    clients = []
    sem = asyncio.Semaphore(50)

    async def connect(cred: dict) -> None:
        async with sem:
            clients.append((await open_client(spec["target"], cred), cred["topic"].encode()))
    await asyncio.gather(*(connect(c) for c in spec["clients"]))
    print("READY", flush=True)
    await _wait_stdin_line()
    rate, total = spec["rate"], spec["messages"]
    payload = b"z" * spec.get("payload_bytes", 32)
    packets = [publish_packet(t, payload) for _, t in clients]
    interval = 1.0 / rate
    start = time.monotonic()
    sent = 0
    n = len(clients)
    while sent < total:
        due = min(total, int((time.monotonic() - start) / interval) + 1)
        while sent < due:
            k = sent % n
            clients[k][0].transport.write(packets[k])
            sent += 1
        delay = start + sent * interval - time.monotonic()
        await asyncio.sleep(delay if delay > 0 else 0)
    await asyncio.gather(*(c.ping() for c, _ in clients))
    elapsed = time.monotonic() - start
    print(json.dumps({"sent": total, "elapsed_s": elapsed, "achieved_rate": total / elapsed}), flush=True)
    await _wait_stdin_line()
    for c, _ in clients:
        c.disconnect()
    return {"sent": total, "elapsed_s": elapsed, "achieved_rate": total / elapsed, "completed": True}


async def run_storm(spec: dict) -> dict:
    """Reconnect storm: ``workers`` loops of TLS connect + CONNECT (a fresh token each
    time) + CONNACK + DISCONNECT for ``duration_s``."""
    tokens = spec["tokens"]
    duration = spec["duration_s"]
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration
    state: dict[str, Any] = {"ok": 0, "failed": 0, "next": 0, "errors": {}}
    times: list[float] = []

    async def worker(w: int) -> None:
        while loop.time() < stop_at:
            k = state["next"]
            state["next"] += 1
            cred = {"client_id": f"storm-{w}-{k}", "username": "bench", "password": tokens[k % len(tokens)]}
            t = time.perf_counter()
            try:
                c = await open_client(spec["target"], cred, timeout=10)
                times.append(time.perf_counter() - t)
                c.disconnect()
                state["ok"] += 1
            except Exception as exc:  # refused connections count, the storm goes on
                state["failed"] += 1
                key = type(exc).__name__ + ": " + str(exc)[:80]
                state["errors"][key] = state["errors"].get(key, 0) + 1
    t0 = loop.time()
    await asyncio.gather(*(worker(w) for w in range(spec["workers"])))
    elapsed = loop.time() - t0
    times.sort()
    return {"connects": state["ok"], "failed": state["failed"], "elapsed_s": elapsed,
            "rate": state["ok"] / elapsed, "tokens_used": state["next"],
            "connect_p50_ms": 1000 * times[len(times) // 2] if times else float("nan"),
            "errors": state["errors"], "completed": state["ok"] > 0 and state["failed"] == 0}


async def run_idle(spec: dict) -> dict:
    """Open ``count`` TLS connections (CONNECT done, keepalive long), print READY, wait, close."""
    clients: list[Client] = []
    sem = asyncio.Semaphore(spec.get("concurrency", 64))
    failures: dict[str, int] = {}

    async def connect(k: int) -> None:
        async with sem:
            cred = {"client_id": f"{spec.get('prefix', 'idle')}-{k}", "username": "bench",
                    "password": spec["token"]}
            try:
                clients.append(await open_client(spec["target"], cred, timeout=60, keepalive=3600))
            except Exception as exc:
                key = type(exc).__name__ + ": " + str(exc)[:80]
                failures[key] = failures.get(key, 0) + 1
    t0 = time.perf_counter()
    await asyncio.gather(*(connect(k) for k in range(spec["count"])))
    elapsed = time.perf_counter() - t0
    print(json.dumps({"open": len(clients), "failures": failures, "open_s": elapsed}), flush=True)
    await _wait_stdin_line()
    for c in clients:
        c.transport.abort()
    return {"open": len(clients), "failures": failures, "open_s": elapsed,
            "completed": len(clients) == spec["count"]}


MODES = {"sipmba": run_sipmba, "ingest": run_ingest, "fanout": run_fanout, "latency": run_latency,
         "cpu": run_cpu, "storm": run_storm, "idle": run_idle, "legit": run_legit}


def run_main(run: Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]], argv: list[str] | None = None, *,
             quiet_asyncio: bool = False) -> int:
    """A load generator process: read the JSON spec named by ``argv[0]``, ``run`` it on uvloop (where
    installed) with every descriptor the hard limit allows, print the result as one JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    raise_nofile()
    if quiet_asyncio:
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        result = asyncio.run(run(spec))
    except Exception as exc:  # reported to the orchestrator as data, never a traceback
        result = {"completed": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda spec: MODES[spec["mode"]](spec), argv)


if __name__ == "__main__":
    sys.exit(main())
