"""The SQLCipher store: encryption at rest, the key check at open, atomic writes,
migrations and rekey."""

from __future__ import annotations

import dataclasses
import os

import pytest

from ownership import cli as store_cli
from ownership import store as st
from ownership.migrations import APPLICATION_ID, LATEST
from proxy.cli import main as keygate_main
from proxy.config import ConfigError
from proxy.errors import CommandError
from proxy.facts import Principal
from tests.rig.ownership import STORE_KEY, USERS, open_service, ownership_config

ALICE = USERS["alice"]


def store_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "data").iterdir())


async def test_the_files_hold_no_plaintext(tmp_path):
    config = ownership_config(tmp_path)
    service = await open_service(config)
    name, place, model = "ZebraKitchenThermometer", "QuokkaStreet 221B", "WombatModelXJ9"
    await service.register_device(ALICE, {"id": "dev-plain-1", "type": "Thermometer", "name": name,
                                          "model": model, "location": {"lat": 1, "lon": 2, "label": place}})
    await service.remember_user(dataclasses.replace(ALICE, sub="sub-PlatypusSub", username="PlatypusUser"))
    await service.create_delegation(ALICE, "dev-plain-1", "PlatypusUser", "read")
    await service.record_subscription("SubscriptionNarwhal", ALICE, "")
    # Look while open too: the WAL holds the latest pages before a checkpoint.
    files = [p for p in (tmp_path / "data").iterdir()]
    assert any(p.name.endswith("-wal") for p in files)
    needles = [s.encode() for s in (name, place, model, "PlatypusUser", "PlatypusSub", "SubscriptionNarwhal",
                                    "dev-plain-1",
                                    "alice", "sub-alice", "CREATE TABLE", "SQLite format")]
    for p in files:
        blob = p.read_bytes()
        for needle in needles:
            assert needle not in blob, (p.name, needle)
    await service.close()
    for p in (tmp_path / "data").iterdir():
        blob = p.read_bytes()
        for needle in needles:
            assert needle not in blob, (p.name, needle)


@pytest.mark.parametrize("key", ["wrong key", "correct horse battery stapl", STORE_KEY + " "])
async def test_wrong_key_fails_with_one_line_and_creates_nothing(tmp_path, key):
    service = await open_service(ownership_config(tmp_path))
    await service.register_device(ALICE, {"id": "d1", "type": "T"})
    await service.close()
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    with pytest.raises(ConfigError) as err:
        await open_service(ownership_config(tmp_path, key=key))
    assert str(err.value) == "store data/ownership.db: wrong key or not a keygate store"
    assert "\n" not in str(err.value)
    after = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    assert after == before
    # The right key still opens the untouched store.
    service = await open_service(ownership_config(tmp_path))
    assert service.facts.device("d1") is not None
    await service.close()


async def test_missing_key_fails_cleanly(tmp_path):
    with pytest.raises(ConfigError) as err:
        await open_service(ownership_config(tmp_path, key=""))
    assert "no key configured" in str(err.value)
    assert not (tmp_path / "data").exists()


async def test_key_file_is_read(tmp_path):
    import dataclasses
    (tmp_path / "store.key").write_text("from a file\n")
    base = ownership_config(tmp_path)
    config = dataclasses.replace(base, store=dataclasses.replace(base.store, key="", key_file="store.key"))
    service = await open_service(config)
    await service.close()
    with pytest.raises(ConfigError):
        await open_service(ownership_config(tmp_path, key="another"))
    service = await open_service(ownership_config(tmp_path, key="from a file"))
    await service.close()


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", b"SQLite format 3\x00" + b"\x00" * 200])
async def test_a_file_that_is_not_a_store_is_refused(tmp_path, content):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ownership.db").write_bytes(content)
    with pytest.raises(ConfigError) as err:
        await open_service(ownership_config(tmp_path))
    assert str(err.value) == "store data/ownership.db: wrong key or not a keygate store"
    assert store_files(tmp_path) == ["ownership.db"]
    assert (tmp_path / "data" / "ownership.db").read_bytes() == content


def test_a_plain_sqlite_file_with_other_tables_is_refused(tmp_path):
    import sqlite3
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE t (x)")
    with pytest.raises(st.StoreError):
        st.Store.open(path, STORE_KEY)


def test_an_sqlcipher_file_of_another_application_is_refused(tmp_path):
    from sqlcipher3 import dbapi2 as sqlite
    path = tmp_path / "other.db"
    salt = bytes(range(16))
    c = sqlite.connect(str(path))
    c.execute(st._key_pragma("key", st.derive_key(STORE_KEY, salt), salt))  # the right key, another app
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    with pytest.raises(st.StoreError, match="wrong key or not a keygate store"):
        st.Store.open(path, STORE_KEY)


def test_open_sets_the_schema_version_and_application_id(tmp_path):
    store = st.Store.open(tmp_path / "s.db", STORE_KEY)
    try:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == LATEST
        assert store._conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "s.db"
    key = STORE_KEY
    store = st.Store.open(path, key)
    store._conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    store.close()
    with pytest.raises(st.StoreError, match="newer than this keygate"):
        st.Store.open(path, key)


def test_a_failing_migration_leaves_the_previous_version(tmp_path, monkeypatch):
    from ownership import migrations
    path = tmp_path / "s.db"
    key = STORE_KEY
    st.Store.open(path, key).close()
    broken = (LATEST + 1, ("CREATE TABLE extra (x)", "THIS IS NOT SQL"))
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, broken])
    monkeypatch.setattr(migrations, "LATEST", LATEST + 1)
    with pytest.raises(st.StoreError, match="schema migration failed"):
        st.Store.open(path, key)
    monkeypatch.undo()
    store = st.Store.open(path, key)
    try:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == LATEST
        assert store._conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'extra'").fetchone()[0] == 0
    finally:
        store.close()


def test_key_pragma_refuses_anything_but_hex():
    salt = b"s" * 16
    with pytest.raises(ValueError):
        st._key_pragma("key", "x'; DROP TABLE devices; --" + "0" * 40, salt)
    with pytest.raises(ValueError):
        st._key_pragma("key", "0" * 64, b"short")
    assert st.derive_key("a", salt) == st.derive_key("a", salt) != st.derive_key("b", salt)
    assert len(st.derive_key("'\"; PRAGMA x", salt)) == 64


def test_each_store_has_its_own_salt(tmp_path):
    """The same passphrase yields a different key per store: no precomputed guesses carry over."""
    a, b = st.Store.open(tmp_path / "a.db", STORE_KEY), st.Store.open(tmp_path / "b.db", STORE_KEY)
    a.close()
    b.close()
    salt_a, salt_b = ((tmp_path / n).read_bytes()[:16] for n in ("a.db", "b.db"))
    assert salt_a != salt_b
    assert st.derive_key(STORE_KEY, salt_a) != st.derive_key(STORE_KEY, salt_b)
    # The salt survives a rekey; the new passphrase opens it, the old one does not.
    store = st.Store.open(tmp_path / "a.db", STORE_KEY)
    store.rekey("new passphrase")
    store.close()
    assert (tmp_path / "a.db").read_bytes()[:16] == salt_a
    st.Store.open(tmp_path / "a.db", "new passphrase").close()
    with pytest.raises(st.StoreError):
        st.Store.open(tmp_path / "a.db", STORE_KEY)


async def test_a_failure_in_the_middle_of_registration_leaves_nothing(tmp_path, monkeypatch):
    service = await open_service(ownership_config(tmp_path))
    calls = []

    def insert_keys_then_fail(self, c, device_id, hashes, now):
        # The device row is already in; the first key goes in; then the "crash".
        c.execute("INSERT INTO device_keys (device_id, slot, hash, created_at) VALUES (?, 'k1', ?, ?)",
                  (device_id, b"h" * 32, now))
        calls.append(device_id)
        raise OSError("disk went away")

    monkeypatch.setattr(st.Store, "_insert_keys", insert_keys_then_fail)
    gen = service.facts.generation
    with pytest.raises(OSError):
        await service.register_device(ALICE, {"id": "half", "type": "T"})
    assert calls == ["half"]
    monkeypatch.undo()
    assert service.facts.device("half") is None and service.facts.generation == gen
    assert await service.load_device("half") is None
    counts = await service._run(lambda: [service._store._conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                                         for t in ("devices", "device_keys")])
    assert counts == [0, 0]
    # The same id registers cleanly afterwards.
    await service.register_device(ALICE, {"id": "half", "type": "T"})
    await service.close()


async def test_erasure_is_one_transaction(tmp_path, monkeypatch):
    service = await open_service(ownership_config(tmp_path))
    await service.register_device(ALICE, {"id": "d1", "type": "T"})
    await service.record_subscription("s1", ALICE, "")
    real_transaction = st.Store.transaction

    import contextlib

    @contextlib.contextmanager
    def failing_transaction(self):
        with real_transaction(self) as c:
            class Conn:
                def execute(self, sql, *args):
                    if sql.startswith("DELETE FROM subscriptions"):
                        raise OSError("crash during erase")
                    return c.execute(sql, *args)
            yield Conn()

    monkeypatch.setattr(st.Store, "transaction", failing_transaction)
    with pytest.raises(OSError):
        await service.erase_user_data(ALICE)
    monkeypatch.undo()
    assert await service.load_device("d1") is not None
    assert service.facts.device("d1") is not None
    assert service.subscription_owner("s1", "") == "sub-alice"
    await service.close()


async def test_reopen_restores_the_read_path(tmp_path, store_backend):
    config = ownership_config(tmp_path, dsn=store_backend)
    service = await open_service(config)
    _, k1, _ = await service.register_device(ALICE, {"id": "d1", "type": "T", "public": True})
    await service.create_delegation(ALICE, "d1", "bob", "write")
    await service.record_subscription("s1", ALICE, "tenant")
    await service.close()
    service = await open_service(config)
    facts = service.facts.device("d1")
    assert facts.public and facts.owner_username == "alice"
    assert facts.delegations[0].grantee == Principal.user("sub-bob", "bob")
    assert (await service.authenticate_device_key("d1", k1)).owner_sub == "sub-alice"
    assert service.subscription_owner("s1", "tenant") == "sub-alice"
    assert service.subscriptions_of("sub-alice", "tenant") == {"s1"}
    await service.forget_subscription("s1", "tenant")
    assert service.subscription_owner("s1", "tenant") is None
    await service.close()


# ---------------------------------------------------------------- keygate store rekey


def write_config(tmp_path):
    (tmp_path / "proxy.yaml").write_text(
        "oidc: {issuer: 'https://issuer.test/realms/iot'}\n"
        "store: {path: data/ownership.db, key: '${KEYGATE_STORE_KEY}'}\n")
    return str(tmp_path / "proxy.yaml")


async def test_rekey_from_env_then_only_the_new_key_opens(tmp_path, monkeypatch, capsys):
    service = await open_service(ownership_config(tmp_path))
    _, k1, _ = await service.register_device(ALICE, {"id": "d1", "type": "T"})
    await service.close()
    path = write_config(tmp_path)
    monkeypatch.setenv("KEYGATE_STORE_KEY", STORE_KEY)
    monkeypatch.setenv("KEYGATE_NEW_STORE_KEY", "a brand new key")
    assert keygate_main(["store", "rekey", "-c", path]) == 0
    assert "re-encrypted" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="wrong key"):
        await open_service(ownership_config(tmp_path))
    service = await open_service(ownership_config(tmp_path, key="a brand new key"))
    assert (await service.authenticate_device_key("d1", k1)).device_id == "d1"
    await service.close()
    assert store_files(tmp_path) == ["ownership.db"]


async def test_rekey_from_file(tmp_path, monkeypatch):
    service = await open_service(ownership_config(tmp_path))
    await service.close()
    (tmp_path / "new.key").write_text("filed key\n")
    rc = store_cli.rekey(write_config(tmp_path), str(tmp_path / "new.key"), env={"KEYGATE_STORE_KEY": STORE_KEY})
    assert rc == 0
    service = await open_service(ownership_config(tmp_path, key="filed key"))
    await service.close()


async def test_rekey_refusals_are_one_line(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path)
    env = {"KEYGATE_STORE_KEY": STORE_KEY, "KEYGATE_NEW_STORE_KEY": "new"}
    with pytest.raises(CommandError, match="no such file"):
        store_cli.rekey(path, None, env=env)
    service = await open_service(ownership_config(tmp_path))
    await service.close()
    with pytest.raises(CommandError, match="no new key"):
        store_cli.rekey(path, None, env={"KEYGATE_STORE_KEY": STORE_KEY})
    with pytest.raises(CommandError, match="is the current key"):
        store_cli.rekey(path, None, env={"KEYGATE_STORE_KEY": STORE_KEY, "KEYGATE_NEW_STORE_KEY": STORE_KEY})
    with pytest.raises(CommandError, match="cannot read the new key"):
        store_cli.rekey(path, str(tmp_path / "missing.key"), env=env)
    with pytest.raises(CommandError, match="wrong key or not a keygate store"):
        store_cli.rekey(path, None, env={"KEYGATE_STORE_KEY": "bad", "KEYGATE_NEW_STORE_KEY": "new"})
    monkeypatch.setenv("KEYGATE_STORE_KEY", "bad")
    monkeypatch.setenv("KEYGATE_NEW_STORE_KEY", "new")
    assert keygate_main(["store", "rekey", "-c", path]) == 1
    err = capsys.readouterr().err
    assert err == "keygate: store data/ownership.db: wrong key or not a keygate store\n"
    assert keygate_main(["store"]) == 1
    # The new key is never an option: a key on the command line is a usage error.
    with pytest.raises(SystemExit):
        keygate_main(["store", "rekey", "-c", path, "--new-key", "x"])
    assert os.path.exists(tmp_path / "data" / "ownership.db")


async def test_rekey_while_the_store_is_busy_is_one_line(tmp_path):
    service = await open_service(ownership_config(tmp_path))
    await service.register_device(ALICE, {"id": "d1", "type": "T"})
    # Another process holds a write transaction (as a running gateway would mid-write).
    from sqlcipher3 import dbapi2 as sqlite
    salt = (tmp_path / "data" / "ownership.db").read_bytes()[:16]
    other = sqlite.connect(str(tmp_path / "data" / "ownership.db"), isolation_level=None, timeout=0.1)
    other.execute(st._key_pragma("key", st.derive_key(STORE_KEY, salt), salt))
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(CommandError, match="cannot rekey"):
            store_cli.rekey(write_config(tmp_path), None,
                            env={"KEYGATE_STORE_KEY": STORE_KEY, "KEYGATE_NEW_STORE_KEY": "new"})
    finally:
        other.execute("ROLLBACK")
        other.close()
    await service.close()
    service = await open_service(ownership_config(tmp_path))  # still under the old key, intact
    assert service.facts.device("d1") is not None
    await service.close()


async def test_rekey_wrong_key_prints_exactly_one_line(tmp_path):
    import subprocess
    import sys
    service = await open_service(ownership_config(tmp_path))
    await service.close()
    path = write_config(tmp_path)
    env = {**os.environ, "KEYGATE_STORE_KEY": "bad", "KEYGATE_NEW_STORE_KEY": "new"}
    done = subprocess.run([sys.executable, "-m", "proxy", "store", "rekey", "-c", path], env=env,
                          capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert done.returncode == 1
    assert done.stderr == "keygate: store data/ownership.db: wrong key or not a keygate store\n"
    assert done.stdout == ""
