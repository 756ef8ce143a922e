"""In-memory stand-ins for the parts the MQTT gateway rig needs while they are
being written (token validator, ownership service, policy engine).

They follow the contracts in DESIGN.md exactly, so the rig in
:mod:`tests.rig.gateway` swaps them for the real parts as soon as those import.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import replace

from proxy.facts import Delegation, DeviceFacts, StaticFacts
from proxy.identity.model import AuthError, AuthReason, Identity


class StandinTokens:
    """Opaque tokens mapped to identities; unknown -> bad signature, old -> expired."""

    def __init__(self) -> None:
        self._tokens: dict[str, Identity] = {}
        self.ready = True

    def issue(self, username: str, *, roles: tuple[str, ...] = (), ttl: float = 300.0) -> str:
        token = "tok." + secrets.token_urlsafe(24)
        self._tokens[token] = Identity(kind="user", sub=f"sub-{username}", username=username, method="token",
                                       roles=frozenset(roles), expires_at=time.time() + ttl)
        return token

    async def start(self) -> None:
        pass

    async def validate(self, token: str) -> Identity:
        ident = self._tokens.get(token)
        if ident is None:
            raise AuthError(AuthReason.BAD_SIGNATURE)
        if ident.expires_at is not None and ident.expires_at < time.time():
            raise AuthError(AuthReason.EXPIRED)
        return ident

    async def close(self) -> None:
        pass


def _h(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class StandinOwnership:
    def __init__(self) -> None:
        self.facts = StaticFacts()
        self._keys: dict[str, tuple[bytes, bytes]] = {}

    async def register_device(self, owner: Identity, fields: dict) -> tuple[dict, str, str]:
        dev_id = fields["id"]
        self.facts.put(DeviceFacts(id=dev_id, owner_sub=owner.sub, owner_username=owner.username,
                                   public=bool(fields.get("public")), type=fields.get("type", "")))
        k1, k2 = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self._keys[dev_id] = (_h(k1), _h(k2))
        return {"id": dev_id, "type": fields.get("type", ""), "owner": owner.username}, k1, k2

    async def delete_device(self, owner: Identity, device_id: str) -> None:
        self._keys.pop(device_id, None)
        self.facts.remove(device_id)

    async def create_delegation(self, owner: Identity, device_id: str, grantee: str, permission: str,
                                expires_at: float | None = None) -> dict:
        d = self.facts.device(device_id)
        deleg = Delegation(id=secrets.token_hex(4), device_id=device_id, grantee=grantee,
                           permission=permission, granted_by=owner.sub, expires_at=expires_at)
        self.facts.put(replace(d, delegations=d.delegations + (deleg,)))
        return {"id": deleg.id}

    async def revoke_delegation(self, owner: Identity, device_id: str, delegation_id: str) -> None:
        d = self.facts.device(device_id)
        self.facts.put(replace(d, delegations=tuple(x for x in d.delegations if x.id != delegation_id)))

    async def authenticate_device_key(self, device_id: str, key: str) -> Identity:
        k = self._keys.get(device_id, (b"\0" * 32, b"\0" * 32))
        h = _h(key)
        ok = hmac.compare_digest(h, k[0]) | hmac.compare_digest(h, k[1])
        d = self.facts.device(device_id)
        if not ok or d is None:
            raise AuthError(AuthReason.UNKNOWN_DEVICE_OR_KEY)
        return self._device(d, "device_key")

    def device_identity(self, device_id: str) -> Identity:
        d = self.facts.device(device_id)
        if d is None:
            raise AuthError(AuthReason.UNKNOWN_DEVICE_OR_KEY)
        return self._device(d, "certificate")

    @staticmethod
    def _device(d: DeviceFacts, method: str) -> Identity:
        return Identity(kind="device", sub=f"device:{d.id}", username=d.id, device_id=d.id, method=method,
                        owner_sub=d.owner_sub, owner_username=d.owner_username)

    async def close(self) -> None:
        pass


class StandinPolicies:
    """The shipped rules of DESIGN.md, hand-coded: owners/delegates/devices on devices/{id}/..."""

    def __init__(self, facts: StaticFacts, admin_role: str = "iot-admin"):
        self.facts = facts
        self.admin_role = admin_role
        self.generation = 0
        self._listeners: list = []
        self.deny_all = False  # flipped by tests to simulate a policy edit

    def subscribe(self, cb):
        self._listeners.append(cb)
        return lambda: self._listeners.remove(cb)

    def swap(self, deny_all: bool) -> None:
        self.deny_all = deny_all
        self.generation += 1
        for cb in list(self._listeners):
            cb(self)

    async def watch(self) -> None:
        pass

    def _rel(self, ident: Identity, dev_id: str, want: str) -> bool:
        d = self.facts.device(dev_id)
        if d is None:
            return False
        if ident.kind != "device" and d.owner_sub == ident.sub:
            return True
        return any(g.grantee == ident.username and g.allows(want) and g.active() for g in d.delegations)

    def may_publish(self, ident, topic, *, qos=0, retain=False, client_id=""):
        from proxy.policy.decision import Decision
        if self.deny_all or topic.startswith("$"):
            return Decision(False, None, "no rule matched")
        if ident.has_role(self.admin_role):
            return Decision(True, "admins", "allow")
        p = topic.split("/")
        if len(p) >= 3 and p[0] == "devices":
            if ident.kind == "device" and ident.device_id == p[1] and p[2] in ("telemetry", "attrs"):
                return Decision(True, "devices-publish-telemetry", "allow", p[1])
            if self._rel(ident, p[1], "write"):
                return Decision(True, "owners-use-their-devices", "allow", p[1])
        return Decision(False, None, "no rule matched")

    def may_receive(self, ident, topic, *, client_id=""):
        from proxy.policy.decision import Decision
        if self.deny_all or topic.startswith("$"):
            return Decision(False, None, "no rule matched")
        if ident.has_role(self.admin_role):
            return Decision(True, "admins", "allow")
        p = topic.split("/")
        if len(p) >= 3 and p[0] == "devices":
            if ident.kind == "device" and ident.device_id == p[1] and p[2] == "cmd":
                return Decision(True, "devices-read-commands", "allow", p[1])
            if self._rel(ident, p[1], "read"):
                return Decision(True, "owners-use-their-devices", "allow", p[1])
        return Decision(False, None, "no rule matched")

    def may_subscribe(self, ident, topic_filter, *, qos=0, client_id=""):
        from proxy.policy.decision import SubscribeDecision, Verdict
        if self.deny_all or topic_filter.startswith("$"):
            return SubscribeDecision(Verdict.DENY, None, "no rule matched")
        if ident.has_role(self.admin_role):
            return SubscribeDecision(Verdict.ALLOW, "admins", "allow")
        p = topic_filter.split("/")
        if p[0] == "#" or (p[0] in ("devices", "+") and len(p) >= 2 and p[1] in ("+", "#")):
            return SubscribeDecision(Verdict.CHECK_EACH, "owners-use-their-devices", "check each")
        if p[0] == "devices" and len(p) >= 2:
            d = self.may_receive(ident, "/".join(p[:2] + ["telemetry"]) if len(p) == 2 else topic_filter.replace(
                "+", "x").replace("#", "x"))
            if d.allowed:
                return SubscribeDecision(Verdict.ALLOW, d.rule, "allow", p[1])
        return SubscribeDecision(Verdict.DENY, None, "no rule matched")
