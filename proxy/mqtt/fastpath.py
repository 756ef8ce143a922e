"""The session's fast paths: a chunk full of PUBLISH packets whose decisions are known,
walked in one loop.

The common case of a busy connection: no Frame, no PublishInfo, one rate-limiter call
per batch, one slice for the whole run. Each stops at the first packet that needs anything
more (another type, properties, a topic not cached or denied, a split packet, an empty
bucket) and leaves the rest of the chunk to the session's full path, which decides exactly
as if the fast path did not exist. The two loops share their header walk line for line on
purpose: a helper called per packet would cost a sixth of the loop.
``tests/unit/test_mqtt_fastpath.py`` holds both to the full path.

Both loops are also compiled (``_walk.c``, built by ``pip install``): a bulk publisher's chunk
holds dozens of packets, and this walk in bytecode was a third of keygate's CPU in the bulk
ingest benchmark. The Python loops below stay as the fallback where the extension was not built
(or ``KEYGATE_PURE_PYTHON=1``), and ``tests/unit/test_mqtt_walk.py`` holds the two to each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from proxy.mqtt import codec
from proxy.policy.decision import Decision
from proxy.ratelimit import RateLimiter

__all__ = ["COMPILED", "RATE_BATCH", "broker_deliveries", "client_publishes",
           "py_broker_deliveries", "py_client_publishes"]

# Rate-limit tokens the publish fast path takes per call (the rest is given back at the chunk's end).
RATE_BATCH = 256

# What a first header byte means to the fast paths, decided once from codec.VALID_BYTE1 (one
# index per packet instead of a mask, a table lookup and a shift): a valid PUBLISH first byte
# gives its QoS, anything else (another type, an invalid byte) NOT_FAST.
NOT_FAST = 3
_QOS = bytes((b >> 1) & 3 if b & 0xF0 == 0x30 and codec.VALID_BYTE1[b] else NOT_FAST for b in range(256))

#: The session's publish decisions: (topic bytes or str, QoS, retain) -> (topic, decision).
PublishEntry = tuple[str, Decision]  # the topic as text and what the policy said
PublishCache = dict[tuple[str | bytes, int, int], PublishEntry]


def py_client_publishes(mv: memoryview, cache: PublishCache, max_size: int, v5: bool, answered: set[int],
                     limiter: RateLimiter | None, sub: str) -> tuple[int, int]:
    """Allowed QoS 0/1 publishes from the start of ``mv``: (the offset where it stopped, how many).
    Packet ids the gateway had refused before and now forwards are taken out of ``answered``."""
    end = len(mv)
    if end < 4:
        return 0, 0
    qos_of = _QOS
    props = 1 if v5 else 0  # the property length byte (v5)
    budget = 0
    first = 0  # the first packet's size: tokens are asked for as if all were that size
    pos = n = 0
    while pos + 2 < end:
        b1 = mv[pos]
        qos = qos_of[b1]
        if qos > 1:
            break  # not a (valid) PUBLISH, or QoS 2: held until its PUBREL, the full path
        b = mv[pos + 1]
        if b < 0x80:
            body, total = pos + 2, 2 + b
        else:
            b2 = mv[pos + 2]
            if b2 >= 0x80 or not b2:
                break
            body, total = pos + 3, 3 + ((b & 0x7F) | (b2 << 7))
        nxt = pos + total
        if total > max_size or nxt > end or body + 2 > nxt:
            break
        tend = body + 2 + ((mv[body] << 8) | mv[body + 1])
        after = tend + qos + qos + props  # (a packet id: 2 bytes at QoS 1)
        if after > nxt:
            break
        if qos and not ((mv[tend] << 8) | mv[tend + 1]):
            break  # packet id 0: the full path says what is wrong
        if v5 and mv[after - 1]:
            break  # properties (a Topic Alias, maybe): the full path reads them
        entry = cache.get((mv[body + 2:tend].tobytes(), qos, b1 & 1))
        if entry is None or not entry[1].allowed:
            break
        if limiter is not None:
            if not budget:
                # As many as the rest of the chunk seems to hold (usually exact: nothing to give back).
                first = first or total
                want = 1 + (end - nxt) // first
                budget = limiter.take(sub, want if want < RATE_BATCH else RATE_BATCH)
                if not budget:
                    break
            budget -= 1
        if qos and answered:
            answered.discard((mv[tend] << 8) | mv[tend + 1])  # forwarded: the broker's to finish
        n += 1
        pos = nxt
    if budget and limiter is not None:
        limiter.give_back(sub, budget)
    return pos, n


def py_broker_deliveries(mv: memoryview, exact: frozenset[bytes],
                      cache: dict[bytes, bool], v5: bool) -> tuple[int, int]:
    """Deliveries from the start of ``mv`` whose topic an exact ALLOW grant proves (``exact``)
    or whose decision is cached as allowed: (the offset where it stopped, how many)."""
    end = len(mv)
    if end < 4:
        return 0, 0
    qos_of = _QOS
    props = 1 if v5 else 0
    pos = n = 0
    while pos + 2 < end:
        b1 = mv[pos]
        qos = qos_of[b1]
        if qos == NOT_FAST:
            break
        b = mv[pos + 1]
        if b < 0x80:
            body, total = pos + 2, 2 + b
        else:
            b2 = mv[pos + 2]
            if b2 >= 0x80 or not b2:
                break
            body, total = pos + 3, 3 + ((b & 0x7F) | (b2 << 7))
        nxt = pos + total
        if nxt > end or body + 2 > nxt:
            break
        tend = body + 2 + ((mv[body] << 8) | mv[body + 1])
        after = tend + (2 if qos else 0) + props
        if after > nxt or (v5 and mv[after - 1]):
            break  # properties (maybe a Topic Alias the broker must not send): the full path
        if qos and not ((mv[tend] << 8) | mv[tend + 1]):
            break  # packet id 0 from the broker too: the full path closes the connection
        topic = mv[body + 2:tend].tobytes()
        if cache.get(topic) is not True and topic not in exact:
            break
        n += 1
        pos = nxt
    return pos, n


ClientWalk = Callable[[memoryview, PublishCache, int, bool, set[int], RateLimiter | None, str], tuple[int, int]]
BrokerWalk = Callable[[memoryview, frozenset[bytes], dict[bytes, bool], bool], tuple[int, int]]
client_publishes: ClientWalk = py_client_publishes
broker_deliveries: BrokerWalk = py_broker_deliveries
#: Whether the compiled walk (``_walk.c``) is the one in use.
COMPILED = False
try:
    from proxy.mqtt import _walk
except ImportError:   # not built (no compiler at install): the Python walk
    pass
else:
    _walk.init(_QOS, RATE_BATCH)   # even when not used: the tests compare it with the Python walk
    if os.environ.get("KEYGATE_PURE_PYTHON") != "1":
        client_publishes = _walk.client_publishes
        broker_deliveries = _walk.broker_deliveries
        COMPILED = True
