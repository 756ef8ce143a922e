"""The postgres store backend on a real PostgreSQL: nothing in the clear at rest, the key check,
sealed values bound to their records, versioned migrations and rotation with gateways running.
(The backend-agnostic service tests run on it too: tests/rig/ownership.py's ``store_backend``.)"""

from __future__ import annotations

import dataclasses

import pytest

from ownership import cli as store_cli
from ownership.pg_migrations import LATEST
from ownership.pg_store import PgStore
from ownership.store import StoreError
from proxy.config import ConfigError
from tests.rig.ownership import STORE_KEY, USERS, open_service, ownership_config

pytestmark = pytest.mark.integration

ALICE = USERS["alice"]


def dbname(dsn: str) -> str:
    return dsn.split("dbname=")[1].split()[0]


def files_under(path):
    return [p for p in path.rglob("*") if p.is_file()]


async def test_the_data_directory_holds_no_plaintext(tmp_path, postgres, pg_dsn):
    """The same check as for SQLCipher (tests/unit/test_ownership_store.py), over every file of the
    cluster: the tables, the WAL, the catalogs."""
    service = await open_service(ownership_config(tmp_path, dsn=pg_dsn))
    name, place, model = "ZebraKitchenThermometer", "QuokkaStreet 221B", "WombatModelXJ9"
    _, k1, _ = await service.register_device(ALICE, {"id": "dev-plain-1", "type": "Thermometer", "name": name,
                                                     "model": model, "location": {"lat": 1, "lon": 2, "label": place}})
    await service.remember_user(dataclasses.replace(ALICE, sub="sub-PlatypusSub", username="PlatypusUser"))
    await service.create_delegation(ALICE, "dev-plain-1", "PlatypusUser", "read")
    await service.record_subscription("SubscriptionNarwhal", ALICE, "")
    await service.close()
    postgres.psql("CHECKPOINT")  # the tables' pages on disk, not only in the WAL
    needles = [s.encode() for s in (name, place, model, "PlatypusUser", "PlatypusSub", "SubscriptionNarwhal",
                                    "dev-plain-1", k1, "alice", "sub-alice")]
    files = files_under(postgres.data_dir)
    assert any("pg_wal" in str(p) for p in files)
    assert sum(p.stat().st_size for p in files) > 1_000_000  # really the cluster's files
    for p in files:
        blob = p.read_bytes()
        for needle in needles:
            assert needle not in blob, (str(p), needle)
    # ...and the rows are really there, sealed: a new service reads them back.
    service = await open_service(ownership_config(tmp_path, dsn=pg_dsn))
    assert service.get_device("dev-plain-1")["name"] == name
    await service.close()


@pytest.mark.parametrize("key", ["wrong key", STORE_KEY + " "])
async def test_a_wrong_key_fails_with_one_line_and_changes_nothing(tmp_path, postgres, pg_dsn, key):
    service = await open_service(ownership_config(tmp_path, dsn=pg_dsn))
    await service.register_device(ALICE, {"id": "d1", "type": "T"})
    await service.close()
    before = postgres.psql("SELECT name, md5(value) FROM meta ORDER BY name", dbname(pg_dsn))
    with pytest.raises(ConfigError) as err:
        await open_service(ownership_config(tmp_path, key=key, dsn=pg_dsn))
    assert str(err.value) == "store postgres: wrong key or not a keygate store"
    assert postgres.psql("SELECT name, md5(value) FROM meta ORDER BY name", dbname(pg_dsn)) == before
    service = await open_service(ownership_config(tmp_path, dsn=pg_dsn))
    assert service.facts.device("d1") is not None
    await service.close()


async def test_an_unreachable_database_is_one_line_without_the_dsn(tmp_path, postgres):
    dsn = f"host=127.0.0.1 port={postgres.port + 1 if postgres.port < 65535 else 1} dbname=x user=secretuser"
    with pytest.raises(ConfigError) as err:
        await open_service(dataclasses.replace(
            ownership_config(tmp_path, dsn=dsn),
        ))
    assert "secretuser" not in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("store postgres:")


async def test_a_sealed_value_moved_to_another_record_does_not_open(tmp_path, postgres, pg_dsn):
    """The attack: someone with write access to the database (not the key) copies the sealed row of
    a device they own over a device they want, to take it over. The record's index is the sealed
    value's associated data, so the copy does not open, and the store refuses to start on it."""
    service = await open_service(ownership_config(tmp_path, dsn=pg_dsn))
    await service.register_device(ALICE, {"id": "victim", "type": "T"})
    await service.register_device(USERS["bob"], {"id": "mallory", "type": "T"})
    await service.close()
    db = dbname(pg_dsn)
    # Which row is which is unknown to the attacker too; either copy onto the other is the attack.
    postgres.psql("UPDATE devices SET data = (SELECT data FROM devices ORDER BY bidx LIMIT 1), "
                  "kid = (SELECT kid FROM devices ORDER BY bidx LIMIT 1) "
                  "WHERE bidx = (SELECT bidx FROM devices ORDER BY bidx DESC LIMIT 1)", db)
    with pytest.raises(ConfigError, match="does not open"):
        await open_service(ownership_config(tmp_path, dsn=pg_dsn))


def test_open_sets_the_schema_version_and_a_newer_one_is_refused(postgres, pg_dsn):
    store = PgStore.open(pg_dsn, STORE_KEY)
    store.close()
    db = dbname(pg_dsn)
    assert postgres.psql("SELECT version FROM keygate_schema", db).strip() == str(LATEST)
    postgres.psql(f"UPDATE keygate_schema SET version = {LATEST + 1}", db)
    with pytest.raises(StoreError, match="newer than this keygate"):
        PgStore.open(pg_dsn, STORE_KEY)


def test_a_failing_migration_leaves_the_previous_version(postgres, pg_dsn, monkeypatch):
    from ownership import pg_migrations
    PgStore.open(pg_dsn, STORE_KEY).close()
    broken = (LATEST + 1, ("CREATE TABLE extra (x int)", "THIS IS NOT SQL"))
    monkeypatch.setattr(pg_migrations, "MIGRATIONS", [*pg_migrations.MIGRATIONS, broken])
    monkeypatch.setattr(pg_migrations, "LATEST", LATEST + 1)
    with pytest.raises(StoreError):
        PgStore.open(pg_dsn, STORE_KEY)
    monkeypatch.undo()
    db = dbname(pg_dsn)
    assert postgres.psql("SELECT version FROM keygate_schema", db).strip() == str(LATEST)
    assert postgres.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'extra'", db).strip() == "0"


# ---------------------------------------------------------------- keygate store rekey, gateways running


def write_config(tmp_path):
    (tmp_path / "proxy.yaml").write_text(
        "oidc: {issuer: 'https://issuer.test/realms/iot'}\n"
        "store: {backend: postgres, dsn: '${KEYGATE_STORE_DSN}', key: '${KEYGATE_STORE_KEY}'}\n")
    return str(tmp_path / "proxy.yaml")


async def test_rekey_rotates_the_data_key_while_a_gateway_runs(tmp_path, postgres, pg_dsn, capsys):
    running = await open_service(ownership_config(tmp_path, dsn=pg_dsn))
    _, k1, _ = await running.register_device(ALICE, {"id": "d1", "type": "T", "name": "before"})
    await running.create_delegation(ALICE, "d1", "bob", "read")
    db = dbname(pg_dsn)
    assert set(postgres.psql("SELECT DISTINCT kid FROM devices", db).split()) == {"1"}
    env = {"KEYGATE_STORE_KEY": STORE_KEY, "KEYGATE_STORE_DSN": pg_dsn, "KEYGATE_NEW_STORE_KEY": "a new key"}
    assert store_cli.rekey(write_config(tmp_path), None, env=env) == 0
    assert "re-sealed under a new data key" in capsys.readouterr().out
    # Every sealed value moved to the new data key; the old one is gone from the ring.
    for table in ("devices", "device_keys", "delegations", "known_users", "changes"):
        assert set(postgres.psql(f"SELECT DISTINCT kid FROM {table}", db).split()) == {"2"}, table
    # The gateway started with the old key goes on: it reads the re-sealed rows and writes new ones.
    assert (await running.load_device("d1"))["name"] == "before"
    await running.update_device(ALICE, "d1", {"name": "after"})
    await running.register_device(ALICE, {"id": "d2", "type": "T"})
    assert set(postgres.psql("SELECT DISTINCT kid FROM devices", db).split()) == {"2"}
    await running.close()
    # A gateway started with the new key sees it all.
    fresh = await open_service(ownership_config(tmp_path, key="a new key", dsn=pg_dsn))
    assert fresh.get_device("d1")["name"] == "after" and fresh.get_device("d2") is not None
    assert (await fresh.authenticate_device_key("d1", k1)).device_id == "d1"
    await fresh.close()
    # --finish (with the new key as store.key): the old key opens nothing any more.
    env_new = {"KEYGATE_STORE_KEY": "a new key", "KEYGATE_STORE_DSN": pg_dsn}
    assert store_cli.rekey(write_config(tmp_path), None, env=env_new, finish=True) == 0
    with pytest.raises(ConfigError, match="wrong key"):
        await open_service(ownership_config(tmp_path, dsn=pg_dsn))
    await (await open_service(ownership_config(tmp_path, key="a new key", dsn=pg_dsn))).close()


# ---------------------------------------------------------------- keygate check


def test_check_reports_the_postgres_store(tmp_path, pg_dsn, monkeypatch):
    from proxy.check import check_store
    from proxy.config import load_config
    path = write_config(tmp_path)
    env = {"KEYGATE_STORE_KEY": STORE_KEY, "KEYGATE_STORE_DSN": pg_dsn}
    first = check_store(load_config(path, env=env))
    assert first.status == "warn" and "no keygate store there yet" in first.detail
    PgStore.open(pg_dsn, STORE_KEY).close()
    done = check_store(load_config(path, env=env))
    assert done.status == "ok" and f"schema version {LATEST}" in done.detail
    wrong = check_store(load_config(path, env={**env, "KEYGATE_STORE_KEY": "wrong"}))
    assert wrong.status == "fail" and wrong.detail == "store postgres: wrong key or not a keygate store"
