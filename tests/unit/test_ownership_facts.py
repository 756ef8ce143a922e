"""The in-memory read path and device key authentication."""

from __future__ import annotations

import dataclasses
import hmac
import time

import pytest

from ownership import service as service_mod
from proxy.identity.model import AuthError, AuthReason
from tests.rig.ownership import USERS

ALICE, BOB, CAROL = USERS["alice"], USERS["bob"], USERS["carol"]


# ---------------------------------------------------------------- device keys


async def test_key_check_fails_the_same_way_for_unknown_device_and_wrong_key(ownership_service):
    _, k1, _ = await ownership_service.register_device(ALICE, {"id": "d1", "type": "T"})
    reasons = []
    for device_id, key in (("d1", "wrong"), ("nope", k1), ("nope", "wrong"), ("d1", ""), ("", "")):
        with pytest.raises(AuthError) as err:
            await ownership_service.authenticate_device_key(device_id, key)
        reasons.append((err.value.reason, str(err.value)))
    assert set(reasons) == {(AuthReason.UNKNOWN_DEVICE_OR_KEY, "unknown_device_or_key")}


async def test_key_check_does_the_same_work_for_unknown_devices(ownership_service, monkeypatch):
    """An unknown id is compared against a dummy hash, twice, as a known one is: no early exit
    an attacker could time to learn which ids exist."""
    await ownership_service.register_device(ALICE, {"id": "d1", "type": "T"})
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(service_mod.hmac, "compare_digest", lambda a, b: calls.append(len(b)) or real(a, b))
    for device_id in ("d1", "unknown-device"):
        calls.clear()
        with pytest.raises(AuthError):
            await ownership_service.authenticate_device_key(device_id, "x" * 43)
        assert calls == [32, 32], device_id


async def test_a_key_of_another_device_does_not_open_this_one(ownership_service):
    _, k1, k2 = await ownership_service.register_device(ALICE, {"id": "a", "type": "T"})
    await ownership_service.register_device(BOB, {"id": "b", "type": "T"})
    for key in (k1, k2):
        with pytest.raises(AuthError):
            await ownership_service.authenticate_device_key("b", key)


async def test_overlong_and_odd_keys_are_refused_without_error(ownership_service):
    _, k1, _ = await ownership_service.register_device(ALICE, {"id": "a", "type": "T"})
    for key in (k1 + "x" * 1000, "\udcff" * 10, "\x00", k1[:-1], k1.upper()):
        with pytest.raises(AuthError):
            await ownership_service.authenticate_device_key("a", key)


async def test_keys_are_random_and_stored_only_as_keyed_hashes(ownership_service):
    seen = set()
    for i in range(3):
        _, k1, k2 = await ownership_service.register_device(ALICE, {"id": f"d{i}", "type": "T"})
        seen |= {k1, k2}
        hashes = ownership_service.facts.key_hashes(f"d{i}")
        assert set(hashes) == {"k1", "k2"} and k1.encode() not in hashes["k1"]
        assert hashes["k1"] == ownership_service.hash_key(k1)
    assert len(seen) == 6 and all(len(k) == 43 for k in seen)  # 32 random bytes, base64url


async def test_device_identity_carries_the_owner(ownership_service):
    _, k1, _ = await ownership_service.register_device(ALICE, {"id": "d1", "type": "T"})
    ident = await ownership_service.authenticate_device_key("d1", k1)
    assert (ident.kind, ident.sub, ident.username, ident.device_id, ident.method) == (
        "device", "device:d1", "d1", "d1", "device_key")
    assert (ident.owner_sub, ident.owner_username) == ("sub-alice", "alice")
    # Certificates: only enrolled ones (tests/unit/test_ownership_certificates.py).
    with pytest.raises(AuthError) as err:
        ownership_service.device_identity("d1", "00" * 32)
    assert err.value.reason is AuthReason.BAD_CERTIFICATE
    with pytest.raises(AuthError) as err:
        ownership_service.device_identity("unknown", "00" * 32)
    assert err.value.reason is AuthReason.UNKNOWN_DEVICE_OR_KEY


# ---------------------------------------------------------------- read path


async def test_readable_devices(ownership_service):
    s = ownership_service
    for device_id, owner, public in (("a-own", ALICE, False), ("b-pub", BOB, True), ("b-read", BOB, False),
                                     ("b-write", BOB, False), ("b-group", BOB, False), ("b-old", BOB, False),
                                     ("c-other", CAROL, False)):
        await s.register_device(owner, {"id": device_id, "type": "T", "public": public})
    await s.create_delegation(BOB, "b-read", "alice", "read")
    await s.create_delegation(BOB, "b-write", "alice", "write")
    await s.create_delegation(BOB, "b-group", "group:lab", "readwrite")
    await s.create_delegation(BOB, "b-old", "alice", "read", expires_at=time.time() - 5)
    assert s.facts.readable_devices("alice", "sub-alice", ["lab"]) == {"a-own", "b-pub", "b-read", "b-group"}
    assert s.facts.readable_devices("alice", "sub-alice") == {"a-own", "b-pub", "b-read"}
    assert s.facts.readable_devices("carol", "sub-carol") == {"c-other", "b-pub"}
    # Same answer as the reference implementation in proxy.facts.
    from proxy.facts import StaticFacts
    static = StaticFacts(s.facts.device(i) for i in s.facts.all_ids())
    for user, sub, groups in (("alice", "sub-alice", ["lab"]), ("bob", "sub-bob", []), ("carol", "sub-carol", [])):
        assert s.facts.readable_devices(user, sub, groups) == static.readable_devices(user, sub, groups)


async def test_a_delegation_expires_on_the_clock(tmp_path):
    from tests.rig.ownership import open_service, ownership_config
    now = [1_000_000.0]
    s = await open_service(ownership_config(tmp_path), clock=lambda: now[0])
    await s.register_device(BOB, {"id": "d", "type": "T"})
    await s.create_delegation(BOB, "d", "alice", "read", expires_at=now[0] + 60)
    assert s.facts.readable_devices("alice", "sub-alice") == {"d"}
    now[0] += 61
    assert s.facts.readable_devices("alice", "sub-alice") == set()
    assert s.delegated_to(ALICE) == []
    await s.close()


async def test_every_write_bumps_the_generation_and_tells_subscribers(ownership_service):
    s = ownership_service
    seen: list = []
    unsubscribe = s.facts.subscribe(seen.append)
    gen = s.facts.generation
    await s.register_device(ALICE, {"id": "d", "type": "T"})
    grant = await s.create_delegation(ALICE, "d", "bob", "read")
    await s.update_device(ALICE, "d", {"public": True})
    await s.rotate_key(ALICE, "d", "k2")
    await s.revoke_delegation(ALICE, "d", grant["id"])
    await s.delete_device(ALICE, "d")
    assert seen == [{"d"}] * 6 and s.facts.generation == gen + 6
    unsubscribe()
    unsubscribe()
    await s.register_device(ALICE, {"id": "e", "type": "T"})
    assert len(seen) == 6


async def test_a_revocation_is_in_force_when_the_call_returns(ownership_service):
    """A gateway holding an open connection re-checks on the callback; by the time the
    callback runs the fact is already gone."""
    s = ownership_service
    await s.register_device(ALICE, {"id": "d", "type": "T"})
    grant = await s.create_delegation(ALICE, "d", "bob", "read")
    seen_during_callback = []
    s.facts.subscribe(lambda ids: seen_during_callback.append(
        "d" in s.facts.readable_devices("bob", "sub-bob")))
    await s.revoke_delegation(ALICE, "d", grant["id"])
    assert seen_during_callback == [False]


async def test_a_failing_subscriber_does_not_stop_the_others(ownership_service):
    s = ownership_service
    seen = []
    s.facts.subscribe(lambda ids: 1 / 0)
    s.facts.subscribe(seen.append)
    await s.register_device(ALICE, {"id": "d", "type": "T"})
    assert seen == [{"d"}]


async def test_cached_and_uncached_reads_agree(ownership_service):
    s = ownership_service
    await s.register_device(ALICE, {"id": "d", "type": "T", "name": "n", "location": {"lat": 1.5, "lon": -2}})
    await s.create_delegation(ALICE, "d", "bob", "readwrite")
    cached = s.get_device("d")
    stored = await s.load_device("d")
    assert cached == stored


# ---------------------------------------------------------------- quotas


async def test_highest_role_quota_applies(tmp_path):
    from tests.rig.ownership import ownership_config
    config = ownership_config(tmp_path)
    config = dataclasses.replace(config, ownership=dataclasses.replace(
        config.ownership, max_devices_per_user=2, role_quotas={"iot-user": 3, "iot-pro": 10}))
    from tests.rig.ownership import open_service
    s = await open_service(config)
    pro = dataclasses.replace(ALICE, roles=frozenset({"iot-user", "iot-pro"}))
    nobody = dataclasses.replace(ALICE, roles=frozenset())
    assert (s.quota_for(pro), s.quota_for(ALICE), s.quota_for(nobody)) == (10, 3, 2)
    await s.close()


async def test_a_reregistered_id_authenticates_as_the_new_owners_device(ownership_service):
    s = ownership_service
    _, old_key, _ = await s.register_device(ALICE, {"id": "d", "type": "T"})
    assert (await s.authenticate_device_key("d", old_key)).owner_sub == "sub-alice"
    await s.delete_device(ALICE, "d")
    _, new_key, _ = await s.register_device(BOB, {"id": "d", "type": "T"})
    with pytest.raises(AuthError):
        await s.authenticate_device_key("d", old_key)
    assert (await s.authenticate_device_key("d", new_key)).owner_username == "bob"


async def test_racing_registrations_cannot_beat_the_quota(ownership_service):
    """Twenty registrations at once against a quota of five: the check runs inside the
    write transaction on the single store thread, so exactly five win."""
    import asyncio

    from ownership.service import QuotaExceeded
    results = await asyncio.gather(*(ownership_service.register_device(ALICE, {"id": f"race-{i}", "type": "T"})
                                     for i in range(20)), return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 5
    assert all(isinstance(r, QuotaExceeded) for r in results if isinstance(r, Exception))
    assert len(ownership_service.facts.owned_by("sub-alice")) == 5


async def test_the_read_path_always_matches_the_store(ownership_service):
    """A seeded random walk of writes; after each, the in-memory facts equal a fresh load
    of the database (what a restart would see)."""
    import random

    from ownership.facts import MemoryFacts
    from ownership.service import OwnershipError
    s = ownership_service
    rng = random.Random(20261122)
    users = [ALICE, BOB, CAROL]
    ids = [f"w-{i}" for i in range(6)]
    grantees = ["alice", "bob", "carol", "group:lab", "anonymous"]
    subs = [("s1", ""), ("s2", "t1"), ("s3", "t1")]

    async def step() -> int:
        op = rng.randrange(9)
        user, device_id = rng.choice(users), rng.choice(ids)
        if op == 0:
            await s.register_device(user, {"id": device_id, "type": "T", "public": rng.random() < 0.3})
        elif op == 1:
            await s.delete_device(user, device_id)
        elif op == 2:
            await s.update_device(user, device_id, {"public": rng.random() < 0.5, "name": f"n{rng.randrange(9)}"})
        elif op == 3:
            await s.create_delegation(user, device_id, rng.choice(grantees), rng.choice(["read", "write", "readwrite"]),
                                      expires_at=rng.choice([None, time.time() - 10, time.time() + 3600]))
        elif op == 4:
            grants = s.delegations_of(device_id)
            if grants:
                await s.revoke_delegation(user, device_id, rng.choice(grants)["id"])
        elif op == 5:
            await s.rotate_key(user, device_id, rng.choice(["k1", "k2"]))
        elif op == 6:
            await s.record_subscription(*(lambda sub: (sub[0], user, sub[1]))(rng.choice(subs)))
        elif op == 7:
            await s.forget_subscription(*rng.choice(subs))
        elif rng.random() < 0.2:
            await s.erase_user_data(user)
        return op

    done: list[int] = []
    for _ in range(150):
        try:
            done.append(await step())
        except OwnershipError:
            pass
        fresh = MemoryFacts()
        fresh.load(await s._run(s._store.load_all))
        assert s.facts.all_ids() == fresh.all_ids()
        for device_id in ids:
            assert s.facts.device(device_id) == fresh.device(device_id)
            assert s.facts.key_hashes(device_id) == fresh.key_hashes(device_id)
            assert s.get_device(device_id) == await s.load_device(device_id)
        for u in users:
            assert s.facts.readable_devices(u.username, u.sub, ["lab"]) == fresh.readable_devices(
                u.username, u.sub, ["lab"])
            for _, tenant in subs:
                assert s.subscriptions_of(u.sub, tenant) == fresh.subscriptions_of(u.sub, tenant)
        for sub_id, tenant in subs:
            assert s.subscription_owner(sub_id, tenant) == fresh.subscription_owner(sub_id, tenant)
    assert set(done) == set(range(9)), sorted(set(done))  # every kind of write happened
