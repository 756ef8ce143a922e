"""The HTTP gateway's latency tallies leave the histograms as observing each request would.

``LatencyTally`` counts a loop turn's latencies into buckets itself and adds them to the
prometheus histogram at the turn's end, through the histogram's private fields: these tests
hold it to ``Histogram.observe`` on the same amounts, so an upgrade of prometheus_client that
changes those fields, or an off-by-one in the bucket search, fails here.
"""

from __future__ import annotations

import asyncio
import io
import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from proxy.audit import AuditLog
from proxy.http.gateway import audit_record
from proxy.http.outcomes import LatencyTally, Outcomes
from proxy.identity.model import Identity

BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)

# Amounts on, just below and just above each bound, and anything else a clock difference gives.
_ON_BOUNDS = st.sampled_from(BUCKETS).flatmap(
    lambda b: st.sampled_from([b, math.nextafter(b, 0), math.nextafter(b, math.inf)]))
AMOUNTS = st.one_of(_ON_BOUNDS, st.floats(min_value=0, max_value=100, allow_nan=False), st.just(0.0),
                    st.just(math.inf))


class _MemoryAudit:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def record_many(self, records: list[dict], keys: list | None = None) -> None:
        assert keys is not None and len(keys) == len(records)
        self.records.extend(records)


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in registry.collect() for s in metric.samples if s.name.startswith(name)}


def _same(observed: dict[tuple, float], tallied: dict[tuple, float]) -> None:
    assert observed.keys() == tallied.keys()
    for key, value in observed.items():
        if key[0].endswith("_sum"):   # added per turn, not per amount: rounding may differ
            assert math.isclose(tallied[key], value, rel_tol=1e-9, abs_tol=1e-12), key
        elif not key[0].endswith("_created"):
            assert tallied[key] == value, key


@settings(max_examples=300, derandomize=True, deadline=None)
@given(turns=st.lists(st.lists(AMOUNTS, max_size=20), min_size=1, max_size=6))
def test_a_tally_leaves_the_histogram_as_observing_each_amount_does(turns):
    by_observe, by_tally = CollectorRegistry(), CollectorRegistry()
    observed = Histogram("lat", "", registry=by_observe, buckets=BUCKETS)
    tallied = Histogram("lat", "", registry=by_tally, buckets=BUCKETS)
    tally = LatencyTally(tallied)
    for turn in turns:
        for amount in turn:
            observed.observe(amount)
            tally.add(amount)
        tally.flush()
        _same(_samples(by_observe, "lat"), _samples(by_tally, "lat"))
    buckets = _samples(by_tally, "lat_bucket")
    assert buckets[("lat_bucket", (("le", "+Inf"),))] == sum(len(t) for t in turns)


def test_an_amount_on_a_bound_is_counted_in_that_bucket():
    registry = CollectorRegistry()
    histogram = Histogram("lat", "", registry=registry, buckets=BUCKETS)
    tally = LatencyTally(histogram)
    tally.add(0.001)
    tally.flush()
    buckets = _samples(registry, "lat_bucket")
    assert buckets[("lat_bucket", (("le", "0.0005"),))] == 0
    assert buckets[("lat_bucket", (("le", "0.001"),))] == 1


async def test_outcomes_reach_the_metrics_at_the_end_of_the_turn():
    registry = CollectorRegistry()
    requests = Counter("req", "", ["decision", "status"], registry=registry)
    latency = Histogram("lat", "", ["decision"], registry=registry, buckets=BUCKETS)
    upstream = Histogram("up", "", registry=registry, buckets=BUCKETS)
    audit = _MemoryAudit()
    outcomes = Outcomes(audit, requests, latency, upstream)
    for n in range(3):
        outcomes.upstream_answered(0.002)
        outcomes.add("allow", 200, 0.003, {"n": n}, ("n", n))
    outcomes.add("deny", 403, 0.0001, {"n": 3}, ("n", 3))
    outcomes.upstream_answered(0.04)   # a request still to end: its upstream latency is not held back
    await asyncio.sleep(0)   # the turn ends
    got = _samples(registry, "")
    assert got[("req_total", (("decision", "allow"), ("status", "200")))] == 3
    assert got[("req_total", (("decision", "deny"), ("status", "403")))] == 1
    assert got[("lat_count", (("decision", "allow"),))] == 3
    assert got[("lat_bucket", (("decision", "allow"), ("le", "0.005")))] == 3
    assert got[("lat_bucket", (("decision", "allow"), ("le", "0.0025")))] == 0
    assert got[("lat_count", (("decision", "deny"),))] == 1
    assert got[("up_count", ())] == 4
    assert got[("up_bucket", (("le", "0.05"),))] == 4
    assert got[("up_bucket", (("le", "0.025"),))] == 3
    assert [r["n"] for r in audit.records] == [0, 1, 2, 3]
    outcomes.flush()   # nothing new: nothing counted twice
    assert _samples(registry, "") == got


async def test_each_request_is_written_with_its_own_fields_through_outcomes():
    """The attack (s30): Outcomes.add took each record's audit key and then named its (decision,
    status) counter ``key`` too, so it handed the audit log the counter's key: every allowed 200 of a
    turn, and of every turn after while the body memo held it, was written as the first one was,
    with its identity, resource and devices (bob's read logged as alice's)."""
    registry = CollectorRegistry()
    requests = Counter("req", "", ["decision", "status"], registry=registry)
    latency = Histogram("lat", "", ["decision"], registry=registry, buckets=BUCKETS)
    upstream = Histogram("up", "", registry=registry, buckets=BUCKETS)
    stream = io.StringIO()
    outcomes = Outcomes(AuditLog(stream), requests, latency, upstream)
    users = [Identity(kind="user", sub=f"sub-{name}", username=name, method="token") for name in ("alice", "bob")]
    for user in users + users[::-1]:
        name = user.username
        audit = {"path": f"/v2/entities/{name}-thermo", "decision": "allow", "identity": user, "rule": "owner",
                 "reason": "owner", "devices": (f"{name}-thermo",), "upstream_status": 200}
        record, key = audit_record("GET", audit, 200, 1.5, f"10.0.0.{len(name)}")
        outcomes.add("allow", 200, 0.0015, record, key)
        outcomes.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["identity"]["username"], r["resource"], r["devices"], r["remote"]) for r in lines] == [
        ("alice", "/v2/entities/alice-thermo", ["alice-thermo"], "10.0.0.5"),
        ("bob", "/v2/entities/bob-thermo", ["bob-thermo"], "10.0.0.3"),
        ("bob", "/v2/entities/bob-thermo", ["bob-thermo"], "10.0.0.3"),
        ("alice", "/v2/entities/alice-thermo", ["alice-thermo"], "10.0.0.5"),
    ]
