"""Withdraw NGSI subscriptions whose creator has lost read access to their subject.

Orion keeps notifying a subscriber for as long as the subscription exists; it
knows nothing of keygate's owners, delegations or policies. Access is checked
when a subscription is created, so when that access goes (the device is
deleted or re-registered by someone else, a delegation is revoked or expires,
the public flag is cleared, a policy edit), the subscription has to go too.

The decision is sans-IO (:func:`revocations`: records and a ``still_allowed``
callable in, keys out); :class:`SubscriptionGuard` is the shell. It listens
to ownership changes and policy swaps, re-checks the affected subscriptions a
moment later (changes come in bursts), deletes the denied ones in Orion, then
forgets them in the store. Deletions Orion did not take are retried every
second; a periodic sweep re-checks everything, which catches delegations that
expire without a write. The guard also keeps a mirror of the recorded subscriptions:
one that leaves the store without the guard or the gateway doing it (the
owner erasing their data) is deleted in Orion as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from prometheus_client import Counter
from yarl import URL

from proxy.http import plan as planning
from proxy.identity.model import identity_from_snapshot
from proxy.metrics import REGISTRY

if TYPE_CHECKING:
    from proxy.identity.model import Identity
    from proxy.services import Services

log = logging.getLogger("keygate.http.subscriptions")

REVOKED = Counter("keygate_http_subscriptions_revoked", "NGSI subscriptions withdrawn from Orion by the guard",
                  ["reason"], registry=REGISTRY)
REVOKE_FAILURES = Counter("keygate_http_subscription_revoke_failures",
                          "Attempts to delete a withdrawn subscription that Orion did not take (retried)",
                          registry=REGISTRY)

Key = tuple[str, str]   # (service, subscription id)


def key_of(record: dict[str, Any]) -> Key:
    return record["service"], record["id"]


def revocations(records: Iterable[dict[str, Any]], still_allowed: Callable[[dict[str, Any], str], bool],
                devices: set[str] | None = None) -> list[Key]:
    """The subscriptions to withdraw: those whose creator may no longer read every subject entity.

    ``devices`` narrows the check to subscriptions on these entities (None: all). Unrestricted
    (an administrator's idPattern subject) and legacy records (no identity kept) are left alone.
    """
    out = []
    for r in records:
        if r["unrestricted"] or r["identity"] is None:
            continue
        if devices is not None and devices.isdisjoint(r["entities"]):
            continue
        if not all(still_allowed(r, entity) for entity in r["entities"]):
            out.append(key_of(r))
    return out


class NgsiHandler(Protocol):
    """What the guard uses of the gateway's handler: the pooled session to Orion (None while the
    gateway is stopped), the URL of an Orion path and the context a request is planned against."""

    session: aiohttp.ClientSession | None

    def _url(self, path: str, query: tuple[tuple[str, str], ...]) -> URL: ...

    def context(self, identity: Identity, tenant: str) -> planning.Context: ...


class SubscriptionGuard:
    def __init__(self, services: Services, handler: NgsiHandler, *, debounce_seconds: float = 0.1,
                 sweep_seconds: float = 30.0, retry_seconds: float = 1.0):
        self.services = services
        self.handler = handler              # the gateway's handler: its pooled session and upstream URL
        self.debounce = debounce_seconds
        self.sweep = sweep_seconds
        self.retry = retry_seconds
        self._known: dict[Key, dict[str, Any]] = {}
        self._pending: dict[Key, tuple[dict[str, Any], str]] = {}   # to delete in Orion: record, reason
        self._dirty: set[str] | None = set()
        self._wake = asyncio.Event()
        self._unsubscribe: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._last_sweep = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self, _app: Any = None) -> None:
        self._known = {key_of(r): r for r in self.services.ownership.subscription_records()}
        self._unsubscribe = [self.services.ownership.facts.subscribe(self._on_facts),
                             self.services.policies.subscribe(self._on_policies)]
        self._last_sweep = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._loop(), name="keygate-subscription-guard")

    async def stop(self, _app: Any = None) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ------------------------------------------------------------------ events

    def _on_facts(self, device_ids: set[str] | None) -> None:
        if device_ids is None or self._dirty is None:
            self._dirty = None
        else:
            self._dirty |= device_ids
        self._wake.set()

    def _on_policies(self, _policies: Any) -> None:
        self._dirty = None
        self._wake.set()

    def recorded(self, subscription_id: str, service: str) -> None:
        """The gateway recorded it: mirror it now, so an erasure before the next round is seen."""
        record = self.services.ownership.facts.subscription_record(subscription_id, service)
        if record is not None:
            self._known[service, subscription_id] = record

    def forgotten(self, subscription_id: str, service: str) -> None:
        """The gateway deleted it on its owner's request: not an erasure to act on."""
        self._known.pop((service, subscription_id), None)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Withdrawals Orion did not take are retried soon; otherwise wait for a change or the sweep.
            timeout = self.retry if self._pending else max(0.0, self._last_sweep + self.sweep - loop.time())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
                await asyncio.sleep(self.debounce)      # let a burst of changes land first
            except TimeoutError:
                pass
            self._wake.clear()
            devices, self._dirty = self._dirty, set()
            now = loop.time()
            if now - self._last_sweep >= self.sweep:
                devices = None          # the periodic sweep (expiries); a trickle of changes cannot starve it
            if devices is None:
                self._last_sweep = now
            try:
                await self.run_once(devices)
            except asyncio.CancelledError:
                raise
            except Exception:   # the guard must outlive one bad round; the next sweep retries
                log.exception("subscription re-check failed")

    # ------------------------------------------------------------------ one round

    async def run_once(self, devices: set[str] | None = None) -> None:
        if self.services.ownership.failed_closed:
            # The facts are emptied because the feed is silent, not because anything was revoked or
            # erased: withdrawing now would delete every user's subscription at the shared Orion. The
            # catch-up once the feed is back replaces every fact and wakes a full round.
            return
        current = {key_of(r): r for r in self.services.ownership.subscription_records()}
        for key in self._known.keys() - current.keys():
            self._pending[key] = (self._known[key], "owner data erased")
        self._known = current
        for key in revocations(current.values(), self._still_allowed, devices):
            self._pending.setdefault(key, (current[key], "read access withdrawn"))
        for key, (record, reason) in list(self._pending.items()):
            if not await self._delete_upstream(record):
                continue
            del self._pending[key]
            service, sub_id = key
            if self.services.ownership.subscription_owner(sub_id, service) is not None:
                await self.services.ownership.forget_subscription(sub_id, service)
            self._known.pop(key, None)
            REVOKED.labels(reason).inc()
            identity = identity_from_snapshot(record["identity"]) if record["identity"] else None
            self.services.audit.record(protocol="http", action="subscription.revoke", decision="deny",
                                       resource=f"/v2/subscriptions/{sub_id}", identity=identity, rule=None,
                                       reason=reason, service=service, devices=list(record["entities"]))

    def _still_allowed(self, record: dict[str, Any], entity: str) -> bool:
        # The same check as at creation (tenant, then policy), for the identity recorded then.
        ctx = self.handler.context(identity_from_snapshot(record["identity"]), record["service"])
        return planning.may_read(ctx, entity).allowed

    async def _delete_upstream(self, record: dict[str, Any]) -> bool:
        """Whether Orion no longer has it (deleted now, or already gone)."""
        session = self.handler.session
        if session is None:
            return False
        headers = {"Fiware-Service": record["service"]} if record["service"] else {}
        try:
            async with session.delete(self.handler._url(f"/v2/subscriptions/{record['id']}", ()),
                                      headers=headers, allow_redirects=False) as r:
                if r.status in (200, 204, 404):
                    return True
                log.warning("Orion answered %s to deleting withdrawn subscription %s; will retry",
                            r.status, record["id"])
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("could not delete withdrawn subscription %s: %s; will retry", record["id"],
                        type(exc).__name__)
        REVOKE_FAILURES.inc()
        return False
