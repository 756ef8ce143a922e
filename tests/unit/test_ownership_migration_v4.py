"""Store version 4: grantee strings become typed principals, safely.

A user name becomes a sub only where the store itself saw exactly one user with that name;
anything else stays an unresolved user name, which matches nobody (the owner sees it and grants
it again): a name since taken by someone else must not inherit the grant.
"""

from __future__ import annotations

import pytest

from ownership import migrations
from ownership import store as st
from proxy.facts import PUBLIC, Principal
from proxy.identity.model import ANONYMOUS, Identity
from proxy.policy.subjects import relation_holds
from tests.rig.ownership import STORE_KEY, open_service, ownership_config


def user(sub: str, name: str, **kw) -> Identity:
    return Identity(kind="user", sub=sub, username=name, method="token", **kw)


@pytest.fixture
def v3_store(tmp_path, monkeypatch):
    """A store at version 3 with the grantee strings of the old schema."""
    config = ownership_config(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", [s for s in migrations.MIGRATIONS if s[0] <= 3])
        m.setattr(migrations, "LATEST", 3)
        store = st.Store.open(config.resolve(config.store.path), STORE_KEY)
        c = store._conn
        assert c.execute("PRAGMA user_version").fetchone()[0] == 3
        devices = [("d-alice", "sub-alice", "alice", 1.0), ("d-bob", "sub-bob", "bob", 2.0),
                   ("d-s1", "sub-s1", "shared", 3.0), ("d-s2", "sub-s2", "shared", 4.0)]
        for device_id, sub, name, t in devices:
            c.execute("INSERT INTO devices (id, type, owner_sub, owner_username, created_at, updated_at) "
                      "VALUES (?, 'T', ?, ?, ?, ?)", (device_id, sub, name, t, t))
        grants = [("g-bob", "bob"), ("g-lab", "group:lab"), ("g-anon", "anonymous"), ("g-carol", "carol"),
                  ("g-shared", "shared"), ("g-svc", "iot-backend")]
        for grant_id, grantee in grants:
            c.execute("INSERT INTO delegations (id, device_id, grantee, permission, granted_by, granted_by_username,"
                      " created_at) VALUES (?, 'd-alice', ?, 'read', 'sub-alice', 'alice', 5.0)", (grant_id, grantee))
        store.close()
    return config


async def test_grantee_strings_become_typed_principals(v3_store):
    service = await open_service(v3_store, signed_in=False)
    try:
        version = await service._run(lambda: service._store._conn.execute("PRAGMA user_version").fetchone()[0])
        assert version >= 4
        got = {d.id: d.grantee for d in service.facts.device("d-alice").delegations}
        assert got == {
            "g-bob": Principal.user("sub-bob", "bob"),      # the store knew exactly one bob
            "g-lab": Principal.group("lab"),
            "g-anon": PUBLIC,
            "g-carol": Principal.user("", "carol"),         # never seen: unresolved
            "g-shared": Principal.user("", "shared"),       # two subs went by it: unresolved
            "g-svc": Principal.user("", "iot-backend"),     # user or service? not guessed
        }
        device = service.facts.device("d-alice")

        def holds(who: Identity) -> bool:
            return relation_holds("delegate", who, device, "read", service.now())

        assert holds(user("sub-bob", "bob"))
        assert holds(user("sub-x", "x", groups=frozenset({"lab"}))) and holds(ANONYMOUS)
        # Unresolved names match nobody, whoever signs in under them now.
        for who in (user("sub-carol", "carol"), user("sub-s1", "shared"), user("sub-s2", "shared"),
                    Identity(kind="service", sub="sub-sa", username="iot-backend", method="token")):
            assert not holds(who), who
        # The seen-users table was seeded from the store's own (sub, name) pairs.
        assert service.resolve_grantee("alice") == Principal.user("sub-alice", "alice")
        assert service.facts.subs_named("shared") == {"sub-s1", "sub-s2"}
    finally:
        await service.close()


async def test_unresolved_grants_are_shown_as_such_and_can_be_granted_again(v3_store):
    service = await open_service(v3_store, signed_in=False)
    try:
        from ownership.api import delegation_out
        shown = {d["id"]: delegation_out(d, service.now(), service.display_name(d))["to"]
                 for d in service.delegations_of("d-alice")}
        assert shown["g-carol"] == {"user": None, "username": "carol"}
        assert shown["g-bob"] == {"user": "sub-bob", "username": "bob"}
        assert shown["g-anon"] == {"public": True} and shown["g-lab"] == {"group": "lab"}
        await service.remember_user(user("sub-carol", "carol"))
        row = await service.create_delegation(user("sub-alice", "alice"), "d-alice", "carol", "read")
        assert (row["grantee_kind"], row["grantee_id"]) == ("user", "sub-carol")
    finally:
        await service.close()


async def test_the_migration_is_one_step(v3_store):
    """Version 4 applies as a whole or not at all, after version 3 and on its own."""
    step = dict(migrations.MIGRATIONS)[4]
    assert any("known_users" in sql for sql in step) and any("delegations_v4" in sql for sql in step)
    service = await open_service(v3_store, signed_in=False)
    await service.close()
    service = await open_service(v3_store, signed_in=False)  # reopening migrates nothing again
    try:
        assert len(service.delegations_of("d-alice")) == 6
    finally:
        await service.close()
