"""``policies.source: store`` across two ``keygate serve`` processes over one PostgreSQL (issue 17).

The set is pushed with ``keygate policy push`` and reaches every process through the change feed:
a push that removes a grant stops deliveries on a connection another process holds; both
processes' /readyz then show the pushed digest; a broken set is refused with file:line and
changes nothing. "In force" is the sentinel of each /readyz showing the pushed digest; "not
delivered" is a sentinel message that arrives while the revoked one does not.
"""

from __future__ import annotations

import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from ownership.pg_store import POLICY_SETS_KEPT, PgStore
from tests.integration.test_scale_out import Cluster, Gateway
from tests.rig.mqtt_clients import V311, Paho
from tests.rig.ownership import STORE_KEY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHIPPED = Path(__file__).resolve().parents[2] / "policies"
DEVICE = "store-thermo"

TELEMETRY_GRANT = f"""  - id: bob-reads-telemetry
    subjects: ["user:bob"]
    mqtt:
      topics: ["devices/{DEVICE}/telemetry"]
      actions: [subscribe]
"""
# The sentinel's topic: bob may read it under both sets.
SENTINEL_GRANT = f"""  - id: bob-reads-sentinel
    subjects: ["user:bob"]
    mqtt:
      topics: ["devices/{DEVICE}/attrs/sentinel"]
      actions: [subscribe]
"""


@pytest.fixture
def cluster(tmp_path, oidc, mosquitto, postgres, pg_dsn):
    c = Cluster(tmp_path, oidc, mosquitto, postgres, pg_dsn, 2, policies_source="store")
    yield c
    c.stop()
    for gw in c.gateways:
        text = gw.log.read_text(errors="replace")
        assert "Traceback" not in text, text


def policy_set(root: Path, name: str, *grants: str, extra: dict[str, str] | None = None) -> Path:
    """The shipped policies plus ``grants.yaml`` holding ``grants`` (and ``extra`` files) in ``root/name``."""
    d = root / name
    shutil.copytree(SHIPPED, d)
    (d / "grants.yaml").write_text("version: 1\nrules:\n" + "".join(grants))
    for fname, text in (extra or {}).items():
        (d / fname).write_text(text)
    return d


def digest_of(gw: Gateway) -> str:
    _, body = gw.readyz()
    return str(body["policies"]["digest"])


def wait_for_digest(cluster: Cluster, digest: str, timeout: float = 10.0) -> None:
    """Until every gateway's /readyz shows ``digest`` (the sentinel that the push is in force)."""
    deadline = time.monotonic() + timeout
    for gw in cluster.gateways:
        while digest_of(gw) != digest:
            assert time.monotonic() < deadline, f"{gw.name} still serves {digest_of(gw)}, not {digest}"
            time.sleep(0.02)


def pushed(cluster: Cluster, directory: Path) -> str:
    done = cluster.push(directory)
    assert done.returncode == 0, done.stderr
    m = re.search(r"pushed version \d+: .* hash ([0-9a-f]{16})$", done.stdout.strip())
    assert m, done.stdout
    return m.group(1)


def versions(cluster: Cluster) -> str:
    name = cluster.dsn.split("dbname=")[1].split()[0]
    return cluster.postgres.psql("SELECT string_agg(version::text || ':' || digest, ',' ORDER BY version) "
                                 "FROM policy_sets", name).strip()


async def test_a_push_through_the_store_reaches_every_process_and_a_broken_one_changes_nothing(cluster, oidc,
                                                                                               tmp_path):
    gw0, gw1 = cluster.gateways
    # Both processes loaded the set pushed before they started, and say so alike.
    first = digest_of(gw0)
    assert digest_of(gw1) == first
    _, body = gw1.readyz()
    assert body["policies"]["source"] == "store" and body["policies"]["error"] is None

    granted = pushed(cluster, policy_set(tmp_path, "granted", TELEMETRY_GRANT, SENTINEL_GRANT))
    assert granted != first
    wait_for_digest(cluster, granted)

    alice, bob = oidc.password_token("alice"), oidc.password_token("bob")
    status, created = gw0.api("POST", "/devices", alice, {"id": DEVICE, "type": "Thermometer"})
    assert status == 201, created
    cluster.in_force_everywhere()
    # Bob holds a connection on gw1; the device publishes through gw0.
    sub = Paho(gw1, "bob-on-gw1", username="bob", password=bob, version=V311)
    assert await sub.connect() == 0
    assert await sub.subscribe(f"devices/{DEVICE}/telemetry", 1) == [1]
    assert await sub.subscribe(f"devices/{DEVICE}/attrs/sentinel", 1) == [1]
    dev = Paho(gw0, DEVICE, username=DEVICE, password=created["k1"], version=V311)
    assert await dev.connect() == 0
    await dev.publish(f"devices/{DEVICE}/telemetry", b"granted", qos=1)
    await dev.publish(f"devices/{DEVICE}/attrs/sentinel", b"s1", qos=1)
    assert [m.payload for m in await sub.received_before(b"s1")] == [b"granted"]

    # The push that removes bob's telemetry grant, made through neither process.
    revoked = pushed(cluster, policy_set(tmp_path, "revoked", SENTINEL_GRANT))
    wait_for_digest(cluster, revoked)
    for gw in (gw0, gw1):  # the same hash in the metrics, and each load logged with it
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert f'keygate_policy_info{{hash="{revoked}"}} 1.0' in metrics
        assert "keygate_policy_loaded_timestamp_seconds " in metrics
        assert re.search(rf"policies reloaded from the store \(version \d+\): .* hash {revoked}",
                         gw.log.read_text())
    await dev.publish(f"devices/{DEVICE}/telemetry", b"after the push", qos=1)
    await dev.publish(f"devices/{DEVICE}/attrs/sentinel", b"s2", qos=1)
    assert await sub.received_before(b"s2") == []  # the sentinel came, the revoked telemetry did not

    # A broken set (a rule id used twice) is refused with file:line; the store and both processes keep theirs.
    before = versions(cluster)
    broken = policy_set(tmp_path, "broken", SENTINEL_GRANT,
                        extra={"more.yaml": "version: 1\nrules:\n" + SENTINEL_GRANT})
    done = cluster.push(broken)
    assert done.returncode == 1
    assert re.search(r"more\.yaml:\d+:\d+: rule id 'bob-reads-sentinel' is already used at .*grants\.yaml:\d+:\d+",
                     done.stderr), done.stderr
    assert "nothing pushed" in done.stderr
    assert versions(cluster) == before
    for gw in (gw0, gw1):
        status, body = gw.readyz()
        assert status == 200, body
        assert body["policies"]["digest"] == revoked
    await dev.close()
    await sub.close()


def test_the_postgres_table_is_sealed_versioned_and_each_push_is_a_change(postgres, pg_dsn):
    """The files are sealed (a rule may name a user), each push is one change of the feed (seq and
    NOTIFY, like an ownership write), and the newest POLICY_SETS_KEPT versions are kept."""
    store = PgStore.open(pg_dsn, STORE_KEY)
    name = pg_dsn.split("dbname=")[1].split()[0]
    try:
        assert store.policy_set() is None and store.policy_set_version() == 0
        text = 'version: 1\nrules:\n  - id: r\n    subjects: ["user:PlatypusPolicyUser"]\n'
        before = store.last_change()
        for i in range(1, POLICY_SETS_KEPT + 3):
            assert store.put_policy_set([("a.yaml", text), ("b.yaml", f"# {i}")], f"d{i}", 1.0) == i
            assert store.last_change() == before + i
        newest = POLICY_SETS_KEPT + 2
        assert store.policy_set() == (newest, f"d{newest}", [("a.yaml", text), ("b.yaml", f"# {newest}")])
        assert postgres.psql("SELECT min(version), count(*) FROM policy_sets", name).strip() == \
            f"{newest - POLICY_SETS_KEPT + 1}|{POLICY_SETS_KEPT}"
        # Another process's store reads it (and sees the pushes as foreign changes, touching no device).
        other = PgStore.open(pg_dsn, STORE_KEY)
        try:
            assert other.policy_set_version() == newest
            last, devices, foreign = other.changes_since(before)
            assert (last, devices, foreign) == (before + newest, set(), True)
        finally:
            other.close()
    finally:
        store.close()
    postgres.psql("CHECKPOINT")
    for p in postgres.data_dir.rglob("*"):
        if p.is_file():
            assert b"PlatypusPolicyUser" not in p.read_bytes(), str(p)
