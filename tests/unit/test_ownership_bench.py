"""The ownership benchmark runs end to end on a tiny store (figures are not asserted)."""

from __future__ import annotations

from bench.bench_ownership import main, measure


async def test_bench_measures_every_figure():
    results = await measure(devices=30, seconds=0.01)
    assert results.pop("devices") == 30
    assert {"facts.device (cached)", "store.get_device (uncached, store thread)",
            "load_device (uncached, via event loop)", "device key check: right key",
            "device key check: wrong key", "device key check: unknown device"} <= set(results)
    assert all(0 < best <= median for median, best in results.values())


def test_bench_command_line(capsys):
    assert main(["--devices", "10", "--seconds", "0.01", "--json"]) == 0
    assert '"facts.device (cached)"' in capsys.readouterr().out
