"""The --workers comparison table of docs/scale-out.md, from two runs of ``python -m bench``.

``python -m bench.workers_table W1/bench-results.json W2/bench-results.json`` prints a markdown
table: each scenario's figure with ``--workers 1`` and ``--workers 2`` (medians over the
repetitions, the min–max range beside), and their ratio; keygate's rows first, then the direct
and nginx baselines measured in the same runs (they show how much the machine itself moved
between the two runs).
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


def table(one: list[Row], two: list[Row]) -> str:
    lines = ["| scenario | case | mode | metric | --workers 1 | --workers 2 | ratio (2 / 1) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for baseline in (False, True):
        for scenario, metric in COMPARED:
            mode = BASELINES.get(scenario, "") if baseline else "keygate"
            if not mode or (baseline and metric in ("broker_us_per_msg", "proxy_us_per_req")):
                continue
            label, fmt = _label(scenario, metric)
            cases = dict.fromkeys(r.case for r in one + two if r.scenario == scenario and r.mode == mode)
            for case in cases:
                a, b = median(one, scenario, case, mode, metric), median(two, scenario, case, mode, metric)
                r = f"{b / a:.2f}x" if a == a and b == b and a else "–"
                w1, w2 = cell(one, scenario, case, mode, metric, fmt), cell(two, scenario, case, mode, metric, fmt)
                lines.append(f"| {scenario} | {case} | {mode} | {label} | {w1} | {w2} | {r} |")
    return "\n".join(lines)


def _rows(path: str) -> list[Row]:
    return [Row(**d) for d in json.loads(Path(path).read_text())]


if __name__ == "__main__":
    print(table(_rows(sys.argv[1]), _rows(sys.argv[2])))
