"""The delivery gate: broker → client PUBLISH, and the broker's acknowledgements.

Every delivery is checked (sans-IO, one :class:`DeliveryGate` per session). A topic an ALLOW
grant of the subscription table proves (an exact filter by a set lookup, a wildcard one by
matching) passes; otherwise ``policies.may_receive`` decides. The answer is kept in the
session's receive cache (:class:`~proxy.mqtt.decisions.DecisionCaches`, bounded there), so the
next delivery on the topic is one dictionary lookup; the fast path
(:func:`proxy.mqtt.fastpath.broker_deliveries`, called by the session itself: one Python call
less per chunk read) walks the same map and the table's exact grants.

A dropped delivery never reaches the client: QoS 1 → PUBACK to the broker; QoS 2 → PUBREC,
then PUBCOMP on the broker's PUBREL (:meth:`DeliveryGate.ack`); audited once per topic per
cache lifetime. The broker's PUBREC for a QoS 2 publish the gateway released (PUBLISH and
PUBREL in one write, :mod:`proxy.mqtt.publish_gate`) needs no answer; its PUBCOMP answers
the client's PUBREL.

The gate owns no state of its own beyond the references it is given: the table belongs to the
subscribe gate, the caches to :mod:`proxy.mqtt.decisions`, the QoS 2 books to
:mod:`proxy.mqtt.qos2`.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.identity.model import Identity
from proxy.mqtt import codec
from proxy.mqtt.codec import Frame, ProtocolError
from proxy.mqtt.context import DENY_COUNT, Context
from proxy.mqtt.decisions import DecisionCaches
from proxy.mqtt.output import Output
from proxy.mqtt.packets import PacketType, Reason
from proxy.mqtt.policies import Policies
from proxy.mqtt.qos2 import Qos2Flows
from proxy.mqtt.subscriptions import SubscriptionTable
from proxy.policy.decision import Decision

__all__ = ["DeliveryGate"]

T = PacketType


class DeliveryGate:
    __slots__ = ("_cx", "_decisions", "_mono", "_policies", "_qos2", "_subs", "_wallclock")

    def __init__(self, *, policies: Policies, context: Context, subscriptions: SubscriptionTable,
                 decisions: DecisionCaches, qos2: Qos2Flows, wallclock: Callable[[], float],
                 mono: Callable[[float | None], float | None]) -> None:
        self._policies = policies
        self._cx = context
        self._subs = subscriptions
        self._decisions = decisions
        self._qos2 = qos2
        self._wallclock = wallclock   # the `now` of the policy question
        self._mono = mono             # a decision's end (unix time) on the session clock

    def publish(self, acts: Output, frame: Frame, data: memoryview | None) -> None:
        level = self._cx.level
        info = codec.decode_publish(frame, level, check_topic=False)  # checked on a cache miss
        if info.topic_alias is not None or not info.topic:
            # We told the broker Topic Alias Maximum 0.
            raise ProtocolError(Reason.TOPIC_ALIAS_INVALID, "topic alias from the broker")
        if self._may_receive(info.topic):
            self._cx.handed += 1
            acts.forward(acts.to_client, frame, data)
            return
        acts.end_run()
        pid = info.packet_id
        if info.qos == 1 and pid is not None:
            acts.to_broker.append(codec.encode_ack(T.PUBACK, pid, level))
        elif info.qos == 2 and pid is not None:
            acts.to_broker.append(codec.encode_ack(T.PUBREC, pid, level))
            self._qos2.dropped.add(pid)

    def ack(self, acts: Output, frame: Frame, data: memoryview | None) -> None:
        """The broker's PUBACK, PUBREC, PUBREL or PUBCOMP."""
        t = frame.type
        level = self._cx.level
        qos2 = self._qos2
        pid = codec.packet_id_of(frame, level)
        if t == T.PUBREL and pid in qos2.dropped:
            qos2.dropped.discard(pid)
            acts.end_run()
            acts.to_broker.append(codec.encode_ack(T.PUBCOMP, pid, level))
            return
        if t == T.PUBREC and pid in qos2.releasing:
            acts.end_run()  # released already (PUBREL went with the PUBLISH); the client had its PUBREC
            return
        if t == T.PUBCOMP:
            qos2.releasing.discard(pid)  # the answer to the client's PUBREL
        acts.forward(acts.to_client, frame, data)

    def _may_receive(self, topic_b: bytes) -> bool:
        """The answer, counted; a refusal decided now is audited."""
        cx = self._cx
        ok = self._decisions.receive.get(topic_b)
        if ok is None:
            topic, ok, decision = self._decide(topic_b, cx.identity, cx.client_id)
            cx.summary.decided("receive", topic, decision)
            if not ok:
                cx.count(DENY_COUNT["receive"])
                cx.audit("receive", "deny", identity=cx.identity, resource=topic,
                         rule=decision.rule if decision is not None else None,
                         reason=decision.reason if decision is not None else None)
                return False
        if ok:
            cx.delivered += 1
        else:
            cx.count(DENY_COUNT["receive"])
        return ok

    def _decide(self, topic_b: bytes, identity: Identity | None, client_id: str) -> tuple[str, bool, Decision | None]:
        """Decide a delivery the cache has no answer for, and cache the answer: (the topic, decoded
        and checked on this miss only; delivered; the policy's decision, None when a grant of the
        table proved it)."""
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
        return topic, ok, decision
