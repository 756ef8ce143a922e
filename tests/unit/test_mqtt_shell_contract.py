"""The asyncio shell (``proxy.mqtt.server``, ``connection``, ``sockets``) keeps the session's contract.

:mod:`proxy.mqtt.session`'s module docstring tells the shell what to do with
every event and every command (:mod:`proxy.mqtt.commands`); the session's own
tests cannot see whether the shell does it. Here a real
:class:`~proxy.mqtt.server.MqttGateway` (real policy engine on in-memory
ownership facts, a delegation to grant and revoke) runs with fake transports
on both sides that write every call into ONE ordered log, so each test reads
what went where, and in which order:

* commands are carried out in the order of the list (client bytes, open the
  upstream, broker bytes once connected, authentication, audit records, metric
  counts, close): the audit records reach the audit log, off the event loop, and
  the counts the gateway's metrics;
* ``client_closed()`` is called whichever way the client connection ends, and
  its ``to_broker`` (the DISCONNECT that discards a Will no longer allowed)
  reaches the broker before the upstream is half-closed or closed;
* the client's reading is paused while ``reading_paused`` (the broker's bytes
  still flow), the timer fires at ``next_deadline()``, a lost or unreachable
  broker is reported with ``broker_closed()``, shutdown tells v5 clients;
* ``Invalidated``'s commands are carried out (the session may close);
* backpressure crosses the pair, and a transport holding unsent data never
  sees the shared receive buffer change under it.

The gateway's loop is the test's; the listener is bound on 127.0.0.1:0 but
never used: the protocol factory the gateway hands to ``create_server`` is
called directly, as the loop would on accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from proxy.audit import MemoryAudit
from proxy.config import Config, MqttConfig, OidcConfig
from proxy.facts import Delegation, DeviceFacts, StaticFacts
from proxy.identity.model import Identity
from proxy.metrics import REGISTRY
from proxy.mqtt import codec
from proxy.mqtt import events as ev
from proxy.mqtt.codec import Framer
from proxy.mqtt.commands import (
    AuditRecords,
    Close,
    CountMetrics,
    Metric,
    OpenUpstream,
    Record,
    SendToBroker,
    SendToClient,
)
from proxy.mqtt.handshake import AUTH_METHOD
from proxy.mqtt.packets import MQTT_5, MQTT_311, Connect, PacketType, Prop, Reason, Will
from proxy.mqtt.server import MqttGateway
from proxy.policy import Policies
from proxy.services import Services
from tests.unit.policy_helpers import to

T = PacketType

POLICY = """
version: 1
rules:
  - id: owners-delegates-devices
    subjects: [owner, delegate, device]
    mqtt: {topics: ["devices/{device}/#"], actions: [publish, subscribe]}
"""
WILL = Will("devices/thermo-1/status", b"offline", 0, False)
DELEGATED = DeviceFacts("thermo-1", "sub-bob", "bob",
                        delegations=(Delegation("d1", "thermo-1", to("alice"), "readwrite"),))
REVOKED = DeviceFacts("thermo-1", "sub-bob", "bob")  # the same device, the delegation taken back


def alice(ttl: float = 3600.0) -> Identity:
    return Identity(kind="user", sub="sub-alice", username="alice", method="token", expires_at=time.time() + ttl)


THERMO = Identity(kind="device", sub="device:thermo-1", username="thermo-1", method="certificate",
                  device_id="thermo-1", owner_sub="sub-bob", owner_username="bob")


# --------------------------------------------------------------------------- fakes


class FakeTransport:
    """Records every call in the shared log as (side, op, ...). Keeps what it was given
    to write, and a copy made at write time, to see later whether it changed."""

    def __init__(self, side: str, log: list, protocol: Any = None, *, buffered: int = 0):
        self.side = side
        self.log = log
        self.protocol = protocol
        self.buffered = buffered          # what get_write_buffer_size() answers
        self.closing = False
        self.eof = False
        self.lost = False
        self.held: list[tuple[Any, bytes]] = []   # (object given, bytes at write time)
        self.writes_after_close: list[bytes] = []

    # -- what the shell may call
    def write(self, data: Any) -> None:
        self._wrote([data])

    def writelines(self, items: Any) -> None:
        self._wrote(list(items))

    def _wrote(self, items: list) -> None:
        data = b"".join(bytes(x) for x in items)
        if self.closing or self.eof:
            self.writes_after_close.append(data)
        for x in items:
            self.held.append((x, bytes(x)))
        self.log.append((self.side, "write", data))

    def close(self) -> None:
        self.log.append((self.side, "close"))
        self._end()

    def abort(self) -> None:
        self.log.append((self.side, "abort"))
        self._end()

    def write_eof(self) -> None:
        self.log.append((self.side, "write_eof"))
        self.eof = True
        if self.side == "client":  # the gateway's lingering close: a client closes on our FIN
            self._end()

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.log.append((self.side, "pause_reading"))

    def resume_reading(self) -> None:
        self.log.append((self.side, "resume_reading"))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("203.0.113.7", 50123)}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.log.append((self.side, "set_write_buffer_limits"))

    # -- what the loop would do
    def _end(self) -> None:
        if not self.closing:
            self.closing = True
            # asyncio reports the end to the protocol on a later loop iteration
            asyncio.get_running_loop().call_soon(self._lost, None)

    def _lost(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            self.closing = True
            if self.protocol is not None:
                self.protocol.connection_lost(exc)

    def drop(self) -> None:
        """The peer went away (TCP reset): the protocol's connection_lost, nothing else."""
        self.log.append((self.side, "dropped"))
        self._lost(ConnectionResetError("reset by peer"))

    def feed(self, data: bytes) -> None:
        """Bytes arriving on this socket, delivered the way the loop delivers them."""
        proto = self.protocol
        view = memoryview(data)
        while view:
            if hasattr(proto, "get_buffer"):
                buf = proto.get_buffer(len(view))
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                proto.buffer_updated(n)
            else:
                n = len(view)
                proto.data_received(bytes(view))
            view = view[n:]


class ShellGateway(MqttGateway):
    """The real gateway, with authentication and the broker connection faked."""

    def __init__(self, services: Services, log: list):
        super().__init__(services)
        self.log = log
        self.identity: Identity = alice()
        self.reauth_identity: Identity | None = None
        self.auth_gate: asyncio.Event | None = None   # set: answer; None: answer at once
        self.dial_gate: asyncio.Event | None = None
        self.dial_error: Exception | None = None
        self.upstreams: list[FakeTransport] = []
        self.sessions: list = []

    def new_session(self):
        s = super().new_session()
        self.sessions.append(s)
        return s

    def authenticate(self, request, transport):
        # Logged when the shell asks, not when the coroutine first runs.
        self.log.append(("gw", "auth", request.kind))
        return self._authenticate(request)

    async def _authenticate(self, request):
        if self.auth_gate is not None:
            await self.auth_gate.wait()
        ident = self.reauth_identity if request.kind == "reauth" and self.reauth_identity else self.identity
        return ident.method, ident

    def connect_upstream(self, factory):
        self.log.append(("gw", "dial"))
        return self._connect_upstream(factory)

    async def _connect_upstream(self, factory):
        if self.dial_gate is not None:
            await self.dial_gate.wait()
        if self.dial_error is not None:
            raise self.dial_error
        proto = factory()
        up = FakeTransport("up", self.log, proto)
        self.upstreams.append(up)
        proto.connection_made(up)
        self.log.append(("up", "connected"))
        return up, proto


class FakeOwnership:
    """What the gateway reads of the ownership service: the facts, and whether a device's
    credential still stands (as OwnershipService.credential_problem answers)."""

    def __init__(self, facts: StaticFacts):
        self.facts = facts
        self.broker_clearer = None      # the gateway hands its broker clean-up in; never run here

    def set_broker_clearer(self, clearer) -> None:
        self.broker_clearer = clearer

    def credential_problem(self, identity: Identity) -> str | None:
        if not identity.is_device:
            return None
        return "device deleted" if self.facts.device(identity.device_id) is None else None

    def device_identity(self, device_id: str) -> Identity:
        return THERMO


@dataclass
class Rig:
    gateway: ShellGateway
    facts: StaticFacts
    log: list
    factory: Callable[[], Any]
    clients: list = field(default_factory=list)

    async def accept(self, *, buffered: int = 0) -> FakeTransport:
        proto = self.factory()
        client = FakeTransport("client", self.log, proto, buffered=buffered)
        proto.connection_made(client)
        self.clients.append(client)
        return client

    @property
    def up(self) -> FakeTransport:
        assert self.gateway.upstreams, f"no upstream was opened: {self.log}"
        return self.gateway.upstreams[-1]

    @property
    def session(self):
        return self.gateway.sessions[-1]

    # -- reading the log
    def packets(self, side: str) -> list[tuple[int, codec.Frame]]:
        """(log index, frame) of every packet written to ``side``."""
        framer = Framer(1 << 24)
        out = []
        for i, entry in enumerate(self.log):
            if entry[0] == side and entry[1] == "write":
                out += [(i, f) for f in framer.feed(entry[2])]
        return out

    def types(self, side: str) -> list[int]:
        return [f.type for _, f in self.packets(side)]

    def first(self, side: str, *ops: str, after: int = -1) -> int | None:
        for i, entry in enumerate(self.log):
            if i > after and entry[0] == side and entry[1] in ops:
                return i
        return None

    def ops(self, side: str) -> list[str]:
        return [e[1] for e in self.log if e[0] == side and e[1] != "set_write_buffer_limits"]


@contextlib.asynccontextmanager
async def rig(**mqtt: Any):
    mqtt.setdefault("connect_timeout_seconds", 3.0)
    config = Config(oidc=OidcConfig(issuer="https://issuer.invalid", leeway_seconds=0.0),
                    mqtt=MqttConfig(listen="127.0.0.1:0", tls=False, **mqtt))
    facts = StaticFacts([DELEGATED])
    services = Services(config=config, tokens=None, ownership=FakeOwnership(facts),  # type: ignore[arg-type]
                        policies=Policies.from_text(POLICY, facts), audit=MemoryAudit())
    log: list = []
    gw = ShellGateway(services, log)
    loop = asyncio.get_running_loop()
    factories: list = []
    real_create_server = loop.create_server

    async def create_server(factory, *args, **kw):
        factories.append(factory)
        return await real_create_server(factory, *args, **kw)

    # An instance attribute over the method, removed below (mypy sees the overloaded method).
    loop.create_server = create_server  # type: ignore[method-assign, assignment]
    try:
        await gw.start()
    finally:
        del loop.create_server
    assert len(factories) == 1
    r = Rig(gw, facts, log, factories[0])
    try:
        yield r
    finally:
        await gw.stop()
        await settle()


async def settle(rounds: int = 10) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(predicate: Callable[[], bool], timeout: float, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def connect(level: int = MQTT_311, *, will: Will | None = None, keepalive: int = 60, client_id: str = "app-1",
            username: str | None = "alice", password: bytes | None = b"TOKEN", props=()) -> bytes:
    return codec.encode_connect(Connect("MQTT", level, True, keepalive, client_id, username, password, will,
                                        list(props)))


def connack(level: int = MQTT_311, reason: int = 0) -> bytes:
    return codec.encode_connack(False, reason, level)


def publish(topic: str, level: int = MQTT_311, payload: bytes = b"21.5") -> bytes:
    return codec.encode_publish(topic, payload, qos=0, level=level)


async def open_pair(r: Rig, level: int = MQTT_311, *, will: Will | None = None, keepalive: int = 60,
                    buffered: int = 0) -> FakeTransport:
    """A client connected through the gateway: CONNECT, authenticated, broker CONNACK."""
    client = await r.accept(buffered=buffered)
    client.feed(connect(level, will=will, keepalive=keepalive))
    await settle()
    assert r.types("up") == [T.CONNECT], r.log
    r.up.feed(connack(level))
    assert r.types("client") == [T.CONNACK], r.log
    assert not client.closing
    return client


def revoke_silently(r: Rig) -> None:
    """The Will's grant ends without the session being told (as when a grant simply runs out and
    the timer has not fired yet): only the decision at close can stop the Will then. (A change
    the session is told about ends the connection at once: see
    test_revoked_will_ends_the_connection_at_once.)"""
    r.facts._devices[REVOKED.id] = REVOKED
    r.facts.generation += 1  # the policy engine's cache follows the facts' generation


def disconnect_reason(frame: codec.Frame, level: int) -> int:
    return codec.decode_disconnect(frame.body, level).reason


def assert_no_write_after_close(r: Rig) -> None:
    for t in r.clients + r.gateway.upstreams:
        assert not t.writes_after_close, (t.side, t.writes_after_close, r.log)


def assert_upstream_ended(r: Rig) -> int:
    """The upstream was half-closed or closed; the index of the first of those."""
    end = r.first("up", "write_eof", "close", "abort")
    assert end is not None, f"the upstream was never closed: {r.log}"
    return end


def assert_will_discarded_before_upstream_end(r: Rig, level: int) -> None:
    """The revoked Will's DISCONNECT (reason 0) went upstream, and before write_eof / close."""
    end = assert_upstream_ended(r)
    discs = [(i, f) for i, f in r.packets("up") if f.type == T.DISCONNECT]
    assert discs, f"no DISCONNECT went upstream: the broker will publish a revoked Will. {r.ops('up')}"
    i, frame = discs[-1]
    assert frame.raw[0] == 0xE0 and disconnect_reason(frame, level) == 0
    if level == MQTT_311:
        assert bytes(frame.raw) == b"\xe0\x00"
    assert i < end, f"the DISCONNECT came after the upstream was closed: {r.ops('up')}"
    assert_no_write_after_close(r)


def assert_client_ended(r: Rig, client: FakeTransport) -> None:
    assert client.closing or client.lost, f"the client connection was left open: {r.log}"


# --------------------------------------------------------------------------- the order of Actions


async def test_connect_flow_pauses_the_client_and_writes_the_connect_once_connected():
    async with rig() as r:
        r.gateway.dial_gate = asyncio.Event()
        client = await r.accept()
        pub = publish("devices/thermo-1/telemetry")
        client.feed(connect() + pub)   # a publish right behind the CONNECT, in the same chunk
        await settle()
        paused = r.first("client", "pause_reading")
        auth = r.first("gw", "auth")
        assert paused is not None and auth is not None and paused < auth, r.log
        dial = r.first("gw", "dial")
        assert dial is not None and dial > auth
        assert not r.gateway.upstreams and r.types("up") == []   # nothing to write to yet
        r.gateway.dial_gate.set()
        await settle()
        connected = r.first("up", "connected")
        assert r.types("up") == [T.CONNECT]
        assert r.packets("up")[0][0] > connected
        # Broker bytes are read while the client is paused: the upstream is never paused for it.
        assert "pause_reading" not in r.ops("up")
        assert r.first("client", "resume_reading") is None
        r.up.feed(connack())
        assert r.types("client") == [T.CONNACK]
        # The held publish goes upstream after the CONNECT, once the broker accepted it.
        assert r.types("up") == [T.CONNECT, T.PUBLISH]
        assert bytes(r.packets("up")[1][1].raw) == pub
        resumed = r.first("client", "resume_reading")
        assert resumed is not None and resumed > r.packets("client")[0][0], r.log
        assert not client.closing


async def test_every_command_of_a_list_is_carried_out_in_order():
    # SendToClient, OpenUpstream, SendToBroker, AuditRecords, CountMetrics from one event
    # (here: Authenticated), a recording session around the real one.
    async with rig() as r:
        client = await r.accept()
        s = r.session
        real = s.handle
        returned: list = []
        mark = Record("test.marker", "allow", "shell-contract")
        metric = Metric("decisions", ("will", "allow"))
        counter = "keygate_mqtt_decisions_total"
        labels = {"action": "will", "result": "allow"}
        before = REGISTRY.get_sample_value(counter, labels) or 0.0
        audit = r.gateway.services.audit
        writers: list = []
        real_record = audit.record

        def record(**kw):
            writers.append(threading.current_thread())
            real_record(**kw)

        audit.record = record

        def handle(event):
            cmds = real(event)
            if isinstance(event, ev.Authenticated):
                assert [type(c) for c in cmds][:2] == [OpenUpstream, SendToBroker], cmds
                # A marker the shell cannot tell apart, a record and a count of the test's own.
                cmds = [SendToClient([b"\xd0\x00"]), *cmds[:2], AuditRecords([mark]), CountMetrics([(metric, 5)])]
                returned.append(cmds)
            return cmds

        s.handle = handle
        client.feed(connect())
        await settle()
        assert returned, r.log
        marker = r.first("client", "write")
        dial = r.first("gw", "dial")
        assert marker is not None and dial is not None and marker < dial, r.log
        assert r.packets("up")[0][0] > r.first("up", "connected")
        # The audit line reaches the log, written off the event loop; the count, the metric.
        r.gateway.audit_writer.drain()
        assert [x for x in audit.records if x["action"] == "test.marker"], audit.records
        assert writers and all(t is not threading.main_thread() for t in writers), writers
        assert (REGISTRY.get_sample_value(counter, labels) or 0.0) - before == 5


async def test_the_session_audit_lines_and_counts_reach_the_log_and_the_metrics():
    # The real session's own commands: a denied PUBLISH is audited and counted by the shell.
    async with rig() as r:
        labels = {"action": "publish", "result": "deny"}
        before = REGISTRY.get_sample_value("keygate_mqtt_decisions_total", labels) or 0.0
        client = await open_pair(r)
        client.feed(publish("devices/thermo-2/telemetry"))  # not alice's
        await settle()
        r.gateway.audit_writer.drain()
        audit = r.gateway.services.audit
        assert [x for x in audit.records if x["action"] == "publish" and x["decision"] == "deny"], audit.records
        assert (REGISTRY.get_sample_value("keygate_mqtt_decisions_total", labels) or 0.0) - before == 1
        assert r.types("up") == [T.CONNECT]  # and nothing went upstream


async def test_an_auth_out_of_broker_data_is_run():
    # A v5 client re-authenticates before the CONNACK: the AUTH waits in the session and the
    # request comes out of broker_data() with the CONNACK. The shell must run it.
    async with rig() as r:
        r.gateway.reauth_identity = alice(7200)
        client = await r.accept()
        reauth = codec.encode_auth(Reason.REAUTHENTICATE, [(Prop.AUTHENTICATION_METHOD, AUTH_METHOD),
                                                           (Prop.AUTHENTICATION_DATA, b"FRESH")])
        pub = publish("devices/thermo-1/telemetry", MQTT_5)
        client.feed(connect(MQTT_5) + pub + reauth)
        await settle()
        r.up.feed(connack(MQTT_5))
        await settle()
        kinds = [e[2] for e in r.log if e[:2] == ("gw", "auth")]
        assert kinds == ["connect", "reauth"], r.log
        # One Actions: the CONNACK to the client, the held PUBLISH to the broker, then the auth.
        assert r.types("up") == [T.CONNECT, T.PUBLISH]
        reauth_at = r.first("gw", "auth", after=r.first("gw", "auth"))
        assert r.packets("client")[0][0] < reauth_at and r.packets("up")[1][0] < reauth_at, r.log
        assert r.types("client") == [T.CONNACK, T.AUTH]
        assert codec.decode_auth(r.packets("client")[1][1].body).reason == Reason.SUCCESS
        assert not client.closing


async def test_session_close_writes_both_sides_then_closes_both():
    # A protocol violation after CONNACK: v5 DISCONNECT 0x82 to the client, then the pair ends.
    async with rig() as r:
        client = await open_pair(r, MQTT_5)
        client.feed(connect(MQTT_5))  # a second CONNECT
        await settle()
        disc = [(i, f) for i, f in r.packets("client") if f.type == T.DISCONNECT]
        assert disc and disconnect_reason(disc[0][1], MQTT_5) == Reason.PROTOCOL_ERROR
        client_end = r.first("client", "close", "abort", "write_eof")
        assert client_end is not None and disc[0][0] < client_end, r.log
        assert_upstream_ended(r)
        assert_no_write_after_close(r)


async def test_a_refused_connect_closes_without_opening_the_upstream():
    async with rig() as r:
        client = await r.accept()
        client.feed(connect(will=Will("devices/thermo-2/x", b"", 0, False)))  # not alice's to use
        await settle()
        assert r.types("client") == [T.CONNACK]
        assert bytes(r.packets("client")[0][1].raw) == b"\x20\x02\x00\x05"
        assert r.first("client", "close", "abort", "write_eof") > r.packets("client")[0][0]
        assert r.first("gw", "dial") is None and not r.gateway.upstreams


# --------------------------------------------------------------------------- client_closed(), every way


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
async def test_revoked_will_is_discarded_when_the_client_drops(level):
    async with rig() as r:
        client = await open_pair(r, level, will=WILL)
        revoke_silently(r)
        await settle()
        assert r.first("up", "write_eof", "close", "abort") is None
        client.drop()
        await settle()
        assert_will_discarded_before_upstream_end(r, level)


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
async def test_allowed_will_is_left_to_the_broker_when_the_client_drops(level):
    async with rig() as r:
        client = await open_pair(r, level, will=WILL)
        r.facts.put(DELEGATED)  # a change that keeps the grant
        await settle()
        client.drop()
        await settle()
        assert_upstream_ended(r)
        assert T.DISCONNECT not in r.types("up"), r.ops("up")
        assert_no_write_after_close(r)


async def test_revoked_will_is_discarded_when_the_session_closes():
    # Actions.close (here a protocol violation) ends the client connection: client_closed() too.
    async with rig() as r:
        client = await open_pair(r, MQTT_311, will=WILL)
        revoke_silently(r)
        await settle()
        client.feed(connect(MQTT_311))  # a second CONNECT: the session closes
        await settle()
        assert_client_ended(r, client)
        assert_will_discarded_before_upstream_end(r, MQTT_311)


async def test_revoked_will_is_discarded_on_shutdown():
    async with rig() as r:
        await open_pair(r, MQTT_5, will=WILL)
        revoke_silently(r)
        await settle()
        await r.gateway.stop()
        await settle()
        disc = [(i, f) for i, f in r.packets("client") if f.type == T.DISCONNECT]
        assert disc and disconnect_reason(disc[0][1], MQTT_5) == Reason.SERVER_SHUTTING_DOWN
        assert disc[0][0] < r.first("client", "close", "abort", "write_eof")
        assert_will_discarded_before_upstream_end(r, MQTT_5)


async def test_revoked_will_is_discarded_on_token_expiry():
    # The timer must move from the CONNECT deadline (3 s) to the token's expiry (0.3 s).
    async with rig() as r:
        r.gateway.identity = alice(ttl=0.3)
        client = await open_pair(r, MQTT_5, will=WILL)
        revoke_silently(r)
        await until(lambda: client.closing, 2.0, "the token expiry to close the connection")
        await settle()
        disc = [(i, f) for i, f in r.packets("client") if f.type == T.DISCONNECT]
        assert disc and disconnect_reason(disc[0][1], MQTT_5) == Reason.MAXIMUM_CONNECT_TIME
        assert disc[0][0] < r.first("client", "close", "abort", "write_eof")
        assert_will_discarded_before_upstream_end(r, MQTT_5)


async def test_revoked_will_is_discarded_on_keepalive_timeout():
    # keepalive 1 s: the gateway closes a silent client at 1.5 s (the slowest test here).
    async with rig() as r:
        client = await open_pair(r, MQTT_5, will=WILL, keepalive=1)
        revoke_silently(r)
        await until(lambda: client.closing, 3.0, "the keepalive timeout")
        await settle()
        disc = [(i, f) for i, f in r.packets("client") if f.type == T.DISCONNECT]
        assert disc and disconnect_reason(disc[0][1], MQTT_5) == Reason.KEEP_ALIVE_TIMEOUT
        assert_will_discarded_before_upstream_end(r, MQTT_5)


async def test_clean_disconnect_sends_no_second_disconnect():
    async with rig() as r:
        client = await open_pair(r, MQTT_311, will=WILL)
        revoke_silently(r)
        await settle()
        client.feed(b"\xe0\x00")
        await settle()
        assert r.types("up").count(T.DISCONNECT) == 1
        assert_upstream_ended(r)
        assert_no_write_after_close(r)


# --------------------------------------------------------------------------- timers


async def test_connect_deadline_runs_from_accept():
    async with rig(connect_timeout_seconds=0.2) as r:
        client = await r.accept()   # never says anything
        await until(lambda: client.closing, 2.0, "the CONNECT deadline")
        assert r.types("client") == []
        assert r.first("gw", "auth") is None and not r.gateway.upstreams


async def test_connect_deadline_covers_a_hanging_authentication():
    async with rig(connect_timeout_seconds=0.2) as r:
        r.gateway.auth_gate = asyncio.Event()   # never answered
        client = await r.accept()
        client.feed(connect())
        await until(lambda: client.closing, 2.0, "the CONNECT deadline")
        assert [bytes(f.raw) for _, f in r.packets("client")] == [b"\x20\x02\x00\x03"]
        assert r.packets("client")[0][0] < r.first("client", "close", "abort", "write_eof")
        r.gateway.auth_gate.set()   # an answer after the close changes nothing
        await settle()
        assert not r.gateway.upstreams
        assert_no_write_after_close(r)


async def test_connect_deadline_covers_a_broker_that_never_answers():
    async with rig(connect_timeout_seconds=0.3) as r:
        client = await r.accept()
        client.feed(connect(MQTT_5))
        await settle()
        assert r.types("up") == [T.CONNECT]
        await until(lambda: client.closing, 2.0, "the CONNECT deadline")
        assert r.types("client") == [T.CONNACK]
        assert codec.decode_connack(r.packets("client")[0][1].body, MQTT_5).reason == Reason.SERVER_UNAVAILABLE
        assert_upstream_ended(r)
        assert_no_write_after_close(r)


async def test_traffic_keeps_a_connection_alive_past_the_connect_deadline():
    # The timer set at accept (CONNECT deadline) must not close an open connection.
    async with rig(connect_timeout_seconds=0.2) as r:
        client = await open_pair(r, MQTT_311, keepalive=60)
        await asyncio.sleep(0.35)
        assert not client.closing, r.log
        assert r.first("up", "write_eof", "close", "abort") is None


# --------------------------------------------------------------------------- the broker side


@pytest.mark.parametrize("level,code", [(MQTT_311, b"\x20\x02\x00\x03"), (MQTT_5, None)])
async def test_unreachable_broker_is_reported_to_the_session(level, code):
    async with rig() as r:
        r.gateway.dial_error = ConnectionRefusedError("no broker")
        client = await r.accept()
        client.feed(connect(level))
        await settle()
        assert r.types("client") == [T.CONNACK], r.log
        frame = r.packets("client")[0][1]
        if code is not None:
            assert bytes(frame.raw) == code
        else:
            assert codec.decode_connack(frame.body, level).reason == Reason.SERVER_UNAVAILABLE
        assert r.packets("client")[0][0] < r.first("client", "close", "abort", "write_eof")


async def test_lost_broker_is_reported_to_the_session():
    async with rig() as r:
        await open_pair(r, MQTT_5)
        r.up.drop()
        await settle()
        disc = [(i, f) for i, f in r.packets("client") if f.type == T.DISCONNECT]
        assert disc and disconnect_reason(disc[0][1], MQTT_5) == Reason.UNSPECIFIED_ERROR
        assert disc[0][0] < r.first("client", "close", "abort", "write_eof")
        assert not r.up.writes_after_close
        assert [op for op in r.ops("up") if op == "write"] == ["write"]  # the CONNECT, nothing after


async def test_broker_lost_before_connack_refuses_the_connect():
    async with rig() as r:
        client = await r.accept()
        client.feed(connect(MQTT_311))
        await settle()
        r.up.drop()
        await settle()
        assert [bytes(f.raw) for _, f in r.packets("client")] == [b"\x20\x02\x00\x03"]
        assert_client_ended(r, client)


async def test_shutdown_tells_v5_clients_then_closes():
    async with rig() as r:
        await open_pair(r, MQTT_5)
        await r.gateway.stop()
        disc = [(i, f) for i, f in r.packets("client") if f.type == T.DISCONNECT]
        assert disc and disconnect_reason(disc[0][1], MQTT_5) == Reason.SERVER_SHUTTING_DOWN
        assert disc[0][0] < r.first("client", "close", "abort", "write_eof")
        assert_upstream_ended(r)
        assert_no_write_after_close(r)


# --------------------------------------------------------------------------- invalidate()


async def test_invalidate_actions_are_carried_out():
    # Invalidated returns commands; the shell must carry them out like any other.
    async with rig() as r:
        await open_pair(r, MQTT_5, will=WILL)
        s = r.session
        real = s.handle

        def handle(event):
            got = real(event)
            if not isinstance(event, ev.Invalidated):
                return got
            # (drops what it returned: the commands below stand in for it)
            return [SendToClient([codec.encode_disconnect(MQTT_5, Reason.ADMINISTRATIVE_ACTION)]),
                    SendToBroker([codec.encode_disconnect(MQTT_5)]),
                    Close("revoked", "test", Reason.ADMINISTRATIVE_ACTION)]

        s.handle = handle
        r.facts.put(DELEGATED)   # a change reaches every connection through the gateway
        await settle()
        disc = [(i, f) for i, f in r.packets("client") if f.type == T.DISCONNECT]
        assert disc and disconnect_reason(disc[0][1], MQTT_5) == Reason.ADMINISTRATIVE_ACTION, r.log
        assert disc[0][0] < r.first("client", "close", "abort", "write_eof")
        assert_will_discarded_before_upstream_end(r, MQTT_5)


async def test_a_deleted_device_is_disconnected_at_once():
    async with rig() as r:
        r.gateway.identity = THERMO
        client = await r.accept()
        client.feed(connect(MQTT_5, client_id="thermo-1", username=None, password=None))
        await settle()
        r.up.feed(connack(MQTT_5))
        assert not client.closing
        r.facts.remove("thermo-1")
        await settle()
        disc = [(i, f) for i, f in r.packets("client") if f.type == T.DISCONNECT]
        assert disc and disconnect_reason(disc[0][1], MQTT_5) == Reason.ADMINISTRATIVE_ACTION, r.ops("client")
        assert disc[0][0] < r.first("client", "close", "abort", "write_eof")
        assert_upstream_ended(r)


# --------------------------------------------------------------------------- backpressure


async def test_a_slow_broker_pauses_the_client():
    async with rig() as r:
        client = await open_pair(r)
        mark = len(r.log)
        r.up.protocol.pause_writing()
        assert r.log[mark:] == [("client", "pause_reading")]
        client.feed(publish("devices/thermo-1/telemetry"))   # already on its way: still forwarded
        assert [e[1] for e in r.log[mark:] if e[0] == "client"] == ["pause_reading"], r.log[mark:]
        r.up.protocol.resume_writing()
        assert r.log[-1] == ("client", "resume_reading")


async def test_a_slow_client_pauses_the_broker():
    async with rig() as r:
        client = await open_pair(r)
        mark = len(r.log)
        client.protocol.pause_writing()
        assert r.log[mark:] == [("up", "pause_reading")]
        r.up.protocol.resume_writing()   # a resume for a pause that never happened changes nothing
        r.up.feed(publish("devices/thermo-1/telemetry"))
        client.protocol.resume_writing()
        assert r.log[-1] == ("up", "resume_reading")
        assert "resume_reading" not in [e[1] for e in r.log[mark:] if e[0] == "client"]


async def test_a_slow_client_pauses_a_broker_still_being_dialled():
    async with rig() as r:
        r.gateway.dial_gate = asyncio.Event()
        client = await r.accept()
        client.feed(connect())
        await settle()
        client.protocol.pause_writing()
        r.gateway.dial_gate.set()
        await settle()
        connected = r.first("up", "connected")
        assert connected is not None and r.first("up", "pause_reading", after=connected) is not None, r.log


async def test_broker_backpressure_does_not_resume_a_client_the_session_paused():
    # Waiting for CONNACK (reading_paused): the broker's pause and resume must leave the client paused.
    async with rig() as r:
        client = await r.accept()
        client.feed(connect())
        await settle()
        mark = len(r.log)
        r.up.protocol.pause_writing()
        r.up.protocol.resume_writing()
        assert "resume_reading" not in [e[1] for e in r.log[mark:] if e[0] == "client"], r.log[mark:]
        r.up.feed(connack())
        assert r.first("client", "resume_reading", after=mark) is not None


# --------------------------------------------------------------------------- shared buffers


async def test_unsent_data_never_changes_under_a_transport():
    # Both transports report unsent data (a slow socket): whatever they were handed must not be
    # a view of a receive buffer the next read overwrites.
    async with rig() as r:
        client = await open_pair(r, MQTT_311, buffered=4096)
        r.up.buffered = 4096
        for i in range(3):
            r.up.feed(publish("devices/thermo-1/telemetry", payload=bytes([0x41 + i]) * 50) * 4)
            client.feed(publish("devices/thermo-1/telemetry", payload=bytes([0x61 + i]) * 50) * 4)
        for t in (client, r.up):
            changed = [snap for obj, snap in t.held if bytes(obj) != snap]
            assert not changed, f"{t.side}: data handed to the transport changed after the write"
        assert r.types("client").count(T.PUBLISH) == 12 and r.types("up").count(T.PUBLISH) == 12


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
async def test_revoked_will_ends_the_connection_at_once(level):
    # The broker publishes a Will it holds whenever it ends the connection itself (a session
    # takeover, an error it sees), so a Will that is no longer allowed may not stay there: the
    # change closes the connection, and the DISCONNECT that discards the Will goes first.
    async with rig() as r:
        await open_pair(r, level, will=WILL)
        r.facts.put(REVOKED)
        await settle()
        assert_will_discarded_before_upstream_end(r, level)
        end = r.first("client", "close", "abort", "write_eof")
        assert end is not None, r.log
        if level == MQTT_5:
            disc = [(i, f) for i, f in r.packets("client") if f.type == T.DISCONNECT]
            assert disc and disconnect_reason(disc[0][1], MQTT_5) == Reason.NOT_AUTHORIZED
            assert disc[0][0] < end
