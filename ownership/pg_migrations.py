"""Versioned schema migrations of the postgres backend, applied in order at open.

``keygate_schema.version`` holds the version reached; each step runs in the same transaction as
the version bump (PostgreSQL's DDL is transactional), under an advisory lock so two gateways
starting at once do not both migrate. Append new steps; never edit an old one.

Every id and personal value is sealed (ownership/sealing.py): a table holds blind indexes
(``bytea``, HMAC of an id), the data key id and the sealed record, plus the few non-personal
columns an ordering or a constraint needs.
"""

from __future__ import annotations

from typing import Any

#: The advisory lock taken by migrations and by every write (one writer at a time across all
#: gateways: writes are rare, and commit order is then the change feed's order).
WRITE_LOCK = 0x4B475354

MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (1, (
        # salt: the KDF salt (clear); ring:<kek id>: the key ring sealed under that key-encryption key;
        # current_kid: the data key new values are sealed under; key_pepper: sealed.
        """CREATE TABLE meta (
            name  TEXT PRIMARY KEY,
            kid   INTEGER,
            value BYTEA NOT NULL
        )""",
        """CREATE TABLE devices (
            bidx  BYTEA PRIMARY KEY,
            owner BYTEA NOT NULL,
            kid   INTEGER NOT NULL,
            data  BYTEA NOT NULL
        )""",
        "CREATE INDEX devices_owner ON devices (owner)",
        """CREATE TABLE device_keys (
            bidx   BYTEA PRIMARY KEY,
            device BYTEA NOT NULL REFERENCES devices (bidx) ON DELETE CASCADE,
            slot   TEXT NOT NULL CHECK (slot IN ('k1', 'k2')),
            kid    INTEGER NOT NULL,
            data   BYTEA NOT NULL,
            UNIQUE (device, slot)
        )""",
        """CREATE TABLE delegations (
            bidx       BYTEA PRIMARY KEY,
            device     BYTEA NOT NULL REFERENCES devices (bidx) ON DELETE CASCADE,
            grantee    BYTEA NOT NULL,
            granted_by BYTEA NOT NULL,
            kid        INTEGER NOT NULL,
            data       BYTEA NOT NULL
        )""",
        "CREATE INDEX delegations_device ON delegations (device)",
        "CREATE INDEX delegations_grantee ON delegations (grantee)",
        "CREATE INDEX delegations_granted_by ON delegations (granted_by)",
        """CREATE TABLE quotas (
            bidx BYTEA PRIMARY KEY,
            kid  INTEGER NOT NULL,
            data BYTEA NOT NULL
        )""",
        """CREATE TABLE subscriptions (
            bidx  BYTEA PRIMARY KEY,
            owner BYTEA NOT NULL,
            kid   INTEGER NOT NULL,
            data  BYTEA NOT NULL
        )""",
        "CREATE INDEX subscriptions_owner ON subscriptions (owner)",
        """CREATE TABLE device_certificates (
            bidx        BYTEA PRIMARY KEY,
            device      BYTEA NOT NULL REFERENCES devices (bidx) ON DELETE CASCADE,
            fingerprint BYTEA NOT NULL UNIQUE,
            position    BIGSERIAL,
            kid         INTEGER NOT NULL,
            data        BYTEA NOT NULL
        )""",
        "CREATE INDEX device_certificates_device ON device_certificates (device)",
        """CREATE TABLE known_users (
            bidx BYTEA PRIMARY KEY,
            kid  INTEGER NOT NULL,
            data BYTEA NOT NULL
        )""",
        """CREATE TABLE pending_removals (
            id       BIGSERIAL PRIMARY KEY,
            uniq     BYTEA NOT NULL UNIQUE,
            device   BYTEA,
            attempts INTEGER NOT NULL DEFAULT 0,
            kid      INTEGER NOT NULL,
            data     BYTEA NOT NULL
        )""",
        "CREATE INDEX pending_removals_device ON pending_removals (device)",
        # The change feed: one row per committed write, its seq announced by NOTIFY keygate_changes.
        # data: the sealed list of what changed (device ids, or everything).
        """CREATE TABLE changes (
            seq  BIGSERIAL PRIMARY KEY,
            at   DOUBLE PRECISION NOT NULL,
            kid  INTEGER NOT NULL,
            data BYTEA NOT NULL
        )""",
    )),
    (2, (
        # The policy set when policies.source is store (keygate policy push): one row per push, the
        # newest in force. data: the sealed files, [[relative name, text], ...] (a rule may name a
        # user); digest: the set's hash, in the clear, for an operator to compare with /readyz.
        """CREATE TABLE policy_sets (
            version   BIGSERIAL PRIMARY KEY,
            at        DOUBLE PRECISION NOT NULL,
            digest    TEXT NOT NULL,
            kid       INTEGER NOT NULL,
            data      BYTEA NOT NULL
        )""",
    )),
]

LATEST = MIGRATIONS[-1][0]

#: The tables whose rows are sealed, for re-sealing under a new data key (``keygate store rekey``).
SEALED_TABLES = ("meta", "devices", "device_keys", "delegations", "quotas", "subscriptions",
                 "device_certificates", "known_users", "pending_removals", "changes", "policy_sets")


def migrate(conn: Any) -> int:
    """Bring the schema up to :data:`LATEST`; returns the version found at open."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS keygate_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM keygate_schema").fetchone()
        if row is None:
            conn.execute("INSERT INTO keygate_schema (version) VALUES (0)")
            found = 0
        else:
            found = int(row[0])
        if found > LATEST:
            raise RuntimeError(f"schema version {found} is newer than this keygate ({LATEST})")
        for version, statements in MIGRATIONS:
            if version <= found:
                continue
            for sql in statements:
                conn.execute(sql)
            conn.execute("UPDATE keygate_schema SET version = %s", (version,))
    return found
