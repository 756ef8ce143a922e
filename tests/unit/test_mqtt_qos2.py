"""proxy.mqtt.qos2: the QoS 2 books keep the identity's shared byte budget exact, whatever
happens to a held publish (released, refused on retransmission, replaced by a DUP, or dropped
with the connection), so a connection can neither leak budget nor spend its neighbours'."""

from __future__ import annotations

from proxy.mqtt.qos2 import QOS2_HOLD_BYTES, Qos2Flows
from proxy.mqtt.subscriptions import SubscriptionQuota


def flows(budget_bytes: int = 1000) -> tuple[Qos2Flows, SubscriptionQuota]:
    budget = SubscriptionQuota(budget_bytes)
    return Qos2Flows(budget, max_packet_size=1024), budget


def test_held_publish_is_charged_and_given_back_when_taken():
    q, budget = flows()
    assert q.hold("alice", 1, b"x" * 100, "t", False)
    assert budget.held("alice") == 100 and q.held_bytes == 100
    assert q.take("alice", 1) == (b"x" * 100, "t", False)
    assert budget.held("alice") == 0 and q.held_bytes == 0
    assert q.take("alice", 1) is None  # a second PUBREL finds nothing


def test_a_retransmission_replaces_the_held_publish_without_charging_twice():
    q, budget = flows()
    assert q.hold("alice", 7, b"a" * 300, "t", False)
    assert q.hold("alice", 7, b"b" * 300, "t", True)
    assert budget.held("alice") == 300
    assert q.take("alice", 7) == (b"b" * 300, "t", True)


def test_the_identity_budget_is_shared_and_a_refusal_holds_nothing():
    q1, budget = flows(500)
    q2 = Qos2Flows(budget, max_packet_size=1024)
    assert q1.hold("alice", 1, b"x" * 400, "t", False)
    assert not q2.hold("alice", 1, b"y" * 200, "t", False)  # the other connection spent the budget
    assert q2.take("alice", 1) is None and q2.held_bytes == 0
    assert budget.held("alice") == 400
    assert q2.hold("bob", 1, b"y" * 200, "t", False)  # another identity's budget is its own


def test_the_connection_cap_is_at_least_one_packet():
    q = Qos2Flows(None, max_packet_size=QOS2_HOLD_BYTES * 2)
    assert q.hold(None, 1, b"x" * (QOS2_HOLD_BYTES * 2), "t", False)
    assert not q.hold(None, 2, b"x", "t", False)


def test_closing_gives_back_everything_held():
    q, budget = flows()
    for pid in (1, 2, 3):
        assert q.hold("alice", pid, b"x" * 100, "t", False)
    q.drop_all("alice")
    assert budget.held("alice") == 0 and q.held_bytes == 0 and q.take("alice", 1) is None
