"""The propagation scenario's part of docs/benchmarks.md (issue 17): its table, target and description."""

from __future__ import annotations

from bench.rows import Row

TARGET_MS = 1000.0
MQTT_CASE = "3 gateways, MQTT deliveries"


def _row(rows: list[Row], case: str) -> Row | None:
    return next((r for r in rows if r.scenario == "propagation" and r.case == case), None)


def _ms(r: Row, key: str) -> str:
    v = r.metrics.get(key)
    return f"{v:,.1f}" if isinstance(v, (int, float)) else "–"


def target(rows: list[Row]) -> tuple[str, str, str, str] | None:
    """(scenario, target, measured, verdict) for the issue-17 target, or None when the scenario did not run."""
    r = _row(rows, MQTT_CASE)
    if r is None:
        return None
    p99 = r.metrics.get("last_delivery_ms_p99")
    if r.extra.get("not_run") or p99 is None:
        return ("revocation through one of 3 gateways, last delivery on the others", "p99 ≤ 1 s",
                r.detail or "not measured", "not measured")
    met = r.ok and p99 <= TARGET_MS
    return ("revocation through one of 3 gateways, last delivery on the others", "p99 ≤ 1 s",
            f"p99 {p99:,.1f} ms (p50 {_ms(r, 'last_delivery_ms_p50')} ms, max {_ms(r, 'last_delivery_ms_max')} ms) "
            f"over {r.metrics.get('revocations', 0):.0f} revocations, "
            f"{r.metrics.get('after_held', 0):.0f} deliveries after held", "**met**" if met else "**not met**")


def table(rows: list[Row]) -> str:
    mine = [r for r in rows if r.scenario == "propagation"]
    if not mine:
        return ""
    lines = ["| case | revocations | from | p50 (ms) | p99 (ms) | max (ms) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in mine:
        if r.extra.get("not_run"):
            lines.append(f"| {r.case} | {r.detail} | | | | |")
            continue
        n = f"{r.metrics.get('revocations', 0):.0f}"
        if r.case == MQTT_CASE:
            for key, what in (("last_delivery_ms", "answer → last delivery, slowest of B and C"),
                              ("last_delivery_from_sent_ms", "request sent → last delivery, slowest"),
                              ("held_ms", "answer → /readyz holds it, slowest"),
                              ("request_ms", "request sent → answer (A's API)")):
                lines.append(f"| {r.case} | {n} | {what} | {_ms(r, key + '_p50')} | {_ms(r, key + '_p99')} | "
                             f"{_ms(r, key + '_max')} |")
        else:
            lines.append(f"| {r.case} | {n} | revocation → last other process's facts hold it | "
                         f"{_ms(r, 'held_ms_p50')} | {_ms(r, 'held_ms_p99')} | {_ms(r, 'held_ms_max')} |")
    out = ["\n".join(lines)]
    mqtt = _row(rows, MQTT_CASE)
    if mqtt is not None and not mqtt.extra.get("not_run") and mqtt.metrics:
        m = mqtt.metrics
        out += ["", "| deliveries on B and C, summed over the revocations | count |", "| --- | --- |",
                f"| in flight: published after the request was sent, before the answer | {m.get('in_flight', 0):.0f} |",
                f"| after the commit (published after the answer) while the gateway did not yet hold it "
                f"| {m.get('after_commit', 0):.0f} |",
                f"| **after held**: published after the gateway said it holds the revocation | "
                f"**{m.get('after_held', 0):.0f}** |",
                f"| late: after the {m.get('quiet_s', 0):g} s quiet window | {m.get('late', 0):.0f} |",
                "", f"The device published {m.get('published', 0):,.0f} messages "
                f"({m.get('publish_rate', 0):,.0f}/s, one every {m.get('interval_ms', 0):g} ms); "
                "the subscribers subscribed once, after the first grant, and had to resubscribe "
                f"{m.get('resubscribed', 0):.0f} times (a subscription outlives its revocation and is delivered "
                "again once re-granted)."]
    return "\n".join(out)


DESCRIPTION = (
    "PostgreSQL (Debian's, a cluster made with `initdb` in a temporary folder) and three `keygate serve` "
    "processes, A, B and C, over one database (`store.backend: postgres`, `feed_max_silence_seconds: 1`), "
    "each with its own MQTT, HTTPS and metrics listener in front of the one Mosquitto "
    "(`bench/propagation_stack.py`). The owner registers a device through A's ownership API and grants "
    "`read` to a grantee, whose subscribers (paho, MQTT 3.1.1 over TLS) hold the device's topic through B "
    "and through C; the device publishes through A every 2 ms, each payload its sequence number and send "
    "time. Each revocation goes through A's API; the time is counted from the moment the API answered "
    "(the commit is before it; from the moment the request was sent on the second line) until the last "
    "delivery on the slower of B and C, once neither has received anything for a quiet window of 1.5 s "
    "(longer than the feed's silence limit) while the device keeps publishing. Then the grant is made "
    "again and deliveries resume on both before the next revocation (`bench/propagation_load.py`). "
    "A delivery is counted by when its message was *published*: before the answer it was in flight "
    "at the commit; after the answer but before that gateway's `/readyz` said `change feed at N` "
    "(N the revocation's sequence number) it falls in the propagation window; after that it would be a "
    "gateway delivering what it had already revoked, which the run requires to be none. "
    "The service-level case is `bench/bench_propagation.py`: the ownership services of three processes "
    "alone, no MQTT, the time until the last other process's facts hold the revocation.")
