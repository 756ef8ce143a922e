"""The narrow view of ownership the policy engine and the gateways read.

The ownership service (``ownership/``) implements :class:`OwnershipFacts`
with an in-memory read path kept current on every write; tests and the policy
tools use :class:`StaticFacts`. Lookups are synchronous and cheap: they run
on every PUBLISH and every HTTP request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Protocol

Permission = Literal["read", "write", "readwrite"]


@dataclass(frozen=True, slots=True)
class Delegation:
    id: str
    device_id: str
    # A username, "group:NAME" or "anonymous".
    grantee: str
    permission: Permission
    expires_at: float | None = None  # unix time
    granted_by: str = ""             # the granter's sub

    def active(self, now: float | None = None) -> bool:
        return self.expires_at is None or (now if now is not None else time.time()) < self.expires_at

    def allows(self, want: Literal["read", "write"]) -> bool:
        return self.permission == "readwrite" or self.permission == want


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    id: str
    owner_sub: str
    owner_username: str
    public: bool = False
    service: str = ""  # the Fiware-Service (tenant) the device lives in
    type: str = ""
    delegations: tuple[Delegation, ...] = field(default=())


class OwnershipFacts(Protocol):
    """What the gateways and the policy engine may ask about devices."""

    #: Bumped on every write; caches keyed on it are invalidated by the bump.
    generation: int

    def device(self, device_id: str) -> DeviceFacts | None:
        """The device's facts, or None when no such device is registered."""

    def subscribe(self, callback: Callable[[set[str] | None], None]) -> Callable[[], None]:
        """Call ``callback(changed_device_ids or None-for-everything)`` after each write;
        returns a function that unsubscribes."""

    def readable_devices(self, username: str, sub: str, groups: Iterable[str] = ()) -> set[str]:
        """Ids of the devices this user owns or holds an active read delegation on
        (used to restrict NGSI listings without asking every device)."""


class StaticFacts:
    """Plain in-memory facts, for tests, the policy tools and benchmarks."""

    def __init__(self, devices: Iterable[DeviceFacts] = ()):
        self._devices = {d.id: d for d in devices}
        self._listeners: list[Callable[[set[str] | None], None]] = []
        self.generation = 0

    def device(self, device_id: str) -> DeviceFacts | None:
        return self._devices.get(device_id)

    def put(self, device: DeviceFacts) -> None:
        self._devices[device.id] = device
        self._changed({device.id})

    def remove(self, device_id: str) -> None:
        self._devices.pop(device_id, None)
        self._changed({device_id})

    def subscribe(self, callback: Callable[[set[str] | None], None]) -> Callable[[], None]:
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def readable_devices(self, username: str, sub: str, groups: Iterable[str] = ()) -> set[str]:
        names = {username} | {f"group:{g}" for g in groups}
        now = time.time()
        out = set()
        for d in self._devices.values():
            if d.owner_sub == sub or d.public or any(
                    g.grantee in names and g.active(now) and g.allows("read") for g in d.delegations):
                out.add(d.id)
        return out

    def _changed(self, ids: set[str] | None) -> None:
        self.generation += 1
        for cb in list(self._listeners):
            cb(ids)
