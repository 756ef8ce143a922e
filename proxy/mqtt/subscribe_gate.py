"""Subscribe and unsubscribe handling: which filters of a client's SUBSCRIBE go upstream.

One :class:`SubscribeGate` per session (sans-IO). It is the one writer of the connection's
:class:`~proxy.mqtt.subscriptions.SubscriptionTable` (the delivery gate and the session's
re-decisions read it) and owns its share of the identity's quota
(:class:`~proxy.mqtt.subscriptions.HeldSlots`) and the SUBACKs it waits for to merge.

Each filter of a SUBSCRIBE, in order: over ``topic_max_bytes`` → refused (v5 0x8F, 3.1.1
0x80), never decoded nor asked of the policy, so the shared decision cache only holds filters
within the limit (an UNSUBSCRIBE filter over it: v5 DISCONNECT 0x8F, 3.1.1 a close); a new
filter over ``subscriptions_per_connection`` → refused; else the policy decides
(``$share/<group>/`` stripped first); allowed but over the identity's quota → refused;
allowed → the table records it and it goes upstream, a shared group made the identity's own
(:meth:`upstream_filter`). A filter takes a slot of the quota when it is forwarded (a denied
one takes none; a held one re-subscribed takes no second); its slot is given back when an
UNSUBSCRIBE of it is forwarded and, for all, when the connection closes. Refused filters are
answered in the SUBACK (0x80 / 0x87, 0x8F, 0x97); all refused → the gateway answers alone;
the broker's SUBACK is merged back in order. Each refusal is counted and audited (those a
client can repeat at will folded to a line per second,
:meth:`~proxy.mqtt.context.Context.audit_folded`).

Rate limit: each filter of a SUBSCRIBE or UNSUBSCRIBE costs one token, the packet refused whole
before the policy is asked: ``disconnect`` → v5 DISCONNECT 0x96 / close; ``drop`` → SUBACK
0x97 / 0x80 for every filter, v5 UNSUBACK 0x80 for every filter, or in 3.1.1 (whose UNSUBACK
cannot refuse) a close. What ends the connection is returned as an
:class:`~proxy.mqtt.output.End`.

The table's grants are re-decided (:meth:`SubscribeGate.redecide`) on invalidation,
re-authentication and at their earliest end; every change drops the cached deliveries, which
may rest on a grant that just went.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.config import MqttConfig
from proxy.identity.model import Identity
from proxy.mqtt import codec
from proxy.mqtt.codec import Frame
from proxy.mqtt.context import ALLOW_COUNT, DENY_COUNT, RATE_LIMITED, Context
from proxy.mqtt.decisions import DecisionCaches
from proxy.mqtt.handshake import escape_sub
from proxy.mqtt.output import End, Output
from proxy.mqtt.packets import MQTT_5, V3_SUBACK_FAILURE, Reason, Suback, Subscribe, Subscription, Unsubscribe
from proxy.mqtt.policies import Policies
from proxy.mqtt.subscriptions import HeldSlots, SubscriptionQuota, SubscriptionTable
from proxy.policy.decision import SubscribeDecision, Verdict
from proxy.ratelimit import RateLimiter

__all__ = ["ALLOWED", "DENIED", "OVER_CONNECTION", "OVER_IDENTITY", "TOO_LONG", "FilterOutcome",
           "SubscribeGate", "SubscribePlan"]

# What became of one filter.
ALLOWED = "allowed"
DENIED = "denied"                 # the policy said no
TOO_LONG = "too_long"             # over topic_max_bytes: never decoded
OVER_CONNECTION = "connection"    # over subscriptions_per_connection
OVER_IDENTITY = "identity"        # over the identity's quota (allowed by the policy)
# The audit reason of a filter refused over a cap.
_OVER = {OVER_CONNECTION: "too many subscriptions for the connection",
         OVER_IDENTITY: "too many subscriptions for the identity"}


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
    __slots__ = ("_awaiting", "_cx", "_decisions", "_held", "_limiter", "_mono", "_per_connection", "_policies",
                 "_rate_action", "_subs", "_topic_max", "_wallclock")

    def __init__(self, *, config: MqttConfig, policies: Policies, context: Context,
                 subscriptions: SubscriptionTable, decisions: DecisionCaches, quota: SubscriptionQuota | None,
                 rate_limiter: RateLimiter | None, wallclock: Callable[[], float],
                 mono: Callable[[float | None], float | None]) -> None:
        self._policies = policies
        self._cx = context
        self._subs = subscriptions
        self._decisions = decisions     # its receive map is dropped whenever the table changes
        self._held = HeldSlots(quota)   # this connection's share of the identity's quota
        self._limiter = rate_limiter
        self._rate_action = config.rate_limit.action
        self._topic_max = config.limits.topic_max_bytes
        self._per_connection = config.limits.subscriptions_per_connection
        self._wallclock = wallclock     # the `now` of the policy question
        self._mono = mono               # a grant's end (unix time) on the session clock
        self._awaiting: dict[int, list[int | None]] = {}  # packet id -> SUBACK codes to merge

    @property
    def quota(self) -> SubscriptionQuota | None:
        return self._held.quota

    def subscribe(self, acts: Output, frame: Frame, data: memoryview | None) -> End | None:
        """The client's SUBSCRIBE."""
        cx = self._cx
        level = cx.level
        sub = codec.decode_subscribe(frame.body, level, self._topic_max)
        ident = cx.identity
        if ident is None:
            raise RuntimeError("ident is not set")
        v5 = level == MQTT_5
        n = len(sub.subscriptions)
        if self._rate_refused("subscribe", ident, n, sub.subscriptions[0].topic_filter):
            if self._rate_action == "disconnect":
                return End("rate_limited", "subscribe", Reason.MESSAGE_RATE_TOO_HIGH)
            acts.end_run()  # drop: every filter refused, nothing reaches the broker
            code = Reason.QUOTA_EXCEEDED if v5 else V3_SUBACK_FAILURE
            acts.to_client.append(codec.encode_suback(Suback(sub.packet_id, [code] * n), level))
            return None
        plan = self.plan(sub, ident, cx.client_id, v5)
        for o in plan.outcomes:
            s, d = o.subscription, o.decision
            if d is not None:
                cx.summary.decided("subscribe", s.topic_filter, d)
            if o.kind is ALLOWED:
                cx.count(ALLOW_COUNT["subscribe"])
                continue
            cx.count(DENY_COUNT["subscribe"])
            if o.kind is DENIED and d is not None:
                cx.audit("subscribe", "deny", identity=ident, resource=s.topic_filter, rule=d.rule, reason=d.reason,
                         qos=s.qos)
            else:
                cx.audit_folded(f"subscribe:{o.kind}", "subscribe", identity=ident, resource=s.topic_filter,
                                reason=_OVER[o.kind] if o.kind is not TOO_LONG else
                                f"topic filter of {s.too_long} bytes exceeds the limit of {self._topic_max}",
                                qos=s.qos)
        self._decisions.clear_receive()
        if plan.forward_unchanged:
            acts.forward(acts.to_broker, frame, data)
            return None
        acts.end_run()
        if not plan.keep:
            acts.to_client.append(codec.encode_suback(Suback(sub.packet_id, plan.slots), level))  # type: ignore[arg-type]
            return None
        acts.to_broker.append(codec.encode_subscribe(Subscribe(sub.packet_id, plan.keep, sub.properties), level))
        return None

    def unsubscribe(self, acts: Output, frame: Frame, data: memoryview | None) -> End | None:
        """The client's UNSUBSCRIBE: the table changes now, in stream order, as the broker's will."""
        cx = self._cx
        level = cx.level
        unsub = codec.decode_unsubscribe(frame.body, level, self._topic_max)
        ident = cx.identity
        if ident is None:
            raise RuntimeError("ident is not set")
        if self._rate_refused("unsubscribe", ident, len(unsub.topic_filters), unsub.topic_filters[0]):
            if self._rate_action == "disconnect":
                return End("rate_limited", "unsubscribe", Reason.MESSAGE_RATE_TOO_HIGH)
            if level != MQTT_5:  # a 3.1.1 UNSUBACK can only say yes
                return End("rate_limited", "unsubscribe")
            acts.end_run()  # drop: UNSUBACK has no quota code; the filters stay subscribed
            acts.to_client.append(codec.encode_unsuback(
                unsub.packet_id, [Reason.UNSPECIFIED_ERROR] * len(unsub.topic_filters), level))
            return None
        # What the broker still delivers under these filters is checked like anything the
        # table cannot prove.
        self._held.give_back(self._subs.unsubscribed(unsub.topic_filters))
        upstream = [self.upstream_filter(f, ident) for f in unsub.topic_filters]
        self._decisions.clear_receive()
        if upstream == unsub.topic_filters:
            acts.forward(acts.to_broker, frame, data)
        else:
            acts.end_run()
            acts.to_broker.append(codec.encode_unsubscribe(
                Unsubscribe(unsub.packet_id, upstream, unsub.properties), level))
        return None

    def suback(self, acts: Output, frame: Frame, data: memoryview | None) -> None:
        """The broker's SUBACK, merged with the gateway's refusals if it answers a SUBSCRIBE
        that went upstream changed."""
        level = self._cx.level
        merged = self.merged_suback(codec.decode_suback(frame.body, level))
        if merged is None:
            acts.forward(acts.to_client, frame, data)
            return
        acts.end_run()
        acts.to_client.append(codec.encode_suback(merged, level))

    def redecide(self, devices: frozenset[str] | None = None) -> None:
        """Ask the policy again for the grants (those resting on ``devices``, or all), for the
        identity in force now."""
        ident = self._cx.identity
        if ident is None:
            raise RuntimeError("ident is not set")
        client_id = self._cx.client_id

        def decide(match: str, qos: int) -> tuple[Verdict, float | None, frozenset[str]]:
            d = self._policies.may_subscribe(ident, match, qos=qos, client_id=client_id, now=self._wallclock())
            return d.verdict, self._mono(d.until), d.devices

        self._subs.redecide(decide, None if devices is None else set(devices))
        self._decisions.clear_receive()

    def _rate_refused(self, action: str, ident: Identity, n: int, resource: str) -> bool:
        """Charge ``n`` filters to the identity's rate limit, as publishes are: True (counted, and
        audited one line per second at most) when over it."""
        if self._limiter is None or self._limiter.allow(ident.sub, cost=n):
            return False
        self._cx.count(RATE_LIMITED)
        self._cx.audit_folded(f"{action}:rate", action, identity=ident, resource=resource, reason="rate limit",
                              filters=n)
        return True

    def plan(self, sub: Subscribe, ident: Identity, client_id: str, v5: bool) -> SubscribePlan:
        """Decide each filter of ``sub`` (the table and the quota change for the allowed ones)."""
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
