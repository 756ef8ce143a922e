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
  ``persistent_client_expiration`` must not exceed), or the close of a
  clean-start connection of the same client id that replaced it, or the
  gateway clearing it (a deleted device);
* a parked session's filters unsubscribed by a later connection stay charged
  (that connection's table does not know them) until one of the above: the
  count errs on the side of the broker holding more, never less.

Connections of one client id may overlap (a takeover: the broker kicks the old
one when the new CONNECT reaches it, and the gateway hears of the old close
later). Each admission gets a :class:`Handle` (a generation); a close counts
against its own handle only, a record is never expired while any connection of
its client id is open, a clean start releases what was parked only when it is
known to have replaced it (it reached the broker, alone, and was admitted
last), and a close that finds no record is charged anyway.

The state is per process (like the quota and the rate limiter): with several
keygate processes in front of one broker, each bounds what it let in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from proxy.mqtt.subscriptions import SubscriptionQuota

__all__ = ["PERSISTENT_SESSIONS", "Handle", "PersistentSessions"]

PERSISTENT_SESSIONS = "persistent_sessions_per_identity"


class _Record:
    __slots__ = ("sub", "filters", "live", "latest", "expires_at", "counted")

    def __init__(self, sub: str) -> None:
        self.sub = sub
        self.filters: frozenset[str] = frozenset()  # charged to ``sub`` while parked
        self.live: set[int] = set()  # generations of the connections of this client id still open
        self.latest = 0  # the generation admitted last
        self.expires_at = float("-inf")  # the broker may keep it until then (once none is live)
        self.counted = False  # in ``_by_sub``: persistent, or holding filters a connection left


class Handle:
    """One admitted connection of a client id: :meth:`PersistentSessions.closed` counts its close
    against its own generation only (a kicked connection's late close cannot end its successor's)."""

    __slots__ = ("client_id", "sub", "generation", "sole", "clean", "sent", "reached", "open")

    def __init__(self, client_id: str, sub: str, generation: int) -> None:
        self.client_id = client_id
        self.sub = sub
        self.generation = generation
        self.sole = True  # no other connection of the id was open when it was admitted
        self.clean = False
        self.sent = False  # its CONNECT went to a connected broker (set by the shell): before, none of it is there
        self.reached = False  # the broker accepted its CONNECT (set by the shell at the CONNACK)
        self.open = True


class PersistentSessions:
    def __init__(self, per_identity: int, expiry_seconds: float, quota: SubscriptionQuota | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_identity = per_identity
        self.expiry_seconds = expiry_seconds
        self.quota = quota  # a SubscriptionQuota (charge / release), or None
        self.clock = clock
        self._records: dict[str, _Record] = {}       # upstream client id -> record
        self._by_sub: dict[str, set[str]] = {}       # identity -> its client ids
        self._generation = 0

    def __len__(self) -> int:
        return len(self._records)

    def of(self, sub: str) -> int:
        self._expire(sub)
        return len(self._by_sub.get(sub, ()))

    def admit(self, sub: str, client_id: str, *, clean_start: bool, expiry: float) -> Handle | None:
        """A CONNECT of ``sub`` authenticated for broker client id ``client_id``: ``expiry``
        seconds of session after the close (0: none). None: one persistent session too many;
        otherwise the handle its close is reported with."""
        self._expire(sub)
        self._generation += 1
        handle = Handle(client_id, sub, self._generation)
        record = self._records.get(client_id)
        handle.sole = record is None or not record.live
        handle.clean = clean_start
        if record is not None and record.sub != sub:
            self._rehome(client_id, record, sub)
        # A clean start does not release what is parked here yet: the broker drops it only when
        # this CONNECT reaches it, and another connection of the id may still resume it first.
        new_session = expiry > 0 and (record is None or not record.counted)
        if new_session and len(self._by_sub.get(sub, ())) >= self.per_identity:
            return None
        if record is None:
            # Kept for every open connection, persistent or not: one that takes this one over
            # without a clean start resumes what it subscribed.
            record = self._records[client_id] = _Record(sub)
        if expiry > 0:
            self._count(client_id, record)
        record.live.add(handle.generation)
        record.latest = handle.generation
        return handle

    def reached(self, handle: Handle) -> None:
        """The broker accepted ``handle``'s CONNECT (its CONNACK went out). A clean start that was
        alone and is still the last admitted has replaced whatever was parked: released now."""
        if handle.reached or not handle.open:
            return
        handle.reached = handle.sent = True
        record = self._records.get(handle.client_id)
        if (record is not None and handle.clean and handle.sole and record.latest == handle.generation
                and record.live == {handle.generation}):
            self._keep_only(record, frozenset())
            record.expires_at = float("-inf")

    def closed(self, handle: Handle, filters: Iterable[str], expiry: float) -> None:
        """A connection ended with ``filters`` subscribed; its session lives on at the broker for
        ``expiry`` seconds (0: it ends now).

        The expiry only grows, except for the one case where the broker's session is known to be
        this connection's: it reached the broker, was admitted last, and alone (nothing older was
        open, so no upstream CONNECT of the id can have raced it)."""
        if not handle.open:
            return
        handle.open = False
        if not handle.sent:  # the upstream dial failed or never happened: nothing of it is at the broker
            filters, expiry = (), 0
        client_id = handle.client_id
        record = self._records.get(client_id)
        if record is not None:
            record.live.discard(handle.generation)
        if expiry > 0 and record is None:
            # Its record is gone (a clear racing it): count anyway, the broker may keep this
            # session; erring on counting, even above ``per_identity``.
            record = self._records[client_id] = _Record(handle.sub)
        if record is not None:
            # Even at expiry 0: another connection of the id may have resumed what this one left.
            kept = record.filters | frozenset(filters)
            if self.quota is not None and len(kept) > len(record.filters):
                self.quota.charge(record.sub, len(kept) - len(record.filters))
            record.filters = kept
            if expiry > 0 or kept:
                self._count(client_id, record)  # (even above ``per_identity``: it is held)
        if record is not None:
            until = self.clock() + expiry if expiry > 0 else float("-inf")
            if handle.reached and handle.sole and record.latest == handle.generation and not record.live:
                if handle.clean:  # what the broker keeps is this connection's alone
                    self._keep_only(record, frozenset(filters) if expiry > 0 else frozenset())
                record.expires_at = until
            else:
                record.expires_at = max(record.expires_at, until)
        if record is not None and not record.live and record.expires_at <= self.clock():
            self.forget(client_id)

    def forget(self, client_id: str) -> None:
        """The session is gone at the broker: its filters are no longer charged."""
        record = self._records.pop(client_id, None)
        if record is None:
            return
        if self.quota is not None and record.filters:
            self.quota.release(record.sub, len(record.filters))
        self._uncount(client_id, record)

    def _count(self, client_id: str, record: _Record) -> None:
        if not record.counted:
            record.counted = True
            self._by_sub.setdefault(record.sub, set()).add(client_id)

    def _uncount(self, client_id: str, record: _Record) -> None:
        ids = self._by_sub.get(record.sub)
        if ids is not None:
            ids.discard(client_id)
            if not ids:
                del self._by_sub[record.sub]

    def _rehome(self, client_id: str, record: _Record, sub: str) -> None:
        """The client id is now another identity's (a device registered anew): its count and
        charges move with it (the broker's session is one, whoever connects)."""
        if self.quota is not None and record.filters:
            self.quota.release(record.sub, len(record.filters))
            self.quota.charge(sub, len(record.filters))
        self._uncount(client_id, record)
        record.sub = sub
        if record.counted:
            self._by_sub.setdefault(sub, set()).add(client_id)

    def _keep_only(self, record: _Record, filters: frozenset[str]) -> None:
        dropped = len(record.filters - filters)
        if self.quota is not None and dropped:
            self.quota.release(record.sub, dropped)
        record.filters = filters  # (already charged: they were just joined to the record's)

    def _expire(self, sub: str) -> None:
        ids = self._by_sub.get(sub)
        if not ids:
            return
        now = self.clock()
        for client_id in [c for c in ids if not self._records[c].live and self._records[c].expires_at <= now]:
            self.forget(client_id)
