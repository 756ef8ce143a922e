"""The propagation benchmark runs end to end on a real PostgreSQL (figures are not asserted)."""

from __future__ import annotations

import pytest

from bench.bench_propagation import measure

pytestmark = pytest.mark.integration


async def test_bench_measures_propagation():
    result = await measure(revocations=3, followers=1)
    assert result["gateways"] == 2 and result["revocations"] == 3
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
