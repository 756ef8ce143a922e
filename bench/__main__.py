"""``python -m bench``: keygate against the direct broker, every scenario, one command.

Starts Mosquitto, a token issuer, the NGSI stand-in, nginx and keygate on
loopback, runs every scenario directly and through keygate (alternating,
several repetitions), then writes ``docs/benchmarks.md`` and
``docs/img/bench-*.png``. The propagation scenario starts its own PostgreSQL
and three more ``keygate serve`` over it (bench/propagation.py); without
``initdb`` it is reported as not run.

``--quick`` runs each scenario briefly and only checks that every run
completes with matching counts (CI); its report goes to a temporary folder
unless ``--out`` says otherwise. Exit status: 0 when every run completed with
matching counts, 1 otherwise (a missed performance target is reported, not an
error).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.progress import Progress
from bench.rows import Row
from bench.scenarios import SCENARIOS, Sizes, plan
from bench.stack import REPO, new_stack


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="each scenario briefly; check completion and counts only")
    p.add_argument("--messages", type=int, default=None,
                   help="messages in the SIP-MBA runs (default 1,000,000; --quick: 2,000)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per scenario (default 3; --quick: 1)")
    p.add_argument("--only", default="", help="comma-separated scenarios: " + ",".join(s.name for s in SCENARIOS))
    p.add_argument("--modes", default="", help="comma-separated modes (direct,direct-tls,keygate,nginx)")
    p.add_argument("--out", default=None,
                   help="folder for benchmarks.md and img/ (default: docs/; --quick: a temp dir)")
    p.add_argument("--http-engine", choices=["auto", "wrk", "python"], default="auto",
                   help="HTTP load generator (auto: wrk when installed)")
    p.add_argument("--workers", type=int, default=1,
                   help="keygate as keygate serve --workers N (a supervisor and N worker processes; default 1)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="sample keygate with py-spy during its runs; collapsed stacks and a summary in DIR")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.quick:
        sizes = Sizes.quick(args.messages or 2000)
    else:
        sizes = Sizes.full(args.messages or 1_000_000, args.reps or 3)
    if args.reps and args.quick:
        sizes = Sizes(**{**asdict(sizes), "reps": args.reps})
    only = {s for s in args.only.split(",") if s} or None
    modes = {m for m in args.modes.split(",") if m} or None
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="keygate-bench-report-"))
                                          if args.quick else REPO / "docs")
    steps = plan(sizes, only, modes)
    command = "python -m bench" + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else
                                   (" " + " ".join(argv) if argv else ""))

    # SIGTERM (a CI timeout, kill) still tears the stack down: no broker left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    progress = Progress(len(steps) + 1)
    stack = new_stack(keep=args.keep)
    stack.http_engine = args.http_engine
    stack.workers = args.workers
    rows: list[Row] = []
    profiles: list[Path | None] = []
    started = time.time()
    try:
        progress.step("starting Mosquitto, issuer, NGSI stand-in, nginx, keygate")
        try:
            stack.start(http=_http_available())
        except Exception as exc:
            progress.note(f"bench: the stack did not start: {exc}")
            return 2
        progress.done_one()
        rows.append(_syscall_cost())
        current = None
        for sc, case, mode, rep in steps:
            if sc is not current:
                if current is not None and current.after is not None:
                    current.after(stack)
                current = sc
                if sc.before is not None and not args.quick and (not modes or "keygate" in modes):
                    progress.step(f"{sc.name}: preparing")
                    sc.before(stack)
            progress.step(f"{sc.name} {case} {mode}" + (f" (rep {rep + 1})" if sc.reps(sizes) > 1 else ""))
            recorder = None
            # identity runs in process; attack starts its own keygate, so the pid here would be gone
            if args.profile and mode == "keygate" and sc.name not in ("identity", "attack"):
                from bench.profile import Recorder

                slug = "-".join(re.findall(r"[a-z0-9]+", f"{sc.name} {case} {rep}".lower()))
                recorder = Recorder(stack.pid("keygate"), Path(args.profile) / f"{slug}.txt")
            try:
                result = sc.run(stack, sizes, case, mode, rep)
            except Exception as exc:  # one broken run must not lose the others
                result = Row(sc.name, case, mode, rep, {}, False, f"{type(exc).__name__}: {exc}")
            if recorder is not None:
                profiles.append(recorder.stop())
            got = result if isinstance(result, list) else [result]
            if mode == "keygate" and stack.keygate is not None and stack.keygate.poll() is not None:
                for row in got:
                    row.ok = False
                    row.detail += " keygate exited: " + stack.keygate_log_tail(5)
                stack.start_keygate(http=bool(stack.keygate_http_port))
            rows.extend(got)
            for row in got:
                if not row.ok:
                    progress.note(f"FAILED {row.scenario} {row.case} {row.mode}: {row.detail[:300]}")
            progress.done_one()
    finally:
        stack.stop()
        progress.close()
    elapsed = time.time() - started

    from bench.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-results.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    md = write_report(rows, out, sizes=sizes, command=command, quick=args.quick, elapsed=elapsed,
                      notes=stack.log, workers=args.workers)
    if args.profile:
        from bench.profile import summarize

        summary = Path(args.profile) / "summary.md"
        summary.write_text("# keygate profiles (py-spy)\n\n" + "\n".join(summarize(p) for p in profiles if p))
        print(f"profiles: {summary}", file=sys.stderr)
    failed = [r for r in rows if not r.ok]
    print(f"report: {md}", file=sys.stderr)
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed", file=sys.stderr)
    for r in failed:
        print(f"  failed: {r.scenario} {r.case} {r.mode}: {r.detail[:300]}", file=sys.stderr)
    return 1 if failed else 0


def _syscall_cost() -> Row:
    """The machine's loopback ping-pong round trip (bench/syscost.py), in its own processes."""
    import subprocess

    from bench.stack import PYTHON

    try:
        out = subprocess.run([PYTHON, "-m", "bench.syscost"], cwd=REPO, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        return Row("machine", "loopback round trip", "direct", 0, json.loads(out), True)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return Row("machine", "loopback round trip", "direct", 0, {}, False, f"syscost: {exc}")


def _http_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("proxy.http.gateway") is not None
    except ModuleNotFoundError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
