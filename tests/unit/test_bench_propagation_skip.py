"""Without PostgreSQL the propagation scenario is reported as not run, not as a failure or a crash."""

from __future__ import annotations

from pathlib import Path

from bench import propagation, propagation_stack, report_propagation
from bench.scenarios import Sizes


def test_no_initdb_means_not_run(monkeypatch):
    monkeypatch.setattr(propagation_stack.shutil, "which", lambda name: None)
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter(()))
    assert propagation_stack.postgres_missing().startswith("postgresql not installed")

    rows = [propagation.propagation(None, Sizes.quick(), case, "keygate", 0) for case in propagation.CASES]
    for row in rows:
        assert row.ok and row.extra == {"not_run": True}
        assert row.detail.startswith("not run: postgresql not installed")
    assert "not run: postgresql not installed" in report_propagation.table(rows)
    target = report_propagation.target(rows)
    assert target is not None and target[3] == "not measured"


def test_with_initdb_nothing_is_missing(monkeypatch):
    monkeypatch.setattr(propagation_stack.shutil, "which", lambda name: "/usr/bin/initdb" if name == "initdb" else None)
    assert propagation_stack.postgres_missing() == ""
