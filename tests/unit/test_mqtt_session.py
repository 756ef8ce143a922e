"""The MQTT session state machine, rule by rule, each test the attack or mistake it stops.

Policies are a small stand-in with the contract's methods (``FakePolicies``) so
each test states exactly what is granted; one test at the end runs the real
policy engine when it is importable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from proxy.audit import MemoryAudit
from proxy.config import MqttConfig, MqttLimitsConfig, RateLimitConfig
from proxy.identity.model import ANONYMOUS, AuthReason, Identity
from proxy.mqtt import codec
from proxy.mqtt.codec import Framer
from proxy.mqtt.commands import Authenticate, AuthRequest, OpenUpstream
from proxy.mqtt.events import (
    Authenticated,
    AuthenticationFailed,
    BrokerClosed,
    BrokerData,
    ClientClosed,
    ClientData,
    Event,
    Invalidated,
    Shutdown,
    Tick,
)
from proxy.mqtt.handshake import AUTH_METHOD, classify_credentials
from proxy.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connect,
    PacketType,
    Prop,
    Reason,
    Suback,
    Subscribe,
    Subscription,
    Unsubscribe,
    Will,
    get_prop,
)
from proxy.mqtt.session import Session
from proxy.mqtt.subscriptions import filter_matches as topic_matches
from proxy.policy.decision import Decision as _Decision
from proxy.policy.decision import SubscribeDecision, Verdict
from proxy.ratelimit import RateLimiter
from tests.unit.mqtt_driver import Driver, Outcome
from tests.unit.mqtt_playbook import (
    Audit,
    Authenticates,
    Closes,
    Counts,
    Packet,
    Playbook,
    ToBroker,
    ToClient,
    connack_code,
    disconnect_code,
)

T = PacketType

ALICE = Identity(kind="user", sub="sub-alice", username="alice", method="token", expires_at=10_000.0)
BOB = Identity(kind="user", sub="sub-bob", username="bob", method="token", expires_at=10_000.0)
THERMO = Identity(kind="device", sub="device:thermo-1", username="thermo-1", method="device_key",
                  device_id="thermo-1", owner_sub="sub-alice", owner_username="alice")


# --------------------------------------------------------------------------- stand-ins


def Decision(allowed: bool, rule: str | None = "r", reason: str = "", until: float | None = None) -> _Decision:
    return _Decision(allowed, rule, reason, until=until)


def SubDecision(verdict: str, rule: str | None = "r", reason: str = "", until: float | None = None,
                devices: frozenset = frozenset()) -> SubscribeDecision:
    return SubscribeDecision(Verdict[verdict], rule, reason, until=until, devices=devices)


class FakePolicies:
    """Grants by topic filter: ``pub`` (publish), ``sub_allow`` / ``sub_check`` (subscribe),
    ``recv`` (receive). Records every question."""

    def __init__(self, pub=(), sub_allow=(), sub_check=(), recv=(), until=None):
        self.until = until  # the unix time every grant ends at (a delegation's expiry), if any
        self.pub = list(pub)
        self.sub_allow = list(sub_allow)
        self.sub_check = list(sub_check)
        self.recv = list(recv)
        self.asked: list[tuple] = []

    def may_publish(self, identity, topic, *, qos=0, retain=False, client_id="", now=None):
        self.asked.append(("publish", topic, qos, retain, client_id))
        return Decision(any(topic_matches(f, topic) for f in self.pub), reason="test", until=self.until)

    def may_subscribe(self, identity, topic_filter, *, qos=0, client_id="", now=None):
        self.asked.append(("subscribe", topic_filter))
        if topic_filter in self.sub_allow:
            return SubDecision("ALLOW", until=self.until)
        if topic_filter in self.sub_check:
            return SubDecision("CHECK_EACH")
        return SubDecision("DENY")

    def may_receive(self, identity, topic, *, client_id="", now=None):
        self.asked.append(("receive", topic))
        return Decision(any(topic_matches(f, topic) for f in self.recv), until=self.until)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(level=MQTT_311, policies=None, *, clock=None, wallclock=None,
         **cfg) -> tuple[Driver, FakePolicies, MemoryAudit]:
    policies = policies or FakePolicies(pub=["devices/thermo-1/#"], sub_allow=["devices/thermo-1/#"])
    audit = MemoryAudit()
    limiter = cfg.pop("rate_limiter", None)
    extra = {k: cfg.pop(k) for k in ("fast_paths", "random_hex", "credential_problem", "subscription_quota",
                                     "upstream_password") if k in cfg}
    leeway = cfg.pop("token_leeway", 0.0)
    config = MqttConfig(**cfg)
    s = Driver(Session(config=config, policies=policies, clock=clock or Clock(),
                       wallclock=wallclock or Clock(5000.0), rate_limiter=limiter, token_leeway=leeway,
                       **extra), audit)
    return s, policies, audit


def connect_packet(level=MQTT_311, client_id="app-1", *, username="alice", password=b"TOKEN", will=None,
                   props=(), keepalive=60, clean=True) -> bytes:
    name = "MQIsdp" if level == 3 else "MQTT"
    return codec.encode_connect(Connect(name, level, clean, keepalive, client_id, username, password, will,
                                        list(props)))


def connack(level=MQTT_311, reason=0, session_present=False, props=()) -> bytes:
    return codec.encode_connack(session_present, reason, level, list(props))


def decode_all(chunks, max_size=1 << 28) -> list[codec.Frame]:
    data = b"".join(bytes(c) for c in chunks)
    frames = Framer(max_size).feed(data)
    assert sum(len(f.raw) for f in frames) == len(data)
    return frames


def only(chunks, ptype) -> codec.Frame:
    frames = decode_all(chunks)
    assert [f.type for f in frames] == [ptype], frames
    return frames[0]


def open_session(level=MQTT_311, identity=ALICE, policies=None, *, client_id="app-1", props=(),
                 broker_props=(), session_present=False, **kw) -> tuple[Driver, FakePolicies, MemoryAudit]:
    s, p, a = make(level, policies, **kw)
    acts = s.client_data(connect_packet(level, client_id, props=props))
    assert acts.auth is not None and not acts.to_broker
    acts = s.authenticated(identity)
    assert acts.open_upstream and acts.close is None, acts
    acts = s.broker_data(connack(level, props=broker_props, session_present=session_present))
    assert only(acts.to_client, T.CONNACK)
    assert not s.closed
    return s, p, a


def pub(topic, payload=b"x", qos=0, pid=None, level=MQTT_311, retain=False, props=()) -> bytes:
    if qos and pid is None:
        pid = 7
    return codec.encode_publish(topic, payload, qos=qos, packet_id=pid, level=level, retain=retain,
                                properties=list(props))


def denials(audit: MemoryAudit, action: str) -> list[dict]:
    return [r for r in audit.records if r["action"] == action and r["decision"] == "deny"]


def upstream(**fields: Any) -> Packet:
    """The CONNECT the gateway sends the broker, with these fields as decoded."""
    def check(frame: codec.Frame) -> bool:
        up = codec.decode_connect(frame.body)
        return all(getattr(up, k) == v for k, v in fields.items())
    return Packet(T.CONNECT, ", ".join(f"{k}={v!r}" for k, v in fields.items()), check)


def connack_with(level: int, *props: Any) -> Packet:
    """A successful CONNACK carrying these (property, value) pairs, given flat."""
    want = dict(zip(props[::2], props[1::2], strict=True))

    def check(frame: codec.Frame) -> bool:
        ca = codec.decode_connack(frame.body, level)
        return ca.reason == 0 and all(get_prop(ca.properties, k) == v for k, v in want.items())
    return Packet(T.CONNACK, f"success, {want!r}", check)


# --------------------------------------------------------------------------- CONNECT


def test_connect_asks_for_authentication_and_sends_nothing_upstream():
    s, _, _ = make()
    pb = Playbook(s.session)
    assert (pb
            >> ClientData(connect_packet(password=b"TOKEN"))
            << Authenticate(AuthRequest(kind="connect", username="alice", password=b"TOKEN", auth_method=None,
                                        auth_data=None, client_id="app-1")))
    assert "TOKEN" not in repr(pb.taken[-1])  # secrets stay out of logs
    assert s.reading_paused


def test_upstream_connect_is_stripped_and_namespaced():
    s, _, _ = make()
    assert (Playbook(s.session)
            >> ClientData(connect_packet(password=b"SECRET-TOKEN"))
            << Authenticates(kind="connect", password=b"SECRET-TOKEN")
            >> Authenticated(ALICE)
            << OpenUpstream()
            << ToBroker(upstream(client_id="u/sub-alice/app-1", username=None, password=None))
            << Audit(action="connect", decision="allow", resource="app-1", identity=ALICE))
    assert s.client_id == "app-1" and s.upstream_client_id == "u/sub-alice/app-1"


def test_gateway_credentials_replace_the_clients():
    s, _, _ = make(upstream_username="keygate", upstream_password="broker-pw")
    assert (Playbook(s.session)
            >> ClientData(connect_packet())
            << Authenticates(kind="connect")
            >> Authenticated(ALICE)
            << OpenUpstream()
            << ToBroker(upstream(username="keygate", password=b"broker-pw"))
            << Audit(action="connect", decision="allow"))


def connects_upstream_as(identity: Identity, client_id: str, **connect) -> Playbook:
    """A CONNECT with ``client_id``, authenticated as ``identity``, up to the upstream CONNECT
    (whose client id the test expects next)."""
    s, _, _ = make(**connect.pop("make", {}))
    return (Playbook(s.session)
            >> ClientData(connect_packet(client_id=client_id, **connect))
            << Authenticates(kind="connect", client_id=client_id)
            >> Authenticated(identity)
            << OpenUpstream())


def test_client_id_takeover_is_impossible():
    # Bob asks for the client id Alice uses: at the broker they are different sessions.
    assert (connects_upstream_as(BOB, "app-1")
            << ToBroker(upstream(client_id="u/sub-bob/app-1"))
            << Audit(action="connect", decision="allow", identity=BOB))
    # Bob cannot spell Alice's namespaced id either: it is namespaced again.
    assert (connects_upstream_as(BOB, "u/sub-alice/app-1")
            << ToBroker(upstream(client_id="u/sub-bob/u/sub-alice/app-1"))
            << Audit(action="connect", decision="allow", identity=BOB))


def test_subjects_cannot_collide_in_the_namespace():
    # sub "x" + client id "y/z" and sub "x/y" + client id "z" must be different broker sessions.
    assert (connects_upstream_as(dataclasses.replace(ALICE, sub="x"), "y/z")
            << ToBroker(upstream(client_id="u/x/y/z"))
            << Audit(action="connect", decision="allow"))
    assert (connects_upstream_as(dataclasses.replace(ALICE, sub="x/y"), "z")
            << ToBroker(upstream(client_id="u/x%2Fy/z"))
            << Audit(action="connect", decision="allow"))


def test_device_id_inside_the_user_namespace_is_refused():
    evil = dataclasses.replace(THERMO, device_id="u/sub-bob/app-1", username="u/sub-bob/app-1")
    s, _, _ = make()
    assert (Playbook(s.session)
            >> ClientData(connect_packet(client_id="u/sub-bob/app-1"))
            << Authenticates(kind="connect")
            >> Authenticated(evil)
            << ToClient(b"\x20\x02\x00\x02")
            << Audit(action="connect", decision="deny", identity=evil)
            << Closes("client_id_rejected"))


@pytest.mark.parametrize("level,code", [(MQTT_311, 0x02), (MQTT_5, 0x85)])
def test_device_must_use_its_own_client_id(level, code):
    s, _, _ = make(level)
    assert (Playbook(s.session)
            >> ClientData(connect_packet(level, client_id="thermo-2", username="thermo-1"))
            << Authenticates(kind="connect", client_id="thermo-2")
            >> Authenticated(THERMO)
            << ToClient(connack_code(code, level))
            << Audit(action="connect", decision="deny", reason="client id is not the device id")
            << Closes("client_id_rejected"))
    assert s.closed


def test_device_with_empty_client_id_gets_its_id():
    s, _, _ = make(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(connect_packet(MQTT_5, client_id="", username="thermo-1"))
            << Authenticates(kind="connect", client_id="")
            >> Authenticated(THERMO)
            << OpenUpstream()
            << ToBroker(upstream(client_id="thermo-1"))
            << Audit(action="connect", decision="allow")
            >> BrokerData(connack(MQTT_5))
            << ToClient(connack_with(MQTT_5, Prop.ASSIGNED_CLIENT_IDENTIFIER, "thermo-1")))


def test_user_with_empty_client_id_gets_a_generated_namespaced_one():
    s, _, _ = make(MQTT_5, random_hex=lambda n: "ab" * n)
    generated = "kg-" + "ab" * 8
    assert (Playbook(s.session)
            >> ClientData(connect_packet(MQTT_5, client_id=""))
            << Authenticates(kind="connect", client_id="")
            >> Authenticated(ALICE)
            << OpenUpstream()
            << ToBroker(upstream(client_id="u/sub-alice/" + generated))
            << Audit(action="connect", decision="allow")
            # The broker's own assignment is not passed on: the client is told the gateway's.
            >> BrokerData(connack(MQTT_5, props=[(Prop.ASSIGNED_CLIENT_IDENTIFIER, "broker-made")]))
            << ToClient(connack_with(MQTT_5, Prop.ASSIGNED_CLIENT_IDENTIFIER, generated)))
    assert s.client_id == generated


def test_generated_client_ids_are_random_by_default():
    ids = set()
    for _ in range(2):
        s, _, _ = make(MQTT_5)
        s.client_data(connect_packet(MQTT_5, client_id=""))
        ids.add(codec.decode_connect(only(s.authenticated(ALICE).to_broker, T.CONNECT).body).client_id)
    assert len(ids) == 2 and all(i.startswith("u/sub-alice/kg-") for i in ids)


def test_anonymous_clients_never_share_a_broker_session():
    ids = set()
    for _ in range(2):
        s, _, _ = make()
        s.client_data(connect_packet(client_id="same", username=None, password=None))
        ids.add(codec.decode_connect(only(s.authenticated(ANONYMOUS).to_broker, T.CONNECT).body).client_id)
    assert len(ids) == 2


def test_empty_client_id_needs_clean_session_in_311():
    s, _, _ = make()
    assert (Playbook(s.session)
            >> ClientData(connect_packet(client_id="", clean=False))
            << ToClient(connack_code(0x02, MQTT_311))
            << Audit(action="connect", decision="deny")
            << Closes("client_id_rejected"))


@pytest.mark.parametrize("level,code", [(MQTT_311, 0x05), (MQTT_5, 0x87)])
def test_will_on_a_forbidden_topic_is_refused(level, code):
    will = Will("devices/thermo-2/cmd", b"bye", 1, True)
    s, p, _ = make(level)
    assert (Playbook(s.session)
            >> ClientData(connect_packet(level, will=will))
            << Authenticates(kind="connect")
            >> Authenticated(ALICE)
            << ToClient(connack_code(code, level))
            << Audit(action="will", decision="deny", resource="devices/thermo-2/cmd")
            << Closes("not_authorized"))
    assert ("publish", "devices/thermo-2/cmd", 1, True, "app-1") in p.asked  # its QoS and retain flag


def test_allowed_will_goes_upstream():
    will = Will("devices/thermo-1/status", b"offline", 0, True)
    s, _, _ = make()
    assert (Playbook(s.session)
            >> ClientData(connect_packet(will=will))
            << Authenticates(kind="connect")
            >> Authenticated(ALICE)
            << OpenUpstream()
            << ToBroker(upstream(will=will))
            << Audit(action="connect", decision="allow"))


def will_session(level):
    p = FakePolicies(pub=["devices/thermo-1/#"])
    s, _, audit = make(level, p)
    s.client_data(connect_packet(level, will=Will("devices/thermo-1/status", b"gone", 0, False)))
    s.authenticated(ALICE)
    s.broker_data(connack(level))
    return s, p, audit


def test_will_revoked_mid_session_is_discarded_when_the_client_drops():
    s, p, _ = will_session(MQTT_311)
    p.pub.clear()  # e.g. the device was given away
    assert (Playbook(s.session)
            >> ClientClosed()
            << ToBroker(b"\xe0\x00")  # a normal DISCONNECT: the broker discards the Will
            << Audit(dict(action="will", decision="deny"), dict(action="session", decision="summary"))
            << Closes("client_closed"))


def test_allowed_will_is_left_to_the_broker():
    s, _, _ = will_session(MQTT_311)
    assert (Playbook(s.session)
            >> ClientClosed()
            << Audit(action="session", decision="summary", reason="client_closed")
            << Closes("client_closed")
            >> ClientClosed())  # idempotent: nothing more


def test_disconnect_with_will_is_checked_again():
    s, p, _ = will_session(MQTT_5)
    p.pub.clear()
    assert (Playbook(s.session)
            >> ClientData(codec.encode_disconnect(MQTT_5, 0x04))
            << ToBroker(b"\xe0\x00")
            << Audit(dict(action="will", decision="deny"), dict(action="session", decision="summary"))
            << Closes("client_disconnect"))
    s, p, _ = will_session(MQTT_5)
    raw = codec.encode_disconnect(MQTT_5, 0x04)
    assert (Playbook(s.session)
            >> ClientData(raw)
            << ToBroker(raw)
            << Audit(action="session", decision="summary")
            << Closes("client_disconnect")
            >> ClientClosed())


@pytest.mark.parametrize("reason,v3,v5", [
    (AuthReason.BAD_SIGNATURE, 0x04, 0x86), (AuthReason.EXPIRED, 0x04, 0x86),
    (AuthReason.UNKNOWN_DEVICE_OR_KEY, 0x04, 0x86), (AuthReason.NO_CREDENTIALS, 0x05, 0x87),
    (AuthReason.ISSUER_UNREACHABLE, 0x03, 0x88)])
@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_authentication_failures_answer_with_the_versions_code(reason, v3, v5, level):
    s, _, _ = make(level)
    assert (Playbook(s.session)
            >> ClientData(connect_packet(level))
            << Authenticates(kind="connect")
            >> AuthenticationFailed(reason)
            << ToClient(connack_code(v5 if level == 5 else v3, level))
            << Audit(action="connect", decision="deny", reason=reason.value)
            << Closes("auth_failed"))


def test_v5_enhanced_auth_is_answered_by_the_gateway_and_never_reaches_the_broker():
    props = [(Prop.AUTHENTICATION_METHOD, AUTH_METHOD), (Prop.AUTHENTICATION_DATA, b"TOKEN"),
             (Prop.TOPIC_ALIAS_MAXIMUM, 20), (Prop.USER_PROPERTY, ("k", "v"))]
    s, _, _ = make(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(connect_packet(MQTT_5, username=None, password=None, props=props))
            << Authenticates(kind="connect", auth_method=AUTH_METHOD, auth_data=b"TOKEN")
            >> Authenticated(ALICE)
            << OpenUpstream()
            # No auth method/data, and no Topic Alias Maximum: the broker never sends aliases.
            << ToBroker(upstream(properties=[(Prop.USER_PROPERTY, ("k", "v"))]))
            << Audit(action="connect", decision="allow")
            >> BrokerData(connack(MQTT_5, props=[(Prop.TOPIC_ALIAS_MAXIMUM, 65535)]))
            << ToClient(connack_with(MQTT_5, Prop.AUTHENTICATION_METHOD, AUTH_METHOD,
                                     Prop.TOPIC_ALIAS_MAXIMUM, 10, Prop.MAXIMUM_PACKET_SIZE, 1048576)))


def test_unknown_auth_method_is_refused_without_asking():
    s, _, _ = make(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(connect_packet(MQTT_5, props=[(Prop.AUTHENTICATION_METHOD, "SCRAM-SHA-1")]))
            << ToClient(connack_code(0x8C, MQTT_5))
            << Audit(action="connect", decision="deny")
            << Closes("auth_failed"))


def test_packets_before_connect_close_the_connection():
    s, _, _ = make()
    assert (Playbook(s.session)
            >> ClientData(b"\xc0\x00")  # PINGREQ
            << Audit(action="protocol_error", decision="deny", reason="PINGREQ before CONNECT")
            << Closes("protocol_error"))
    s, _, _ = make()
    assert (Playbook(s.session)
            >> ClientData(pub("devices/thermo-1/t"))
            << Audit(action="protocol_error", decision="deny", reason="PUBLISH before CONNECT")
            << Closes("protocol_error"))


def test_second_connect_is_a_protocol_error():
    s, _, _ = open_session(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(connect_packet(MQTT_5))
            << ToClient(disconnect_code(Reason.PROTOCOL_ERROR))
            << Audit(dict(action="protocol_error", decision="deny"), dict(action="session", decision="summary"))
            << Closes("protocol_error"))


def test_unsupported_protocol_level_gets_the_v3_code():
    raw = bytearray(connect_packet(MQTT_311))
    raw[8] = 6  # level byte
    s, _, _ = make()
    assert (Playbook(s.session)
            >> ClientData(bytes(raw))
            << ToClient(b"\x20\x02\x00\x01")
            << Audit(action="protocol_error", decision="deny", reason="protocol level 6 not supported")
            << Closes("protocol_error"))


def test_connect_split_into_single_bytes():
    s, _, _ = make(MQTT_5)
    data = connect_packet(MQTT_5, props=[(Prop.USER_PROPERTY, ("a", "b"))])
    pb = Playbook(s.session)
    for i in range(len(data) - 1):
        assert pb >> ClientData(data[i:i + 1])  # nothing until the last byte
    assert pb >> ClientData(data[-1:]) << Authenticates(kind="connect", username="alice")


def test_connect_deadline():
    clock = Clock()
    s, _, _ = make(clock=clock, connect_timeout_seconds=5)
    assert s.next_deadline() == 1005.0 and s.timeout() == 5.0
    pb = Playbook(s.session)
    assert pb >> ClientData(connect_packet()[:10])  # a slowloris dribble does not extend it
    clock.t = 1004.9
    assert pb >> Tick(clock.t)
    clock.t = 1005.0
    assert (pb
            >> Tick(clock.t)
            << Audit(action="connect", decision="deny")
            << Closes("connect_timeout"))
    assert s.closed


def test_connect_deadline_also_covers_a_slow_authentication():
    clock = Clock()
    s, _, _ = make(MQTT_5, clock=clock, connect_timeout_seconds=5)
    pb = Playbook(s.session) >> ClientData(connect_packet(MQTT_5)) << Authenticates(kind="connect")
    clock.t = 1006
    assert (pb
            >> Tick(clock.t)
            << ToClient(connack_code(0x88, MQTT_5))
            << Audit(action="connect", decision="deny")
            << Closes("connect_timeout")
            >> Authenticated(ALICE))  # a late answer does nothing


def upstream_playbook(level=MQTT_311, **kw) -> tuple[Playbook, Driver]:
    """A session whose CONNECT was authenticated as Alice and sent to the broker."""
    s, _, _ = make(level, **kw)
    return (Playbook(s.session)
            >> ClientData(connect_packet(level))
            << Authenticates(kind="connect")
            >> Authenticated(ALICE)
            << OpenUpstream()
            << ToBroker(upstream(client_id="u/sub-alice/app-1"))
            << Audit(action="connect", decision="allow")), s


def test_broker_unreachable_answers_server_unavailable():
    pb, _ = upstream_playbook()
    assert (pb
            >> BrokerClosed()
            << ToClient(b"\x20\x02\x00\x03")
            << Audit(action="session", decision="summary")
            << Closes("broker_closed"))


def test_broker_refusal_is_forwarded():
    pb, _ = upstream_playbook(MQTT_5)
    assert (pb
            >> BrokerData(connack(MQTT_5, reason=0x8A))
            << ToClient(connack_code(0x8A, MQTT_5))
            << Audit(dict(action="connect", decision="deny", reason="broker refused 0x8A"),
                     dict(action="session", decision="summary", reason="broker_refused"))
            << Closes("broker_refused"))


def test_packets_sent_before_connack_wait_and_are_then_checked():
    s, _, _ = make()
    ok, no = pub("devices/thermo-1/t", b"ok"), pub("devices/thermo-2/t", b"no")
    assert (Playbook(s.session)
            >> ClientData(connect_packet() + ok + no)
            << Authenticates(kind="connect")
            >> Authenticated(ALICE)
            << OpenUpstream()
            << ToBroker(upstream())
            << Audit(action="connect", decision="allow")
            >> BrokerData(connack())
            << ToClient(connack_code(0, MQTT_311))
            << ToBroker(ok)
            << Audit(action="publish", decision="deny", resource="devices/thermo-2/t"))


def test_too_much_data_before_connack_closes():
    s, _, _ = make(max_packet_size=1000)
    pb = Playbook(s.session) >> ClientData(connect_packet()) << Authenticates(kind="connect")
    for _ in range(80):
        pb >> ClientData(pub("devices/thermo-1/t", b"x" * 900))
        if pb.pending:
            break
    assert (pb
            << ToClient(connack_code(0x03, MQTT_311))
            << Audit(action="connect", decision="deny", reason="too much data before CONNACK")
            << Closes("buffer_full"))


# --------------------------------------------------------------------------- keepalive and expiry

PINGREQ = b"\xc0\x00"
SUMMARY = dict(action="session", decision="summary")


def test_keepalive_enforced_at_one_and_a_half_times():
    clock = Clock()
    s, _, _ = open_session(MQTT_5, clock=clock)  # keepalive 60
    pb = Playbook(s.session)
    clock.t += 89
    assert pb >> Tick(clock.t)
    assert pb >> ClientData(PINGREQ) << ToBroker(PINGREQ)  # activity moves the deadline
    clock.t += 89
    assert pb >> Tick(clock.t)
    clock.t += 2
    assert (pb
            >> Tick(clock.t)
            << ToClient(disconnect_code(0x8D))
            << Audit(dict(action="keepalive", decision="close", reason="keepalive timeout"), SUMMARY)
            << Closes("keepalive_timeout"))


def test_a_tick_at_the_keepalive_deadline_closes():
    # The shell wakes at next_deadline(): the tick at that instant must act, or the shell would
    # re-arm a timer for the same instant again and again until the clock moves past it.
    clock = Clock()
    s, _, _ = open_session(MQTT_5, clock=clock)  # keepalive 60
    pb = Playbook(s.session)
    clock.t = s.session.next_deadline()
    assert (pb
            >> Tick(clock.t)
            << ToClient(disconnect_code(0x8D))
            << Audit(dict(action="keepalive", decision="close", reason="keepalive timeout"), SUMMARY)
            << Closes("keepalive_timeout"))


def test_keepalive_zero_is_capped_and_v5_clients_are_told():
    s, _, _ = make(MQTT_5, max_keepalive_seconds=100)
    assert (Playbook(s.session)
            >> ClientData(connect_packet(MQTT_5, keepalive=0))
            << Authenticates(kind="connect")
            >> Authenticated(ALICE)
            << OpenUpstream()
            # The gateway enforces 100 s; the broker is given twice that, so the gateway times out first.
            << ToBroker(upstream(keepalive=200))
            << Audit(action="connect", decision="allow")
            >> BrokerData(connack(MQTT_5))
            << ToClient(connack_with(MQTT_5, Prop.SERVER_KEEP_ALIVE, 100)))
    clock = Clock()
    s, _, _ = make(MQTT_311, clock=clock, max_keepalive_seconds=100)
    s.client_data(connect_packet(MQTT_311, keepalive=0))
    s.authenticated(ALICE)
    pb = Playbook(s.session) >> BrokerData(connack()) << ToClient(connack_code(0, MQTT_311))
    clock.t += 149
    assert pb >> Tick(clock.t)
    clock.t += 2
    assert (pb
            >> Tick(clock.t)
            << Audit(dict(action="keepalive", decision="close"), SUMMARY)
            << Closes("keepalive_timeout"))


def test_token_expiry_disconnects_at_expiry_plus_leeway():
    clock, wall = Clock(), Clock(9_000.0)
    s, _, _ = open_session(MQTT_5, clock=clock, wallclock=wall, token_leeway=30, max_keepalive_seconds=60)
    assert s.next_deadline() == pytest.approx(1000 + 90)  # keepalive first
    pb = Playbook(s.session)
    wall.t = 10_029.0
    assert pb >> ClientData(PINGREQ) << ToBroker(PINGREQ)
    assert pb >> Tick(clock.t)
    wall.t = 10_030.0
    assert (pb
            >> Tick(clock.t)
            << ToClient(disconnect_code(0xA0))
            << Audit(dict(action="session", decision="close", reason="token expired"), SUMMARY)
            << Closes("token_expired"))


def test_already_expired_identity_is_refused():
    s, _, _ = make(wallclock=Clock(20_000.0))
    assert (Playbook(s.session)
            >> ClientData(connect_packet())
            << Authenticates(kind="connect")
            >> Authenticated(ALICE)
            << ToClient(b"\x20\x02\x00\x05")
            << Audit(action="connect", decision="deny")
            << Closes("token_expired"))


def reauth(data: bytes = b"FRESH", method: str = AUTH_METHOD) -> bytes:
    return codec.encode_auth(Reason.REAUTHENTICATE, [(Prop.AUTHENTICATION_METHOD, method),
                                                     (Prop.AUTHENTICATION_DATA, data)])


def test_reauthentication_same_subject_keeps_the_connection():
    clock, wall = Clock(), Clock(9_000.0)
    s, _, _ = open_session(MQTT_5, clock=clock, wallclock=wall)
    pb = Playbook(s.session)
    assert pb >> ClientData(reauth(b"FRESH")) << Authenticates(kind="reauth", auth_data=b"FRESH")
    request = pb.taken[-1].request
    assert classify_credentials(request, None, lambda _: False) == ("token", "FRESH")
    fresh = dataclasses.replace(ALICE, expires_at=20_000.0)
    ok = Packet(T.AUTH, "success, method " + AUTH_METHOD,
                lambda f: (a := codec.decode_auth(f.body)).reason == 0
                and get_prop(a.properties, Prop.AUTHENTICATION_METHOD) == AUTH_METHOD)
    assert pb >> Authenticated(fresh) << ToClient(ok) << Audit(action="reauth", decision="allow", identity=fresh)
    # The connection lives on the fresh token: past the old expiry, up to the new one.
    wall.t = 15_000.0
    assert pb >> Tick(clock.t)
    wall.t = 20_000.0
    assert (pb
            >> Tick(clock.t)
            << ToClient(disconnect_code(0xA0))
            << Audit(dict(action="session", decision="close", reason="token expired"), SUMMARY)
            << Closes("token_expired"))


def test_reauthentication_as_someone_else_disconnects():
    s, _, _ = open_session(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(reauth(b"BOBS"))
            << Authenticates(kind="reauth", auth_data=b"BOBS")
            >> Authenticated(BOB)
            << ToClient(disconnect_code(0x87))
            # Still Alice's connection to the end: the summary is hers.
            << Audit(dict(action="reauth", decision="deny", reason="subject changed", identity=ALICE),
                     dict(SUMMARY, identity=ALICE))
            << Closes("reauth_failed"))


def test_failed_reauthentication_disconnects():
    s, _, _ = open_session(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(reauth(b"FORGED"))
            << Authenticates(kind="reauth", auth_data=b"FORGED")
            >> AuthenticationFailed(AuthReason.BAD_SIGNATURE)
            << ToClient(disconnect_code(0x87))
            << Audit(dict(action="reauth", decision="deny"), SUMMARY)
            << Closes("reauth_failed"))


def test_reauth_with_another_method_is_refused():
    s, _, _ = open_session(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(codec.encode_auth(Reason.REAUTHENTICATE, [(Prop.AUTHENTICATION_METHOD, "PLAIN")]))
            << ToClient(disconnect_code(0x8C))
            << Audit(dict(action="protocol_error", decision="deny", reason="authentication method 'PLAIN'"),
                     SUMMARY)
            << Closes("protocol_error", reason_code=Reason.BAD_AUTHENTICATION_METHOD))


# --------------------------------------------------------------------------- PUBLISH

PROTOCOL_ERROR = dict(action="protocol_error", decision="deny")


def denied(topic: str, **fields: Any) -> dict[str, Any]:
    """The audit line of a publish refused on ``topic``."""
    return dict(action="publish", decision="deny", resource=topic, **fields)


def test_allowed_publishes_pass_as_one_zero_copy_slice():
    s, _, _ = open_session()
    data = bytearray(pub("devices/thermo-1/a", b"1") + pub("devices/thermo-1/b", b"2", qos=1) + PINGREQ)
    pb = Playbook(s.session)
    assert pb >> ClientData(data) << ToBroker(pub("devices/thermo-1/a", b"1"), pub("devices/thermo-1/b", b"2", qos=1),
                                              PINGREQ)
    [chunk] = pb.taken[-1].items
    assert isinstance(chunk, memoryview) and chunk.obj is data and bytes(chunk) == bytes(data)


@pytest.mark.parametrize("qos,ack", [(1, T.PUBACK), (2, T.PUBREC)])
def test_denied_publish_v5_gets_0x87(qos, ack):
    s, _, _ = open_session(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(pub("devices/thermo-2/cmd", qos=qos, pid=9, level=5))
            << ToClient(bytes([ack << 4, 3]) + b"\x00\x09\x87")
            << Audit(denied("devices/thermo-2/cmd")))


def test_denied_qos0_is_dropped_and_audited():
    s, _, _ = open_session(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(pub("devices/thermo-2/cmd", level=5))
            << Audit(denied("devices/thermo-2/cmd")))


def test_denied_publish_v3_is_acknowledged_and_dropped():
    s, _, _ = open_session()
    assert (Playbook(s.session)
            >> ClientData(pub("devices/thermo-2/cmd", qos=1, pid=3))
            << ToClient(b"\x40\x02\x00\x03")
            << Audit(denied("devices/thermo-2/cmd"))
            >> ClientData(pub("devices/thermo-2/cmd", qos=2, pid=4))
            << ToClient(b"\x50\x02\x00\x04")
            << Audit(denied("devices/thermo-2/cmd"))
            # The client's PUBREL is the gateway's to finish: the broker never saw this id.
            >> ClientData(codec.encode_ack(T.PUBREL, 4, 4))
            << ToClient(b"\x70\x02\x00\x04")
            # A PUBREL for an id the gateway holds nothing for is answered, never forwarded: the
            # broker must not release a QoS 2 message the gateway cannot decide again.
            >> ClientData(codec.encode_ack(T.PUBREL, 5, 4))
            << ToClient(b"\x70\x02\x00\x05")
            << Audit(denied("", reason="PUBREL for a QoS 2 publish not held on this connection")))


def test_reused_packet_id_is_no_longer_swallowed():
    s, _, _ = open_session()
    allowed = pub("devices/thermo-1/cmd", qos=2, pid=4)
    assert (Playbook(s.session)
            >> ClientData(pub("devices/thermo-2/cmd", qos=2, pid=4))
            << ToClient(b"\x50\x02\x00\x04")
            << Audit(denied("devices/thermo-2/cmd"))
            >> ClientData(allowed)  # allowed, now the broker's (held here until its PUBREL)
            << ToClient(b"\x50\x02\x00\x04")
            >> ClientData(codec.encode_ack(T.PUBREL, 4, 4))
            << ToBroker(allowed, codec.encode_ack(T.PUBREL, 4, 4)))


def test_denied_publish_v3_can_close_instead():
    s, _, _ = open_session(denied_publish_v3="disconnect")
    assert (Playbook(s.session)
            >> ClientData(pub("devices/thermo-2/cmd", qos=1))
            << Audit(denied("devices/thermo-2/cmd"), SUMMARY)
            << Closes("denied_publish"))


@pytest.mark.parametrize("topic,code", [
    (b"devices/+/t", 0x90), (b"devices/#", 0x90), (b"dev\x00ices", 0x81), (b"\xed\xa0\x80", 0x81),
    (b"\xff", 0x81), (b"a\x01b", 0x81)])
def test_bad_publish_topics_are_refused_before_the_broker(topic, code):
    s, _, _ = open_session(MQTT_5)
    raw = b"\x30" + bytes([2 + len(topic) + 1]) + len(topic).to_bytes(2, "big") + topic + b"\x00"
    assert (Playbook(s.session)
            >> ClientData(raw)
            << ToClient(disconnect_code(code))
            << Audit(PROTOCOL_ERROR, SUMMARY)
            << Closes("protocol_error", reason_code=code))


@pytest.mark.parametrize("raw,why", [
    (b"\x36\x05\x00\x01a\x00\x01", "qos 3"),
    (b"\x38\x04\x00\x01ax", "dup on qos 0"),
    (b"\x32\x05\x00\x01a\x00\x00", "packet id 0"),
    (b"\x30\x03\x00\x00x", "empty topic in 3.1.1"),
    (b"\x80\x06\x00\x01\x00\x01a\x00", "SUBSCRIBE flags 0"),
    (b"\x60\x02\x00\x01", "PUBREL flags 0"),
    (b"\x20\x02\x00\x00", "CONNACK from a client"),
    (b"\xc0\x01\x00", "PINGREQ with a body"),
    (b"\xf0\x00", "AUTH in 3.1.1"),
    (b"\x30\xff\xff\xff\xff\x01", "5-byte remaining length"),
])
def test_protocol_violations_close_v3(raw, why):
    s, _, _ = open_session()
    assert (Playbook(s.session)
            >> ClientData(raw)
            << Audit(PROTOCOL_ERROR, SUMMARY)
            << Closes("protocol_error")), why


def test_subscribe_with_the_right_fixed_header_flags_is_no_violation():
    s, _, _ = open_session(policies=FakePolicies(sub_allow=["a"]))
    raw = b"\x82\x06\x00\x01\x00\x01a\x00"
    assert Playbook(s.session) >> ClientData(raw) << ToBroker(raw)


def test_oversized_packet_refused_from_its_header():
    s, _, _ = open_session(MQTT_5, max_packet_size=1000)
    header = b"\x30" + codec.encode_varint(5000)
    assert (Playbook(s.session)
            >> ClientData(header)  # only the header: refused before any body is buffered
            << ToClient(disconnect_code(0x95))
            << Audit(dict(PROTOCOL_ERROR, reason="packet of 5003 bytes exceeds the maximum 1000"), SUMMARY)
            << Closes("protocol_error", reason_code=0x95)
            >> ClientData(b"x" * 5000))  # nothing more taken, nor answered


def test_topic_aliases_are_resolved_and_never_reach_the_broker():
    s, _, _ = open_session(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(pub("devices/thermo-1/t", b"one", level=5, props=[(Prop.TOPIC_ALIAS, 1)]))
            << ToBroker(pub("devices/thermo-1/t", b"one", level=5))  # full topic, alias removed
            >> ClientData(pub("", b"two", qos=1, pid=2, level=5, props=[(Prop.TOPIC_ALIAS, 1)]))
            << ToBroker(pub("devices/thermo-1/t", b"two", qos=1, pid=2, level=5)))


def test_denied_alias_setting_publish_keeps_the_alias_checked():
    # The attack: set alias 1 to a forbidden topic (denied), then publish by alias only.
    s, _, _ = open_session(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(pub("devices/thermo-1/t", level=5, props=[(Prop.TOPIC_ALIAS, 1)]))
            << ToBroker(pub("devices/thermo-1/t", level=5))
            >> ClientData(pub("devices/thermo-2/cmd", qos=1, pid=3, level=5, props=[(Prop.TOPIC_ALIAS, 1)]))
            << ToClient(b"\x40\x03\x00\x03\x87")
            << Audit(denied("devices/thermo-2/cmd"))
            >> ClientData(pub("", qos=1, pid=4, level=5, props=[(Prop.TOPIC_ALIAS, 1)]))
            << ToClient(b"\x40\x03\x00\x04\x87")
            << Audit(denied("devices/thermo-2/cmd")))


@pytest.mark.parametrize("alias,maximum,code", [(11, 10, 0x94), (1, 0, 0x94), (5, 10, 0x82)])
def test_bad_topic_aliases_disconnect(alias, maximum, code):
    s, _, _ = open_session(MQTT_5, topic_alias_maximum=maximum)
    assert (Playbook(s.session)
            >> ClientData(pub("", level=5, props=[(Prop.TOPIC_ALIAS, alias)]))
            << ToClient(disconnect_code(code))
            << Audit(PROTOCOL_ERROR, SUMMARY)
            << Closes("protocol_error", reason_code=code))


def test_alias_maximum_zero_is_not_advertised():
    s, _, _ = make(MQTT_5, topic_alias_maximum=0)
    s.client_data(connect_packet(MQTT_5))
    s.authenticated(ALICE)
    no_alias = Packet(T.CONNACK, "no Topic Alias Maximum",
                      lambda f: get_prop(codec.decode_connack(f.body, 5).properties, Prop.TOPIC_ALIAS_MAXIMUM) is None)
    assert (Playbook(s.session)
            >> BrokerData(connack(MQTT_5, props=[(Prop.TOPIC_ALIAS_MAXIMUM, 100)]))
            << ToClient(no_alias))


def test_broker_topic_alias_is_a_broker_protocol_error():
    s, _, _ = open_session(MQTT_5, policies=FakePolicies(sub_check=["#"], recv=["#"]))
    sub = codec.encode_subscribe(Subscribe(1, [Subscription("#", 0)]), 5)
    assert (Playbook(s.session)
            >> ClientData(sub)
            << ToBroker(sub)
            >> BrokerData(pub("a", level=5, props=[(Prop.TOPIC_ALIAS, 1)]))
            << ToClient(disconnect_code(0x80))
            << Audit(dict(action="broker", decision="protocol_error", reason="topic alias from the broker"), SUMMARY)
            << Closes("protocol_error"))


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_rate_limit_disconnect(level):
    limiter = RateLimiter(1, 3, clock=Clock())
    s, _, _ = open_session(level, rate_limiter=limiter)
    pb, t = Playbook(s.session), pub("devices/thermo-1/t", level=level)
    for _ in range(3):
        assert pb >> ClientData(t) << ToBroker(t)
    pb >> ClientData(t)
    if level == MQTT_5:
        pb << ToClient(disconnect_code(0x96))
    assert (pb
            << Audit(denied("devices/thermo-1/t", reason="rate limit"), SUMMARY)
            << Closes("rate_limited"))


def test_rate_limit_drop_and_shared_across_connections():
    limiter = RateLimiter(1, 2, clock=Clock())
    cfg = dict(rate_limiter=limiter, rate_limit=RateLimitConfig(action="drop"))
    s1, _, _ = open_session(MQTT_5, **cfg)
    s2, _, _ = open_session(MQTT_5, **cfg)
    t = pub("devices/thermo-1/t", level=5)
    assert Playbook(s1.session) >> ClientData(t) << ToBroker(t)
    pb = Playbook(s2.session)
    assert (pb
            >> ClientData(t)
            << ToBroker(t)
            >> ClientData(pub("devices/thermo-1/t", qos=1, pid=5, level=5))
            << ToClient(b"\x40\x03\x00\x05\x97")
            << Audit(denied("devices/thermo-1/t", reason="rate limit")))
    # A flood is audited in summary, not line by line.
    for _ in range(50):
        assert pb >> ClientData(t)


def test_rate_limiter_refills():
    clock = Clock(0.0)
    rl = RateLimiter(10, 2, clock=clock)
    assert rl.allow("a") and rl.allow("a") and not rl.allow("a")
    assert rl.allow("b")
    clock.t = 0.1
    assert rl.allow("a") and not rl.allow("a")


# --------------------------------------------------------------------------- SUBSCRIBE


def suback_of(acts: Outcome, level) -> list[int]:
    return codec.decode_suback(only(acts.to_client, T.SUBACK).body, level).reasons


def suback(pid: int, codes: list[int], level: int) -> bytes:
    return codec.encode_suback(Suback(pid, codes), level)


def subscribe(pid: int, level: int, *filters: tuple[str, int], props=()) -> bytes:
    return codec.encode_subscribe(Subscribe(pid, [Subscription(f, q) for f, q in filters], list(props)), level)


def sub_denied(flt: str) -> dict[str, Any]:
    return dict(action="subscribe", decision="deny", resource=flt)


def test_allowed_subscribe_passes_unchanged():
    s, _, _ = open_session()
    raw = subscribe(3, 4, ("devices/thermo-1/#", 1))
    assert Playbook(s.session) >> ClientData(raw) << ToBroker(raw)


@pytest.mark.parametrize("level,code", [(MQTT_311, 0x80), (MQTT_5, 0x87)])
def test_partly_denied_subscribe_is_rewritten_and_the_suback_merged(level, code):
    p = FakePolicies(sub_allow=["devices/thermo-1/#"], sub_check=["devices/+/telemetry"])
    s, _, _ = open_session(level, policies=p)
    props = [(Prop.SUBSCRIPTION_IDENTIFIER, 4)] if level == 5 else []
    assert (Playbook(s.session)
            >> ClientData(subscribe(12, level, ("$SYS/#", 0), ("devices/thermo-1/#", 1), ("secret/#", 2),
                                    ("devices/+/telemetry", 2), props=props))
            # Only the granted filters go up, under the same packet id and properties.
            << ToBroker(subscribe(12, level, ("devices/thermo-1/#", 1), ("devices/+/telemetry", 2), props=props))
            << Audit(sub_denied("$SYS/#"), sub_denied("secret/#"))
            >> BrokerData(suback(12, [1, 2], level))
            << ToClient(suback(12, [code, 1, code, 2], level)))


def test_fully_denied_subscribe_is_answered_by_the_gateway_alone():
    s, _, _ = open_session(MQTT_5)
    other = suback(6, [0], 5)
    assert (Playbook(s.session)
            >> ClientData(subscribe(5, 5, ("$SYS/#", 0), ("$CONTROL/#", 0), ("#", 0)))
            << ToClient(suback(5, [0x87] * 3, 5))
            << Audit(sub_denied("$SYS/#"), sub_denied("$CONTROL/#"), sub_denied("#"))
            # A SUBACK the broker sends for another id passes untouched.
            >> BrokerData(other)
            << ToClient(other))


def test_shared_subscription_group_is_stripped_before_the_check():
    s, p, _ = open_session(MQTT_5)
    ok = subscribe(6, 5, ("$share/g/devices/thermo-1/#", 0))
    assert (Playbook(s.session)
            >> ClientData(subscribe(5, 5, ("$share/g/#", 0)))
            << ToClient(suback(5, [0x87], 5))
            << Audit(sub_denied("$share/g/#"))
            >> ClientData(ok)
            # Granted on the filter; the group goes up as the identity's own.
            << ToBroker(subscribe(6, 5, ("$share/sub-alice~g/devices/thermo-1/#", 0))))
    assert ("subscribe", "#") in p.asked and ("subscribe", "devices/thermo-1/#") in p.asked


@pytest.mark.parametrize("flt", ["$share/g+/x", "$share//x", "$share/g", "$share/g/", "a/#/b", "a+/b", ""])
def test_malformed_filters_are_refused(flt):
    s, _, _ = open_session(MQTT_5)
    raw = b"\x00\x05\x00" + len(flt.encode()).to_bytes(2, "big") + flt.encode() + b"\x00"
    pb = Playbook(s.session) >> ClientData(b"\x82" + bytes([len(raw)]) + raw)
    assert pb << ToClient(Packet(T.DISCONNECT)) << Audit(PROTOCOL_ERROR, SUMMARY) << Closes("protocol_error")


def test_unsubscribe_is_forwarded_and_what_follows_it_is_still_checked():
    p = FakePolicies(sub_check=["devices/+/telemetry"], recv=[])
    s, _, _ = open_session(MQTT_311, policies=p)
    sub = subscribe(1, 4, ("devices/+/telemetry", 0))
    unsub = codec.encode_unsubscribe(Unsubscribe(2, ["devices/+/telemetry"]), 4)
    unsuback = codec.encode_ack(T.UNSUBACK, 2, 4)
    hidden = dict(action="receive", decision="deny", resource="devices/thermo-9/telemetry")
    assert (Playbook(s.session)
            >> ClientData(sub) << ToBroker(sub)
            >> ClientData(unsub) << ToBroker(unsub)
            # A delivery already on its way before the broker's UNSUBACK is still checked.
            >> BrokerData(pub("devices/thermo-9/telemetry")) << Audit(hidden)
            >> BrokerData(unsuback) << ToClient(unsuback)
            # And after it: the broker may still send what it had buffered [MQTT-3.10.4-3].
            >> BrokerData(pub("devices/thermo-9/telemetry")))


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_unsubscribe_then_subscribe_in_one_write_keeps_deliveries_checked(level):
    """v1's hole: the UNSUBACK for packet 1 removed the '#' that packet 2 had just granted,
    delivery checks went off, and every device's data reached a user who owns none."""
    p = FakePolicies(sub_check=["#"], recv=["devices/mine/#"])
    s, _, _ = open_session(level, policies=p)
    both = codec.encode_unsubscribe(Unsubscribe(1, ["#"]), level) + subscribe(2, level, ("#", 0))
    unsuback, granted = codec.encode_ack(T.UNSUBACK, 1, level), suback(2, [0], level)
    mine = pub("devices/mine/telemetry", level=level)
    assert (Playbook(s.session)
            >> ClientData(both)
            << ToBroker(codec.encode_unsubscribe(Unsubscribe(1, ["#"]), level), subscribe(2, level, ("#", 0)))
            >> BrokerData(unsuback + granted) << ToClient(unsuback, granted)
            >> BrokerData(pub("devices/theirs/telemetry", level=level))
            << Audit(action="receive", decision="deny", resource="devices/theirs/telemetry")
            >> BrokerData(mine) << ToClient(mine))


def test_denied_resubscribe_does_not_keep_the_earlier_grant_unchecked():
    p = FakePolicies(sub_allow=["devices/thermo-1/#"], recv=["devices/thermo-1/#"])
    s, _, _ = open_session(MQTT_311, policies=p)
    first = subscribe(1, 4, ("devices/thermo-1/#", 0))
    pb = Playbook(s.session) >> ClientData(first) << ToBroker(first)
    p.sub_allow.clear()
    p.recv.clear()
    assert (pb
            >> ClientData(subscribe(2, 4, ("devices/thermo-1/#", 0)))
            << ToClient(suback(2, [0x80], 4))
            << Audit(sub_denied("devices/thermo-1/#"))
            >> BrokerData(pub("devices/thermo-1/t"))
            << Audit(action="receive", decision="deny", resource="devices/thermo-1/t"))


def test_v5_pubrel_after_a_refused_pubrec_is_answered_not_forwarded():
    s, _, _ = open_session(MQTT_5)
    assert (Playbook(s.session)
            >> ClientData(pub("devices/thermo-2/cmd", qos=2, pid=9, level=5))
            << ToClient(b"\x50\x03\x00\x09\x87")
            << Audit(denied("devices/thermo-2/cmd"))
            >> ClientData(codec.encode_ack(T.PUBREL, 9, 5))
            << ToClient(b"\x70\x03\x00\x09\x92"))  # PUBCOMP: packet identifier not found


# --------------------------------------------------------------------------- deliveries


def wildcard_session(level=MQTT_311, **kw):
    p = FakePolicies(sub_allow=["devices/thermo-1/#"], sub_check=["devices/+/telemetry"],
                     recv=["devices/thermo-1/#", "devices/public-1/#"])
    s, _, audit = open_session(level, policies=p, **kw)
    s.client_data(codec.encode_subscribe(Subscribe(1, [Subscription("devices/+/telemetry", 2)]), level))
    return s, p, audit


def not_received(topic: str) -> dict[str, Any]:
    return dict(action="receive", decision="deny", resource=topic)


def test_wildcard_subscriber_receives_only_what_it_may_read():
    s, p, _ = wildcard_session()
    ok = pub("devices/public-1/telemetry", b"21")
    assert (Playbook(s.session)
            >> BrokerData(ok + pub("devices/thermo-9/telemetry", b"secret") + ok)
            << ToClient(ok, ok)
            << Audit(not_received("devices/thermo-9/telemetry"))
            >> BrokerData(ok) << ToClient(ok))
    # Decisions are cached per topic.
    assert p.asked.count(("receive", "devices/public-1/telemetry")) == 1


def test_dropped_qos1_delivery_is_acknowledged_to_the_broker():
    s, _, _ = wildcard_session()
    assert (Playbook(s.session)
            >> BrokerData(pub("devices/thermo-9/telemetry", qos=1, pid=40))
            << ToBroker(b"\x40\x02\x00\x28")
            << Audit(not_received("devices/thermo-9/telemetry")))


def test_dropped_qos2_delivery_is_completed_with_the_broker():
    s, _, _ = wildcard_session(MQTT_5)
    pubrel = codec.encode_ack(T.PUBREL, 42, 5)
    assert (Playbook(s.session)
            >> BrokerData(pub("devices/thermo-9/telemetry", qos=2, pid=41, level=5))
            << ToBroker(b"\x50\x02\x00\x29")
            << Audit(not_received("devices/thermo-9/telemetry"))
            >> BrokerData(codec.encode_ack(T.PUBREL, 41, 5))
            << ToBroker(b"\x70\x02\x00\x29")
            # A PUBREL for a delivery the client did get passes.
            >> BrokerData(pubrel)
            << ToClient(pubrel))


def test_allow_filters_cover_deliveries_without_asking():
    p = FakePolicies(sub_allow=["devices/thermo-1/#"], sub_check=["devices/+/telemetry"], recv=[])
    s, _, _ = open_session(MQTT_311, policies=p)
    both = subscribe(1, 4, ("devices/thermo-1/#", 0), ("devices/+/telemetry", 0))
    raw = pub("devices/thermo-1/telemetry")
    assert Playbook(s.session) >> ClientData(both) << ToBroker(both) >> BrokerData(raw) << ToClient(raw)
    assert ("receive", "devices/thermo-1/telemetry") not in p.asked


def test_only_allow_subscriptions_need_no_delivery_checks():
    s, p, _ = open_session()
    sub = subscribe(1, 4, ("devices/thermo-1/#", 0))
    raw = pub("devices/thermo-1/t")
    assert Playbook(s.session) >> ClientData(sub) << ToBroker(sub) >> BrokerData(raw) << ToClient(raw)
    assert not [a for a in p.asked if a[0] == "receive"]


def test_revocation_stops_deliveries_on_invalidate():
    s, p, _ = wildcard_session()
    raw = pub("devices/public-1/telemetry")
    pb = Playbook(s.session) >> BrokerData(raw) << ToClient(raw)
    p.recv.remove("devices/public-1/#")  # the device is no longer public
    assert (pb
            >> BrokerData(raw) << ToClient(raw)  # cached until told
            >> Invalidated()
            >> BrokerData(raw) << Audit(not_received("devices/public-1/telemetry")))


def test_cached_decisions_expire_without_invalidate():
    # A delegation that runs out changes no facts: cached grants must still end, within a second.
    clock = Clock()
    s, p, _ = wildcard_session(clock=clock)
    p.pub.append("devices/public-1/cmd")
    raw, cmd = pub("devices/public-1/telemetry"), pub("devices/public-1/cmd")
    pb = Playbook(s.session) >> BrokerData(raw) << ToClient(raw) >> ClientData(cmd) << ToBroker(cmd)
    p.recv.remove("devices/public-1/#")
    p.pub.remove("devices/public-1/cmd")
    clock.t += 0.5
    assert pb >> BrokerData(raw) << ToClient(raw) >> ClientData(cmd) << ToBroker(cmd)
    clock.t += 0.6
    assert (pb
            >> BrokerData(raw) << Audit(not_received("devices/public-1/telemetry"))
            >> ClientData(cmd) << Audit(denied("devices/public-1/cmd")))


def test_publish_decisions_are_cached_per_topic():
    s, p, _ = open_session()
    data = pub("devices/thermo-1/t") * 3 + pub("devices/thermo-1/t", qos=1)
    pb = Playbook(s.session) >> ClientData(data) << ToBroker(*[pub("devices/thermo-1/t")] * 3,
                                                              pub("devices/thermo-1/t", qos=1))
    assert [a[:3] for a in p.asked if a[0] == "publish"] == [("publish", "devices/thermo-1/t", 0),
                                                             ("publish", "devices/thermo-1/t", 1)]
    assert pb >> Invalidated() >> ClientData(pub("devices/thermo-1/t")) << ToBroker(pub("devices/thermo-1/t"))
    assert len([a for a in p.asked if a[0] == "publish"]) == 3


def test_revoked_allow_grant_falls_back_to_per_delivery_checks():
    p = FakePolicies(sub_allow=["devices/thermo-1/#"], recv=["devices/thermo-1/#"])
    s, _, _ = open_session(MQTT_311, policies=p)
    sub = subscribe(1, 4, ("devices/thermo-1/#", 0))
    pb = Playbook(s.session) >> ClientData(sub) << ToBroker(sub)
    p.sub_allow.clear()
    p.recv.clear()  # delegation revoked
    assert (pb
            >> Invalidated()
            >> BrokerData(pub("devices/thermo-1/t")) << Audit(not_received("devices/thermo-1/t")))


def test_resumed_session_deliveries_are_checked():
    # Subscriptions made on an earlier connection are unknown here: check everything.
    p = FakePolicies(recv=["devices/thermo-1/#"])
    s, _, _ = open_session(MQTT_311, policies=p, session_present=True)
    mine = pub("devices/thermo-1/t")
    assert (Playbook(s.session)
            >> BrokerData(pub("devices/thermo-2/t")) << Audit(not_received("devices/thermo-2/t"))
            >> BrokerData(mine) << ToClient(mine))


def test_broker_pass_through_keeps_runs_together():
    s, _, _ = open_session(policies=FakePolicies(recv=["a/b"]))
    data = bytearray(b"\xd0\x00" + codec.encode_ack(T.PUBACK, 3, 4) + pub("a/b"))
    pb = Playbook(s.session)
    assert pb >> BrokerData(data) << ToClient(b"\xd0\x00", codec.encode_ack(T.PUBACK, 3, 4), pub("a/b"))
    assert len(pb.taken[-1].items) == 1  # one slice


def test_broker_disconnect_is_forwarded_and_closes():
    s, _, _ = open_session(MQTT_5)
    raw = codec.encode_disconnect(5, 0x8E)
    assert (Playbook(s.session)
            >> BrokerData(raw) << ToClient(raw) << Audit(SUMMARY) << Closes("broker_disconnect"))


def test_client_disconnect_is_forwarded_and_closes():
    s, _, _ = open_session(MQTT_5)
    raw = codec.encode_disconnect(5, 0x04)
    assert (Playbook(s.session)
            >> ClientData(raw) << ToBroker(raw) << Audit(SUMMARY) << Closes("client_disconnect"))


def test_shutdown_tells_v5_clients():
    s, _, _ = open_session(MQTT_5)
    assert (Playbook(s.session)
            >> Shutdown() << ToClient(disconnect_code(0x8B)) << Audit(SUMMARY) << Closes("shutdown"))


# --------------------------------------------------------------------------- credentials


def test_classify_credentials():
    devices = {"thermo-1"}.__contains__

    def req(**kw):
        base = dict(kind="connect", username=None, password=None, auth_method=None, auth_data=None, client_id="")
        base.update(kw)
        return AuthRequest(**base)

    assert classify_credentials(req(username="thermo-1", password=b"K1"), None, devices) == \
        ("device_key", "thermo-1", "K1")
    assert classify_credentials(req(username="alice", password=b"eyJ"), "cn", devices) == ("token", "eyJ")
    assert classify_credentials(req(password=b"eyJ"), None, devices) == ("token", "eyJ")
    assert classify_credentials(req(username="thermo-1"), "thermo-1", devices) == ("certificate", "thermo-1")
    assert classify_credentials(req(auth_method=AUTH_METHOD, auth_data=b"tok"), None, devices) == ("token", "tok")
    assert classify_credentials(req(username="x"), None, devices) == ("none",)


# --------------------------------------------------------------------------- with the real engine


def test_with_the_real_policy_engine():
    from proxy.facts import DeviceFacts, StaticFacts
    from proxy.policy import Policies

    facts = StaticFacts([DeviceFacts("thermo-1", "sub-alice", "alice"), DeviceFacts("thermo-2", "sub-bob", "bob")])
    policies = Policies.from_text("""
version: 1
rules:
  - id: owners
    subjects: [owner]
    mqtt: {topics: ["devices/{device}/#"], actions: [publish, subscribe]}
""", facts)
    s, _, _ = open_session(MQTT_5, policies=policies)
    mine, theirs = pub("devices/thermo-1/telemetry", level=5), pub("devices/thermo-2/telemetry", level=5)
    sub = subscribe(3, 5, ("devices/+/telemetry", 0))
    assert (Playbook(s.session)
            >> ClientData(mine) << ToBroker(mine)
            >> ClientData(pub("devices/thermo-2/cmd", qos=1, pid=2, level=5))
            << ToClient(b"\x40\x03\x00\x02\x87")
            << Audit(denied("devices/thermo-2/cmd"))
            >> ClientData(sub) << ToBroker(sub)
            >> BrokerData(mine) << ToClient(mine)
            >> BrokerData(theirs) << Audit(not_received("devices/thermo-2/telemetry")))


def test_mqtt_31_clients_are_served_too():
    s, _, _ = make(3)
    assert (Playbook(s.session)
            >> ClientData(connect_packet(3, client_id="old-1"))
            << Authenticates(kind="connect", client_id="old-1")
            >> Authenticated(ALICE)
            << OpenUpstream()
            << ToBroker(upstream(protocol_name="MQIsdp", protocol_level=3, client_id="u/sub-alice/old-1"))
            << Audit(action="connect", decision="allow", protocol_level=3)
            >> BrokerData(connack(3))
            << ToClient(b"\x20\x02\x00\x00")
            >> ClientData(pub("devices/thermo-2/cmd", qos=1, pid=2, level=3))
            << ToClient(b"\x40\x02\x00\x02")
            << Audit(denied("devices/thermo-2/cmd")))


def test_auth_continue_from_the_client_is_a_protocol_error():
    s, _, _ = open_session(MQTT_5)
    auth = codec.encode_auth(Reason.CONTINUE_AUTHENTICATION, [(Prop.AUTHENTICATION_METHOD, AUTH_METHOD)])
    assert (Playbook(s.session)
            >> ClientData(auth)
            << ToClient(disconnect_code(0x82))
            << Audit(PROTOCOL_ERROR, SUMMARY)
            << Closes("protocol_error"))


def test_metrics_are_counts_the_session_asks_for_not_globals_it_touches():
    from proxy.metrics import REGISTRY
    from proxy.mqtt.commands import Metric

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = value("keygate_mqtt_decisions_total", action="publish", result="allow")
    s, _, _ = open_session(policies=FakePolicies(pub=["devices/thermo-1/#"], recv=["devices/thermo-1/#"]))
    ok = pub("devices/thermo-1/t")
    assert (Playbook(s.session, counts=True)
            >> ClientData(ok * 3 + pub("devices/thermo-2/t"))
            << ToBroker(ok, ok, ok)
            << Audit(denied("devices/thermo-2/t"))
            << Counts({Metric("decisions", ("publish", "allow")): 3, Metric("decisions", ("publish", "deny")): 1,
                       Metric("messages", ("client_to_broker",)): 3})
            >> BrokerData(ok * 2)
            << ToClient(ok, ok)
            << Counts({Metric("decisions", ("receive", "allow")): 2, Metric("messages", ("broker_to_client",)): 2}))
    assert value("keygate_mqtt_decisions_total", action="publish", result="allow") == before  # sans-IO


def test_subscriptions_per_connection_are_bounded():
    p = FakePolicies(sub_allow=["a/1", "a/2", "a/3"])
    s, _, _ = open_session(MQTT_5, policies=p, limits=MqttLimitsConfig(subscriptions_per_connection=2))
    assert (Playbook(s.session)
            >> ClientData(subscribe(1, 5, ("a/1", 0), ("a/2", 0), ("a/3", 0)))
            << ToBroker(subscribe(1, 5, ("a/1", 0), ("a/2", 0)))
            << Audit(dict(sub_denied("a/3"), reason="too many subscriptions for the connection"))
            >> BrokerData(suback(1, [0, 0], 5))
            << ToClient(suback(1, [0, 0, 0x97], 5)))


# --------------------------------------------------------------------------- grants with a horizon


def test_exact_grant_ends_at_its_horizon_without_any_write():
    """A read delegation with an expiry: the exact subscription it granted stops delivering at
    the expiry, with no invalidate() (nothing was written) and no wait for a cache to age."""
    clock, wall = Clock(1000.0), Clock(5000.0)
    p = FakePolicies(sub_allow=["devices/d/telemetry"], recv=["devices/d/telemetry"], until=5030.0)
    s, _, _ = open_session(MQTT_5, policies=p, clock=clock, wallclock=wall)
    sub = subscribe(1, 5, ("devices/d/telemetry", 1))
    raw = pub("devices/d/telemetry", level=MQTT_5)
    pb = Playbook(s.session) >> ClientData(sub) << ToBroker(sub) >> BrokerData(raw) << ToClient(raw)
    assert s.next_deadline() == pytest.approx(1030.0)  # the timer is set at the grant's end
    p.sub_allow.clear()
    p.recv.clear()  # what the policy says once the delegation has expired
    clock.t, wall.t = 1029.9, 5029.9
    assert pb >> BrokerData(raw) << ToClient(raw)
    clock.t, wall.t = 1030.0, 5030.0
    assert (pb
            >> Tick(clock.t)  # re-decided: the connection stays
            >> BrokerData(raw) << Audit(not_received("devices/d/telemetry")))


def test_horizon_is_checked_on_data_even_when_the_timer_is_late():
    clock, wall = Clock(1000.0), Clock(5000.0)
    p = FakePolicies(sub_allow=["devices/d/telemetry"], recv=["devices/d/telemetry"], until=5010.0)
    s, _, _ = open_session(MQTT_311, policies=p, clock=clock, wallclock=wall)
    sub = subscribe(1, 4, ("devices/d/telemetry", 0))
    pb = Playbook(s.session) >> ClientData(sub) << ToBroker(sub)
    p.sub_allow.clear()
    p.recv.clear()
    clock.t, wall.t = 1010.5, 5010.5  # no Tick yet
    assert pb >> BrokerData(pub("devices/d/telemetry")) << Audit(not_received("devices/d/telemetry"))


def test_horizon_is_checked_on_the_delivery_fast_path_between_cache_lifetimes():
    """A delivery the fast path would pass (an exact ALLOW grant) just after the grant's end,
    before the timer fires and while the decision caches are under a second old: the horizon
    check every chunk makes stops it (the attack: a late timer as a window past a revocation)."""
    clock, wall = Clock(1009.8), Clock(5009.8)
    p = FakePolicies(sub_allow=["devices/d/telemetry"], recv=["devices/d/telemetry"], until=5010.0)
    s, _, _ = open_session(MQTT_311, policies=p, clock=clock, wallclock=wall)
    sub = subscribe(1, 4, ("devices/d/telemetry", 0))
    raw = pub("devices/d/telemetry")
    pb = Playbook(s.session) >> ClientData(sub) << ToBroker(sub) >> BrokerData(raw) << ToClient(raw)
    chunks = s.session.fast_path_chunks
    assert pb >> BrokerData(raw) << ToClient(raw)
    assert s.session.fast_path_chunks == chunks + 1  # the fast path passes it while the grant holds
    p.sub_allow.clear()
    p.recv.clear()
    clock.t, wall.t = 1010.2, 5010.2  # the grant ended 0.2 s ago; no Tick yet
    assert pb >> BrokerData(raw) << Audit(not_received("devices/d/telemetry"))


def test_token_end_is_checked_on_the_publish_fast_path_before_the_timer():
    """A publish the fast path would pass (its decision cached) after the token's end, before
    the timer fires: the connection ends instead (v5 DISCONNECT 0xA0), nothing goes upstream."""
    clock, wall = Clock(1000.0), Clock(9_999.5)
    s, _, _ = open_session(MQTT_5, clock=clock, wallclock=wall)
    raw = pub("devices/thermo-1/telemetry", level=MQTT_5)
    pb = Playbook(s.session) >> ClientData(raw) << ToBroker(raw)
    chunks = s.session.fast_path_chunks
    assert pb >> ClientData(raw) << ToBroker(raw)
    assert s.session.fast_path_chunks == chunks + 1
    clock.t, wall.t = 1000.6, 10_000.1  # ALICE's token ended 0.1 s ago; the caches are 0.6 s old
    assert (pb
            >> ClientData(raw)
            << ToClient(disconnect_code(0xA0))
            << Audit(dict(action="session", decision="close", reason="token expired"), SUMMARY)
            << Closes("token_expired"))


def test_cached_publish_decision_ends_at_its_horizon():
    clock, wall = Clock(1000.0), Clock(5000.0)
    p = FakePolicies(pub=["devices/d/cmd/#"], until=5000.2)
    s, _, _ = open_session(MQTT_311, policies=p, clock=clock, wallclock=wall)
    raw = pub("devices/d/cmd/x")
    pb = Playbook(s.session) >> ClientData(raw) << ToBroker(raw)
    p.pub.clear()
    clock.t, wall.t = 1000.25, 5000.25  # before the 1 s cache bound, after the grant's end
    assert pb >> ClientData(raw) << Audit(denied("devices/d/cmd/x"))


# --------------------------------------------------------------------------- credentials that end


def gone(identity):
    return "device deleted"


def device_connect(level: int) -> bytes:
    return connect_packet(level, "thermo-1", username="thermo-1", password=b"K1")


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_invalidate_closes_a_connection_whose_credential_went(level):
    problems: dict[str, str] = {}
    s, _, _ = make(level, credential_problem=lambda ident: problems.get(ident.device_id))
    s.client_data(device_connect(level))
    s.authenticated(THERMO)
    s.broker_data(connack(level))
    pb = Playbook(s.session) >> Invalidated()  # nothing changed for it
    problems["thermo-1"] = "key k1 rotated"
    pb >> Invalidated()
    if level == MQTT_5:
        pb << ToClient(disconnect_code(Reason.ADMINISTRATIVE_ACTION))
    assert (pb
            << Audit(dict(action="session", reason="key k1 rotated"), SUMMARY)
            << Closes("credential_revoked"))


def test_credential_gone_while_authentication_ran_is_refused():
    s, _, _ = make(MQTT_5, credential_problem=gone)
    assert (Playbook(s.session)
            >> ClientData(device_connect(MQTT_5))
            << Authenticates(kind="connect")
            >> Authenticated(THERMO)
            << ToClient(connack_code(0x86, MQTT_5))
            << Audit(action="connect", decision="deny", reason="device deleted")
            << Closes("auth_failed"))


# --------------------------------------------------------------------------- the Will on every way out


# Each way an open connection ends: (the event, the DISCONNECT a v5 client gets, the audit line of
# the close itself, the close reason).
WAYS_OUT: dict[str, tuple[Callable[[Clock], Event], int | None, dict[str, Any] | None, str]] = {
    "tcp drop": (lambda clock: ClientClosed(), None, None, "client_closed"),
    "keepalive timeout": (lambda clock: Tick(clock.t), 0x8D, dict(action="keepalive", decision="close"),
                          "keepalive_timeout"),
    "protocol error": (lambda clock: ClientData(b"\x20\x02\x00\x00"), 0x82, PROTOCOL_ERROR,  # CONNACK from a client
                       "protocol_error"),
    "shutdown": (lambda clock: Shutdown(), 0x8B, None, "shutdown"),
    "broker gone": (lambda clock: BrokerClosed(), 0x80, None, "broker_closed"),
}


def way_out(level: int, how: str, *, revoked: bool) -> tuple[Playbook, dict[str, Any] | None, str]:
    """A connection with a retained Will (revoked or not) ended ``how``, up to its audit lines;
    with the close's own audit line and its reason."""
    clock = Clock()
    p = FakePolicies(pub=["devices/thermo-1/#"])
    s, _, _ = make(level, p, clock=clock)
    s.client_data(connect_packet(level, will=Will("devices/thermo-1/status", b"gone", 0, True)))
    s.authenticated(ALICE)
    s.broker_data(connack(level))
    if revoked:
        p.pub.clear()  # the delegation that allowed it was revoked
    event, code, line, reason = WAYS_OUT[how]
    if how == "keepalive timeout":
        clock.t += 1000
    pb = Playbook(s.session) >> event(clock)
    if level == MQTT_5 and code is not None:
        pb << ToClient(disconnect_code(code))
    return pb, line, reason


@pytest.mark.parametrize("how", list(WAYS_OUT))
@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_revoked_will_is_discarded_on_every_way_out(level, how):
    pb, line, reason = way_out(level, how, revoked=True)
    records = [r for r in (line, dict(action="will", decision="deny"), SUMMARY) if r is not None]
    assert (pb
            << ToBroker(b"\xe0\x00")  # a normal DISCONNECT: the broker discards the Will
            << Audit(*records)
            << Closes(reason)
            >> ClientClosed())


@pytest.mark.parametrize("how", list(WAYS_OUT))
def test_allowed_will_goes_out_on_every_way_out(how):
    pb, line, reason = way_out(MQTT_5, how, revoked=False)
    records = [r for r in (line, SUMMARY) if r is not None]
    # No DISCONNECT upstream: the broker publishes the Will.
    assert pb << Audit(*records) << Closes(reason)


def test_will_is_discarded_once_the_token_has_expired():
    clock, wall = Clock(), Clock(5000.0)
    s, _, _ = make(MQTT_5, FakePolicies(pub=["devices/thermo-1/#"]), clock=clock, wallclock=wall)
    s.client_data(connect_packet(MQTT_5, will=Will("devices/thermo-1/status", b"gone", 0, False)))
    s.authenticated(dataclasses.replace(ALICE, expires_at=5010.0))
    s.broker_data(connack(MQTT_5))
    clock.t += 10
    wall.t += 10
    assert (Playbook(s.session)
            >> Tick(clock.t)
            << ToClient(disconnect_code(0xA0))
            << ToBroker(b"\xe0\x00")
            << Audit(dict(action="session", decision="close", reason="token expired"),
                     dict(action="will", decision="deny"), SUMMARY)
            << Closes("token_expired"))


def test_will_is_decided_while_the_broker_still_has_to_answer():
    # The CONNECT (with its Will) is upstream before the CONNACK: a close then decides it too.
    p = FakePolicies(pub=["devices/thermo-1/#"])
    s, _, _ = make(MQTT_311, p)
    s.client_data(connect_packet(MQTT_311, will=Will("devices/thermo-1/status", b"gone", 0, False)))
    s.authenticated(ALICE)
    p.pub.clear()
    assert (Playbook(s.session)
            >> ClientClosed()
            << ToBroker(b"\xe0\x00")
            << Audit(dict(action="will", decision="deny"), SUMMARY)
            << Closes("client_closed"))


def test_topic_alias_zero_is_topic_alias_invalid():
    s, _, _ = open_session(MQTT_5)
    raw = bytearray(codec.encode_publish("devices/thermo-1/t", b"", level=MQTT_5,
                                         properties=[(Prop.TOPIC_ALIAS, 1)]))
    raw[-1] = 0  # alias 1 -> 0 (the last byte of the property; the payload is empty)
    assert (Playbook(s.session)
            >> ClientData(bytes(raw))
            << ToClient(disconnect_code(Reason.TOPIC_ALIAS_INVALID))
            << Audit(PROTOCOL_ERROR, SUMMARY)
            << Closes("protocol_error", reason_code=Reason.TOPIC_ALIAS_INVALID))


# --------------------------------------------------------------------------- QoS 2: decided at release


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_qos2_publish_is_held_and_decided_again_at_pubrel(level):
    """The broker releases a QoS 2 message at PUBREL: a publish parked before a revocation must
    not be released after it (the gateway holds it, not the broker)."""
    s, p, _ = open_session(level)
    raw = pub("devices/thermo-1/cmd", qos=2, pid=9, level=level)
    pb = Playbook(s.session) >> ClientData(raw) << ToClient(codec.encode_ack(T.PUBREC, 9, level))
    p.pub.clear()  # the grant is revoked before the PUBREL
    refused = codec.encode_ack(T.PUBCOMP, 9, level, Reason.PACKET_IDENTIFIER_NOT_FOUND) if level == MQTT_5 else \
        codec.encode_ack(T.PUBCOMP, 9, level)
    assert (pb
            >> Invalidated()
            >> ClientData(codec.encode_ack(T.PUBREL, 9, level))
            << ToClient(refused)
            << Audit(denied("devices/thermo-1/cmd", when="release")))


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_released_qos2_publish_completes_through_the_gateway(level):
    s, _, _ = open_session(level)
    raw = pub("devices/thermo-1/cmd", qos=2, pid=9, level=level)
    pubrel, comp = codec.encode_ack(T.PUBREL, 9, level), codec.encode_ack(T.PUBCOMP, 9, level)
    other = codec.encode_ack(T.PUBREC, 9, level)
    assert (Playbook(s.session)
            >> ClientData(raw) << ToClient(codec.encode_ack(T.PUBREC, 9, level))
            # Released in one write with its PUBREL: the broker never holds it awaiting a release.
            >> ClientData(pubrel) << ToBroker(raw, pubrel)
            # The broker's PUBREC needs no answer (the client had its PUBREC from the gateway).
            >> BrokerData(codec.encode_ack(T.PUBREC, 9, level))
            # A repeated PUBREL meanwhile is the broker's PUBCOMP's to answer.
            >> ClientData(pubrel)
            >> BrokerData(comp) << ToClient(comp)
            # The id is free again: a PUBREC for it from the broker is the client's business.
            >> BrokerData(other) << ToClient(other))


def test_held_qos2_publishes_are_bounded():
    s, _, audit = open_session(MQTT_5, max_packet_size=4096)
    big = b"x" * 3000
    codes, held = [], []
    for pid in range(1, 200):
        raw = pub("devices/thermo-1/cmd", payload=big, qos=2, pid=pid, level=MQTT_5)
        acts = s.client_data(raw)
        assert not acts.to_broker  # held until its PUBREL
        codes.append(only(acts.to_client, T.PUBREC).raw[4] if len(only(acts.to_client, T.PUBREC).raw) > 4 else 0)
        if codes[-1] == 0:
            held.append((pid, raw))
    assert 0 in codes and Reason.QUOTA_EXCEEDED in codes
    assert sum(len(raw) for _, raw in held) <= 256 * 1024
    # Each one accepted was held: its PUBREL releases it to the broker.
    pid, raw = held[-1]
    assert b"".join(bytes(b) for b in s.client_data(codec.encode_ack(T.PUBREL, pid, MQTT_5)).to_broker) == \
        raw + codec.encode_ack(T.PUBREL, pid, MQTT_5)
    assert [r for r in audit.records if r.get("reason") == "too many QoS 2 publishes awaiting PUBREL"]


# --------------------------------------------------------------------------- the Will while the broker holds it


WILL_GONE = dict(action="session", decision="close", reason="Will no longer allowed")


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_will_revoked_while_connected_ends_the_connection(level):
    """The broker publishes a Will it holds whenever it ends the connection itself (a takeover,
    a protocol error it sees): a Will no longer allowed must not stay there."""
    s, p, _ = will_session(level)
    p.pub.clear()
    pb = Playbook(s.session) >> Invalidated()
    if level == MQTT_5:
        pb << ToClient(disconnect_code(Reason.NOT_AUTHORIZED))
    assert (pb
            << ToBroker(b"\xe0\x00")
            << Audit(dict(action="will", decision="deny", when="revoked"), WILL_GONE, SUMMARY)
            << Closes("will_revoked"))


def test_will_grant_that_expires_ends_the_connection_at_its_end():
    clock, wall = Clock(1000.0), Clock(5000.0)
    p = FakePolicies(pub=["devices/thermo-1/#"], until=5020.0)
    s, _, _ = make(MQTT_5, p, clock=clock, wallclock=wall)
    s.client_data(connect_packet(MQTT_5, will=Will("devices/thermo-1/status", b"gone", 0, False)))
    s.authenticated(ALICE)
    s.broker_data(connack(MQTT_5))
    assert s.next_deadline() == pytest.approx(1020.0)
    p.pub.clear()
    clock.t, wall.t = 1020.0, 5020.0
    assert (Playbook(s.session)
            >> Tick(clock.t)
            << ToClient(disconnect_code(Reason.NOT_AUTHORIZED))
            << ToBroker(b"\xe0\x00")
            << Audit(dict(action="will", decision="deny", when="expired"), WILL_GONE, SUMMARY)
            << Closes("will_revoked"))


def test_disconnect_setting_a_session_expiry_after_0_is_refused_here():
    """[MQTT-3.14.2-2]: forwarded, the broker would take it for a protocol error and publish
    the (maybe revoked) Will itself. Refused here, the Will is decided by the gateway."""
    s, p, _ = will_session(MQTT_5)
    p.pub.clear()
    bad = codec.encode_disconnect(MQTT_5, 0, [(Prop.SESSION_EXPIRY_INTERVAL, 10)])
    assert (Playbook(s.session)
            >> ClientData(bad)
            << ToClient(disconnect_code(Reason.PROTOCOL_ERROR))
            << ToBroker(b"\xe0\x00")  # not the client's DISCONNECT: the revoked Will discarded
            << Audit(PROTOCOL_ERROR, dict(action="will", decision="deny"), SUMMARY)
            << Closes("protocol_error"))


def test_will_delay_is_not_passed_to_the_broker():
    s, _, _ = make(MQTT_5, FakePolicies(pub=["devices/thermo-1/#"]))
    no_delay = Packet(T.CONNECT, "a Will without a delay",
                      lambda f: (w := codec.decode_connect(f.body).will) is not None
                      and get_prop(w.properties, Prop.WILL_DELAY_INTERVAL) is None)
    assert (Playbook(s.session)
            >> ClientData(connect_packet(MQTT_5, will=Will("devices/thermo-1/status", b"gone", 0, False,
                                                           [(Prop.WILL_DELAY_INTERVAL, 30)])))
            << Authenticates(kind="connect")
            >> Authenticated(ALICE)
            << OpenUpstream()
            << ToBroker(no_delay)
            << Audit(action="connect", decision="allow"))


def test_disconnect_held_before_the_connack_discards_the_will():
    s, _, _ = make(MQTT_311, FakePolicies(pub=["devices/thermo-1/#"]))
    s.client_data(connect_packet(MQTT_311, will=Will("devices/thermo-1/status", b"gone", 0, False)))
    s.authenticated(ALICE)
    assert (Playbook(s.session)
            >> ClientData(codec.encode_disconnect(MQTT_311))  # held: the broker has not answered yet
            >> ClientClosed()
            << ToBroker(b"\xe0\x00")
            << Audit(SUMMARY)
            << Closes("client_closed"))


# --------------------------------------------------------------------------- invalidation by device


class CountingPolicies(FakePolicies):
    def may_subscribe(self, identity, topic_filter, *, qos=0, client_id="", now=None):
        self.asked.append(("subscribe", topic_filter))
        device = topic_filter.split("/")[1]
        ok = topic_filter in self.sub_allow
        return SubDecision("ALLOW" if ok else "DENY", devices=frozenset({device}))


def test_a_change_to_one_device_re_decides_only_the_grants_resting_on_it():
    p = CountingPolicies(sub_allow=["devices/a/telemetry", "devices/b/telemetry"],
                         recv=["devices/a/telemetry", "devices/b/telemetry"])
    s, _, _ = open_session(MQTT_311, policies=p)
    sub = subscribe(1, 4, ("devices/a/telemetry", 0), ("devices/b/telemetry", 0))
    pb = Playbook(s.session) >> ClientData(sub) << ToBroker(sub)
    p.asked.clear()
    assert pb >> Invalidated(frozenset({"c"}))
    assert not [a for a in p.asked if a[0] == "subscribe"]
    p.sub_allow.remove("devices/a/telemetry")
    p.recv.remove("devices/a/telemetry")
    b = pub("devices/b/telemetry")
    assert (pb
            >> Invalidated(frozenset({"a"}))
            >> BrokerData(pub("devices/a/telemetry")) << Audit(not_received("devices/a/telemetry"))
            >> BrokerData(b) << ToClient(b))
    assert [a[1] for a in p.asked if a[0] == "subscribe"] == ["devices/a/telemetry"]


# --------------------------------------------------------------------------- shared subscriptions


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_shared_subscription_groups_are_the_identitys_own(level):
    """Anyone could join another's $share/<group>/... and take a share of its deliveries (then
    dropped by the gateway as not theirs): the broker gets a group of the identity's own."""
    def upstream(identity):
        p = FakePolicies(sub_check=["devices/+/telemetry"])
        s, _, _ = open_session(level, identity=identity, policies=p)
        acts = s.client_data(codec.encode_subscribe(
            Subscribe(1, [Subscription("$share/g/devices/+/telemetry", 0)]), level))
        sub = codec.decode_subscribe(only(acts.to_broker, T.SUBSCRIBE).body, level)
        unsub = s.client_data(codec.encode_unsubscribe(Unsubscribe(2, ["$share/g/devices/+/telemetry"]), level))
        return sub.subscriptions[0].topic_filter, codec.decode_unsubscribe(
            only(unsub.to_broker, T.UNSUBSCRIBE).body, level).topic_filters

    alice, alice_unsub = upstream(ALICE)
    bob, _ = upstream(BOB)
    assert alice == "$share/sub-alice~g/devices/+/telemetry" and alice_unsub == [alice]
    assert bob != alice and bob.endswith("~g/devices/+/telemetry")
    tricky = dataclasses.replace(ALICE, sub="a~b/+#")
    assert upstream(tricky)[0] == "$share/a%7Eb%2F%2B%23~g/devices/+/telemetry"
