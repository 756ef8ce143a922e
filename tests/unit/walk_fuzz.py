"""Differential fuzz of the fast paths' walk: the compiled one (``proxy/mqtt/_walk.c``) against the
Python one (``proxy/mqtt/fastpath.py``), and both against the full path's decoder.

``tests/unit/test_mqtt_walk_attacks.py`` runs a seeded 30,000 of it; for longer runs (any seed):
``python -m tests.unit.walk_fuzz [iterations] [seed]``, and ``... iterations seed guarded`` for the
compiled walk alone on chunks that end (or start) at a page it may not read.
For each random chunk (PUBLISH packets built by hand at every length form and boundary, odd first
bytes, packet ids 0/1/65535, v5 properties, topics that are prefixes, suffixes or UTF-8 oddities of
the allowed ones, cut and mutated) and random caches, answered sets, limiters and maximum sizes:

* both walks give the same (offset, count), the same answered set and the same limiter calls;
* every packet the walks took is one the full path would have forwarded unchanged: the codec's
  Framer cuts the taken prefix into exactly that many PUBLISH frames, ``decode_publish`` accepts
  each (no packet id 0, no properties, no topic alias), its topic is non-empty, its QoS at most 1
  (client) and its key allowed in the cache (client) or the topic cached True or exact (broker).

Under AddressSanitizer: build the extension with ``CFLAGS='-fsanitize=address -fno-omit-frame-pointer'
LDFLAGS=-fsanitize=address python setup.py build_ext --inplace``, then run with
``LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 PYTHONMALLOC=malloc``.
"""

from __future__ import annotations

import random
import sys
from typing import Any

from proxy.mqtt import _walk, codec, fastpath
from proxy.mqtt.codec import ProtocolError
from proxy.mqtt.packets import MQTT_5, MQTT_311

BASE = [b"devices/d1/telemetry", b"a", b"a/b", "é/ü".encode()]
# Near misses of the allowed ones: prefixes, suffixes, case, NUL, wildcards, bad UTF-8, overlong.
ODD = [b"", b"devices/d1/telemetr", b"devices/d1/telemetry/", b"devices/d1/telemetryx", b"Devices/d1/telemetry",
       b"a\x00", b"\x00a", b"a/+", b"a/#", b"+", b"#", b"a/", b"/a", b"\xc3", b"\xc3\xa9/\xc3",
       b"\xed\xa0\x80", b"\xc0\xaf", b"\xef\xbf\xbf", b"a\x01b", b"\xc2\x85", "é/ü".encode("utf-16-be"),
       b"x" * 300]
TOPICS = BASE + ODD


def _valid(topic: bytes) -> bool:
    try:
        codec.topic_from_bytes(topic)
    except ProtocolError:
        return False
    return bool(topic)


# What a cache or a grant can hold: the full path caches only topics that passed its checks.
CACHEABLE = [t for t in TOPICS if _valid(t)]
# Remaining lengths at every boundary of the variable byte integer.
BOUNDARY = [0, 1, 2, 126, 127, 128, 129, 16382, 16383, 16384, 16385, 2097151, 2097152, 268435455]


# (Any: the fuzz hands them stand-ins of the session's types, and truthy non-True cache values.)
CLIENT_WALKS: tuple[Any, ...] = (fastpath.py_client_publishes, _walk.client_publishes)
BROKER_WALKS: tuple[Any, ...] = (fastpath.py_broker_deliveries, _walk.broker_deliveries)


class Decision:
    __slots__ = ("allowed",)

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed


class Limiter:
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.calls: list[tuple[Any, ...]] = []

    def take(self, key: str, want: int) -> int:
        got = min(want, self.tokens)
        self.tokens -= got
        self.calls.append(("take", key, want, got))
        return got

    def give_back(self, key: str, n: int) -> None:
        self.tokens += n
        self.calls.append(("give_back", key, n))


def vbi(n: int, form: int = 1) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            break
    while len(out) < form:   # overlong (non-minimal) forms
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


def packet(rng: random.Random, v5: bool, mains: list[bytes]) -> bytes:
    r = rng.random()
    if r < 0.05:
        return rng.randbytes(rng.randint(1, 6))
    plain = r < 0.75
    qos = rng.choice([0, 1, 1, 2] if not plain else [0, 1])
    retain = rng.random() < 0.2
    first = 0x30 | (qos << 1) | retain
    if not plain and rng.random() < 0.3:
        first = rng.choice([0x38, 0x3A, 0x3C, 0x3E, 0x36, 0x37, 0x3B, 0x20, 0x40, 0x62, 0xE0, 0x00, rng.randrange(256)])
        qos = (first >> 1) & 3
    topic = rng.choice(mains) if plain or rng.random() < 0.5 else rng.choice(TOPICS)
    tlen = len(topic)
    if not plain and rng.random() < 0.1:
        tlen = rng.choice([tlen + 1, max(tlen - 1, 0), 0xFFFF, rng.randrange(0x10000)])
    var = tlen.to_bytes(2, "big") + topic
    if qos:
        pid = rng.randint(1, 6) if plain or rng.random() < 0.6 else rng.choice([0, 0xFFFF, 0x100, 1])
        if not plain and rng.random() < 0.05:
            var += bytes([pid & 0xFF])  # a packet id cut in half
        else:
            var += pid.to_bytes(2, "big")
    if v5:
        if plain or rng.random() < 0.5:
            var += b"\x00"
        else:
            var += rng.choice([b"\x03\x23\x00\x01", b"\x02\x0b\x01", b"\x02\x01\x01", b"\x01",
                               b"\x80\x01" + b"\x00" * 128])
    payload = rng.randbytes(rng.choice([0, 0, 1, 5, 20, 40]))
    if rng.random() < 0.03:
        payload += b"p" * rng.choice([100, 125, 126, 127, 128, 16300, 16383 - len(var)])
    body = var + payload
    length = len(body)
    form = 1
    if not plain:
        if rng.random() < 0.15:
            length = rng.choice(BOUNDARY + [length + 1, max(length - 1, 0), length + rng.randint(-3, 3)])
            length = min(max(length, 0), 268435455)
        if rng.random() < 0.15:
            form = rng.choice([2, 3, 4])
    return bytes([first]) + vbi(length, form) + body


def chunk(rng: random.Random, v5: bool) -> bytes:
    mains = rng.sample(BASE, rng.randint(1, 2)) if rng.random() < 0.9 else rng.sample(TOPICS, 2)
    data = b"".join(packet(rng, v5, mains) for _ in range(rng.randint(1, 16)))
    how = rng.random()
    if how < 0.2:
        data = data[:rng.randint(0, len(data))]
    elif how < 0.3:
        data = data[rng.randint(0, min(len(data), 5)):]
    elif how < 0.45:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if not buf:
                break
            i = rng.randrange(len(buf))
            op = rng.random()
            if op < 0.5:
                buf[i] = rng.randrange(256)
            elif op < 0.75:
                buf[i:i] = rng.randbytes(rng.randint(1, 3))
            else:
                del buf[i:i + rng.randint(1, 3)]
        data = bytes(buf)
    return data


def view(rng: random.Random, data: bytes) -> memoryview:
    how = rng.random()
    if how < 0.4:
        return memoryview(data)
    if how < 0.7:
        return memoryview(bytearray(data))
    pad = rng.randbytes(rng.randint(1, 3))
    return memoryview(pad + data + pad)[len(pad):len(pad) + len(data)]


def client_cache(rng: random.Random) -> dict[Any, Any]:
    cache: dict[Any, Any] = {}
    for topic in BASE + rng.sample(CACHEABLE, 3):
        for qos in (0, 1, 2):
            for retain in (0, 1):
                w = rng.random()
                if w < 0.7:
                    cache[(topic, qos, retain)] = (topic.decode("utf-8", "replace"), Decision(True))
                elif w < 0.8:
                    cache[(topic, qos, retain)] = (topic.decode("utf-8", "replace"), Decision(False))
                elif w < 0.85:
                    cache[(topic.decode("utf-8", "replace"), qos, retain)] = ("t", Decision(True))
    return cache


def full_path_takes(taken: bytes, n: int, v5: bool, max_size: int, allowed: Any) -> str | None:
    """What is wrong with the walk's taken prefix in the full path's eyes, or None."""
    level = MQTT_5 if v5 else MQTT_311
    try:
        frames = codec.Framer(max_size).feed(taken)
    except ProtocolError as exc:
        return f"framer: {exc}"
    if len(frames) != n or sum(len(f.raw) for f in frames) != len(taken):
        return f"framer cut {len(frames)} frames, the walk {n}"
    for f in frames:
        if f.type != 3:
            return f"type {f.type}"
        try:
            info = codec.decode_publish(f, level)
        except ProtocolError as exc:
            return f"decode_publish: {exc}"
        if info.topic_alias is not None or not info.topic or info.props_start != info.payload_start - (1 if v5 else 0):
            return "alias/empty/properties"
        if not allowed(info):
            return f"not allowed: {info.topic!r} qos {info.qos} retain {info.retain}"
    return None


def one(rng: random.Random, stats: dict[str, int]) -> None:
    v5 = rng.random() < 0.5
    data = chunk(rng, v5)
    # client
    cache = client_cache(rng)
    max_size = rng.choice([1 << 20, 1 << 20, 268435455, 2, 4, 5, 30, 100, 16386, len(data), max(len(data) - 1, 2)])
    answered = set(rng.sample(range(0, 8), rng.randint(0, 4)) + ([0xFFFF] if rng.random() < 0.2 else []))
    tokens = rng.choice([None, None, 1000, 3, 1, 0, 2])
    sub = "sub-" + str(rng.randint(0, 2))
    outs = []
    for walk in CLIENT_WALKS:
        limiter = Limiter(tokens) if tokens is not None else None
        left = set(answered)
        result = walk(view(rng, data), cache, max_size, v5, left, limiter, sub)
        outs.append((result, left, limiter.calls if limiter else None))
    if outs[0] != outs[1]:
        raise AssertionError(("client differs", data, v5, max_size, answered, tokens, outs))
    pos, n = outs[0][0]
    if n:
        stats["client took"] += 1
        stats["client packets"] += n

        def ok(info: Any) -> bool:
            e = cache.get((info.topic, info.qos, int(info.retain)))
            return info.qos <= 1 and e is not None and e[1].allowed
        wrong = full_path_takes(data[:pos], n, v5, max_size, ok)
        if wrong:
            raise AssertionError(("client took what the full path refuses", wrong, data[:pos], v5))
    stats["client stopped inside"] += 0 < pos < len(data)
    # broker
    exact = frozenset(rng.sample(CACHEABLE, rng.randint(0, 3)))
    recv = {t: rng.choice([True, True, False, 1]) for t in CACHEABLE if rng.random() < 0.5}
    res = [walk(view(rng, data), exact, recv, v5) for walk in BROKER_WALKS]
    if res[0] != res[1]:
        raise AssertionError(("broker differs", data, v5, exact, recv, res))
    pos, n = res[0]
    if n:
        stats["broker took"] += 1
        stats["broker packets"] += n
        wrong = full_path_takes(data[:pos], n, v5, codec.MAX_REMAINING_LENGTH + 5,
                                lambda info: recv.get(info.topic) is True or info.topic in exact)
        if wrong:
            raise AssertionError(("broker took what the full path refuses", wrong, data[:pos], v5))
    stats["examples"] += 1


def new_stats() -> dict[str, int]:
    return dict.fromkeys(["examples", "client took", "client packets", "client stopped inside", "broker took",
                          "broker packets"], 0)


def main() -> None:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    rng = random.Random(seed)
    stats = new_stats()
    failures: dict[str, int] = {}
    first: dict[str, Any] = {}
    for _ in range(iterations):
        try:
            one(rng, stats)
        except AssertionError as exc:
            kind = exc.args[0][0] + ": " + (exc.args[0][1] if "refuses" in exc.args[0][0] else "")
            kind = kind.split(" 0x")[0][:80]
            failures[kind] = failures.get(kind, 0) + 1
            first.setdefault(kind, exc.args[0])
    print(stats)
    for kind, count in failures.items():
        print(f"FAIL x{count}: {kind}\n   first: {first[kind]!r}"[:1500])
    sys.exit(1 if failures else 0)



class Guarded:
    """Chunks the compiled walk reads from memory that ends (or starts) at a page it may not
    touch: a read one byte past the chunk (or before it) is a SIGSEGV, not a silent wrong byte
    (a bytes object's trailing NUL and Python's allocator hide those from AddressSanitizer)."""

    def __init__(self) -> None:
        import ctypes
        import mmap
        self.ctypes = ctypes
        self.page = mmap.PAGESIZE
        self.pages = 8
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        size = self.page * (self.pages + 2)
        base = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert base not in (None, ctypes.c_void_p(-1).value)
        # [guard][pages of data][guard]
        assert libc.mprotect(base, self.page, 0) == 0
        assert libc.mprotect(base + self.page * (self.pages + 1), self.page, 0) == 0
        self.lo = base + self.page
        self.hi = base + self.page * (self.pages + 1)

    def view(self, data: bytes, at_end: bool) -> memoryview:
        assert len(data) <= self.page * self.pages
        addr = self.hi - len(data) if at_end else self.lo
        self.ctypes.memmove(addr, data, len(data))
        return memoryview((self.ctypes.c_ubyte * len(data)).from_address(addr))


def guarded_main(iterations: int, seed: int) -> None:
    """Only the compiled walk, on guarded memory, with the Python walk's answer on plain bytes."""
    g = Guarded()
    rng = random.Random(seed)
    n = 0
    for _ in range(iterations):
        v5 = rng.random() < 0.5
        data = chunk(rng, v5)[:g.page * g.pages]
        cache = client_cache(rng)
        max_size = rng.choice([1 << 20, 268435455, 2, 5, 100, 16386])
        for at_end in (True, False):
            want = fastpath.py_client_publishes(memoryview(data), cache, max_size, v5, set(), None, "s")
            got = _walk.client_publishes(g.view(data, at_end), cache, max_size, v5, set(), None, "s")
            assert got == want, (data, v5, got, want)
            recv = {t: True for t in CACHEABLE}
            want = fastpath.py_broker_deliveries(memoryview(data), frozenset(), recv, v5)
            got = _walk.broker_deliveries(g.view(data, at_end), frozenset(), recv, v5)
            assert got == want, (data, v5, got, want)
        n += 1
    print({"guarded examples": n})


if __name__ == "__main__" and len(sys.argv) > 3 and sys.argv[3] == "guarded":
    guarded_main(int(sys.argv[1]), int(sys.argv[2]))
    sys.exit(0)


if __name__ == "__main__":
    main()
