"""Who one MQTT connection is, and what it says besides its writes.

One :class:`Context` per session, shared by the session's pieces (the publish gate, the
delivery gate, the subscribe gate, the Will): the facts every piece reads (identity, client id,
protocol level, peer), and what a :meth:`~proxy.mqtt.session.Session.handle` call gathers for the
shell besides the writes: audit records, refusals folded to one line per second, metric counts
and the allowed messages counted in plain integers. The session is the one writer of the
facts; it takes the records and counts at the end of every call (:meth:`take_counts`), so each
call's commands say what that call did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.identity.model import Identity
from proxy.mqtt.audit_summary import ConnectionSummary
from proxy.mqtt.commands import Metric, Record

__all__ = ["ALLOWED_PUBLISH", "ALLOWED_RECEIVE", "ALLOW_COUNT", "DENY_COUNT", "RATE_LIMITED", "TO_BROKER", "TO_CLIENT",
           "Context"]

# The counters the session asks the shell to add to (proxy.mqtt.server holds them).
ALLOW_COUNT = {a: Metric("decisions", (a, "allow")) for a in ("publish", "subscribe", "receive", "will")}
DENY_COUNT = {a: Metric("decisions", (a, "deny")) for a in ("publish", "subscribe", "receive", "will")}
RATE_LIMITED = Metric("rate_limited")
ALLOWED_PUBLISH = ALLOW_COUNT["publish"]
ALLOWED_RECEIVE = ALLOW_COUNT["receive"]
TO_BROKER = Metric("messages", ("client_to_broker",))
TO_CLIENT = Metric("messages", ("broker_to_client",))


class Context:
    __slots__ = ("_clock", "_folds", "client_id", "counts", "delivered", "forwarded", "handed", "identity",
                 "level", "peer", "published", "records", "summary")

    def __init__(self, clock: Callable[[], float], peer: str = "") -> None:
        self._clock = clock             # monotonic: when a folded refusal may have its next line
        self.identity: Identity | None = None
        self.client_id = ""             # as the client knows it
        self.level = 0                  # the protocol level of its CONNECT (MQTT_5, 4, 3), 0 before
        self.peer = peer
        self.records: list[Record] = []  # this call's audit lines
        self.counts: dict[Metric, int] = {}  # this call's counts, besides the messages below
        # Allowed publishes / deliveries, and PUBLISH packets passed on per direction, not yet counted.
        self.published = 0
        self.delivered = 0
        self.forwarded = 0
        self.handed = 0
        self.summary = ConnectionSummary()  # the close record's counts (audit_summary.py)
        # Refusals audited one line per second at most: kind -> [refused since the last line,
        # clock() of the next line allowed, the fields of the last refusal].
        self._folds: dict[str, list[Any]] = {}

    @property
    def sub(self) -> str | None:
        return self.identity.sub if self.identity is not None else None

    def count(self, metric: Metric, n: int = 1) -> None:
        self.counts[metric] = self.counts.get(metric, 0) + n

    def take_counts(self) -> list[tuple[Metric, int]]:
        """What the call counted. Allowed messages are counted in plain integers, in bulk.
        (On the hot path: one call per chunk read, so no helper calls here.)"""
        counts = self.counts
        if counts:
            out = list(counts.items())
            counts.clear()
        else:
            out = []
        summary = self.summary
        n = self.published
        if n:
            out.append((ALLOWED_PUBLISH, n))
            self.published = 0
        n = self.delivered
        if n:
            out.append((ALLOWED_RECEIVE, n))
            summary.delivered += n
            self.delivered = 0
        n = self.forwarded
        if n:
            out.append((TO_BROKER, n))
            summary.published += n  # forwarded: a held QoS 2 counts at its release
            self.forwarded = 0
        n = self.handed
        if n:
            out.append((TO_CLIENT, n))
            self.handed = 0
        return out

    def audit(self, action: str, decision: str, *, identity: Identity | None = None, resource: str = "",
              rule: str | None = None, reason: str | None = None, **extra: Any) -> None:
        extra = {k: v for k, v in extra.items() if v is not None}
        if self.peer:
            extra["peer"] = self.peer
        if self.client_id and "client_id" not in extra:
            extra["client_id"] = self.client_id
        self.records.append(Record(action, decision, resource,
                                   identity if identity is not None else self.identity, rule, reason, extra))

    def audit_folded(self, kind: str, action: str, **fields: Any) -> None:
        """A refusal a client can repeat at will: one line per second at most per kind, with the
        number refused since the last line (``count``); what is left is written at close."""
        now = self._clock()
        fold = self._folds.get(kind)
        if fold is None:
            fold = self._folds[kind] = [0, 0.0, None]
        fold[0] += 1
        if now >= fold[1]:
            fold[1] = now + 1.0
            self.audit(action, "deny", count=fold[0], **fields)
            fold[0] = 0
        else:
            fold[2] = (action, fields)

    def flush_folds(self) -> None:
        """The refusals folded since their last line, written now (the connection ends)."""
        for fold in self._folds.values():
            if fold[0] and fold[2] is not None:
                action, fields = fold[2]
                self.audit(action, "deny", count=fold[0], **fields)
                fold[0] = 0
        self._folds.clear()
