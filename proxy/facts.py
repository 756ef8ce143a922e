"""The narrow view of ownership the policy engine and the gateways read.

The ownership service (``ownership/``) implements :class:`OwnershipFacts`
with an in-memory read path kept current on every write; tests and the policy
tools use :class:`StaticFacts`. Lookups are synchronous and cheap: they run
on every PUBLISH and every HTTP request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

Permission = Literal["read", "write", "readwrite"]
PrincipalKind = Literal["user", "service", "group", "public"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Whom a delegation is to: one typed name space per kind, so no name can stand for another.

    * ``user``: ``id`` is the user's ``sub`` (user names change and are reused); ``name`` is the
      user name, for display only. An empty ``id`` is a user name a migrated store could not tie
      to a ``sub``: it matches nobody.
    * ``service``: ``id`` is the service account's client id.
    * ``group``: ``id`` is the group's name.
    * ``public``: unauthenticated callers (``id`` empty).
    """

    kind: PrincipalKind
    id: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("user", "service", "group", "public"):
            raise ValueError(f"not a principal kind: {self.kind!r}")

    @property
    def key(self) -> str:
        """The index key of this principal ("" when it matches nobody); never shown to anyone."""
        if self.kind == "public":
            return "public"
        return f"{self.kind}:{self.id}" if self.id else ""

    @classmethod
    def user(cls, sub: str, name: str = "") -> Principal:
        return cls("user", sub, name)

    @classmethod
    def service(cls, client_id: str) -> Principal:
        return cls("service", client_id)

    @classmethod
    def group(cls, name: str) -> Principal:
        return cls("group", name)


PUBLIC = Principal("public")


def principal_keys(username: str, sub: str, groups: Iterable[str] = ()) -> set[str]:
    """Every principal key a caller with these attributes may hold: a candidate set, wider than
    the truth (kinds are not known here); :func:`proxy.policy.subjects.grantee_matches` decides."""
    keys = {f"group:{g}" for g in groups}
    if sub:
        keys.add(f"user:{sub}")
    if username:
        keys.add(f"service:{username}")
    if not sub:
        keys.add("public")  # only the anonymous caller has no sub
    return keys


@dataclass(frozen=True, slots=True)
class Delegation:
    id: str
    device_id: str
    grantee: Principal
    permission: Permission
    expires_at: float | None = None  # unix time
    granted_by: str = ""             # the granter's sub

    def __post_init__(self) -> None:
        if not isinstance(self.grantee, Principal):  # a bare name would be ambiguous: refuse it
            raise TypeError(f"a delegation's grantee is a Principal, not {type(self.grantee).__name__}")

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
        """Candidate ids of the devices this caller owns, may read as public, or holds an active read
        delegation on, by any principal key of :func:`principal_keys` (used to restrict NGSI
        listings without asking every device). A superset: every candidate is still asked of the
        policies, which match the delegation's typed principal against the caller's kind."""


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
        names = principal_keys(username, sub, groups)
        now = time.time()
        out = set()
        for d in self._devices.values():
            if (sub and d.owner_sub == sub) or d.public or any(
                    g.grantee.key in names and g.active(now) and g.allows("read") for g in d.delegations):
                out.add(d.id)
        return out

    def _changed(self, ids: set[str] | None) -> None:
        self.generation += 1
        for cb in list(self._listeners):
            cb(ids)
