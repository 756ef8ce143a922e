"""Persistent broker sessions per identity and the subscriptions they keep charged."""

from __future__ import annotations

from proxy.config import MqttLimitsConfig
from proxy.mqtt import codec
from proxy.mqtt.packets import MQTT_5, MQTT_311, Prop, get_prop
from proxy.mqtt.persistent import PersistentSessions
from proxy.mqtt.subscriptions import SubscriptionQuota
from tests.unit.test_mqtt_session import ALICE, connect_packet, make, only


def registry(per_identity=3, expiry=100.0):
    now = [0.0]
    quota = SubscriptionQuota(10)
    return PersistentSessions(per_identity, expiry, quota, clock=lambda: now[0]), quota, now


def closing(reg, sub, cid, filters, expiry, *, clean=False, admit_expiry=None):
    """One whole connection: admitted, reaches the broker, closes."""
    h = reg.admit(sub, cid, clean_start=clean, expiry=expiry if admit_expiry is None else admit_expiry)
    assert h is not None
    reg.reached(h)
    reg.closed(h, filters, expiry)
    return h


def test_cycling_client_ids_is_capped_per_identity():
    reg, _, _ = registry()
    for i in range(3):
        closing(reg, "alice", f"c{i}", [], 100)
    assert not reg.admit("alice", "c3", clean_start=False, expiry=100)  # a fourth: refused
    assert reg.admit("alice", "c0", clean_start=False, expiry=100)  # resuming one: fine
    assert reg.admit("alice", "c9", clean_start=True, expiry=0)  # not persistent: not counted
    assert reg.admit("bob", "b0", clean_start=False, expiry=100)  # per identity
    assert reg.of("alice") == 3


def test_parked_filters_stay_charged_until_expiry_or_clean_start():
    reg, quota, now = registry()
    closing(reg, "alice", "c0", ["a", "b", "c"], 100)
    assert quota.held("alice") == 3  # the broker keeps them: so does the count
    closing(reg, "alice", "c0", ["c", "d"], 100)  # the union: a, b, c, d
    assert quota.held("alice") == 4
    h = reg.admit("alice", "c0", clean_start=True, expiry=100)  # the broker starts afresh once it gets it
    assert h is not None and quota.held("alice") == 4
    reg.reached(h)  # it reached the broker, alone: what was parked is gone
    assert quota.held("alice") == 0
    reg.closed(h, ["x"], 100)
    assert quota.held("alice") == 1
    h = reg.admit("alice", "c0", clean_start=True, expiry=100)
    assert h is not None
    reg.closed(h, [], 100)  # it never reached the broker (the dial was aborted): x is still there
    assert quota.held("alice") == 1
    now[0] = 101.0  # expired at the broker
    assert reg.of("alice") == 0 and quota.held("alice") == 0
    closing(reg, "alice", "c1", ["y"], 100)
    reg.forget("c1")  # the gateway cleared it
    assert quota.held("alice") == 0 and len(reg) == 0


def test_a_charge_may_exceed_the_quota_and_blocks_new_subscriptions():
    reg, quota, _ = registry()
    closing(reg, "alice", "c0", [str(i) for i in range(12)], 100)
    assert quota.held("alice") == 12 and not quota.acquire("alice")


def test_session_caps_the_session_expiry_it_asks_the_broker_for():
    limits = MqttLimitsConfig(persistent_session_expiry_seconds=60)
    asked = []
    s, _, _ = make(MQTT_5, limits=limits)
    s.admit_connect = lambda *a: asked.append(a) or None
    s.client_data(connect_packet(MQTT_5, "c", props=[(Prop.SESSION_EXPIRY_INTERVAL, 0xFFFFFFFF)]))
    acts = s.authenticated(ALICE)
    up = codec.decode_connect(only(acts.to_broker, codec.PacketType.CONNECT).body)
    assert get_prop(up.properties, Prop.SESSION_EXPIRY_INTERVAL) == 60 and s.session_expiry == 60
    assert asked[0][1:] == (s.upstream_client_id, True, 60)


def test_session_refuses_a_connect_the_shell_does_not_admit():
    for level, code in ((MQTT_5, 0x97), (MQTT_311, 3)):
        s, _, _audit = make(level)
        s.admit_connect = lambda *a: "persistent_sessions_per_identity"
        s.client_data(connect_packet(level, "c", clean=False))
        acts = s.authenticated(ALICE)
        assert codec.decode_connack(only(acts.to_client, codec.PacketType.CONNACK).body, level).reason == code
        assert acts.close.reason == "persistent_sessions_per_identity" and not acts.to_broker


def test_a_longer_expiry_at_disconnect_is_capped_upstream():
    from tests.unit.test_mqtt_session import open_session

    limits = MqttLimitsConfig(persistent_session_expiry_seconds=60)
    s, _, _ = open_session(MQTT_5, props=[(Prop.SESSION_EXPIRY_INTERVAL, 10)], limits=limits)
    acts = s.client_data(codec.encode_disconnect(MQTT_5, 0, [(Prop.SESSION_EXPIRY_INTERVAL, 0xFFFFFFFF)]))
    d = codec.decode_disconnect(only(acts.to_broker, codec.PacketType.DISCONNECT).body, MQTT_5)
    assert get_prop(d.properties, Prop.SESSION_EXPIRY_INTERVAL) == 60 and s.session_expiry == 60
    s, _, _ = open_session(MQTT_5, props=[(Prop.SESSION_EXPIRY_INTERVAL, 10)], limits=limits)
    raw = codec.encode_disconnect(MQTT_5, 0, [(Prop.SESSION_EXPIRY_INTERVAL, 30)])
    acts = s.client_data(raw)
    assert b"".join(bytes(x) for x in acts.to_broker) == raw and s.session_expiry == 30


def test_a_clean_start_takeover_keeps_the_session_counted():
    """The attack: c1 (expiry 1 s) taken over by c2 (clean start, long expiry); c1's late close
    must not start the record's expiry while c2 is live, nor c2's close find nothing to charge."""
    reg, quota, now = registry(per_identity=1)
    h1 = reg.admit("alice", "z", clean_start=False, expiry=1)
    h2 = reg.admit("alice", "z", clean_start=True, expiry=100)
    assert h1 is not None and h2 is not None
    reg.reached(h2)
    reg.closed(h1, [], 1)  # kicked by the broker
    now[0] = 2.0
    assert reg.of("alice") == 1  # c2 is live: its session exists
    assert reg.admit("alice", "other", clean_start=False, expiry=100) is None
    reg.closed(h2, ["t/1", "t/2"], 100)
    assert reg.of("alice") == 1 and quota.held("alice") == 2
    reg.closed(h2, ["t/1", "t/2"], 100)  # a second report of the same close: counted once
    assert quota.held("alice") == 2
    now[0] = 103.0
    assert reg.of("alice") == 0 and quota.held("alice") == 0


def test_a_close_whose_record_is_gone_is_charged_anyway():
    reg, quota, _ = registry()
    h1 = reg.admit("alice", "z", clean_start=False, expiry=100)
    assert h1 is not None
    h1.sent = True  # (its CONNECT went to the broker: the shell says so once the broker connection is up)
    reg.forget("z")  # (a clear racing the connection)
    reg.closed(h1, ["a"], 100)
    assert reg.of("alice") == 1 and quota.held("alice") == 1


class _Broker:
    """What Mosquitto keeps: one session per client id, taken over by each CONNECT it processes."""

    def __init__(self):
        self.sessions = {}  # cid -> dict(filters=set, owner=conn or None, until=float)

    def live(self, now):
        for cid, s in list(self.sessions.items()):
            if s["owner"] is None and s["until"] <= now:
                del self.sessions[cid]
        return self.sessions


def _run_interleaving(rng, per_identity):
    reg, quota, clock = registry(per_identity=per_identity, expiry=50.0)
    broker = _Broker()
    conns = []  # dicts: cid, handle, expiry, reached, closed, kicked, filters
    for _ in range(40):
        now = clock[0]
        step = rng.random()
        open_conns = [c for c in conns if not c["closed"]]
        if step < 0.3 or not open_conns:
            cid, clean = rng.choice("abc"), rng.random() < 0.5
            expiry = rng.choice((0, 1, 10, 50))
            h = reg.admit("alice", cid, clean_start=clean, expiry=expiry)
            if h is not None:
                conns.append({"cid": cid, "h": h, "clean": clean, "expiry": expiry, "reached": False,
                              "closed": False, "kicked": False, "filters": []})
        elif step < 0.5:  # the broker processes one pending CONNECT (in any order)
            pending = [c for c in open_conns if not c["reached"]]
            if pending:
                c = rng.choice(pending)
                c["reached"] = True
                s = broker.live(now).get(c["cid"])
                if s is not None and s["owner"] is not None:
                    s["owner"]["kicked"] = True
                if s is None or c["clean"]:
                    s = broker.sessions[c["cid"]] = {"filters": set(), "owner": None, "until": 0.0}
                s["owner"] = c
                reg.reached(c["h"])  # (the shell, at the CONNACK)
        elif step < 0.7:
            c = rng.choice(open_conns)
            if c["reached"] and not c["kicked"]:
                f = rng.choice("wxyz")
                c["filters"].append(f)
                broker.sessions[c["cid"]]["filters"].add(f)
        elif step < 0.9:
            c = rng.choice(open_conns)
            c["closed"] = True
            expiry = rng.choice((0, c["expiry"])) if c["expiry"] else 0  # v5: 0 at CONNECT stays 0
            reg.closed(c["h"], c["filters"], expiry)
            s = broker.sessions.get(c["cid"])
            if s is not None and s["owner"] is c:
                s["owner"] = None
                s["until"] = now + expiry
                if expiry == 0:
                    del broker.sessions[c["cid"]]
        else:
            clock[0] += rng.choice((0.5, 1, 5, 20, 60))
        # The oracle: every session the broker may hold past its connection is counted, with
        # the filters it keeps (the live owner's own are charged by its connection).
        now = clock[0]
        counted = reg._by_sub.get("alice", set())
        reg.of("alice")
        for cid, s in broker.live(now).items():
            owner = s["owner"]
            # (filters of the id's connections still open at the gateway are charged by them)
            open_filters = {f for c in conns if c["cid"] == cid and not c["closed"] for f in c["filters"]}
            parked = s["filters"] - open_filters
            if owner is None or owner["expiry"] > 0 or parked:
                assert cid in reg._by_sub.get("alice", set()), (cid, s, counted)
                assert parked <= reg._records[cid].filters, (cid, s)
        assert quota.held("alice") == sum(len(r.filters) for r in reg._records.values())


def test_random_admit_close_interleavings_never_undercount_the_broker():
    import random

    for seed in range(400):
        _run_interleaving(random.Random(seed), per_identity=rng_cap(seed))


def rng_cap(seed):
    return 1 + seed % 3


def test_a_disconnect_with_will_gets_its_expiry_capped_too():
    """Attack (final review): a v5 DISCONNECT 0x04 (publish the Will) passed through unchanged, so a
    Session Expiry of 0xFFFFFFFF on it reached the broker uncapped while the gateway went on
    counting the CONNECT's 1 s: never-expiring sessions beyond the cap. Now it is capped like any
    DISCONNECT; the Will is still published (0x04 kept) when allowed, and discarded when not."""
    from proxy.mqtt.packets import Reason, Will
    from tests.unit.test_mqtt_session import FakePolicies

    limits = MqttLimitsConfig(persistent_session_expiry_seconds=60)
    will = Will("devices/thermo-1/status", b"gone", 0, False)
    for allowed, reason in ((["devices/thermo-1/#"], Reason.DISCONNECT_WITH_WILL), ([], 0)):
        p = FakePolicies(pub=["devices/thermo-1/#"])
        s, _, _ = make(MQTT_5, p, limits=limits)
        s.client_data(connect_packet(MQTT_5, "c", will=will, clean=False,
                                     props=[(Prop.SESSION_EXPIRY_INTERVAL, 1)]))
        s.authenticated(ALICE)
        s.broker_data(codec.encode_connack(False, 0, MQTT_5))
        p.pub = list(allowed)  # asked again at the DISCONNECT (an invalidate would end the connection first)
        acts = s.client_data(codec.encode_disconnect(MQTT_5, Reason.DISCONNECT_WITH_WILL,
                                                     [(Prop.SESSION_EXPIRY_INTERVAL, 0xFFFFFFFF)]))
        d = codec.decode_disconnect(only(acts.to_broker, codec.PacketType.DISCONNECT).body, MQTT_5)
        assert d.reason == reason
        assert get_prop(d.properties, Prop.SESSION_EXPIRY_INTERVAL) == 60 and s.session_expiry == 60


def test_a_connection_whose_broker_dial_failed_leaves_nothing_counted():
    """Attack (final review): with the broker down, persistent CONNECTs answered 0x88 were still
    counted for the whole expiry, so after an outage the identity's new persistent client ids were
    refused 0x97 for up to persistent_session_expiry_seconds. The broker never saw them."""
    reg, quota, _ = registry(per_identity=2)
    for cid in ("p0", "p1"):
        h = reg.admit("alice", cid, clean_start=False, expiry=100)
        assert h is not None
        reg.closed(h, [], 100)  # the dial failed: never sent
    assert reg.of("alice") == 0 and quota.held("alice") == 0
    h = reg.admit("alice", "p2", clean_start=False, expiry=100)
    assert h is not None
    h.sent = True  # this one's CONNECT went to the broker: counted, reached or not
    reg.closed(h, [], 100)
    assert reg.of("alice") == 1
