"""The guard's decision, without I/O: which recorded subscriptions to withdraw."""

from __future__ import annotations

from proxy.http.subscription_guard import revocations

IDENT = {"kind": "user", "sub": "sub-carol", "username": "carol"}


def rec(sub_id, *entities, identity=IDENT, unrestricted=False, service=""):
    return {"id": sub_id, "service": service, "owner_sub": "x", "entities": tuple(entities),
            "identity": identity, "unrestricted": unrestricted}


RECORDS = [rec("ok", "a"), rec("lost", "a", "b"), rec("other-tenant", "b", service="t"),
           rec("everything", unrestricted=True), rec("legacy", "b", identity=None)]


def readable(*ids):
    calls = []

    def still_allowed(record, entity):
        calls.append((record["id"], entity))
        return entity in ids
    return still_allowed, calls


def test_a_subscription_goes_when_any_subject_entity_is_no_longer_readable():
    decide, _ = readable("a")
    assert revocations(RECORDS, decide) == [("", "lost"), ("t", "other-tenant")]


def test_unrestricted_and_legacy_records_are_never_checked():
    decide, calls = readable()
    assert ("", "everything") not in revocations(RECORDS, decide)
    assert not {c[0] for c in calls} & {"everything", "legacy"}


def test_changed_devices_narrow_the_work():
    decide, calls = readable("b")
    assert revocations(RECORDS, decide, devices={"a"}) == [("", "ok"), ("", "lost")]
    assert {c[0] for c in calls} == {"ok", "lost"}
    assert revocations(RECORDS, decide, devices=set()) == []


def test_nothing_to_withdraw_when_access_holds():
    decide, _ = readable("a", "b")
    assert revocations(RECORDS, decide) == []
