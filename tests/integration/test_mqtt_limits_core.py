"""The MQTT attacks of issue 14 that the session bounds, against real Mosquitto through the
real gateway (in this process): each test makes the attack, MEASURES what it cost (bytes,
seconds, audit lines, cache entries) and compares that with the limit that bounds it.

The figures are printed (``pytest -s``) for the issue's closing note."""

from __future__ import annotations

import asyncio
import gc
import json
import time

import pytest

from proxy.config import MqttLimitsConfig, RateLimitConfig
from proxy.mqtt import codec
from proxy.mqtt.packets import MQTT_5, MQTT_311, Unsubscribe, Will
from tests.integration.mqtt_helpers import (
    connack_reason,
    connect_packet,
    publish_packet,
    raw_connect,
    suback_reasons,
    subscribe_packet,
)
from tests.rig.mqtt_clients import V5, V311, RawClient

pytestmark = pytest.mark.integration

# Many connections from 127.0.0.1 on purpose: the per-address caps (0 = off) must not be what
# stops them here, the limit under test must.
OPEN = dict(unauthenticated_per_address=0, unauthenticated_rate_per_address=0)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def connect_start(level: int, remaining: int) -> bytes:
    """The first bytes of a CONNECT announcing ``remaining`` bytes: fixed header, name, level."""
    return b"\x10" + codec.encode_varint(remaining) + b"\x00\x04MQTT" + bytes([level]) + b"\x02\x00\x1e"


def report(what: str, **figures) -> None:
    print(f"\n[limits-core] {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


async def test_partial_connects_hold_at_most_connect_max_bytes(mqtt_rig_factory):
    """200 CONNECTs announcing 1 MiB (v5 and 3.1.1) each followed by 8 KiB of body, then
    nothing (an attacker's partial CONNECT): refused at the fixed header, nothing buffered.
    Then 200 partial CONNECTs just under the limit, held to the deadline: what the gateway
    holds is at most 200 x connect_max_bytes, and so is the RSS growth of this process
    (before the limit: 1 MiB each, 200 MiB). Plain TCP: the cost under test is the CONNECT's."""
    rig = await mqtt_rig_factory(tls=False, connect_timeout_seconds=30.0, limits=MqttLimitsConfig(**OPEN))
    limit = rig.config.mqtt.limits.connect_max_bytes
    n = 200
    gc.collect()
    before = rss_bytes()
    clients = await asyncio.gather(*(RawClient.open(rig) for _ in range(n)))
    # Only what the gateway reads in one go: a close with unread data is a reset, and a reset
    # can cost the client the CONNACK in flight (see the report on issue 14).
    body = b"x" * 8192
    started = time.monotonic()
    for i, c in enumerate(clients):
        c.writer.write(connect_start(V5 if i % 2 else V311, 1 << 20) + body)
    answers = await asyncio.gather(*(c.read_packet(5.0) for c in clients))
    refused_in = time.monotonic() - started
    v5 = [a for i, a in enumerate(answers) if i % 2]
    v3 = [a for i, a in enumerate(answers) if not i % 2]
    assert all(a is not None and a[0] == 0x20 and connack_reason(a) == 0x95 for a in v5), v5[:3]
    assert all(a is None for a in v3)  # no 3.1.1 code for it: a plain close
    assert all(await asyncio.gather(*(c.closed_within(2) for c in clients)))
    oversized_growth = rss_bytes() - before
    for c in clients:
        await c.close()
    assert len(rig.audited(action="connect", decision="deny", reason_code=0x95)) == n

    # Within the limit: the CONNECT less its last byte, held until the deadline.
    gc.collect()
    before = rss_bytes()
    clients = await asyncio.gather(*(RawClient.open(rig) for _ in range(n)))
    partial = connect_packet(MQTT_311, "p", "alice", "x" * (limit - 40))
    partial = partial[:limit - 1] if len(partial) >= limit else partial[:-1]
    for c in clients:
        c.writer.write(partial)
    await asyncio.gather(*(c.writer.drain() for c in clients))

    def held() -> int:
        return sum(conn.session.partial_packet_bytes for conn in rig.gateway.connections)

    deadline = time.monotonic() + 5
    while held() < n * len(partial) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    gateway_held = held()
    growth = rss_bytes() - before
    report("partial CONNECTs", connections=n, connect_max_bytes=limit,
           oversized_refused_in_s=round(refused_in, 3), oversized_rss_growth_mb=round(oversized_growth / 2**20, 1),
           held_by_gateway_mb=round(gateway_held / 2**20, 2), bound_mb=round(n * limit / 2**20, 2),
           rss_growth_mb=round(growth / 2**20, 1), before_the_limit_mb=n)
    assert gateway_held == n * len(partial) <= n * limit
    # The process also holds the test's own clients; still far from 1 MiB per connection.
    assert growth < 2 * n * limit + 16 * 2**20
    assert oversized_growth < 16 * 2**20
    for c in clients:
        await c.close()


async def test_data_behind_the_connect_is_held_only_up_to_connect_max_bytes(mqtt_rig_factory):
    """A CONNECT and 40 KB of publishes behind it in one write, before any CONNACK: what waits
    for the authentication is bounded by connect_max_bytes (32 KiB; it was 1 MiB + 64 KiB), so
    the connection is refused (v5 CONNACK 0x97) and nothing reaches the broker."""
    rig = await mqtt_rig_factory(tls=False, limits=MqttLimitsConfig(**OPEN))
    dev, k1, _ = await rig.register_device("alice")
    limit = rig.config.mqtt.limits.connect_max_bytes
    publishes = b"".join(publish_packet(f"devices/{dev}/telemetry", b"x" * 1000) for _ in range(40))
    c = await RawClient.open(rig)
    await c.send(connect_packet(V5, dev, dev, k1) + publishes)
    pkt = await c.read_packet()
    assert pkt is not None and connack_reason(pkt) == 0x97
    assert await c.closed_within(2)
    await c.close()
    line = rig.audited(action="connect", reason="too much data before CONNACK")[0]
    report("data before CONNACK", sent=len(publishes), held=line["held"], limit=limit)
    assert line["held"] <= limit < len(publishes)


@pytest.mark.parametrize("version,code", [(V5, 0x85), (V311, 0x02)])
async def test_long_client_id_is_refused_before_any_credential_check(mqtt_rig_factory, version, code):
    """A 65 KB client id (the CONNECT let through by a larger connect_max_bytes): refused by
    its length, the authentication never asked; with the default limit the same CONNECT is
    refused at its fixed header instead."""
    rig = await mqtt_rig_factory(limits=MqttLimitsConfig(connect_max_bytes=131072, **OPEN))
    asked = []
    authenticate = rig.gateway.authenticate

    async def counting(*args, **kw):
        asked.append(args)
        return await authenticate(*args, **kw)

    rig.gateway.authenticate = counting
    token = await rig.token("alice")
    c = await RawClient.open(rig)
    packet = connect_packet(version, "c" * 65000, "alice", token)
    started = time.monotonic()
    await c.send(packet)
    pkt = await c.read_packet()
    took = time.monotonic() - started
    assert pkt is not None and connack_reason(pkt) == code
    assert await c.closed_within(2)
    await c.close()
    assert asked == []
    assert rig.audited(action="connect", decision="deny",
                       reason="client id of 65000 bytes exceeds the limit of 256")
    # The same CONNECT against the default limits: refused at the header (v5: 0x95). Its start
    # only: the gateway answers before the rest, which it would never read.
    default = await mqtt_rig_factory(limits=MqttLimitsConfig(**OPEN))
    c = await RawClient.open(default)
    await c.send(packet[:2000])
    pkt = await c.read_packet()
    assert (connack_reason(pkt) == 0x95) if version == V5 else pkt is None
    await c.close()
    # A 65 KB Will topic: v5 0x90, 3.1.1 a plain close; a normal client id gets in.
    c = await RawClient.open(rig)
    await c.send(connect_packet(version, "ok-id", "alice", token, will=Will("w" * 65000, b"", 0, False)))
    pkt = await c.read_packet()
    assert (connack_reason(pkt) == 0x90) if version == V5 else pkt is None
    await c.close()
    assert asked == []
    raw, got = await raw_connect(rig, version, "ok-id", "alice", token)
    assert got == 0 and len(asked) == 1
    await raw.close()
    report("65 KB client id", version=version, code=hex(code), refused_in_ms=round(took * 1000, 1),
           authentications=0)


async def ping_rtts(client: RawClient, until: asyncio.Event, every: float = 0.02) -> list[float]:
    rtts = []
    while not until.is_set():
        started = time.monotonic()
        await client.send(b"\xc0\x00")
        assert await client.read_packet(5.0) == b"\xd0\x00"
        rtts.append(time.monotonic() - started)
        await asyncio.sleep(every)
    return rtts


async def test_unsubscribe_flood_is_rate_limited_and_audited(mqtt_rig_factory):
    """200 UNSUBSCRIBEs of 10 filters of 1000 bytes (2 MB) in one go: the filters are charged
    to the identity's rate limit, the rest refused (v5 UNSUBACK 0x80) without reaching
    Mosquitto, one audit line per second; another client's pings keep answering."""
    rate, burst = 50, 100
    rig = await mqtt_rig_factory(rate_limit=RateLimitConfig(messages_per_second=rate, burst=burst, action="drop"),
                                 limits=MqttLimitsConfig(**OPEN))
    attacker, code = await raw_connect(rig, V5, "flood-u", "alice", await rig.token("alice"))
    victim, code2 = await raw_connect(rig, V5, "victim-u", "bob", await rig.token("bob"))
    assert code == code2 == 0
    stop = asyncio.Event()
    quiet = asyncio.create_task(ping_rtts(victim, stop))
    await asyncio.sleep(0.5)
    stop.set()
    quiet_rtts = await quiet
    n, per = 200, 10
    packets = b"".join(codec.encode_unsubscribe(Unsubscribe(i + 1, [f"{i:04d}/{j}/" + "u" * 990 for j in range(per)]),
                                                MQTT_5) for i in range(n))
    stop = asyncio.Event()
    during = asyncio.create_task(ping_rtts(victim, stop))
    started = time.monotonic()
    attacker.writer.write(packets)
    refused = forwarded = 0
    while refused + forwarded < n:
        pkt = await attacker.read_packet(10.0)
        assert pkt is not None and pkt[0] == 0xB0, pkt
        reasons = set(pkt[5:])  # after the packet id and an empty property length
        if reasons == {0x80}:
            refused += 1
        else:
            forwarded += 1  # Mosquitto's answer: 0x11, no subscription existed
    elapsed = time.monotonic() - started
    stop.set()
    flood_rtts = await during
    await attacker.close()
    await asyncio.sleep(0.1)
    lines = rig.audited(action="unsubscribe", reason="rate limit")
    report("UNSUBSCRIBE flood", packets=n, bytes=len(packets), forwarded=forwarded, refused=refused,
           seconds=round(elapsed, 2), audit_lines=len(lines),
           ping_quiet_max_ms=round(max(quiet_rtts) * 1000, 1), ping_flood_max_ms=round(max(flood_rtts) * 1000, 1))
    assert forwarded <= (burst + rate * elapsed) / per + 1
    assert refused >= n - (burst + rate * elapsed) / per - 1
    assert len(lines) <= elapsed + 2  # one per second, and the rest at close
    assert sum(r["count"] for r in lines) == refused
    assert max(flood_rtts) < 1.0
    await victim.close()


async def test_long_filter_subscribe_flood_keeps_audit_and_caches_bounded(mqtt_rig_factory):
    """1000 SUBSCRIBEs of a 5000-byte filter: each answered SUBACK 0x8F, none asked of the
    policy, so the shared decision cache holds none of them, and audited in a few folded lines
    (not 1000 lines of 5 KB). Then 1000 denied filters within the limit: the cache's keys are
    at most topic_max_bytes each."""
    rig = await mqtt_rig_factory(rate_limit=RateLimitConfig(messages_per_second=1000, burst=5000, action="drop"),
                                 limits=MqttLimitsConfig(**OPEN))
    topic_max = rig.config.mqtt.limits.topic_max_bytes
    cache = rig.services.policies._compiled._cache
    raw, code = await raw_connect(rig, V5, "long-f", "carol", await rig.token("carol"))
    assert code == 0
    entries_before = len(cache)
    n = 1000
    started = time.monotonic()
    raw.writer.write(b"".join(subscribe_packet(MQTT_5, i + 1, (f"{i:04d}/" + "f" * 4995, 0)) for i in range(n)))
    codes = []
    for _ in range(n):
        pkt = await raw.read_packet(10.0)
        assert pkt is not None and pkt[0] == 0x90, pkt
        codes += suback_reasons(pkt, MQTT_5)
    elapsed = time.monotonic() - started
    assert codes == [0x8F] * n
    assert len(cache) == entries_before  # the policy was never asked
    # Denied filters within the limit: asked, cached, audited one by one (the record), each bounded.
    raw.writer.write(b"".join(subscribe_packet(MQTT_5, i + 1, (f"x/{i:04d}/" + "f" * (topic_max - 7), 0))
                              for i in range(n)))
    for _ in range(n):
        pkt = await raw.read_packet(10.0)
        assert pkt is not None and suback_reasons(pkt, MQTT_5) == [0x87]
    await raw.close()
    await asyncio.sleep(0.1)
    long_lines = [r for r in rig.audited(action="subscribe", decision="deny") if "exceeds the limit" in r["reason"]]
    denied_lines = [r for r in rig.audited(action="subscribe", decision="deny") if "exceeds" not in r["reason"]]
    key_bytes = max(len(k[2]) for k in cache if k[0] == "s")
    report("long-filter SUBSCRIBEs", subscribes=n, filter_bytes=5000, seconds=round(elapsed, 2),
           audit_lines=len(long_lines), audit_bytes=sum(len(json.dumps(r, default=str)) for r in long_lines),
           cache_entries_added=0, denied_in_limit_lines=len(denied_lines), largest_cached_filter=key_bytes,
           topic_max_bytes=topic_max)
    assert len(long_lines) <= elapsed + 2 and sum(r["count"] for r in long_lines) == n
    assert all(len(r["resource"]) <= 64 for r in long_lines)
    assert key_bytes <= topic_max
    assert len(denied_lines) == n
