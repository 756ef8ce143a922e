"""Per-address admission of connections that have not authenticated yet (sans-IO).

A stranger can open connections for free; each one costs the gateway a socket,
a session and a TLS state until its CONNECT deadline. :class:`AddressLimiter`
bounds what one address can hold and how fast it can open more:

* ``per_address``: connections of one address not yet past CONNACK, at once;
* ``rate`` / ``burst``: a token bucket of new connections per address (every
  new connection takes a token, whatever becomes of it).

0 turns either off. An address is an IPv4 address or an IPv6 /64 (one host or
one subscriber line: an attacker who holds a /64 has 2**64 addresses); an
IPv4-mapped IPv6 address counts as its IPv4 address.

Refusals are reported for the audit at most once per ``report_every`` seconds
per address, with the number folded into the line; :meth:`due_reports` hands
out what is left when nothing else comes, so no refusal goes unrecorded.

The table stays bounded: an entry that holds no connection, has a full bucket
and nothing left to report is the same as no entry and is dropped; past
``max_entries`` the idle entries go first (an address that churns through
more than ``max_entries`` others gets a fresh bucket: the gateway's
``max_connections`` still bounds what it holds; their unreported refusals are
kept for the next :meth:`due_reports`). Entries holding connections never
number more than the connections themselves, so the gateway sizes the table
well above ``max_connections``.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

__all__ = ["AddressLimiter", "ReconnectPenalty", "RefusalFolder", "address_key", "PENALIZED_CLOSES", "PER_ADDRESS",
           "RATE", "RECONNECT_PENALTY", "CONNECTIONS_PER_IDENTITY"]

PER_ADDRESS = "unauthenticated_per_address"
RATE = "unauthenticated_rate_per_address"
RECONNECT_PENALTY = "reconnect_penalty"
CONNECTIONS_PER_IDENTITY = "connections_per_identity"
# Closes that earn the identity (and address) a reconnect back-off: flooding, not mistakes.
PENALIZED_CLOSES = frozenset({"rate_limited", "quota_exceeded"})


def address_key(host: str) -> str:
    """The key an address is counted under: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class _Entry:
    __slots__ = ("held", "tokens", "stamp", "refused", "report_at")

    def __init__(self, tokens: float, now: float):
        self.held = 0             # connections of this address not yet authenticated
        self.tokens = tokens      # the bucket, as of ``stamp``
        self.stamp = now
        self.refused: dict[str, int] = {}  # refusals not yet reported, by reason
        self.report_at = 0.0      # no report before this


class AddressLimiter:
    def __init__(self, per_address: int, rate: float, burst: int, *, max_entries: int,
                 clock: Callable[[], float] = time.monotonic, report_every: float = 1.0):
        self.per_address = max(int(per_address), 0)
        self.rate = max(float(rate), 0.0)
        self.burst = float(max(burst, 1))
        self.max_entries = max(int(max_entries), 1)
        self.clock = clock
        self.report_every = report_every
        self._entries: dict[str, _Entry] = {}
        self._unreported: set[str] = set()  # keys with refusals folded, waiting for their report
        self._evicted: list[tuple[str, dict[str, int]]] = []  # reports of entries pruned before they were due

    @property
    def enabled(self) -> bool:
        return bool(self.per_address or self.rate)

    def __len__(self) -> int:
        return len(self._entries)

    def held(self, key: str) -> int:
        entry = self._entries.get(key)
        return entry.held if entry is not None else 0

    def admit(self, key: str) -> tuple[str | None, int]:
        """A new connection from ``key``: ``(None, 0)`` if admitted (it holds a place until
        :meth:`release`), else ``(reason, count)``: ``count`` > 0 means audit now, for that many
        refusals; 0 means the refusal was folded into a later report."""
        now = self.clock()
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.max_entries:
                self._prune(now)
            entry = self._entries[key] = _Entry(self.burst, now)
        reason = None
        if self.per_address and entry.held >= self.per_address:
            reason = PER_ADDRESS
        elif self.rate:
            tokens = entry.tokens + (now - entry.stamp) * self.rate
            entry.tokens = tokens if tokens < self.burst else self.burst
            entry.stamp = now
            if entry.tokens < 1.0:
                reason = RATE
            else:
                entry.tokens -= 1.0
        if reason is None:
            entry.held += 1
            return None, 0
        entry.refused[reason] = entry.refused.get(reason, 0) + 1
        if now >= entry.report_at:
            count = sum(entry.refused.values())
            entry.refused.clear()
            entry.report_at = now + self.report_every
            self._unreported.discard(key)
            return reason, count
        self._unreported.add(key)
        return reason, 0

    def release(self, key: str) -> None:
        """A connection admitted for ``key`` authenticated or ended."""
        entry = self._entries.get(key)
        if entry is None or entry.held <= 0:
            return
        entry.held -= 1
        if not entry.held and self._idle(entry, self.clock()):
            del self._entries[key]

    def due_reports(self, *, everything: bool = False) -> list[tuple[str, dict[str, int]]]:
        """Folded refusals whose report is due (all of them with ``everything``): (key, counts)."""
        out, self._evicted = self._evicted, []
        if not self._unreported:
            return out
        now = self.clock()
        for key in list(self._unreported):
            entry = self._entries.get(key)
            if entry is None:
                self._unreported.discard(key)
                continue
            if everything or now >= entry.report_at:
                out.append((key, dict(entry.refused)))
                entry.refused.clear()
                entry.report_at = now + self.report_every
                self._unreported.discard(key)
        return out

    @property
    def reports_pending(self) -> bool:
        return bool(self._unreported or self._evicted)

    def _idle(self, entry: _Entry, now: float) -> bool:
        """Holds nothing, owes no report, and its bucket is full again (or there is none)."""
        if entry.held or entry.refused:
            return False
        return not self.rate or entry.tokens + (now - entry.stamp) * self.rate >= self.burst

    def _prune(self, now: float) -> None:
        entries = self._entries
        for key in [k for k, e in entries.items() if self._idle(e, now)]:
            del entries[key]
        # Then the oldest entries that hold no connection (their buckets go with them, their
        # unreported refusals are kept) until a tenth of the table is free: one sweep pays for
        # many admissions.
        target = self.max_entries - max(self.max_entries // 10, 1)
        if len(entries) <= target:
            return
        for key in [k for k, e in entries.items() if not e.held]:
            if len(entries) <= target:
                break
            entry = entries.pop(key)
            if entry.refused:
                self._evicted.append((key, entry.refused))
            self._unreported.discard(key)


class _Penalty:
    __slots__ = ("delay", "until", "refused", "report_at")

    def __init__(self) -> None:
        self.delay = 0.0       # the back-off last given
        self.until = 0.0       # new connections refused before this
        self.refused = 0       # refusals not yet reported
        self.report_at = 0.0


class ReconnectPenalty:
    """A rising back-off for keys (identities, addresses) closed for flooding.

    A client closed by the rate limit that reconnects at once costs a TLS
    handshake and a token check per round, for nothing. :meth:`penalize` gives
    ``key`` a back-off of ``initial`` seconds, doubled at each penalty that comes
    while the last one is still remembered (up to ``maximum``); a key not
    penalized again for ``2 * maximum`` after its back-off ended starts again at
    ``initial``. :meth:`refused` says whether a new connection of ``key`` is
    refused now, with the AddressLimiter's folding of the audit (at most one line
    per ``report_every`` seconds per key; :meth:`due_reports` hands out the rest).
    ``maximum`` 0 turns it off. At most ``max_entries`` keys are remembered (the
    oldest forgotten first).
    """

    def __init__(self, initial: float, maximum: float, *, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic, report_every: float = 1.0):
        self.initial = max(float(initial), 0.001)
        self.maximum = max(float(maximum), 0.0)
        self.max_entries = max(int(max_entries), 1)
        self.clock = clock
        self.report_every = report_every
        self._entries: dict[str, _Penalty] = {}
        self._unreported: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.maximum > 0

    def penalize(self, key: str) -> float:
        """``key`` was closed for flooding: its new back-off (seconds)."""
        if not self.maximum:
            return 0.0
        now = self.clock()
        entries = self._entries
        entry = entries.pop(key, None)  # re-inserted last: the dict's order is the age
        if entry is None:
            if len(entries) >= self.max_entries:
                self._prune(now)
            entry = _Penalty()
        if entry.delay and now < entry.until + 2 * self.maximum:
            entry.delay = min(entry.delay * 2, self.maximum)
        else:
            entry.delay = min(self.initial, self.maximum)
        entry.until = max(entry.until, now + entry.delay)
        entries[key] = entry
        return entry.delay

    def refused(self, key: str) -> tuple[bool, int]:
        """Is a new connection of ``key`` refused now? ``(True, count)``: count > 0 means audit
        now for that many refusals, 0 that it was folded into a later report."""
        entry = self._entries.get(key)
        if entry is None:
            return False, 0
        now = self.clock()
        if now >= entry.until:
            return False, 0
        entry.refused += 1
        if now >= entry.report_at:
            count, entry.refused = entry.refused, 0
            entry.report_at = now + self.report_every
            self._unreported.discard(key)
            return True, count
        self._unreported.add(key)
        return True, 0

    def due_reports(self, *, everything: bool = False) -> list[tuple[str, int]]:
        out = []
        now = self.clock()
        for key in list(self._unreported):
            entry = self._entries.get(key)
            if entry is None or not entry.refused:
                self._unreported.discard(key)
                continue
            if everything or now >= entry.report_at:
                out.append((key, entry.refused))
                entry.refused = 0
                entry.report_at = now + self.report_every
                self._unreported.discard(key)
        return out

    @property
    def reports_pending(self) -> bool:
        return bool(self._unreported)

    def __len__(self) -> int:
        return len(self._entries)

    def _prune(self, now: float) -> None:
        entries = self._entries
        for key in [k for k, e in entries.items() if now >= e.until + 2 * self.maximum and not e.refused]:
            del entries[key]
        target = self.max_entries - max(self.max_entries // 10, 1)
        for key in list(entries):
            if len(entries) <= target:
                break
            if key not in self._unreported:
                del entries[key]


class RefusalFolder:
    """Refusals folded into at most one audit line per key (an address, an identity) and
    ``report_every`` seconds, with per-reason counts: nothing is lost from the record, and the
    lines per key per second are bounded. At most ``max_entries`` keys owe a report; past that
    the oldest are handed out early (:meth:`due_reports`), so memory stays bounded too."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, report_every: float = 1.0,
                 max_entries: int = 100_000):
        self.clock = clock
        self.report_every = report_every
        self.max_entries = max_entries
        self._next_report: dict[str, float] = {}       # key -> when its next line may be written
        self._owed: dict[str, dict[str, int]] = {}      # key -> reason -> refusals not yet written
        self._evicted: list[tuple[str, dict[str, int]]] = []

    def note(self, key: str, reason: str) -> dict[str, int] | None:
        """One refusal: the counts to audit now, or None (folded into a later line)."""
        now = self.clock()
        if len(self._next_report) > self.max_entries:
            for k in [k for k, at in self._next_report.items() if at <= now and k not in self._owed]:
                del self._next_report[k]
        owed = self._owed.pop(key, {})
        owed[reason] = owed.get(reason, 0) + 1
        if now >= self._next_report.get(key, float("-inf")):
            self._next_report[key] = now + self.report_every
            return owed
        if len(self._owed) >= self.max_entries:
            oldest = next(iter(self._owed))
            self._evicted.append((oldest, self._owed.pop(oldest)))
        self._owed[key] = owed
        return None

    def due_reports(self, *, everything: bool = False) -> list[tuple[str, dict[str, int]]]:
        out, self._evicted = self._evicted, []
        now = self.clock()
        for key in list(self._owed):
            if everything or now >= self._next_report.get(key, float("-inf")):
                out.append((key, self._owed.pop(key)))
                self._next_report[key] = now + self.report_every
        for key in [k for k, at in self._next_report.items() if at <= now and k not in self._owed]:
            del self._next_report[key]  # (a quiet key: its next refusal is written at once)
        return out

    @property
    def reports_pending(self) -> bool:
        return bool(self._owed or self._evicted)
