"""Which devices are connected to this process's MQTT listeners now, and when each was last seen.

Fed by the gateway as sessions are established and end; read by the portal
("connected now", "last seen"). In memory and per process: after a restart a
device is "last seen" again from its next connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class DevicePresence:
    def __init__(self, clock: Callable[[], float] = time.time, max_devices: int = 100_000):
        self._clock = clock
        self._max = max_devices
        self._open: dict[str, set[int]] = {}    # device id -> its established sessions (by id())
        self._seen: dict[str, float] = {}

    def up(self, device_id: str, session_key: int) -> None:
        self._open.setdefault(device_id, set()).add(session_key)
        self._saw(device_id)

    def down(self, device_id: str, session_key: int) -> None:
        sessions = self._open.get(device_id)
        if sessions is None or session_key not in sessions:
            return
        sessions.discard(session_key)
        if not sessions:
            del self._open[device_id]
        self._saw(device_id)

    def _saw(self, device_id: str) -> None:
        self._seen.pop(device_id, None)   # re-inserted last: the oldest entries go first past the bound
        self._seen[device_id] = self._clock()
        while len(self._seen) > self._max:
            del self._seen[next(iter(self._seen))]

    def connected(self, device_id: str) -> bool:
        return device_id in self._open

    def last_seen(self, device_id: str) -> float | None:
        return self._seen.get(device_id)
