"""The HTTP gateway's per-request outcomes (audit record, request counter, latency), handed over
once per turn of the event loop instead of once per request.

A turn of the loop under load answers many requests. Their audit records go to the log in one
:meth:`~proxy.audit.AuditLog.record_many` (one write instead of one per line: a line-buffered
file makes every line a system call), and the request counter is raised once per
(decision, status) seen in the turn. Every record is still written, in the order the requests
ended, before anything else the loop does next; :meth:`Outcomes.flush` at the gateway's close
writes what is left. The labelled children of the metrics are looked up once, not per request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import Counter, Histogram

from proxy.audit import AuditLog

log = logging.getLogger("keygate.http")


class Outcomes:
    def __init__(self, audit: AuditLog, requests: Counter, latency: Histogram):
        self.audit = audit
        self._requests = requests
        self._latency = latency
        self._records: list[dict[str, Any]] = []
        self._counts: dict[tuple[str, str], int] = {}
        self._counters: dict[tuple[str, str], Any] = {}   # (decision, status) -> its labelled counter
        self._histograms: dict[str, Any] = {}             # decision -> its labelled histogram
        self._scheduled = False

    def add(self, decision: str, status: int, elapsed: float, record: dict[str, Any]) -> None:
        histogram = self._histograms.get(decision)
        if histogram is None:
            histogram = self._histograms[decision] = self._latency.labels(decision)
        histogram.observe(elapsed)
        key = (decision, str(status))
        self._counts[key] = self._counts.get(key, 0) + 1
        self._records.append(record)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        records, self._records = self._records, []
        counts, self._counts = self._counts, {}
        for key, n in counts.items():
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = self._requests.labels(*key)
            counter.inc(n)
        if records:
            try:
                self.audit.record_many(records)
            except Exception:  # a broken log must not take the gateway down; the next turn tries again
                log.exception("%d HTTP audit records could not be written", len(records))
