"""What the store keeps with each NGSI subscription so it can be re-checked later
(migration 2): the subject entity ids, the creator's identity attributes, the
unrestricted flag; kept across a reopen, upgraded from a version-1 store, exported."""

from __future__ import annotations

import dataclasses

from ownership import migrations
from ownership import store as st
from proxy.identity.model import Identity, identity_from_snapshot, identity_snapshot
from tests.rig.ownership import STORE_KEY, USERS, open_service, ownership_config

ALICE = USERS["alice"]


async def test_records_survive_a_reopen_as_they_were_written(tmp_path):
    config = ownership_config(tmp_path)
    service = await open_service(config)
    await service.record_subscription("s1", ALICE, "t", entities=["d1", "d2"])
    await service.record_subscription("s2", USERS["admin"], "", unrestricted=True)
    await service.record_subscription("s3", ALICE, "")                 # an older caller: nothing to re-check
    await service.record_subscription("s4", ALICE, "", entities=["d1"])
    await service.set_subscription_subject("s4", "", entities=["d9"])  # a PATCH moved its subject
    written = sorted(service.subscription_records(), key=lambda r: r["id"])
    await service.close()
    service = await open_service(config)
    try:
        assert sorted(service.subscription_records(), key=lambda r: r["id"]) == written
        s1, s2, s3, s4 = written
        assert s1["entities"] == ("d1", "d2") and not s1["unrestricted"] and s1["service"] == "t"
        assert identity_from_snapshot(s1["identity"]) == ALICE
        assert s2["unrestricted"] and identity_from_snapshot(s2["identity"]).has_role("iot-admin")
        assert s3["identity"] is None and s3["entities"] == ()
        assert s4["entities"] == ("d9",)
        await service.forget_subscription("s1", "t")
        assert service.facts.subscription_record("s1", "t") is None
    finally:
        await service.close()


def test_snapshot_keeps_what_policies_read_and_drops_the_token_lifetime():
    device = Identity(kind="device", sub="device:d1", username="d1", method="device_key", device_id="d1",
                      owner_sub="sub-alice", owner_username="alice", expires_at=123.0,
                      claims=(("secret", "x"),), scopes=frozenset({"openid"}),
                      client_roles=frozenset({"app:reader"}))
    snap = identity_snapshot(device)
    assert "expires_at" not in snap and "claims" not in snap
    assert identity_from_snapshot(snap) == dataclasses.replace(device, expires_at=None)


def test_a_version_1_store_is_upgraded_with_its_subscriptions(tmp_path, monkeypatch):
    path = tmp_path / "s.db"
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])
    monkeypatch.setattr(migrations, "LATEST", 1)
    old = st.Store.open(path, STORE_KEY)
    old._conn.execute("INSERT INTO subscriptions (id, service, owner_sub, owner_username, created_at) "
                      "VALUES ('s1', '', 'sub-alice', 'alice', 1.0)")
    old.close()
    monkeypatch.undo()
    store = st.Store.open(path, STORE_KEY)
    try:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == migrations.LATEST >= 2
        assert store.load_all()["subscriptions"] == [
            {"id": "s1", "service": "", "owner_sub": "sub-alice", "created_at": 1.0, "entities": [],
             "identity": None, "unrestricted": False}]
    finally:
        store.close()


async def test_the_export_shows_what_is_kept(tmp_path):
    service = await open_service(ownership_config(tmp_path))
    try:
        await service.record_subscription("s1", ALICE, "", entities=["d1"])
        (sub,) = (await service.export_user_data(ALICE))["subscriptions"]
        assert sub["entities"] == ["d1"] and sub["unrestricted"] is False
        assert sub["identity"]["sub"] == "sub-alice" and sub["identity"]["groups"] == ["lab"]
        assert "owner_sub" not in sub
    finally:
        await service.close()
