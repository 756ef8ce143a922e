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
    (4, (
        # Typed principals (issue 15). Users a delegation can be given to by user name: one row per
        # sub with the latest user name seen for it (ownership/service.py learns it from every
        # authenticated caller). Seeded from the (sub, user name) pairs the store already holds,
        # each sub with the name of its newest row.
        """CREATE TABLE known_users (
            sub      TEXT PRIMARY KEY,
            username TEXT NOT NULL,
            seen_at  REAL NOT NULL
        )""",
        "CREATE INDEX known_users_username ON known_users (username)",
        """INSERT INTO known_users (sub, username, seen_at)
           SELECT sub, username, seen_at FROM (
               SELECT sub, username, seen_at,
                      row_number() OVER (PARTITION BY sub ORDER BY seen_at DESC) AS newest
               FROM (SELECT owner_sub AS sub, owner_username AS username, created_at AS seen_at FROM devices
                     UNION ALL SELECT granted_by, granted_by_username, created_at FROM delegations
                     UNION ALL SELECT owner_sub, owner_username, created_at FROM subscriptions))
           WHERE newest = 1 AND sub <> '' AND username <> ''""",
        # A delegation names a typed principal: kind plus id (a user's sub, a service's client id,
        # a group's name; '' for the public). grantee_name is a user's name, for display.
        """CREATE TABLE delegations_v4 (
            id                  TEXT PRIMARY KEY,
            device_id           TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
            grantee_kind        TEXT NOT NULL CHECK (grantee_kind IN ('user', 'service', 'group', 'public')),
            grantee_id          TEXT NOT NULL,
            grantee_name        TEXT NOT NULL DEFAULT '',
            permission          TEXT NOT NULL CHECK (permission IN ('read', 'write', 'readwrite')),
            expires_at          REAL,
            granted_by          TEXT NOT NULL,
            granted_by_username TEXT NOT NULL,
            created_at          REAL NOT NULL,
            CHECK (grantee_kind = 'user' OR grantee_name = ''),
            CHECK ((grantee_kind = 'public') = (grantee_id = '' AND grantee_kind <> 'user'))
        )""",
        # Old grantee strings: "anonymous" is the public, "group:NAME" a group, any other a user
        # name. A user name becomes the user's sub only when exactly one known user holds it; any
        # other stays unresolved (grantee_id ''), which matches nobody: a name reused by someone
        # else, or shared by the users an RFC 9068 provider's client_id made one "service", must
        # not inherit the grant. The owner sees it as unresolved and grants it again.
        """INSERT INTO delegations_v4 (id, device_id, grantee_kind, grantee_id, grantee_name, permission,
                                       expires_at, granted_by, granted_by_username, created_at)
           SELECT d.id, d.device_id,
                  CASE WHEN d.grantee = 'anonymous' THEN 'public'
                       WHEN substr(d.grantee, 1, 6) = 'group:' THEN 'group' ELSE 'user' END,
                  CASE WHEN d.grantee = 'anonymous' THEN ''
                       WHEN substr(d.grantee, 1, 6) = 'group:' THEN substr(d.grantee, 7)
                       WHEN (SELECT count(*) FROM known_users k WHERE k.username = d.grantee) = 1
                            THEN (SELECT k.sub FROM known_users k WHERE k.username = d.grantee)
                       ELSE '' END,
                  CASE WHEN d.grantee = 'anonymous' OR substr(d.grantee, 1, 6) = 'group:' THEN ''
                       ELSE d.grantee END,
                  d.permission, d.expires_at, d.granted_by, d.granted_by_username, d.created_at
           FROM delegations d""",
        "DROP TABLE delegations",
        "ALTER TABLE delegations_v4 RENAME TO delegations",
        "CREATE INDEX delegations_device ON delegations (device_id)",
        "CREATE INDEX delegations_grantee ON delegations (grantee_kind, grantee_id)",
        "CREATE INDEX delegations_granted_by ON delegations (granted_by)",
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

# The policy set when policies.source is store (keygate policy push): one row per push, the newest
# in force. files: JSON [[relative name, text], ...]; digest: the set's hash (see /readyz).
MIGRATIONS.append((6, (
    """CREATE TABLE policy_sets (
        version INTEGER PRIMARY KEY AUTOINCREMENT,
        at      REAL NOT NULL,
        digest  TEXT NOT NULL,
        files   TEXT NOT NULL
    )""",
)))

# The local change feed (keygate serve --workers N over one store file, ownership/feed.py): one row
# per committed write, in commit order (writes take the file's write lock: BEGIN IMMEDIATE), naming
# the devices it touched (NULL = everything). Other processes on the file poll max(seq) and catch up.
MIGRATIONS.append((7, (
    """CREATE TABLE changes (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,
        at      REAL NOT NULL,
        devices TEXT                      -- JSON list of device ids; NULL = every device
    )""",
)))

LATEST = MIGRATIONS[-1][0]


def migrate(conn: Any) -> int:
    """Bring the schema up to :data:`LATEST`; returns the version found at open."""
    found: int = conn.execute("PRAGMA user_version").fetchone()[0]
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
