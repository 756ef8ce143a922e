"""The HTTP gateway's audit records are written by the body's key (issue 18): AuditLog makes a
record's bounded JSON body once per key, and a record whose key it has seen costs no look at its
fields. That is only right while the key holds every field the body is made of: these tests
write random runs of records both ways, by key and field by field, and require the same lines.
A field left out of ``audit_record``'s key (or one added to the record and not to the key) makes
two records with one key and different bodies, and the runs differ."""

from __future__ import annotations

import gc
import io
import itertools
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.audit import AuditLog
from proxy.http.gateway import audit_record
from proxy.identity.model import Identity

ALICE = Identity(kind="user", sub="sub-alice", username="alice", method="token", roles=frozenset({"r"}))
# Equal to ALICE (claims and credential are not compared) and written alike.
ALICE_AGAIN = Identity(kind="user", sub="sub-alice", username="alice", method="token", roles=frozenset({"r"}),
                       claims=(("jti", "other"),), credential="x")
ALICE_VIA_APP = Identity(kind="user", sub="sub-alice", username="alice", method="token", azp="app")
BOB = Identity(kind="service", sub="sub-bob", username="bob", method="token")

_ABSENT = object()

AUDITS = st.fixed_dictionaries({
    "path": st.sampled_from(["/v2/entities/a", "/v2/entities/b"]),
    "decision": st.sampled_from(["allow", "deny", "error"]),
    "identity": st.sampled_from([None, ALICE, ALICE_AGAIN, ALICE_VIA_APP, BOB]),
    "rule": st.sampled_from([None, "owner", "delegated"]),
    "reason": st.sampled_from(["", "owner", "no rule matched"]),
    "devices": st.sampled_from([(), ("a",), ("a", "b"), ["a"]]),
    "upstream_status": st.sampled_from([None, 200, 201]),
    "subscription": st.sampled_from([_ABSENT, "sub-1", "sub-2"]),
})
REQUESTS = st.tuples(AUDITS, st.sampled_from(["GET", "PATCH"]), st.sampled_from([200, 403, 499]),
                     st.sampled_from([0.0, 1.25, 2.5, float("inf")]), st.sampled_from([None, "127.0.0.1", "10.0.0.9"]))


def _records(run: list) -> tuple[list[dict], list[tuple]]:
    records, keys = [], []
    for audit, method, status, latency, remote in run:
        audit = dict(audit)
        if audit["subscription"] is _ABSENT:
            del audit["subscription"]
        record, key = audit_record(method, audit, status, latency, remote)
        records.append(record)
        keys.append(key)
    return records, keys


def _written(run: list, *, keyed: bool, fold_seconds: float, batch: int) -> str:
    stream = io.StringIO()
    ticks = itertools.count()
    log = AuditLog(stream, fold_seconds=fold_seconds, clock=lambda: 1_700_000_000 + next(ticks) / 8,
                   monotonic=lambda: 0.0)
    records, keys = _records(run)
    for start in range(0, len(records), batch):
        log.record_many(records[start:start + batch], keys[start:start + batch] if keyed else None)
    log.close()
    return stream.getvalue()


@settings(max_examples=300, deadline=None)
@given(st.lists(REQUESTS, min_size=1, max_size=40), st.sampled_from([0.0, 30.0]), st.integers(1, 5))
def test_records_written_by_key_are_the_lines_written_field_by_field(run, fold_seconds, batch):
    assert _written(run, keyed=True, fold_seconds=fold_seconds, batch=batch) == \
        _written(run, keyed=False, fold_seconds=fold_seconds, batch=batch)


def test_each_field_of_the_record_is_in_its_key():
    """Named outright as well: changing any one field of the request changes the key."""
    base = {"path": "/v2/entities/a", "decision": "allow", "identity": ALICE, "rule": "owner", "reason": "owner",
            "devices": ("a",), "upstream_status": 200, "subscription": "sub-1"}
    record, key = audit_record("GET", base, 200, 1.0, "127.0.0.1")
    other = {"path": "/v2/entities/b", "decision": "deny", "identity": BOB, "rule": "delegated",
             "reason": "no rule matched", "devices": ("b",), "upstream_status": 201, "subscription": "sub-2"}
    for name in base:
        changed = dict(base, **{name: other[name]})
        assert audit_record("GET", changed, 200, 1.0, "127.0.0.1")[1] != key, name
    without = dict(base)
    del without["subscription"]
    assert audit_record("GET", without, 200, 1.0, "127.0.0.1")[1] != key
    assert audit_record("PATCH", base, 200, 1.0, "127.0.0.1")[1] != key
    assert audit_record("GET", base, 403, 1.0, "127.0.0.1")[1] != key
    assert audit_record("GET", base, 200, 1.0, "10.0.0.9")[1] != key
    assert audit_record("GET", base, 200, 9.0, "127.0.0.1")[1] == key   # the latency is the line's tail
    assert set(record) == {"protocol", "action", "resource", "decision", "identity", "rule", "reason", "devices",
                           "status", "upstream_status", "latency_ms", "remote", "subscription"}


def test_large_records_are_not_kept_by_their_key():
    """The attack (s30): a denied batch names every id it held (devices), and the audit log kept each
    record's body under a key holding all of those strings (by the caller's key, and field by field by
    _body_key): 1,024 of them. A signed-in caller sending distinct 1 MiB batches of 3,700 ids of 256
    characters, each refused, made the log hold 1.2 MB a record, 1.2 GB for 1,024 records. A record
    whose strings are longer than a whole line may be (max_record_bytes) is written and forgotten."""
    log = AuditLog(io.StringIO())
    tracemalloc.start()
    try:
        for n in range(16):
            ids = tuple(f"{n:04d}-{i:05d}-" + "x" * 244 for i in range(2000))
            audit = {"path": "/v2/op/update", "decision": "deny", "identity": BOB, "rule": None,
                     "reason": f"{ids[0]}: not yours", "devices": ids, "upstream_status": None}
            for keyed in (True, False):
                record, key = audit_record("POST", audit, 403, 1.0, "10.0.0.9")
                log.record_many([record], [key] if keyed else None)
            del ids, audit, record, key
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 1_000_000, held   # 16 records of 2,000 ids: 10 MB kept
