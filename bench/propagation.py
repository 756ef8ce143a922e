"""The propagation scenario of ``python -m bench`` (issue 17): two cases.

* ``3 gateways, MQTT deliveries``: PostgreSQL and three ``keygate serve`` (bench/propagation_stack.py)
  in front of the benchmark's Mosquitto; revocations through A while the grantee's subscribers on
  B and C receive a device's steady stream (bench/propagation_load.py, which says what is measured
  and how a delivery in flight is counted). ``ok`` needs every revocation observed on both and no
  delivery of a message published after its gateway held the revocation, nor after the quiet window.
* ``service level, 3 processes``: bench/bench_propagation.py, the ownership services alone (no MQTT):
  the time until the last other process's facts hold the revocation.

Without PostgreSQL (no ``initdb``) both report "not run" instead of failing.
"""

from __future__ import annotations

import json
import subprocess

from bench.loadgen import run_load
from bench.propagation_stack import PropagationStack, postgres_missing
from bench.rows import Row
from bench.stack import PYTHON, REPO, Stack

CASES = ["3 gateways, MQTT deliveries", "service level, 3 processes"]


def propagation(stack: Stack, sz, case: str, mode: str, rep: int) -> Row:
    missing = postgres_missing()
    if missing:
        return Row("propagation", case, mode, rep, {}, True, f"not run: {missing}", {"not_run": True})
    if case == CASES[1]:
        return _service_level(sz, case, mode, rep)
    gateways = PropagationStack(stack)
    try:
        gateways.start()
        spec = {**gateways.spec(), "revocations": sz.propagation_revocations, "interval_s": 0.002}
        res = run_load("propagation_load", spec, timeout=sz.propagation_revocations * (spec["quiet_s"] + 25) + 120)
        trouble = gateways.exited() or gateways.tracebacks()
    except Exception as exc:
        return Row("propagation", case, mode, rep, {}, False, f"{type(exc).__name__}: {exc}")
    finally:
        gateways.stop()
    metrics: dict[str, float] = {}
    for group in ("last_delivery_ms", "last_delivery_from_sent_ms", "held_ms", "request_ms"):
        for q, v in (res.get(group) or {}).items():
            metrics[f"{group}_{q}"] = v
    for k in ("revocations", "observed", "in_flight", "after_commit", "after_held", "late", "resubscribed",
              "published", "publish_rate", "interval_ms", "quiet_s", "gateways"):
        if k in res:
            metrics[k] = res[k]
    ok = (bool(res.get("completed")) and res.get("after_held") == 0 and res.get("late") == 0 and not trouble)
    detail = res.get("error", "") or trouble
    if not ok and not detail:
        detail = (f"observed {res.get('observed')} of {res.get('revocations')} revocations, "
                  f"{res.get('after_held')} deliveries after held, {res.get('late')} late")
    return Row("propagation", case, mode, rep, metrics, ok, detail)


def _service_level(sz, case: str, mode: str, rep: int) -> Row:
    argv = [PYTHON, "-m", "bench.bench_propagation", "--json", "--revocations", str(sz.propagation_service_revocations)]
    try:
        out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
        res = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return Row("propagation", case, mode, rep, {}, False, f"bench_propagation: {exc}")
    metrics = {"held_ms_p50": res["p50_ms"], "held_ms_p99": res["p99_ms"], "held_ms_max": res["max_ms"],
               "revocations": res["revocations"], "gateways": res["gateways"]}
    return Row("propagation", case, mode, rep, metrics, True)
