"""``policies.source: store`` (issue 17): the versioned policy_sets table (SQLCipher here; the
postgres one in tests/integration/test_policy_store.py), ``keygate policy push`` validating exactly
as a reload does, the same loader and digest for a stored set, and a stored set that does not load
keeping the one in force."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import aiohttp
import pytest

from ownership import store as st
from ownership.facts import EMPTY, MemoryFacts
from ownership.policy_push import push
from ownership.policy_store import StorePolicies, load_from_store
from proxy.config import ConfigError
from proxy.errors import CommandError
from proxy.metrics_server import MetricsServer
from proxy.policy import Policies
from proxy.policy.decision import PolicyError
from proxy.policy.language import load_dir, load_files
from tests.rig.ownership import STORE_KEY, open_service, ownership_config

SHIPPED = Path(__file__).resolve().parents[2] / "policies"
EXTRA = """version: 1
rules:
  - id: lab-reads-board
    subjects: ["group:lab"]
    mqtt:
      topics: ["board/#"]
      actions: [subscribe]
"""
# The same id again, at line 3 of its file: what a reload refuses.
DUPLICATE = EXTRA.replace("board/#", "board2/#")


def policy_dir(root: Path, name: str, **files: str) -> Path:
    d = root / name
    shutil.copytree(SHIPPED, d)
    for fname, text in files.items():
        (d / fname).write_text(text)
    return d


def write_config(tmp_path: Path) -> str:
    (tmp_path / "proxy.yaml").write_text(
        "oidc: {issuer: 'https://issuer.test/realms/iot'}\n"
        "store: {path: data/ownership.db, key: '${KEYGATE_STORE_KEY}'}\n"
        "policies: {source: store}\n")
    return str(tmp_path / "proxy.yaml")


def open_store(tmp_path: Path) -> st.Store:
    return st.Store.open(tmp_path / "data" / "ownership.db", STORE_KEY)


@pytest.fixture
def store_env(monkeypatch):
    monkeypatch.setenv("KEYGATE_STORE_KEY", STORE_KEY)


def facts() -> MemoryFacts:
    f = MemoryFacts()
    f.load(EMPTY)
    return f


# ---------------------------------------------------------------- the table


def test_the_table_keeps_versions_and_the_newest_is_in_force(tmp_path):
    store = open_store(tmp_path)
    try:
        assert store.policy_set() is None
        assert store.policy_set_version() == 0
        for i in range(1, st.POLICY_SETS_KEPT + 3):
            texts = [("a.yaml", f"text {i}"), ("sub/b.test.yaml", "tests\n")]
            assert store.put_policy_set(texts, f"digest{i}", 1000.0 + i) == i
        newest = st.POLICY_SETS_KEPT + 2
        assert store.policy_set_version() == newest
        assert store.policy_set() == (newest, f"digest{newest}",
                                      [("a.yaml", f"text {newest}"), ("sub/b.test.yaml", "tests\n")])
        # Older versions are pruned, the last POLICY_SETS_KEPT stay (to look back at).
        with store.transaction() as c:
            kept = [r[0] for r in c.execute("SELECT version FROM policy_sets ORDER BY version")]
        assert kept == list(range(newest - st.POLICY_SETS_KEPT + 1, newest + 1))
    finally:
        store.close()
    # ...and it survives a reopen (a committed push is not lost).
    store = open_store(tmp_path)
    try:
        assert store.policy_set_version() == st.POLICY_SETS_KEPT + 2
    finally:
        store.close()


# ---------------------------------------------------------------- push


def test_push_stores_the_set_and_prints_its_digest_which_does_not_depend_on_the_folder(tmp_path, store_env, capsys):
    config = write_config(tmp_path)
    good = policy_dir(tmp_path, "good", **{"extra.yaml": EXTRA})
    assert push(str(good), config) == 0
    out = capsys.readouterr().out
    src = load_dir(good)
    assert out.strip().endswith(f"hash {src.digest}") and out.startswith("pushed version 1:")
    store = open_store(tmp_path)
    try:
        version, digest, texts = store.policy_set()
    finally:
        store.close()
    assert (version, digest) == (1, src.digest)
    assert dict(texts)["extra.yaml"] == EXTRA and "devices.yaml" in dict(texts)
    # The same files elsewhere (another host's folder) hash the same, and load from the store the same.
    moved = tmp_path / "elsewhere" / "policies"
    shutil.copytree(good, moved)
    assert load_dir(moved).digest == src.digest
    assert load_files(texts, "store@1").digest == src.digest
    assert push(str(moved), config) == 0
    assert capsys.readouterr().out.startswith(f"unchanged: version 1 already holds these {len(src.files)} files")


@pytest.mark.parametrize(("broken", "culprit"), [
    ({"a.yaml": EXTRA, "dup.yaml": DUPLICATE}, "dup.yaml"),        # an id used twice across files
    ({"bad.yaml": "version: 1\nrules:\n  - id: x\n    effect: allow\n    subjects: [nobody-knows]\n"}, "bad.yaml"),
    ({"yaml.yaml": "version: 1\nrules: [\n"}, "yaml.yaml"),          # not YAML
])
def test_push_refuses_what_a_reload_refuses_with_the_same_message_and_changes_nothing(tmp_path, store_env,
                                                                                      broken, culprit):
    config = write_config(tmp_path)
    assert push(str(policy_dir(tmp_path, "good")), config) == 0
    bad = policy_dir(tmp_path, "bad", **broken)
    # What a reload of the same folder says.
    held = Policies.from_dir(policy_dir(tmp_path, "held"), facts())
    shutil.rmtree(tmp_path / "held")
    shutil.copytree(bad, tmp_path / "held")
    assert held.reload() is False
    assert held.last_error
    with pytest.raises(CommandError) as refused:
        push(str(bad), config)
    assert str(refused.value) == f"{held.last_error.replace(str(tmp_path / 'held'), str(bad))} (nothing pushed)"
    assert re.search(rf"^{re.escape(str(bad))}/{culprit}:\d+:\d+: ", str(refused.value))  # file:line:column
    store = open_store(tmp_path)
    try:
        assert store.policy_set_version() == 1
    finally:
        store.close()


def test_a_bad_policies_source_is_refused():
    from proxy.config import load_config_text

    with pytest.raises(ConfigError, match=r"policies\.source"):
        load_config_text("oidc: {issuer: 'https://i.test/r'}\npolicies: {source: git}\n", "proxy.yaml")


# ---------------------------------------------------------------- loading from the store


def test_a_stored_set_names_its_files_in_messages():
    texts = [("a.yaml", EXTRA), ("b.yaml", DUPLICATE)]
    with pytest.raises(PolicyError, match=r"^store@7/b\.yaml:\d+:\d+: rule id 'lab-reads-board' is already used "
                                          r"at store@7/a\.yaml:\d+:\d+"):
        load_files(texts, "store@7")
    with pytest.raises(PolicyError, match="no policy files"):
        load_files([("only.test.yaml", "version: 1\ntests: []\n")], "store@8")


async def test_a_stored_set_that_does_not_load_keeps_the_one_in_force(tmp_path):
    server = MetricsServer()
    await server.start("127.0.0.1", 0)
    good = load_dir(policy_dir(tmp_path, "good"))
    policies = Policies(Policies.from_dir(tmp_path / "good", facts()).compiled, version=1, served=True)
    try:
        broken = [*good.texts, ("dup.yaml", DUPLICATE), ("dup2.yaml", DUPLICATE)]
        assert await policies.load_source(lambda: load_files(broken, "store@2"), version=2) is False
        assert (policies.version, policies.generation, policies.digest) == (1, 1, good.digest)
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/readyz") as r:
            body = await r.json()
        assert r.status == 503
        assert body["policies"]["digest"] == good.digest and body["policies"]["version"] == 1
        assert "store version 2: store@2/dup2.yaml" in body["policies"]["error"]
        assert "reload refused" in body["checks"]["policies"]
        # The next good push is taken.
        fixed = [*good.texts, ("extra.yaml", EXTRA)]
        assert await policies.load_source(lambda: load_files(fixed, "store@3"), version=3) is True
        assert (policies.version, policies.generation, policies.last_error) == (3, 2, None)
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{server.port}/readyz") as r:
            body = await r.json()
        assert body["policies"]["digest"] == load_files(fixed, "x").digest
    finally:
        await server.stop()


async def test_a_process_follows_the_file_and_swaps_as_a_reload_does(tmp_path, store_env, capsys):
    config_path = write_config(tmp_path)
    config = ownership_config(tmp_path, extra="policies: {source: store}\n")
    service = await open_service(config)
    try:
        with pytest.raises(ConfigError, match="the store holds no policy set: push one"):
            await load_from_store(config, service)
        assert push(str(policy_dir(tmp_path, "first")), config_path) == 0
        policies = await load_from_store(config, service)
        assert policies.version == 1 and policies.origin == "store"
        swaps = []
        policies.subscribe(lambda p: swaps.append(p.digest))  # the gateways' invalidation hangs here
        following = StorePolicies(policies, service)
        await following.follow()
        assert swaps == []  # nothing new
        # A push from another process, into the file this one holds open.
        second = policy_dir(tmp_path, "second", **{"extra.yaml": EXTRA})
        assert push(str(second), config_path) == 0
        await following.follow()
        assert swaps == [load_dir(second).digest] and policies.version == 2
        assert [r.id for r in policies.source.rules if r.id == "lab-reads-board"] == ["lab-reads-board"]
    finally:
        await service.close()


async def test_a_push_between_the_load_at_start_and_the_feed_hook_is_not_missed(tmp_path, store_env):
    """The feed may catch up on a push before the follower hangs on it: start() follows once."""
    import types

    config_path = write_config(tmp_path)
    config = ownership_config(tmp_path, extra="policies: {source: store}\n")
    service = await open_service(config)
    try:
        assert push(str(policy_dir(tmp_path, "first")), config_path) == 0
        policies = await load_from_store(config, service)
        second = policy_dir(tmp_path, "second", **{"extra.yaml": EXTRA})
        assert push(str(second), config_path) == 0   # ...and the feed caught up on it, with no hook yet
        service.feed = types.SimpleNamespace(after_catch_up=[], on_fail_closed=[])  # a stand-in: only the hook lists
        following = StorePolicies(policies, service)
        following.start()
        assert service.feed.after_catch_up == [following.follow]
        assert service.feed.on_fail_closed == [following.fail_closed]
        assert following._task is not None
        await following._task
        assert policies.version == 2 and policies.digest == load_dir(second).digest
        await following.close()
        assert service.feed.after_catch_up == [] and service.feed.on_fail_closed == []
    finally:
        service.feed = None
        await service.close()
