"""The compiled walk against hostile callbacks and a deterministic differential fuzz.

The walk calls Python code while it walks: the rate limiter's ``take`` (a Python method, during
which another thread may run too) and whatever a key's comparison or a decision's ``allowed``
runs. The Python walk looks every packet's key up afresh; the compiled one remembers the last
allowed key and skips the lookup for a packet that repeats it. The two answer alike only if
nothing that ran in between changed the cache (or the chunk's bytes), so the compiled walk
forgets the key after every call out. ``test_mqtt_walk.py`` holds the two walks to each other on
random chunks; the fuzz below (``tests/unit/walk_fuzz.py``) also holds both to the codec.
"""

from __future__ import annotations

import importlib
import random
from typing import Any

import pytest

from proxy.mqtt import fastpath
from tests.unit import walk_fuzz

_walk: Any
try:
    _walk = importlib.import_module("proxy.mqtt._walk")
except ImportError:   # not built: every test here fails (below), the rest of the suite runs
    _walk = None

WALKS = {"python": fastpath.py_client_publishes, "compiled": None if _walk is None else _walk.client_publishes}


@pytest.fixture(autouse=True)
def built():
    if _walk is None:
        pytest.fail("the compiled walk (proxy/mqtt/_walk.c) is not built: run scripts/setup", pytrace=False)


class Decision:
    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed


def plain(topic: bytes, payload: bytes = b"xy") -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + payload
    return bytes([0x30, len(body)]) + body


class RevokingLimiter:
    """Grants every token; while asked, the grant of ``key`` is revoked (what an invalidation
    landing while the walk is in the limiter does)."""

    def __init__(self, cache: dict, key: tuple) -> None:
        self.cache, self.key = cache, key
        self.calls: list[tuple] = []

    def take(self, sub: str, want: int) -> int:
        self.calls.append(("take", want))
        self.cache[self.key] = ("t", Decision(False))
        return want

    def give_back(self, sub: str, n: int) -> None:
        self.calls.append(("give_back", n))


@pytest.mark.parametrize("walk", ["python", "compiled"])
def test_a_grant_revoked_during_the_limiter_call_stops_the_walk_at_the_next_packet(walk):
    packet = plain(b"a")
    cache = {(b"a", 0, 0): ("a", Decision(True))}
    limiter = RevokingLimiter(cache, (b"a", 0, 0))
    chunk = memoryview(packet * 5)
    # The first packet was allowed when it was looked up; the next ones are not.
    assert WALKS[walk](chunk, cache, 1 << 20, False, set(), limiter, "s") == (len(packet), 1)
    assert limiter.calls == [("take", 5), ("give_back", 4)]


class RewritingLimiter:
    """Grants every token; while asked, rewrites the chunk's first topic into the second's."""

    def __init__(self, buf: bytearray, at: int, topic: bytes) -> None:
        self.buf, self.at, self.topic = buf, at, topic

    def take(self, sub: str, want: int) -> int:
        self.buf[self.at:self.at + len(self.topic)] = self.topic
        return want

    def give_back(self, sub: str, n: int) -> None:
        pass


@pytest.mark.parametrize("walk", ["python", "compiled"])
def test_bytes_changed_during_the_limiter_call_are_not_taken_for_the_allowed_topic(walk):
    """The remembered key is the chunk's own bytes: changed under the walk, they must not make a
    denied topic look like the allowed one before it."""
    ok, bad = plain(b"a"), plain(b"b")
    buf = bytearray(ok + bad)
    cache = {(b"a", 0, 0): ("a", Decision(True)), (b"b", 0, 0): ("b", Decision(False))}
    limiter = RewritingLimiter(buf, 4, b"b")
    assert WALKS[walk](memoryview(buf), cache, 1 << 20, False, set(), limiter, "s") == (len(ok), 1)


def test_the_compiled_walk_answers_as_the_python_one_and_the_codec_on_fuzzed_chunks():
    """30,000 chunks (seeded: the same every run), each through both walks, both directions; what
    they take is then cut and decoded by the codec as the full path would."""
    stats = walk_fuzz.new_stats()
    rng = random.Random(28)
    for _ in range(30_000):
        walk_fuzz.one(rng, stats)
    # It really walked: many chunks taken, many stopped inside.
    for kind in ("client took", "client stopped inside", "broker took"):
        assert stats[kind] * 10 >= stats["examples"], stats
