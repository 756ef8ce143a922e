"""The publish gate: client → broker PUBLISH and PUBREL (sans-IO, one per session).

* Topic over ``topic_max_bytes`` → v5 DISCONNECT 0x90, 3.1.1 a plain close, before the
  decision cache or the policy sees it.
* Topic aliases (v5), tracked here up to ``topic_alias_maximum`` (0: refused, DISCONNECT
  0x94). Every PUBLISH is checked on its resolved topic and goes upstream with the full topic
  and no alias, so a denied alias-setting PUBLISH cannot leave the broker a stale mapping.
* Decisions cached per (topic, QoS, retain) in the session's
  :class:`~proxy.mqtt.decisions.DecisionCaches` (the fast path walks the same map).
* Rate limit: one token per PUBLISH (``disconnect`` → v5 DISCONNECT 0x96 / close; ``drop`` →
  dropped, v5 QoS 1/2 answered 0x97, 3.1.1 acknowledged), audited once a second at most
  with the number dropped.
* Denied: v5 QoS 1/2 → PUBACK/PUBREC 0x87, QoS 0 dropped; 3.1.1 ``denied_publish_v3: drop``
  acknowledges (PUBACK, or PUBREC and PUBCOMP on the PUBREL), ``disconnect`` closes. Audited.
* QoS 2: an allowed PUBLISH is held (:class:`~proxy.mqtt.qos2.Qos2Flows`: at most 256 KiB or
  one packet per connection, and the identity's share; more → v5 PUBREC 0x97 / close) and
  answered PUBREC; decided again at the client's PUBREL: still allowed → PUBLISH and PUBREL upstream
  in one write; not → PUBCOMP 0x92 (v5) / PUBCOMP, audited. A PUBREL for an id the gateway
  answered or holds nothing for is completed here, never forwarded.

What ends the connection is returned as an :class:`~proxy.mqtt.output.End` for the session
to carry out (it decides the Will and tears down); everything else goes into the call's
:class:`~proxy.mqtt.output.Output` and the connection's :class:`~proxy.mqtt.context.Context`.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.config import MqttConfig
from proxy.identity.model import Identity
from proxy.mqtt import codec
from proxy.mqtt.codec import Frame, LimitExceeded, ProtocolError
from proxy.mqtt.context import DENY_COUNT, RATE_LIMITED, Context
from proxy.mqtt.decisions import DecisionCaches
from proxy.mqtt.events import Buffer
from proxy.mqtt.output import End, Output
from proxy.mqtt.packets import MQTT_5, PacketType, Prop, PublishInfo, Reason, without_props
from proxy.mqtt.policies import Policies
from proxy.mqtt.qos2 import Qos2Flows
from proxy.ratelimit import RateLimiter

__all__ = ["PublishGate"]

T = PacketType


class PublishGate:
    __slots__ = ("_aliases", "_alias_max", "_clock", "_cx", "_decisions", "_denied_v3", "_limiter", "_mono",
                 "_policies", "_qos2", "_rate_action", "_rate_audit_at", "_rate_limited", "_standing_problem",
                 "_topic_max", "_wallclock")

    def __init__(self, *, config: MqttConfig, policies: Policies, context: Context, decisions: DecisionCaches,
                 qos2: Qos2Flows, rate_limiter: RateLimiter | None, clock: Callable[[], float],
                 wallclock: Callable[[], float], mono: Callable[[float | None], float | None],
                 standing_problem: Callable[[Identity], str | None]) -> None:
        self._policies = policies
        self._cx = context
        self._decisions = decisions
        self._qos2 = qos2
        self._limiter = rate_limiter
        self._clock = clock
        self._wallclock = wallclock      # the `now` of the policy question
        self._mono = mono                # a decision's end (unix time) on the session clock
        # Why the identity no longer stands at this instant (token expired, credential gone), or None.
        self._standing_problem = standing_problem
        self._topic_max = config.limits.topic_max_bytes
        self._alias_max = config.topic_alias_maximum
        self._rate_action = config.rate_limit.action
        self._denied_v3 = config.denied_publish_v3
        self._aliases: dict[int, str] = {}
        self._rate_limited = 0           # publishes over the rate limit since the last audit line
        self._rate_audit_at = 0.0

    def publish(self, acts: Output, frame: Frame, data: memoryview | None) -> End | None:
        cx = self._cx
        level = cx.level
        info = codec.decode_publish(frame, level, check_topic=False)  # checked below, once per topic
        topic_b = info.topic
        if len(topic_b) > self._topic_max:
            # Before the cache or the policy: neither ever holds a longer topic.
            raise LimitExceeded(Reason.TOPIC_NAME_INVALID, f"topic of {len(topic_b)} bytes exceeds the limit of "
                                f"{self._topic_max}", action="publish")
        qos = info.qos
        rewrite = False
        if info.topic_alias is not None:
            alias = info.topic_alias
            if not 0 < alias <= self._alias_max:
                raise ProtocolError(Reason.TOPIC_ALIAS_INVALID, f"topic alias {alias} out of range")
            if topic_b:
                topic = self._aliases[alias] = codec.topic_from_bytes(topic_b)
            else:
                topic = self._aliases.get(alias, "")
                if not topic:
                    raise ProtocolError(Reason.PROTOCOL_ERROR, f"unknown topic alias {alias}")
            rewrite = True
            key: tuple[str | bytes, int, int] = (topic, qos, info.retain)
        else:
            if not topic_b:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "empty topic without a topic alias")
            key = (topic_b, qos, info.retain)
        ident = cx.identity
        if ident is None:
            raise RuntimeError("ident is not set")
        # Decisions are cached per (topic, QoS, retain) until invalidate() or the cache's TTL;
        # only topics that passed the checks get an entry.
        entry = self._decisions.publish.get(key)
        if entry is None:
            if not rewrite:
                topic = codec.topic_from_bytes(topic_b)
            d = self._policies.may_publish(ident, topic, qos=qos, retain=info.retain, client_id=cx.client_id,
                                           now=self._wallclock())
            cx.summary.decided("publish", topic, d)
            entry = (topic, d)
            self._decisions.put_publish(key, entry)
            self._decisions.ends_at(self._mono(d.until))
        topic, d = entry
        if self._limiter is not None and not self._limiter.allow(ident.sub):
            cx.count(RATE_LIMITED)
            # One audit line per second at most, with the count: a flood must not flood the log.
            now = self._clock()
            self._rate_limited += 1
            if now >= self._rate_audit_at:
                self._rate_audit_at = now + 1.0
                cx.audit("publish", "deny", identity=ident, resource=topic, reason="rate limit", qos=qos,
                         dropped=self._rate_limited)
                self._rate_limited = 0
            if self._rate_action == "disconnect":
                return End("rate_limited", topic, Reason.MESSAGE_RATE_TOO_HIGH)
            self._refuse(acts, info, Reason.QUOTA_EXCEEDED)
            return None
        if not d.allowed:
            cx.count(DENY_COUNT["publish"])
            cx.audit("publish", "deny", identity=ident, resource=topic, rule=d.rule, reason=d.reason,
                     qos=qos, retain=info.retain)
            if level != MQTT_5 and self._denied_v3 == "disconnect":
                return End("denied_publish", topic)
            self._refuse(acts, info, Reason.NOT_AUTHORIZED)
            return None
        cx.published += 1
        if info.packet_id is not None:
            # An allowed id is no longer one the gateway refused.
            self._qos2.answered.discard(info.packet_id)
        if qos == 2:
            return self._hold(acts, frame, data, info, topic, rewrite)
        cx.forwarded += 1
        if not rewrite:
            acts.forward(acts.to_broker, frame, data)
            return None
        acts.end_run()
        acts.to_broker.extend(self._resolved(frame, data, info, topic))
        return None

    def release(self, acts: Output, frame: Frame, data: memoryview | None) -> None:
        """The client's PUBREL."""
        level = self._cx.level
        pid = codec.packet_id_of(frame, level)
        qos2 = self._qos2
        if pid in qos2.answered:
            # The gateway acknowledged (and dropped) this QoS 2 publish: finish it here.
            qos2.answered.discard(pid)
            # 3.1.1: the faked flow ends. v5: the flow already ended with PUBREC 0x87.
            acts.to_client.append(codec.encode_ack(
                T.PUBCOMP, pid, level, Reason.PACKET_IDENTIFIER_NOT_FOUND if level == MQTT_5 else 0))
            acts.end_run()
        elif pid not in qos2.releasing:  # (a repeated PUBREL: the broker's PUBCOMP answers it)
            self._release(acts, pid)

    def _resolved(self, frame: Frame, data: memoryview | None, info: PublishInfo,
                  topic: str) -> list[Buffer]:
        """The PUBLISH with its alias resolved: the broker gets the full topic and no alias, so it
        holds no alias state."""
        props = without_props(codec.read_publish_properties(frame, info), Prop.TOPIC_ALIAS)
        payload = frame.raw[info.payload_start:]
        head = codec.publish_head(topic, qos=info.qos, retain=info.retain, dup=info.dup, packet_id=info.packet_id,
                                  level=self._cx.level, properties=props, payload_len=len(payload))
        if not len(payload):
            return [head]
        return [head, payload if frame.start < 0 or data is None else data[frame.start + info.payload_start:frame.end]]

    def _hold(self, acts: Output, frame: Frame, data: memoryview | None, info: PublishInfo, topic: str,
              rewrite: bool) -> End | None:
        """An allowed QoS 2 publish: the gateway answers PUBREC and keeps it until the PUBREL, when
        it is decided again (a grant revoked in between must not be released by the broker)."""
        acts.end_run()
        pid = info.packet_id
        if pid is None:
            raise RuntimeError("a QoS 2 PUBLISH without a packet id")  # (the codec refuses one)
        level = self._cx.level
        packet = b"".join(bytes(b) for b in self._resolved(frame, data, info, topic)) if rewrite else bytes(frame.raw)
        if not self._qos2.hold(self._cx.sub, pid, packet, topic, info.retain):  # (a DUP replaces the earlier)
            self._cx.audit("publish", "deny", resource=topic, reason="too many QoS 2 publishes awaiting PUBREL",
                           qos=2)
            if level != MQTT_5:
                return End("quota_exceeded", "QoS 2 publishes awaiting PUBREL")
            acts.to_client.append(codec.encode_ack(T.PUBREC, pid, level, Reason.QUOTA_EXCEEDED))
            return None
        acts.to_client.append(codec.encode_ack(T.PUBREC, pid, level))
        return None

    def _release(self, acts: Output, pid: int) -> None:
        """Forward the held publish if it is still allowed now."""
        acts.end_run()
        cx = self._cx
        level = cx.level
        held = self._qos2.take(cx.sub, pid)
        rule = None
        if held is None:
            topic, reason = "", "PUBREL for a QoS 2 publish not held on this connection"
        else:
            packet, topic, retain = held
            ident = cx.identity
            if ident is None:
                raise RuntimeError("ident is not set")
            problem = self._standing_problem(ident)
            d = None if problem else self._policies.may_publish(ident, topic, qos=2, retain=retain,
                                                                client_id=cx.client_id, now=self._wallclock())
            if d is not None and d.allowed:
                # Released at this instant, in one write: the PUBLISH and its PUBREL, so the broker
                # never holds it awaiting a release the gateway would have to decide again. (The
                # broker handles them in order; its PUBREC then needs no answer, its PUBCOMP answers
                # the client's PUBREL.)
                self._qos2.releasing.add(pid)
                cx.forwarded += 1
                acts.to_broker.append(packet)
                acts.to_broker.append(codec.encode_ack(T.PUBREL, pid, level))
                return
            rule, reason = (d.rule, d.reason) if d is not None else (None, problem or "")
        cx.count(DENY_COUNT["publish"])
        cx.audit("publish", "deny", resource=topic, rule=rule, reason=reason, qos=2, when="release")
        acts.to_client.append(codec.encode_ack(
            T.PUBCOMP, pid, level, Reason.PACKET_IDENTIFIER_NOT_FOUND if level == MQTT_5 else 0))

    def _refuse(self, acts: Output, info: PublishInfo, code: int) -> None:
        """Answer a publish the broker will never see, so the client's flow completes."""
        acts.end_run()
        level = self._cx.level
        pid = info.packet_id
        if info.qos == 0 or pid is None:
            return
        self._qos2.take(self._cx.sub, pid)  # a retransmission now refused: nothing to release
        if level == MQTT_5:
            acts.to_client.append(codec.encode_ack(T.PUBACK if info.qos == 1 else T.PUBREC, pid, level, code))
            if info.qos == 2:
                # A refused PUBREC ends the flow, but some clients (paho 2.x) send PUBREL anyway:
                # the gateway answers it, so the broker never sees an id it does not know.
                self._qos2.answered.add(pid)
        elif info.qos == 1:
            acts.to_client.append(codec.encode_ack(T.PUBACK, pid, level))
        else:
            acts.to_client.append(codec.encode_ack(T.PUBREC, pid, level))
            self._qos2.answered.add(pid)
