"""NGSI writes on their way to Orion, counted per entity id, so a device's deletion does not race them.

The gateway checks a write against the facts and forwards it; Orion may take it
after the deletion's clean-up has looked, and the entity is back, the id
blocked. So the gateway counts each forwarded write on the ids it touches
(:meth:`WritesInFlight.begin`, :meth:`end` once Orion has answered), a
deletion holds its ids closed from before it commits until its clean-up has run
(:meth:`closing`; writes on them are then refused), and the clean-up waits, bounded, until no write on the id is
in flight (:meth:`drained`) before it deletes the entity and checks again.
A write counts until Orion has answered it, even when its client has left. One
whose outcome the gateway cannot know (it timed out waiting for Orion, or lost
the connection) may still land later: its ids are marked unsettled
(:meth:`unsettled`) for a grace period, during which :meth:`drained` says no,
so the deletion's clean-up stays owed (the id unregistrable) and is re-checked
once the grace has passed.
One process's view: each gateway worker counts its own writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator


class WritesInFlight:
    def __init__(self, grace_seconds: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace_seconds
        self._clock = clock
        self._unsettled: dict[str, float] = {}   # id -> until when a write of unknown outcome may land
        self._count: Counter[str] = Counter()
        self._closed: Counter[str] = Counter()    # ids whose deletion has begun (nested deletions counted)
        self._idle: dict[str, asyncio.Event] = {}  # made by drained() only, for ids with writes in flight

    def begin(self, ids: Iterable[str]) -> bool:
        """Count a write on these ids; False (nothing counted) when one of them is being deleted."""
        ids = tuple(dict.fromkeys(ids))
        if any(self._closed[i] for i in ids):
            return False
        for i in ids:
            self._count[i] += 1
        return True

    def end(self, ids: Iterable[str]) -> None:
        for i in dict.fromkeys(ids):
            self._count[i] -= 1
            if self._count[i] <= 0:
                del self._count[i]
                waiter = self._idle.pop(i, None)
                if waiter is not None:
                    waiter.set()

    def unsettled(self, ids: Iterable[str]) -> None:
        """A write on these ids ended without Orion's answer: it may still land, for the grace period."""
        until = self._clock() + self.grace
        for i in ids:
            self._unsettled[i] = max(until, self._unsettled.get(i, 0.0))

    def settled(self, entity_id: str) -> bool:
        """No write of unknown outcome on this id may still land."""
        until = self._unsettled.get(entity_id)
        if until is None:
            return True
        if self._clock() < until:
            return False
        del self._unsettled[entity_id]
        return True

    def closed(self, entity_id: str) -> bool:
        return self._closed[entity_id] > 0

    @contextlib.contextmanager
    def closing(self, ids: Iterable[str]) -> Iterator[None]:
        """A deletion of these ids runs inside: writes on them are refused until it has ended."""
        ids = tuple(ids)
        for i in ids:
            self._closed[i] += 1
        try:
            yield
        finally:
            for i in ids:
                self._closed[i] -= 1
                if self._closed[i] <= 0:
                    del self._closed[i]

    async def drained(self, entity_id: str, bound: float) -> bool:
        """Wait until no write on this id is in flight (at most ``bound`` seconds); whether it is so and
        no write of unknown outcome on it may still land."""
        if entity_id in self._count:
            idle = self._idle.setdefault(entity_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), bound)
        return entity_id not in self._count and self.settled(entity_id)
