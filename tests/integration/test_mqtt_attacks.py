"""Attacks on the MQTT gateway, one test each, against the real broker behind it.

Each test makes the move an attacker would and shows what the gateway does
instead of what the broker alone would have done.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.config import RateLimitConfig
from proxy.metrics import REGISTRY
from proxy.mqtt.packets import MQTT_5, MQTT_311, Prop, Will
from tests.integration.mqtt_helpers import (
    connect_packet,
    eventually,
    publish_packet,
    raw_connect,
    suback_reasons,
    subscribe_packet,
)
from tests.rig.mqtt_clients import V5, V311, Paho, RawClient

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87


async def test_client_id_takeover_of_another_identity(mqtt_rig):
    """bob reuses alice's client id and her device's id: neither session is taken over."""
    rig = mqtt_rig
    dev, k1, _ = await rig.register_device("alice")
    alice = Paho(rig, "kitchen", username="alice", password=await rig.token("alice"))
    device = Paho(rig, dev, username=dev, password=k1)
    assert await alice.connect() == 0 and await device.connect() == 0
    assert await alice.subscribe(f"devices/{dev}/telemetry", 1) == [1]
    bob_token = await rig.token("bob")
    for client_id in ("kitchen", dev):
        bob = Paho(rig, client_id, username="bob", password=bob_token)
        assert await bob.connect() == 0  # accepted, but namespaced at the broker
        await bob.close()
    # A device cannot use another device's id either.
    dev2, k1b, _ = await rig.register_device("bob")
    raw, code = await raw_connect(rig, V5, dev, dev2, k1b)
    assert code == 0x85  # client identifier not valid
    await raw.close()
    # A round trip through both (instead of a pause): had either been taken over, it would be gone.
    assert await device.publish(f"devices/{dev}/telemetry", b"still-mine", qos=1) == 0
    assert (await alice.receive()).payload == b"still-mine"
    assert alice.is_connected() and device.is_connected()
    await alice.close()
    await device.close()


@pytest.mark.parametrize("version", [V311, V5])
async def test_will_on_a_forbidden_topic(mqtt_rig, version):
    rig = mqtt_rig
    dev, _, _ = await rig.register_device("alice")
    watcher = Paho(rig, "admin-watch", username="admin", password=await rig.token("admin"))
    assert await watcher.connect() == 0
    assert await watcher.subscribe(f"devices/{dev}/#", 1) == [1]
    will = Will(f"devices/{dev}/cmd/unlock", b"open", 1, True)
    raw, code = await raw_connect(rig, version, "bob-will", "bob", await rig.token("bob"), will=will)
    assert code == (NOT_AUTHORIZED if version == V5 else 5)
    await raw.close()
    # The admin's own sentinel, published after the refused client is gone, comes first.
    assert await watcher.publish(f"devices/{dev}/sentinel", b"sentinel", qos=1) == 0
    assert await watcher.received_before(b"sentinel") == []
    assert rig.audited(action="will", decision="deny", resource=f"devices/{dev}/cmd/unlock")
    await watcher.close()


async def test_topic_alias_games(mqtt_rig):
    """An alias set by a denied PUBLISH and an alias re-pointed at a forbidden topic do not
    leak: every publish is checked on its resolved topic and reaches the broker without aliases."""
    rig = mqtt_rig
    mine, _k1, _ = await rig.register_device("bob")
    theirs, _, _ = await rig.register_device("alice")
    watcher = Paho(rig, "admin-alias", username="admin", password=await rig.token("admin"))
    assert await watcher.connect() == 0
    # Only these two devices' topics: the broker is shared and other tests leave retained messages.
    assert await watcher.subscribe(f"devices/{mine}/#", 1) == [1]
    assert await watcher.subscribe(f"devices/{theirs}/#", 1) == [1]
    raw, code = await raw_connect(rig, V5, "bob-alias", "bob", await rig.token("bob"))
    assert code == 0
    alias = [(Prop.TOPIC_ALIAS, 1)]
    # 1. a denied publish that sets alias 1, then an alias-only publish: both denied.
    await raw.send(publish_packet(f"devices/{theirs}/cmd/x", b"a", qos=1, packet_id=1, properties=alias))
    assert (await raw.read_packet())[-1] == NOT_AUTHORIZED
    await raw.send(publish_packet("", b"b", qos=1, packet_id=2, properties=alias))
    assert (await raw.read_packet())[-1] == NOT_AUTHORIZED
    # 2. alias 2 on an allowed topic, then re-pointed at a forbidden one, then used bare.
    ok = [(Prop.TOPIC_ALIAS, 2)]
    await raw.send(publish_packet(f"devices/{mine}/cmd/go", b"c", qos=1, packet_id=3, properties=ok))
    assert await raw.read_packet() == bytes([0x40, 2, 0, 3])
    await raw.send(publish_packet(f"devices/{theirs}/cmd/go", b"d", qos=1, packet_id=4, properties=ok))
    assert (await raw.read_packet())[-1] == NOT_AUTHORIZED
    await raw.send(publish_packet("", b"e", qos=1, packet_id=5, properties=ok))
    assert (await raw.read_packet())[-1] == NOT_AUTHORIZED
    # 3. an alias beyond the advertised maximum is a protocol error.
    await raw.send(publish_packet(f"devices/{mine}/cmd/go", b"f", qos=0,
                                  properties=[(Prop.TOPIC_ALIAS, 65000)]))
    pkt = await raw.read_packet()
    assert pkt is not None and pkt[0] == 0xE0 and pkt[2] == 0x94  # DISCONNECT topic alias invalid
    await raw.close()
    assert await watcher.publish(f"devices/{mine}/sentinel", b"sentinel", qos=1) == 0
    got = await watcher.received_before(b"sentinel")
    assert [(m.topic, m.payload) for m in got] == [(f"devices/{mine}/cmd/go", b"c")]
    await watcher.close()


@pytest.mark.parametrize("topic", ["$SYS/#", "$SYS/broker/clients/connected", "$CONTROL/#",
                                   "$CONTROL/dynamic-security/v1"])
async def test_sys_and_control_topics(mqtt_rig, topic):
    rig = mqtt_rig
    c = Paho(rig, "carol-sys", username="carol", password=await rig.token("carol"))
    assert await c.connect() == 0
    assert await c.subscribe(topic, 0) == [NOT_AUTHORIZED]
    if "#" not in topic:
        assert await c.publish(topic, b'{"commands":[{"command":"deleteClient"}]}', qos=1) == NOT_AUTHORIZED
    await c.close()


async def test_shared_subscription_is_checked_like_its_filter(mqtt_rig):
    """``$share/g/#`` by a non-admin delivers only what the subscriber may read; a malformed
    share name is refused."""
    rig = mqtt_rig
    alices, ka, _ = await rig.register_device("alice")
    carols, kc, _ = await rig.register_device("carol")
    carol = Paho(rig, "carol-share", username="carol", password=await rig.token("carol"))
    assert await carol.connect() == 0
    # Granted with per-delivery checks, exactly as "#" would be.
    assert await carol.subscribe("$share/g/#", 1) == [1]
    raw, _code = await raw_connect(rig, V5, "carol-raw", "carol", await rig.token("carol"))
    await raw.send(subscribe_packet(MQTT_5, 9, ("$share/g+/devices/#", 1)))
    assert await raw.read_packet() == b"\xe0\x01\x8f"  # DISCONNECT topic filter invalid
    assert await raw.closed_within(2)
    await raw.close()
    for dev, key, payload in ((alices, ka, alices.encode()), (carols, kc, carols.encode()),
                              (carols, kc, b"sentinel")):  # carol's own device last: the sentinel
        d = Paho(rig, dev, username=dev, password=key)
        assert await d.connect() == 0
        assert await d.publish(f"devices/{dev}/telemetry", payload, qos=1) == 0
        await d.close()
    got = {m.topic for m in await carol.received_before(b"sentinel")}
    assert got == {f"devices/{carols}/telemetry"}
    await carol.close()


@pytest.mark.parametrize("kind", ["expired", "forged", "alg_none", "wrong_audience", "id_token",
                                  "hs256_with_public_key", "wrong_issuer"])
async def test_bad_tokens_are_refused(mqtt_rig_factory, token_factory, kind):
    rig = await mqtt_rig_factory(issuer="factory")
    token = {
        "expired": token_factory.expired,
        "forged": token_factory.wrong_key,
        "alg_none": token_factory.alg_none,
        "wrong_audience": token_factory.wrong_audience,
        "id_token": token_factory.id_token,
        "hs256_with_public_key": token_factory.hs256_with_public_key,
        "wrong_issuer": token_factory.wrong_issuer,
    }[kind]()
    for version, code in ((V5, 0x86), (V311, 4)):
        raw, got = await raw_connect(rig, version, f"t-{kind}", "alice", token)
        assert got == code
        assert await raw.closed_within(2)
        await raw.close()
    # The same user with a good token gets in: the refusals were about the token.
    raw, got = await raw_connect(rig, V5, "t-good", "alice", await rig.token("alice"))
    assert got == 0
    await raw.close()
    assert len(rig.audited(action="connect", decision="deny")) == 2


async def test_five_byte_remaining_length(mqtt_rig):
    rig = mqtt_rig
    c = await RawClient.open(rig)
    await c.send(b"\x10\xff\xff\xff\xff\x01")
    assert await c.closed_within(2)
    await c.close()
    # After CONNECT, too: closed with DISCONNECT 0x81 (malformed packet) in v5.
    raw, code = await raw_connect(rig, V5, "carol-5", "carol", await rig.token("carol"))
    assert code == 0
    await raw.send(b"\x30\xff\xff\xff\xff\x01")
    assert await raw.read_packet() == b"\xe0\x01\x81"  # DISCONNECT malformed packet
    assert await raw.closed_within(2)
    await raw.close()


async def test_packet_over_the_maximum_size(mqtt_rig_factory):
    rig = await mqtt_rig_factory(max_packet_size=1024)
    dev, k1, _ = await rig.register_device("alice")
    raw, code = await raw_connect(rig, V5, dev, dev, k1)
    assert code == 0
    # Refused on the header alone: the body is never sent, yet the gateway answers at once.
    await raw.send(b"\x30" + bytes([0x80, 0x80, 0x40]))  # 1 MiB announced
    pkt = await raw.read_packet()
    assert pkt == b"\xe0\x01\x95"  # DISCONNECT packet too large
    assert await raw.closed_within(2)
    await raw.close()
    # Before CONNECT, too, and in one piece: a 4 KiB CONNECT.
    c = await RawClient.open(rig)
    await c.send(connect_packet(MQTT_311, "big", "alice", "x" * 4096))
    assert await c.closed_within(2)
    await c.close()


async def test_connect_that_never_comes(mqtt_rig_factory):
    """Slowloris: silence, or a CONNECT trickled in byte by byte, is cut at the CONNECT deadline."""
    rig = await mqtt_rig_factory(connect_timeout_seconds=1.0)
    silent = await RawClient.open(rig)
    packet = connect_packet(MQTT_311, "slow", "alice", await rig.token("alice"))
    trickle = await RawClient.open(rig)
    dripped = 0

    async def drip():
        nonlocal dripped
        for i in range(len(packet) - 1):  # never the last byte
            try:
                await trickle.send(packet[i:i + 1])
            except (ConnectionError, OSError):
                return
            dripped += 1
            await asyncio.sleep(0.1)  # the slowloris's pace: a byte every 0.1 s

    dripper = asyncio.create_task(drip())
    assert await silent.closed_within(3)
    assert await trickle.closed_within(3)
    # Cut while still dripping: the bytes did not hold the deadline off (no wall-clock bound).
    assert dripped < len(packet) - 1
    dripper.cancel()
    await silent.close()
    await trickle.close()
    assert len(rig.audited(action="connect", reason="connect timeout")) == 2


async def test_connect_split_into_one_byte_writes(mqtt_rig):
    rig = mqtt_rig
    c = await RawClient.open(rig)
    for b in connect_packet(MQTT_5, "carol-drip", "carol", await rig.token("carol")):
        await c.send(bytes([b]))
    pkt = await c.read_packet()
    assert pkt[0] == 0x20 and pkt[3] == 0  # CONNACK success
    await c.send(subscribe_packet(MQTT_5, 1, ("devices/+/telemetry", 1)))
    assert suback_reasons(await c.read_packet(), MQTT_5) == [1]
    await c.close()


def _refused(reason: str) -> float:
    return REGISTRY.get_sample_value("keygate_mqtt_connections_refused_total", {"reason": reason}) or 0.0


async def test_flood_of_connects(mqtt_rig_factory):
    """Connections beyond max_connections are refused at accept (TLS handshakes in progress
    count); the gateway keeps serving."""
    rig = await mqtt_rig_factory(max_connections=10, connect_timeout_seconds=2.0)
    opened = await asyncio.gather(*(RawClient.open(rig) for _ in range(25)), return_exceptions=True)
    clients = [c for c in opened if isinstance(c, RawClient)]
    closed = await asyncio.gather(*(c.closed_within(0.5) for c in clients))
    assert len(rig.gateway.connections) == 10
    # Refused at accept, before any TLS work: the handshake fails or the socket closes at once.
    assert sum(closed) + (25 - len(clients)) == 15, closed
    assert _refused("max_connections") >= 15
    for c in clients:
        await c.close()
    await eventually(lambda: not rig.gateway.connections)
    ok = Paho(rig, "carol-after", username="carol", password=await rig.token("carol"))
    assert await ok.connect() == 0
    await ok.close()


@pytest.mark.parametrize("action", ["disconnect", "drop"])
async def test_publish_flood_over_the_rate_limit(mqtt_rig_factory, action):
    """50 publishes in one write against a burst of 10: the burst reaches the broker, the rest
    is refused (v5 DISCONNECT 0x96, or PUBACK 0x97 with ``drop``) and audited."""
    rig = await mqtt_rig_factory(rate_limit=RateLimitConfig(messages_per_second=1, burst=10, action=action))
    dev, k1, _ = await rig.register_device("alice")
    watcher = Paho(rig, "admin-flood", username="admin", password=await rig.token("admin"))
    assert await watcher.connect() == 0
    assert await watcher.subscribe(f"devices/{dev}/telemetry", 1) == [1]
    raw, code = await raw_connect(rig, V5, dev, dev, k1)
    assert code == 0
    await raw.send(b"".join(publish_packet(f"devices/{dev}/telemetry", b"x", qos=1, packet_id=i + 1)
                            for i in range(50)))
    answers = []
    while len(answers) < 50:
        pkt = await raw.read_packet(2.0)
        if pkt is None:
            break
        answers.append((pkt[0], pkt[2] if pkt[0] == 0xE0 else pkt[-1] if len(pkt) > 4 else 0))
        if pkt[0] == 0xE0:
            break
    if action == "disconnect":
        assert answers[-1] == (0xE0, 0x96)  # DISCONNECT message rate too high
        assert await raw.closed_within(2)
    else:
        assert answers.count((0x40, 0x97)) >= 35  # PUBACK quota exceeded
    # The watcher's own sentinel, after the flood's answers: the broker had what passed before it.
    assert await watcher.publish(f"devices/{dev}/telemetry", b"sentinel", qos=1) == 0
    delivered = await watcher.received_before(b"sentinel")
    assert 10 <= len(delivered) <= 12
    assert rig.audited(action="publish", reason="rate limit")
    await raw.close()
    await watcher.close()


async def test_rate_limit_is_per_identity_across_connections(mqtt_rig_factory):
    """Two connections of one user share one bucket: opening more connections buys no extra rate."""
    rig = await mqtt_rig_factory(rate_limit=RateLimitConfig(messages_per_second=1, burst=10, action="drop"))
    dev, _, _ = await rig.register_device("alice")
    token = await rig.token("alice")
    first, _ = await raw_connect(rig, V5, "alice-a", "alice", token)
    second, _ = await raw_connect(rig, V5, "alice-b", "alice", token)
    codes = []
    for i, c in enumerate((first, second) * 8):
        await c.send(publish_packet(f"devices/{dev}/cmd/x", b"1", qos=1, packet_id=i + 1))
        pkt = await c.read_packet()
        codes.append(pkt[-1] if len(pkt) > 4 else 0)
    assert sum(1 for code in codes if code < 0x80) in (10, 11)
    assert codes.count(0x97) >= 5
    for c in (first, second):
        await c.close()


async def test_tls_handshake_that_never_finishes_and_garbage_instead_of_tls(mqtt_rig_factory):
    """The CONNECT deadline runs from accept, so it also cuts a stalled TLS handshake;
    plaintext sent to the TLS port is dropped without an answer."""
    rig = await mqtt_rig_factory(connect_timeout_seconds=1.0)
    stalled_r, stalled_w = await asyncio.open_connection(rig.host, rig.port)
    stalled_w.write(b"\x16\x03\x01")  # the first bytes of a ClientHello, and nothing more
    garbage_r, garbage_w = await asyncio.open_connection(rig.host, rig.port)
    garbage_w.write(connect_packet(MQTT_311, "plain", "alice", "x"))
    assert await asyncio.wait_for(garbage_r.read(), 2) == b""
    # Cut by the 1 s CONNECT deadline: nothing else would end it (the gateway does TLS itself,
    # with no timer of its own); the wait only bounds a failure (no wall-clock assertion).
    assert await asyncio.wait_for(stalled_r.read(), 3) == b""
    for w in (stalled_w, garbage_w):
        w.close()
    assert await eventually(lambda: not rig.gateway.connections)
