"""The supervisor's view of its workers' metrics and readiness (proxy/worker_metrics.py), without processes."""

from __future__ import annotations

from proxy.worker_metrics import host_readiness, merge, render

ONE = """# HELP keygate_mqtt_connections_total Accepted MQTT client connections
# TYPE keygate_mqtt_connections_total counter
keygate_mqtt_connections_total{transport="tcp"} 3.0
# HELP keygate_policy_info The policy set in force
# TYPE keygate_policy_info gauge
keygate_policy_info{hash="aaaa"} 1.0
"""
TWO = ONE.replace(" 3.0", " 5.0").replace('"aaaa"', '"bbbb"')


def test_each_family_once_with_every_workers_samples_labelled():
    text = render(merge({2: TWO, 1: ONE})).decode()
    assert text.count("# TYPE keygate_mqtt_connections_total counter") == 1
    assert 'keygate_mqtt_connections_total{transport="tcp",worker="1"} 3.0' in text
    assert 'keygate_mqtt_connections_total{transport="tcp",worker="2"} 5.0' in text
    assert 'keygate_policy_info{hash="bbbb",worker="2"} 1.0' in text
    # a worker cannot pass itself off as another: its own "worker" label is overwritten
    forged = ONE.replace('{transport="tcp"}', '{transport="tcp",worker="2"}')
    text = render(merge({1: forged})).decode()
    assert 'worker="1"' in text and 'worker="2"' not in text


def _ready(digest: str) -> tuple[int, dict]:
    return 200, {"status": "ready", "checks": {"store": "ok"}, "policies": {"digest": digest}}


def test_ready_only_when_every_worker_is_reached_ready_and_on_one_policy_set():
    assert host_readiness({1: _ready("aaaa"), 2: _ready("aaaa")})[0] is True
    ready, body = host_readiness({1: _ready("aaaa"), 2: None})
    assert not ready and body["checks"]["worker 2"] == "not reached"
    ready, body = host_readiness({1: _ready("aaaa"),
                                  2: (503, {"checks": {"store": "ok", "change feed": "not ready: silent"}})})
    assert not ready and body["checks"]["worker 2"] == "not ready: change feed"
    ready, body = host_readiness({1: _ready("aaaa"), 2: _ready("bbbb")})
    assert not ready and "different policy sets: aaaa, bbbb" in body["checks"]["policies"]
