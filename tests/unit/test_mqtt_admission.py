"""The per-address admission of unauthenticated connections (sans-IO, on a fake clock)."""

from __future__ import annotations

from proxy.mqtt.admission import PER_ADDRESS, RATE, AddressLimiter, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(per_address=3, rate=0.0, burst=1, max_entries=1000, clock=None) -> AddressLimiter:
    return AddressLimiter(per_address, rate, burst, max_entries=max_entries, clock=clock or Clock())


def test_cap_on_connections_held_at_once():
    lim = limiter(per_address=3)
    assert [lim.admit("198.51.100.1")[0] for _ in range(3)] == [None] * 3
    assert lim.admit("198.51.100.1")[0] == PER_ADDRESS
    assert lim.admit("198.51.100.2")[0] is None  # another address has its own places
    lim.release("198.51.100.1")  # one authenticated (or went away)
    assert lim.admit("198.51.100.1")[0] is None
    assert lim.held("198.51.100.1") == 3


def test_token_bucket_of_new_connections():
    clock = Clock()
    lim = limiter(per_address=0, rate=2.0, burst=4, clock=clock)
    got = [lim.admit("198.51.100.1")[0] for _ in range(6)]
    assert got == [None] * 4 + [RATE] * 2
    for _ in range(4):
        lim.release("198.51.100.1")  # closing connections buys no new tokens
    assert lim.admit("198.51.100.1")[0] == RATE
    clock.now += 0.5  # one token at 2 per second
    assert lim.admit("198.51.100.1")[0] is None
    assert lim.admit("198.51.100.1")[0] == RATE


def test_zero_turns_each_limit_off():
    lim = limiter(per_address=0, rate=0.0)
    assert not lim.enabled
    assert all(lim.admit("198.51.100.1")[0] is None for _ in range(10_000))
    only_rate = limiter(per_address=0, rate=1.0, burst=2)
    assert only_rate.enabled and [only_rate.admit("a")[0] for _ in range(3)] == [None, None, RATE]


def test_refusals_are_reported_once_a_second_with_a_count_and_none_is_lost():
    clock = Clock()
    lim = limiter(per_address=1, clock=clock)
    assert lim.admit("198.51.100.1") == (None, 0)
    assert lim.admit("198.51.100.1") == (PER_ADDRESS, 1)   # the first: audit now
    assert [lim.admit("198.51.100.1") for _ in range(5)] == [(PER_ADDRESS, 0)] * 5  # folded
    assert lim.reports_pending and lim.due_reports() == []  # not due yet
    clock.now += 1.0
    assert lim.due_reports() == [("198.51.100.1", {PER_ADDRESS: 5})]
    assert not lim.reports_pending
    clock.now += 0.2
    lim.admit("198.51.100.1")  # within a second of the last report: folded again
    assert lim.due_reports(everything=True) == [("198.51.100.1", {PER_ADDRESS: 1})]  # at shutdown


def test_idle_entries_are_dropped():
    """An address that holds nothing, owes no report and has a full bucket leaves no entry;
    one whose bucket is still refilling is kept (forgetting it would hand out a fresh bucket)."""
    plain = limiter(per_address=2)
    plain.admit("198.51.100.1")
    plain.release("198.51.100.1")
    assert len(plain) == 0
    clock = Clock()
    lim = limiter(per_address=0, rate=1.0, burst=1, max_entries=2, clock=clock)
    lim.admit("198.51.100.1")
    lim.release("198.51.100.1")
    clock.now += 5.0                 # .1 has refilled; .2 has not, below
    lim.admit("198.51.100.2")
    lim.release("198.51.100.2")
    assert len(lim) == 2
    assert lim.admit("198.51.100.3")[0] is None  # the table is full: .1 is swept, .2 kept
    assert len(lim) == 2
    assert lim.admit("198.51.100.2")[0] == RATE


def test_the_table_stays_bounded_under_a_flood_of_addresses():
    """100,000 addresses (an IPv6 flood) against a table of 1,000: never more than 1,000 entries;
    those holding connections are kept, and refusals of evicted entries still get reported."""
    clock = Clock()
    lim = limiter(per_address=1, rate=1.0, burst=1, max_entries=1000, clock=clock)
    holders = [f"10.0.{i // 256}.{i % 256}" for i in range(50)]
    for h in holders:
        assert lim.admit(h)[0] is None
    lim.admit("10.9.9.9")
    lim.release("10.9.9.9")
    assert lim.admit("10.9.9.9") == (RATE, 1)   # reported at once
    assert lim.admit("10.9.9.9") == (RATE, 0)   # folded; the entry holds nothing: it may be evicted
    clock.now += 0.001
    peak = 0
    for i in range(100_000):
        key = f"2001:db8:{i // 65536:x}:{i % 65536:x}::/64"
        assert lim.admit(key)[0] is None
        lim.release(key)            # gone at once, but its bucket is still empty: kept for a while
        peak = max(peak, len(lim))
    assert peak <= 1000
    assert all(lim.held(h) == 1 for h in holders)
    assert ("10.9.9.9", {RATE: 1}) in lim.due_reports(everything=True)


def test_address_keys():
    assert address_key("198.51.100.7") == "198.51.100.7"
    assert address_key("::ffff:198.51.100.7") == "198.51.100.7"
    # One /64 is one host or one subscriber line.
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("fe80::1%eth0") == "fe80::/64"


# --------------------------------------------------------------------------- reconnect penalty


def test_reconnect_penalty_doubles_to_its_maximum_and_starts_again_after_quiet():
    from proxy.mqtt.admission import ReconnectPenalty

    now = [100.0]
    p = ReconnectPenalty(1.0, 8.0, clock=lambda: now[0])
    assert p.refused("k") == (False, 0)
    delays = []
    for _ in range(6):
        delays.append(p.penalize("k"))
        now[0] += delays[-1]  # comes back as soon as it may, floods again
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    now[0] += 2 * 8.0 + 1  # quiet for twice the maximum after its back-off: forgiven
    assert p.penalize("k") == 1.0


def test_reconnect_penalty_refuses_within_the_back_off_and_folds_the_audit():
    from proxy.mqtt.admission import ReconnectPenalty

    now = [0.0]
    p = ReconnectPenalty(10.0, 60.0, clock=lambda: now[0])
    p.penalize("k")
    assert p.refused("k") == (True, 1)  # the first is audited at once
    assert [p.refused("k") for _ in range(99)] == [(True, 0)] * 99  # folded
    assert p.reports_pending and p.due_reports(everything=True) == [("k", 99)]
    now[0] = 10.0
    assert p.refused("k") == (False, 0) and p.refused("other") == (False, 0)
    assert ReconnectPenalty(1.0, 0.0).penalize("k") == 0.0  # 0: off


def test_reconnect_penalty_table_is_bounded():
    from proxy.mqtt.admission import ReconnectPenalty

    p = ReconnectPenalty(1.0, 60.0, max_entries=100)
    for i in range(1000):
        p.penalize(f"k{i}")
    assert len(p) <= 100
    assert p.refused("k999")[0]  # the newest are kept
