"""The model test's invariant, live: real Mosquitto, the real asyncio gateway, real clients.

A seeded random walk of subscribe / unsubscribe / UNSUBSCRIBE + SUBSCRIBE of one filter
in one write / grant / revoke (some grants with a short expiry) / publishes by others /
pauses, for a few sequences (about 30 s in all). After each step (and a short settle)
what the subscriber (hand-written packets, 3.1.1 or 5) received is held to the same
independent oracle as ``tests/unit/test_mqtt_model.py`` (its ``ref_match``,
``may_read`` and parser, on the same policy text, served here from a policy
directory of its own):

* every message received was readable by the subscriber when it was published or
  when it arrived;
* every QoS 1 message published on a topic under a filter the subscriber held (granted
  in its SUBACK, not unsubscribed) and readable the whole time (no ownership change in
  between) arrived.

Then the Will: a client connects with a Will allowed by a write delegation, the grant
is revoked (or not), the TCP connection is dropped; a watcher sees the Will only if it
was still allowed.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from proxy.mqtt.codec import encode_ack, encode_subscribe, encode_unsubscribe
from proxy.mqtt.packets import Subscribe, Subscription, Unsubscribe, Will
from tests.integration.mqtt_helpers import raw_connect
from tests.rig.mqtt_clients import V5, V311, Paho
from tests.unit.test_mqtt_model import POLICY, Dev, Pkt, _varint, may_read, may_write, parse, ref_match

pytestmark = pytest.mark.integration

SEQUENCES, STEPS, SETTLE = 7, 12, 0.2


@pytest.fixture
async def rig(mqtt_rig_factory, tmp_path):
    policies = tmp_path / "model-policies"
    policies.mkdir()
    # The unit model's policy, and admins publish anywhere (the "others" who publish here).
    (policies / "model.yaml").write_text(POLICY["base"] + """
  - id: admins-publish-everything
    subjects: [admin]
    mqtt: {topics: ["#"], actions: [publish]}
""")
    return await mqtt_rig_factory(issuer="factory", policies_dir=policies)


class RawSubscriber:
    """The subscriber as hand-written packets (so an UNSUBSCRIBE and a SUBSCRIBE can share one
    write), read back with the unit model's own parser; QoS 1 deliveries are acknowledged."""

    def __init__(self, client, level: int):
        self.client, self.level = client, level
        self.pid = 0
        self.subacks: dict[int, asyncio.Future] = {}
        self.messages: list[Pkt] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while (raw := await self.client.read_packet(timeout=3600)) is not None:
            for p in parse([raw], self.level):
                if p.type == 3:
                    p.payload = p.body[2 + len(p.topic.encode()) + (2 if p.qos else 0):]
                    if self.level == 5:
                        plen, i = _varint(p.payload, 0)
                        p.payload = p.payload[i + plen:]
                    self.messages.append(p)
                    if p.qos == 1:
                        await self.client.send(encode_ack(4, p.packet_id, self.level))
                elif p.type == 9 and p.pid in self.subacks:
                    self.subacks.pop(p.pid).set_result(p.codes)

    async def write(self, *ops: tuple[str, str]) -> list[int]:
        """("sub" | "unsub", filter)... in one write; the codes of the last SUBSCRIBE's SUBACK."""
        data, wait = b"", None
        for kind, f in ops:
            self.pid += 1
            if kind == "sub":
                data += encode_subscribe(Subscribe(self.pid, [Subscription(f, 1)]), self.level)
                wait = self.subacks[self.pid] = asyncio.get_running_loop().create_future()
            else:
                data += encode_unsubscribe(Unsubscribe(self.pid, [f]), self.level)
        await self.client.send(data)
        return await asyncio.wait_for(wait, 5.0) if wait is not None else []

    async def received_within(self, seconds: float) -> list[Pkt]:
        await asyncio.sleep(seconds)
        out, self.messages = self.messages, []
        return out

    async def close(self) -> None:
        self.reader.cancel()
        await self.client.close()


async def _sequence(rig, rnd: random.Random, n: int, totals: dict) -> None:
    own = rig.services.ownership
    alice_id, bob_id = await rig.identity("alice"), await rig.identity("bob")
    a, _, _ = await rig.register_device("alice")
    b, _, _ = await rig.register_device("bob")
    c, _, _ = await rig.register_device("carol", public=True)
    devs = {a: Dev(alice_id.sub), b: Dev(bob_id.sub), c: Dev("sub-carol", public=True)}
    topics = [f"devices/{d}/{s}" for d in (a, b, c) for s in ("telemetry", "cmd/x", "attrs/t")] + ["other/x"]
    filters = ["#", "devices/#", "devices/+/telemetry", f"devices/{b}/#", f"devices/{b}/telemetry",
               f"devices/{a}/#", f"devices/{c}/telemetry", "$share/g/devices/#", "+/+/telemetry"]

    version = rnd.choice([V5, V311])
    raw, code = await raw_connect(rig, version, f"alice-model-{n}", "alice", await rig.token("alice"))
    assert code == 0
    sub = RawSubscriber(raw, version)
    pub = Paho(rig, f"admin-model-{n}", username="admin", password=await rig.token("admin"))
    assert await pub.connect() == 0
    active: set[str] = set()
    sent: dict[bytes, tuple] = {}   # payload -> topic, publish time, facts generation, filters held then
    got: set[bytes] = set()
    grants: list[str] = []
    generation = 0

    def check(messages) -> None:
        now = time.time()
        for m in messages:
            topic, t_pub, _, _ = sent[m.payload]
            assert may_read(alice_id, topic, t_pub, devs, "base") or may_read(alice_id, topic, now, devs, "base"), (
                f"alice received {topic!r}, which she may not read (filters {sorted(active)}, devices {devs})")
            got.add(m.payload)
        totals["received"] += len(messages)

    try:
        f = rnd.choice(filters)                      # a client usually subscribes first
        if (await sub.write(("sub", f)))[0] < 0x80:
            active.add(f)
        for _ in range(STEPS):
            op = rnd.choice(["sub", "sub", "unsub", "resub", "resub", "grant", "grant", "revoke", "pub", "pub", "pub",
                             "pub", "sleep"])
            if op == "sub":
                f = rnd.choice(filters)
                if (await sub.write(("sub", f)))[0] < 0x80:
                    active.add(f)
            elif op == "resub":                       # UNSUBSCRIBE and SUBSCRIBE the same filter, one write
                f = rnd.choice(["#", *sorted(active)])
                active.discard(f)
                if (await sub.write(("unsub", f), ("sub", f)))[0] < 0x80:
                    active.add(f)
            elif op == "unsub" and active:
                f = rnd.choice(sorted(active))
                active.discard(f)
                await sub.write(("unsub", f))
            elif op == "grant":
                ttl = rnd.choice([None, 1.5])
                g = await own.create_delegation(bob_id, b, "alice", "read",
                                                expires_at=None if ttl is None else time.time() + ttl)
                grants.append(g["id"])
                devs[b].grants[g["id"]] = ("alice", "read", g["expires_at"])
                generation += 1
            elif op == "revoke" and grants:
                gid = grants.pop(rnd.randrange(len(grants)))
                await own.revoke_delegation(bob_id, b, gid)
                del devs[b].grants[gid]
                generation += 1
            elif op == "pub":
                for _ in range(rnd.choice([3, 5])):
                    topic = rnd.choice(topics)
                    payload = f"{n}-{len(sent)}".encode()
                    sent[payload] = (topic, time.time(), generation, frozenset(active))
                    assert await pub.publish(topic, payload, qos=1) in (0, 0x10)  # 0x10: no subscribers
                    totals["published"] += 1
            elif op == "sleep":
                await asyncio.sleep(1.6)
            check(await sub.received_within(SETTLE))
        check(await sub.received_within(2 * SETTLE))
        now = time.time()
        for payload, (topic, t_pub, gen, held_then) in sent.items():
            held = [f for f in held_then & active if ref_match(f, topic)]
            if gen == generation and held and may_read(alice_id, topic, t_pub, devs, "base") \
                    and may_read(alice_id, topic, now, devs, "base") and payload not in got:
                totals["missing"].append((topic, held))
    finally:
        await sub.close()
        await pub.close()


async def test_random_interleavings_against_the_oracle(rig):
    totals = {"received": 0, "published": 0, "missing": []}
    for n in range(SEQUENCES):
        await _sequence(rig, random.Random(1000 + n), n, totals)
    print(f"\nlive model: {SEQUENCES} sequences, {totals['published']} published, {totals['received']} received")
    assert not totals["missing"], f"QoS 1 messages the subscriber held and could read, not delivered: {totals}"
    assert totals["received"] >= 10, totals


@pytest.mark.parametrize("revoke", [False, True])
async def test_will_reaches_the_broker_only_if_allowed_at_close(rig, revoke):
    own = rig.services.ownership
    bob_id = await rig.identity("bob")
    alice_id = await rig.identity("alice")
    b, _, _ = await rig.register_device("bob")
    grant = await own.create_delegation(bob_id, b, "alice", "write")
    devs = {b: Dev(bob_id.sub, grants={grant["id"]: ("alice", "write", None)})}
    watcher = Paho(rig, f"admin-will-{revoke}", username="admin", password=await rig.token("admin"))
    assert await watcher.connect() == 0
    assert await watcher.subscribe(f"devices/{b}/cmd/#", 1) == [1]
    topic = f"devices/{b}/cmd/gone"
    client, code = await raw_connect(rig, V5, f"alice-will-{revoke}", "alice", await rig.token("alice"),
                                     will=Will(topic, b"alice is gone", 1, False))
    assert code == 0
    if revoke:
        await own.revoke_delegation(bob_id, b, grant["id"])
        del devs[b].grants[grant["id"]]
    allowed = may_write(alice_id, topic, time.time(), devs, "base")
    assert allowed is not revoke
    client.writer.transport.abort()  # a TCP drop: no DISCONNECT from the client
    wills = [m for m in await watcher.received_within(1.5) if m.topic == topic]
    await watcher.close()
    assert bool(wills) == allowed, f"Will allowed at close: {allowed}, published by the broker: {bool(wills)}"
