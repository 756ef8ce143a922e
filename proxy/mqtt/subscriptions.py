"""What one client is subscribed to, as far as authorization is concerned (sans-IO).

:class:`SubscriptionTable` is the single owner of that state. Its rules:

* **It changes when a packet is forwarded, never when the broker acknowledges
  it.** The broker handles a client's SUBSCRIBE and UNSUBSCRIBE packets in
  the order it reads them, so a SUBSCRIBE forwarded after an UNSUBSCRIBE of
  the same filter wins whatever order the acks come back in. (v1 removed
  filters on UNSUBACK: ``UNSUBSCRIBE #`` then ``SUBSCRIBE #`` in one write
  left ``#`` at the broker and nothing in the table.)
* **It proves, it does not excuse.** A delivery passes without a policy
  question only when its topic lies under a grant that is ALLOW right now
  (:meth:`exact` topics by a set lookup, wildcard ALLOW grants by matching).
  Every other delivery is asked of the policy, whatever the table says about
  it: a filter removed by an UNSUBSCRIBE may still deliver what the broker had
  buffered [MQTT-3.10.4-3], a resumed session holds filters the gateway never
  saw, a denied re-SUBSCRIBE leaves the broker's earlier grant in place.
* **Every ALLOW carries the instant it ends** (``until``, on the session's
  clock): the session re-decides the grants at :attr:`horizon`, so an
  expiring delegation ends on time without any write to the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from proxy.policy.decision import Verdict

__all__ = ["Grant", "SubscriptionQuota", "SubscriptionTable", "filter_matches"]

# (verdict, until, devices) for a filter at a QoS: the session's question to the policy.
Decide = Callable[[str, int], "tuple[Verdict, float | None, frozenset[str]]"]


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching; wildcards at the first level never match ``$`` topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f = topic_filter.split("/")
    t = topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


class Grant:
    """One filter the broker holds for the client, with the gateway's verdict on it."""

    __slots__ = ("match", "qos", "verdict", "until", "devices")

    def __init__(self, match: str, qos: int, verdict: Verdict, until: float | None,
                 devices: frozenset[str] = frozenset()):
        self.match = match        # the filter without $share/<group>/
        self.qos = qos            # as granted: a later question is asked at the same QoS
        self.verdict = verdict    # ALLOW or CHECK_EACH (a DENY is never held by the broker)
        self.until = until        # when an ALLOW stops holding (session clock); None: no end
        self.devices = devices    # whose facts the verdict rests on

    def __repr__(self) -> str:
        return f"Grant({self.match!r}, qos={self.qos}, {self.verdict.name}, until={self.until})"


class SubscriptionTable:
    def __init__(self) -> None:
        self._grants: dict[str, Grant] = {}   # the filter as sent (with $share/...) -> grant
        # Derived from _grants by _derive(), read on every delivery:
        self.exact: frozenset[bytes] = frozenset()  # topics of exact ALLOW grants
        self._wild: tuple[str, ...] = ()      # match filters of wildcard ALLOW grants
        self.horizon: float | None = None     # earliest `until` of an ALLOW grant

    def __len__(self) -> int:
        return len(self._grants)

    def __contains__(self, topic_filter: str) -> bool:
        return topic_filter in self._grants

    def __iter__(self) -> Iterator[tuple[str, Grant]]:
        return iter(list(self._grants.items()))

    # -- changes, in the order the packets are forwarded

    def subscribed(self, topic_filter: str, match: str, qos: int, verdict: Verdict, until: float | None,
                   devices: frozenset[str] = frozenset()) -> None:
        """A SUBSCRIBE of this filter is being forwarded: it replaces any earlier one [MQTT-3.8.4-3]."""
        if verdict is Verdict.DENY:
            raise ValueError("a denied filter is not subscribed")
        self._grants[topic_filter] = Grant(match, qos, verdict, until, devices)
        self._derive()

    def refused(self, topic_filter: str) -> None:
        """A SUBSCRIBE of this filter was refused and not forwarded: the broker keeps any earlier
        grant of it, which from now on proves nothing."""
        grant = self._grants.get(topic_filter)
        if grant is not None and grant.verdict is Verdict.ALLOW:
            grant.verdict, grant.until = Verdict.CHECK_EACH, None
            self._derive()

    def unsubscribed(self, topic_filters: list[str]) -> int:
        """An UNSUBSCRIBE is being forwarded. What the broker still delivers under these
        filters is asked of the policy like any delivery the table cannot prove. Returns how
        many grants it removed."""
        removed = 0
        for f in topic_filters:
            removed += self._grants.pop(f, None) is not None
        if removed:
            self._derive()
        return removed

    def redecide(self, decide: Decide, devices: set[str] | None = None) -> None:
        """Ask again (a policy or ownership change, a new token, a horizon passed): every grant,
        or with ``devices`` only those resting on one of these devices' facts (a change to
        other devices cannot change them)."""
        for grant in self._grants.values():
            if devices is not None and devices.isdisjoint(grant.devices):
                continue
            verdict, until, rests_on = decide(grant.match, grant.qos)
            grant.devices = rests_on
            if verdict is Verdict.ALLOW:
                grant.verdict, grant.until = Verdict.ALLOW, until
            else:  # the broker still holds the filter: check what it delivers
                grant.verdict, grant.until = Verdict.CHECK_EACH, None
        self._derive()

    # -- the delivery question

    def covers(self, topic: str) -> bool:
        """Does an ALLOW grant prove that the client may receive ``topic``?"""
        if topic.encode("utf-8", "surrogatepass") in self.exact:
            return True
        return any(filter_matches(f, topic) for f in self._wild)

    def _derive(self) -> None:
        exact, wild, ends = [], [], []
        for grant in self._grants.values():
            if grant.verdict is not Verdict.ALLOW:
                continue
            if "+" in grant.match or "#" in grant.match:
                wild.append(grant.match)
            else:
                exact.append(grant.match.encode("utf-8", "surrogatepass"))
            if grant.until is not None:
                ends.append(grant.until)
        self.exact = frozenset(exact)
        self._wild = tuple(wild)
        self.horizon = min(ends) if ends else None


class SubscriptionQuota:
    """Subscriptions held per identity ``sub`` across all of its connections, shared by the
    sessions of one gateway (like the rate limiter): a connection takes a slot for each filter
    it adds to its table and gives them back when it unsubscribes or closes. Only identities
    holding a slot have an entry, so it is bounded by the open connections' tables."""

    def __init__(self, per_identity: int):
        self.per_identity = per_identity
        self._held: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        """One more slot for ``key``, if it has one left."""
        held = self._held.get(key, 0)
        if held >= self.per_identity:
            return False
        self._held[key] = held + 1
        return True

    def take(self, key: str, n: int) -> bool:
        """``n`` units for ``key`` if all of them fit (a byte budget: QoS 2 publishes held)."""
        held = self._held.get(key, 0)
        if held + n > self.per_identity:
            return False
        if n > 0:
            self._held[key] = held + n
        return True

    def charge(self, key: str, n: int) -> None:
        """``n`` slots for ``key`` whatever it holds: filters a persistent session keeps at the
        broker after its connection closed (proxy.mqtt.persistent)."""
        if n > 0:
            self._held[key] = self._held.get(key, 0) + n

    def release(self, key: str, n: int = 1) -> None:
        left = self._held.get(key, 0) - n
        if left > 0:
            self._held[key] = left
        else:
            self._held.pop(key, None)

    def held(self, key: str) -> int:
        return self._held.get(key, 0)


class HeldSlots:
    """The slots one connection holds in its identity's shared :class:`SubscriptionQuota`: taken
    one per filter added to its table, given back on UNSUBSCRIBE and, all of them, at the close.
    Counted under the subject of the first slot (a re-authentication keeps the subject)."""

    __slots__ = ("held", "key", "quota")

    def __init__(self, quota: SubscriptionQuota | None):
        self.quota = quota          # None: no per-identity cap
        self.key: str | None = None
        self.held = 0

    def take(self, sub: str) -> bool:
        if self.quota is None:
            return True
        if self.key is None:
            self.key = sub
        if not self.quota.acquire(self.key):
            return False
        self.held += 1
        return True

    def give_back(self, n: int) -> None:
        n = min(n, self.held)
        if n and self.quota is not None and self.key is not None:
            self.quota.release(self.key, n)
            self.held -= n

    def give_back_all(self) -> None:
        self.give_back(self.held)
