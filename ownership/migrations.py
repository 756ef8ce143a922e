"""Versioned schema migrations, applied in order at open.

``PRAGMA user_version`` holds the version reached. Each step runs in the same
transaction as the version bump, so a failed upgrade leaves the store at the
previous version, never in between. Append new steps; never edit an old one.
"""

from __future__ import annotations

from typing import Any

#: Marks the file as a keygate store ("KGST"), checked at open.
APPLICATION_ID = 0x4B475354

MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (1, (
        # Store-wide secrets (the device-key pepper); the whole file is encrypted.
        """CREATE TABLE meta (
            name  TEXT PRIMARY KEY,
            value BLOB NOT NULL
        )""",
        """CREATE TABLE devices (
            id             TEXT PRIMARY KEY,
            type           TEXT NOT NULL,
            name           TEXT,
            model          TEXT,
            location       TEXT,               -- JSON object
            owner_sub      TEXT NOT NULL,
            owner_username TEXT NOT NULL,
            public         INTEGER NOT NULL DEFAULT 0 CHECK (public IN (0, 1)),
            service        TEXT NOT NULL DEFAULT '',
            created_at     REAL NOT NULL,
            updated_at     REAL NOT NULL
        )""",
        "CREATE INDEX devices_owner ON devices (owner_sub)",
        """CREATE TABLE device_keys (
            device_id  TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
            slot       TEXT NOT NULL CHECK (slot IN ('k1', 'k2')),
            hash       BLOB NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (device_id, slot)
        )""",
        """CREATE TABLE delegations (
            id                  TEXT PRIMARY KEY,
            device_id           TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
            grantee             TEXT NOT NULL,
            permission          TEXT NOT NULL CHECK (permission IN ('read', 'write', 'readwrite')),
            expires_at          REAL,
            granted_by          TEXT NOT NULL,
            granted_by_username TEXT NOT NULL,
            created_at          REAL NOT NULL
        )""",
        "CREATE INDEX delegations_device ON delegations (device_id)",
        "CREATE INDEX delegations_grantee ON delegations (grantee)",
        "CREATE INDEX delegations_granted_by ON delegations (granted_by)",
        # Per-user override of the configured device quota.
        """CREATE TABLE quotas (
            sub         TEXT PRIMARY KEY,
            max_devices INTEGER NOT NULL CHECK (max_devices >= 0)
        )""",
        # NGSI subscriptions, tied to whoever created them through the gateway.
        """CREATE TABLE subscriptions (
            id             TEXT NOT NULL,
            service        TEXT NOT NULL,
            owner_sub      TEXT NOT NULL,
            owner_username TEXT NOT NULL,
            created_at     REAL NOT NULL,
            PRIMARY KEY (id, service)
        )""",
        "CREATE INDEX subscriptions_owner ON subscriptions (owner_sub)",
    )),
    (2, (
        # What re-checking a subscription needs (proxy/http/subscription_guard.py): the subject
        # entity ids checked at creation (JSON list), the creator's identity attributes that
        # policies read (JSON object; NULL for rows recorded before this step, which are not
        # re-checked), and whether it is unrestricted (an administrator's idPattern subject).
        "ALTER TABLE subscriptions ADD COLUMN entities TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE subscriptions ADD COLUMN identity TEXT",
        "ALTER TABLE subscriptions ADD COLUMN unrestricted INTEGER NOT NULL DEFAULT 0 "
        "CHECK (unrestricted IN (0, 1))",
    )),
    (3, (
        # Enrolled device certificates (ownership/enrollment.py): only a client certificate whose
        # SHA-256 fingerprint is here authenticates its device. At most two per device (rollover).
        """CREATE TABLE device_certificates (
            serial      TEXT PRIMARY KEY,   -- hex, as the certificate carries it
            device_id   TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
            fingerprint BLOB NOT NULL UNIQUE,  -- SHA-256 of the DER
            not_after   REAL NOT NULL,
            created_at  REAL NOT NULL
        )""",
        "CREATE INDEX device_certificates_device ON device_certificates (device_id)",
    )),
]

# Clean-up that a device's deletion (or its owner's erasure) still owes, written in the same
# transaction as the deletion and struck off once taken (ownership/service.py): in Orion the
# device's entity and the subscriptions on it or by the erased user; at the MQTT broker the
# device's retained messages and session. While a row names a device id, that id cannot be
# registered. Holds ids and tenants only, no personal data.
_PENDING_REMOVALS = (
    """CREATE TABLE pending_removals (
        id         INTEGER PRIMARY KEY,
        kind       TEXT NOT NULL CHECK (kind IN ('entity', 'subscription', 'broker')),
        target     TEXT NOT NULL,              -- the entity, subscription or device id
        service    TEXT NOT NULL,              -- its tenant as recorded ('' = http.fiware_service)
        device_id  TEXT NOT NULL DEFAULT '',   -- the id this blocks from registration; '' = none
        created_at REAL NOT NULL,
        attempts   INTEGER NOT NULL DEFAULT 0,
        UNIQUE (kind, target, service, device_id)
    )""",
    "CREATE INDEX pending_removals_device ON pending_removals (device_id)",
)
MIGRATIONS.append((5, _PENDING_REMOVALS))

LATEST = MIGRATIONS[-1][0]


def migrate(conn: Any) -> int:
    """Bring the schema up to :data:`LATEST`; returns the version found at open."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > LATEST:
        raise RuntimeError(f"schema version {found} is newer than this keygate ({LATEST})")
    for version, statements in MIGRATIONS:
        if version <= found:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in statements:
                conn.execute(sql)
            # PRAGMA takes no bound parameters; the values are our own integers.
            conn.execute(f"PRAGMA user_version = {int(version)}")
            if version == 1:
                conn.execute(f"PRAGMA application_id = {int(APPLICATION_ID)}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found
