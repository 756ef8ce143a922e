"""Hot reload: an edit is in force on the next decision; a broken edit keeps the last good set.

Drives :meth:`Policies.watch` (watchfiles) against a real directory, the way
``keygate serve`` runs it. The MQTT gateway adds the open-connection variant.
"""

import asyncio
import time

import pytest

from proxy.facts import DeviceFacts, StaticFacts
from proxy.metrics import REGISTRY, readiness
from proxy.policy import Policies, Verdict
from tests.unit.policy_helpers import user

pytestmark = pytest.mark.integration

V1 = """version: 1
rules:
  - id: telemetry
    subjects: [owner]
    mqtt: {topics: ["devices/{device}/telemetry"], actions: [subscribe]}
"""
V2 = V1 + """  - id: commands
    subjects: [owner]
    mqtt: {topics: ["devices/{device}/cmd/#"], actions: [publish]}
"""
BROKEN = V2 + """  - id: typo
    subjects: [owenr]
    mqtt: {topics: ["x"], actions: [publish]}
"""


async def until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the reload")
        await asyncio.sleep(0.02)


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels or None) or 0.0


async def test_edit_then_broken_edit(tmp_path):
    (tmp_path / "rules.yaml").write_text(V1)
    facts = StaticFacts([DeviceFacts("d1", "sub-alice", "alice")])
    policies = Policies.from_dir(tmp_path, facts)
    alice = user("alice")
    swaps = []
    policies.subscribe(lambda p: swaps.append(p.generation))
    assert not policies.may_publish(alice, "devices/d1/cmd/on").allowed
    gen = policies.generation
    task = asyncio.create_task(policies.watch())
    try:
        await asyncio.sleep(0.3)  # let the watcher arm before the first edit
        started = time.monotonic()
        (tmp_path / "rules.yaml").write_text(V2)
        await until(lambda: policies.generation == gen + 1)
        took = time.monotonic() - started
        d = policies.may_publish(alice, "devices/d1/cmd/on")
        assert (d.allowed, d.rule) == (True, "commands")
        assert swaps == [gen + 1]
        assert took < 2.0, took
        assert metric("keygate_policy_generation") == gen + 1
        assert metric("keygate_policy_info", hash=policies.digest) == 1
        assert readiness()[1]["policies"].startswith("ok")

        errors_before = metric("keygate_policy_reload_errors_total")
        (tmp_path / "rules.yaml").write_text(BROKEN)
        await until(lambda: policies.last_error is not None)
        # the last good set stays in force, unchanged
        assert policies.generation == gen + 1 and swaps == [gen + 1]
        assert policies.may_publish(alice, "devices/d1/cmd/on").rule == "commands"
        assert policies.may_subscribe(alice, "devices/d1/telemetry").verdict is Verdict.ALLOW
        assert "rules.yaml:10:16: rules[2].subjects: unknown subject 'owenr'" in policies.last_error
        ready, checks = readiness()
        assert not ready and checks["policies"].startswith("not ready: reload refused")
        assert "rules.yaml:10:16" in checks["policies"]
        assert metric("keygate_policy_reload_errors_total") == errors_before + 1

        # fixing the file recovers readiness with a new generation
        (tmp_path / "rules.yaml").write_text(V1)
        await until(lambda: policies.generation == gen + 2)
        assert policies.last_error is None and readiness()[1]["policies"].startswith("ok")
        assert not policies.may_publish(alice, "devices/d1/cmd/on").allowed
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_new_file_and_removed_file(tmp_path):
    (tmp_path / "a.yaml").write_text(V1)
    policies = Policies.from_dir(tmp_path, StaticFacts([DeviceFacts("d1", "sub-alice", "alice")]))
    gen = policies.generation
    task = asyncio.create_task(policies.watch())
    try:
        await asyncio.sleep(0.3)
        (tmp_path / "b.yaml").write_text("version: 1\nrules:\n  - id: extra\n    subjects: [anyone]\n"
                                         "    mqtt: {topics: [news], actions: [subscribe]}\n")
        await until(lambda: policies.generation == gen + 1)
        assert policies.may_receive(user("bob"), "news").rule == "extra"
        (tmp_path / "b.yaml").unlink()
        await until(lambda: policies.generation == gen + 2)
        assert not policies.may_receive(user("bob"), "news").allowed
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_directory_removed_then_restored(tmp_path):
    import shutil

    d = tmp_path / "policies"
    d.mkdir()
    (d / "rules.yaml").write_text(V1)
    policies = Policies.from_dir(d, StaticFacts([DeviceFacts("d1", "sub-alice", "alice")]))
    gen = policies.generation
    task = asyncio.create_task(policies.watch())
    try:
        await asyncio.sleep(0.3)
        shutil.rmtree(d)
        await until(lambda: policies.last_error is not None)
        assert not readiness()[0]
        assert policies.may_subscribe(user("alice"), "devices/d1/telemetry").verdict is Verdict.ALLOW  # kept
        d.mkdir()
        (d / "rules.yaml").write_text(V2)
        await until(lambda: policies.generation == gen + 1)
        assert policies.last_error is None
        assert policies.may_publish(user("alice"), "devices/d1/cmd/on").rule == "commands"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
