"""Token buckets per identity ``sub``: MQTT publishes and subscriptions (shared by all of that
identity's connections), and the ownership API's writes.

Each PUBLISH costs one token, each filter of a SUBSCRIBE or UNSUBSCRIBE one. The
publish fast path takes a batch of tokens per chunk (:meth:`RateLimiter.take`) and
gives back what it did not use, instead of one call per message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.config import RateLimitConfig

__all__ = ["RateLimiter"]


class RateLimiter:
    """Token buckets keyed by identity ``sub``, shared by all of that identity's connections."""

    def __init__(self, messages_per_second: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.rate = float(messages_per_second)
        self.burst = float(max(burst, 1))
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}

    @classmethod
    def from_config(cls, cfg: RateLimitConfig, *, clock: Callable[[], float] = time.monotonic) -> RateLimiter:
        return cls(cfg.messages_per_second, cfg.burst, clock=clock)

    def allow(self, key: str, cost: float = 1.0) -> bool:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now)
            bucket = self._buckets[key] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < cost:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - cost
        return True

    def take(self, key: str, want: int) -> int:
        """Up to ``want`` whole tokens at once (how many were granted): the fast path asks
        for a batch per chunk instead of one call per message, and gives back the rest."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now)
            bucket = self._buckets[key] = [self.burst, now]
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        granted = int(tokens)
        if granted > want:
            granted = want
        bucket[0] = tokens - granted
        return granted

    def give_back(self, key: str, n: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None and n > 0:
            bucket[0] = min(self.burst, bucket[0] + n)

    def _prune(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket.
        full = [k for k, (tok, last) in self._buckets.items() if tok + (now - last) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()
