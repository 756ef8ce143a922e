"""The SQLCipher store's change table (the local feed of ``keygate serve --workers N``).

Two connections to one file stand for two workers: a write through one is a foreign change for
the other, with the devices it touched; a process's own writes are not (its facts hold them).
"""

from __future__ import annotations

import pytest

from ownership import store as st

KEY = "changes-store-key"


@pytest.fixture
def two(tmp_path):
    """Two processes' stores on one file."""
    path = tmp_path / "ownership.db"
    one, other = st.Store.open(path, KEY), st.Store.open(path, KEY)
    yield one, other
    one.close()
    other.close()


def _device(device_id: str) -> dict:
    return {"id": device_id, "type": "Thermometer", "owner_sub": "alice-sub", "owner_username": "alice",
            "created_at": 1.0, "updated_at": 1.0}


def test_a_write_through_one_process_is_a_foreign_change_for_the_other(two):
    one, other = two
    start = other.last_change()
    one.insert_device(_device("d1"), {"k1": b"\x01" * 32, "k2": b"\x02" * 32}, max_devices=10)
    one.insert_delegation({"id": "g1", "device_id": "d1", "grantee_kind": "user", "grantee_id": "bob-sub",
                           "grantee_name": "bob", "permission": "read", "expires_at": None,
                           "granted_by": "alice-sub", "granted_by_username": "alice", "created_at": 2.0})
    one.delete_delegation("d1", "g1")
    last, devices, foreign = other.changes_since(start)
    assert (last, devices, foreign) == (start + 3, {"d1"}, True)
    assert one.changes_since(start) == (start + 3, set(), False)  # its own: nothing to apply
    seq, snapshot = other.load_all_at()
    assert seq == last and [d["id"] for d in snapshot["devices"]] == ["d1"]
    assert snapshot["delegations"] == []


def test_an_erasure_changes_everything_and_a_rolled_back_write_nothing(two):
    one, other = two
    one.insert_device(_device("d1"), {"k1": b"\x01" * 32, "k2": b"\x02" * 32}, max_devices=10)
    mark = other.last_change()
    try:
        one.insert_device(_device("d1"), {"k1": b"\x03" * 32, "k2": b"\x04" * 32}, max_devices=10)
    except st.DeviceExists:
        pass
    assert other.last_change() == mark  # the refused write left no change behind
    one.erase_user("alice-sub")
    assert other.changes_since(mark) == (mark + 1, None, True)


def test_a_policy_push_is_a_change_that_touches_no_device(two):
    pusher, worker = two
    # keygate policy push writes the file from its own process: the workers' poll must see it, or a
    # set pushed to withdraw a grant would wait for the next ownership write to be read.
    mark = worker.last_change()
    version = pusher.put_policy_set([("grants.yaml", "version: 1\nrules: []\n")], "0123456789abcdef", 3.0)
    assert worker.changes_since(mark) == (mark + 1, set(), True)
    assert worker.policy_set_version() == version


def test_a_change_number_rolled_back_and_given_out_again_is_the_other_process_s(two):
    # SQLite gives a rolled-back AUTOINCREMENT number out again: if the process whose write rolled back
    # kept it as "its own", it would skip the other worker's change that got it (a revocation, say).
    one, other = two
    one.insert_device(_device("d1"), {"k1": b"\x01" * 32, "k2": b"\x02" * 32}, max_devices=10)
    mark = one.last_change()
    with pytest.raises(RuntimeError), one.transaction() as c:
        one._changed(c, {"d1"})   # a write's change, then the write fails
        raise RuntimeError("the write failed after its change was numbered")
    other.insert_device(_device("d2"), {"k1": b"\x03" * 32, "k2": b"\x04" * 32}, max_devices=10)
    assert other.last_change() == mark + 1   # the same number again
    assert one.changes_since(mark) == (mark + 1, {"d2"}, True)
