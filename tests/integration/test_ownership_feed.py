"""The change feed over a real PostgreSQL: two ownership services (as two gateway processes would
hold) on one database; a write through one is in force in the other, a missed notification or a
restart of PostgreSQL is caught up, and a feed that stays silent fails closed."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from proxy.metrics import readiness
from tests.rig.ownership import USERS, open_service, ownership_config

pytestmark = pytest.mark.integration

ALICE, BOB = USERS["alice"], USERS["bob"]
MAX_SILENCE = 0.8


def feed_config(tmp_path, dsn):
    config = ownership_config(tmp_path, dsn=dsn)
    return dataclasses.replace(config, store=dataclasses.replace(config.store, feed_max_silence_seconds=MAX_SILENCE))


async def until(predicate, timeout=10.0):
    """Wait for a condition the feed brings about (checked as the event loop turns)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def readable_by_bob(service, device_id):
    facts = service.facts.device(device_id)
    return facts is not None and any(d.grantee.id == "sub-bob" for d in facts.delegations)


@pytest.fixture
async def two(tmp_path, pg_dsn):
    a = await open_service(feed_config(tmp_path / "a", pg_dsn))
    b = await open_service(feed_config(tmp_path / "b", pg_dsn))
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_write_through_one_is_in_force_in_the_other(two):
    a, b = two
    touched = []
    b.facts.subscribe(lambda ids: touched.append(ids))
    _, k1, _ = await a.register_device(ALICE, {"id": "d1", "type": "T"})
    await until(lambda: b.facts.device("d1") is not None)
    assert (await b.authenticate_device_key("d1", k1)).owner_sub == "sub-alice"
    grant = await a.create_delegation(ALICE, "d1", "bob", "read")
    await until(lambda: readable_by_bob(b, "d1"))
    touched.clear()
    await a.revoke_delegation(ALICE, "d1", grant["id"])
    await until(lambda: not readable_by_bob(b, "d1"))
    assert {"d1"} in touched  # the gateways re-check open connections on d1, as after a local write
    await a.delete_device(ALICE, "d1")
    await until(lambda: b.facts.device("d1") is None)


async def test_a_missed_notification_is_caught_up(two, postgres):
    """The listening connection is cut (the notifications sent meanwhile are lost to it); the
    revocation made then reaches the other process when it reconnects, from the store."""
    a, b = two
    await a.register_device(ALICE, {"id": "d1", "type": "T"})
    grant = await a.create_delegation(ALICE, "d1", "bob", "read")
    await until(lambda: readable_by_bob(b, "d1"))
    postgres.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' "
                  "OR query LIKE 'SELECT coalesce(max(seq)%'")
    await a.revoke_delegation(ALICE, "d1", grant["id"])
    await until(lambda: not readable_by_bob(b, "d1"))


async def test_a_silent_feed_fails_closed_then_catches_up(two, postgres):
    """PostgreSQL goes away: after store.feed_max_silence_seconds the process that cannot hear the
    feed refuses what rests on the store (and says so in /readyz); once PostgreSQL is back it
    catches up, including a revocation committed while it was deaf."""
    a, b = two
    await a.register_device(ALICE, {"id": "d1", "type": "T"})
    grant = await a.create_delegation(ALICE, "d1", "bob", "read")
    await until(lambda: readable_by_bob(b, "d1"))
    postgres.kill()
    try:
        await until(lambda: b.feed.failed_closed, timeout=MAX_SILENCE * 10)
        assert b.facts.device("d1") is None  # nothing that rests on the store is served
        ok, detail = readiness()
        assert not ok and "change feed silent" in detail["change feed"]
    finally:
        postgres.start()
    await until(lambda: not b.feed.failed_closed and b.facts.device("d1") is not None, timeout=20)
    assert readable_by_bob(b, "d1")
    await until(lambda: not a.feed.failed_closed, timeout=20)
    await a.revoke_delegation(ALICE, "d1", grant["id"])
    await until(lambda: not readable_by_bob(b, "d1"))
