"""Shared builders for the policy unit tests."""

from typing import Any

from proxy.facts import Delegation, DeviceFacts, StaticFacts
from proxy.identity.model import ANONYMOUS, Identity
from proxy.policy import Policies
from proxy.policy.testing import grantee_for


def to(text: str):
    """The principal a policy test's ``to`` names: a user name (sub-NAME), service:C, group:G, anonymous."""
    return grantee_for(text, ANONYMOUS)


def user(name="alice", **kw: Any) -> Identity:
    sub = kw.pop("sub", f"sub-{name}")
    fields: dict[str, Any] = {k: frozenset(v) if isinstance(v, (list, set, tuple)) else v for k, v in kw.items()}
    return Identity(kind="user", sub=sub, username=name, method="token", **fields)


def service(name="svc", **kw: Any) -> Identity:
    fields: dict[str, Any] = {k: frozenset(v) for k, v in kw.items()}
    return Identity(kind="service", sub=f"sub-{name}", username=name, method="token", **fields)


def device(dev_id="d1", owner="sub-alice") -> Identity:
    return Identity(kind="device", sub=f"device:{dev_id}", username=dev_id, method="device_key",
                    device_id=dev_id, owner_sub=owner, owner_username="alice")


anonymous = ANONYMOUS


def facts(*devices: DeviceFacts) -> StaticFacts:
    return StaticFacts(devices)


def dev(dev_id, owner="sub-alice", public=False, delegations=()) -> DeviceFacts:
    return DeviceFacts(dev_id, owner, owner.removeprefix("sub-"), public=public,
                       delegations=tuple(Delegation(f"g{i}", dev_id, to(d[0]), *d[1:]) if isinstance(d, tuple) else d
                                         for i, d in enumerate(delegations)))


def policies(rules_yaml: str, the_facts=None, **kw) -> Policies:
    return Policies.from_text("version: 1\nrules:\n" + rules_yaml, the_facts or StaticFacts(), **kw)
