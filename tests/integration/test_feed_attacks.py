"""The change feed under the attacks of issue 17's outside review: each test is one way a revoked
grant could stay in force on another gateway, or a gateway could do harm, and fails without the
check it names. Two ownership services on one real PostgreSQL stand for two gateway processes.

- A revocation committed between a catch-up's two reads (the changes, then the snapshot) is
  re-checked on open connections too, not only put into the facts.
- A write whose COMMIT is answered but the answer lost (a network blip at that instant) is read
  back by the writer's own feed: it is not "mine, applied already".
- A policy set whose read failed once after a push is read again at the next beat.
- The store going back (a restore, a lagging standby) is reloaded in full, not ignored.
- A second ``keygate store rekey`` before ``--finish`` is refused (it would leave a gateway still
  on the first key writing under a data key no other gateway holds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import threading
import time

import pytest

from ownership import cli as store_cli
from ownership.policy_store import StorePolicies, load_from_store
from ownership.service import StoreUnreachable
from proxy.errors import CommandError
from proxy.policy.language import load_dir, load_files
from tests.rig.ownership import STORE_KEY, USERS, open_service, ownership_config
from tests.rig.pg_cut import CommitAnswerLost
from tests.rig.postgres import _bin

pytestmark = pytest.mark.integration

ALICE = USERS["alice"]
ROOT_POLICIES = "policies"


def feed_config(tmp_path, dsn, key=STORE_KEY, silence=1.0):
    config = ownership_config(tmp_path, dsn=dsn, key=key)
    return dataclasses.replace(config, store=dataclasses.replace(config.store, feed_max_silence_seconds=silence))


def readable_by_bob(service, device_id):
    facts = service.facts.device(device_id)
    return facts is not None and any(d.grantee.id == "sub-bob" for d in facts.delegations)


async def two_gateways_and_a_grant(tmp_path, dsn, **feed):
    """Gateways A and B on one store, and on A alice's d1 and d2, d1 lent to bob to read (what the
    test's revocation then takes back): (a, b, the grant). The caller closes both."""
    a = await open_service(feed_config(tmp_path / "a", dsn, **feed))
    b = await open_service(feed_config(tmp_path / "b", dsn, **feed))
    try:
        await a.register_device(ALICE, {"id": "d1", "type": "T"})
        await a.register_device(ALICE, {"id": "d2", "type": "T"})
        return a, b, await a.create_delegation(ALICE, "d1", "bob", "read")
    except BaseException:
        await a.close()
        await b.close()
        raise


async def until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def dbname(dsn):
    return dsn.split("dbname=")[1].split()[0]


def backup(postgres, name, path):
    subprocess.run([_bin("pg_dump"), "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "keygate", "-Fc",
                    "-f", str(path), name], check=True)
    return path


def restore(postgres, name, path):
    """The database as the backup holds it (a restore, or a standby that lagged taking over)."""
    subprocess.run([_bin("pg_restore"), "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "keygate",
                    "--clean", "-d", name, str(path)], check=True, capture_output=True)


async def test_a_revocation_committed_during_a_catch_up_is_rechecked_on_open_connections(tmp_path, pg_dsn):
    a, b, grant = await two_gateways_and_a_grant(tmp_path, pg_dsn, silence=3.0)
    try:
        await until(lambda: readable_by_bob(b, "d1"))
        told: list[set[str] | None] = []   # what B's gateways would re-check their connections on
        b.facts.subscribe(lambda ids: told.append(None if ids is None else set(ids)))
        # Only timing is injected: B's store thread pauses right after it read the changes (a busy
        # thread or a loaded host does it alone), and A's revocation commits in that pause.
        held, release = threading.Event(), threading.Event()
        real = b._store.changes_since

        def pausing_changes_since(seq):
            out = real(seq)
            if not held.is_set():
                held.set()
                release.wait(5)
            return out

        b._store.changes_since = pausing_changes_since
        await a.update_device(ALICE, "d2", {"name": "noise"})   # any write: B starts a catch-up
        await until(held.is_set)
        await a.revoke_delegation(ALICE, "d1", grant["id"])
        release.set()
        await until(lambda: not readable_by_bob(b, "d1"))
        await until(lambda: any(t is None or "d1" in t for t in told), timeout=3.0)
    finally:
        await a.close()
        await b.close()


async def test_a_write_whose_commit_answer_is_lost_is_caught_up_by_the_writer(tmp_path, postgres, pg_dsn):
    cut = CommitAnswerLost(postgres.port, b"DELETE FROM delegations")
    a = await open_service(feed_config(tmp_path / "a", pg_dsn.replace(f"port={postgres.port}", f"port={cut.port}")))
    b = await open_service(feed_config(tmp_path / "b", pg_dsn))
    try:
        await a.register_device(ALICE, {"id": "d1", "type": "T"})
        grant = await a.create_delegation(ALICE, "d1", "bob", "read")
        await until(lambda: readable_by_bob(b, "d1"))
        cut.armed = True
        with pytest.raises(StoreUnreachable):   # the client was told to try again ...
            await a.revoke_delegation(ALICE, "d1", grant["id"])
        assert cut.cut.is_set()
        assert postgres.psql("SELECT count(*) FROM delegations", dbname(pg_dsn)).strip() == "0"  # ... it committed
        await until(lambda: not readable_by_bob(b, "d1"))
        await until(lambda: not readable_by_bob(a, "d1"), timeout=5.0)   # and A's own feed reads it back
    finally:
        await a.close()
        await b.close()
        cut.close()


async def test_a_policy_set_whose_read_failed_once_is_read_again(tmp_path, pg_dsn):
    src = load_dir(ROOT_POLICIES)
    pusher = await open_service(feed_config(tmp_path / "p", pg_dsn))
    await pusher._run(pusher._store.put_policy_set, src.texts, src.digest, time.time())
    a = await open_service(feed_config(tmp_path / "a", pg_dsn))
    policies = await load_from_store(a.config, a)
    follower = StorePolicies(policies, a)
    follower.start()
    real, failures = a.policy_set, []

    async def failing_once():
        if not failures:
            failures.append(1)
            raise StoreUnreachable("the store cannot be reached (a connection cut at that instant)")
        return await real()

    try:
        await until(lambda: a.feed is not None and a.feed.applied >= 1)
        texts = [(n, t + "\n# v2\n" if n == "devices.yaml" else t) for n, t in src.texts]
        a.policy_set = failing_once
        v2 = await pusher._run(pusher._store.put_policy_set, texts, load_files(texts, "push").digest, time.time())
        await until(lambda: bool(failures))
        await until(lambda: policies.version == v2, timeout=5.0)
    finally:
        await follower.close()
        await a.close()
        await pusher.close()


async def test_the_store_going_back_is_reloaded_in_full(tmp_path, postgres, pg_dsn):
    name = dbname(pg_dsn)
    a = await open_service(feed_config(tmp_path / "a", pg_dsn))
    b = await open_service(feed_config(tmp_path / "b", pg_dsn))
    try:
        await a.register_device(ALICE, {"id": "d1", "type": "T"})
        grant = await a.create_delegation(ALICE, "d1", "bob", "read")
        dump = backup(postgres, name, tmp_path / "backup.dump")
        for i in range(6):   # work done after the backup: B's feed moves past the backup's newest change
            await a.update_device(ALICE, "d1", {"name": f"v{i}"})
        await until(lambda: b.feed.applied >= 8)
        await a.close()
        restore(postgres, name, dump)
        said: set[str] = set()   # B's readiness, sampled: a changed history is not served before it settles

        async def sample():
            while True:
                said.add(b.feed.readiness()[1])
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        a = await open_service(feed_config(tmp_path / "a2", pg_dsn))   # a gateway started after the restore
        await a.revoke_delegation(ALICE, "d1", grant["id"])            # its number was B's already
        await until(lambda: not readable_by_bob(b, "d1"), timeout=5.0)
        sampler.cancel()
        assert any(s.startswith("the store's history changed: failing closed") for s in said), said
        newest = int(postgres.psql("SELECT max(seq) FROM changes", name).strip())
        await until(lambda: b.feed.applied == newest)   # B follows the store's numbers again, not its past
    finally:
        await a.close()
        await b.close()


def _rekey(conf, dsn, current, new):
    return store_cli.rekey(conf, None, env={"KEYGATE_STORE_KEY": current, "KEYGATE_STORE_DSN": dsn,
                                            "KEYGATE_NEW_STORE_KEY": new})


async def test_a_second_rekey_before_the_first_is_finished_is_refused(tmp_path, pg_dsn, caplog):
    running = await open_service(feed_config(tmp_path / "old", pg_dsn))   # a gateway still on the first key
    try:
        await running.register_device(ALICE, {"id": "d1", "type": "T"})
        conf = tmp_path / "proxy.yaml"
        conf.write_text("oidc: {issuer: 'https://issuer.test/realms/iot'}\n"
                        "store: {backend: postgres, dsn: '${KEYGATE_STORE_DSN}', key: '${KEYGATE_STORE_KEY}'}\n")
        assert _rekey(str(conf), pg_dsn, STORE_KEY, "K2") == 0
        assert _rekey(str(conf), pg_dsn, STORE_KEY, "K2") == 0        # run again (as after a crash): fine
        with pytest.raises(CommandError, match="a rekey is not finished"):
            _rekey(str(conf), pg_dsn, "K2", "K3")
        # Re-sealing every change is not another history: the running gateway's next beats agree.
        await asyncio.sleep(running.feed._beat * 3)
        assert "is not the one this process" not in caplog.text
        await running.register_device(ALICE, {"id": "d2", "type": "T"})   # the old gateway writes on ...
        fresh = await open_service(feed_config(tmp_path / "new", pg_dsn, key="K2"))
        try:
            await until(lambda: fresh.facts.device("d2") is not None, timeout=5.0)   # ... and the new one reads it
            assert not fresh.feed.failed_closed
        finally:
            await fresh.close()
    finally:
        await running.close()


async def test_a_gateway_that_cannot_hear_the_store_serves_no_rule_of_a_stored_policy_set(tmp_path, postgres,
                                                                                         pg_dsn):
    # policies.source: store. A push that withdraws a grant while this gateway cannot hear the store
    # would not reach it either: failing closed covers the policy set too, not the ownership facts only.
    src = load_dir(ROOT_POLICIES)
    pusher = await open_service(feed_config(tmp_path / "p", pg_dsn))
    version = await pusher._run(pusher._store.put_policy_set, src.texts, src.digest, time.time())
    await pusher.close()
    a = await open_service(feed_config(tmp_path / "a", pg_dsn))
    policies = await load_from_store(a.config, a)
    follower = StorePolicies(policies, a)
    follower.start()
    try:
        assert policies.version == version and policies.compiled.source.rules
        postgres.kill()
        try:
            await until(lambda: a.feed.failed_closed, timeout=15.0)
            assert not policies.compiled.source.rules   # nothing a rule grants is served
        finally:
            postgres.start()
        await until(lambda: not a.feed.failed_closed, timeout=20.0)
        await until(lambda: policies.version == version and bool(policies.compiled.source.rules), timeout=5.0)
        assert policies.digest == src.digest
    finally:
        await follower.close()
        await a.close()


async def test_an_own_write_during_a_catch_up_is_not_overwritten_by_its_snapshot(tmp_path, postgres, pg_dsn):
    # The catch-up's snapshot predates a write this process makes while it is read: putting the
    # snapshot in force after that write was applied would drop it, and its number (this process's
    # own) would never be read back. B's store thread pauses after reading the changes (A commits a
    # change then, so the changes are read again after the snapshot) and after the snapshot (B
    # makes its own write then).
    a = await open_service(feed_config(tmp_path / "a", pg_dsn, silence=3.0))
    b = await open_service(feed_config(tmp_path / "b", pg_dsn, silence=3.0))
    try:
        await a.register_device(ALICE, {"id": "d1", "type": "T"})
        await until(lambda: b.facts.device("d1") is not None)
        after_changes, after_snapshot, release = threading.Event(), threading.Event(), threading.Event()
        real_changes, real_snapshot = b._store.changes_since, b._store.load_all_at

        def pausing_changes_since(seq):
            out = real_changes(seq)
            if not after_changes.is_set():
                after_changes.set()
                release.wait(5)
            return out

        def pausing_load_all_at():
            out = real_snapshot()
            if after_changes.is_set() and not after_snapshot.is_set():
                after_snapshot.set()
                release.wait(5)
            return out

        b._store.changes_since, b._store.load_all_at = pausing_changes_since, pausing_load_all_at
        await a.update_device(ALICE, "d1", {"name": "foreign"})   # B starts a catch-up
        await until(after_changes.is_set)
        await a.update_device(ALICE, "d1", {"name": "between"})   # committed between B's reads
        release.set()
        await until(after_snapshot.is_set)
        release.clear()
        own = asyncio.create_task(b.register_device(ALICE, {"id": "d-own", "type": "T"}))   # B writes
        await asyncio.sleep(0.1)
        release.set()
        await own
        # From its answer on, through the catch-up and two beats of the feed, B knows its own device
        # (a snapshot put in force over it would lose it until the next beat reads it back).
        deadline = asyncio.get_running_loop().time() + 2.0
        while asyncio.get_running_loop().time() < deadline:
            assert b.facts.device("d-own") is not None
            await asyncio.sleep(0.002)
    finally:
        await a.close()
        await b.close()


async def test_a_restore_whose_new_history_passed_the_applied_number_is_still_reloaded(tmp_path, postgres, pg_dsn):
    # After a restore or a failover, new writes can take the store's numbers past what a gateway had
    # applied before its feed looks again: "fewer changes than applied" then never shows. The change
    # under the applied number is another one, and that is what is checked.
    name = dbname(pg_dsn)
    a, b, grant = await two_gateways_and_a_grant(tmp_path, pg_dsn)
    try:
        dump = backup(postgres, name, tmp_path / "backup.dump")
        for i in range(4):   # lost with the old primary
            await a.update_device(ALICE, "d2", {"name": f"v{i}"})
        newest = int(postgres.psql("SELECT max(seq) FROM changes", name).strip())
        await until(lambda: b.feed.applied == newest)
        await b.feed.close()   # B's listening connection is down during the switch
        await a.close()
        restore(postgres, name, dump)
        a = await open_service(feed_config(tmp_path / "a2", pg_dsn))
        await a.revoke_delegation(ALICE, "d1", grant["id"])   # the revocation, in the new history
        told: list[set[str] | None] = []
        b.facts.subscribe(lambda ids: told.append(None if ids is None else set(ids)))
        for i in range(4):   # B's own writes take the numbers past what it had applied
            await b.update_device(ALICE, "d2", {"name": f"w{i}"})
        assert int(postgres.psql("SELECT max(seq) FROM changes", name).strip()) > newest
        b.feed.start()   # back within feed_max_silence_seconds: B did not fail closed
        await until(lambda: not readable_by_bob(b, "d1"), timeout=5.0)
        assert None in told   # and every open connection is re-checked, d1's among them
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("feed_back", [False, True], ids=["feed-still-closed", "feed-back-already"])
async def test_a_stored_policy_set_loaded_as_the_feed_fails_closed_is_not_served(tmp_path, postgres, pg_dsn, feed_back):
    # A follow whose read was under way when the feed failed closed must not put the rules back,
    # even once the feed is back: the row it read may predate a push made while the feed was silent.
    src = load_dir(ROOT_POLICIES)
    pusher = await open_service(feed_config(tmp_path / "p", pg_dsn))
    await pusher._run(pusher._store.put_policy_set, src.texts, src.digest, time.time())
    await pusher.close()
    a = await open_service(feed_config(tmp_path / "a", pg_dsn))
    policies = await load_from_store(a.config, a)
    follower = StorePolicies(policies, a)   # not started: the one follow is the test's own
    real, reading, finish = a.policy_set, asyncio.Event(), asyncio.Event()

    async def slow_policy_set():
        row = await real()
        reading.set()
        await finish.wait()   # the feed fails closed while this read is under way
        return row

    try:
        policies.version = None   # so the next follow reads the set again
        a.policy_set = slow_policy_set
        following = asyncio.create_task(follower.follow())
        await asyncio.wait_for(reading.wait(), 5)
        follower.fail_closed()
        a.feed.failed_closed = True   # what the feed's watch sets before it tells the followers
        if feed_back:
            a.feed.failed_closed = False   # caught up again before the slow read returned
        finish.set()
        await following
        assert not policies.compiled.source.rules
    finally:
        a.feed.failed_closed = False
        await follower.close()
        await a.close()


async def test_a_change_under_one_of_its_own_numbers_after_a_restore_is_read_as_anothers(tmp_path, postgres, pg_dsn):
    # B wrote changes its feed had not reached yet; a restore takes the store back before them, and
    # A's revocation gets one of those numbers: B must not skip it as its own.
    name = dbname(pg_dsn)
    a, b, grant = await two_gateways_and_a_grant(tmp_path, pg_dsn)
    try:
        newest = int(postgres.psql("SELECT max(seq) FROM changes", name).strip())
        await until(lambda: b.feed.applied == newest and readable_by_bob(b, "d1"))
        dump = backup(postgres, name, tmp_path / "backup.dump")
        await b.feed.close()   # B's listening connection is down
        for i in range(4):     # B's own writes, lost with the old history
            await b.update_device(ALICE, "d2", {"name": f"w{i}"})
        await a.close()
        restore(postgres, name, dump)
        a = await open_service(feed_config(tmp_path / "a2", pg_dsn))
        await a.revoke_delegation(ALICE, "d1", grant["id"])   # the number B wrote first, in the new history
        told: list[set[str] | None] = []
        b.facts.subscribe(lambda ids: told.append(None if ids is None else set(ids)))
        b.feed.start()   # back within feed_max_silence_seconds
        await until(lambda: not readable_by_bob(b, "d1"), timeout=5.0)
        assert None in told   # every device re-checked: which of B's own changes are gone is not known
    finally:
        await a.close()
        await b.close()
