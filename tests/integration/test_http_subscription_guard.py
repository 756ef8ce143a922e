"""NGSI subscriptions do not outlive the access that justified them.

Through the real gateway, the real test OIDC provider, the SQLCipher ownership
store and the Orion stand-in (devices as in ``test_http_gateway``: alice owns
a-1 and public a-2; bob owns b-1, read-delegated to carol, and b-2). Each test
takes away one kind of access and checks that the subscription it justified is
deleted in Orion and forgotten in the store, while alice's subscription on her
own device and the administrator's idPattern subscription stay.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from proxy.http.gateway import GATEWAY_KEY
from proxy.metrics import REGISTRY
from proxy.policy import Policies
from tests.integration.http_rig import ROOT
from tests.integration.test_http_gateway import _identity, _subscribe, rig, subscription  # noqa: F401

pytestmark = pytest.mark.integration

SETTLE = 5.0   # the guard re-checks ~0.1 s after a change; this bounds the wait, it is no timing assertion


def in_orion(rig, sub_id: str) -> bool:
    return sub_id in rig.standin.tenant("").subscriptions


def recorded(rig, sub_id: str) -> bool:
    return rig.services.ownership.subscription_owner(sub_id, "") is not None


async def until_gone(rig, sub_id: str) -> None:
    deadline = time.monotonic() + SETTLE
    while (in_orion(rig, sub_id) or recorded(rig, sub_id)) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not in_orion(rig, sub_id), "still in Orion"
    assert not recorded(rig, sub_id), "still in the store"


async def settle(rig) -> None:
    """Let the guard finish any round a change started (to show what it did not revoke)."""
    await asyncio.sleep(0.3)


def guard(rig):
    return rig.gateway.app[GATEWAY_KEY].guard


@pytest.fixture
async def controls(rig):
    """Subscriptions no change in these tests may touch."""
    own = await _subscribe(rig, "alice", subscription("a-1"))
    everything = await _subscribe(rig, "admin", {"subject": {"entities": [{"idPattern": ".*"}]},
                                                 "notification": {"http": {"url": "http://93.184.216.34/n"}}})
    yield own, everything
    await settle(rig)
    for sub_id in (own, everything):
        assert in_orion(rig, sub_id) and recorded(rig, sub_id)


def revoked_count(reason: str) -> float:
    return REGISTRY.get_sample_value("keygate_http_subscriptions_revoked_total", {"reason": reason}) or 0.0


def revoked_audit(rig, sub_id: str) -> list[dict]:
    return [e for e in rig.audit.records
            if e["action"] == "subscription.revoke" and e["resource"] == f"/v2/subscriptions/{sub_id}"]


async def test_deleted_and_re_registered_device(rig, controls):
    bobs = await _subscribe(rig, "bob", subscription("b-1"))
    carols = await _subscribe(rig, "carol", subscription("b-1"))
    alice, bob = await _identity(rig, "alice"), await _identity(rig, "bob")
    await rig.services.ownership.delete_device(bob, "b-1")
    # The deletion itself takes every subscription on b-1 out of Orion and the store, before the
    # guard's round and before anyone can take the id again.
    for sub_id in (bobs, carols):
        assert not in_orion(rig, sub_id) and not recorded(rig, sub_id)
    await rig.services.ownership.register_device(alice, {"id": "b-1", "type": "Thermometer"})
    removed = {e["resource"] for e in rig.audit.records if e["action"] == "orion.remove"}
    assert {"b-1", bobs, carols} <= removed
    assert rig.upstream_saw("DELETE", f"/v2/subscriptions/{bobs}")


async def test_revoked_delegation(rig, controls):
    carols = await _subscribe(rig, "carol", subscription("b-1"))
    still = await _subscribe(rig, "carol", subscription("b-2"))   # her other delegation stays
    bob = await _identity(rig, "bob")
    (grant,) = rig.services.ownership.delegations_of("b-1")
    before = revoked_count("read access withdrawn")
    await rig.services.ownership.revoke_delegation(bob, "b-1", grant["id"])
    await until_gone(rig, carols)
    assert revoked_count("read access withdrawn") == before + 1
    await settle(rig)
    assert in_orion(rig, still) and recorded(rig, still)


async def test_expired_delegation_is_caught_by_the_sweep(rig, controls):
    alice = await _identity(rig, "alice")
    await rig.services.ownership.create_delegation(alice, "a-1", "carol", "read", expires_at=time.time() + 2.0)
    carols = await _subscribe(rig, "carol", subscription("a-1"))
    g = guard(rig)
    g.sweep = 0.3          # instead of 30 s; the wake makes the loop pick the new period up
    g._on_facts(set())
    await asyncio.sleep(0.5)
    assert in_orion(rig, carols), "revoked before it expired"
    await until_gone(rig, carols)


async def test_public_flag_cleared(rig, controls):
    bobs = await _subscribe(rig, "bob", subscription("a-2"))
    alices = await _subscribe(rig, "alice", subscription("a-2"))
    alice = await _identity(rig, "alice")
    await rig.services.ownership.update_device(alice, "a-2", {"public": False})
    await until_gone(rig, bobs)
    await settle(rig)
    assert in_orion(rig, alices)


async def test_patched_subject_is_what_gets_rechecked(rig, controls):
    # bob subscribes to his own device, then moves the subscription onto alice's public one.
    bobs = await _subscribe(rig, "bob", subscription("b-1"))
    r = await rig.call("PATCH", f"/v2/subscriptions/{bobs}", "bob",
                       json_body={"subject": {"entities": [{"id": "a-2", "type": "Thermometer"}]}})
    assert r.status == 204
    alice = await _identity(rig, "alice")
    await rig.services.ownership.update_device(alice, "a-2", {"public": False})
    await until_gone(rig, bobs)


async def test_policy_edit(rig, controls, tmp_path):
    carols = await _subscribe(rig, "carol", subscription("b-1"))
    publics = await _subscribe(rig, "bob", subscription("a-2"))
    edited = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", edited)
    devices = edited / "devices.yaml"
    text = devices.read_text()
    assert text.count("subjects: [owner, delegate]") >= 1
    devices.write_text(text.replace("subjects: [owner, delegate]", "subjects: [owner]"))
    new = Policies.from_dir(edited, rig.services.ownership.facts,
                            admin_role=rig.services.config.ownership.admin_role)
    rig.services.policies.swap(new.compiled)
    await until_gone(rig, carols)
    await settle(rig)
    assert in_orion(rig, publics), "the public rule was not edited"


async def test_owner_erasing_their_data(rig, controls):
    # a-2 stays public: only the erasure can take bob's subscription away.
    bobs = await _subscribe(rig, "bob", subscription("a-2"))
    bob = await _identity(rig, "bob")
    await rig.services.ownership.erase_user_data(bob)
    # The erasure deletes it in Orion itself (ownership.orion_lifecycle); the guard's mirror would
    # catch it otherwise.
    assert not recorded(rig, bobs) and not in_orion(rig, bobs)
    assert [e for e in rig.audit.records if e["action"] == "orion.remove" and e["resource"] == bobs]


async def test_own_delete_is_not_taken_for_an_erasure(rig, controls):
    bobs = await _subscribe(rig, "bob", subscription("b-1"))
    assert (await rig.call("DELETE", f"/v2/subscriptions/{bobs}", "bob")).status == 204
    guard(rig)._on_facts(None)
    await settle(rig)
    assert not revoked_audit(rig, bobs)
    assert len(rig.upstream_saw("DELETE", f"/v2/subscriptions/{bobs}")) == 1


async def test_orion_down_when_access_goes_is_retried(rig, controls):
    carols = await _subscribe(rig, "carol", subscription("b-1"))
    g, handler = guard(rig), rig.gateway.app[GATEWAY_KEY]
    assert g.retry <= 1.0
    upstream, handler.upstream = handler.upstream, "http://127.0.0.1:1"   # nothing listens there
    bob = await _identity(rig, "bob")
    (grant,) = rig.services.ownership.delegations_of("b-1")
    await rig.services.ownership.revoke_delegation(bob, "b-1", grant["id"])
    await settle(rig)
    # Not deleted in Orion, so not forgotten either: the store still says whose it is.
    assert in_orion(rig, carols) and recorded(rig, carols)
    assert g._pending
    handler.upstream = upstream      # Orion is back: the next retry (within a second) takes it
    await until_gone(rig, carols)


async def test_subscription_writes_are_charged_to_the_users_write_rate(rig, controls):
    # Recording or forgetting a subscription is a store write every gateway process applies, as an
    # ownership API write is: a user creating and deleting subscriptions in a loop is held to the same
    # bucket (ownership.write_rate_per_user), and refused before Orion is asked.
    bob = await _identity(rig, "bob")
    while rig.services.ownership.allow_write(bob.sub):   # bob has spent his burst
        pass
    before = len(rig.standin.tenant("").subscriptions)
    r = await rig.call("POST", "/v2/subscriptions", "bob", json_body=subscription("b-1"))
    assert r.status == 429, r.body
    assert int(r.headers["Retry-After"]) >= 1
    assert len(rig.standin.tenant("").subscriptions) == before   # Orion never saw it
    await _subscribe(rig, "carol", subscription("b-1"))   # another user's bucket is her own
