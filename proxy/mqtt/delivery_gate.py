"""The delivery gate: may the client receive this broker → client PUBLISH?

Every delivery is checked (sans-IO, one :class:`DeliveryGate` per session). A topic an ALLOW
grant of the subscription table proves (an exact filter by a set lookup, a wildcard one by
matching) passes; otherwise ``policies.may_receive`` decides. The answer is kept in the
session's receive cache (:class:`~proxy.mqtt.decisions.DecisionCaches`, bounded there), so the
next delivery on the topic is one dictionary lookup; the fast path
(:func:`proxy.mqtt.fastpath.broker_deliveries`, called by the session itself: one Python call
less per chunk read) walks the same map and the table's exact grants.

The gate owns no state of its own beyond the references it is given: the table belongs to the
subscription handling, the cache to :mod:`proxy.mqtt.decisions`; what a decision costs
(counts, the audit line, the dropped message's acknowledgement) stays with the session, which
orders the commands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.identity.model import Identity
from proxy.mqtt import codec
from proxy.mqtt.decisions import DecisionCaches
from proxy.mqtt.subscriptions import SubscriptionTable
from proxy.policy.decision import Decision

if TYPE_CHECKING:
    from proxy.mqtt.session import Policies

__all__ = ["DeliveryGate", "Undecided"]


class Undecided:
    """A delivery the cache had no answer for, decided now: what the session audits."""

    __slots__ = ("allowed", "decision", "topic")

    def __init__(self, topic: str, allowed: bool, decision: Decision | None) -> None:
        self.topic = topic            # decoded (and checked) on this miss only
        self.allowed = allowed
        self.decision = decision      # None: a grant of the table proved it, no policy asked


class DeliveryGate:
    __slots__ = ("_decisions", "_mono", "_policies", "_subs", "_wallclock")

    def __init__(self, *, policies: Policies, subscriptions: SubscriptionTable, decisions: DecisionCaches,
                 wallclock: Callable[[], float], mono: Callable[[float | None], float | None]) -> None:
        self._policies = policies
        self._subs = subscriptions
        self._decisions = decisions
        self._wallclock = wallclock   # the `now` of the policy question
        self._mono = mono             # a decision's end (unix time) on the session clock

    def cached(self, topic: bytes) -> bool | None:
        """The answer given before for ``topic`` while it holds, or None."""
        return self._decisions.receive.get(topic)

    def decide(self, topic_b: bytes, identity: Identity | None, client_id: str) -> Undecided:
        """Decide a delivery the cache has no answer for, and cache the answer."""
        topic = codec.topic_from_bytes(topic_b)
        decision = None
        ok = self._subs.covers(topic)  # an ALLOW grant proves it
        if not ok:
            if identity is None:
                raise RuntimeError("a delivery before authentication")
            decision = self._policies.may_receive(identity, topic, client_id=client_id, now=self._wallclock())
            ok = bool(decision.allowed)
            self._decisions.ends_at(self._mono(decision.until))
        self._decisions.put_receive(topic_b, ok)
        return Undecided(topic, ok, decision)
