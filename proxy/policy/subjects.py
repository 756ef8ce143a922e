"""Who a rule is for: parsing subjects and deciding whether they hold.

Two families:

* **identity subjects** hold or not from the identity alone: ``anyone``
  (any authenticated caller), ``anonymous`` (unauthenticated callers only),
  ``role:R``, ``client-role:CLIENT:R``, ``user:NAME`` (a user or service
  account with that username; never a device, whose username is its id),
  ``group:G``, ``scope:S`` and ``admin`` (``role:`` + the configured admin
  role, so the shipped policies follow ``ownership.admin_role``). The engine
  turns each into a *partition key* and keeps one index per key, so a
  decision only walks the rules written for keys this caller has.
* **relations** hold between the caller and the device bound by ``{device}``
  (:class:`proxy.facts.OwnershipFacts`): ``owner``, ``device`` (the caller is
  that device), ``delegate`` (an active delegation whose permission covers
  the action: publish and HTTP writes need write; subscribe, delivery, GET,
  HEAD and OPTIONS need read), ``delegate:read``, ``delegate:write`` and
  ``public`` (a public device, caller authenticated). A delegation's grantee
  is a typed :class:`proxy.facts.Principal`: a user (by ``sub``), a service
  account (by client id), a group, or the public (:func:`grantee_matches`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Literal

from proxy.facts import DeviceFacts, OwnershipFacts, Principal
from proxy.identity.model import Identity

__all__ = ["RELATIONS", "IDENTITY_WORDS", "PREFIXES", "subject_problem", "partition_key", "identity_keys",
           "relation_holds", "relations_hold", "could_hold", "grantee_matches", "REL"]

Want = Literal["read", "write"]

RELATIONS = frozenset({"owner", "device", "delegate", "delegate:read", "delegate:write", "public"})
IDENTITY_WORDS = frozenset({"anyone", "anonymous", "admin"})
PREFIXES = ("role:", "client-role:", "user:", "group:", "scope:")
REL = "*relation"  # the partition every relation subject lives in


def subject_problem(text: str) -> str | None:
    """Why ``text`` is not a subject, or None."""
    if text in RELATIONS or text in IDENTITY_WORDS:
        return None
    for prefix in PREFIXES:
        if text.startswith(prefix):
            rest = text[len(prefix):]
            if not rest:
                return f"{prefix} needs a name"
            if prefix == "client-role:" and (rest.count(":") < 1 or rest.startswith(":") or rest.endswith(":")):
                return "client-role: is written client-role:CLIENT:ROLE"
            return None
    return f"unknown subject {text!r}"


def partition_key(subject: str, admin_role: str) -> str:
    """The index a subject's rules go into (all relations share one)."""
    if subject in RELATIONS:
        return REL
    if subject == "admin":
        return f"role:{admin_role}"
    return subject


def identity_keys(identity: Identity) -> list[str]:
    """Every partition key whose identity subject holds for ``identity``."""
    # REL last: when any one rule will do (CHECK_EACH), the caller's own rules are named first.
    if identity.kind == "anonymous":
        return ["anonymous", REL]
    keys = ["anyone"]
    if identity.kind in ("user", "service") and identity.username:
        keys.append("user:" + identity.username)
    keys.extend("role:" + r for r in identity.roles)
    keys.extend("client-role:" + r for r in identity.client_roles)
    keys.extend("group:" + g for g in identity.groups)
    keys.extend("scope:" + s for s in identity.scopes)
    keys.append(REL)
    return keys


def grantee_matches(grantee: Principal, identity: Identity) -> bool:
    """Is ``identity`` the delegation's principal? Each kind matches only its own kind of caller:
    a user by ``sub`` (never by user name), a service account by client id, a group by
    membership (users and services), the public only the unauthenticated caller."""
    kind = grantee.kind
    if kind == "public":
        return identity.kind == "anonymous"
    if not grantee.id or identity.kind == "anonymous":
        return False  # an unresolved user name matches nobody
    if kind == "user":
        return identity.kind == "user" and bool(identity.sub) and identity.sub == grantee.id
    if kind == "service":
        return identity.kind == "service" and identity.username == grantee.id
    return identity.kind in ("user", "service") and grantee.id in identity.groups


def relation_holds(relation: str, identity: Identity, device: DeviceFacts, want: Want, now: float) -> bool:
    if relation == "owner":
        return identity.kind != "anonymous" and bool(identity.sub) and device.owner_sub == identity.sub
    if relation == "device":
        return identity.kind == "device" and identity.device_id == device.id
    if relation == "public":
        return device.public and identity.kind != "anonymous"
    need: Want = want if relation == "delegate" else ("read" if relation == "delegate:read" else "write")
    return any(grantee_matches(d.grantee, identity) and d.active(now) and d.allows(need)
               for d in device.delegations)


def could_hold(relation: str, identity: Identity) -> bool:
    """Could ``relation`` hold between ``identity`` and *some* device? (Used when no device is bound.)"""
    if relation in ("owner", "public"):
        return identity.kind != "anonymous"
    if relation == "device":
        return identity.kind == "device"
    # delegations name users and services, groups, or "anonymous"
    return identity.kind in ("user", "service", "anonymous") or bool(identity.groups)


def relations_hold(relations: Iterable[str], identity: Identity, device_id: str | None, facts: OwnershipFacts,
                   want: Want, horizon: list[float] | None = None, *, now: float | None = None,
                   consulted: set[str] | None = None) -> bool:
    """Does any of ``relations`` hold between ``identity`` and the device? False without a device.

    ``horizon`` collects the expiry times of the device's delegations still
    in the future: an answer cached from this call is stale from the earliest.
    ``consulted`` collects the device ids whose facts the answer rests on (also
    an unregistered one: registering it could change the answer).
    """
    if not device_id:
        return False
    if consulted is not None:
        consulted.add(device_id)
    device = facts.device(device_id)
    if device is None:
        return False
    if now is None:
        now = time.time()
    if horizon is not None:
        horizon.extend(d.expires_at for d in device.delegations if d.expires_at is not None and d.expires_at > now)
    return any(relation_holds(r, identity, device, want, now) for r in relations)
