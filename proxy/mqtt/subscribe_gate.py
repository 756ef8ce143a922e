"""Subscribe and unsubscribe handling: which filters of a client's SUBSCRIBE go upstream.

One :class:`SubscribeGate` per session (sans-IO). It is the one writer of the connection's
:class:`~proxy.mqtt.subscriptions.SubscriptionTable` (the delivery gate and the session's
re-decisions read it) and owns its share of the identity's quota
(:class:`~proxy.mqtt.subscriptions.HeldSlots`) and the SUBACKs it waits for to merge.

Each filter of a SUBSCRIBE, in order: over ``topic_max_bytes`` → refused, never decoded nor
asked of the policy; a new filter over ``subscriptions_per_connection`` → refused; else the
policy decides (``$share/<group>/`` stripped first); allowed but over the identity's quota →
refused; allowed → the table records it and it goes upstream, a shared group made the
identity's own (:meth:`upstream_filter`). What each refusal costs (counts, audit lines) is the
session's, from the :class:`FilterOutcome` list, so it orders the commands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from proxy.identity.model import Identity
from proxy.mqtt import codec
from proxy.mqtt.handshake import escape_sub
from proxy.mqtt.packets import V3_SUBACK_FAILURE, Reason, Suback, Subscribe, Subscription
from proxy.mqtt.subscriptions import HeldSlots, SubscriptionQuota, SubscriptionTable
from proxy.policy.decision import SubscribeDecision, Verdict

if TYPE_CHECKING:
    from proxy.mqtt.session import Policies

__all__ = ["ALLOWED", "DENIED", "OVER_CONNECTION", "OVER_IDENTITY", "TOO_LONG", "FilterOutcome",
           "SubscribeGate", "SubscribePlan"]

# What became of one filter.
ALLOWED = "allowed"
DENIED = "denied"                 # the policy said no
TOO_LONG = "too_long"             # over topic_max_bytes: never decoded
OVER_CONNECTION = "connection"    # over subscriptions_per_connection
OVER_IDENTITY = "identity"        # over the identity's quota (allowed by the policy)


class FilterOutcome:
    __slots__ = ("decision", "kind", "subscription")

    def __init__(self, kind: str, subscription: Subscription, decision: SubscribeDecision | None) -> None:
        self.kind = kind
        self.subscription = subscription
        self.decision = decision      # None: the policy was not asked


class SubscribePlan:
    """A SUBSCRIBE decided: ``slots`` the SUBACK codes in order (None: the broker's answer),
    ``keep`` the filters for the broker (upstream form), ``forward_unchanged`` whether the
    packet can go as it came."""

    __slots__ = ("forward_unchanged", "keep", "outcomes", "slots")

    def __init__(self, outcomes: list[FilterOutcome], slots: list[int | None], keep: list[Subscription],
                 forward_unchanged: bool) -> None:
        self.outcomes = outcomes
        self.slots = slots
        self.keep = keep
        self.forward_unchanged = forward_unchanged


class SubscribeGate:
    __slots__ = ("_awaiting", "_held", "_mono", "_per_connection", "_policies", "_subs", "_wallclock")

    def __init__(self, *, policies: Policies, subscriptions: SubscriptionTable, quota: SubscriptionQuota | None,
                 per_connection: int, wallclock: Callable[[], float],
                 mono: Callable[[float | None], float | None]) -> None:
        self._policies = policies
        self._subs = subscriptions
        self._held = HeldSlots(quota)   # this connection's share of the identity's quota
        self._per_connection = per_connection
        self._wallclock = wallclock     # the `now` of the policy question
        self._mono = mono               # a grant's end (unix time) on the session clock
        self._awaiting: dict[int, list[int | None]] = {}  # packet id -> SUBACK codes to merge

    @property
    def quota(self) -> SubscriptionQuota | None:
        return self._held.quota

    def subscribe(self, sub: Subscribe, ident: Identity, client_id: str, v5: bool) -> SubscribePlan:
        outcomes: list[FilterOutcome] = []
        slots: list[int | None] = []
        keep: list[Subscription] = []
        deny_code = Reason.NOT_AUTHORIZED if v5 else V3_SUBACK_FAILURE
        quota_code = Reason.QUOTA_EXCEEDED if v5 else V3_SUBACK_FAILURE
        table = self._subs
        for s in sub.subscriptions:
            if s.too_long:
                # Never decoded, never asked of the policy: the shared decision cache only ever
                # holds filters of at most topic_max_bytes (its keys are bounded by that).
                outcomes.append(FilterOutcome(TOO_LONG, s, None))
                slots.append(Reason.TOPIC_FILTER_INVALID if v5 else V3_SUBACK_FAILURE)
                continue
            _, inner = codec.split_shared(s.topic_filter)
            new = s.topic_filter not in table
            if new and len(table) >= self._per_connection:
                # Bounded state per connection: each filter costs memory here and at the broker.
                outcomes.append(FilterOutcome(OVER_CONNECTION, s, None))
                slots.append(quota_code)
                continue
            d = self._policies.may_subscribe(ident, inner, qos=s.qos, client_id=client_id, now=self._wallclock())
            verdict = d.verdict
            if verdict is Verdict.DENY:
                table.refused(s.topic_filter)
                outcomes.append(FilterOutcome(DENIED, s, d))
                slots.append(deny_code)
            elif new and not self._held.take(ident.sub):
                outcomes.append(FilterOutcome(OVER_IDENTITY, s, d))
                slots.append(quota_code)
            else:
                table.subscribed(s.topic_filter, inner, s.qos, verdict, self._mono(d.until), d.devices)
                outcomes.append(FilterOutcome(ALLOWED, s, d))
                keep.append(Subscription(self.upstream_filter(s.topic_filter, ident), s.options))
                slots.append(None)
        unchanged = len(keep) == len(slots) and all(
            k.topic_filter == s.topic_filter for k, s in zip(keep, sub.subscriptions, strict=False))
        if keep and not unchanged:
            self._awaiting[sub.packet_id] = slots
        return SubscribePlan(outcomes, slots, keep, unchanged)

    def merged_suback(self, sa: Suback) -> Suback | None:
        """The broker's SUBACK with the gateway's refusals put back in place, or None: it
        answers a SUBSCRIBE that went as it came."""
        slots = self._awaiting.pop(sa.packet_id, None)
        if slots is None:
            return None
        codes = iter(sa.reasons)
        merged = [s if s is not None else next(codes, Reason.UNSPECIFIED_ERROR) for s in slots]
        return Suback(sa.packet_id, merged, sa.properties)

    def unsubscribe(self, topic_filters: list[str], ident: Identity | None) -> list[str]:
        """The table changes now, in stream order, as the broker's will; the filters as the
        broker gets them."""
        self._held.give_back(self._subs.unsubscribed(topic_filters))
        return [self.upstream_filter(f, ident) for f in topic_filters]

    def close(self) -> None:
        """Every slot given back: the identity's other connections may use them."""
        self._held.give_back_all()

    @staticmethod
    def upstream_filter(topic_filter: str, ident: Identity | None) -> str:
        """The filter as the broker gets it. A shared subscription's group is made the identity's
        own: otherwise anyone could join another's ``$share/<group>/...`` and take a share of its
        deliveries (the broker hands each message to one member; the gateway would drop the
        stranger's copies, and the rightful member would never see them)."""
        group, inner = codec.split_shared(topic_filter)
        if group is None:
            return topic_filter
        owner = escape_sub(ident.sub if ident is not None else "").replace("+", "%2B").replace("#", "%23")
        return f"$share/{owner}~{group}/{inner}"
