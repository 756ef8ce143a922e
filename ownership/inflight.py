"""NGSI writes on their way to Orion, counted per entity id, so a device's deletion does not race them.

The gateway checks a write against the facts and forwards it; Orion may take it
after the deletion's clean-up has looked, and the entity is back, the id
blocked. So the gateway counts each forwarded write on the ids it touches
(:meth:`WritesInFlight.begin`, :meth:`end` once Orion has answered), a
deletion marks its ids closed before it commits (:meth:`close`; writes on them
are then refused), and the clean-up waits, bounded, until no write on the id is
in flight (:meth:`drained`) before it deletes the entity and checks again.
One process's view: each gateway worker counts its own writes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterable


class WritesInFlight:
    def __init__(self) -> None:
        self._count: Counter[str] = Counter()
        self._closed: Counter[str] = Counter()    # ids whose deletion has begun (nested deletions counted)
        self._idle: dict[str, asyncio.Event] = {}

    def begin(self, ids: Iterable[str]) -> bool:
        """Count a write on these ids; False (nothing counted) when one of them is being deleted."""
        ids = tuple(dict.fromkeys(ids))
        if any(self._closed[i] for i in ids):
            return False
        for i in ids:
            self._count[i] += 1
            self._idle.setdefault(i, asyncio.Event()).clear()
        return True

    def end(self, ids: Iterable[str]) -> None:
        for i in dict.fromkeys(ids):
            self._count[i] -= 1
            if self._count[i] <= 0:
                del self._count[i]
                self._idle.pop(i, asyncio.Event()).set()

    def in_flight(self, entity_id: str) -> int:
        return self._count[entity_id]

    def closed(self, entity_id: str) -> bool:
        return self._closed[entity_id] > 0

    def close(self, ids: Iterable[str]) -> None:
        """A deletion of these ids has begun: writes on them are refused until :meth:`reopen`."""
        for i in ids:
            self._closed[i] += 1

    def reopen(self, ids: Iterable[str]) -> None:
        for i in ids:
            self._closed[i] -= 1
            if self._closed[i] <= 0:
                del self._closed[i]

    async def drained(self, entity_id: str, bound: float) -> bool:
        """Wait until no write on this id is in flight (at most ``bound`` seconds); whether it is so."""
        idle = self._idle.get(entity_id)
        if idle is None:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(idle.wait(), bound)
        return entity_id not in self._count
