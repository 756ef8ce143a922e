"""The HTTP gateway's per-request outcomes (audit record, request counter, latencies), handed over
once per turn of the event loop instead of once per request.

A turn of the loop under load answers many requests. Their audit records go to the log in one
:meth:`~proxy.audit.AuditLog.record_many` (one write instead of one per line: a line-buffered
file makes every line a system call), and the request counter is raised once per
(decision, status) seen in the turn. The latencies are counted into their buckets here
(:class:`LatencyTally`) and added to the histograms once per bucket: ``Histogram.observe`` takes
a lock for the sum and one for the bucket it finds by a linear search, per request and twice.
Every record is still written, in the order the requests
ended, before anything else the loop does next; :meth:`Outcomes.flush` at the gateway's close
writes what is left. The labelled children of the metrics are looked up once, not per request.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Hashable
from typing import Any

from prometheus_client import Counter, Histogram

from proxy.audit import AuditLog

log = logging.getLogger("keygate.http")


class LatencyTally:
    """One histogram's observations since its last :meth:`flush`: their count per bucket and their sum.

    A flush leaves the histogram as ``observe`` of each would have (the bucket of an amount is
    the first whose upper bound is not below it), but for the sum's rounding: it adds the turn's
    sum, not each amount. Reads ``prometheus_client``'s ``_upper_bounds``, ``_buckets`` and ``_sum``
    (pinned in constraints.txt; tests/unit/test_http_outcomes.py holds the two to each other)."""

    __slots__ = ("_bounds", "_counts", "_histogram", "_sum", "pending")

    def __init__(self, histogram: Histogram):
        self._histogram = histogram
        self._bounds = tuple(histogram._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self.pending = False

    def add(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds
        self.pending = True

    def flush(self) -> None:
        if not self.pending:
            return
        counts, self._counts = self._counts, [0] * len(self._bounds)
        total, self._sum = self._sum, 0.0
        self.pending = False
        self._histogram._sum.inc(total)
        for bucket, n in zip(self._histogram._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


class Outcomes:
    def __init__(self, audit: AuditLog, requests: Counter, latency: Histogram, upstream_latency: Histogram):
        self.audit = audit
        self._requests = requests
        self._latency = latency
        self._upstream = LatencyTally(upstream_latency)
        self._records: list[dict[str, Any]] = []
        self._keys: list[Hashable] = []   # each record's body by name (AuditLog.record_many)
        self._counts: dict[tuple[str, str], int] = {}
        self._counters: dict[tuple[str, str], Any] = {}   # (decision, status) -> its labelled counter
        self._tallies: dict[str, LatencyTally] = {}       # decision -> its labelled histogram's tally
        self._scheduled = False

    def add(self, decision: str, status: int, elapsed: float, record: dict[str, Any], key: Hashable) -> None:
        """One request's outcome; ``key`` names its audit record's body (equal for records equal in
        every field but latency_ms)."""
        tally = self._tallies.get(decision)
        if tally is None:
            tally = self._tallies[decision] = LatencyTally(self._latency.labels(decision))
        tally.add(elapsed)
        counted = (decision, str(status))   # not ``key``: that names the record's body
        self._counts[counted] = self._counts.get(counted, 0) + 1
        self._records.append(record)
        self._keys.append(key)
        self._schedule()

    def upstream_answered(self, elapsed: float) -> None:
        """Orion's answer (its head) came ``elapsed`` seconds after the request went to it."""
        self._upstream.add(elapsed)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        for tally in self._tallies.values():
            tally.flush()
        self._upstream.flush()
        records, self._records = self._records, []
        keys, self._keys = self._keys, []
        counts, self._counts = self._counts, {}
        for key, n in counts.items():
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = self._requests.labels(*key)
            counter.inc(n)
        if records:
            try:
                self.audit.record_many(records, keys)
            except Exception:  # a broken log must not take the gateway down; the next turn tries again
                log.exception("%d HTTP audit records could not be written", len(records))
