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

CASES = ["tokens", "ownership", "policy"]

# What each module's measure() is called with, (quick, full).
_ARGS = {
    "tokens": (lambda quick: {"seconds": 0.05 if quick else 0.5}),
    "ownership": (lambda quick: {"devices": 200 if quick else 2000, "seconds": 0.05 if quick else 0.5}),
    "policy": (lambda quick: {"seconds": 0.05 if quick else 0.5}),
}


def _measure(name: str, quick: bool) -> dict[str, float]:
    mod = importlib.import_module(f"bench.bench_{name}")
    wanted = _ARGS[name](quick)
    params = inspect.signature(mod.measure).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    result = mod.measure(**kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    return result


def run(stack, sizes, case: str, rep: int):
    from bench.scenarios import PYTHON, REPO, Row

    quick = sizes.quick
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
        if not isinstance(us, (int, float)) or op == "devices":
            continue
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
