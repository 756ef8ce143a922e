"""Persistent broker sessions per identity, and the subscriptions they keep (sans-IO).

A connection's subscriptions are charged to its identity's quota
(``subscriptions_per_identity``) and given back when it closes. A persistent
session (3.1.1 ``clean_session=0``, v5 Session Expiry above 0) keeps them at
the broker after the close, with a queue, so an identity cycling client ids
could make Mosquitto hold without bound. :class:`PersistentSessions` bounds it:

* at most ``per_identity`` persistent sessions (client ids) per identity, the
  connected and the parked ones together; one more is refused at CONNECT
  (v5 CONNACK 0x97, 3.1.1 CONNACK 3);
* when a persistent session's connection closes, the filters it subscribed
  (joined to what earlier connections of the same session left) stay charged
  to the identity until the session can no longer exist at the broker: its
  expiry (v5: the client's, capped to ``expiry_seconds``, which the gateway
  also tells the broker; 3.1.1: ``expiry_seconds``, which Mosquitto's
  ``persistent_client_expiration`` must not exceed), or a clean-start
  connect of the same client id, or the gateway clearing it (a deleted device);
* a parked session's filters unsubscribed by a later connection stay charged
  (that connection's table does not know them) until one of the above: the
  count errs on the side of the broker holding more, never less.

The state is per process (like the quota and the rate limiter): with several
keygate processes in front of one broker, each bounds what it let in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from proxy.mqtt.subscriptions import SubscriptionQuota

__all__ = ["PersistentSessions", "PERSISTENT_SESSIONS"]

PERSISTENT_SESSIONS = "persistent_sessions_per_identity"


class _Record:
    __slots__ = ("sub", "filters", "connected", "expires_at")

    def __init__(self, sub: str):
        self.sub = sub
        self.filters: frozenset[str] = frozenset()  # charged to ``sub`` while parked
        self.connected = 0
        self.expires_at = float("inf")


class PersistentSessions:
    def __init__(self, per_identity: int, expiry_seconds: float, quota: SubscriptionQuota, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_identity = per_identity
        self.expiry_seconds = expiry_seconds
        self.quota = quota  # a SubscriptionQuota (charge / release), or None
        self.clock = clock
        self._records: dict[str, _Record] = {}       # upstream client id -> record
        self._by_sub: dict[str, set[str]] = {}       # identity -> its client ids

    def __len__(self) -> int:
        return len(self._records)

    def of(self, sub: str) -> int:
        self._expire(sub)
        return len(self._by_sub.get(sub, ()))

    def admit(self, sub: str, client_id: str, *, clean_start: bool, expiry: float) -> bool:
        """A CONNECT of ``sub`` authenticated for broker client id ``client_id``: ``expiry``
        seconds of session after the close (0: none). False: one persistent session too many."""
        self._expire(sub)
        record = self._records.get(client_id)
        if record is not None and (clean_start or record.sub != sub):
            self.forget(client_id)  # the broker starts this session afresh
            record = None
        if record is None:
            if expiry <= 0:
                return True  # nothing outlives this connection
            ids = self._by_sub.setdefault(sub, set())
            if len(ids) >= self.per_identity:
                if not ids:
                    del self._by_sub[sub]
                return False
            record = self._records[client_id] = _Record(sub)
            ids.add(client_id)
        record.connected += 1
        record.expires_at = float("inf")
        return True

    def closed(self, client_id: str, filters: Iterable[str], expiry: float) -> None:
        """A connection of a persistent session ended with ``filters`` subscribed; the session
        lives on at the broker for ``expiry`` seconds (0: it ends now)."""
        record = self._records.get(client_id)
        if record is None or not record.connected:
            return
        record.connected -= 1
        if expiry <= 0:
            if not record.connected:
                self.forget(client_id)
            return
        kept = record.filters | frozenset(filters)
        if self.quota is not None and len(kept) > len(record.filters):
            self.quota.charge(record.sub, len(kept) - len(record.filters))
        record.filters = kept
        if not record.connected:
            record.expires_at = self.clock() + expiry

    def forget(self, client_id: str) -> None:
        """The session is gone at the broker: its filters are no longer charged."""
        record = self._records.pop(client_id, None)
        if record is None:
            return
        if self.quota is not None and record.filters:
            self.quota.release(record.sub, len(record.filters))
        ids = self._by_sub.get(record.sub)
        if ids is not None:
            ids.discard(client_id)
            if not ids:
                del self._by_sub[record.sub]

    def _expire(self, sub: str) -> None:
        ids = self._by_sub.get(sub)
        if not ids:
            return
        now = self.clock()
        for client_id in [c for c in ids if self._records[c].expires_at <= now]:
            self.forget(client_id)
