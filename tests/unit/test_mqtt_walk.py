"""The compiled walk (``proxy/mqtt/_walk.c``) answers exactly as the Python one.

keygate runs the compiled walk; ``fastpath.py``'s Python loops are its fallback and its
specification. Both read bytes an attacker chose, so the comparison is over random chunks of
PUBLISH packets built by hand (every length form, packet id 0, properties, QoS 2 and invalid
first bytes, cut anywhere and mutated), random decision caches, answered sets and rate limiters:
the same (offset, count), the same packet ids taken out of the answered set, the same calls on
the limiter in the same order. ``test_mqtt_fastpath.py`` holds both walks to the session's full
path.
"""

from __future__ import annotations

import importlib
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.mqtt import fastpath
from tests.unit.test_mqtt_fuzz import mutated
from tests.unit.walk_fuzz import Limiter as RecordingLimiter  # grants what is left of a budget, records calls
from tests.unit.walk_fuzz import vbi as remaining_length  # padded to a form: overlong ones are what attackers send


def _compiled_walk() -> Any:
    try:
        return importlib.import_module("proxy.mqtt._walk")
    except ImportError:   # not built: every test here fails (below), the rest of the suite runs
        return None


_walk = _compiled_walk()


@pytest.fixture(autouse=True)
def built():
    """The compiled walk must be there (scripts/setup builds it), whichever walk the session uses."""
    if _walk is None:
        pytest.fail("the compiled walk (proxy/mqtt/_walk.c) is not built: run scripts/setup", pytrace=False)


WALK_SETTINGS = settings(max_examples=600, deadline=None, derandomize=True, database=None)
TOPICS = [b"devices/d1/telemetry", b"devices/d1/attrs", b"devices/d2/cmd", b"a", b"", "é/ü".encode()]


class Decision:
    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed


@st.composite
def publish(draw, v5: bool, topic: bytes, plain: bool) -> bytes:
    """A PUBLISH on ``topic``: ``plain`` ones are what a busy publisher sends (the walk takes
    them when their key is allowed), the others have anything the walk must stop at."""
    qos = draw(st.sampled_from([0, 1, 1]))
    retain = draw(st.sampled_from([0, 0, 0, 1]))
    first = 0x30 | (qos << 1) | retain
    pid, props, form = 1 + draw(st.integers(0, 3)), b"\x00", 1
    if not plain:
        qos = draw(st.sampled_from([0, 1, 2]))
        first = draw(st.sampled_from([0x30 | (qos << 1) | retain, 0x36, 0x3E, 0x3A, 0x20, 0xE0, 0x31]))
        topic = draw(st.sampled_from(TOPICS))
        pid = draw(st.sampled_from([0, 1, 2, 0xFFFF]))
        props = draw(st.sampled_from([b"\x00", b"\x03\x23\x00\x01"]))
        form = draw(st.sampled_from([1, 2, 3]))
    var = len(topic).to_bytes(2, "big") + topic
    if qos:
        var += pid.to_bytes(2, "big")
    if v5:
        var += props
    body = var + draw(st.binary(max_size=40)) + b"p" * draw(st.sampled_from([0, 0, 200]))
    return bytes([first]) + remaining_length(len(body), form) + body


@st.composite
def chunk(draw, v5: bool) -> bytes:
    """Mostly one publisher's batch on one or two topics, with odd packets and garbage among them,
    sometimes cut short or mutated."""
    mains = draw(st.lists(st.sampled_from(TOPICS), min_size=1, max_size=2))
    kinds = draw(st.lists(st.sampled_from(["plain"] * 6 + ["odd", "garbage"]), min_size=2, max_size=14))
    packets = [draw(publish(v5, draw(st.sampled_from(mains)), kind == "plain")) if kind != "garbage"
               else draw(st.binary(min_size=1, max_size=6)) for kind in kinds]
    data = b"".join(packets)
    how = draw(st.sampled_from(["whole", "whole", "whole", "cut", "mutated"]))
    if how == "cut" and data:
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "mutated":
        data = draw(mutated(data))
    return data


@st.composite
def publish_cache(draw) -> dict:
    cache: dict = {}
    for topic in TOPICS:
        for qos in (0, 1, 2):
            for retain in (0, 1):
                what = draw(st.sampled_from(["allowed"] * 12 + ["denied", "absent", "as text"]))
                if what == "as text":
                    cache[(topic.decode(), qos, retain)] = (topic.decode(), Decision(True))
                elif what != "absent":
                    cache[(topic, qos, retain)] = (topic.decode(), Decision(what == "allowed"))
    return cache


def views(data: bytes, how: str) -> memoryview:
    """The chunk as the session sees it: a view of bytes, of a bytearray, or a slice of a bigger one."""
    if how == "bytes":
        return memoryview(data)
    if how == "bytearray":
        return memoryview(bytearray(data))
    return memoryview(b"\x30\x00" + data + b"\x30")[2:2 + len(data)]


def assert_reached(reach: Counter, *kinds: str) -> None:
    """The comparison is worth something only if the walks really walked: some examples took
    several packets, some stopped in the middle (each kind in one example of twenty at least).
    The examples are derandomized, yet the shares move by a few points with what else the process
    has imported (12-30% measured, alone and in the whole suite): the floor sits well below."""
    for kind in kinds:
        assert reach[kind] * 20 >= reach["examples"], (kind, reach)


def test_client_publishes_compiled_answers_as_the_python_walk():
    reach: Counter = Counter()
    check_client_publishes(reach)
    assert_reached(reach, "several", "stopped inside", "limiter asked", "answered taken")


def test_broker_deliveries_compiled_answers_as_the_python_walk():
    reach: Counter = Counter()
    check_broker_deliveries(reach)
    assert_reached(reach, "several", "stopped inside")


def count(reach: Counter, raw: bytes, result: tuple[int, int]) -> None:
    reach["examples"] += 1
    reach["several"] += result[1] > 1
    reach["stopped inside"] += 0 < result[0] < len(raw)


def check_client_publishes(reach: Counter) -> None:
    @WALK_SETTINGS
    @given(st.data(), st.booleans(), st.sampled_from(["bytes", "bytearray", "slice"]))
    def check(data, v5, how):
        client_publishes_alike(data, v5, how, reach)
    check()


def check_broker_deliveries(reach: Counter) -> None:
    @WALK_SETTINGS
    @given(st.data(), st.booleans(), st.sampled_from(["bytes", "bytearray", "slice"]))
    def check(data, v5, how):
        broker_deliveries_alike(data, v5, how, reach)
    check()


def client_publishes_alike(data, v5, how, reach):
    raw = data.draw(chunk(v5))
    cache = data.draw(publish_cache())
    max_size = data.draw(st.sampled_from([1 << 20] * 4 + [100, 5]))
    answered = set(data.draw(st.lists(st.integers(0, 5), min_size=2, max_size=5)))
    tokens = data.draw(st.sampled_from([None, None, 1000, 1000, 3, 1, 0]))
    outcomes = []
    for walk in (fastpath.py_client_publishes, _walk.client_publishes):
        limiter = RecordingLimiter(tokens) if tokens is not None else None
        left = set(answered)
        result = walk(views(raw, how), cache, max_size, v5, left, limiter, "sub-a")
        outcomes.append((result, left, limiter.calls if limiter else None))
    assert outcomes[1] == outcomes[0]
    count(reach, raw, outcomes[0][0])
    reach["limiter asked"] += bool(outcomes[0][2])
    reach["answered taken"] += outcomes[0][1] != answered


def broker_deliveries_alike(data, v5, how, reach):
    raw = data.draw(chunk(v5))
    exact = frozenset(data.draw(st.lists(st.sampled_from(TOPICS), max_size=3)))
    # True lets a delivery through; anything else (False, a truthy non-True) sends it to the full path.
    cache = {t: data.draw(st.sampled_from([True, True, True, False, 1])) for t in TOPICS if data.draw(st.booleans())}
    results = [walk(views(raw, how), exact, cache, v5)
               for walk in (fastpath.py_broker_deliveries, _walk.broker_deliveries)]
    assert results[1] == results[0]
    count(reach, raw, results[0])


def test_the_compiled_walk_takes_a_whole_chunk_of_repeated_topics():
    """The case it is for: one publisher's batch, one topic (its key built once)."""
    packet = b"\x30" + remaining_length(2 + len(TOPICS[0]) + 32, 1) + len(TOPICS[0]).to_bytes(2, "big") \
        + TOPICS[0] + b"x" * 32
    cache = {(TOPICS[0], 0, 0): ("devices/d1/telemetry", Decision(True))}
    view = memoryview(packet * 50)
    assert _walk.client_publishes(view, cache, 1 << 20, False, set(), None, "s") == (len(view), 50)
    assert _walk.broker_deliveries(view, frozenset(), {TOPICS[0]: True}, False) == (len(view), 50)
    # The same chunk with the decision revoked in between: nothing is remembered across calls.
    cache[(TOPICS[0], 0, 0)] = ("devices/d1/telemetry", Decision(False))
    assert _walk.client_publishes(view, cache, 1 << 20, False, set(), None, "s") == (0, 0)
    assert _walk.broker_deliveries(view, frozenset(), {TOPICS[0]: False}, False) == (0, 0)


def test_a_cache_entry_of_none_stops_both_walks():
    packet = memoryview(b"\x30\x05\x00\x01a" + b"xx")
    for walk in (fastpath.py_client_publishes, _walk.client_publishes):
        assert walk(packet, {(b"a", 0, 0): None}, 1 << 20, False, set(), None, "s") == (0, 0)


def test_the_compiled_walk_raises_as_the_python_one_on_a_broken_cache():
    packet = b"\x30\x05\x00\x01a" + b"xx"
    broken = {(b"a", 0, 0): ("a", object())}  # a decision without .allowed
    for walk in (fastpath.py_client_publishes, _walk.client_publishes):
        with pytest.raises(AttributeError):
            walk(memoryview(packet), broken, 1 << 20, False, set(), None, "s")


def test_the_compiled_walk_refuses_wrong_arguments_with_a_type_error():
    with pytest.raises(TypeError):
        _walk.client_publishes(memoryview(b"\x30\x00\x00\x00"), [], 10, False, set(), None, "s")
    with pytest.raises(TypeError):
        _walk.broker_deliveries(memoryview(b"\x30\x00\x00\x00"), frozenset(), {})


@pytest.mark.parametrize("walk", ["python", "compiled"])
def test_a_topic_that_runs_past_its_packet_is_not_read_from_the_next_bytes(walk):
    """A PUBLISH of remaining length 2 whose topic length says 1: the topic's byte would be the
    next packet's first. Random chunks seldom spell an allowed topic there; an attacker would."""
    chunk = memoryview(b"\x30\x02\x00\x01" + b"a" + b"\x00\x00")
    allowed = {(b"a", 0, 0): ("a", Decision(True))}
    pub = fastpath.py_client_publishes if walk == "python" else _walk.client_publishes
    deliver = fastpath.py_broker_deliveries if walk == "python" else _walk.broker_deliveries
    assert pub(chunk, allowed, 1 << 20, False, set(), None, "s") == (0, 0)
    assert deliver(chunk, frozenset([b"a"]), {b"a": True}, False) == (0, 0)


@pytest.mark.parametrize("walk", ["python", "compiled"])
def test_a_qos_1_publish_with_packet_id_0_stops_the_walk(walk):
    """Packet id 0 is a protocol error (MQTT 3.1.1 §2.3.1): the full path closes the connection."""
    good = b"\x32\x05\x00\x01a\x00\x07"
    bad = b"\x32\x05\x00\x01a\x00\x00"
    allowed = {(b"a", 1, 0): ("a", Decision(True))}
    pub = fastpath.py_client_publishes if walk == "python" else _walk.client_publishes
    assert pub(memoryview(good + bad + good), allowed, 1 << 20, False, set(), None, "s") == (len(good), 1)


@pytest.mark.parametrize("walk", ["python", "compiled"])
@pytest.mark.parametrize("v5", [False, True])
@pytest.mark.parametrize("qos", [1, 2])
def test_a_delivery_with_packet_id_0_stops_the_broker_walk(walk, v5, qos):
    """A broker's QoS 1 or 2 delivery with packet id 0 on an allowed topic: the full path closes
    the connection (protocol error) and the client never sees it, so the walk must stop there too."""
    def delivery(pid: int) -> bytes:
        var = b"\x00\x01a" + pid.to_bytes(2, "big") + (b"\x00" if v5 else b"")
        return bytes([0x30 | qos << 1]) + remaining_length(len(var) + 1, 1) + var + b"x"
    good, bad = delivery(7), delivery(0)
    deliver = fastpath.py_broker_deliveries if walk == "python" else _walk.broker_deliveries
    for exact, cache in ((frozenset([b"a"]), {}), (frozenset(), {b"a": True})):
        assert deliver(memoryview(good + bad + good), exact, cache, v5) == (len(good), 1)
