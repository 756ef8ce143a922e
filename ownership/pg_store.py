"""The postgres store: the :class:`~ownership.store_api.OwnershipStore` interface over PostgreSQL.

Blocking and synchronous like the SQLCipher store, run on the service's store thread, over a
psycopg connection pool. The database never sees an id or a personal value in the clear: each
record is sealed in keygate and found by blind indexes (ownership/sealing.py). Every write is
one transaction under one advisory lock (writes are rare; commit order is then the order of the
change feed) and appends a row to ``changes``, announced by ``NOTIFY keygate_changes`` with its
sequence number only (ownership/feed.py).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from ownership.own_changes import OwnChanges
from ownership.pg_migrations import SEALED_TABLES, WRITE_LOCK, migrate
from ownership.sealing import KeyRing, SealError, derive_kek, kek_id
from ownership.store import DeviceBeingRemoved, DeviceExists, NotFound, QuotaExceeded, StoreError, StoreUnavailable

CHANNEL = "keygate_changes"
SALT_BYTES = 16
RESEAL_BATCH = 200

#: Each sealed table's record-key column: what a sealed value is bound to (associated data).
_RECORD_KEY = {"meta": "name", "pending_removals": "uniq", "changes": "seq", "policy_sets": "version"}
#: Pushed policy sets kept besides the one in force (older ones are deleted at each push).
POLICY_SETS_KEPT = 10


def _record_key(table: str, value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return value.to_bytes(8, "big")
    return bytes(value)


#: libpq settings that end a connection to a database that went away without a word (a host down, a
#: partition): keepalive probes on an idle connection, and a bound on data sent but not acknowledged.
#: Without them a query waits on a half-open connection for as long as the kernel retransmits
#: (about 15 minutes), and the store thread with it. Seconds, except tcp_user_timeout (ms).
LIVENESS = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
            "tcp_user_timeout": 10_000}


class PgStore:
    """One pool of connections to a keyed, migrated keygate database."""

    backend = "postgres"

    def __init__(self, pool: ConnectionPool[Any], kek: bytes, ring: KeyRing, label: str):
        self._pool = pool
        self._kek = kek
        self._ring = ring
        self.label = label
        # Changes this process made (and so holds in its facts), until its feed has passed them.
        self._own = OwnChanges()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, dsn: str, passphrase: str, *, label: str = "postgres", pool_size: int = 4,
             connect_timeout: float = 5.0) -> PgStore:
        """Connect, migrate and unlock; StoreError (one line) when the database cannot be reached,
        is not a keygate store, or the key does not open its key ring. The dsn is never printed."""
        failure = f"store {label}: wrong key or not a keygate store"
        pool: ConnectionPool[Any] = ConnectionPool(
            dsn, min_size=1, max_size=pool_size, open=False, timeout=connect_timeout,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout)), **LIVENESS},
            check=ConnectionPool.check_connection, name="keygate-store")
        try:
            pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout:
            pool.close()
            raise StoreError(f"store {label}: cannot connect to PostgreSQL") from None
        try:
            with pool.connection() as conn:
                try:
                    migrate(conn)
                except RuntimeError as exc:
                    raise StoreError(f"store {label}: {exc}") from None
                kek, ring = cls._unlock(conn, passphrase, failure)
            store = cls(pool, kek, ring, label)
            store._ensure_pepper()
            return store
        except psycopg.Error as exc:
            pool.close()
            raise StoreError(f"store {label}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        except BaseException:
            pool.close()
            raise

    @staticmethod
    def inspect(dsn: str, passphrase: str, *, label: str = "postgres", connect_timeout: float = 5.0) -> int | None:
        """The schema version of the keygate store at ``dsn`` once its key ring opens with the key, or
        None when the database holds no store yet (``keygate check``: nothing is created or migrated)."""
        failure = f"store {label}: wrong key or not a keygate store"
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout))) as conn:
                found = conn.execute("SELECT to_regclass('keygate_schema')").fetchone()
                if found is None or found[0] is None:
                    return None
                row = conn.execute("SELECT version FROM keygate_schema").fetchone()
                if row is None:
                    return None
                version = int(row[0])
                salt = conn.execute("SELECT value FROM meta WHERE name = 'salt'").fetchone()
                if salt is None:
                    return None
                kek = derive_kek(passphrase, bytes(salt[0]))
                ring = conn.execute("SELECT value FROM meta WHERE name = %s", (f"ring:{kek_id(kek)}",)).fetchone()
                if ring is None:
                    raise StoreError(failure)
                KeyRing.open_with(kek, bytes(ring[0]))
                return version
        except SealError:
            raise StoreError(failure) from None
        except psycopg.Error as exc:
            raise StoreError(f"store {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                             ) from None

    @staticmethod
    def _unlock(conn: Any, passphrase: str, failure: str) -> tuple[bytes, KeyRing]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            row = conn.execute("SELECT value FROM meta WHERE name = 'salt'").fetchone()
            if row is None:  # a new store: its salt and a new key ring
                salt = secrets.token_bytes(SALT_BYTES)
                kek = derive_kek(passphrase, salt)
                ring = KeyRing.new()
                conn.execute("INSERT INTO meta (name, value) VALUES ('salt', %s)", (salt,))
                conn.execute("INSERT INTO meta (name, value) VALUES (%s, %s)",
                             (f"ring:{kek_id(kek)}", ring.seal_under(kek)))
                return kek, ring
            kek = derive_kek(passphrase, bytes(row[0]))
            ring_row = conn.execute("SELECT value FROM meta WHERE name = %s", (f"ring:{kek_id(kek)}",)).fetchone()
            if ring_row is None:
                raise StoreError(failure)
            try:
                return kek, KeyRing.open_with(kek, bytes(ring_row[0]))
            except SealError:
                raise StoreError(failure) from None

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Any]:
        """One transaction (``write``: under the write lock). A connection lost on the way, or none to be
        had, is StoreUnavailable: the transaction did not commit (the caller's change is not made)."""
        start = self._own.opened()
        try:
            with self._transaction(write) as conn:
                yield conn
        except BaseException as exc:
            self._own.abandoned(start)
            if isinstance(exc, (psycopg.OperationalError, PoolTimeout)):
                raise StoreUnavailable(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
                    from None
            raise
        if start == 0:  # the outermost: its COMMIT was answered
            self._own.committed()

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[Any]:
        with self._pool.connection() as conn, conn.transaction():
            if write:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                self._follow_current_key(conn)
            else:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield conn

    def _follow_current_key(self, conn: Any) -> None:
        """A rotation elsewhere switched the data key: seal new values under it too."""
        row = conn.execute("SELECT kid FROM meta WHERE name = 'current_kid'").fetchone()
        if row is not None and int(row[0]) != self._ring.current:
            self._reload_ring(conn)

    def _reload_ring(self, conn: Any) -> None:
        row = conn.execute("SELECT value FROM meta WHERE name = %s", (f"ring:{kek_id(self._kek)}",)).fetchone()
        if row is None:
            raise StoreError(f"store {self.label}: the key ring no longer opens with this key (rekeyed?)")
        self._ring = KeyRing.open_with(self._kek, bytes(row[0]))

    # ------------------------------------------------------------------ sealing helpers

    def _ix(self, table: str, *parts: str) -> bytes:
        return self._ring.index(table, *parts)

    def _seal(self, table: str, key: Any, value: Any) -> tuple[int, bytes]:
        return self._ring.seal(table, _record_key(table, key), value)

    def _open(self, conn: Any, table: str, key: Any, kid: int, blob: Any) -> Any:
        try:
            return self._ring.open(table, _record_key(table, key), kid, bytes(blob))
        except SealError:
            if kid in self._ring.data_keys:
                raise
            self._reload_ring(conn)  # a key added by a rotation since this ring was loaded
            return self._ring.open(table, _record_key(table, key), kid, bytes(blob))

    def _rows(self, conn: Any, table: str, where: str = "", args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        key = _RECORD_KEY.get(table, "bidx")
        # Table, column and clause are this module's constants; values are bound parameters.
        sql = f"SELECT {key}, kid, data FROM {table} {where}"  # noqa: S608
        return [self._open(conn, table, r[0], r[1], r[2]) for r in conn.execute(sql, args).fetchall()]

    def _changed(self, conn: Any, devices: set[str] | None) -> None:
        """Append to the change feed (in the write's own transaction) and announce it."""
        value = {"devices": None if devices is None else sorted(devices)}
        seq = conn.execute("SELECT nextval(pg_get_serial_sequence('changes', 'seq'))").fetchone()[0]
        kid, blob = self._seal("changes", int(seq), value)
        at = time.time()
        conn.execute("INSERT INTO changes (seq, at, kid, data) VALUES (%s, %s, %s, %s)", (seq, at, kid, blob))
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))
        self._own.numbered(int(seq), at)

    # ------------------------------------------------------------------ the pepper

    def _ensure_pepper(self) -> None:
        with self.transaction() as c:
            if c.execute("SELECT 1 FROM meta WHERE name = 'key_pepper'").fetchone():
                return
            kid, blob = self._seal("meta", "key_pepper", secrets.token_bytes(32).hex())
            c.execute("INSERT INTO meta (name, kid, value) VALUES ('key_pepper', %s, %s)", (kid, blob))

    def pepper(self) -> bytes:
        with self.transaction(write=False) as c:
            row = c.execute("SELECT kid, value FROM meta WHERE name = 'key_pepper'").fetchone()
            return bytes.fromhex(self._open(c, "meta", "key_pepper", row[0], row[1]))

    # ------------------------------------------------------------------ reads

    def last_change(self) -> int:
        with self.transaction(write=False) as c:
            return int(c.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])

    def change_mark(self, seq: int) -> Any:
        """What identifies change ``seq`` in this history (None if there is none): its time, in the
        clear (a rekey re-seals the value, not this), is another after a restore or a failover gave
        the number out again."""
        with self.transaction(write=False) as c:
            row = c.execute("SELECT at FROM changes WHERE seq = %s", (seq,)).fetchone()
            return None if row is None else float(row[0])

    def forget_own(self) -> None:
        self._own.forget()

    def changes_since(self, seq: int) -> tuple[int, set[str] | None, bool]:
        """(the newest seq, the device ids changed after ``seq`` or None for everything, whether any
        of those changes was made by another process: this one's own are in its facts already)."""
        with self.transaction(write=False) as c:
            rows = c.execute("SELECT seq, at, kid, data FROM changes WHERE seq > %s ORDER BY seq", (seq,)).fetchall()
            return self._own.fold(seq, ((int(r[0]), float(r[1]), r) for r in rows),
                                  lambda r: self._open(c, "changes", int(r[0]), r[2], r[3])["devices"])

    def load_all(self) -> dict[str, list[dict[str, Any]]]:
        with self.transaction(write=False) as c:
            return self._snapshot(c)

    def load_all_at(self) -> tuple[int, dict[str, list[dict[str, Any]]]]:
        """The snapshot and the last change it includes (one transaction: nothing falls between)."""
        with self.transaction(write=False) as c:
            seq = int(c.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])
            return seq, self._snapshot(c)

    def _snapshot(self, c: Any) -> dict[str, list[dict[str, Any]]]:
        keys = self._rows(c, "device_keys")
        return {
            "devices": self._rows(c, "devices"),
            "keys": [{"device_id": k["device_id"], "slot": k["slot"], "hash": bytes.fromhex(k["hash"])} for k in keys],
            "delegations": self._rows(c, "delegations"),
            "subscriptions": [_public_subscription(s) for s in self._rows(c, "subscriptions")],
            "certificates": self._rows(c, "device_certificates", "ORDER BY position"),
            "known_users": self._rows(c, "known_users"),
        }

    def get_device(self, device_id: str) -> dict[str, Any] | None:
        with self.transaction(write=False) as c:
            return self._device_with_delegations(c, device_id)

    def _device_with_delegations(self, c: Any, device_id: str) -> dict[str, Any] | None:
        bidx = self._ix("devices", device_id)
        rows = self._rows(c, "devices", "WHERE bidx = %s", (bidx,))
        if not rows:
            return None
        device = rows[0]
        device["delegations"] = _by_creation(self._rows(c, "delegations", "WHERE device = %s", (bidx,)))
        return device

    def export_user(self, sub: str) -> dict[str, Any]:
        with self.transaction(write=False) as c:
            devices = sorted(self._rows(c, "devices", "WHERE owner = %s", (self._ix("owner", sub),)),
                             key=lambda d: d["id"])
            for d in devices:
                dev = self._ix("devices", d["id"])
                d["delegations"] = _by_creation(self._rows(c, "delegations", "WHERE device = %s", (dev,)))
                d["keys"] = sorted(({"slot": k["slot"], "created_at": k["created_at"]}
                                    for k in self._rows(c, "device_keys", "WHERE device = %s", (dev,))),
                                   key=lambda k: k["slot"])
                d["certificates"] = self._certificates(c, d["id"])
            granted = _by_creation(self._rows(c, "delegations", "WHERE granted_by = %s", (self._ix("user", sub),)))
            received = _by_creation(self._rows(c, "delegations", "WHERE grantee = %s",
                                               (self._ix("grantee", "user", sub),)))
            known = self._rows(c, "known_users", "WHERE bidx = %s", (self._ix("known_users", sub),))
            subs = sorted(({k: v for k, v in _public_subscription(s).items() if k != "owner_sub"}
                           for s in self._rows(c, "subscriptions", "WHERE owner = %s", (self._ix("owner", sub),))),
                          key=lambda s: (s["service"], s["id"]))
            quota = self._rows(c, "quotas", "WHERE bidx = %s", (self._ix("quotas", sub),))
        return {"devices": devices, "delegations_granted": granted, "delegations_received": received,
                "subscriptions": subs, "quota": None if not quota else {"max_devices": quota[0]["max_devices"]},
                "known_user": None if not known else {"username": known[0]["username"],
                                                      "seen_at": known[0]["seen_at"]}}

    # ------------------------------------------------------------------ writes: devices and keys

    def insert_device(self, device: dict[str, Any], key_hashes: dict[str, bytes], *, max_devices: int) -> None:
        with self.transaction() as c:
            owner = self._ix("owner", device["owner_sub"])
            override = self._rows(c, "quotas", "WHERE bidx = %s", (self._ix("quotas", device["owner_sub"]),))
            limit = int(override[0]["max_devices"]) if override else max_devices
            owned = c.execute("SELECT count(*) FROM devices WHERE owner = %s", (owner,)).fetchone()[0]
            if owned >= limit:
                raise QuotaExceeded(limit)
            bidx = self._ix("devices", device["id"])
            if c.execute("SELECT 1 FROM devices WHERE bidx = %s", (bidx,)).fetchone():
                raise DeviceExists(device["id"])
            if c.execute("SELECT 1 FROM pending_removals WHERE device = %s", (bidx,)).fetchone():
                raise DeviceBeingRemoved(device["id"])
            self._put_device(c, _device_row(device))
            for slot, digest in sorted(key_hashes.items()):
                self._put_key(c, device["id"], slot, digest, device["created_at"])
            self._changed(c, {device["id"]})

    def _put_device(self, c: Any, d: dict[str, Any]) -> None:
        bidx = self._ix("devices", d["id"])
        kid, blob = self._seal("devices", bidx, d)
        c.execute("INSERT INTO devices (bidx, owner, kid, data) VALUES (%s, %s, %s, %s) ON CONFLICT (bidx) "
                  "DO UPDATE SET owner = excluded.owner, kid = excluded.kid, data = excluded.data",
                  (bidx, self._ix("owner", d["owner_sub"]), kid, blob))

    def _put_key(self, c: Any, device_id: str, slot: str, digest: bytes, now: float) -> None:
        bidx = self._ix("device_keys", device_id, slot)
        kid, blob = self._seal("device_keys", bidx, {"device_id": device_id, "slot": slot, "hash": digest.hex(),
                                                     "created_at": now})
        c.execute("INSERT INTO device_keys (bidx, device, slot, kid, data) VALUES (%s, %s, %s, %s, %s) "
                  "ON CONFLICT (bidx) DO UPDATE SET kid = excluded.kid, data = excluded.data",
                  (bidx, self._ix("devices", device_id), slot, kid, blob))

    _PATCHABLE = ("type", "name", "model", "location", "public")

    def update_device(self, device_id: str, changes: dict[str, Any], now: float) -> dict[str, Any]:
        with self.transaction() as c:
            rows = self._rows(c, "devices", "WHERE bidx = %s FOR UPDATE", (self._ix("devices", device_id),))
            if not rows:
                raise NotFound(device_id)
            row = rows[0]
            for name in self._PATCHABLE:
                if name in changes:
                    row[name] = bool(changes[name]) if name == "public" else changes[name]
            row["updated_at"] = now
            self._put_device(c, row)
            self._changed(c, {device_id})
            device = self._device_with_delegations(c, device_id)
        assert device is not None  # noqa: S101 (narrowing: written above in this transaction)
        return device

    def delete_device(self, device_id: str, *, queued_at: float | None = None, orion: bool = True,
                      broker: bool = False) -> None:
        with self.transaction() as c:
            bidx = self._ix("devices", device_id)
            if queued_at is not None:
                self._queue_device_removal(c, device_id, queued_at, orion=orion, broker=broker)
            # Keys, delegations and certificates go with it (ON DELETE CASCADE).
            if c.execute("DELETE FROM devices WHERE bidx = %s", (bidx,)).rowcount != 1:
                raise NotFound(device_id)
            self._changed(c, {device_id})

    def set_key(self, device_id: str, slot: str, digest: bytes, now: float) -> None:
        with self.transaction() as c:
            rows = self._rows(c, "devices", "WHERE bidx = %s FOR UPDATE", (self._ix("devices", device_id),))
            if not rows or not c.execute("SELECT 1 FROM device_keys WHERE bidx = %s",
                                         (self._ix("device_keys", device_id, slot),)).fetchone():
                raise NotFound(device_id)
            self._put_key(c, device_id, slot, digest, now)
            rows[0]["updated_at"] = now
            self._put_device(c, rows[0])
            self._changed(c, {device_id})

    # ------------------------------------------------------------------ writes: certificates

    def insert_certificate(self, row: dict[str, Any], *, owner_sub: str, keep: int) -> list[dict[str, Any]]:
        device_id = row["device_id"]
        with self.transaction() as c:
            owner = self._rows(c, "devices", "WHERE bidx = %s", (self._ix("devices", device_id),))
            if not owner or owner[0]["owner_sub"] != owner_sub:
                raise NotFound(device_id)
            bidx = self._ix("device_certificates", row["serial"])
            cert = {k: row[k] for k in ("serial", "device_id", "fingerprint", "not_after", "created_at")}
            kid, blob = self._seal("device_certificates", bidx, cert)
            dev = self._ix("devices", device_id)
            c.execute("INSERT INTO device_certificates (bidx, device, fingerprint, kid, data) "
                      "VALUES (%s, %s, %s, %s, %s)",
                      (bidx, dev, self._ix("fingerprint", row["fingerprint"]), kid, blob))
            c.execute("DELETE FROM device_certificates WHERE device = %s AND bidx NOT IN (SELECT bidx FROM "
                      "device_certificates WHERE device = %s ORDER BY position DESC LIMIT %s)", (dev, dev, keep))
            self._changed(c, {device_id})
            return self._certificates(c, device_id)

    def delete_certificates(self, device_id: str, serial: str | None = None) -> list[str]:
        with self.transaction() as c:
            dev = self._ix("devices", device_id)
            if serial is None:
                gone = [r["serial"] for r in self._rows(c, "device_certificates", "WHERE device = %s", (dev,))]
                c.execute("DELETE FROM device_certificates WHERE device = %s", (dev,))
            else:
                if c.execute("DELETE FROM device_certificates WHERE device = %s AND bidx = %s",
                             (dev, self._ix("device_certificates", serial))).rowcount != 1:
                    raise NotFound(serial)
                gone = [serial]
            self._changed(c, {device_id})
            return gone

    def _certificates(self, c: Any, device_id: str) -> list[dict[str, Any]]:
        return self._rows(c, "device_certificates", "WHERE device = %s ORDER BY position",
                          (self._ix("devices", device_id),))

    # ------------------------------------------------------------------ writes: delegations, users, quotas

    def insert_delegation(self, d: dict[str, Any]) -> None:
        with self.transaction() as c:
            dev = self._ix("devices", d["device_id"])
            if not c.execute("SELECT 1 FROM devices WHERE bidx = %s", (dev,)).fetchone():
                raise NotFound(d["device_id"])
            bidx = self._ix("delegations", d["id"])
            row = {k: d[k] for k in ("id", "device_id", "grantee_kind", "grantee_id", "grantee_name", "permission",
                                     "expires_at", "granted_by", "granted_by_username", "created_at")}
            kid, blob = self._seal("delegations", bidx, row)
            c.execute("INSERT INTO delegations (bidx, device, grantee, granted_by, kid, data) "
                      "VALUES (%s, %s, %s, %s, %s, %s)",
                      (bidx, dev, self._ix("grantee", d["grantee_kind"], d["grantee_id"]),
                       self._ix("user", d["granted_by"]), kid, blob))
            self._changed(c, {d["device_id"]})

    def delete_delegation(self, device_id: str, delegation_id: str) -> None:
        with self.transaction() as c:
            if c.execute("DELETE FROM delegations WHERE bidx = %s AND device = %s",
                         (self._ix("delegations", delegation_id), self._ix("devices", device_id))).rowcount != 1:
                raise NotFound(delegation_id)
            self._changed(c, {device_id})

    def remember_user(self, sub: str, username: str, now: float) -> None:
        with self.transaction() as c:
            bidx = self._ix("known_users", sub)
            kid, blob = self._seal("known_users", bidx, {"sub": sub, "username": username, "seen_at": now})
            c.execute("INSERT INTO known_users (bidx, kid, data) VALUES (%s, %s, %s) ON CONFLICT (bidx) "
                      "DO UPDATE SET kid = excluded.kid, data = excluded.data", (bidx, kid, blob))
            self._changed(c, set())

    def set_quota(self, sub: str, max_devices: int | None) -> None:
        with self.transaction() as c:
            bidx = self._ix("quotas", sub)
            if max_devices is None:
                c.execute("DELETE FROM quotas WHERE bidx = %s", (bidx,))
            else:
                kid, blob = self._seal("quotas", bidx, {"max_devices": int(max_devices)})
                c.execute("INSERT INTO quotas (bidx, kid, data) VALUES (%s, %s, %s) ON CONFLICT (bidx) "
                          "DO UPDATE SET kid = excluded.kid, data = excluded.data", (bidx, kid, blob))

    # ------------------------------------------------------------------ writes: subscriptions

    def _put_subscription(self, c: Any, s: dict[str, Any]) -> None:
        bidx = self._ix("subscriptions", s["service"], s["id"])
        kid, blob = self._seal("subscriptions", bidx, s)
        c.execute("INSERT INTO subscriptions (bidx, owner, kid, data) VALUES (%s, %s, %s, %s) ON CONFLICT (bidx) "
                  "DO UPDATE SET owner = excluded.owner, kid = excluded.kid, data = excluded.data",
                  (bidx, self._ix("owner", s["owner_sub"]), kid, blob))

    def insert_subscription(self, sub_id: str, service: str, owner_sub: str, owner_username: str,
                            now: float, *, entities: tuple[str, ...] = (), identity: dict[str, Any] | None = None,
                            unrestricted: bool = False) -> None:
        with self.transaction() as c:
            old = self._rows(c, "subscriptions", "WHERE bidx = %s", (self._ix("subscriptions", service, sub_id),))
            self._put_subscription(c, {
                "id": sub_id, "service": service, "owner_sub": owner_sub, "owner_username": owner_username,
                "created_at": old[0]["created_at"] if old else now, "entities": list(entities),
                "identity": identity, "unrestricted": bool(unrestricted)})
            self._changed(c, set())

    def set_subscription_subject(self, sub_id: str, service: str, entities: tuple[str, ...],
                                 unrestricted: bool) -> None:
        with self.transaction() as c:
            old = self._rows(c, "subscriptions", "WHERE bidx = %s FOR UPDATE",
                             (self._ix("subscriptions", service, sub_id),))
            if old:
                self._put_subscription(c, {**old[0], "entities": list(entities), "unrestricted": bool(unrestricted)})
                self._changed(c, set())

    def delete_subscription(self, sub_id: str, service: str) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM subscriptions WHERE bidx = %s", (self._ix("subscriptions", service, sub_id),))
            self._changed(c, set())

    # ------------------------------------------------------------------ erasure

    def erase_user(self, sub: str, *, queued_at: float | None = None, orion: bool = True,
                   broker: bool = False) -> dict[str, Any]:
        with self.transaction() as c:
            owner = self._ix("owner", sub)
            owned = [d["id"] for d in self._rows(c, "devices", "WHERE owner = %s", (owner,))]
            if queued_at is not None:
                self._queue_user_removal(c, sub, owned, queued_at, orion=orion, broker=broker)
            to_user, by_user = self._ix("grantee", "user", sub), self._ix("user", sub)
            touched = set(owned) | {d["device_id"] for d in self._rows(
                c, "delegations", "WHERE grantee = %s OR granted_by = %s", (to_user, by_user))}
            counts = {
                "delegations": c.execute(
                    "DELETE FROM delegations WHERE grantee = %s OR granted_by = %s OR device IN "
                    "(SELECT bidx FROM devices WHERE owner = %s)",
                    (to_user, by_user, owner)).rowcount,
                "keys": c.execute("DELETE FROM device_keys WHERE device IN "
                                  "(SELECT bidx FROM devices WHERE owner = %s)", (owner,)).rowcount,
                "certificates": c.execute("DELETE FROM device_certificates WHERE device IN "
                                          "(SELECT bidx FROM devices WHERE owner = %s)",
                                          (owner,)).rowcount,
                "devices": c.execute("DELETE FROM devices WHERE owner = %s", (owner,)).rowcount,
                "subscriptions": c.execute("DELETE FROM subscriptions WHERE owner = %s", (owner,)).rowcount,
                "quotas": c.execute("DELETE FROM quotas WHERE bidx = %s", (self._ix("quotas", sub),)).rowcount,
                "known_users": c.execute("DELETE FROM known_users WHERE bidx = %s",
                                         (self._ix("known_users", sub),)).rowcount,
            }
            self._changed(c, None)  # known users and subscriptions too: every process reloads
        return {"counts": counts, "owned": owned, "touched": touched}

    def count_rows_mentioning(self, sub: str, username: str) -> int:
        """How many rows anywhere name this user (every sealed row opened: for tests and the erasure check)."""
        with self.transaction(write=False) as c:
            n = 0
            for table in ("devices", "delegations", "known_users", "subscriptions"):
                for r in self._rows(c, table):
                    n += sub in (r.get("owner_sub"), r.get("sub"), r.get("granted_by"),
                                 r.get("grantee_id") if r.get("grantee_kind") == "user" else None) or \
                        username in (r.get("owner_username"), r.get("granted_by_username"))
            owner = (self._ix("owner", sub),)
            for sql, args in (("SELECT count(*) FROM device_keys WHERE device IN "
                               "(SELECT bidx FROM devices WHERE owner = %s)", owner),
                              ("SELECT count(*) FROM device_certificates WHERE device IN "
                               "(SELECT bidx FROM devices WHERE owner = %s)", owner),
                              ("SELECT count(*) FROM quotas WHERE bidx = %s", (self._ix("quotas", sub),))):
                n += int(c.execute(sql, args).fetchone()[0])
            return n

    # ------------------------------------------------------------------ clean-up owed to Orion

    def _owe(self, c: Any, kind: str, target: str, service: str, device_id: str, now: float) -> None:
        uniq = self._ix("pending_removals", kind, target, service, device_id)
        kid, blob = self._seal("pending_removals", uniq, {"kind": kind, "target": target, "service": service,
                                                          "device_id": device_id, "created_at": now})
        c.execute("INSERT INTO pending_removals (uniq, device, kid, data) VALUES (%s, %s, %s, %s) "
                  "ON CONFLICT (uniq) DO NOTHING",
                  (uniq, self._ix("devices", device_id) if device_id else None, kid, blob))

    def _queue_device_removal(self, c: Any, device_id: str, now: float, *, orion: bool = True,
                              broker: bool = False) -> None:
        rows = self._rows(c, "devices", "WHERE bidx = %s", (self._ix("devices", device_id),))
        if not rows:
            return  # the caller's DELETE finds nothing and raises NotFound, rolling this back
        if broker:
            self._owe(c, "broker", device_id, "", device_id, now)
        if not orion:
            return
        self._owe(c, "entity", device_id, rows[0]["service"], device_id, now)
        for s in self._rows(c, "subscriptions"):
            if device_id in s["entities"]:
                self._owe(c, "subscription", s["id"], s["service"], device_id, now)

    def _queue_user_removal(self, c: Any, sub: str, owned: list[str], now: float, *, orion: bool = True,
                            broker: bool = False) -> None:
        for device_id in owned:
            self._queue_device_removal(c, device_id, now, orion=orion, broker=broker)
        if not orion:
            return
        for s in self._rows(c, "subscriptions", "WHERE owner = %s", (self._ix("owner", sub),)):
            self._owe(c, "subscription", s["id"], s["service"], "", now)

    def pending_removals(self) -> list[dict[str, Any]]:
        with self.transaction(write=False) as c:
            out = []
            for r in c.execute("SELECT id, uniq, kid, data, attempts FROM pending_removals ORDER BY id").fetchall():
                row = self._open(c, "pending_removals", r[1], r[2], r[3])
                out.append({"id": int(r[0]), **row, "attempts": int(r[4])})
            return out

    def removals_owed(self, device_id: str) -> bool:
        with self.transaction(write=False) as c:
            return c.execute("SELECT 1 FROM pending_removals WHERE device = %s LIMIT 1",
                             (self._ix("devices", device_id),)).fetchone() is not None

    def removal_done(self, row_id: int) -> None:
        with self.transaction() as c:
            r = c.execute("SELECT uniq, kid, data FROM pending_removals WHERE id = %s", (row_id,)).fetchone()
            if r is None:
                return
            row = self._open(c, "pending_removals", r[0], r[1], r[2])
            c.execute("DELETE FROM pending_removals WHERE id = %s", (row_id,))
            if row["kind"] == "subscription":
                c.execute("DELETE FROM subscriptions WHERE bidx = %s",
                          (self._ix("subscriptions", row["service"], row["target"]),))
                self._changed(c, set())

    def removal_failed(self, row_id: int) -> None:
        with self.transaction() as c:
            c.execute("UPDATE pending_removals SET attempts = attempts + 1 WHERE id = %s", (row_id,))

    # ------------------------------------------------------------------ the policy set (policies.source: store)

    def put_policy_set(self, texts: list[tuple[str, str]], digest: str, now: float) -> int:
        """Store a new version of the policy set and announce it on the change feed; its version."""
        with self.transaction() as c:
            version = int(c.execute("SELECT nextval(pg_get_serial_sequence('policy_sets', 'version'))").fetchone()[0])
            kid, blob = self._seal("policy_sets", version, {"files": [list(t) for t in texts]})
            c.execute("INSERT INTO policy_sets (version, at, digest, kid, data) VALUES (%s, %s, %s, %s, %s)",
                      (version, now, digest, kid, blob))
            c.execute("DELETE FROM policy_sets WHERE version <= %s", (version - POLICY_SETS_KEPT,))
            self._changed(c, set())  # no device changed; every process re-reads the policy set
            return version

    def policy_set_version(self) -> int:
        """The newest policy set's version, 0 when none was pushed."""
        with self.transaction(write=False) as c:
            return int(c.execute("SELECT coalesce(max(version), 0) FROM policy_sets").fetchone()[0])

    def policy_set(self) -> tuple[int, str, list[tuple[str, str]]] | None:
        """The newest policy set: (version, digest, [(relative name, text), ...]), or None."""
        with self.transaction(write=False) as c:
            row = c.execute("SELECT version, digest, kid, data FROM policy_sets ORDER BY version DESC LIMIT 1"
                            ).fetchone()
            if row is None:
                return None
            files = self._open(c, "policy_sets", int(row[0]), row[2], row[3])["files"]
            return int(row[0]), str(row[1]), [(str(n), str(t)) for n, t in files]

    # ------------------------------------------------------------------ key rotation

    def rekey(self, new_passphrase: str) -> int:
        """Rotate the data key and move the key ring to a new ``store.key``, with gateways running.

        1. A new data key becomes current; the ring is sealed under the new key-encryption key and
           re-sealed under the old one, so a gateway still started with the old ``store.key``
           reads (and writes) values under the new data key.
        2. Every row is re-sealed under the new data key, a batch per transaction.
        3. The old data keys leave the ring. The ring under the old ``store.key`` stays until
           ``finish_rekey`` (once every gateway runs with the new key). Returns the rows re-sealed.
        """
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            self._reload_ring(conn)
            salt = bytes(conn.execute("SELECT value FROM meta WHERE name = 'salt'").fetchone()[0])
            new_kek = derive_kek(new_passphrase, salt)
            # A ring under a third key (a rekey not finished) would keep an old data key current for the
            # gateways still started with it, and every other gateway could not open what they write.
            rings = {r[0] for r in conn.execute("SELECT name FROM meta WHERE name LIKE 'ring:%%'").fetchall()}
            others = rings - {f"ring:{kek_id(self._kek)}", f"ring:{kek_id(new_kek)}"}
            if others:
                raise StoreError(f"store {self.label}: a rekey is not finished (the key ring opens with {len(others)} "
                                 "other key(s)): once every gateway runs with the current key, run keygate store "
                                 "rekey --finish, then rekey again")
            ring = self._ring.with_new_data_key()
            self._write_ring(conn, ring, new_kek)
            self._ring = ring
        moved = 0
        for table in SEALED_TABLES:
            key = _RECORD_KEY.get(table, "bidx")
            while True:
                with self._pool.connection() as conn, conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
                    # Constants of this module only; values bound.
                    rows = conn.execute(f"SELECT {key}, kid, {'value' if table == 'meta' else 'data'} FROM "  # noqa: S608
                                        f"{table} WHERE kid IS NOT NULL AND kid <> %s LIMIT %s",
                                        (ring.current, RESEAL_BATCH)).fetchall()
                    for r in rows:
                        value = self._open(conn, table, r[0], r[1], r[2])
                        kid, blob = self._seal(table, r[0], value)
                        conn.execute(f"UPDATE {table} SET kid = %s, {'value' if table == 'meta' else 'data'} = %s "  # noqa: S608
                                     f"WHERE {key} = %s", (kid, blob, r[0]))
                    moved += len(rows)
                if len(rows) < RESEAL_BATCH:
                    break
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            self._ring = self._ring.without_keys_but({ring.current})
            self._write_ring(conn, self._ring, new_kek)
        self._kek = new_kek
        return moved

    def _write_ring(self, conn: Any, ring: KeyRing, new_kek: bytes) -> None:
        """The ring sealed under the new key-encryption key and under every one still holding a ring."""
        conn.execute("INSERT INTO meta (name, value) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET value = "
                     "excluded.value", (f"ring:{kek_id(new_kek)}", ring.seal_under(new_kek)))
        if new_kek != self._kek:
            conn.execute("UPDATE meta SET value = %s WHERE name = %s",
                         (ring.seal_under(self._kek), f"ring:{kek_id(self._kek)}"))
        conn.execute("INSERT INTO meta (name, kid, value) VALUES ('current_kid', %s, '') ON CONFLICT (name) "
                     "DO UPDATE SET kid = excluded.kid", (ring.current,))

    def finish_rekey(self) -> int:
        """Drop the key ring sealed under any ``store.key`` but this one: the old key opens nothing."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            return int(conn.execute("DELETE FROM meta WHERE name LIKE 'ring:%%' AND name <> %s",
                                    (f"ring:{kek_id(self._kek)}",)).rowcount)


def _device_row(d: dict[str, Any]) -> dict[str, Any]:
    return {"id": d["id"], "type": d["type"], "name": d.get("name"), "model": d.get("model"),
            "location": d.get("location"), "owner_sub": d["owner_sub"], "owner_username": d["owner_username"],
            "public": bool(d.get("public")), "service": d.get("service", ""),
            "created_at": d["created_at"], "updated_at": d["updated_at"]}


def _public_subscription(s: dict[str, Any]) -> dict[str, Any]:
    """A subscription as the SQLCipher store reads it (without the owner's user name)."""
    return {k: s[k] for k in ("id", "service", "owner_sub", "created_at", "entities", "identity", "unrestricted")}


def _by_creation(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda d: (d["created_at"], d["id"]))
