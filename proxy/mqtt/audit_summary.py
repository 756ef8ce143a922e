"""What the audit log records of one MQTT connection's allowed traffic: a summary at close.

A line per allowed message (200,000 a second on a busy gateway) is a record nobody
reads; denials keep their own lines (folded per second). So each connection that
got past CONNECT ends with one ``"action":"session","decision":"summary"``
record holding:

* ``messages``: how many publishes were forwarded and deliveries handed to the
  client, exact (from the counts the fast paths keep per chunk);
* ``decisions``: the policy decisions made, counted by (kind, topic or filter,
  decision, rule): ``publish`` and ``receive`` once per topic per decision-cache
  lifetime, ``subscribe`` per filter asked for. At most :data:`MAX_KEYS` keys;
  the rest are counted in ``decisions_other``.

Sans-IO and cheap: :meth:`decided` is called where the policy is asked (never on
the fast paths), :meth:`add_messages` once per chunk.
"""

from __future__ import annotations

from typing import Any

from proxy.policy.decision import Decision, SubscribeDecision

MAX_KEYS = 32            # distinct (kind, topic, decision, rule) kept per connection
MAX_TOPIC_CHARS = 256    # a longer topic or filter is kept cut (the audit log bounds lines too)


class ConnectionSummary:
    __slots__ = ("counts", "other", "published", "delivered")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str, str], int] = {}
        self.other = 0
        self.published = 0   # publishes forwarded to the broker
        self.delivered = 0   # deliveries handed to the client

    def decided(self, kind: str, topic: str, decision: Decision | SubscribeDecision | None) -> None:
        """One policy decision (None: allowed by a subscription grant, no rule asked)."""
        allowed = True if decision is None else decision.allowed
        rule = (decision.rule or "") if decision is not None else "subscription"
        key = (kind, topic[:MAX_TOPIC_CHARS], "allow" if allowed else "deny", rule)
        counts = self.counts
        if key in counts:
            counts[key] += 1
        elif len(counts) < MAX_KEYS:
            counts[key] = 1
        else:
            self.other += 1

    def add_messages(self, published: int, delivered: int) -> None:
        self.published += published
        self.delivered += delivered

    def fields(self) -> dict[str, Any]:
        """The extra fields of the close record."""
        out: dict[str, Any] = {
            "messages": {"published": self.published, "delivered": self.delivered},
            "decisions": [{"kind": k, "topic": t, "decision": d, **({"rule": r} if r else {}), "count": n}
                          for (k, t, d, r), n in self.counts.items()],
        }
        if self.other:
            out["decisions_other"] = self.other
        return out
