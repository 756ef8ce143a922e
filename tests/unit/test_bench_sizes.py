"""The benchmark sizes: the published figures are measured at full size, never in quick mode.

A field ``quick`` beside the classmethod ``quick()`` once took the method as its default, so
``Sizes.full().quick`` was truthy and the identity micro-benchmarks of the published report ran
their quick budgets.
"""

from __future__ import annotations

import dataclasses
import subprocess

from bench import identity_suite
from bench.scenarios import Sizes


def test_only_quick_sizes_are_quick():
    assert Sizes.full().quick_mode is False
    assert Sizes.quick().quick_mode is True


def test_no_size_defaults_to_a_callable():
    # A class attribute defined after a field (a method of the same name) silently becomes its default.
    assert [f.name for f in dataclasses.fields(Sizes) if callable(f.default)] == []


def test_the_identity_suite_runs_in_the_mode_of_its_sizes(monkeypatch):
    modes = []

    def child(argv, **_kw):
        modes.append(argv[-1])
        return subprocess.CompletedProcess(argv, 0, stdout='{"validate, cached": 2.0}\n', stderr="")

    monkeypatch.setattr(identity_suite.subprocess, "run", child)
    (row,) = identity_suite.run(None, Sizes.full(), "tokens", 0)
    identity_suite.run(None, Sizes.quick(), "tokens", 0)
    assert modes == ["full", "quick"]
    assert row.ok and row.metrics == {"us_per_op": 2.0, "ops_per_s": 500_000.0}
