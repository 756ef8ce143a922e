"""The audit record of a connection's allowed traffic: one summary at close (proxy/mqtt/audit_summary.py).

The counts must be exact also for what the fast path forwarded (it counts per chunk), the
decisions bounded per connection, and the record written once, whichever way the connection ends.
"""

from __future__ import annotations

from types import SimpleNamespace

from proxy.mqtt.audit_summary import MAX_KEYS, ConnectionSummary
from tests.unit.test_mqtt_session import open_session, pub


def summaries(audit) -> list[dict]:
    return [r for r in audit.records if r["action"] == "session" and r["decision"] == "summary"]


def test_fast_path_publishes_are_counted_exactly_in_the_close_summary():
    s, _, audit = open_session()
    ok, bad = pub("devices/thermo-1/telemetry"), pub("devices/thermo-2/telemetry")
    s.client_data(ok)        # the full path decides and caches
    s.client_data(ok * 100)  # the fast path forwards these
    s.client_data(bad)
    assert summaries(audit) == []  # nothing per allowed message
    s.client_closed()
    s.client_closed()        # once only
    [record] = summaries(audit)
    assert record["messages"] == {"published": 101, "delivered": 0}
    assert record["reason"] == "client_closed"
    assert record["identity"]["username"] == "alice"
    decided = {(d["kind"], d["topic"], d["decision"]): d["count"] for d in record["decisions"]}
    assert decided == {("publish", "devices/thermo-1/telemetry", "allow"): 1,
                       ("publish", "devices/thermo-2/telemetry", "deny"): 1}


def test_the_decisions_kept_are_bounded():
    summary = ConnectionSummary()
    allow = SimpleNamespace(allowed=True, rule="r")
    for i in range(MAX_KEYS + 10):
        summary.decided("publish", f"t/{i}", allow)
    summary.decided("publish", "t/0", allow)
    fields = summary.fields()
    assert len(fields["decisions"]) == MAX_KEYS
    assert fields["decisions_other"] == 10
    assert fields["decisions"][0] == {"kind": "publish", "topic": "t/0", "decision": "allow", "rule": "r",
                                      "count": 2}


def test_a_long_topic_is_kept_cut():
    summary = ConnectionSummary()
    summary.decided("subscribe", "x" * 10000, SimpleNamespace(allowed=False, rule=None))
    [d] = summary.fields()["decisions"]
    assert len(d["topic"]) == 256 and d["decision"] == "deny" and "rule" not in d


def test_a_qos2_publish_refused_at_its_release_is_not_counted_as_published():
    """A QoS 2 publish is held until its PUBREL and decided again then: 'published' counts what
    went to the broker, so one refused at its release is not in it, one released is."""
    from proxy.mqtt import codec
    from proxy.mqtt.packets import PacketType as T

    s, p, audit = open_session()
    s.client_data(pub("devices/thermo-1/cmd", qos=2, pid=9))
    s.client_data(codec.encode_ack(T.PUBREL, 9, 4))           # released: forwarded
    s.client_data(pub("devices/thermo-1/cmd", qos=2, pid=10))
    p.pub.clear()                                              # the grant ends before the PUBREL
    s.invalidate()
    s.client_data(codec.encode_ack(T.PUBREL, 10, 4))          # refused at release
    s.client_closed()
    [record] = summaries(audit)
    assert record["messages"] == {"published": 1, "delivered": 0}
