"""Round trips with real client libraries' packet code, MQTT 3.1.1 and 5.0.

* paho-mqtt 2.x and gmqtt build packets with their own encoders; the gateway's
  codec and session must read them exactly (fields, properties, pass-through
  bytes untouched).
* What the gateway builds (CONNACK, merged SUBACK, PUBACK/PUBREC 0x87,
  DISCONNECT) is read back by paho's own packet reader and callbacks.
"""

from __future__ import annotations

from types import SimpleNamespace

import paho.mqtt.client as paho
import pytest
from gmqtt import Message as GMessage
from gmqtt import Subscription as GSubscription
from gmqtt.mqtt.constants import MQTTCommands
from gmqtt.mqtt.package import (
    CommandWithMidPacket,
    DisconnectPacket,
    LoginPackageFactor,
    PublishPacket,
    SubscribePacket,
    UnsubscribePacket,
)
from gmqtt.mqtt.utils import IdGenerator
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from proxy.mqtt import codec
from proxy.mqtt.codec import Framer
from proxy.mqtt.packets import MQTT_5, MQTT_311, PacketType, Prop
from tests.unit.test_mqtt_session import ALICE, FakePolicies, connack, decode_all, make, only

T = PacketType
LEVELS = [MQTT_311, MQTT_5]
POLICY = dict(pub=["devices/thermo-1/#"], sub_allow=["devices/thermo-1/#"], sub_check=["devices/+/telemetry"],
              recv=["devices/thermo-1/#"])


# --------------------------------------------------------------------------- paho, as a packet source and reader


class PahoWire(paho.Client):
    """A paho client whose socket is two byte buffers: what it sends, what it reads."""

    def __init__(self, level: int, client_id: str = "app-1"):
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv5 if level == MQTT_5 else paho.MQTTv311)
        self._sock = SimpleNamespace(fileno=lambda: -1, close=lambda: None)  # the methods below replace it
        self.sent: list[bytes] = []
        self.inbox = bytearray()
        self.events: list[tuple] = []
        self.on_connect = lambda c, u, flags, rc, props: self.events.append(("connect", rc.value, props))
        self.on_subscribe = lambda c, u, mid, rcs, props: self.events.append(("subscribe", mid, [r.value for r in rcs]))
        self.on_publish = lambda c, u, mid, rc, props: self.events.append(("publish", mid, rc.value))
        self.on_disconnect = lambda c, u, flags, rc, props: self.events.append(("disconnect", rc.value))
        self.on_message = lambda c, u, msg: self.events.append(("message", msg.topic, msg.payload))

    def _packet_queue(self, command, packet, mid, qos, info=None):
        self.sent.append(bytes(packet))
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self.inbox:
            raise BlockingIOError
        out = bytes(self.inbox[:bufsize])
        del self.inbox[:bufsize]
        return out

    def take(self) -> bytes:
        out = b"".join(self.sent)
        self.sent.clear()
        assert out, "paho sent nothing"
        return out

    def read(self, chunks) -> None:
        self.inbox += b"".join(bytes(c) for c in chunks)
        while self.inbox:
            rc = self._packet_read()
            assert rc == MQTTErrorCode.MQTT_ERR_SUCCESS, rc


def paho_props(ptype, **values) -> Properties:
    p = Properties(ptype)
    for k, v in values.items():
        setattr(p, k, v)
    return p


def paho_session(level, client: PahoWire, policies=None, **kw):
    """Connect through the gateway with paho's own CONNECT; paho reads the CONNACK."""
    s, p, audit = make(level, policies or FakePolicies(**POLICY), **kw)
    acts = s.client_data(client.take())
    assert acts.auth is not None
    up = s.authenticated(ALICE)
    client.read(s.broker_data(connack(level)).to_client)
    assert client.events[-1][:2] == ("connect", 0)
    return s, p, audit, up


@pytest.mark.parametrize("level", LEVELS)
def test_paho_connect_is_read_exactly(level):
    client = PahoWire(level)
    client.username_pw_set("alice", "TOKEN")
    will_props = paho_props(PacketTypes.WILLMESSAGE, WillDelayInterval=5) if level == MQTT_5 else None
    client.will_set("devices/thermo-1/status", b"gone", qos=1, retain=True, properties=will_props)
    if level == MQTT_5:
        client._connect_properties = paho_props(PacketTypes.CONNECT, SessionExpiryInterval=120,
                                                ReceiveMaximum=20, TopicAliasMaximum=5)
    client._send_connect(45)
    raw = client.take()
    c = codec.decode_connect(Framer(1 << 16).feed(raw)[0].body)
    assert (c.protocol_level, c.client_id, c.username, c.password, c.keepalive) == \
        (level, "app-1", "alice", b"TOKEN", 45)
    assert (c.will.topic, c.will.payload, c.will.qos, c.will.retain) == ("devices/thermo-1/status", b"gone", 1, True)
    if level == MQTT_5:
        assert c.will.properties == [(Prop.WILL_DELAY_INTERVAL, 5)]
        assert dict(c.properties) == {Prop.SESSION_EXPIRY_INTERVAL: 120, Prop.RECEIVE_MAXIMUM: 20,
                                      Prop.TOPIC_ALIAS_MAXIMUM: 5}
    s, _, _ = make(level, FakePolicies(**POLICY))
    acts = s.client_data(raw)
    assert acts.auth.password == b"TOKEN" and acts.auth.username == "alice"
    up = codec.decode_connect(only(s.authenticated(ALICE).to_broker, T.CONNECT).body)
    assert up.password is None and up.client_id == "u/sub-alice/app-1"
    # The Will goes up as sent, less its Will Delay Interval: it is decided when the connection
    # ends and published then or never.
    assert (up.will.topic, up.will.payload, up.will.qos, up.will.retain) == (c.will.topic, c.will.payload, 1, True)
    assert up.will.properties == []
    if level == MQTT_5:
        assert Prop.TOPIC_ALIAS_MAXIMUM not in dict(up.properties)
        assert dict(up.properties)[Prop.RECEIVE_MAXIMUM] == 20


@pytest.mark.parametrize("level", LEVELS)
def test_paho_reads_the_gateways_connack(level):
    client = PahoWire(level, client_id="")
    client.username_pw_set("alice", "TOKEN")
    client._send_connect(0)
    s, _, _, _ = paho_session(level, client)
    props = client.events[-1][2]
    if level == MQTT_5:
        assert props.AssignedClientIdentifier == s.client_id and s.client_id.startswith("kg-")
        assert props.TopicAliasMaximum == 10 and props.ServerKeepAlive == 3600
        assert props.MaximumPacketSize == 1048576


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_publishes_pass_byte_for_byte(level, qos):
    client = PahoWire(level)
    client.username_pw_set("alice", "TOKEN")
    client._send_connect(60)
    s, _, _, _ = paho_session(level, client)
    props = paho_props(PacketTypes.PUBLISH, ContentType="json", UserProperty=[("k", "v")]) \
        if level == MQTT_5 else None
    client._send_publish(5, b"devices/thermo-1/telemetry", b'{"t": 21}', qos, True, False, None, props)
    raw = client.take()
    acts = s.client_data(raw)
    if qos == 2:
        # Held until its PUBREL (decided again then), and released byte for byte with its PUBREL.
        assert not acts.to_broker and only(acts.to_client, T.PUBREC)
        acts = s.client_data(codec.encode_ack(T.PUBREL, 5, level))
        raw += codec.encode_ack(T.PUBREL, 5, level)
    assert b"".join(bytes(x) for x in acts.to_broker) == raw and not acts.to_client


# v5 QoS 2: paho ignores PUBREC's 0x87 and reports the PUBCOMP (0x92, no such id) the gateway answers with.
@pytest.mark.parametrize("level,qos,ack", [(MQTT_5, 1, 0x87), (MQTT_5, 2, 0x92), (MQTT_311, 1, 0), (MQTT_311, 2, 0)])
def test_paho_understands_a_denied_publish(level, qos, ack):
    client = PahoWire(level)
    client.username_pw_set("alice", "TOKEN")
    client._send_connect(60)
    s, _, _, _ = paho_session(level, client)
    info = client.publish("devices/thermo-2/cmd", b"open", qos=qos)  # paho's public API, its own bookkeeping
    acts = s.client_data(client.take())
    assert not acts.to_broker
    client.read(acts.to_client)
    if qos == 2:
        # paho answers PUBREC with PUBREL (in v5 too, ignoring the 0x87): the gateway completes it.
        acts = s.client_data(client.take())
        assert not acts.to_broker and only(acts.to_client, T.PUBCOMP)
        client.read(acts.to_client)
    assert ("publish", info.mid, ack) in client.events


def test_paho_topic_alias_is_resolved():
    client = PahoWire(MQTT_5)
    client.username_pw_set("alice", "TOKEN")
    client._send_connect(60)
    s, _, _, _ = paho_session(MQTT_5, client)
    client._send_publish(0, b"devices/thermo-1/telemetry", b"1", 0, False, False, None,
                         paho_props(PacketTypes.PUBLISH, TopicAlias=3))
    client._send_publish(0, b"", b"2", 0, False, False, None, paho_props(PacketTypes.PUBLISH, TopicAlias=3))
    acts = s.client_data(client.take())
    frames = decode_all(acts.to_broker)
    infos = [codec.decode_publish(f, MQTT_5) for f in frames]
    assert [(i.topic, i.topic_alias) for i in infos] == [(b"devices/thermo-1/telemetry", None)] * 2
    assert [bytes(f.raw[i.payload_start:]) for f, i in zip(frames, infos, strict=True)] == [b"1", b"2"]


@pytest.mark.parametrize("level", LEVELS)
def test_paho_subscribe_rewritten_and_suback_merged(level):
    client = PahoWire(level)
    client.username_pw_set("alice", "TOKEN")
    client._send_connect(60)
    s, _, _audit, _ = paho_session(level, client)
    opts = (lambda q: SubscribeOptions(qos=q)) if level == MQTT_5 else (lambda q: q)
    props = paho_props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7) if level == MQTT_5 else None
    client._send_subscribe(False, [(b"$SYS/#", opts(0)), (b"devices/thermo-1/#", opts(1)),
                                   (b"$share/g/#", opts(0)), (b"devices/+/telemetry", opts(2))], props)
    acts = s.client_data(client.take())
    up = codec.decode_subscribe(only(acts.to_broker, T.SUBSCRIBE).body, level)
    assert [x.topic_filter for x in up.subscriptions] == ["devices/thermo-1/#", "devices/+/telemetry"]
    if level == MQTT_5:
        assert up.properties == [(Prop.SUBSCRIPTION_IDENTIFIER, 7)]
    client.read(s.broker_data(codec.encode_suback(codec.Suback(up.packet_id, [1, 2]), level)).to_client)
    deny = 0x87 if level == MQTT_5 else 0x80
    assert client.events[-1] == ("subscribe", up.packet_id, [deny, 1, deny, 2])
    # Deliveries through the wildcard: paho sees only the readable one.
    ok = codec.encode_publish("devices/thermo-1/telemetry", b"21", qos=1, packet_id=3, level=level)
    no = codec.encode_publish("devices/thermo-9/telemetry", b"99", qos=1, packet_id=4, level=level)
    acts = s.broker_data(ok + no)
    assert bytes(acts.to_broker[0]) == codec.encode_ack(T.PUBACK, 4, level)
    client.read(acts.to_client)
    assert [e for e in client.events if e[0] == "message"] == [("message", "devices/thermo-1/telemetry", b"21")]
    # paho's PUBACK for the delivered message passes to the broker untouched.
    assert bytes(s.client_data(client.take()).to_broker[0]) == codec.encode_ack(T.PUBACK, 3, level)


def test_paho_reads_the_expiry_disconnect():
    from tests.unit.test_mqtt_session import Clock
    wall = Clock(9_000.0)
    client = PahoWire(MQTT_5)
    client.username_pw_set("alice", "TOKEN")
    client._send_connect(60)
    s, _, _, _ = paho_session(MQTT_5, client, wallclock=wall)
    wall.t = 10_000.0
    acts = s.tick()
    client._state = paho._ConnectionState.MQTT_CS_CONNECTED
    client.inbox += b"".join(bytes(c) for c in acts.to_client)
    client._packet_read()
    assert ("disconnect", 0xA0) in client.events


# --------------------------------------------------------------------------- gmqtt as a packet source


def gmqtt_protocol(level):
    return SimpleNamespace(proto_name=b"MQTT", proto_ver=level, id_generator=IdGenerator(max=65535))


@pytest.mark.parametrize("level", LEVELS)
def test_gmqtt_packets_through_the_session(level):
    proto = gmqtt_protocol(level)
    extra = {"session_expiry_interval": 60, "receive_maximum": 10} if level == MQTT_5 else {}
    login = LoginPackageFactor.build_package("gm-1", "alice", "TOKEN", True, 30,
                                             proto, will_message=GMessage("devices/thermo-1/status", b"bye", qos=1),
                                             **extra)
    c = codec.decode_connect(Framer(1 << 16).feed(bytes(login))[0].body)
    assert c.client_id == "gm-1" and c.will.topic == "devices/thermo-1/status" and c.will.qos == 1
    s, _, _ = make(level, FakePolicies(**POLICY))
    acts = s.client_data(bytes(login))
    assert acts.auth.password == b"TOKEN" and acts.auth.username == "alice"
    if level == MQTT_5:
        assert dict(c.properties) == {Prop.SESSION_EXPIRY_INTERVAL: 60, Prop.RECEIVE_MAXIMUM: 10}
    s.authenticated(ALICE)
    s.broker_data(connack(level))

    props = {"user_property": [("a", "b")], "content_type": "json"} if level == MQTT_5 else {}
    for qos in (0, 1, 2):
        mid, raw = PublishPacket.build_package(GMessage("devices/thermo-1/telemetry", b"42", qos=qos, **props), proto)
        acts = s.client_data(bytes(raw))
        if qos == 2:  # held until its PUBREL, then released as sent, with its PUBREL
            assert only(acts.to_client, T.PUBREC) and not acts.to_broker
            rel = CommandWithMidPacket.build_package(MQTTCommands.PUBREL | 0x2, mid, False, proto_ver=level)
            acts = s.client_data(bytes(rel))
            raw = bytes(raw) + codec.encode_ack(T.PUBREL, mid, level)
        assert b"".join(bytes(x) for x in acts.to_broker) == bytes(raw)

    mid, raw = SubscribePacket.build_package([GSubscription("devices/+/telemetry", qos=1),
                                              GSubscription("#", qos=0)], proto)
    acts = s.client_data(bytes(raw))
    up = codec.decode_subscribe(only(acts.to_broker, T.SUBSCRIBE).body, level)
    assert up.packet_id == mid and [x.topic_filter for x in up.subscriptions] == ["devices/+/telemetry"]

    mid, raw = UnsubscribePacket.build_package("devices/+/telemetry", proto)
    assert bytes(s.client_data(bytes(raw)).to_broker[0]) == bytes(raw)

    ack = CommandWithMidPacket.build_package(MQTTCommands.PUBACK, 9, False, proto_ver=level)
    assert bytes(s.client_data(bytes(ack)).to_broker[0]) == bytes(ack)
    rel = CommandWithMidPacket.build_package(MQTTCommands.PUBREL | 0x2, 9, False, proto_ver=level)
    acts = s.client_data(bytes(rel))  # an id the gateway holds nothing for: answered, not released
    assert not acts.to_broker and only(acts.to_client, T.PUBCOMP)

    disc = DisconnectPacket.build_package(proto)
    acts = s.client_data(bytes(disc))
    assert bytes(acts.to_broker[0]) == bytes(disc) and acts.close.reason == "client_disconnect"


def test_gmqtt_denied_will_is_refused():
    proto = gmqtt_protocol(MQTT_5)
    login = LoginPackageFactor.build_package("gm-1", "alice", "TOKEN", True, 30, proto,
                                             will_message=GMessage("devices/thermo-2/cmd", b"x", retain=True))
    s, _, _ = make(MQTT_5, FakePolicies(**POLICY))
    s.client_data(bytes(login))
    acts = s.authenticated(ALICE)
    assert codec.decode_connack(only(acts.to_client, T.CONNACK).body, MQTT_5).reason == 0x87


# --------------------------------------------------------------------------- against the real broker


class BrokerLink:
    """The session's upstream side on a real socket to Mosquitto (blocking, short timeouts)."""

    def __init__(self, session, broker):
        import socket
        self.s = session
        self.sock = socket.create_connection((broker.host, broker.port), timeout=5)
        self.to_client: list[bytes] = []

    def send(self, chunks) -> None:
        data = b"".join(bytes(c) for c in chunks)
        if data:
            self.sock.sendall(data)

    def apply(self, acts) -> None:
        self.to_client += [bytes(c) for c in acts.to_client]
        self.send(acts.to_broker)

    def pump_until(self, ptype, count: int = 1) -> list[codec.Frame]:
        """Read from the broker through the session until the client got ``count`` packets of ``ptype``."""
        while True:
            frames = decode_all(self.to_client)
            if sum(f.type == ptype for f in frames) >= count:
                return frames
            data = self.sock.recv(65536)
            assert data, "broker closed the connection"
            self.apply(self.s.broker_data(data))

    def close(self) -> None:
        self.sock.close()


@pytest.mark.integration
@pytest.mark.parametrize("level", LEVELS)
def test_rewritten_packets_are_accepted_by_mosquitto(level, mosquitto):
    s, _, audit = make(level, FakePolicies(**dict(POLICY, sub_allow=["devices/thermo-1/attrs/#"])))
    acts = s.client_data(codec.encode_connect(codec.Connect("MQTT", level, True, 30, "rt-1", "alice", b"TOKEN")))
    acts = s.authenticated(ALICE)
    link = BrokerLink(s, mosquitto)
    try:
        link.apply(acts)
        ca = link.pump_until(T.CONNACK)[0]
        assert codec.decode_connack(ca.body, level).reason == 0
        # A partly denied SUBSCRIBE: the rewritten packet goes to Mosquitto, its SUBACK is merged.
        subs = [codec.Subscription("$SYS/#", 0), codec.Subscription("devices/+/telemetry", 2),
                codec.Subscription("devices/thermo-1/attrs/#", 1)]
        link.apply(s.client_data(codec.encode_subscribe(codec.Subscribe(4, subs), level)))
        frames = link.pump_until(T.SUBACK)
        deny = 0x87 if level == MQTT_5 else 0x80
        assert codec.decode_suback(frames[-1].body, level).reasons == [deny, 2, 1]
        # Publishes (the second by topic alias only, in v5) come back through the wildcard.
        props = [(Prop.TOPIC_ALIAS, 2)] if level == MQTT_5 else []
        link.apply(s.client_data(codec.encode_publish("devices/thermo-1/telemetry", b"a", qos=1, packet_id=10,
                                                      level=level, properties=props)))
        again = codec.encode_publish("" if level == MQTT_5 else "devices/thermo-1/telemetry", b"b", qos=1,
                                     packet_id=11, level=level, properties=props)
        link.apply(s.client_data(again))
        # Someone else (straight at the broker) publishes on a device Alice may not read, QoS 1
        # and 2, then on one she may: the dropped deliveries are completed by the gateway and
        # the broker keeps delivering.
        import socket
        other = socket.create_connection((mosquitto.host, mosquitto.port), timeout=5)
        try:
            other.sendall(codec.encode_connect(codec.Connect("MQTT", 4, True, 30, "direct-1")))
            other.sendall(codec.encode_publish("devices/thermo-9/telemetry", b"c", qos=1, packet_id=1)
                          + codec.encode_publish("devices/thermo-9/telemetry", b"c2", qos=2, packet_id=2)
                          + codec.encode_publish("devices/thermo-1/telemetry", b"d", qos=0))
            frames = link.pump_until(T.PUBLISH, 3)
        finally:
            other.close()
        got = [bytes(f.raw[codec.decode_publish(f, level).payload_start:]) for f in frames if f.type == T.PUBLISH]
        assert got == [b"a", b"b", b"d"]
        assert [r["resource"] for r in audit.records if r["action"] == "receive"] == ["devices/thermo-9/telemetry"]
        while s.dropped_qos2_awaiting_pubrel:  # Mosquitto's PUBREL for the dropped QoS 2 delivery comes...
            link.apply(s.broker_data(link.sock.recv(65536)))
        # ...and is completed by the gateway: the client never sees it.
        assert [f.type for f in decode_all(link.to_client)].count(T.PUBREL) == 0
    finally:
        link.close()
