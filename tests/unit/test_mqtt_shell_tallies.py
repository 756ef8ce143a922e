"""The shell adds every count the session returns to the gateway's metrics, exactly.

The session counts a chunk of fast-path packets in one record per direction
(``session._fast_counts``) and the shell adds it to a plain integer of
:data:`~proxy.mqtt.shell_metrics.TALLIED` (``connection.Connection.apply``), or through
:func:`~proxy.mqtt.shell_metrics.count_metrics` the first time a metric is seen. What
``/metrics`` says of the MQTT traffic is only as true as those two, so here the real
:class:`~proxy.mqtt.server.MqttGateway` and its connections (the fake transports of
``test_mqtt_shell_contract``: no socket) take hundreds of publishes and deliveries, allowed
and denied, in chunks cut at random bytes, and every metric's change in the registry must
equal the sum of the session's CountMetrics, and the PUBLISH packets that went each way.
``test_mqtt_fastpath`` holds the session's counts to its full path's; this holds the shell
to the session.

Every test runs on the compiled walk and on the Python one (``test_mqtt_fastpath.walk``).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Any

import pytest

from proxy.config import RateLimitConfig
from proxy.metrics import REGISTRY
from proxy.mqtt import codec, fastpath, shell_metrics
from proxy.mqtt.commands import CountMetrics, Metric
from proxy.mqtt.context import ALLOWED_PUBLISH, ALLOWED_RECEIVE, DENY_COUNT, TO_BROKER, TO_CLIENT
from proxy.mqtt.packets import MQTT_5, MQTT_311, PacketType, Subscribe, Subscription
from proxy.mqtt.shell_metrics import DECISIONS, MESSAGES, TALLIED
from tests.unit import test_mqtt_fastpath
from tests.unit.test_mqtt_shell_contract import Rig, open_pair, rig, settle

T = PacketType
walk = test_mqtt_fastpath.walk  # the same autouse fixture: compiled walk, then Python walk

# The session's counters that traffic on an open connection moves, by Metric.name.
LABELNAMES = {"decisions": DECISIONS.labelnames, "messages": MESSAGES.labelnames}
ALLOWED = ["devices/thermo-1/telemetry", "devices/thermo-1/attrs/temp"]  # alice's by delegation (the rig's)
DENIED = ["devices/thermo-2/telemetry", "devices/public-1/telemetry"]
PUBLISHES = 300  # a bulk publisher's burst: many chunks, most of them holding several packets
DELIVERIES = 300


@pytest.fixture(autouse=True)
def first_sight():
    """Every metric unseen by the shell, as in a fresh gateway process: its first count goes
    through count_metrics (which looks up its child and enters it in TALLIED), the rest through
    the tally, so both ways are counted in every test, whichever ran before. (The children
    themselves stay: labels() hands the same ones out again.)"""
    shell_metrics._CHILDREN.clear()
    TALLIED.clear()


def sample(metric: Metric) -> float:
    names = LABELNAMES[metric.name]
    return REGISTRY.get_sample_value(f"keygate_mqtt_{metric.name}_total", dict(zip(names, metric.labels,
                                                                                   strict=True))) or 0.0


def chunks_of(packets: list[bytes], rnd: random.Random) -> list[bytes]:
    """The packets in reads of 1 to 40 packets, one read in four also cut inside the next packet
    (split across reads: the walk leaves the read behind a split packet to the full path)."""
    stream = b"".join(packets)
    ends = list(itertools.accumulate(map(len, packets)))
    out, pos, i = [], 0, 0
    while i < len(packets):
        i = min(len(packets), i + rnd.choice([1, 2, 3, rnd.randint(4, 40)]))
        end = ends[i - 1]
        if rnd.random() < 0.25 and i < len(packets):
            end += rnd.randint(1, len(packets[i]) - 1)
            i += 1
        out.append(stream[pos:end])
        pos = end
    return out


def traffic(rnd: random.Random, level: int, n: int) -> tuple[list[bytes], list[str]]:
    """``n`` PUBLISH packets, three in four on an allowed topic, QoS 0 and 1: (the packets, their topics)."""
    drawn = [(rnd.choice(ALLOWED if rnd.random() < 0.75 else DENIED), rnd.choice([0, 0, 1])) for _ in range(n)]
    packets = [codec.encode_publish(topic, b"21.5", qos=qos, packet_id=1 + i % 60000 if qos else None, level=level)
               for i, (topic, qos) in enumerate(drawn)]
    return packets, [topic for topic, _ in drawn]


def interleaved(rnd: random.Random, reads: dict[str, list[bytes]]) -> list[tuple[str, bytes]]:
    """The reads of both sides in a random interleaving, each side's in its order."""
    sides = [side for side, chunks in reads.items() for _ in chunks]
    rnd.shuffle(sides)
    queues = {side: iter(chunks) for side, chunks in reads.items()}
    return [(side, next(queues[side])) for side in sides]


def publishes_written(r: Rig, side: str, after: int) -> int:
    return sum(f.type == T.PUBLISH for i, f in r.packets(side) if i >= after)


def watch_walks(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    """(side, "whole" | "part") of every walk from now on that passed packets: a whole read is
    counted by the shared record (session._fast_counts), part of one with the full path's counts."""
    seen: set[tuple[str, str]] = set()

    def watched(walk_fn: Any, side: str) -> Any:
        def walked(mv: memoryview, *args: Any) -> Any:
            pos, n = walk_fn(mv, *args)
            if n:
                seen.add((side, "whole" if pos == len(mv) else "part"))
            return pos, n
        return walked

    monkeypatch.setattr(fastpath, "client_publishes", watched(fastpath.client_publishes, "client"))
    monkeypatch.setattr(fastpath, "broker_deliveries", watched(fastpath.broker_deliveries, "broker"))
    return seen


def returned_counts(session: Any) -> Counter:
    """Every count the session returns from now on, summed per metric (its reads wrapped)."""
    returned: Counter = Counter()

    def wrap(read: Any) -> Any:
        def counted(data: Any) -> Any:
            commands = read(data)
            for c in commands:
                if isinstance(c, CountMetrics):
                    for metric, k in c.counts:
                        returned[metric] += k
            return commands
        return counted

    session.client_data, session.broker_data = wrap(session.client_data), wrap(session.broker_data)
    return returned


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
async def test_the_shell_adds_every_count_of_the_session_to_the_metrics(level, seed, monkeypatch):
    rnd = random.Random(seed)
    # A burst far above the traffic: nothing is refused for the rate here.
    async with rig(rate_limit=RateLimitConfig(messages_per_second=1.0, burst=10 * PUBLISHES)) as r:
        client = await open_pair(r, level)
        client.feed(codec.encode_subscribe(Subscribe(1, [Subscription("devices/thermo-1/#", 1),
                                                         Subscription("devices/+/telemetry", 1)]), level))
        await settle()
        r.up.feed(codec.encode_suback(codec.Suback(1, [1, 1]), level))
        assert r.types("client")[-1] == T.SUBACK, r.log
        published, pubs = traffic(rnd, level, PUBLISHES)
        delivered, dels = traffic(rnd, level, DELIVERIES)
        reads = interleaved(rnd, {"client": chunks_of(published, rnd), "up": chunks_of(delivered, rnd)})

        metrics = [ALLOWED_PUBLISH, DENY_COUNT["publish"], TO_BROKER, ALLOWED_RECEIVE, DENY_COUNT["receive"],
                   TO_CLIENT]
        before = {m: sample(m) for m in metrics}
        mark = len(r.log)
        returned = returned_counts(r.session)
        walked = watch_walks(monkeypatch)
        for side, chunk in reads:
            (client if side == "client" else r.up).feed(chunk)
        await settle()
        assert not client.closing, r.log[-5:]
        delta = {m: sample(m) - before[m] for m in metrics}

        # The registry moved by what the session returned, metric by metric ...
        assert set(returned) <= set(metrics), returned
        assert delta == {m: float(returned[m]) for m in metrics}
        # ... which is the traffic: each publish decided once, each one forwarded counted once.
        allowed_pubs = sum(t in ALLOWED for t in pubs)
        assert delta[ALLOWED_PUBLISH] == allowed_pubs
        assert delta[DENY_COUNT["publish"]] == PUBLISHES - allowed_pubs
        assert delta[TO_BROKER] == publishes_written(r, "up", mark) == allowed_pubs
        allowed_dels = sum(t in ALLOWED for t in dels)
        assert delta[ALLOWED_RECEIVE] == allowed_dels
        assert delta[DENY_COUNT["receive"]] == DELIVERIES - allowed_dels
        assert delta[TO_CLIENT] == publishes_written(r, "client", mark) == allowed_dels
        # Seen first by count_metrics, then counted by the tallies (the shell's inline path).
        assert all(m in TALLIED for m in metrics)
        # And both fast paths took part, both ways they count: a whole read, part of one.
        assert walked == {(side, how) for side in ("client", "broker") for how in ("whole", "part")}

