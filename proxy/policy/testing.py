"""Running the YAML test cases written next to the policies.

Each case builds its own world: the identity from ``as``, and facts where
the caller owns ``owns``, holds the ``delegated`` delegations, and the
``public`` devices are public (owned by someone else). Every case is asked
of a policy set compiled against that world, through the same engine the
gateways use. A device caller is itself registered. Users get ``sub`` = ``sub-<name>``; service
accounts (``as: {service: CLIENT}``) are known by their client id; devices are
``device:<id>`` and owned by nobody in the test unless listed in ``owns``
(which then means "owned by this device's owner", i.e. the caller).

A delegation's ``to`` names a typed principal as the API stores it: a user name
(the user ``sub-<name>``), ``service:CLIENT``, ``group:NAME`` or ``anonymous``
(the public); without ``to`` it is the caller itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.facts import PUBLIC, Delegation, DeviceFacts, Principal, StaticFacts
from proxy.identity.model import ANONYMOUS, Identity
from proxy.policy.engine import CompiledPolicies
from proxy.policy.language import PolicySource, TestCase

__all__ = ["CaseResult", "identity_for", "facts_for", "grantee_for", "run_case", "run_all"]

OTHER_OWNER = "sub-someone-else"


@dataclass(frozen=True)
class CaseResult:
    case: TestCase
    passed: bool
    got: str          # allow | deny | check-each
    rule: str | None
    reason: str

    @property
    def question(self) -> str:
        c = self.case
        if c.mqtt:
            return f"mqtt {c.mqtt['action']} {c.mqtt['topic']}"
        return f"http {c.http['method']} {c.http['path']}"  # type: ignore[index]

    @property
    def who(self) -> str:
        a = self.case.as_
        return "anonymous" if a["kind"] == "anonymous" else f"{a['kind']}:{a['name']}"


def identity_for(as_: dict[str, Any]) -> Identity:
    kind = as_["kind"]
    if kind == "anonymous":
        return ANONYMOUS
    name = as_["name"]
    roles, groups = frozenset(as_.get("roles", ())), frozenset(as_.get("groups", ()))
    scopes, client_roles = frozenset(as_.get("scopes", ())), frozenset(as_.get("client_roles", ()))
    if kind == "device":
        return Identity(kind="device", sub=f"device:{name}", username=name, method="device_key",
                        device_id=name, owner_sub=OTHER_OWNER, roles=roles, groups=groups, scopes=scopes,
                        client_roles=client_roles)
    if kind == "service":
        return Identity(kind="service", sub=f"sub-service-{name}", username=name, azp=name, method="token",
                        roles=roles, groups=groups, scopes=scopes, client_roles=client_roles)
    return Identity(kind="user", sub=f"sub-{name}", username=name, method="token", roles=roles, groups=groups,
                    scopes=scopes, client_roles=client_roles)


def grantee_for(to: str | None, identity: Identity) -> Principal:
    """The principal a test case's ``to`` names (see the module docstring)."""
    if to is None:
        if identity.kind == "anonymous":
            return PUBLIC
        if identity.kind == "service":
            return Principal.service(identity.username)
        if identity.kind == "user":
            return Principal.user(identity.sub, identity.username)
        return Principal.user("", identity.username)  # a device is nobody's grantee
    if to == "anonymous":
        return PUBLIC
    for prefix in ("group:", "service:"):
        if to.startswith(prefix):
            return Principal(prefix[:-1], to[len(prefix):])  # type: ignore[arg-type]
    return Principal.user(f"sub-{to}", to)


def facts_for(case: TestCase, identity: Identity) -> StaticFacts:
    owner_sub = identity.owner_sub if identity.kind == "device" else identity.sub
    devices: dict[str, DeviceFacts] = {}
    if identity.kind == "device":  # a device exists in the store it authenticated against
        devices[identity.device_id] = DeviceFacts(identity.device_id, identity.owner_sub, "someone-else")
    for d in case.owns:
        devices[d] = DeviceFacts(d, owner_sub or OTHER_OWNER, identity.username)
    for d in case.public:
        old = devices.get(d) or DeviceFacts(d, OTHER_OWNER, "someone-else")
        devices[d] = DeviceFacts(old.id, old.owner_sub, old.owner_username, public=True,
                                 delegations=old.delegations)
    for i, (d, perm, to) in enumerate(case.delegated):
        old = devices.get(d) or DeviceFacts(d, OTHER_OWNER, "someone-else")
        grant = Delegation(f"t{i}", d, grantee_for(to, identity), perm)  # type: ignore[arg-type]
        devices[d] = DeviceFacts(old.id, old.owner_sub, old.owner_username, public=old.public,
                                 delegations=old.delegations + (grant,))
    return StaticFacts(devices.values())


def run_case(source: PolicySource, case: TestCase, *, admin_role: str = "iot-admin") -> CaseResult:
    identity = identity_for(case.as_)
    engine = CompiledPolicies(source, facts_for(case, identity), admin_role=admin_role)
    client_id = case.as_.get("client_id", "")
    if case.mqtt:
        q = case.mqtt
        if q["action"] == "publish":
            d = engine.may_publish(identity, q["topic"], qos=q["qos"], retain=q["retain"], client_id=client_id)
            got, rule, reason = ("allow" if d.allowed else "deny"), d.rule, d.reason
        elif q["action"] == "receive":
            d = engine.may_receive(identity, q["topic"], client_id=client_id)
            got, rule, reason = ("allow" if d.allowed else "deny"), d.rule, d.reason
        else:
            s = engine.may_subscribe(identity, q["topic"], qos=q["qos"], client_id=client_id)
            got, rule, reason = s.verdict.value, s.rule, s.reason
    else:
        h = case.http
        assert h is not None  # noqa: S101 (narrowing: the loader requires mqtt or http)
        d = engine.may_http(identity, h["method"], h["path"])
        got, rule, reason = ("allow" if d.allowed else "deny"), d.rule, d.reason
    passed = got == case.expect and (case.rule is None or case.rule == rule)
    return CaseResult(case, passed, got, rule, reason)


def run_all(source: PolicySource, *, admin_role: str = "iot-admin") -> list[CaseResult]:
    return [run_case(source, c, admin_role=admin_role) for c in source.tests]
