"""The propagation benchmarks run end to end on a real PostgreSQL (figures are not asserted).

* the service level (bench/bench_propagation.py): ownership services in several processes;
* ``python -m bench --quick --only propagation``: three ``keygate serve`` over one database in front
  of Mosquitto, revocations through one, real MQTT subscribers on the other two. What is asserted is
  what the scenario observed, not how fast: every revocation stopped the deliveries on both other
  gateways, and none of them delivered a message published after it said it held the revocation,
  nor anything after the quiet window.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bench_propagation import measure
from bench.propagation import CASES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


async def test_bench_measures_propagation():
    result = await measure(revocations=3, followers=1)
    assert result["gateways"] == 2 and result["revocations"] == 3
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]


@pytest.mark.slow
def test_the_bench_scenario_sees_every_revocation_stop_deliveries_on_the_other_gateways(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "propagation", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    results = tmp_path / "bench-results.json"
    assert results.exists(), proc.stderr[-3000:]
    rows = {r["case"]: r for r in json.loads(results.read_text()) if r["scenario"] == "propagation"}
    assert set(rows) == set(CASES)
    mqtt = rows[CASES[0]]
    assert not mqtt["extra"].get("not_run"), mqtt["detail"]  # PostgreSQL is installed where the tests run
    m = mqtt["metrics"]
    assert m.get("revocations") == 3 and m.get("observed") == 3, mqtt["detail"]
    assert m["gateways"] == 3
    assert m["after_held"] == 0, "a gateway delivered a message published after it held the revocation"
    assert m["late"] == 0, "a delivery arrived after the quiet window"
    assert mqtt["ok"], mqtt["detail"]
    assert rows[CASES[1]]["ok"], rows[CASES[1]]["detail"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "revocation through one of 3 gateways" in (tmp_path / "benchmarks.md").read_text()
