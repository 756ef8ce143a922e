"""The SQLCipher store: blocking, synchronous, one connection.

Everything here runs on the service's single store thread (see
``ownership/service.py``); nothing here knows about asyncio. Each public
method that changes more than one row is one transaction, so an error half
way (or a crash) leaves nothing behind.

The configured passphrase never reaches SQL: it is stretched with scrypt,
salted with the store file's own random salt (SQLCipher keeps it in the
file's first 16 bytes), into a 256-bit raw key, and only that key's hex form
(our own output, so safe in a PRAGMA, which takes no bound parameters) is
handed to SQLCipher. A per-file salt means no table of passphrase guesses
serves against more than one store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlcipher3 import dbapi2 as sqlite

from ownership.migrations import APPLICATION_ID, migrate
from ownership.own_changes import OwnChanges

#: Pushed policy sets kept besides the one in force (older ones are deleted at each push).
POLICY_SETS_KEPT = 10

_KDF_LABEL = b"keygate/ownership-store/v1/"  # domain separation from any other use of the passphrase
SALT_BYTES = 16  # SQLCipher's file salt



def _read_salt(path: Path, label: str, failure: str) -> bytes:
    """The salt an existing store file begins with (its first SALT_BYTES, stored in the clear)."""
    try:
        with open(path, "rb") as f:
            salt = f.read(SALT_BYTES)
    except OSError as exc:
        raise StoreError(f"store {label}: cannot read: {exc.strerror}") from None
    if len(salt) != SALT_BYTES:
        raise StoreError(failure)
    return salt


def _unlock(conn: Any, key_pragma: str, failure: str) -> int:
    """Apply the key and read page 1: the store's application id, or StoreError(failure) when
    the key is wrong or the file is not a database (open and inspect share this)."""
    # SQLCipher writes its own diagnostics to stderr; we report failures as one line.
    conn.execute("PRAGMA cipher_log_level = NONE")
    conn.execute(key_pragma)
    try:
        # The first read decrypts page 1: this is where a wrong key shows.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return int(conn.execute("PRAGMA application_id").fetchone()[0])
    except sqlite.DatabaseError:
        raise StoreError(failure) from None

class StoreError(Exception):
    """A problem with the store file, phrased as the one line to print."""


class StoreUnavailable(Exception):
    """The database cannot be reached just now (postgres backend): nothing was written."""


class DeviceExists(Exception):
    pass


class DeviceBeingRemoved(Exception):
    """Clean-up in Orion for an earlier registration of this id is still owed."""


class NotFound(Exception):
    pass


class QuotaExceeded(Exception):
    def __init__(self, limit: int):
        super().__init__(f"device quota of {limit} reached")
        self.limit = limit


def derive_key(passphrase: str, salt: bytes) -> str:
    """The hex raw key for a passphrase (any non-empty string) and a store's salt."""
    raw = hashlib.scrypt(passphrase.encode("utf-8", "surrogatepass"), salt=_KDF_LABEL + salt,
                         n=2 ** 14, r=8, p=1, dklen=32)
    return raw.hex()


def _key_pragma(verb: str, hex_key: str, salt: bytes) -> str:
    """``x'<key><salt>'``: SQLCipher's raw key with an explicit salt (no KDF of its own)."""
    blob = hex_key + salt.hex()
    # Only ever our own hex digits; checked so no other text can slip in.
    if len(blob) != 96 or any(c not in "0123456789abcdef" for c in blob):
        raise ValueError("raw store key must be 64 hex digits and the salt 16 bytes")
    return f"PRAGMA {verb} = \"x'{blob}'\""


class Store:
    """One open, keyed, migrated SQLCipher database."""

    backend = "sqlcipher"

    def __init__(self, conn: Any, path: Path, salt: bytes):
        self._conn = conn
        self.path = path
        self._salt = salt
        # Changes this process made (and so holds in its facts), until its feed has passed them.
        self._own = OwnChanges()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path, passphrase: str, *, label: str | None = None, busy_timeout: float = 5.0) -> Store:
        """Open (or, only when no file exists, create) the store at ``path``.

        A wrong key, or a file that is not a keygate store, raises StoreError
        with one line; no file is created beside an existing one.
        """
        label = label or str(path)
        failure = f"store {label}: wrong key or not a keygate store"
        exists = path.exists()
        if exists and not path.is_file():
            raise StoreError(f"store {label}: not a file")
        if exists:
            salt = _read_salt(path, label, failure)
        else:
            salt = secrets.token_bytes(SALT_BYTES)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"store {label}: cannot create folder: {exc.strerror}") from None
        key_pragma = _key_pragma("key", derive_key(passphrase, salt), salt)
        # mode=rw: an existing store is never silently replaced by a new one.
        uri = f"file:{quote(str(path.resolve()))}?mode={'rw' if exists else 'rwc'}"
        try:
            conn = sqlite.connect(uri, uri=True, isolation_level=None, timeout=busy_timeout)
        except sqlite.Error as exc:
            raise StoreError(f"store {label}: cannot open: {exc}") from None
        try:
            app_id = _unlock(conn, key_pragma, failure)
            if exists and app_id != APPLICATION_ID:  # also an empty file: never adopt it silently
                raise StoreError(failure)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA secure_delete = ON")   # erased rows are overwritten, not just unlinked
            conn.execute("PRAGMA temp_store = MEMORY")  # no plaintext temp files
            # A key is shown once: its commit must survive a power cut (writes are rare, fsync is cheap here).
            conn.execute("PRAGMA synchronous = FULL")
            try:
                migrate(conn)
            except RuntimeError as exc:
                raise StoreError(f"store {label}: {exc}") from None
            except sqlite.Error as exc:
                raise StoreError(f"store {label}: schema migration failed: {exc}") from None
            store = cls(conn, path, salt)
            store._ensure_pepper()
            return store
        except sqlite.OperationalError as exc:  # e.g. "database is locked" by another writer
            conn.close()
            raise StoreError(f"store {label}: {exc}") from None
        except BaseException:
            conn.close()
            raise

    @classmethod
    def inspect(cls, path: Path, passphrase: str, *, label: str | None = None) -> int:
        """The schema version of the existing store at ``path``, opened read-only with the key
        (``keygate check``): nothing is created or migrated. StoreError (one line) as :meth:`open`."""
        label = label or str(path)
        failure = f"store {label}: wrong key or not a keygate store"
        if not path.is_file():
            raise StoreError(f"store {label}: no such file" if not path.exists() else f"store {label}: not a file")
        salt = _read_salt(path, label, failure)
        key_pragma = _key_pragma("key", derive_key(passphrase, salt), salt)
        try:
            conn = sqlite.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, isolation_level=None,
                                  timeout=1.0)
        except sqlite.Error as exc:
            raise StoreError(f"store {label}: cannot open: {exc}") from None
        try:
            if _unlock(conn, key_pragma, failure) != APPLICATION_ID:
                raise StoreError(failure)
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(sqlite.Error):
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def rekey(self, new_passphrase: str) -> None:
        """Re-encrypt every page under a key derived from a new passphrase (same file salt)."""
        pragma = _key_pragma("rekey", derive_key(new_passphrase, self._salt), self._salt)
        # Rekeying rewrites the main file; fold the WAL in first and rekey outside WAL.
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.execute("PRAGMA journal_mode = DELETE")
        self._conn.execute(pragma)
        self._conn.execute("PRAGMA journal_mode = WAL")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        self._conn.execute("BEGIN IMMEDIATE")
        self._own.abandoned()
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            # Not committed (or, from a failed COMMIT, not known to be): its changes are no one's own,
            # and the write lock is not kept.
            self._own.abandoned()
            with contextlib.suppress(Exception):
                self._conn.execute("ROLLBACK")
            raise
        self._own.committed()

    def _ensure_pepper(self) -> None:
        if self._conn.execute("SELECT 1 FROM meta WHERE name = 'key_pepper'").fetchone():
            return
        with self.transaction() as c:
            row = c.execute("SELECT value FROM meta WHERE name = 'key_pepper'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta (name, value) VALUES ('key_pepper', ?)", (secrets.token_bytes(32),))

    def pepper(self) -> bytes:
        return bytes(self._conn.execute("SELECT value FROM meta WHERE name = 'key_pepper'").fetchone()[0])

    # ------------------------------------------------------------------ the change feed

    def _changed(self, c: Any, devices: set[str] | None) -> None:
        """Append to the change table, in the write's own transaction (ownership/feed.py)."""
        at = time.time()
        cur = c.execute("INSERT INTO changes (at, devices) VALUES (?, ?)",
                        (at, None if devices is None else json.dumps(sorted(devices))))
        self._own.numbered(int(cur.lastrowid), at)

    def last_change(self) -> int:
        return int(self._conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])

    def change_mark(self, seq: int) -> Any:
        """What identifies change ``seq`` in this history (None if there is none): a restored file
        may hold another change under the same number (ownership/feed.py)."""
        row = self._conn.execute("SELECT at FROM changes WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else float(row[0])

    def forget_own(self) -> None:
        self._own.forget()

    def changes_since(self, seq: int) -> tuple[int, set[str] | None, bool]:
        """(the newest seq, the device ids changed after ``seq`` or None for everything, whether any
        of those changes was made by another process: this one's own are in its facts already)."""
        rows = self._conn.execute("SELECT seq, at, devices FROM changes WHERE seq > ? ORDER BY seq",
                                  (seq,)).fetchall()
        return self._own.fold(seq, ((int(n), float(at), devices) for n, at, devices in rows),
                              lambda devices: None if devices is None else json.loads(devices))

    def load_all_at(self) -> tuple[int, dict[str, list[dict[str, Any]]]]:
        """The snapshot and the last change it includes (one transaction: nothing falls between)."""
        self._conn.execute("BEGIN")  # a read transaction: one WAL snapshot, no write lock
        try:
            return self.last_change(), self._snapshot(self._conn)
        finally:
            self._conn.execute("COMMIT")

    # ------------------------------------------------------------------ reads

    def load_all(self) -> dict[str, list[dict[str, Any]]]:
        """Every row the in-memory read path needs, read in one snapshot."""
        with self.transaction() as c:
            return self._snapshot(c)

    @staticmethod
    def _snapshot(c: Any) -> dict[str, list[dict[str, Any]]]:
        return {
            "devices": [_device(r) for r in c.execute(_DEVICE_SELECT)],
            "keys": [{"device_id": r[0], "slot": r[1], "hash": bytes(r[2])}
                     for r in c.execute("SELECT device_id, slot, hash FROM device_keys")],
            "delegations": [_delegation(r) for r in c.execute(_DELEGATION_SELECT)],
            "subscriptions": [_subscription(r) for r in c.execute(_SUBSCRIPTION_SELECT)],
            "certificates": [_certificate(r) for r in c.execute(_CERTIFICATE_SELECT)],
            "known_users": [{"sub": r[0], "username": r[1], "seen_at": r[2]}
                            for r in c.execute("SELECT sub, username, seen_at FROM known_users")],
        }

    def get_device(self, device_id: str) -> dict[str, Any] | None:
        """One device with its delegations, straight from the database (uncached)."""
        row = self._conn.execute(_DEVICE_SELECT + " WHERE id = ?", (device_id,)).fetchone()
        if row is None:
            return None
        device = _device(row)
        device["delegations"] = [_delegation(r) for r in self._conn.execute(
            _DELEGATION_SELECT + " WHERE device_id = ? ORDER BY created_at, id", (device_id,))]
        return device

    def export_user(self, sub: str) -> dict[str, Any]:
        """Every row about the user ``sub``: selected by sub only, never by a user name (which
        another user, or a word such as "anonymous", may share)."""
        with self.transaction() as c:
            devices = [_device(r) for r in c.execute(_DEVICE_SELECT + " WHERE owner_sub = ? ORDER BY id", (sub,))]
            for d in devices:
                d["delegations"] = [_delegation(r) for r in c.execute(
                    _DELEGATION_SELECT + " WHERE device_id = ? ORDER BY created_at, id", (d["id"],))]
                d["keys"] = [{"slot": r[0], "created_at": r[1]} for r in c.execute(
                    "SELECT slot, created_at FROM device_keys WHERE device_id = ? ORDER BY slot", (d["id"],))]
                d["certificates"] = self._certificates(c, d["id"])
            granted = [_delegation(r) for r in c.execute(
                _DELEGATION_SELECT + " WHERE granted_by = ? ORDER BY created_at, id", (sub,))]
            received = [_delegation(r) for r in c.execute(
                _DELEGATION_SELECT + " WHERE grantee_kind = 'user' AND grantee_id = ? ORDER BY created_at, id",
                (sub,))]
            known = c.execute("SELECT username, seen_at FROM known_users WHERE sub = ?", (sub,)).fetchone()
            subs = [{k: v for k, v in _subscription(r).items() if k != "owner_sub"} for r in c.execute(
                _SUBSCRIPTION_SELECT + " WHERE owner_sub = ? ORDER BY service, id", (sub,))]
            quota = c.execute("SELECT max_devices FROM quotas WHERE sub = ?", (sub,)).fetchone()
        return {"devices": devices, "delegations_granted": granted, "delegations_received": received,
                "subscriptions": subs, "quota": None if quota is None else {"max_devices": quota[0]},
                "known_user": None if known is None else {"username": known[0], "seen_at": known[1]}}

    # ------------------------------------------------------------------ writes

    def insert_device(self, device: dict[str, Any], key_hashes: dict[str, bytes], *, max_devices: int) -> None:
        """The device and both key hashes, or nothing (quota and id checked inside)."""
        with self.transaction() as c:
            override = c.execute("SELECT max_devices FROM quotas WHERE sub = ?", (device["owner_sub"],)).fetchone()
            limit = int(override[0]) if override is not None else max_devices
            owned = c.execute("SELECT count(*) FROM devices WHERE owner_sub = ?", (device["owner_sub"],)).fetchone()[0]
            if owned >= limit:
                raise QuotaExceeded(limit)
            if c.execute("SELECT 1 FROM devices WHERE id = ?", (device["id"],)).fetchone():
                raise DeviceExists(device["id"])
            if c.execute("SELECT 1 FROM pending_removals WHERE device_id = ?", (device["id"],)).fetchone():
                raise DeviceBeingRemoved(device["id"])
            self._insert_device_row(c, device)
            self._insert_keys(c, device["id"], key_hashes, device["created_at"])
            self._changed(c, {device["id"]})

    def _insert_device_row(self, c: Any, d: dict[str, Any]) -> None:
        c.execute(
            "INSERT INTO devices (id, type, name, model, location, owner_sub, owner_username, public, service,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (d["id"], d["type"], d.get("name"), d.get("model"),
             None if d.get("location") is None else json.dumps(d["location"], separators=(",", ":")),
             d["owner_sub"], d["owner_username"], int(bool(d.get("public"))), d.get("service", ""),
             d["created_at"], d["updated_at"]))

    def _insert_keys(self, c: Any, device_id: str, key_hashes: dict[str, bytes], now: float) -> None:
        for slot, digest in sorted(key_hashes.items()):
            c.execute("INSERT INTO device_keys (device_id, slot, hash, created_at) VALUES (?, ?, ?, ?)",
                      (device_id, slot, digest, now))

    _PATCHABLE = ("type", "name", "model", "location", "public")

    def update_device(self, device_id: str, changes: dict[str, Any], now: float) -> dict[str, Any]:
        sets, values = [], []
        for name in self._PATCHABLE:  # column names come from this fixed list, never from input
            if name in changes:
                value = changes[name]
                if name == "location" and value is not None:
                    value = json.dumps(value, separators=(",", ":"))
                if name == "public":
                    value = int(bool(value))
                sets.append(f"{name} = ?")
                values.append(value)
        sets.append("updated_at = ?")
        values.append(now)
        with self.transaction() as c:
            cur = c.execute(f"UPDATE devices SET {', '.join(sets)} WHERE id = ?",  # noqa: S608 (names: _PATCHABLE)
                            (*values, device_id))
            if cur.rowcount != 1:
                raise NotFound(device_id)
            self._changed(c, {device_id})
        device = self.get_device(device_id)
        assert device is not None  # noqa: S101 (narrowing: the UPDATE above found it, in this thread)
        return device

    def delete_device(self, device_id: str, *, queued_at: float | None = None, orion: bool = True,
                      broker: bool = False) -> None:
        """``queued_at``: also owe the removal of what the device left: in Orion (``orion``: its
        entity and subscriptions) and at the MQTT broker (``broker``: its retained data and session)."""
        with self.transaction() as c:
            if queued_at is not None:
                self._queue_device_removal(c, device_id, queued_at, orion=orion, broker=broker)
            c.execute("DELETE FROM delegations WHERE device_id = ?", (device_id,))
            c.execute("DELETE FROM device_keys WHERE device_id = ?", (device_id,))
            c.execute("DELETE FROM device_certificates WHERE device_id = ?", (device_id,))
            if c.execute("DELETE FROM devices WHERE id = ?", (device_id,)).rowcount != 1:
                raise NotFound(device_id)
            self._changed(c, {device_id})

    def set_key(self, device_id: str, slot: str, digest: bytes, now: float) -> None:
        with self.transaction() as c:
            cur = c.execute("UPDATE device_keys SET hash = ?, created_at = ? WHERE device_id = ? AND slot = ?",
                            (digest, now, device_id, slot))
            if cur.rowcount != 1:
                raise NotFound(device_id)
            c.execute("UPDATE devices SET updated_at = ? WHERE id = ?", (now, device_id))
            self._changed(c, {device_id})

    def insert_certificate(self, row: dict[str, Any], *, owner_sub: str, keep: int) -> list[dict[str, Any]]:
        """Enroll a certificate on a device ``owner_sub`` still owns, keeping only the newest ``keep``;
        returns the device's certificates after the change."""
        device_id = row["device_id"]
        with self.transaction() as c:
            owner = c.execute("SELECT owner_sub FROM devices WHERE id = ?", (device_id,)).fetchone()
            # The owner checked by the API may have deleted the device, and another registered its
            # id, since: the certificate must not land on the new registration.
            if owner is None or owner[0] != owner_sub:
                raise NotFound(device_id)
            c.execute("INSERT INTO device_certificates (serial, device_id, fingerprint, not_after, created_at)"
                      " VALUES (?, ?, ?, ?, ?)", (row["serial"], device_id, bytes.fromhex(row["fingerprint"]),
                                                  row["not_after"], row["created_at"]))
            c.execute("DELETE FROM device_certificates WHERE device_id = ? AND serial NOT IN (SELECT serial FROM "
                      "device_certificates WHERE device_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ?)",
                      (device_id, device_id, keep))
            self._changed(c, {device_id})
            return self._certificates(c, device_id)

    def delete_certificates(self, device_id: str, serial: str | None = None) -> list[str]:
        """Revoke one certificate of the device (NotFound if it has no such serial) or all; returns
        the serials revoked."""
        with self.transaction() as c:
            if serial is None:
                gone = [r[0] for r in c.execute("SELECT serial FROM device_certificates WHERE device_id = ?",
                                                (device_id,))]
                c.execute("DELETE FROM device_certificates WHERE device_id = ?", (device_id,))
                self._changed(c, {device_id})
                return gone
            if c.execute("DELETE FROM device_certificates WHERE device_id = ? AND serial = ?",
                         (device_id, serial)).rowcount != 1:
                raise NotFound(serial)
            self._changed(c, {device_id})
            return [serial]

    @staticmethod
    def _certificates(c: Any, device_id: str) -> list[dict[str, Any]]:
        return [_certificate(r) for r in c.execute(
            _CERTIFICATE_SELECT + " WHERE device_id = ? ORDER BY created_at, rowid", (device_id,))]

    def insert_delegation(self, d: dict[str, Any]) -> None:
        with self.transaction() as c:
            if not c.execute("SELECT 1 FROM devices WHERE id = ?", (d["device_id"],)).fetchone():
                raise NotFound(d["device_id"])
            c.execute(
                "INSERT INTO delegations (id, device_id, grantee_kind, grantee_id, grantee_name, permission,"
                " expires_at, granted_by, granted_by_username, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (d["id"], d["device_id"], d["grantee_kind"], d["grantee_id"], d["grantee_name"], d["permission"],
                 d["expires_at"], d["granted_by"], d["granted_by_username"], d["created_at"]))
            self._changed(c, {d["device_id"]})

    def remember_user(self, sub: str, username: str, now: float) -> None:
        """The user name last seen for ``sub`` (what resolves ``{"to": NAME}``)."""
        with self.transaction() as c:
            c.execute("INSERT INTO known_users (sub, username, seen_at) VALUES (?, ?, ?) ON CONFLICT (sub) "
                      "DO UPDATE SET username = excluded.username, seen_at = excluded.seen_at",
                      (sub, username, now))
            self._changed(c, set())

    def delete_delegation(self, device_id: str, delegation_id: str) -> None:
        with self.transaction() as c:
            cur = c.execute("DELETE FROM delegations WHERE id = ? AND device_id = ?", (delegation_id, device_id))
            if cur.rowcount != 1:
                raise NotFound(delegation_id)
            self._changed(c, {device_id})

    def set_quota(self, sub: str, max_devices: int | None) -> None:
        with self.transaction() as c:
            if max_devices is None:
                c.execute("DELETE FROM quotas WHERE sub = ?", (sub,))
            else:
                c.execute("INSERT INTO quotas (sub, max_devices) VALUES (?, ?) "
                          "ON CONFLICT (sub) DO UPDATE SET max_devices = excluded.max_devices", (sub, max_devices))

    def insert_subscription(self, sub_id: str, service: str, owner_sub: str, owner_username: str,
                            now: float, *, entities: tuple[str, ...] = (), identity: dict[str, Any] | None = None,
                            unrestricted: bool = False) -> None:
        with self.transaction() as c:
            c.execute("INSERT INTO subscriptions (id, service, owner_sub, owner_username, created_at, entities, "
                      "identity, unrestricted) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id, service) DO UPDATE "
                      "SET owner_sub = excluded.owner_sub, owner_username = excluded.owner_username, "
                      "entities = excluded.entities, identity = excluded.identity, "
                      "unrestricted = excluded.unrestricted",
                      (sub_id, service, owner_sub, owner_username, now, json.dumps(list(entities)),
                       None if identity is None else json.dumps(identity, sort_keys=True), int(unrestricted)))
            self._changed(c, set())

    def set_subscription_subject(self, sub_id: str, service: str, entities: tuple[str, ...],
                                 unrestricted: bool) -> None:
        with self.transaction() as c:
            if c.execute("UPDATE subscriptions SET entities = ?, unrestricted = ? WHERE id = ? AND service = ?",
                         (json.dumps(list(entities)), int(unrestricted), sub_id, service)).rowcount:
                self._changed(c, set())

    def delete_subscription(self, sub_id: str, service: str) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM subscriptions WHERE id = ? AND service = ?", (sub_id, service))
            self._changed(c, set())

    def erase_user(self, sub: str, *, queued_at: float | None = None, orion: bool = True,
                   broker: bool = False) -> dict[str, Any]:
        """Every row about the user ``sub`` (by sub only, as :meth:`export_user`), in one
        transaction. Returns counts and touched device ids. ``queued_at``: also owe Orion the
        removal of the owned devices' entities and subscriptions and of the user's own subscriptions."""
        to_user = "(grantee_kind = 'user' AND grantee_id = ?)"  # a constant: the f-strings below hold no input
        with self.transaction() as c:
            owned = [r[0] for r in c.execute("SELECT id FROM devices WHERE owner_sub = ?", (sub,))]
            if queued_at is not None:
                self._queue_user_removal(c, sub, owned, queued_at, orion=orion, broker=broker)
            touched = set(owned) | {r[0] for r in c.execute(
                f"SELECT device_id FROM delegations WHERE {to_user} OR granted_by = ?", (sub, sub))}  # noqa: S608
            counts = {
                "delegations": c.execute(
                    f"DELETE FROM delegations WHERE {to_user} OR granted_by = ? OR device_id IN "  # noqa: S608
                    "(SELECT id FROM devices WHERE owner_sub = ?)", (sub, sub, sub)).rowcount,
                "keys": c.execute("DELETE FROM device_keys WHERE device_id IN "
                                  "(SELECT id FROM devices WHERE owner_sub = ?)", (sub,)).rowcount,
                "certificates": c.execute("DELETE FROM device_certificates WHERE device_id IN "
                                          "(SELECT id FROM devices WHERE owner_sub = ?)", (sub,)).rowcount,
                "devices": c.execute("DELETE FROM devices WHERE owner_sub = ?", (sub,)).rowcount,
                "subscriptions": c.execute("DELETE FROM subscriptions WHERE owner_sub = ?", (sub,)).rowcount,
                "quotas": c.execute("DELETE FROM quotas WHERE sub = ?", (sub,)).rowcount,
                "known_users": c.execute("DELETE FROM known_users WHERE sub = ?", (sub,)).rowcount,
            }
            self._changed(c, None)  # known users and subscriptions too: every process reloads
        return {"counts": counts, "owned": owned, "touched": touched}

    # ------------------------------------------------------------------ the policy set (policies.source: store)

    def put_policy_set(self, texts: list[tuple[str, str]], digest: str, now: float) -> int:
        """Store a new version of the policy set; its version."""
        with self.transaction() as c:
            cur = c.execute("INSERT INTO policy_sets (at, digest, files) VALUES (?, ?, ?)",
                            (now, digest, json.dumps([list(t) for t in texts])))
            version = int(cur.lastrowid)
            c.execute("DELETE FROM policy_sets WHERE version <= ?", (version - POLICY_SETS_KEPT,))
            self._changed(c, set())  # no device changed; the workers on this file re-read the policy set
            return version

    def policy_set_version(self) -> int:
        """The newest policy set's version, 0 when none was pushed."""
        return int(self._conn.execute("SELECT coalesce(max(version), 0) FROM policy_sets").fetchone()[0])

    def policy_set(self) -> tuple[int, str, list[tuple[str, str]]] | None:
        """The newest policy set: (version, digest, [(relative name, text), ...]), or None."""
        row = self._conn.execute("SELECT version, digest, files FROM policy_sets ORDER BY version DESC LIMIT 1"
                                 ).fetchone()
        if row is None:
            return None
        return int(row[0]), str(row[1]), [(str(n), str(t)) for n, t in json.loads(row[2])]

    # ------------------------------------------------------------------ clean-up owed to Orion

    def _queue_device_removal(self, c: Any, device_id: str, now: float, *, orion: bool = True,
                              broker: bool = False) -> None:
        row = c.execute("SELECT service FROM devices WHERE id = ?", (device_id,)).fetchone()
        if row is None:
            return  # the caller's DELETE finds nothing and raises NotFound, rolling this back
        add = "INSERT OR IGNORE INTO pending_removals (kind, target, service, device_id, created_at) " \
              "VALUES (?, ?, ?, ?, ?)"
        if broker:
            c.execute(add, ("broker", device_id, "", device_id, now))
        if not orion:
            return
        c.execute(add, ("entity", device_id, row[0], device_id, now))
        for sub_id, service, entities in c.execute("SELECT id, service, entities FROM subscriptions").fetchall():
            if device_id in json.loads(entities):
                c.execute(add, ("subscription", sub_id, service, device_id, now))

    def _queue_user_removal(self, c: Any, sub: str, owned: list[str], now: float, *, orion: bool = True,
                            broker: bool = False) -> None:
        for device_id in owned:
            self._queue_device_removal(c, device_id, now, orion=orion, broker=broker)
        if not orion:
            return
        for sub_id, service in c.execute("SELECT id, service FROM subscriptions WHERE owner_sub = ?",
                                         (sub,)).fetchall():
            c.execute("INSERT OR IGNORE INTO pending_removals (kind, target, service, device_id, created_at) "
                      "VALUES ('subscription', ?, ?, '', ?)", (sub_id, service, now))

    def pending_removals(self) -> list[dict[str, Any]]:
        """The clean-up still owed, oldest first."""
        return [{"id": r[0], "kind": r[1], "target": r[2], "service": r[3], "device_id": r[4],
                 "created_at": r[5], "attempts": r[6]}
                for r in self._conn.execute("SELECT id, kind, target, service, device_id, created_at, attempts "
                                            "FROM pending_removals ORDER BY id")]

    def removals_owed(self, device_id: str) -> bool:
        return self._conn.execute("SELECT 1 FROM pending_removals WHERE device_id = ? LIMIT 1",
                                  (device_id,)).fetchone() is not None

    def removal_done(self, row_id: int) -> None:
        """Orion took it: strike it off (and forget a removed subscription's record)."""
        with self.transaction() as c:
            row = c.execute("SELECT kind, target, service FROM pending_removals WHERE id = ?", (row_id,)).fetchone()
            if row is None:
                return
            c.execute("DELETE FROM pending_removals WHERE id = ?", (row_id,))
            if row[0] == "subscription":
                c.execute("DELETE FROM subscriptions WHERE id = ? AND service = ?", (row[1], row[2]))
                self._changed(c, set())

    def removal_failed(self, row_id: int) -> None:
        with self.transaction() as c:
            c.execute("UPDATE pending_removals SET attempts = attempts + 1 WHERE id = ?", (row_id,))

    def count_rows_mentioning(self, sub: str, username: str) -> int:
        """How many rows anywhere name this user (for tests and the erasure check)."""
        c = self._conn
        return sum(c.execute(sql, args).fetchone()[0] for sql, args in (
            ("SELECT count(*) FROM devices WHERE owner_sub = ? OR owner_username = ?", (sub, username)),
            ("SELECT count(*) FROM device_keys WHERE device_id IN "
             "(SELECT id FROM devices WHERE owner_sub = ?)", (sub,)),
            ("SELECT count(*) FROM device_certificates WHERE device_id IN "
             "(SELECT id FROM devices WHERE owner_sub = ?)", (sub,)),
            ("SELECT count(*) FROM delegations WHERE (grantee_kind = 'user' AND grantee_id = ?) OR granted_by = ?"
             " OR granted_by_username = ?", (sub, sub, username)),
            ("SELECT count(*) FROM known_users WHERE sub = ?", (sub,)),
            ("SELECT count(*) FROM subscriptions WHERE owner_sub = ? OR owner_username = ?", (sub, username)),
            ("SELECT count(*) FROM quotas WHERE sub = ?", (sub,)),
        ))


_DEVICE_SELECT = ("SELECT id, type, name, model, location, owner_sub, owner_username, public, service,"
                  " created_at, updated_at FROM devices")
_DELEGATION_SELECT = ("SELECT id, device_id, grantee_kind, grantee_id, grantee_name, permission, expires_at,"
                      " granted_by, granted_by_username, created_at FROM delegations")


def _device(r: Any) -> dict[str, Any]:
    return {"id": r[0], "type": r[1], "name": r[2], "model": r[3],
            "location": None if r[4] is None else json.loads(r[4]),
            "owner_sub": r[5], "owner_username": r[6], "public": bool(r[7]), "service": r[8],
            "created_at": r[9], "updated_at": r[10]}


_SUBSCRIPTION_SELECT = ("SELECT id, service, owner_sub, created_at, entities, identity, unrestricted"
                        " FROM subscriptions")


def _subscription(r: Any) -> dict[str, Any]:
    return {"id": r[0], "service": r[1], "owner_sub": r[2], "created_at": r[3], "entities": json.loads(r[4]),
            "identity": None if r[5] is None else json.loads(r[5]), "unrestricted": bool(r[6])}


_CERTIFICATE_SELECT = "SELECT serial, device_id, fingerprint, not_after, created_at FROM device_certificates"


def _certificate(r: Any) -> dict[str, Any]:
    return {"serial": r[0], "device_id": r[1], "fingerprint": bytes(r[2]).hex(), "not_after": r[3],
            "created_at": r[4]}


def _delegation(r: Any) -> dict[str, Any]:
    return {"id": r[0], "device_id": r[1], "grantee_kind": r[2], "grantee_id": r[3], "grantee_name": r[4],
            "permission": r[5], "expires_at": r[6], "granted_by": r[7], "granted_by_username": r[8],
            "created_at": r[9]}
