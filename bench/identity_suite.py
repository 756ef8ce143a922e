"""The identity scenario: the owners' micro-benchmarks, run in a child process.

Reuses ``measure()`` of :mod:`bench.bench_tokens` (token validation cached /
uncached), :mod:`bench.bench_ownership` (ownership lookup, device key check)
and :mod:`bench.bench_policy` (policy decisions) as they are, each in its own
child process (``python -m bench.identity_suite NAME SECONDS SIZE``) so that
neither the orchestrator nor a crash in one of them disturbs the rest. Every
figure becomes one row: µs per operation and operations per second.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import subprocess
import sys

from bench.rows import Row
from bench.stack import PYTHON, REPO

CASES = ["tokens", "ownership", "policy"]

# What each module's measure() is called with, by mode.
_ARGS = {
    "tokens": (lambda quick: {"seconds": 0.05 if quick else 0.5}),
    "ownership": (lambda quick: {"devices": 200 if quick else 2000, "seconds": 0.05 if quick else 0.5}),
    "policy": (lambda quick: {"seconds": 0.05 if quick else 0.25}),
}


def _figure(value):
    """A figure in µs: a number, or the first of (median, best) pairs."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return float(value) if isinstance(value, (int, float)) else None


def _policy_figures(mod, budget: float) -> dict[str, float]:
    """bench_policy offers its parts (build, cases, per_call_us) rather than one measure()."""
    out = {}
    for n in (10, 1000):
        engine = mod.build(n)
        for name, fn in mod.cases(engine).items():
            out[f"{name}, {n:,} rules, no cache"] = mod.per_call_us(fn, budget)
        cached = type(engine)(engine.source, engine.facts)
        for name, fn in mod.cases(cached).items():
            if name.startswith(("publish (device", "receive (owner", "subscribe devices/+", "http GET entity")):
                out[f"{name}, {n:,} rules, cached"] = mod.per_call_us(fn, budget)
    return out


def _measure(name: str, quick: bool) -> dict[str, float]:
    mod = importlib.import_module(f"bench.bench_{name}")
    wanted = _ARGS[name](quick)
    if not hasattr(mod, "measure") and name == "policy":
        return _policy_figures(mod, wanted["seconds"])
    params = inspect.signature(mod.measure).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    result = mod.measure(**kwargs)
    if inspect.iscoroutine(result):  # the async measure()s (tokens, ownership)
        result = asyncio.run(result)
    return {k: f for k, v in result.items() if k != "devices" and (f := _figure(v)) is not None}


def run(stack, sizes, case: str, rep: int):
    quick = sizes.quick_mode
    try:
        proc = subprocess.run([PYTHON, "-m", "bench.identity_suite", case, "quick" if quick else "full"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return [Row("identity", case, "keygate", rep, {}, False, "timed out")]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return [Row("identity", case, "keygate", rep, {}, False, f"bench_{case}: {tail[0][:300]}")]
    rows = []
    for op, us in json.loads(lines[-1]).items():
        rows.append(Row("identity", f"{case}: {op}", "keygate", rep,
                        {"us_per_op": float(us), "ops_per_s": 1e6 / us if us else float("nan")}, us == us))
    return rows or [Row("identity", case, "keygate", rep, {}, False, "no figures")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name, mode = argv[0], argv[1]
    print(json.dumps(_measure(name, mode == "quick")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
