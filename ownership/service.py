"""The ownership service: the store behind one thread, the read path in memory.

Writes go to the store on a single dedicated thread (SQLite blocks; one
thread means one connection and no lock contention), then, once committed,
update :class:`~ownership.facts.MemoryFacts` on the event loop. Reads the
gateways make on every packet (owner, delegations, public flag, key check)
never touch the database.

Authorization (owner or admin) is the API's job; this layer trusts its
caller and records every change in the audit log with the actor's identity.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import logging
import math
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from prometheus_client import Counter, Gauge

from ownership import enrollment
from ownership import store as st
from ownership.enrollment import CsrProblem, DeviceCA
from ownership.facts import MemoryFacts, principal_of
from ownership.inflight import WritesInFlight
from ownership.orion import OrionClient, OrionUnavailable
from ownership.pg_store import PgStore
from ownership.store_api import OwnershipStore

if TYPE_CHECKING:
    from ownership.feed import ChangeFeed, Signal
from ownership.validation import KEY_SLOTS, PERMISSIONS, orion_id_problem, parse_grantee
from proxy.audit import AuditLog
from proxy.config import Config, ConfigError, store_key
from proxy.facts import PUBLIC, Principal
from proxy.identity.model import AuthError, AuthReason, Identity, identity_snapshot
from proxy.metrics import REGISTRY, add_readiness_check, remove_readiness_check
from proxy.ratelimit import RateLimiter
from proxy.tls import upstream_context

T = TypeVar("T")

log = logging.getLogger("keygate.ownership")

KEY_CHECKS = Counter("keygate_device_key_checks", "Device key checks by result", ["result"], registry=REGISTRY)
_KEY_OK, _KEY_FAILED = KEY_CHECKS.labels("ok"), KEY_CHECKS.labels("failed")
DEVICES = Gauge("keygate_ownership_devices", "Devices registered in the ownership store", registry=REGISTRY)

#: Longest key accepted for checking; real keys are 43 characters.
MAX_KEY_LENGTH = 256


class OwnershipError(Exception):
    """A refusal the API turns into ``{"error": {"code", "message"}}`` with ``status``."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code


class InvalidInput(OwnershipError):
    status, code = 400, "invalid_field"


class NotFound(OwnershipError):
    status, code = 404, "not_found"


class Conflict(OwnershipError):
    status, code = 409, "conflict"


class UnknownUser(OwnershipError):
    status, code = 404, "unknown_user"


class AmbiguousUser(OwnershipError):
    status, code = 409, "ambiguous_user"


class QuotaExceeded(OwnershipError):
    status, code = 403, "quota_exceeded"


class OrionUnreachable(OwnershipError):
    # Whether the id is free in Orion is unknown: refuse rather than guess.
    status, code = 503, "orion_unreachable"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "5"}


class StoreUnreachable(OwnershipError):
    # The postgres store cannot be reached: the change is not confirmed (a lost COMMIT may still have
    # landed: every write is safe to ask again, or answers 409 and the caller reads what is there).
    status, code = 503, "store_unavailable"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "2"}


class EnrollmentUnavailable(OwnershipError):
    # 501, not 503: no device CA key is configured, and asking again will not change that.
    status, code = 501, "enrollment_unavailable"


def principal_keys_of(identity: Identity) -> set[str]:
    """The principal keys that are exactly this caller (not the candidate superset of
    :func:`proxy.facts.principal_keys`)."""
    if identity.kind == "anonymous":
        return {PUBLIC.key}
    if identity.kind == "user":
        mine = {Principal.user(identity.sub).key}
    elif identity.kind == "service":
        mine = {Principal.service(identity.username).key}
    else:
        return set()
    return mine | {Principal.group(g).key for g in identity.groups}


def new_device_key() -> str:
    """256 random bits, URL-safe: usable as an MQTT password and in HTTP Basic."""
    return secrets.token_urlsafe(32)


def open_store(config: Config, passphrase: str) -> OwnershipStore:
    """The configured backend's store, open (blocking: run it on the store thread)."""
    if config.store.backend == "postgres":
        return PgStore.open(config.store.dsn, passphrase, label="postgres", pool_size=config.store.pool_size)
    return st.Store.open(config.resolve(config.store.path), passphrase, label=config.store.path)


def change_signal(config: Config, store: OwnershipStore, run: Callable[..., Awaitable[Any]]) -> Signal | None:
    """How this process hears of writes made by others: postgres NOTIFY, or, for a worker of
    ``keygate serve --workers N`` over a SQLCipher file, polling the file's change table. None
    for the single process that owns its file (every write is its own)."""
    from ownership.feed import LocalPoll, PgListen
    from proxy.sharing import is_worker

    if isinstance(store, PgStore):
        return PgListen(config.store.dsn)
    if is_worker() and isinstance(store, st.Store):
        return LocalPoll(store.last_change, run)
    return None


class OwnershipService:
    def __init__(self, config: Config, store: OwnershipStore, executor: ThreadPoolExecutor, *, pepper: bytes,
                 audit: AuditLog, clock: Callable[[], float] = time.time, device_ca: DeviceCA | None = None,
                 orion: OrionClient | None = None):
        self.config = config
        self.audit = audit
        # Signs enrolled device certificates; None when tls.client_ca_key is not configured.
        self.device_ca = device_ca
        self._store = store
        self._executor = executor
        self._clock = clock
        # Keyed once: each check copies the keyed state instead of re-deriving it.
        self._hmac = hmac.new(pepper, digestmod=hashlib.sha256)
        # A hash no key maps to, compared against when the device is unknown,
        # so that an unknown id costs what a wrong key costs.
        self._dummy_hash = hmac.new(secrets.token_bytes(32), b"dummy", hashlib.sha256).digest()
        self.facts = MemoryFacts(clock=clock)
        # Device identities are immutable; built once per device and dropped when its facts change.
        self._identities: dict[tuple[str, str, str], Identity] = {}  # (device id, method, credential)
        self.facts.subscribe(self._forget_identities)
        # Set by the MQTT gateway: clears a deleted device's retained messages and session at the
        # broker (raises when it cannot). Owed like Orion's clean-up: a pending_removals row.
        self._broker_clearer: Callable[[str], Awaitable[None]] | None = None
        # With Orion behind the gateway: registration asks it whether the id is taken, and deletion
        # owes it the removal of the entity and subscriptions (rows in the store's pending_removals,
        # struck off as Orion takes them). A device id with removals owed cannot be registered.
        self.orion = orion
        # NGSI writes the gateway has forwarded and Orion not yet answered, per entity id: the
        # clean-up of a deleted device waits for those on its id, and refuses new ones (F2, issue 15).
        self.writes = WritesInFlight(config.ownership.unsettled_write_grace_seconds)
        # Erasures of a user's data running now, and begun so far, per sub (erased_since).
        self._erasing: collections.Counter[str] = collections.Counter()
        self._erasures: collections.Counter[str] = collections.Counter()
        self._in_flight: set[int] = set()        # rows being sent to Orion right now
        self._wake = asyncio.Event()
        self._backing_off = False
        self._retry_task: asyncio.Task[None] | None = None
        self._closed = False
        self._remembering: set[asyncio.Task[None]] = set()
        # The postgres backend's change feed: writes made by other processes (ownership/feed.py).
        self.feed: ChangeFeed | None = None
        self._write_limit = RateLimiter(config.ownership.write_rate_per_user, config.ownership.write_burst_per_user)
        #: Retry-After of a write refused by :meth:`allow_write`: when its bucket holds a write again.
        self.write_retry_after = str(max(1, math.ceil(1 / config.ownership.write_rate_per_user)))

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, config: Config, *, audit: AuditLog, clock: Callable[[], float] = time.time
                   ) -> OwnershipService:
        passphrase = store_key(config)
        device_ca = DeviceCA.from_config(config)  # before the store: a bad CA key fails the start cleanly
        orion = None
        if config.http is not None and config.ownership.orion_lifecycle:   # so is a bad http.upstream_ca
            orion = OrionClient(config.http.upstream, timeout_seconds=config.http.upstream_timeout_seconds,
                                ssl_context=upstream_context(config))
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keygate-store")
        loop = asyncio.get_running_loop()
        try:
            store = await loop.run_in_executor(executor, functools.partial(open_store, config, passphrase))
        except st.StoreError as exc:
            executor.shutdown(wait=False)
            raise ConfigError(str(exc)) from None
        except BaseException:
            executor.shutdown(wait=False)
            raise
        try:
            pepper = await loop.run_in_executor(executor, store.pepper)
            # The snapshot and the change it includes, for the feed (postgres, or several workers on one file).
            applied, snapshot = await loop.run_in_executor(executor, store.load_all_at)
        except st.StoreError as exc:  # e.g. a sealed value that does not open (ownership/sealing.py)
            await loop.run_in_executor(executor, store.close)
            executor.shutdown(wait=False)
            raise ConfigError(str(exc) if str(exc).startswith("store ") else f"store postgres: {exc}") from None
        except BaseException:
            await loop.run_in_executor(executor, store.close)
            executor.shutdown(wait=False)
            raise
        service = cls(config, store, executor, pepper=pepper, audit=audit, clock=clock, device_ca=device_ca,
                      orion=orion)
        service.facts.load(snapshot)
        signal = change_signal(config, store, service._run)
        if signal is not None:
            from ownership.feed import ChangeFeed

            service.feed = ChangeFeed(signal, store, service._run, service.facts, applied=applied,
                                      mark=await service._run(store.change_mark, applied),
                                      max_silence=config.store.feed_max_silence_seconds)
            service.feed.start()
            add_readiness_check("change feed", service.feed.readiness)
        if orion is not None:
            # Clean-up owed from before a restart (or by another worker) is finished from here on.
            service._retry_task = asyncio.create_task(service._retry_removals(), name="keygate-orion-removals")
        DEVICES.set_function(lambda: len(service.facts))
        add_readiness_check("ownership", service._readiness)
        return service

    def _readiness(self) -> tuple[bool, str]:
        return (not self._closed, "store closed" if self._closed else "")

    # ------------------------------------------------------------------ the policy set (policies.source: store)

    async def policy_set(self) -> tuple[int, str, list[tuple[str, str]]] | None:
        """The newest pushed policy set (version, digest, files), or None."""
        return await self._run(self._store.policy_set)

    async def policy_set_version(self) -> int:
        return await self._run(self._store.policy_set_version)

    @property
    def failed_closed(self) -> bool:
        """The change feed has been silent too long: the facts are emptied, not the store's state."""
        return self.feed is not None and self.feed.failed_closed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        remove_readiness_check("ownership")
        if self.feed is not None:
            remove_readiness_check("change feed")
            await self.feed.close()
        if self._remembering:
            await asyncio.gather(*self._remembering, return_exceptions=True)
        if self._retry_task is not None:
            self._retry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry_task
            self._retry_task = None
        if self.orion is not None:
            await self.orion.close()
        await self._run(self._store.close)
        self._executor.shutdown(wait=True)

    def now(self) -> float:
        return self._clock()

    async def _run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a store call on the store thread."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kw))
        except st.StoreUnavailable as exc:
            log.warning("store unavailable: %s", exc)
            raise StoreUnreachable("the store cannot be reached; the change is not confirmed (try again)") from None

    # ------------------------------------------------------------------ device keys

    def hash_key(self, key: str) -> bytes:
        # Keys are 256-bit random, so a keyed fast hash is as strong as a slow
        # one here; the pepper lives inside the encrypted store.
        h = self._hmac.copy()
        h.update(key.encode("utf-8", "surrogatepass"))
        return h.digest()

    async def authenticate_device_key(self, device_id: str, key: str) -> Identity:
        return self.check_device_key(device_id, key)

    def check_device_key(self, device_id: str, key: str) -> Identity:
        """The synchronous key check (in memory, constant time in the key)."""
        if len(key) > MAX_KEY_LENGTH:  # a length is no secret; bounds the hashing cost
            key = ""
        digest = self.hash_key(key)
        stored = self.facts.key_hashes(device_id)
        k1 = stored.get("k1", self._dummy_hash) if stored else self._dummy_hash
        k2 = stored.get("k2", self._dummy_hash) if stored else self._dummy_hash
        # Both comparisons always run (bitwise |, not `or`).
        ok1, ok2 = hmac.compare_digest(digest, k1), hmac.compare_digest(digest, k2)
        if not (ok1 | ok2) or stored is None or not key:
            _KEY_FAILED.inc()
            raise AuthError(AuthReason.UNKNOWN_DEVICE_OR_KEY)
        _KEY_OK.inc()
        slot = "k1" if ok1 else "k2"
        return self._device_identity(device_id, "device_key", f"{slot}:{digest.hex()}")

    def device_identity(self, device_id: str, fingerprint: str) -> Identity:
        """The device a verified client certificate (CN ``device_id``, SHA-256 ``fingerprint`` of its
        DER, hex) authenticates: only one enrolled for the device's current registration does."""
        fingerprint = fingerprint.lower()
        if self.facts.device(device_id) is None:
            raise AuthError(AuthReason.UNKNOWN_DEVICE_OR_KEY)
        enrolled = self.facts.certificate(device_id, fingerprint)
        if enrolled is None:
            # Signed by the device CA but not enrolled: issued for an earlier registration of this
            # id, revoked, replaced by a rollover, or never enrolled.
            raise AuthError(AuthReason.BAD_CERTIFICATE, "certificate not enrolled")
        # The connection ends when the certificate does, as a token's does.
        return self._device_identity(device_id, "certificate", f"cert:{fingerprint}",
                                     expires_at=enrolled["not_after"])

    def _device_identity(self, device_id: str, method: str, credential: str, *,
                         expires_at: float | None = None) -> Identity:
        ident = self._identities.get((device_id, method, credential))
        if ident is not None:
            return ident
        facts = self.facts.device(device_id)
        if facts is None:
            raise AuthError(AuthReason.UNKNOWN_DEVICE_OR_KEY)
        ident = Identity(kind="device", sub=f"device:{device_id}", username=device_id, device_id=device_id,
                         owner_sub=facts.owner_sub, owner_username=facts.owner_username,
                         method=method, credential=credential, expires_at=expires_at)  # type: ignore[arg-type]
        self._identities[(device_id, method, credential)] = ident
        return ident

    def _forget_identities(self, device_ids: set[str] | None) -> None:
        if device_ids is None:
            self._identities.clear()
            return
        for key in [k for k in self._identities if k[0] in device_ids]:
            del self._identities[key]

    def credential_problem(self, identity: Identity) -> str | None:
        """Why a device's connection no longer stands on a valid credential, or None.

        Asked of every open device connection after an ownership change: a deleted or
        re-registered device, a rotated key or a revoked certificate ends what it authorized at once."""
        if not identity.is_device:
            return None
        record = self.facts.record(identity.device_id)
        if record is None:
            return "device deleted"
        if record["owner_sub"] != identity.owner_sub:
            return "device registered again"
        kind, _, value = identity.credential.partition(":")
        if identity.method == "device_key":
            stored = self.facts.key_hashes(identity.device_id) or {}
            current = stored.get(kind)
            if current is None or not hmac.compare_digest(current.hex(), value):
                return f"key {kind} rotated"
        elif identity.method == "certificate" and (
                kind != "cert" or self.facts.certificate(identity.device_id, value) is None):
            return "certificate revoked"
        return None

    # ------------------------------------------------------------------ quotas

    def quota_for(self, identity: Identity) -> int:
        """The configured limit: the highest role override that applies, else the default."""
        own = self.config.ownership
        overrides = [n for role, n in own.role_quotas.items() if role in identity.roles]
        return max(overrides) if overrides else own.max_devices_per_user

    # ------------------------------------------------------------------ devices

    def default_tenant(self) -> str:
        """The tenant of a device recorded without one: ``http.fiware_service``, lower-cased as Orion does."""
        return (self.config.http.fiware_service if self.config.http else "").lower()

    def tenants_for(self, identity: Identity) -> set[str]:
        """The tenants ``identity`` may register devices in: the configured one and its roles' ones."""
        allowed = {self.default_tenant()}
        for role, tenants in self.config.ownership.tenants_by_role.items():
            if role in identity.roles:
                allowed.update(t.lower() for t in tenants)
        return allowed

    async def register_device(self, owner: Identity, fields: dict[str, Any], *, adopt: bool = False,
                              actor: Identity | None = None) -> tuple[dict[str, Any], str, str]:
        """Register a device for ``owner``. Its tenant is ``fields["service"]`` (authorized by the
        caller) or the configured one. An id that Orion already holds in that tenant is refused
        (Conflict) unless ``adopt``: an admin (``actor``) handing the existing entity to ``owner``."""
        actor = actor or owner
        problem = orion_id_problem(fields.get("id")) or orion_id_problem(fields.get("type"), "type")
        if problem:
            raise InvalidInput(problem)
        device_id = fields["id"]
        began = self.erasure_mark(owner.sub)
        if self.erased_since(owner.sub, began):
            raise Conflict("your data is being erased; try again once that is done")
        if await self.removals_owed(device_id):
            self._audit("device.register", actor, device_id, decision="deny", reason="removal_pending")
            raise Conflict(f"device {device_id!r} was deleted and its data is still being removed (from the "
                           "context broker or the MQTT broker); the id can be registered again once that is done")
        if self.facts.record(device_id) is not None:
            raise Conflict(f"device {device_id!r} is already registered")
        tenant = (fields.get("service") or self.default_tenant()).lower()
        if self.orion is not None and not adopt:
            try:
                taken = await self.orion.entity_exists(device_id, tenant)
            except OrionUnavailable as exc:
                log.warning("registration of %s refused: %s", device_id, exc)
                self._audit("device.register", actor, device_id, decision="deny", reason="orion_unreachable")
                raise OrionUnreachable("the context broker cannot be asked whether this id is free; "
                                       "try again later") from None
            if taken:
                self._audit("device.register", actor, device_id, decision="deny", reason="exists_in_orion",
                            service=tenant)
                raise Conflict(f"an entity with id {device_id!r} already exists in the context broker; "
                               "only an administrator can adopt it")
        now = self._clock()
        device = {
            "id": device_id, "type": fields["type"], "name": fields.get("name"), "model": fields.get("model"),
            "location": fields.get("location"), "public": bool(fields.get("public", False)),
            "service": tenant,
            "owner_sub": owner.sub, "owner_username": owner.username, "created_at": now, "updated_at": now,
        }
        k1, k2 = new_device_key(), new_device_key()
        hashes = {"k1": self.hash_key(k1), "k2": self.hash_key(k2)}
        try:
            await self._run(self._store.insert_device, device, hashes, max_devices=self.quota_for(owner))
        except st.QuotaExceeded as exc:
            self._audit("device.register", actor, device["id"], decision="deny", reason="quota_exceeded")
            raise QuotaExceeded(f"you may register at most {exc.limit} devices") from None
        except st.DeviceExists:
            raise Conflict(f"device {device['id']!r} is already registered") from None
        except st.DeviceBeingRemoved:  # owed by another worker, or by a deletion that just committed
            raise Conflict(f"device {device_id!r} was deleted and its data is still being removed from the "
                           "context broker; the id can be registered again once that is done") from None
        self.facts.put_device(device, hashes)
        self.facts.changed({device["id"]})
        extra: dict[str, Any] = {"adopted": True} if adopt else {}
        self._audit("device.register", actor, device["id"], owner=owner.sub, service=tenant, **extra)
        if self.erased_since(owner.sub, began):
            # The owner's erasure began while this was on its way (Orion asked): it may have looked
            # before the row was in, so the device is taken back out, as a deletion would.
            with contextlib.suppress(NotFound):
                await self.delete_device(actor, device_id)
            raise Conflict("your data was erased while the device was being registered; it has not been kept")
        return dict(device), k1, k2

    def get_device(self, device_id: str) -> dict[str, Any] | None:
        """The device with its delegations, from memory."""
        record = self.facts.record(device_id)
        if record is None:
            return None
        return {**record, "delegations": self.facts.delegations_of(device_id)}

    async def load_device(self, device_id: str) -> dict[str, Any] | None:
        """The same, read from the database (the uncached path)."""
        return await self._run(self._store.get_device, device_id)

    def devices_of(self, owner_sub: str) -> list[dict[str, Any]]:
        return [self.get_device(i) for i in sorted(self.facts.owned_by(owner_sub))]  # type: ignore[misc]

    def all_devices(self) -> list[dict[str, Any]]:
        return [self.get_device(i) for i in self.facts.all_ids()]  # type: ignore[misc]

    def delegated_to(self, identity: Identity) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        found = self.facts.delegated_to(principal_keys_of(identity))
        out = []
        for device_id in sorted(found):
            record = self.facts.record(device_id)
            if record is not None and record["owner_sub"] != identity.sub:
                out.append((record, found[device_id]))
        return out

    async def update_device(self, actor: Identity, device_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        if "type" in changes and orion_id_problem(changes["type"], "type"):
            raise InvalidInput(orion_id_problem(changes["type"], "type") or "")
        try:
            row = await self._run(self._store.update_device, device_id, changes, self._clock())
        except st.NotFound:
            raise NotFound(f"no device {device_id!r}") from None
        self.facts.put_device(row)
        self.facts.changed({device_id})
        self._audit("device.update", actor, device_id, fields=sorted(changes))
        return self.get_device(device_id)  # type: ignore[return-value]

    def set_broker_clearer(self, clearer: Callable[[str], Awaitable[None]] | None) -> None:
        """The MQTT gateway's clean-up of a deleted device at the broker (None: no broker)."""
        self._broker_clearer = clearer
        if clearer is not None and self._retry_task is None and not self._closed:
            self._retry_task = asyncio.create_task(self._retry_removals(), name="keygate-removals")

    def _owed_on_delete(self) -> dict[str, Any]:
        """What a deletion queues for later clean-up: at the same instant, in the same transaction."""
        queued = self.orion is not None or self._broker_clearer is not None
        return {"queued_at": self._clock() if queued else None, "orion": self.orion is not None,
                "broker": self._broker_clearer is not None}

    async def delete_device(self, actor: Identity, device_id: str) -> None:
        owed = self._owed_on_delete()
        queued_at = owed["queued_at"]
        with self.writes.closing([device_id]):   # from now on NGSI writes on the id are refused
            try:
                await self._run(functools.partial(self._store.delete_device, device_id, **owed))
            except st.NotFound:
                raise NotFound(f"no device {device_id!r}") from None
            self.facts.remove_device(device_id)
            self.facts.changed({device_id})
            self._audit("device.delete", actor, device_id)
            await self._removed([device_id], queued_at)

    async def _removed(self, device_ids: Iterable[str], queued_at: float | None = None) -> None:
        """Try the clean-up the deletion queued (at ``queued_at``) at once, before the call returns;
        what is not taken now is retried in the background (the deletion itself has happened, and
        the ids stay unregistrable until it is all done)."""
        if queued_at is None:
            return
        ids_now = set(device_ids)
        rows = [r for r in await self._run(self._store.pending_removals)
                if r["created_at"] == queued_at and (r["device_id"] in ids_now or not r["device_id"])]
        await self._settle(rows)

    # ------------------------------------------------------------------ clean-up owed to Orion

    async def removals_owed(self, device_id: str) -> bool:
        """Whether clean-up from this id's earlier registration is still owed (asked of the store,
        which every worker shares; the store checks it again when the device is inserted)."""
        return await self._run(self._store.removals_owed, device_id)

    async def pending_removals(self) -> list[dict[str, Any]]:
        return await self._run(self._store.pending_removals)

    async def _settle(self, rows: list[dict[str, Any]]) -> bool:
        """Send these rows to Orion (a few at a time); whether every one was taken."""
        rows = [r for r in rows if r["id"] not in self._in_flight]
        if not rows:
            return True
        gate = asyncio.Semaphore(8)

        async def one(row: dict[str, Any]) -> bool:
            async with gate:
                return await self._remove_in_orion(row)

        self._in_flight.update(r["id"] for r in rows)
        try:
            done = await asyncio.gather(*(one(r) for r in rows))
        finally:
            self._in_flight.difference_update(r["id"] for r in rows)
        if not all(done) and not self._backing_off:
            self._wake.set()   # the retry loop takes over
        return all(done)

    async def _remove_in_orion(self, row: dict[str, Any]) -> bool:
        if row["kind"] == "broker":
            return await self._clear_at_broker(row)
        if self.orion is None:
            return False  # (Orion clean-up owed from a run with Orion configured: kept until it is again)
        tenant = (row["service"] or self.default_tenant()).lower()
        try:
            if row["kind"] == "entity":
                # A write forwarded before the deletion may still reach Orion: let it land first (bounded;
                # past the bound the removal stays owed and is retried, the id blocked meanwhile).
                if not await self.writes.drained(row["target"], self.orion.timeout_seconds):
                    raise OrionUnavailable(f"writes on entity {row['target']!r} may still reach Orion "
                                           "(in flight, or of unknown outcome)")
                await self.orion.delete_entity(row["target"], tenant)
            else:
                await self.orion.delete_subscription(row["target"], tenant)
        except OrionUnavailable as exc:
            log.warning("removing %s %s from Orion failed (attempt %d): %s; will retry", row["kind"],
                        row["target"], row["attempts"] + 1, exc)
            await self._run(self._store.removal_failed, row["id"])
            return False
        await self._run(self._store.removal_done, row["id"])
        if row["kind"] == "subscription":
            self.facts.remove_subscription(row["target"], row["service"])
        self.audit.record(protocol="ownership", action="orion.remove", decision="allow", resource=row["target"],
                          kind=row["kind"], service=tenant, device=row["device_id"] or None,
                          attempts=row["attempts"] + 1)
        return True

    async def _clear_at_broker(self, row: dict[str, Any]) -> bool:
        clearer = self._broker_clearer
        if clearer is None:
            return False  # no MQTT gateway in this process (yet): kept for one that has it
        try:
            await clearer(row["target"])
        except Exception as exc:
            log.warning("clearing device %s at the MQTT broker failed (attempt %d): %s; will retry",
                        row["target"], row["attempts"] + 1, exc)
            await self._run(self._store.removal_failed, row["id"])
            return False
        await self._run(self._store.removal_done, row["id"])
        return True

    async def _retry_removals(self) -> None:
        """Finish what Orion did not take: at once when woken, then backing off (doubling, capped)."""
        own = self.config.ownership
        delay = own.removal_retry_seconds
        while True:
            self._wake.clear()   # before the round: a failure reported during it wakes the next one
            try:
                rows = await self._run(self._store.pending_removals)
                ok = await self._settle(rows)
            except asyncio.CancelledError:
                raise
            except Exception:   # the loop must outlive one bad round
                log.exception("Orion clean-up round failed")
                ok = False
            if ok:
                delay = own.removal_retry_seconds
                self._backing_off = False
                await self._wake.wait()
                continue
            self._backing_off = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            delay = min(delay * 2, own.removal_retry_max_seconds)

    async def rotate_key(self, actor: Identity, device_id: str, slot: str) -> str:
        if slot not in KEY_SLOTS:
            raise NotFound(f"no key {slot!r}; the keys are k1 and k2")
        key = new_device_key()
        digest = self.hash_key(key)
        now = self._clock()
        try:
            await self._run(self._store.set_key, device_id, slot, digest, now)
        except st.NotFound:
            raise NotFound(f"no device {device_id!r}") from None
        self.facts.set_key(device_id, slot, digest)
        record = self.facts.record(device_id)
        if record is not None:
            record["updated_at"] = now
        self.facts.changed({device_id})
        self._audit("device.rotate_key", actor, device_id, slot=slot)
        return key

    # ------------------------------------------------------------------ certificates

    async def enroll_certificate(self, actor: Identity, device_id: str, csr: bytes) -> dict[str, Any]:
        """Sign the device's CSR with the device CA and enroll the certificate: it authenticates the
        device from now on, with the one enrolled before it (rollover); any older one no longer does.
        Returns the issued certificate (:class:`~ownership.enrollment.Issued` fields) and ``created_at``."""
        record = self.facts.record(device_id)
        if record is None:
            raise NotFound(f"no device {device_id!r}")
        if self.device_ca is None:
            raise EnrollmentUnavailable("certificate enrollment is not configured on this gateway "
                                        "(tls.client_ca_key)")
        ca = self.device_ca
        now = self._clock()

        def sign() -> enrollment.Issued:
            return ca.issue(enrollment.check_csr(csr, device_id), device_id, now)

        try:
            # Off the event loop: an RSA CA key takes milliseconds per signature.
            issued = await asyncio.to_thread(sign)
        except CsrProblem as exc:
            self._audit("certificate.enroll", actor, device_id, decision="deny", reason="invalid_csr")
            raise InvalidInput(str(exc), code="invalid_csr") from None
        row = {"serial": issued.serial, "device_id": device_id, "fingerprint": issued.fingerprint,
               "not_after": issued.not_after, "created_at": now}
        before = {c["serial"] for c in self.facts.certificates_of(device_id)}
        try:
            rows = await self._run(self._store.insert_certificate, row, owner_sub=record["owner_sub"],
                                   keep=enrollment.KEEP)
        except st.NotFound:
            raise NotFound(f"no device {device_id!r}") from None
        self.facts.set_certificates(device_id, rows)
        self.facts.changed({device_id})
        dropped = sorted(before - {c["serial"] for c in rows})
        self._audit("certificate.enroll", actor, device_id, serial=issued.serial,
                    fingerprint=f"sha256:{issued.fingerprint}", not_after=issued.not_after, replaced=dropped)
        return {**dataclasses.asdict(issued), "created_at": now}

    def certificates_of(self, device_id: str) -> list[dict[str, Any]]:
        return self.facts.certificates_of(device_id)

    async def revoke_certificates(self, actor: Identity, device_id: str, serial: str | None = None) -> list[str]:
        """Revoke the device's certificate with this serial (hex), or all of them; returns the serials
        revoked. Connections they authenticated are told at once (``facts.changed``)."""
        if serial is not None:
            normal = enrollment.normal_serial(serial)
            if normal is None:
                raise NotFound(f"no certificate {serial!r} on this device")
            serial = normal
        try:
            gone = await self._run(self._store.delete_certificates, device_id, serial)
        except st.NotFound:
            raise NotFound(f"no certificate {serial!r} on this device") from None
        if gone:
            self.facts.set_certificates(device_id, [c for c in self.facts.certificates_of(device_id)
                                                    if c["serial"] not in gone])
            self.facts.changed({device_id})
        self._audit("certificate.revoke", actor, device_id, serials=gone)
        return gone

    # ------------------------------------------------------------------ delegations

    # ------------------------------------------------------------------ users seen

    async def remember_user(self, identity: Identity) -> None:
        """Record the user name a user's ``sub`` goes by now: what ``{"to": NAME}`` resolves
        through. A write only when it changed; a rename under the user's write rate: tokens that
        give one sub two names in turn would otherwise write a change (that every gateway applies)
        per request. Past the rate the new name is recorded at a later request."""
        if identity.kind != "user" or not identity.sub or not identity.username or self._closed:
            return
        known = self.facts.known_username(identity.sub)
        if known == identity.username:
            return
        if known is not None and not self.allow_write(identity.sub):
            return
        await self._run(self._store.remember_user, identity.sub, identity.username, self._clock())
        self.facts.put_known_user(identity.sub, identity.username)

    def saw_identity(self, identity: Identity) -> None:
        """For the token validator: note a freshly validated user (in the background)."""
        if identity.kind != "user" or self.facts.known_username(identity.sub) == identity.username:
            return
        task = asyncio.ensure_future(self._remember_quietly(identity))
        self._remembering.add(task)
        task.add_done_callback(self._remembering.discard)

    async def _remember_quietly(self, identity: Identity) -> None:
        try:
            await self.remember_user(identity)
        except StoreUnreachable:
            pass  # logged by _run; the name is recorded at this user's next sign-in
        except Exception:
            log.exception("recording the user name of %s failed", identity.sub)

    def resolve_grantee(self, to: Any) -> Principal:
        """The typed principal a delegation's ``to`` names (see ``parse_grantee``); a user name
        through the users this gateway has seen: 404 unknown_user when none goes by it, 409
        ambiguous_user when more than one does (name them by sub then)."""
        parsed = parse_grantee(to)
        if isinstance(parsed, str):
            raise InvalidInput(parsed)
        kind, value = parsed
        if kind == "public":
            return PUBLIC
        if kind == "username":
            subs = self.facts.subs_named(value)
            if not subs:
                raise UnknownUser(f"no user named {value!r} has signed in to this gateway yet; they can sign "
                                  "in once, or name them by subject: {\"user\": SUB}")
            if len(subs) > 1:
                raise AmbiguousUser(f"more than one user has gone by the name {value!r}; name the one you "
                                    "mean by subject: {\"user\": SUB}")
            return Principal.user(next(iter(subs)), value)
        if kind == "user":
            return Principal.user(value, self.facts.known_username(value) or "")
        return Principal(kind, value)  # type: ignore[arg-type]

    def display_name(self, row: dict[str, Any]) -> str:
        """A user grantee's name as last seen (names change), else the one recorded at grant time."""
        if row["grantee_kind"] == "user" and row["grantee_id"]:
            return self.facts.known_username(row["grantee_id"]) or str(row["grantee_name"])
        return str(row["grantee_name"])

    # ------------------------------------------------------------------ delegations

    async def create_delegation(self, actor: Identity, device_id: str, grantee: Principal | str | dict[str, Any],
                                permission: str, expires_at: float | None = None) -> dict[str, Any]:
        """Grant ``grantee`` (a Principal, or the API's ``to``: resolved by :meth:`resolve_grantee`)."""
        if not isinstance(grantee, Principal):
            grantee = self.resolve_grantee(grantee)
        if not grantee.key:
            raise InvalidInput("to must name a principal")
        if permission not in PERMISSIONS:
            raise InvalidInput("permission must be read, write or readwrite")
        row = {"id": uuid.uuid4().hex, "device_id": device_id, "grantee_kind": grantee.kind,
               "grantee_id": "" if grantee.kind == "public" else grantee.id,
               "grantee_name": grantee.name if grantee.kind == "user" else "", "permission": permission,
               "expires_at": expires_at, "granted_by": actor.sub, "granted_by_username": actor.username,
               "created_at": self._clock()}
        try:
            await self._run(self._store.insert_delegation, row)
        except st.NotFound:
            raise NotFound(f"no device {device_id!r}") from None
        self.facts.put_delegation(row)
        self.facts.changed({device_id})
        self._audit("delegation.create", actor, device_id, delegation=row["id"],
                    grantee={"kind": grantee.kind, "id": grantee.id},
                    permission=permission, expires_at=expires_at)
        return dict(row)

    def delegations_of(self, device_id: str) -> list[dict[str, Any]]:
        return self.facts.delegations_of(device_id)

    async def revoke_delegation(self, actor: Identity, device_id: str, delegation_id: str) -> None:
        try:
            await self._run(self._store.delete_delegation, device_id, delegation_id)
        except st.NotFound:
            raise NotFound(f"no delegation {delegation_id!r} on this device") from None
        self.facts.remove_delegation(device_id, delegation_id)
        self.facts.changed({device_id})
        self._audit("delegation.revoke", actor, device_id, delegation=delegation_id)

    # ------------------------------------------------------------------ GDPR

    async def export_user_data(self, identity: Identity) -> dict[str, Any]:
        data = await self._run(self._store.export_user, identity.sub)
        self._audit("me.export", identity, identity.sub)
        return {"user": {"sub": identity.sub, "username": identity.username}, **data}

    def allow_write(self, sub: str) -> bool:
        """Charge one write to ``sub``'s bucket (``ownership.write_rate_per_user``): the ownership API's
        writes and the NGSI subscriptions the gateway records. Each is a change every gateway process
        applies (ownership/feed.py), so one user writing in a loop must not keep them all busy."""
        return self._write_limit.allow(sub)

    def erasure_mark(self, sub: str) -> int:
        """Taken when a request that may add rows tied to ``sub`` begins: see :meth:`erased_since`."""
        return self._erasures[sub]

    def erased_since(self, sub: str, mark: int) -> bool:
        """Whether an erasure of ``sub``'s data is running, or began since ``mark`` was taken: a row
        tied to ``sub`` made by that request may have been added after the erasure looked, and
        must not be kept (one process's view, as :class:`WritesInFlight`)."""
        return self._erasing[sub] > 0 or self._erasures[sub] != mark

    async def erase_user_data(self, identity: Identity) -> dict[str, int]:
        owed = self._owed_on_delete()
        queued_at = owed["queued_at"]
        closing = sorted(self.facts.owned_by(identity.sub))
        self._erasing[identity.sub] += 1   # new rows tied to the user (devices, subscriptions) refused
        self._erasures[identity.sub] += 1
        try:
            with self.writes.closing(closing):   # and NGSI writes on the user's devices
                return await self._erase(identity, owed, queued_at)
        finally:
            self._erasing[identity.sub] -= 1
            if self._erasing[identity.sub] <= 0:
                del self._erasing[identity.sub]

    async def _erase(self, identity: Identity, owed: dict[str, Any], queued_at: float | None) -> dict[str, int]:
        result = await self._run(functools.partial(self._store.erase_user, identity.sub, **owed))
        for device_id in result["owned"]:
            self.facts.remove_device(device_id)
        own = Principal.user(identity.sub).key
        self.facts.remove_delegations_where(
            lambda d: principal_of(d).key == own or d["granted_by"] == identity.sub)
        self.facts.forget_known_user(identity.sub)
        self.facts.remove_subscriptions_of(identity.sub)
        self.facts.changed(set(result["touched"]))
        self._audit("me.erase", identity, identity.sub, counts=result["counts"])
        await self._removed(result["owned"], queued_at)
        counts: dict[str, int] = result["counts"]
        return counts

    async def rows_about(self, sub: str, username: str) -> int:
        return await self._run(self._store.count_rows_mentioning, sub, username)

    # ------------------------------------------------------------------ NGSI subscriptions

    async def record_subscription(self, subscription_id: str, owner: Identity, service: str, *,
                                  entities: Iterable[str] | None = None, unrestricted: bool = False) -> None:
        """Tie a subscription to its creator. With ``entities`` (the subject ids as checked) the
        creator's identity is kept too, so the subscription can be re-checked when access changes;
        ``unrestricted``: an administrator's idPattern subject, which is not re-checked."""
        row = {"entities": tuple(entities or ()), "unrestricted": unrestricted,
               "identity": None if entities is None and not unrestricted else identity_snapshot(owner)}
        await self._run(self._store.insert_subscription, subscription_id, service, owner.sub, owner.username,
                        self._clock(), **row)
        self.facts.put_subscription(subscription_id, service, owner.sub, row)
        self._audit("subscription.record", owner, subscription_id, service=service)

    async def set_subscription_subject(self, subscription_id: str, service: str, *, entities: Iterable[str],
                                       unrestricted: bool = False) -> None:
        """A PATCH changed the subject: re-checks follow the new entities."""
        ids = tuple(entities)
        await self._run(self._store.set_subscription_subject, subscription_id, service, ids, unrestricted)
        self.facts.set_subscription_subject(subscription_id, service, ids, unrestricted)

    def subscription_records(self) -> list[dict[str, Any]]:
        return self.facts.subscription_records()

    def subscription_owner(self, subscription_id: str, service: str) -> str | None:
        return self.facts.subscription_owner(subscription_id, service)

    def subscriptions_of(self, owner_sub: str, service: str) -> set[str]:
        return self.facts.subscriptions_of(owner_sub, service)

    async def forget_subscription(self, subscription_id: str, service: str) -> None:
        await self._run(self._store.delete_subscription, subscription_id, service)
        self.facts.remove_subscription(subscription_id, service)

    # ------------------------------------------------------------------ audit

    def _audit(self, action: str, actor: Identity, resource: str, *, decision: str = "allow",
               reason: str | None = None, **extra: Any) -> None:
        self.audit.record(protocol="ownership", action=action, decision=decision, resource=resource,
                          identity=actor, reason=reason, **extra)
