"""The benchmark suite end to end in quick mode (what CI runs of it).

``python -m bench --quick`` starts its own Mosquitto, issuer, NGSI stand-in,
nginx and keygate, runs every scenario briefly directly and through keygate,
and exits 0 only when every run completed with matching counts. No timing is
asserted: the machine running CI is shared and the sizes are tiny.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scenarios import SCENARIOS

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=400)
    rows = json.loads((out / "bench-results.json").read_text()) if (out / "bench-results.json").exists() else []
    return proc, out, rows


def test_quick_mode_completes_with_matching_counts(quick_run):
    proc, _, rows = quick_run
    failed = [f"{r['scenario']} / {r['case']} / {r['mode']}: {r['detail']}" for r in rows if not r["ok"]]
    assert proc.returncode == 0, "\n".join(failed) or proc.stderr[-2000:]
    assert not failed
    assert f"{len(rows)} passed, 0 failed" in proc.stderr


def test_every_scenario_ran_directly_and_through_keygate(quick_run):
    _, _, rows = quick_run
    for sc in SCENARIOS:
        modes = {r["mode"] for r in rows if r["scenario"] == sc.name}
        assert modes == set(sc.modes), f"{sc.name}: ran in {sorted(modes)}, expected {sorted(sc.modes)}"


def test_counts_are_exact(quick_run):
    _, _, rows = quick_run
    by = {(r["scenario"], r["case"], r["mode"]): r["metrics"] for r in rows}
    for q in ("QoS 0", "QoS 1", "QoS 2"):
        m = by[("sipmba", q, "keygate")]
        assert m["lost"] == 0 and m["out_of_order"] == 0 and m["in_order"] == m["received"] > 0
    for q in ("QoS 0", "QoS 1"):
        m = by[("ingest", q, "keygate")]
        assert m["received"] == m["sent"] > 0
    fan = next(m for (s, _, mode), m in by.items() if s == "fanout" and mode == "keygate")
    assert fan["deliveries"] == fan["expected_deliveries"] > 0
    assert fan["unexpected"] == 0, "a subscriber without read access got deliveries through keygate"


def test_report_and_plots_are_written(quick_run):
    _, out, _ = quick_run
    md = (out / "benchmarks.md").read_text()
    assert "## Targets (issue 8)" in md and "## Machine" in md
    for png in ("bench-latency.png", "bench-throughput.png", "bench-cost.png"):
        data = (out / "img" / png).read_bytes()
        assert data.startswith(b"\x89PNG"), png


def test_under_attack_ran_its_attackers(quick_run):
    """The "under attack" rows: the legitimate client measured quiet and beside every attacker, each
    of which reached keygate (connections opened), and keygate's memory was read."""
    _, _, rows = quick_run
    attack = {r["case"]: r for r in rows if r["scenario"] == "attack"}
    assert set(attack) == {"quiet", "all at once"}
    loud = attack["all at once"]
    assert set(loud["extra"]["attacks"]) == {"slowloris_tls", "slowloris_ws", "connect_flood",
                                             "unsubscribe_flood", "subscribe_flood", "http_slow_headers"}
    for name, st in loud["extra"]["attacks"].items():
        assert st["attempts"] > 0 and st["established"] > 0, name
    for r in attack.values():
        assert r["metrics"]["received"] == r["metrics"]["sent"] > 0
        assert r["metrics"]["connect_n"] > 0 and r["metrics"]["rss_before_mb"] > 0
