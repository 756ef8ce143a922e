"""The per-connection decision caches: what the policy answered for a publish and for a delivery.

One :class:`DecisionCaches` per session owns both maps, their byte budgets and the instant they
end. Lookups read the maps directly (the fast paths of :mod:`proxy.mqtt.fastpath` walk them);
every write goes through a method here, so the bounds are kept in one place:

* at most :data:`CACHE_MAX` entries and :data:`CACHE_MAX_BYTES` of topic bytes per map (keys;
  each value holds the topic once more), the map dropped whole when either is reached;
* both maps dropped at ``until`` (session clock): at most :data:`DECISION_TTL` after they were
  last dropped, and earlier when a cached decision rests on something that ends sooner (a
  delegation's expiry: ``Decision.until``);
* both dropped on every invalidation and re-authentication (:meth:`clear`), the receive map
  alone when the subscription table changes (:meth:`clear_receive`: a delivery may rest on a
  grant that just went).
"""

from __future__ import annotations

from proxy.mqtt.fastpath import PublishCache, PublishEntry

__all__ = ["CACHE_MAX", "CACHE_MAX_BYTES", "DECISION_TTL", "DecisionCaches"]

CACHE_MAX = 4096
CACHE_MAX_BYTES = 64 * 1024
DECISION_TTL = 1.0


class DecisionCaches:
    __slots__ = ("_publish_bytes", "_receive_bytes", "publish", "receive", "until")

    def __init__(self) -> None:
        # Both maps are emptied in place, never rebound: the session's open-connection lane holds them.
        self.publish: PublishCache = {}          # (topic, qos, retain) -> (topic, decision)
        self.receive: dict[bytes, bool] = {}     # topic -> delivered
        self._publish_bytes = 0                  # topic bytes in each map since it was last empty
        self._receive_bytes = 0
        self.until = 0.0                         # session clock at which both maps are dropped

    def put_publish(self, key: tuple[str | bytes, int, int], entry: PublishEntry) -> None:
        cache = self.publish
        if not cache:
            self._publish_bytes = 0  # emptied elsewhere since the last entry
        size = len(key[0])
        if len(cache) >= CACHE_MAX or self._publish_bytes + size > CACHE_MAX_BYTES:
            cache.clear()
            self._publish_bytes = 0
        cache[key] = entry
        self._publish_bytes += size

    def put_receive(self, topic: bytes, delivered: bool) -> None:
        cache = self.receive
        if not cache:
            self._receive_bytes = 0
        size = len(topic)
        if len(cache) >= CACHE_MAX or self._receive_bytes + size > CACHE_MAX_BYTES:
            cache.clear()
            self._receive_bytes = 0
        cache[topic] = delivered  # a topic is at most 65,535 bytes: always fits the budget
        self._receive_bytes += size

    def ends_at(self, at: float | None) -> None:
        """A cached decision rests on something that ends at ``at`` (session clock)."""
        if at is not None and at < self.until:
            self.until = at

    def drop(self, now: float) -> None:
        """Both maps dropped at their end; the next end is a TTL from ``now``."""
        self.publish.clear()
        self.receive.clear()
        self.until = now + DECISION_TTL

    def clear(self) -> None:
        self.publish.clear()
        self.receive.clear()

    def clear_receive(self) -> None:
        self.receive.clear()
