"""The --workers comparison table of docs/scale-out.md, from two runs of ``python -m bench``.

``python -m bench.workers_table W1/bench-results.json W2/bench-results.json [W1' W2' ...]`` prints
a markdown table: each scenario's figure with ``--workers 1`` and ``--workers 2`` (medians over
the repetitions, the min–max range beside), and their ratio, for each pair of runs given;
keygate's rows first, then the direct and nginx baselines measured in the same runs (they show
how much the machine itself moved between the two runs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.report import COLUMNS, cell, median
from bench.rows import Row

# (scenario, metric) pairs compared, in this order; the label comes from bench/report.py's COLUMNS.
COMPARED = [("ingest", "rate"), ("fanout", "rate"), ("cpu", "us_per_msg"), ("cpu", "broker_us_per_msg"),
            ("http", "rate"), ("http", "p50_ms"), ("http", "proxy_us_per_req")]
BASELINES = {"ingest": "direct", "fanout": "direct", "cpu": "direct-tls", "http": "nginx"}


def _label(scenario: str, metric: str) -> tuple[str, str]:
    for m, label, fmt, _ in COLUMNS[scenario]:
        if m == metric:
            return label, fmt
    return metric, "{:,.1f}"


def table(pairs: list[tuple[list[Row], list[Row]]]) -> str:
    """One row per (scenario, case, mode, metric); per pair of runs: workers 1, workers 2, ratio."""
    head = ["scenario", "case", "mode", "metric"]
    for k in range(len(pairs)):
        tag = f" (run {k + 1})" if len(pairs) > 1 else ""
        head += [f"--workers 1{tag}", f"--workers 2{tag}", f"ratio 2 / 1{tag}"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    every = [r for one, two in pairs for r in one + two]
    for baseline in (False, True):
        for scenario, metric in COMPARED:
            mode = BASELINES.get(scenario, "") if baseline else "keygate"
            if not mode or (baseline and metric in ("broker_us_per_msg", "proxy_us_per_req")):
                continue
            label, fmt = _label(scenario, metric)
            for case in dict.fromkeys(r.case for r in every if r.scenario == scenario and r.mode == mode):
                line = [scenario, case, mode, label]
                for one, two in pairs:
                    a, b = median(one, scenario, case, mode, metric), median(two, scenario, case, mode, metric)
                    line += [cell(one, scenario, case, mode, metric, fmt), cell(two, scenario, case, mode, metric, fmt),
                             f"{b / a:.2f}x" if a == a and b == b and a else "–"]
                lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def _rows(path: str) -> list[Row]:
    return [Row(**d) for d in json.loads(Path(path).read_text())]


if __name__ == "__main__":
    paths = sys.argv[1:]
    if not paths or len(paths) % 2:
        sys.exit("usage: python -m bench.workers_table W1/bench-results.json W2/bench-results.json [W1' W2' ...]")
    print(table([(_rows(paths[i]), _rows(paths[i + 1])) for i in range(0, len(paths), 2)]))
