"""The in-memory read path over the store: what the gateways ask on every packet.

Loaded in full at open and changed only after a write has committed, on the
event loop thread, so readers never see a fact the database does not hold.
Every change bumps :attr:`generation` and calls the subscribers with the
device ids it touched; the gateways re-check open connections on that call,
which is how a revoked delegation or a deleted device takes effect at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from proxy.facts import Delegation, DeviceFacts, Principal, principal_keys

log = logging.getLogger("keygate.ownership")


def principal_of(row: dict[str, Any]) -> Principal:
    """The typed principal a delegation row names."""
    return Principal(row["grantee_kind"], row["grantee_id"], row["grantee_name"])


def delegation_from_row(row: dict[str, Any]) -> Delegation:
    return Delegation(id=row["id"], device_id=row["device_id"], grantee=principal_of(row),
                      permission=row["permission"], expires_at=row["expires_at"], granted_by=row["granted_by"])


EMPTY: dict[str, list[dict[str, Any]]] = {"devices": [], "keys": [], "delegations": [], "subscriptions": [],
                                          "certificates": [], "known_users": []}


class MemoryFacts:
    """Implements :class:`proxy.facts.OwnershipFacts` from a snapshot of the store."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.generation = 0
        self._clock = clock
        self._records: dict[str, dict[str, Any]] = {}      # id -> device row (no delegations)
        self._delegations: dict[str, dict[str, dict[str, Any]]] = {}  # device id -> delegation id -> row
        self._facts: dict[str, DeviceFacts] = {}
        self._keys: dict[str, dict[str, bytes]] = {}        # device id -> slot -> hash
        self._certs: dict[str, dict[str, dict[str, Any]]] = {}  # device id -> fingerprint -> enrolled cert
        self._by_owner: dict[str, set[str]] = {}            # owner sub -> device ids
        self._by_grantee: dict[str, set[str]] = {}          # principal key -> device ids
        self._known_users: dict[str, str] = {}              # sub -> user name last seen
        self._subs_by_name: dict[str, set[str]] = {}        # user name -> subs last seen with it
        self._public: set[str] = set()
        self._subs: dict[tuple[str, str], str] = {}         # (service, id) -> owner sub
        self._subs_by_owner: dict[tuple[str, str], set[str]] = {}
        self._sub_records: dict[tuple[str, str], dict[str, Any]] = {}  # (service, id) -> what re-checking needs
        self._listeners: list[Callable[[set[str] | None], None]] = []

    # ------------------------------------------------------------------ OwnershipFacts

    def device(self, device_id: str) -> DeviceFacts | None:
        return self._facts.get(device_id)

    def subscribe(self, callback: Callable[[set[str] | None], None]) -> Callable[[], None]:
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)
        return unsubscribe

    def readable_devices(self, username: str, sub: str, groups: Iterable[str] = ()) -> set[str]:
        """A candidate superset (see :meth:`proxy.facts.OwnershipFacts.readable_devices`)."""
        out = set(self._by_owner.get(sub, ())) if sub else set()
        out |= self._public
        now = self._clock()
        for key in principal_keys(username, sub, groups):
            for device_id in self._by_grantee.get(key, ()):
                if device_id in out:
                    continue
                for d in self._delegations.get(device_id, {}).values():
                    if principal_of(d).key == key and d["permission"] in ("read", "readwrite") and (
                            d["expires_at"] is None or now < d["expires_at"]):
                        out.add(device_id)
                        break
        return out

    # ------------------------------------------------------------------ richer reads (API, key check)

    def record(self, device_id: str) -> dict[str, Any] | None:
        return self._records.get(device_id)

    def delegations_of(self, device_id: str) -> list[dict[str, Any]]:
        return sorted(self._delegations.get(device_id, {}).values(), key=lambda d: (d["created_at"], d["id"]))

    def owned_by(self, sub: str) -> set[str]:
        return set(self._by_owner.get(sub, ()))

    def delegated_to(self, keys: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """Devices with an active delegation to one of these principal keys, with those delegations."""
        now = self._clock()
        out: dict[str, list[dict[str, Any]]] = {}
        for key in set(keys) - {""}:
            for device_id in self._by_grantee.get(key, ()):
                for d in self._delegations.get(device_id, {}).values():
                    if principal_of(d).key == key and (d["expires_at"] is None or now < d["expires_at"]):
                        out.setdefault(device_id, []).append(d)
        return out

    def known_username(self, sub: str) -> str | None:
        return self._known_users.get(sub)

    def subs_named(self, username: str) -> set[str]:
        """The subs whose latest seen user name is ``username``."""
        return set(self._subs_by_name.get(username, ()))

    def put_known_user(self, sub: str, username: str) -> None:
        old = self._known_users.get(sub)
        if old is not None:
            self._discard(self._subs_by_name, old, sub)
        self._known_users[sub] = username
        self._subs_by_name.setdefault(username, set()).add(sub)

    def forget_known_user(self, sub: str) -> None:
        old = self._known_users.pop(sub, None)
        if old is not None:
            self._discard(self._subs_by_name, old, sub)

    def __len__(self) -> int:
        return len(self._records)

    def all_ids(self) -> list[str]:
        return sorted(self._records)

    def key_hashes(self, device_id: str) -> dict[str, bytes] | None:
        return self._keys.get(device_id)

    def certificate(self, device_id: str, fingerprint: str) -> dict[str, Any] | None:
        """The enrolled certificate of this device with this SHA-256 fingerprint (hex), or None."""
        return self._certs.get(device_id, {}).get(fingerprint)

    def certificates_of(self, device_id: str) -> list[dict[str, Any]]:
        """The device's enrolled certificates, oldest first."""
        return sorted(self._certs.get(device_id, {}).values(), key=lambda c: c["created_at"])

    def subscription_owner(self, subscription_id: str, service: str) -> str | None:
        return self._subs.get((service, subscription_id))

    def subscriptions_of(self, owner_sub: str, service: str) -> set[str]:
        return set(self._subs_by_owner.get((owner_sub, service), ()))

    def subscription_record(self, subscription_id: str, service: str) -> dict[str, Any] | None:
        return self._sub_records.get((service, subscription_id))

    def subscription_records(self) -> list[dict[str, Any]]:
        """Every recorded subscription: id, service, owner_sub, entities, identity, unrestricted."""
        return list(self._sub_records.values())

    # ------------------------------------------------------------------ changes (after commit only)

    def load(self, snapshot: dict[str, list[dict[str, Any]]]) -> None:
        for row in snapshot["devices"]:
            self._put_record(row)
        for row in snapshot["keys"]:
            self._keys.setdefault(row["device_id"], {})[row["slot"]] = row["hash"]
        for row in snapshot["delegations"]:
            self._put_delegation(row)
        for row in snapshot["subscriptions"]:
            self._put_subscription(row["id"], row["service"], row["owner_sub"], row)
        for row in snapshot.get("known_users", ()):
            self.put_known_user(row["sub"], row["username"])
        for row in snapshot.get("certificates", ()):
            self._certs.setdefault(row["device_id"], {})[row["fingerprint"]] = dict(row)
        for device_id in self._records:
            self._rebuild(device_id)
        self.changed(None)

    def replace(self, snapshot: dict[str, list[dict[str, Any]]], device_ids: set[str] | None) -> None:
        """Everything is now ``snapshot`` (the change feed caught up, or failed closed with an empty
        one); the subscribers re-check ``device_ids`` (None: every device)."""
        self.adopt(self.built(snapshot), device_ids)

    def built(self, snapshot: dict[str, list[dict[str, Any]]]) -> MemoryFacts:
        """New facts from ``snapshot``, sharing nothing with these: built off the event loop (a
        large store takes tens of milliseconds), then put in force with :meth:`adopt`."""
        fresh = MemoryFacts(clock=self._clock)
        fresh.load(snapshot)
        return fresh

    def adopt(self, fresh: MemoryFacts, device_ids: set[str] | None) -> None:
        """Everything is now what ``fresh`` holds (a swap of references: cheap, on the loop)."""
        for name, value in vars(fresh).items():
            if name not in ("_listeners", "generation"):
                setattr(self, name, value)
        self.changed(device_ids)

    def put_device(self, row: dict[str, Any], keys: dict[str, bytes] | None = None) -> None:
        self._put_record(row)
        if keys is not None:
            self._keys[row["id"]] = dict(keys)
        self._rebuild(row["id"])

    def set_key(self, device_id: str, slot: str, digest: bytes) -> None:
        self._keys.setdefault(device_id, {})[slot] = digest

    def set_certificates(self, device_id: str, rows: Iterable[dict[str, Any]]) -> None:
        """The device's enrolled certificates are now exactly ``rows``."""
        certs = {row["fingerprint"]: dict(row) for row in rows}
        if certs:
            self._certs[device_id] = certs
        else:
            self._certs.pop(device_id, None)

    def remove_device(self, device_id: str) -> None:
        row = self._records.pop(device_id, None)
        if row is not None:
            self._discard(self._by_owner, row["owner_sub"], device_id)
        for d in self._delegations.pop(device_id, {}).values():
            self._discard(self._by_grantee, principal_of(d).key, device_id)
        self._keys.pop(device_id, None)
        self._certs.pop(device_id, None)
        self._facts.pop(device_id, None)
        self._public.discard(device_id)

    def put_delegation(self, row: dict[str, Any]) -> None:
        self._put_delegation(row)
        self._rebuild(row["device_id"])

    def remove_delegation(self, device_id: str, delegation_id: str) -> None:
        d = self._delegations.get(device_id, {}).pop(delegation_id, None)
        if d is not None:
            key = principal_of(d).key
            if not any(principal_of(o).key == key for o in self._delegations[device_id].values()):
                self._discard(self._by_grantee, key, device_id)
        self._rebuild(device_id)

    def remove_delegations_where(self, predicate: Callable[[dict[str, Any]], bool]) -> set[str]:
        touched = set()
        for device_id, ds in list(self._delegations.items()):
            for d in [d for d in ds.values() if predicate(d)]:
                self.remove_delegation(device_id, d["id"])
                touched.add(device_id)
        return touched

    def put_subscription(self, subscription_id: str, service: str, owner_sub: str,
                         row: dict[str, Any] | None = None) -> None:
        self.remove_subscription(subscription_id, service)
        self._put_subscription(subscription_id, service, owner_sub, row)

    def set_subscription_subject(self, subscription_id: str, service: str, entities: tuple[str, ...],
                                 unrestricted: bool) -> None:
        record = self._sub_records.get((service, subscription_id))
        if record is not None:
            record["entities"], record["unrestricted"] = tuple(entities), bool(unrestricted)

    def remove_subscription(self, subscription_id: str, service: str) -> None:
        owner = self._subs.pop((service, subscription_id), None)
        self._sub_records.pop((service, subscription_id), None)
        if owner is not None:
            self._discard(self._subs_by_owner, (owner, service), subscription_id)

    def remove_subscriptions_of(self, owner_sub: str) -> None:
        for (service, sub_id), owner in list(self._subs.items()):
            if owner == owner_sub:
                self.remove_subscription(sub_id, service)

    def changed(self, device_ids: set[str] | None) -> None:
        """Bump the generation and tell every subscriber; a failing subscriber does not stop the others."""
        self.generation += 1
        for cb in list(self._listeners):
            try:
                cb(device_ids)
            except Exception:
                log.exception("ownership change listener failed")

    # ------------------------------------------------------------------ internals

    def _put_record(self, row: dict[str, Any]) -> None:
        old = self._records.get(row["id"])
        if old is not None and old["owner_sub"] != row["owner_sub"]:
            self._discard(self._by_owner, old["owner_sub"], row["id"])
        record = {k: v for k, v in row.items() if k != "delegations"}
        self._records[row["id"]] = record
        self._by_owner.setdefault(row["owner_sub"], set()).add(row["id"])
        if row["public"]:
            self._public.add(row["id"])
        else:
            self._public.discard(row["id"])

    def _put_delegation(self, row: dict[str, Any]) -> None:
        self._delegations.setdefault(row["device_id"], {})[row["id"]] = dict(row)
        key = principal_of(row).key
        if key:  # an unresolved user name matches nobody: not indexed
            self._by_grantee.setdefault(key, set()).add(row["device_id"])

    def _put_subscription(self, subscription_id: str, service: str, owner_sub: str,
                          row: dict[str, Any] | None) -> None:
        self._subs[(service, subscription_id)] = owner_sub
        row = row or {}
        self._sub_records[(service, subscription_id)] = {
            "id": subscription_id, "service": service, "owner_sub": owner_sub,
            "entities": tuple(row.get("entities", ())), "identity": row.get("identity"),
            "unrestricted": bool(row.get("unrestricted", False))}
        self._subs_by_owner.setdefault((owner_sub, service), set()).add(subscription_id)

    def _rebuild(self, device_id: str) -> None:
        r = self._records.get(device_id)
        if r is None:
            return
        self._facts[device_id] = DeviceFacts(
            id=r["id"], owner_sub=r["owner_sub"], owner_username=r["owner_username"], public=r["public"],
            service=r["service"], type=r["type"],
            delegations=tuple(delegation_from_row(d) for d in self.delegations_of(device_id)))

    @staticmethod
    def _discard(index: dict[Any, set[str]], key: Any, value: str) -> None:
        s = index.get(key)
        if s is not None:
            s.discard(value)
            if not s:
                del index[key]
