"""Model-based test of the sans-IO MQTT Session against an independent oracle.

The invariant, over random interleavings of client traffic, broker traffic (the
test plays the broker), ownership changes, policy swaps, re-authentication, the
clock and every way a connection ends:

1. every PUBLISH the session forwards to the client is one the client may read
   at the instant it is forwarded;
2. a Will reaches the broker only if it is allowed at close: when the upstream
   CONNECT carried a Will that is no longer allowed (or the client sent a normal
   DISCONNECT), the first DISCONNECT the broker sees is a normal one (0x00); when
   it is still allowed and the client did not send a normal DISCONNECT, the
   session sends no normal DISCONNECT upstream;
3. nothing is silently dropped: a QoS 1 delivery whose topic matches a filter the
   client holds (granted in the SUBACK it received, not unsubscribed since) and
   that the client may read now is forwarded; a dropped QoS 1 delivery is
   PUBACKed to the broker by the gateway;
4. (the mirror of 1) every PUBLISH passed to the broker is one the client may send
   at that instant.

"May" includes a credential that still stands: a token not expired, a device still
registered to the owner it had when it connected. A normal DISCONNECT the client
sends before the CONNACK is held by the session with everything else sent meanwhile;
it still asks for the Will to be discarded.

The oracle is independent of the code under test: its own filter matcher
(``ref_match``), its own "who may read / write which topic at wall time t"
(``may_read`` / ``may_write``, written from the policy text below and a plain
model of the devices), and its own MQTT parser for the session's output
(``parse``). The codec is used only to *encode* the input bytes; nothing of
``session.topic_matches``, the codec's decoders or the policy engine's matcher
takes part in a check.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from proxy.audit import MemoryAudit
from proxy.config import MqttConfig
from proxy.facts import Delegation, DeviceFacts, Permission, StaticFacts
from proxy.identity.model import AuthReason, Identity
from proxy.mqtt import codec
from proxy.mqtt.packets import Connect, Prop, Suback, Subscribe, Subscription, Unsubscribe, Will
from proxy.mqtt.session import Session
from proxy.policy import Policies
from tests.unit.mqtt_driver import Driver, Outcome
from tests.unit.policy_helpers import to

# --------------------------------------------------------------------------- policy text and its oracle

_BASE_RULES = """
  - id: no-sys
    effect: deny
    subjects: [anyone]
    mqtt: {topics: ["$SYS/#"], actions: [publish, subscribe]}
  - id: admins-read-everything
    subjects: [admin]
    mqtt: {topics: ["#"], actions: [subscribe]}
  - id: owners-and-delegates-read
    subjects: [owner, delegate]
    mqtt: {topics: ["devices/{device}/#"], actions: [subscribe]}
  - id: owners-and-delegates-command
    subjects: [owner, delegate]
    mqtt: {topics: ["devices/{device}/cmd/#"], actions: [publish]}
  - id: device-publishes-telemetry
    subjects: [device]
    mqtt: {topics: ["devices/{device}/telemetry"], actions: [publish]}
  - id: device-reads-commands
    subjects: [device]
    mqtt: {topics: ["devices/{device}/cmd/#"], actions: [subscribe]}
"""
_PUBLIC_RULE = """
  - id: public-telemetry
    subjects: [public]
    mqtt: {topics: ["devices/{device}/telemetry"], actions: [subscribe]}
"""
_STRICT_RULE = """
  - id: no-secret-commands
    effect: deny
    subjects: [anyone]
    mqtt: {topics: ["devices/+/cmd/secret"], actions: [publish, subscribe]}
"""
POLICY = {
    "base": "version: 1\nrules:" + _BASE_RULES + _PUBLIC_RULE,
    # The same rules in another order: the same answers.
    "equivalent": "version: 1\nrules:" + _PUBLIC_RULE + _BASE_RULES,
    # No public telemetry, and nobody reads or sends devices/+/cmd/secret.
    "strict": "version: 1\nrules:" + _BASE_RULES + _STRICT_RULE,
}
ADMIN_ROLE = "iot-admin"


def ref_match(topic_filter: str, topic: str) -> bool:
    """Reference MQTT matching (spec 4.7), written without looking at the gateway's."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2]
    f, t = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False

    def rec(fi: list[str], ti: list[str]) -> bool:
        if not fi:
            return not ti
        if fi[0] == "#":
            return True          # also the parent level: "a/#" matches "a"
        if not ti:
            return False
        return (fi[0] == "+" or fi[0] == ti[0]) and rec(fi[1:], ti[1:])

    return rec(f, t)


@dataclass
class Dev:
    """The oracle's own model of one registered device."""
    owner: str                                        # owner sub
    public: bool = False
    grants: dict[str, tuple[str, Permission, float | None]] = field(default_factory=dict)  # id -> grantee, perm, expiry

    def delegated(self, who: Identity, want: str, t: float) -> bool:
        for grantee, perm, exp in self.grants.values():
            if exp is not None and not t < exp:
                continue
            if perm != "readwrite" and perm != want:
                continue
            if grantee.startswith("group:"):
                if grantee[6:] in who.groups:
                    return True
            elif who.kind == "user" and grantee == who.username:
                return True
        return False


def _device_and_rest(topic: str, devs: dict[str, Dev]):
    lv = topic.split("/")
    if len(lv) < 2 or lv[0] != "devices" or not lv[1] or lv[1] not in devs:
        return None, None, []
    return lv[1], devs[lv[1]], lv[2:]


def standing(who: Identity, t: float, devs: dict[str, Dev]) -> bool:
    """The credential still stands at t: the token has not expired; a device is still registered
    to the owner it had when it connected."""
    if who.expires_at is not None and not t < who.expires_at:
        return False
    return not who.is_device or (who.device_id in devs and devs[who.device_id].owner == who.owner_sub)


def may_read(who: Identity, topic: str, t: float, devs: dict[str, Dev], variant: str) -> bool:
    if not standing(who, t, devs):
        return False
    if ref_match("$SYS/#", topic) or (variant == "strict" and ref_match("devices/+/cmd/secret", topic)):
        return False
    if ADMIN_ROLE in who.roles and ref_match("#", topic):
        return True
    dev_id, dev, rest = _device_and_rest(topic, devs)
    if dev is None:
        return False
    if who.kind == "device" and who.device_id == dev_id and rest[:1] == ["cmd"]:
        return True
    if dev.owner == who.sub or dev.delegated(who, "read", t):
        return True                                   # devices/{device}/# (with its parent level)
    return variant != "strict" and dev.public and rest == ["telemetry"]


def may_write(who: Identity, topic: str, t: float, devs: dict[str, Dev], variant: str) -> bool:
    if not standing(who, t, devs):
        return False
    if ref_match("$SYS/#", topic) or (variant == "strict" and ref_match("devices/+/cmd/secret", topic)):
        return False
    dev_id, dev, rest = _device_and_rest(topic, devs)
    if dev is None:
        return False
    if who.kind == "device" and who.device_id == dev_id and rest == ["telemetry"]:
        return True
    return rest[:1] == ["cmd"] and (dev.owner == who.sub or dev.delegated(who, "write", t))


# --------------------------------------------------------------------------- our own MQTT parser


@dataclass
class Pkt:
    type: int
    flags: int
    body: bytes
    topic: str = ""
    qos: int = 0
    pid: int | None = None
    reason: int = 0
    codes: list = field(default_factory=list)
    filters: list = field(default_factory=list)   # (filter, qos) for SUBSCRIBE, filter for UNSUBSCRIBE
    will: bool = False
    payload: bytes = b""                          # a PUBLISH's payload (filled in by the live test's reader)

    @property
    def packet_id(self) -> int:
        """The id of a packet that has one (a QoS 1/2 PUBLISH, an ack, SUBSCRIBE, SUBACK...)."""
        assert self.pid is not None, f"{self} has no packet id"
        return self.pid


def _varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        n |= (b[i] & 0x7F) << shift
        shift += 7
        i += 1
        if b[i - 1] < 0x80:
            return n, i


def parse(chunks, level: int) -> list[Pkt]:
    """Whole packets out of a list of output items (fixed header, remaining length, the fields we check)."""
    data = b"".join(bytes(c) for c in chunks)
    out, pos = [], 0
    while pos < len(data):
        b1 = data[pos]
        n, pos = _varint(data, pos + 1)
        body = data[pos:pos + n]
        assert len(body) == n, "the session wrote a partial packet"
        pos += n
        p = Pkt(b1 >> 4, b1 & 0x0F, body)
        v5 = level == 5
        if p.type == 3:                                      # PUBLISH
            tl = body[0] << 8 | body[1]
            p.topic, p.qos = body[2:2 + tl].decode(), (b1 >> 1) & 3
            p.pid = (body[2 + tl] << 8 | body[3 + tl]) if p.qos else None
        elif p.type in (4, 5, 6, 7, 11):                     # PUBACK.. PUBCOMP, UNSUBACK
            p.pid = body[0] << 8 | body[1]
        elif p.type == 9:                                    # SUBACK
            p.pid = body[0] << 8 | body[1]
            i = 2
            if v5:
                plen, i = _varint(body, 2)
                i += plen
            p.codes = list(body[i:])
        elif p.type in (8, 10):                              # SUBSCRIBE, UNSUBSCRIBE
            p.pid = body[0] << 8 | body[1]
            i = 2
            if v5:
                plen, i = _varint(body, 2)
                i += plen
            while i < len(body):
                fl = body[i] << 8 | body[i + 1]
                f = body[i + 2:i + 2 + fl].decode()
                i += 2 + fl
                if p.type == 8:
                    p.filters.append((f, body[i] & 3))
                    i += 1
                else:
                    p.filters.append(f)
        elif p.type == 14:                                   # DISCONNECT
            p.reason = body[0] if body else 0
        elif p.type == 1:                                    # CONNECT
            nl = body[0] << 8 | body[1]
            p.will = bool(body[2 + nl + 1] & 0x04)
        out.append(p)
    return out


def first_disconnect(pkts: list[Pkt]) -> Pkt | None:
    return next((p for p in pkts if p.type == 14), None)


# --------------------------------------------------------------------------- the run's totals

STATS: dict[str, int] = {}
# What one run must at least exercise (a typical run: ~25,000 steps, 400-2,000 deliveries forwarded,
# 600-1,200 dropped, 200-400 Wills checked of which 20-40 discarded, 100-800 fast-path chunks).
MINIMUMS = {"steps": 10_000, "deliveries forwarded": 200, "deliveries dropped": 100, "wills checked": 50,
            "wills discarded": 5, "fast-path chunks": 50, "QoS 2 releases": 10}


def _count(key: str, n: int = 1) -> None:
    STATS[key] = STATS.get(key, 0) + n


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


MONO0, WALL0 = 1000.0, 1_700_000_000.0
CLOCK_KW = "clock" in inspect.signature(Policies.from_text).parameters     # the engine takes the wall clock
CREDENTIAL_KW = "credential_problem" in inspect.signature(Session).parameters
_ACTIVE: list = []  # the machine running now (for the time.time fallback)

ALICE = Identity(kind="user", sub="sub-alice", username="alice", method="token")
BOB = Identity(kind="user", sub="sub-bob", username="bob", method="token", groups=frozenset({"ops"}))
ROOT = Identity(kind="user", sub="sub-root", username="root", method="token", roles=frozenset({ADMIN_ROLE}))
USERS = {"alice": ALICE, "bob": BOB, "root": ROOT}
OWNERS = ["sub-alice", "sub-bob", "sub-dave"]
DEVICES = ["d1", "d2", "d3"]

TOPICS = [f"devices/{d}/{s}" for d in DEVICES for s in ("telemetry", "cmd/x", "cmd/secret", "attrs/t")] + [
    "devices/d1", "$SYS/broker/uptime", "other/news"]
FILTERS = ["#", "devices/#", "devices/+/telemetry", "devices/d1/#", "devices/d2/#", "devices/d1/telemetry",
           "devices/d2/telemetry", "devices/d3/telemetry", "devices/d2/cmd/secret", "devices/+/cmd/#",
           "devices/d2/cmd/+", "+/d2/#", "+/+/telemetry", "$share/g/#", "$share/g/devices/d2/telemetry",
           "$SYS/#", "other/#"]
OWN_WILL = {"alice": "devices/d1/cmd/gone", "bob": "devices/d2/cmd/gone", "d1": "devices/d1/telemetry",
            "d2": "devices/d2/telemetry"}
WILL_TOPICS = ["devices/d1/cmd/gone", "devices/d2/cmd/gone", "devices/d3/cmd/secret", "devices/d1/telemetry",
               "devices/d2/telemetry"]


class Broker:
    """The test's broker for one upstream connection: reads what the gateway sends, routes, acks."""

    def __init__(self, level: int):
        self.level = level
        self.inbox = bytearray()
        self.table: dict[str, int] = {}      # full filter ($share/ included) -> granted QoS
        self.outbox: list[tuple[bytes, tuple | None]] = []  # (bytes, (topic, qos, pid) for a PUBLISH)
        self.pid = 0
        self.will = False                    # the CONNECT it got carried a Will

    def next_pid(self) -> int:
        self.pid = self.pid % 65535 + 1
        return self.pid

    def route(self, topic: str, qos: int, retain: bool = False) -> None:
        granted = [q for f, q in self.table.items() if ref_match(f, topic)]
        if granted:
            self.deliver(topic, min(qos, max(granted)), retain)

    def deliver(self, topic: str, qos: int, retain: bool = False) -> None:
        pid = self.next_pid() if qos else None
        raw = codec.encode_publish(topic, b"v", qos=qos, packet_id=pid, level=self.level, retain=retain)
        self.outbox.append((raw, (topic, qos, pid)))


# --------------------------------------------------------------------------- the machine


class GatewayModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mono = Clock(MONO0)
        self.wall = lambda: WALL0 + (self.mono.t - MONO0)
        _ACTIVE[:] = [self]
        self.devs: dict[str, Dev] = {"d1": Dev("sub-alice"), "d2": Dev("sub-bob"), "d3": Dev("sub-dave", public=True)}
        self.facts = StaticFacts()
        for d in DEVICES:
            self.facts.put(self._device_facts(d))
        self.variant = "base"
        self.policies = self._compile("base")
        self.retained: dict[str, int] = {}
        self.grant_seq = 0
        self.cpid = 0                        # the last packet id the client used (reset per connection)
        self.s: Driver | None = None
        self.state = "none"                  # none | upstream | open | closed

    # ------------------------------------------------------------- helpers

    def _compile(self, variant: str) -> Policies:
        kw: dict[str, Any] = {"clock": self.wall} if CLOCK_KW else {}
        return Policies.from_text(POLICY[variant], self.facts, **kw)

    def _device_facts(self, d: str) -> DeviceFacts:
        m = self.devs[d]
        return DeviceFacts(d, m.owner, m.owner.removeprefix("sub-"), public=m.public,
                           delegations=tuple(Delegation(gid, d, to(g), p, e) for gid, (g, p, e) in m.grants.items()))

    def _credential_problem(self, ident: Identity) -> str | None:
        if not ident.is_device:
            return None
        m = self.devs.get(ident.device_id)
        if m is None:
            return "device deleted"
        return None if m.owner == ident.owner_sub else "device registered again"

    @property
    def drv(self) -> Driver:
        """The connection's driver (a step that needs one runs only while there is one)."""
        assert self.s is not None
        return self.s

    @property
    def live(self) -> bool:
        return self.s is not None and self.state in ("upstream", "open") and not self.s.closed

    def _new_pid(self) -> int:
        self.cpid = self.cpid % 65535 + 1
        return self.cpid

    def _reads(self, topic: str) -> bool:
        return may_read(self.ident, topic, self.wall(), self.devs, self.variant)

    def _writes(self, topic: str) -> bool:
        return may_write(self.ident, topic, self.wall(), self.devs, self.variant)

    # ------------------------------------------------------------- carrying out Actions

    def _process(self, acts, *, deliveries=(), client_normal_disconnect=False, from_close=False) -> None:
        """Check and carry out one Actions, as the shell does (client_closed() after a close)."""
        if acts is None:
            return
        assert isinstance(acts, Outcome), acts
        level = self.level
        to_client = parse(acts.to_client, level)
        to_broker = parse(acts.to_broker, level)
        # (1) every PUBLISH handed to the client may be read by it now.
        for p in to_client:
            if p.type == 3:
                assert self._reads(p.topic), (
                    f"{self.ident.username} received {p.topic!r} (pid {p.pid}) at wall {self.wall()}, which it may "
                    f"not read; client filters held: {sorted(self.active)}; devices: {self.devs}")
                _count("deliveries forwarded")
            elif p.type == 9:                                        # SUBACK: the filters granted
                for (f, _), code in zip(self.sub_req.get(p.packet_id, ()), p.codes, strict=False):
                    if self.latest.get(f) == ("sub", p.pid) and code < 0x80:
                        self.active.add(f)
        for p in to_client:
            if p.type == 3 and p.qos == 1:
                self.unacked.append(p.packet_id)
        # (4) and every PUBLISH passed to the broker was the client's to send now.
        # A QoS 2 message is published by the broker when it gets the PUBREL: that is the instant.
        for p in to_broker:
            if p.type == 3 and p.qos == 2:
                self.broker_qos2[p.packet_id] = p.topic
            elif p.type == 3:
                assert self._writes(p.topic), (
                    f"{self.ident.username}'s PUBLISH on {p.topic!r} went to the broker at wall {self.wall()}, "
                    f"which it may not publish; devices: {self.devs}")
                _count("publishes forwarded")
            elif p.type == 6 and p.pid in self.broker_qos2:
                topic = self.broker_qos2.pop(p.pid)
                assert self._writes(topic), (
                    f"{self.ident.username}'s QoS 2 PUBLISH on {topic!r} was released (PUBREL) to the broker at "
                    f"wall {self.wall()}, which it may not publish now; devices: {self.devs}")
                _count("QoS 2 releases")
        # (3) QoS 1 deliveries: forwarded when held and readable; PUBACKed by the gateway when dropped.
        handed = [p.pid for p in to_client if p.type == 3 and p.pid is not None]
        acked = [p.pid for p in to_broker if p.type == 4]
        for topic, qos, pid in deliveries:
            if qos != 1:
                continue
            if pid in handed:
                continue
            _count("deliveries dropped")
            if self.drv.closed:
                continue
            assert pid in acked, f"QoS 1 delivery {topic!r} pid {pid} dropped without a PUBACK to the broker"
            held = [f for f in self.active if ref_match(f, topic)]
            assert not (held and self._reads(topic)), (
                f"QoS 1 delivery {topic!r} (pid {pid}) silently dropped: the client holds {held} and may read it "
                f"at wall {self.wall()}")
        if acts.auth is not None and acts.auth.kind == "reauth":
            self.reauth_pending = True
        self.broker.inbox += b"".join(bytes(x) for x in acts.to_broker)
        if acts.close is not None and not from_close:
            cc = self.drv.client_closed()                             # the shell, after Actions.close
            to_broker = to_broker + parse(cc.to_broker, level)
            self.broker.inbox += b"".join(bytes(x) for x in cc.to_broker)
            self._closed(to_broker, client_normal_disconnect)
        elif from_close:
            self._closed(to_broker, client_normal_disconnect)

    def _closed(self, to_broker: list[Pkt], client_normal: bool) -> None:
        """(2) The Will at close."""
        _count("closes")
        self.state = "closed"
        if not self.will_upstream:
            return
        allowed = self._writes(self.will_topic)
        disc = first_disconnect(to_broker)
        if client_normal or not allowed:
            assert disc is not None and disc.reason == 0, (
                f"the Will on {self.will_topic!r} is {'not allowed' if not allowed else 'not wanted'} at close "
                f"(wall {self.wall()}), but the broker got {disc and hex(disc.reason)} instead of a normal "
                f"DISCONNECT; devices: {self.devs}")
            if not client_normal:
                _count("wills checked")
                _count("wills discarded")
        else:
            assert disc is None or disc.reason != 0, (
                f"the Will on {self.will_topic!r} is allowed at close, but the session discarded it with a "
                f"normal DISCONNECT")
            _count("wills checked")
            _count("wills allowed")

    def _changed(self) -> None:
        """After a fact change or a policy swap the shell calls invalidate()."""
        if self.s is None or self.state in ("none", "closed"):
            return
        was_device = self.ident.is_device
        self._process(self.drv.invalidate())
        if CREDENTIAL_KW and was_device and self.state != "closed" and self._credential_problem(self.ident):
            raise AssertionError(f"device {self.ident.device_id} deleted or re-registered, connection still open")

    def _client(self, data: bytes, **kw) -> None:
        self._process(self.drv.client_data(data), **kw)

    def _broker_send(self, items: list[tuple[bytes, tuple | None]]) -> None:
        self._process(self.drv.broker_data(b"".join(raw for raw, _ in items)),
                      deliveries=[meta for _, meta in items if meta is not None])

    # ------------------------------------------------------------- connecting

    # Any: unpacked from a dict, hypothesis's overloads cannot tell these strategies from a `target`.
    _connect_args: Any = dict(  # noqa: RUF012  (read only)
        level=st.sampled_from([4, 5]), who=st.sampled_from(["alice", "bob", "root", "d1", "d2"]),
        will=st.sampled_from([None, "own", "own", "other"]), other=st.sampled_from(WILL_TOPICS),
        will_qos=st.sampled_from([0, 1]),
        keepalive=st.sampled_from([0, 10, 30, 30]), ttl=st.sampled_from([20.0, 300.0, 900.0, 900.0]),
        connack=st.sampled_from([True, True, True, False]),
        subs=st.lists(st.sampled_from(FILTERS), min_size=1, max_size=3, unique=True) | st.just([]))

    @initialize(**_connect_args)
    def first_connect(self, **kw):
        self.connect(**kw)

    @precondition(lambda self: self.state in ("none", "closed"))
    @rule(**_connect_args)
    def connect(self, level, who, will, other, will_qos, keepalive, ttl, connack=True, subs=()):
        """A client connects (its Will on a topic of its own, or another), maybe subscribing at once."""
        if who in USERS:
            ident = dataclasses.replace(USERS[who], expires_at=self.wall() + ttl)
        elif who in self.devs:
            owner = self.devs[who].owner
            ident = Identity(kind="device", sub=f"device:{who}", username=who, method="device_key",
                             device_id=who, owner_sub=owner, owner_username=owner.removeprefix("sub-"))
        else:
            ident = dataclasses.replace(ALICE, expires_at=self.wall() + ttl)
        self.level, self.ident = level, ident
        if will == "own":
            will = OWN_WILL.get(ident.device_id or ident.username, other)
        elif will == "other":
            will = other
        self.broker = Broker(level)
        self.cpid = 0
        self.sub_req: dict[int, list] = {}
        self.latest: dict[str, tuple[str, int]] = {}
        self.active: set[str] = set()
        self.unacked: list[int] = []
        self.qos2_unreleased: list[int] = []       # QoS 2 publishes the client has not sent PUBREL for
        self.broker_qos2: dict[int, str] = {}      # QoS 2 publishes the broker holds, awaiting PUBREL
        self.reauth_pending = False
        self.alias = ""                            # what the client set Topic Alias 1 to
        self.age = 0                               # steps since this connection began
        self.fast_seen = 0                         # its fast_path_chunks already counted
        self.will_topic, self.will_upstream = will, False
        extra = {"credential_problem": self._credential_problem} if CREDENTIAL_KW else {}
        self.s = Driver(Session(config=MqttConfig(tls=False, max_keepalive_seconds=60, connect_timeout_seconds=10.0),
                                policies=self.policies, clock=self.mono, wallclock=self.wall, **extra), MemoryAudit())
        cid = ident.device_id if ident.is_device else "app"
        w = Will(will, b"gone", will_qos, False) if will else None
        acts = self.drv.client_data(codec.encode_connect(Connect("MQTT", level, True, keepalive, cid, ident.username,
                                                               b"secret", w)))
        assert acts.auth is not None and acts.auth.kind == "connect", acts
        will_ok = will is None or self._writes(will)
        acts = self.drv.authenticated(ident)
        assert bool(acts.open_upstream) == will_ok, f"Will {will!r} allowed={will_ok}, but the session said {acts}"
        self.state = "upstream"
        up = parse(acts.to_broker, level)
        self.will_upstream = bool(up) and up[0].type == 1 and up[0].will
        self._process(acts)
        if not will_ok:
            assert self.state == "closed"
        elif connack:
            self.broker_connack()
            if subs and self.live:                # what a client usually does first
                self.client_subscriptions([("sub", subs, 1)], "packed", 0, read=True)
                self.broker_sends(len(self.broker.outbox), True)

    @precondition(lambda self: self.live and self.state == "upstream")
    @rule()
    def broker_connack(self):
        self.broker_reads()
        self.state = "open"
        self._process(self.drv.broker_data(codec.encode_connack(False, 0, self.level)))

    # ------------------------------------------------------------- the client

    @precondition(lambda self: self.live)
    @rule(ops=st.lists(st.tuples(st.sampled_from(["sub", "unsub"]),
                                 st.lists(st.sampled_from(FILTERS), min_size=1, max_size=3, unique=True),
                                 st.sampled_from([0, 1])), min_size=1, max_size=3),
          split=st.sampled_from(["packed", "separate", "cut"]), cut=st.integers(1, 200), read=st.booleans())
    def client_subscriptions(self, ops, split, cut, read=False):
        """SUBSCRIBE / UNSUBSCRIBE, overlapping and identical filters, packed in one write or not."""
        writes = []
        for kind, filters, qos in ops:
            pid = self._new_pid()
            if kind == "sub":
                writes.append(codec.encode_subscribe(Subscribe(pid, [Subscription(f, qos) for f in filters]),
                                                     self.level))
                self.sub_req[pid] = [(f, qos) for f in filters]
                for f in filters:
                    self.latest[f] = ("sub", pid)
                    self.active.discard(f)
            else:
                writes.append(codec.encode_unsubscribe(Unsubscribe(pid, filters), self.level))
                for f in filters:
                    self.latest[f] = ("unsub", pid)
                    self.active.discard(f)
        data = b"".join(writes)
        if split == "separate":
            chunks = writes
        elif split == "cut":
            chunks = [data[:cut % len(data)], data[cut % len(data):]]
        else:
            chunks = [data]
        for c in chunks:
            if c and self.live:
                self._client(c)
        if read and self.live:
            self.broker_reads()

    @precondition(lambda self: self.live and self.state == "open")
    @rule()
    def resubscribe_everything(self):
        """UNSUBSCRIBE '#' and SUBSCRIBE '#' in one write (a client resetting its filter)."""
        u, s = self._new_pid(), self._new_pid()
        self.latest["#"] = ("sub", s)
        self.active.discard("#")
        self.sub_req[s] = [("#", 1)]
        self._client(codec.encode_unsubscribe(Unsubscribe(u, ["#"]), self.level)
                     + codec.encode_subscribe(Subscribe(s, [Subscription("#", 1)]), self.level))

    @precondition(lambda self: self.live)
    @rule(topic=st.sampled_from(TOPICS + WILL_TOPICS), qos=st.sampled_from([0, 1, 1, 2]), retain=st.booleans(),
          n=st.sampled_from([1, 1, 3, 8]), alias=st.sampled_from([None, None, None, "set", "use"]))
    def client_publishes(self, topic, qos, retain, n, alias=None):
        """n PUBLISH packets in one write of their own (a cached topic takes the fast path); v5 may
        set Topic Alias 1 to the topic, or publish by the alias alone."""
        props = []
        if self.level == 5 and alias == "set":
            props, self.alias = [(Prop.TOPIC_ALIAS, 1)], topic
        elif self.level == 5 and alias == "use" and self.alias:
            props, topic = [(Prop.TOPIC_ALIAS, 1)], ""
        pids = [self._new_pid() if qos else None for _ in range(n)]
        data = b"".join(codec.encode_publish(topic, b"c", qos=qos, packet_id=pid, level=self.level, retain=retain,
                                             properties=props) for pid in pids)
        if qos == 2:
            self.qos2_unreleased.extend(pids)
        self._client(data)

    @precondition(lambda self: self.live and self.qos2_unreleased)
    @rule(k=st.integers(1, 8))
    def client_releases_qos2(self, k):
        """PUBREL for the oldest k QoS 2 publishes: each is released to the broker (and checked by
        (4) at that instant) or not at all, whatever was allowed when it was sent."""
        pids, self.qos2_unreleased = self.qos2_unreleased[:k], self.qos2_unreleased[k:]
        self._client(b"".join(codec.encode_ack(6, p, self.level) for p in pids))

    @precondition(lambda self: self.live)
    @rule()
    def client_pings_and_acks(self):
        pids, self.unacked = self.unacked, []
        self._client(b"".join(codec.encode_ack(4, p, self.level) for p in pids) + b"\xc0\x00")

    # ------------------------------------------------------------- the broker (us)

    @precondition(lambda self: self.live)
    @rule()
    def broker_reads(self):
        """The broker takes in what the gateway sent: subscriptions change, acks and retained queue up."""
        b, level = self.broker, self.level
        data, b.inbox = bytes(b.inbox), bytearray()
        for p in parse([data], level):
            if p.type == 1:
                b.will = p.will
            elif p.type == 8:
                codes = []
                for f, q in p.filters:
                    b.table[f] = q
                    codes.append(q)
                b.outbox.append((codec.encode_suback(Suback(p.pid, codes), level), None))
                for f, q in p.filters:
                    for topic, rq in self.retained.items():
                        if ref_match(f, topic):
                            b.deliver(topic, min(q, rq), retain=True)
            elif p.type == 10:
                for f in p.filters:
                    b.table.pop(f, None)
                body = p.pid.to_bytes(2, "big") + (b"\x00" + b"\x00" * len(p.filters) if level == 5 else b"")
                b.outbox.append((bytes([0xB0, len(body)]) + body, None))
            elif p.type == 3:
                if p.flags & 1:
                    self.retained[p.topic] = p.qos
                if p.qos == 1:
                    b.outbox.append((codec.encode_ack(4, p.pid, level), None))
                elif p.qos == 2:
                    b.outbox.append((codec.encode_ack(5, p.pid, level), None))  # PUBREC
                b.route(p.topic, p.qos)
            elif p.type == 6:                                            # PUBREL -> PUBCOMP
                b.outbox.append((codec.encode_ack(7, p.pid, level), None))
            elif p.type == 12:
                b.outbox.append((b"\xd0\x00", None))

    @precondition(lambda self: self.live)
    @rule(topic=st.sampled_from(TOPICS), qos=st.sampled_from([0, 1, 1]), retain=st.booleans(),
          n=st.sampled_from([1, 1, 2, 6, 12]), send=st.sampled_from(["queue", "one-chunk", "own-chunks"]))
    def others_publish(self, topic, qos, retain, n, send):
        """Someone else publishes n times: the broker queues what matches, or sends it all now."""
        if retain:
            self.retained[topic] = qos
        for _ in range(n):
            self.broker.route(topic, qos)
        if send != "queue" and self.state == "open":
            self.broker_sends(len(self.broker.outbox), send == "one-chunk", read=False)

    @precondition(lambda self: self.live and self.state == "open" and (self.broker.outbox or self.broker.inbox))
    @rule(k=st.integers(1, 12), packed=st.booleans(), read=st.booleans())
    def broker_sends(self, k, packed, read=False):
        """The first k queued packets: acks and deliveries in order, in one chunk or one chunk each
        (having read what the gateway sent first, or not yet)."""
        if read:
            self.broker_reads()
        items, self.broker.outbox = self.broker.outbox[:k], self.broker.outbox[k:]
        if packed:
            self._broker_send(items)
        else:
            for item in items:
                if self.live:
                    self._broker_send([item])

    # ------------------------------------------------------------- facts, policies, identity, time

    @rule(kind=st.sampled_from(["grant", "grant", "grant", "revoke", "revoke", "public", "delete-or-register"]),
          device=st.sampled_from(DEVICES), grantee=st.sampled_from(["alice", "bob", "group:ops"]),
          perm=st.sampled_from(["read", "write", "readwrite"]), ttl=st.sampled_from([None, 0.5, 2.0, 10.0]),
          owner=st.sampled_from(OWNERS), i=st.integers(0, 5))
    def ownership_changes(self, kind, device, grantee, perm, ttl, owner, i):
        """A delegation granted (maybe until some instant) or revoked, a device made public or
        private, deleted, or registered (again) to an owner with no grants."""
        m = self.devs.get(device)
        if kind == "grant" and m is not None:
            self.grant_seq += 1
            m.grants[f"g{self.grant_seq}"] = (grantee, perm, None if ttl is None else self.wall() + ttl)
        elif kind == "revoke" and m is not None and m.grants:
            del m.grants[sorted(m.grants)[i % len(m.grants)]]
        elif kind == "public" and m is not None:
            m.public = not m.public
        elif kind == "delete-or-register":
            if m is not None and m.owner != owner:
                del self.devs[device]
                self.facts.remove(device)
                self._changed()
                return
            self.devs[device] = Dev(owner)
        else:
            return
        self.facts.put(self._device_facts(device))
        self._changed()

    @rule(variant=st.sampled_from(["base", "equivalent", "strict"]))
    def swap_policies(self, variant):
        self.variant = variant
        self.policies.swap(self._compile(variant).compiled)
        self._changed()

    @precondition(lambda self: self.live and self.level == 5 and not self.ident.is_device
                  and not self.reauth_pending)
    @rule()
    def client_reauthenticates(self):
        """AUTH 0x19 (before the CONNACK it waits in the session; its request comes out later)."""
        self._client(codec.encode_auth(0x19, [(Prop.AUTHENTICATION_METHOD, "keygate-token"),
                                              (Prop.AUTHENTICATION_DATA, b"fresh")]))

    @precondition(lambda self: self.live and self.reauth_pending)
    @rule(answer=st.sampled_from(["same", "same", "admin", "no-admin", "no-groups", "ops", "other-sub", "fail"]),
          ttl=st.sampled_from([20.0, 300.0]))
    def reauth_answer(self, answer, ttl):
        self.reauth_pending = False
        now = self.wall()
        ident = dataclasses.replace(self.ident, expires_at=now + ttl)
        if answer == "fail":
            self._process(self.drv.authentication_failed(AuthReason.EXPIRED, method="token"))
            return
        if answer == "other-sub":
            self._process(self.drv.authenticated(dataclasses.replace(ident, sub="sub-mallory")))
            assert self.state == "closed"
            return
        if answer == "admin":
            ident = dataclasses.replace(ident, roles=ident.roles | {ADMIN_ROLE})
        elif answer == "no-admin":
            ident = dataclasses.replace(ident, roles=ident.roles - {ADMIN_ROLE})
        elif answer == "no-groups":
            ident = dataclasses.replace(ident, groups=frozenset())
        elif answer == "ops":
            ident = dataclasses.replace(ident, groups=ident.groups | {"ops"})
        acts = self.drv.authenticated(ident)
        self.ident = ident                  # the identity in force from now on
        self._process(acts)

    @rule(dt=st.sampled_from([0.25, 0.5, 0.5, 1.0, 1.5, 3.0, 3.0, 12.0, 40.0, 100.0]))
    def time_passes(self, dt):
        """The clock moves; tick() whenever it passes next_deadline(), as the shell's timer does."""
        target = self.mono.t + dt
        for _ in range(1000):
            if not self.live:
                break
            d = self.drv.next_deadline()
            if d is None or d > target:
                break
            self.mono.t = max(self.mono.t, d)
            self._process(self.drv.tick())
            nd = self.drv.next_deadline() if self.live else None
            if nd is not None and nd <= self.mono.t:
                self.mono.t += 0.001                      # a timer fires at or after its deadline
                target = max(target, self.mono.t)
        self.mono.t = max(self.mono.t, target)

    # ------------------------------------------------------------- closing

    @precondition(lambda self: self.live and self.age >= 8)     # connections live a while
    @rule(how=st.sampled_from(["tcp-drop", "disconnect", "disconnect-with-will", "shutdown"]))
    def close(self, how):
        # A DISCONNECT sent before the CONNACK waits in the session with everything else the
        # client sent meanwhile; if the connection ends then, the client still asked for its
        # Will to be discarded.
        normal = how == "disconnect" or self.level != 5
        if how == "tcp-drop":
            self._process(self.drv.client_closed(), from_close=True)
        elif how == "shutdown":
            self._process(self.drv.shutdown())
            if self.state != "closed":       # shutdown before CONNACK may not close by itself
                self._process(self.drv.client_closed(), from_close=True)
        elif how == "disconnect" or self.level != 5:
            self._client(b"\xe0\x00", client_normal_disconnect=normal)
        else:
            self._client(b"\xe0\x01\x04")
        if self.state != "closed":            # the client went away after its DISCONNECT
            self._process(self.drv.client_closed(), from_close=True, client_normal_disconnect=normal)

    @invariant()
    def count_steps(self):
        _count("steps")
        if self.s is not None:
            self.age += 1
            chunks = self.s.session.fast_path_chunks
            _count("fast-path chunks", chunks - self.fast_seen)
            self.fast_seen = chunks


# --------------------------------------------------------------------------- the test


@pytest.fixture
def counted(monkeypatch):
    """STATS counted afresh; fast paths counted; the engine on the machine's wall clock."""
    STATS.clear()  # (fast-path chunks: read from Session.fast_path_chunks after every step)
    if not CLOCK_KW:  # fallback: the engine reads time.time(); give it the machine's wall clock
        shim = types.SimpleNamespace(time=lambda: _ACTIVE[0].wall())
        import proxy.policy.engine as engine
        import proxy.policy.subjects as subjects
        monkeypatch.setattr(engine, "time", shim)
        monkeypatch.setattr(subjects, "time", shim)
    return STATS


@pytest.fixture
def totals(counted):
    yield counted
    print("\nmodel totals:", ", ".join(f"{k}={v}" for k, v in sorted(STATS.items())),
          "| engine clock=" + ("injected" if CLOCK_KW else "patched time.time"))


def test_session_against_the_model(totals):
    counted = totals
    run_state_machine_as_test(GatewayModel, settings=settings(
        max_examples=1200, stateful_step_count=50, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    short = {k: (counted.get(k, 0), m) for k, m in MINIMUMS.items()
             if counted.get(k, 0) < m and not (k == "fast-path chunks" and not hasattr(Session, "fast_path_chunks"))}
    assert not short, f"the run did not reach the code enough (got, wanted): {short}"


# --------------------------------------------------------------------------- replays of holes found before

def _replay(*steps) -> None:
    """Run one sequence of the machine's rules by hand, with the same oracle."""
    m = GatewayModel()
    for name, kw in steps:
        getattr(m, name)(**kw)
        m.count_steps()
    m.teardown()


def _connect(who="alice", level=4, will=None, connack=True, subs=()):
    return ("connect", dict(level=level, who=who, will=will, other="devices/d1/cmd/gone", will_qos=0,
                            keepalive=30, ttl=900.0, connack=connack, subs=list(subs)))


def _others(topic, qos=1):
    return ("others_publish", dict(topic=topic, qos=qos, retain=False, n=1, send="one-chunk"))


def _grant(device, grantee, perm, ttl=None):
    return ("ownership_changes", dict(kind="grant", device=device, grantee=grantee, perm=perm, ttl=ttl,
                                      owner="sub-alice", i=0))


_REVOKE_D1 = ("ownership_changes", dict(kind="revoke", device="d1", grantee="bob", perm="read", ttl=None,
                                        owner="sub-alice", i=0))


def test_replay_unsubscribe_and_subscribe_in_one_write(counted):
    # UNSUBSCRIBE '#' (pid 1) + SUBSCRIBE '#' (pid 2) in one write; the broker's UNSUBACK 1
    # must not switch the delivery checks off: bob's device data must not reach alice.
    _replay(_connect("alice"), ("resubscribe_everything", {}), ("broker_reads", {}),
            ("broker_sends", dict(k=1, packed=True)), _others("devices/d2/telemetry"))


def test_replay_expired_delegation_with_an_exact_subscription(counted):
    _replay(_grant("d2", "alice", "read", ttl=2.0), _connect("alice", subs=["devices/d2/telemetry"]),
            _others("devices/d2/telemetry"), ("time_passes", dict(dt=3.0)), _others("devices/d2/telemetry"))


@pytest.mark.parametrize("how", ["tcp-drop", "disconnect-with-will", "shutdown", "before-connack"])
def test_replay_revoked_will(counted, how):
    steps = [_grant("d1", "bob", "write"), _connect("bob", level=5, will="devices/d1/cmd/gone",
                                                    connack=how != "before-connack"), _REVOKE_D1]
    if how != "before-connack":
        steps.append(("time_passes", dict(dt=0.5)))
    m = GatewayModel()
    for name, kw in steps:
        getattr(m, name)(**kw)
    m.age = 8
    # The revocation itself may end the connection (the broker may not keep a revoked Will):
    # then there is nothing left to close, and the Will was discarded then.
    if m.state != "closed":
        m.close("tcp-drop" if how == "before-connack" else how)
    assert STATS.get("wills discarded") == 1


def test_replay_will_at_token_expiry(counted):
    # The token ends at wall +20 s and the session closes: its Will no longer stands on a credential.
    m = GatewayModel()
    m.connect(level=4, who="alice", will="own", other="devices/d1/cmd/gone", will_qos=0, keepalive=30,
              ttl=20.0, connack=True, subs=[])
    m.time_passes(dt=40.0)
    assert m.state == "closed" and STATS.get("wills discarded") == 1


def test_replay_device_registered_again(counted):
    # d1 reads its commands; d1 is deleted and registered to bob: nothing more reaches it.
    _replay(_connect("d1", subs=["devices/d1/cmd/#"]), _others("devices/d1/cmd/x"),
            ("ownership_changes", dict(kind="delete-or-register", device="d1", grantee="bob", perm="read",
                                       ttl=None, owner="sub-bob", i=0)),
            ("ownership_changes", dict(kind="delete-or-register", device="d1", grantee="bob", perm="read",
                                       ttl=None, owner="sub-bob", i=0)),
            _others("devices/d1/cmd/x"))


def test_replay_publish_as_a_write_delegation_expires(counted):
    # bob may command d1 until wall +0.5 s; the decision cached for his first publish must not outlive it.
    pub = ("client_publishes", dict(topic="devices/d1/cmd/x", qos=1, retain=False, n=1))
    _replay(_grant("d1", "bob", "write", ttl=0.5), _connect("bob"), pub, ("time_passes", dict(dt=0.5)), pub)


@pytest.mark.parametrize("level", [4, 5])
def test_replay_qos2_publish_released_after_its_grant_was_revoked(counted, level):
    # The broker publishes a QoS 2 message when it gets the PUBREL: bob's command, sent while he
    # could write to d1, must not be released once the grant is gone.
    pub = ("client_publishes", dict(topic="devices/d1/cmd/x", qos=2, retain=True, n=1))
    _replay(_grant("d1", "bob", "write"), _connect("bob", level=level), pub, ("broker_reads", {}), _REVOKE_D1,
            ("client_releases_qos2", dict(k=1)), ("broker_reads", {}))
