"""The compiled policy set: tries that answer a decision without scanning rules.

Rules are indexed three ways before any request arrives:

1. by **question** -- publish, subscribe (which also governs deliveries) and
   http each get their own indexes, so an action never filters rules;
2. by **effect** -- deny and allow indexes are separate, denies are asked first;
3. by **partition key** -- the identity subject a rule is written for
   (``role:iot-admin``, ``user:alice``, ``anyone``...; all relation subjects
   share one key). A caller walks only the indexes for keys it has, so
   rules written for other users cost nothing.

Each index is a trie over topic levels (or path segments) with literal edges
in a dict plus one edge each for ``+``, ``{device}`` and every placeholder,
and ``#`` entries hanging on the node where they start. A decision walks
O(depth) nodes plus the wildcard edges present; it does not grow with the
number of rules written for other keys or other literal topics.

Subscribing to a filter with wildcards is decided by *containment*:

* ALLOW when an allow rule's pattern contains the whole filter for this
  caller -- a filter wildcard level is contained only by ``+`` or ``#`` (not
  by ``{device}``: that would need a relation per device, and ``{device}``
  never matches an empty level) -- and no deny rule could match any topic
  under the filter;
* DENY when a deny rule contains the whole filter, or no allow rule could
  ever match any topic under the filter;
* CHECK_EACH otherwise: the broker gets the subscription and every delivery
  is asked with :meth:`CompiledPolicies.may_receive`.

"Could match" is conservative: a relation rule whose ``{device}`` lines up
with a filter wildcard counts as possibly holding. CHECK_EACH is always safe;
ALLOW and DENY are only given when they are certain. The overlap walk for one
subscription visits at most ``WALK_BUDGET`` index nodes and answers
CHECK_EACH past that, so no filter costs more than a bounded walk.

Answers are cached per (identity, question): a policy swap builds a new
:class:`CompiledPolicies` (so a new cache), an ownership generation bump
clears it, and an answer that consulted a delegation with an expiry lives
only until that expiry. The cache is bounded in entries and in bytes (the
strings it keeps: topics, filters, paths and client ids may be 65 KB each).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeAlias, TypeVar

from proxy.facts import OwnershipFacts
from proxy.identity.model import Identity
from proxy.policy.decision import NO_RULE, Decision, SubscribeDecision, Verdict
from proxy.policy.language import PolicySource, Rule
from proxy.policy.paths import PathError, normalize_path, split_path
from proxy.policy.patterns import DEVICE, HASH, PLUS, Pattern, Special, filter_problem, identity_values, topic_problem
from proxy.policy.subjects import REL, Want, could_hold, identity_keys, partition_key, relations_hold

__all__ = ["CompiledPolicies", "READ_METHODS"]

CACHE_SIZE = 50_000
CACHE_MAX_BYTES = 32 * 1024 * 1024  # policies.cache_max_bytes
# What one cached answer costs besides its strings: the key tuple, the dict slot, the
# (decision, until) pair and the decision itself (tracemalloc measures about 330; rounded up).
_ENTRY_BYTES = 400
# Index nodes an overlap walk may visit for one wildcard subscription before it settles
# for CHECK_EACH: a filter like sensors/+/x over 10,000 literal sensors/sK rules would
# otherwise cost a walk over all of them (CHECK_EACH is always a sound answer).
WALK_BUDGET = 512
CACHE_SECONDS = 60.0
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_METHOD = re.compile(r"^[A-Za-z]{1,20}$")


class _Unbound(enum.Enum):
    """{device} lined up with a filter wildcard: some device, unknown which."""

    ANY = "any"


_ANY: Final = _Unbound.ANY
BoundDevice: TypeAlias = str | _Unbound | None  # the device a {device} level matched, if any
Values: TypeAlias = dict[Special, str]  # the placeholders' values for the asking identity
CacheKey: TypeAlias = tuple[object, ...]
_D = TypeVar("_D", bound=Decision | SubscribeDecision)


class _Entry:
    """One rule as stored in an index (flat attributes: read on every decision)."""

    __slots__ = ("rule", "id", "order", "relations", "retain", "qos", "methods")

    def __init__(self, rule: Rule):
        self.rule = rule
        self.id = rule.id
        self.order = rule.order
        self.relations = rule.relations
        self.retain = rule.mqtt.retain if rule.mqtt else None
        self.qos = rule.mqtt.qos if rule.mqtt else None
        self.methods = rule.http.methods if rule.http else None


class _Node:
    __slots__ = ("lit", "plus", "dev", "ph", "hash", "end")

    def __init__(self) -> None:
        self.lit: dict[str, _Node] = {}
        self.plus: _Node | None = None
        self.dev: _Node | None = None
        self.ph: dict[Special, _Node] = {}
        self.hash: list[_Entry] = []
        self.end: list[_Entry] = []

    def insert(self, pattern: Pattern, entry: _Entry) -> None:
        node = self
        for lv in pattern:
            if lv is HASH:
                node.hash.append(entry)
                return
            if isinstance(lv, str):
                node = node.lit.setdefault(lv, _Node())
            elif lv is PLUS:
                node.plus = node.plus or _Node()
                node = node.plus
            elif lv is DEVICE:
                node.dev = node.dev or _Node()
                node = node.dev
            else:
                node = node.ph.setdefault(lv, _Node())
        node.end.append(entry)


Match: TypeAlias = tuple[_Entry, BoundDevice]
Found: TypeAlias = tuple[_Entry, str | None]  # a match against concrete levels: the device, if bound


def _walk(node: _Node, levels: list[str], i: int, device: str | None, vals: Values, dollar: bool,
          out: list[Found]) -> None:
    """Every entry whose pattern matches the concrete ``levels``."""
    if node.hash and not (i == 0 and dollar):
        for e in node.hash:
            out.append((e, device))
    if i == len(levels):
        for e in node.end:
            out.append((e, device))
        return
    lv = levels[i]
    child = node.lit.get(lv)
    if child is not None:
        _walk(child, levels, i + 1, device, vals, dollar, out)
    if i == 0 and dollar:
        return  # wildcards and placeholders never match a $ topic's first level
    if node.plus is not None:
        _walk(node.plus, levels, i + 1, device, vals, dollar, out)
    if node.dev is not None and lv:
        _walk(node.dev, levels, i + 1, lv, vals, dollar, out)
    for ph, child in node.ph.items():
        if vals.get(ph) == lv:
            _walk(child, levels, i + 1, device, vals, dollar, out)


def _cover(node: _Node, f: list[str], i: int, device: str | None, vals: Values, fdollar: bool,
           out: list[Found]) -> None:
    """Every entry whose pattern contains the whole filter ``f`` (wildcards included)."""
    if node.hash and not (i == 0 and fdollar):
        for e in node.hash:
            out.append((e, device))
    if i == len(f):
        for e in node.end:
            out.append((e, device))
        return
    lv = f[i]
    if lv == "#":
        return  # only a pattern '#' here contains it, handled above
    if lv == "+":
        if node.plus is not None:
            _cover(node.plus, f, i + 1, device, vals, fdollar, out)
        return
    child = node.lit.get(lv)
    if child is not None:
        _cover(child, f, i + 1, device, vals, fdollar, out)
    if i == 0 and fdollar:
        return
    if node.plus is not None:
        _cover(node.plus, f, i + 1, device, vals, fdollar, out)
    if node.dev is not None and lv:
        _cover(node.dev, f, i + 1, lv, vals, fdollar, out)
    for ph, child in node.ph.items():
        if vals.get(ph) == lv:
            _cover(child, f, i + 1, device, vals, fdollar, out)


class _TooWide(Exception):
    """The overlap walk visited WALK_BUDGET nodes: answer CHECK_EACH (always sound) instead."""


def _spend(budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooWide


def _subtree(node: _Node, i: int, device: BoundDevice, vals: Values, budget: list[int]) -> Iterator[Match]:
    """Every entry at or below ``node`` (the filter has '#' at level ``i``)."""
    _spend(budget)
    for e in node.hash:
        yield e, device
    yield from _below(node, i, device, vals, budget)


def _below(node: _Node, i: int, device: BoundDevice, vals: Values, budget: list[int]) -> Iterator[Match]:
    """The entries ending at ``node`` and every entry in its children's subtrees."""
    for e in node.end:
        yield e, device
    for lit, child in node.lit.items():
        if not (i == 0 and lit.startswith("$")):
            yield from _subtree(child, i + 1, device, vals, budget)
    if node.plus is not None:
        yield from _subtree(node.plus, i + 1, device, vals, budget)
    if node.dev is not None:
        yield from _subtree(node.dev, i + 1, _ANY, vals, budget)
    for ph, child in node.ph.items():
        if ph in vals and not (i == 0 and vals[ph].startswith("$")):
            yield from _subtree(child, i + 1, device, vals, budget)


def _intersect(node: _Node, f: list[str], i: int, device: BoundDevice, vals: Values, fdollar: bool,
               budget: list[int]) -> Iterator[Match]:
    """Every entry whose pattern matches at least one topic the filter ``f`` matches."""
    _spend(budget)
    if node.hash and not (i == 0 and fdollar):
        for e in node.hash:
            yield e, device
    if i == len(f):
        yield from ((e, device) for e in node.end)
        return
    lv = f[i]
    if lv == "#":
        # The filter matches the parent level too, and anything below; node.hash was yielded above.
        yield from _below(node, i, device, vals, budget)
        return
    if lv == "+":
        for lit, child in node.lit.items():
            if not (i == 0 and lit.startswith("$")):
                yield from _intersect(child, f, i + 1, device, vals, fdollar, budget)
        if node.plus is not None:
            yield from _intersect(node.plus, f, i + 1, device, vals, fdollar, budget)
        if node.dev is not None:
            yield from _intersect(node.dev, f, i + 1, _ANY, vals, fdollar, budget)
        for ph, child in node.ph.items():
            if ph in vals and not (i == 0 and vals[ph].startswith("$")):
                yield from _intersect(child, f, i + 1, device, vals, fdollar, budget)
        return
    exact = node.lit.get(lv)
    if exact is not None:
        yield from _intersect(exact, f, i + 1, device, vals, fdollar, budget)
    if i == 0 and fdollar:
        return
    if node.plus is not None:
        yield from _intersect(node.plus, f, i + 1, device, vals, fdollar, budget)
    if node.dev is not None and lv:
        yield from _intersect(node.dev, f, i + 1, lv, vals, fdollar, budget)
    for ph, child in node.ph.items():
        if vals.get(ph) == lv:
            yield from _intersect(child, f, i + 1, device, vals, fdollar, budget)


def _entry_bytes(key: CacheKey, decision: Decision | SubscribeDecision) -> int:
    """What caching ``decision`` under ``key`` holds: the strings of the request (the identity
    is shared with the connection that asked) and of the answer, plus the fixed overhead."""
    size = _ENTRY_BYTES
    for part in key:
        if type(part) is str:
            size += sys.getsizeof(part)
    if decision.device is not None:
        size += sys.getsizeof(decision.device)
    return size + sys.getsizeof(decision.reason)


class _Horizon:
    """The instant a decision is made at, and the instants at which what it rests on ends."""

    __slots__ = ("now", "ends", "devices")

    def __init__(self, now: float):
        self.now = now
        self.ends: list[float] = []
        self.devices: set[str] = set()  # whose facts were consulted


def _with_horizon(decision: _D, horizon: _Horizon) -> _D:
    """The decision with ``until`` (the earliest end of what it rested on; None: no end) and
    ``devices`` (whose facts it rested on: a change to another device cannot change it)."""
    if not horizon.ends and not horizon.devices:
        return decision
    return dataclasses.replace(decision, until=min(horizon.ends) if horizon.ends else None,
                               devices=frozenset(horizon.devices))


class CompiledPolicies:
    """One immutable, compiled policy set. :class:`~proxy.policy.holder.Policies` swaps these.

    ``clock`` is the wall clock (unix seconds) delegation expiries are compared with."""

    def __init__(self, source: PolicySource, facts: OwnershipFacts, *, admin_role: str = "iot-admin",
                 cache_size: int = CACHE_SIZE, cache_max_bytes: int = CACHE_MAX_BYTES,
                 clock: Callable[[], float] = time.time):
        self.clock = clock
        self.source = source
        self.facts = facts
        self.admin_role = admin_role
        self.rules = {r.id: r for r in source.rules}
        # (answer, until): a Decision, or a SubscribeDecision for a key whose first item is "s".
        self._cache: dict[CacheKey, tuple[Any, float]] = {}
        self._identity_keys: dict[Identity, list[str]] = {}
        self._cache_size = cache_size  # 0: no cache (benchmarks of the index itself)
        self.cache_max_bytes = cache_max_bytes
        self._cache_bytes = 0  # what the cached keys and answers hold, by _entry_bytes
        self._cache_generation = facts.generation
        # (question, allow?) -> partition key -> trie
        self._tries: dict[tuple[str, bool], dict[str, _Node]] = {
            (q, a): {} for q in ("publish", "subscribe", "http") for a in (True, False)}
        for rule in source.rules:
            entry = _Entry(rule)
            keys = {partition_key(s, admin_role) for s in rule.subjects}
            spaces: list[tuple[str, Pattern]] = []
            if rule.mqtt:
                for action in rule.mqtt.actions:
                    spaces.extend((action, p) for p in rule.mqtt.topics)
            if rule.http:
                spaces.extend(("http", p) for p in rule.http.paths)
            for question, pattern in spaces:
                tries = self._tries[(question, rule.allow)]
                for key in keys:
                    tries.setdefault(key, _Node()).insert(pattern, entry)

    # ------------------------------------------------------------------ cached public questions

    # ``now``: the wall-clock instant the answer is for (the caller's clock); None: ``self.clock()``.

    def may_publish(self, identity: Identity, topic: str, *, qos: int = 0, retain: bool = False,
                    client_id: str = "", now: float | None = None) -> Decision:
        return self._cached(("p", identity, topic, qos, retain, client_id), self._publish,
                            identity, topic, qos, retain, client_id, now=now)

    def may_receive(self, identity: Identity, topic: str, *, client_id: str = "",
                    now: float | None = None) -> Decision:
        return self._cached(("r", identity, topic, client_id), self._receive, identity, topic, client_id, now=now)

    def may_subscribe(self, identity: Identity, topic_filter: str, *, qos: int = 0,
                      client_id: str = "", now: float | None = None) -> SubscribeDecision:
        return self._cached(("s", identity, topic_filter, qos, client_id), self._subscribe,
                            identity, topic_filter, qos, client_id, now=now)

    def may_http(self, identity: Identity, method: str, path: str) -> Decision:
        return self._cached(("h", identity, method, path), self._http, identity, method, path)

    def _keys_of(self, identity: Identity) -> list[str]:
        """identity_keys, remembered per identity (a connection asks many questions as one identity)."""
        keys = self._identity_keys.get(identity)
        if keys is None:
            if len(self._identity_keys) >= 10_000:
                self._identity_keys.clear()
            keys = self._identity_keys[identity] = identity_keys(identity)
        return keys

    def _cached(self, key: CacheKey, compute: Callable[..., _D], *args: object, now: float | None = None) -> _D:
        """Decisions are pure functions of (policy set, facts generation, identity, request, time).

        A swap builds a new :class:`CompiledPolicies` (a new, empty cache); a
        facts generation bump clears it; an answer that consulted a delegation
        with an expiry is kept only until that expiry, and says so in its
        ``until`` (so a caller that keeps it, like an MQTT session, knows when to
        ask again); everything else for at most ``CACHE_SECONDS``. When it is
        full, in entries or in bytes (``cache_max_bytes``), the cache is simply
        dropped: a flood of long distinct filters costs recomputation, not memory.
        """
        if now is None:
            now = self.clock()
        if not self._cache_size:
            h = _Horizon(now)
            return _with_horizon(compute(h, *args), h)
        gen = self.facts.generation
        if gen != self._cache_generation:
            self._drop_cache()
            self._cache_generation = gen
        hit = self._cache.get(key)
        if hit is not None:
            if hit[1] > now:
                answer: _D = hit[0]  # the key's first item names the question, so the kind of answer
                return answer
            del self._cache[key]
            self._cache_bytes -= _entry_bytes(key, hit[0])
        horizon = _Horizon(now)
        decision = _with_horizon(compute(horizon, *args), horizon)
        cost = _entry_bytes(key, decision)
        if cost > self.cache_max_bytes:
            return decision  # larger than the whole budget: answered, not kept
        if len(self._cache) >= self._cache_size or self._cache_bytes + cost > self.cache_max_bytes:
            self._drop_cache()
        self._cache[key] = (decision, min([*horizon.ends, now + CACHE_SECONDS]))
        self._cache_bytes += cost
        return decision

    def _drop_cache(self) -> None:
        self._cache.clear()
        self._cache_bytes = 0

    @property
    def cache_bytes(self) -> int:
        """What the decision cache holds now, as accounted against ``cache_max_bytes``."""
        return self._cache_bytes

    def device_topic_filters(self, device_id: str) -> list[str]:
        """MQTT filters for every topic a rule binds to this device through ``{device}``:
        what belongs to the device at the broker (its retained messages are cleared when
        it is deleted). Other placeholders become ``+``."""
        if not device_id or any(c in device_id for c in "+#/\0"):
            return []  # such an id can be no topic level: nothing was ever published under it
        out: set[str] = set()
        for rule in self.source.rules:
            for pattern in (rule.mqtt.topics if rule.mqtt else ()):
                if DEVICE not in pattern:
                    continue
                levels = [lv if isinstance(lv, str) else device_id if lv is DEVICE else
                          "#" if lv is HASH else "+" for lv in pattern]
                out.add("/".join(levels))
        return sorted(out)

    # ------------------------------------------------------------------ concrete questions

    def _decide(self, question: str, identity: Identity, levels: list[str], vals: Values, want: Want,
                dollar: bool, fits: Callable[[_Entry], bool] | None, horizon: _Horizon) -> Decision:
        keys = self._keys_of(identity)
        for allow in (False, True):
            tries = self._tries[(question, allow)]
            best: _Entry | None = None
            best_dev = None
            for key in keys:
                root = tries.get(key)
                if root is None:
                    continue
                found: list[Found] = []
                _walk(root, levels, 0, None, vals, dollar, found)
                for entry, dev in found:
                    if best is not None and entry.order >= best.order:
                        continue
                    if fits is not None and not fits(entry):
                        continue
                    if key == REL and not relations_hold(entry.relations, identity, dev, self.facts, want,
                                                         horizon.ends, now=horizon.now,
                                                         consulted=horizon.devices):
                        continue
                    best, best_dev = entry, dev
            if best is not None:
                if allow:
                    return Decision(True, best.id, f"allowed by {best.id}", best_dev)
                return Decision(False, best.id, f"denied by {best.id}", best_dev)
        return Decision(False, None, NO_RULE)

    def _publish(self, horizon: _Horizon, identity: Identity, topic: str, qos: int, retain: bool,
                 client_id: str) -> Decision:
        problem = topic_problem(topic)
        if problem:
            return Decision(False, None, problem)

        def fits(e: _Entry) -> bool:
            return (e.retain is None or e.retain == retain) and (e.qos is None or qos in e.qos)

        vals = identity_values(identity.sub, identity.username, client_id)
        return self._decide("publish", identity, topic.split("/"), vals, "write", topic.startswith("$"), fits,
                            horizon)

    def _receive(self, horizon: _Horizon, identity: Identity, topic: str, client_id: str) -> Decision:
        problem = topic_problem(topic)
        if problem:
            return Decision(False, None, problem)
        vals = identity_values(identity.sub, identity.username, client_id)
        return self._decide("subscribe", identity, topic.split("/"), vals, "read", topic.startswith("$"), None,
                            horizon)

    def _http(self, horizon: _Horizon, identity: Identity, method: str, path: str) -> Decision:
        if not _METHOD.match(method):
            return Decision(False, None, "not an HTTP method")
        try:
            norm = normalize_path(path)
        except PathError as exc:
            return Decision(False, None, f"path refused: {exc}")
        method = method.upper()

        def fits(e: _Entry) -> bool:
            return e.methods is None or method in e.methods

        vals = identity_values(identity.sub, identity.username, "")
        want: Want = "read" if method in READ_METHODS else "write"
        return self._decide("http", identity, split_path(norm), vals, want, False, fits, horizon)

    # ------------------------------------------------------------------ subscribe

    def _subscribe(self, horizon: _Horizon, identity: Identity, topic_filter: str, qos: int,
                   client_id: str) -> SubscribeDecision:
        if topic_filter.startswith("$share/") or topic_filter == "$share":
            return SubscribeDecision(Verdict.DENY, None, "a $share/ prefix must be stripped before the policy check")
        problem = filter_problem(topic_filter)
        if problem:
            return SubscribeDecision(Verdict.DENY, None, problem)
        if "+" not in topic_filter and "#" not in topic_filter:
            d = self._receive(horizon, identity, topic_filter, client_id)
            return SubscribeDecision(Verdict.ALLOW if d.allowed else Verdict.DENY, d.rule, d.reason, d.device)
        f = topic_filter.split("/")
        fdollar = f[0].startswith("$")
        vals = identity_values(identity.sub, identity.username, client_id)
        keys = self._keys_of(identity)
        deny_tries = self._tries[("subscribe", False)]
        allow_tries = self._tries[("subscribe", True)]

        def holds(key: str, entry: _Entry, dev: BoundDevice) -> bool:
            if key != REL:
                return True
            if dev is _ANY:
                return False  # "for every device" is never certain
            return relations_hold(entry.relations, identity, dev, self.facts, "read",
                                  horizon.ends, now=horizon.now, consulted=horizon.devices)

        def maybe(key: str, entry: _Entry, dev: BoundDevice) -> bool:
            if key != REL:
                return True
            if dev is _ANY:  # some device might be related
                return any(could_hold(r, identity) for r in entry.relations)
            return relations_hold(entry.relations, identity, dev, self.facts, "read",
                                  horizon.ends, now=horizon.now, consulted=horizon.devices)

        def covering(tries: dict[str, _Node]) -> Match | None:
            best: Match | None = None
            for key in keys:
                root = tries.get(key)
                if root is None:
                    continue
                found: list[Found] = []
                _cover(root, f, 0, None, vals, fdollar, found)
                for entry, dev in found:
                    if (best is None or entry.order < best[0].order) and holds(key, entry, dev):
                        best = (entry, dev)
            return best

        def overlapping(tries: dict[str, _Node]) -> _Entry | None:
            for key in keys:
                root = tries.get(key)
                if root is None:
                    continue
                for entry, dev in _intersect(root, f, 0, None, vals, fdollar, budget):
                    if maybe(key, entry, dev):
                        return entry
            return None

        budget = [WALK_BUDGET]
        deny = covering(deny_tries)
        if deny is not None:
            dev = deny[1] if isinstance(deny[1], str) else None
            return SubscribeDecision(Verdict.DENY, deny[0].id, f"denied by {deny[0].id}", dev)
        allow = covering(allow_tries)
        if allow is not None:
            try:
                overlap = overlapping(deny_tries)
            except _TooWide:
                return SubscribeDecision(Verdict.CHECK_EACH, allow[0].id, f"allowed by {allow[0].id}; too many "
                                         "deny rules under the filter to rule them out, each delivery is checked")
            dev = allow[1] if isinstance(allow[1], str) else None
            if overlap is None:
                return SubscribeDecision(Verdict.ALLOW, allow[0].id, f"allowed by {allow[0].id}", dev)
            return SubscribeDecision(Verdict.CHECK_EACH, allow[0].id,
                                     f"allowed by {allow[0].id}; deny rule {overlap.id} overlaps the filter", dev)
        try:
            some = overlapping(allow_tries)
        except _TooWide:
            return SubscribeDecision(Verdict.CHECK_EACH, None, "too many rules under the filter to decide it "
                                     "outright; each delivery is checked")
        if some is None:
            return SubscribeDecision(Verdict.DENY, None, NO_RULE)
        return SubscribeDecision(Verdict.CHECK_EACH, some.id,
                                 f"{some.id} may allow some topics under the filter; each delivery is checked")
