"""Several ``keygate serve`` processes over one PostgreSQL store (issue 17).

Two gateway processes, each with its own listeners, in front of one Mosquitto, over one database:
a device registered through one is usable through the other; a delegation revoked through one
stops deliveries on a connection the other holds; a gateway killed with SIGKILL right after a
write loses nothing committed; PostgreSQL killed makes the other gateway fail closed (/readyz
503, the device's key refused), and once it is back everything is served again as committed.

"In force" is waited for on a sentinel, not a clock: a gateway's /readyz names the last change
its facts include ("change feed at N"), compared with the newest change in the database.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.rig.api import api_call, bearer_call
from tests.rig.mqtt_clients import V311, Paho
from tests.rig.ports import free_port, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
KEYGATE = [sys.executable, "-m", "proxy"]


class Gateway:
    """One ``keygate serve`` process of the cluster (what Paho needs of a rig: port, client_ssl)."""

    def __init__(self, cluster: Cluster, index: int):
        self.cluster = cluster
        self.name = f"gw{index}"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.log = cluster.workdir / f"{self.name}.log"
        self.config = cluster.workdir / f"{self.name}.yaml"
        self.config.write_text(cluster.oidc.config_yaml() + f"""
tls:
  cert: certs/server.crt
  key: certs/server.key
  client_ca: certs/devices-ca.crt
mqtt:
  listen: 127.0.0.1:{self.port}
  upstream: {cluster.mosquitto.address}
  max_connections: 500
http:
  listen: 127.0.0.1:{self.http_port}
  upstream: http://127.0.0.1:{cluster.orion_port}
store:
  backend: postgres
  dsn: ${{KEYGATE_STORE_DSN}}
  key: ${{KEYGATE_STORE_KEY}}
  feed_max_silence_seconds: 1.0
ownership:
  advertise_mqtt: mqtts://127.0.0.1:{self.port}
  advertise_http: https://127.0.0.1:{self.http_port}
policies:
  source: {cluster.policies_source}
  dir: policies/
audit:
  path: {self.name}-audit.log
metrics:
  listen: 127.0.0.1:{self.metrics_port}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([*KEYGATE, "serve", "-c", str(self.config)], cwd=ROOT, env=self.cluster.env,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        for port in (self.metrics_port, self.http_port, self.port):
            wait_for_port(port, proc=self.proc, timeout=30)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def client_ssl(self, cert=None) -> ssl.SSLContext:
        return self.cluster.ssl

    def api(self, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
        return api_call(self.http_port, self.cluster.ssl, method, path, token, body)

    def readyz(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def feed_at(self) -> int:
        _, body = self.readyz()
        m = re.search(r"change feed at (\d+)", body["checks"].get("change feed", ""))
        return int(m.group(1)) if m else -1


class Cluster:
    def __init__(self, workdir: Path, oidc, mosquitto, postgres, dsn: str, n: int, *, policies_source: str = "dir"):
        self.workdir, self.oidc, self.mosquitto, self.postgres, self.dsn = workdir, oidc, mosquitto, postgres, dsn
        self.policies_source = policies_source  # store: workdir/policies is pushed before the first start
        self.certs = workdir / "certs"
        shutil.copytree(ROOT / "policies", workdir / "policies")
        subprocess.run([*KEYGATE, "certs", "init", str(self.certs)], check=True, cwd=ROOT, capture_output=True)
        self.ssl = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        self.env = {**os.environ, "KEYGATE_STORE_KEY": "scale-out-store-key", "KEYGATE_STORE_DSN": dsn}
        self.orion_port = free_port()
        self.orion = subprocess.Popen([sys.executable, "-m", "tests.rig.ngsi_standin", "--port", str(self.orion_port)],
                                      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.orion_port, proc=self.orion)
        self.gateways = [Gateway(self, i) for i in range(n)]
        if policies_source == "store":
            self.push(workdir / "policies")
        for gw in self.gateways:  # one at a time: the first creates the schema
            gw.start()

    def push(self, directory: Path) -> subprocess.CompletedProcess[str]:
        """``keygate policy push DIR`` with the first gateway's configuration."""
        return subprocess.run([*KEYGATE, "policy", "push", str(directory), "-c", str(self.gateways[0].config)],
                              cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60)

    def newest_change(self) -> int:
        name = self.dsn.split("dbname=")[1].split()[0]
        return int(self.postgres.psql("SELECT coalesce(max(seq), 0) FROM changes", name).strip())

    def in_force_everywhere(self, timeout: float = 10.0) -> None:
        """Wait until every running gateway's facts include the newest committed change."""
        target = self.newest_change()
        deadline = time.monotonic() + timeout
        for gw in self.gateways:
            if gw.proc is None or gw.proc.poll() is not None:
                continue
            while gw.feed_at() < target:
                assert time.monotonic() < deadline, f"{gw.name} did not catch up to change {target}"
                time.sleep(0.02)

    def stop(self) -> None:
        for gw in self.gateways:
            gw.stop()
        self.orion.terminate()
        self.orion.wait(10)


@pytest.fixture
def cluster(tmp_path, oidc, mosquitto, postgres, pg_dsn):
    c = Cluster(tmp_path, oidc, mosquitto, postgres, pg_dsn, 2)
    yield c
    c.stop()
    for gw in c.gateways:
        text = gw.log.read_text(errors="replace")
        assert "Traceback" not in text, text


async def _flows(gw_pub: Gateway, subscriber: Paho, dev: str, key: str, payload: bytes) -> bool:
    d = Paho(gw_pub, dev, username=dev, password=key, version=V311)
    assert await d.connect() == 0
    await d.publish(f"devices/{dev}/telemetry", payload, qos=1)
    await d.close()
    return any(m.payload == payload for m in await subscriber.received_within(1.0))


async def test_registered_through_one_usable_through_all_and_revoked_through_one_stops_on_the_other(cluster, oidc):
    gw0, gw1 = cluster.gateways
    alice, bob = oidc.password_token("alice"), oidc.password_token("bob")
    assert gw0.api("GET", "/devices", bob)[0] == 200  # bob has signed in once (his name resolves)
    status, created = gw0.api("POST", "/devices", alice, {"id": "scale-thermo", "type": "Thermometer"})
    assert status == 201, created
    status, grant = gw0.api("POST", "/devices/scale-thermo/delegations", alice, {"to": "bob", "permission": "read"})
    assert status == 201, grant
    cluster.in_force_everywhere()
    # Bob holds a connection on gw1; the device, registered through gw0, publishes through gw1 and gw0.
    sub = Paho(gw1, "bob-on-gw1", username="bob", password=bob, version=V311)
    assert await sub.connect() == 0
    assert await sub.subscribe("devices/scale-thermo/telemetry", 1) == [1]
    assert await _flows(gw1, sub, "scale-thermo", created["k1"], b"through gw1")
    assert await _flows(gw0, sub, "scale-thermo", created["k1"], b"through gw0")
    # Revoked through gw0: once gw1 holds the change, bob's open connection on gw1 gets nothing more.
    assert gw0.api("DELETE", f"/devices/scale-thermo/delegations/{grant['id']}", alice)[0] == 204
    cluster.in_force_everywhere()
    assert not await _flows(gw0, sub, "scale-thermo", created["k1"], b"after the revocation")
    await sub.close()


async def test_kill9_of_a_gateway_and_of_postgres_lose_nothing_and_let_nothing_through(cluster, oidc):
    gw0, gw1 = cluster.gateways
    alice = oidc.password_token("alice")
    status, created = gw0.api("POST", "/devices", alice, {"id": "crash-thermo", "type": "Thermometer"})
    assert status == 201, created
    gw0.kill9()  # right after its answer: what it committed is in the database, not in its memory only
    cluster.in_force_everywhere()
    dev = Paho(gw1, "crash-thermo", username="crash-thermo", password=created["k1"], version=V311)
    assert await dev.connect() == 0
    await dev.close()
    # PostgreSQL killed: gw1 cannot hear the feed, so it fails closed and says so.
    cluster.postgres.kill()
    try:
        deadline = time.monotonic() + 15
        while gw1.readyz()[0] != 503:
            assert time.monotonic() < deadline, "gw1 did not fail closed"
            time.sleep(0.05)
        assert "change feed silent" in gw1.readyz()[1]["checks"]["change feed"]
        refused = Paho(gw1, "crash-thermo", username="crash-thermo", password=created["k1"], version=V311)
        assert await refused.connect() != 0
        await refused.close()
        # A write meanwhile is refused in the API's own shape, not a 500.
        status, body = gw1.api("POST", "/devices", alice, {"id": "during-outage", "type": "Thermometer"})
        assert (status, body["error"]["code"]) == (503, "store_unavailable"), body
    finally:
        cluster.postgres.start()
    deadline = time.monotonic() + 20
    while gw1.readyz()[0] != 200:
        assert time.monotonic() < deadline, f"gw1 did not come back: {gw1.readyz()}"
        time.sleep(0.05)
    assert "failing closed" in gw1.log.read_text() and "change feed back" in gw1.log.read_text()
    # Back, caught up: the device registered before both crashes is served again; a deletion through
    # gw1 holds after gw0 restarts (gw0 loads it from the store, never from what it held before).
    back = Paho(gw1, "crash-thermo", username="crash-thermo", password=created["k1"], version=V311)
    assert await back.connect() == 0
    await back.close()
    assert gw1.api("DELETE", "/devices/crash-thermo", alice)[0] == 204
    gw0.start()
    cluster.in_force_everywhere()
    gone = Paho(gw0, "crash-thermo", username="crash-thermo", password=created["k1"], version=V311)
    assert await gone.connect() != 0
    await gone.close()


async def test_a_persistent_session_resumes_through_another_gateway_and_holds_nothing_revoked(cluster, oidc):
    # The broker names the session by the person and the client id, not by the gateway that carried
    # it: bob subscribes through gw0, goes away, and comes back through gw1 to what was queued. What was
    # queued after the delegation ended is not delivered there (the delivery is checked, not the queue).
    gw0, gw1 = cluster.gateways
    alice, bob = oidc.password_token("alice"), oidc.password_token("bob")
    assert gw0.api("GET", "/devices", bob)[0] == 200  # bob has signed in once (his name resolves)
    status, created = gw0.api("POST", "/devices", alice, {"id": "roam-thermo", "type": "Thermometer"})
    assert status == 201, created
    status, own = gw0.api("POST", "/devices", bob, {"id": "roam-bob", "type": "Thermometer"})
    assert status == 201, own
    status, grant = gw0.api("POST", "/devices/roam-thermo/delegations", alice, {"to": "bob", "permission": "read"})
    assert status == 201, grant
    cluster.in_force_everywhere()

    away = Paho(gw0, "bob-roaming", username="bob", password=bob, version=V311, clean=False)
    assert await away.connect() == 0
    assert await away.subscribe("devices/roam-thermo/telemetry", 1) == [1]
    assert await away.subscribe("devices/roam-bob/telemetry", 1) == [1]  # the sentinel's topic: his own
    await away.close()
    dev = Paho(gw0, "roam-thermo", username="roam-thermo", password=created["k1"], version=V311)
    assert await dev.connect() == 0
    await dev.publish("devices/roam-thermo/telemetry", b"queued while away", qos=1)
    sentinel = Paho(gw0, "roam-bob", username="roam-bob", password=own["k1"], version=V311)
    assert await sentinel.connect() == 0
    await sentinel.publish("devices/roam-bob/telemetry", b"s1", qos=1)

    back = Paho(gw1, "bob-roaming", username="bob", password=bob, version=V311, clean=False)
    assert await back.connect() == 0
    assert back.session_present is True
    assert [m.payload for m in await back.received_before(b"s1")] == [b"queued while away"]
    await back.close()

    # Revoked through gw0 while bob is away: the broker may still hold what the device sends next, but
    # gw1 does not deliver it when bob resumes there.
    assert gw0.api("DELETE", f"/devices/roam-thermo/delegations/{grant['id']}", alice)[0] == 204
    await dev.publish("devices/roam-thermo/telemetry", b"queued after the revocation", qos=1)
    await sentinel.publish("devices/roam-bob/telemetry", b"s2", qos=1)
    cluster.in_force_everywhere()
    again = Paho(gw1, "bob-roaming", username="bob", password=bob, version=V311, clean=False)
    assert await again.connect() == 0
    assert again.session_present is True
    assert await again.received_before(b"s2") == []
    await again.close()
    await dev.close()
    await sentinel.close()


def _orion_subscriptions(cluster: Cluster) -> dict[str, str]:
    """Orion's subscriptions (from the stand-in itself): id -> the entity each is on."""
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.orion_port}/v2/subscriptions", timeout=5) as r:
        return {s["id"]: s["subject"]["entities"][0]["id"] for s in json.loads(r.read())}


def _subscribe_in_orion(gw: Gateway, token: str, entity: str) -> str:
    body = {"subject": {"entities": [{"id": entity, "type": "Thermometer"}]},
            "notification": {"http": {"url": "http://93.184.216.34:8080/notify"}, "attrs": ["temperature"]}}
    status, text = bearer_call(gw.http_port, gw.cluster.ssl, "POST", "/v2/subscriptions", token, body)
    assert status == 201, text
    (sub_id,) = [i for i, on in _orion_subscriptions(gw.cluster).items() if on == entity]
    return sub_id


async def test_a_gateway_failing_closed_withdraws_no_subscription_at_orion(cluster, oidc):
    # Failing closed empties a gateway's facts because it cannot hear the store, not because anything
    # was revoked or erased: its subscription guard must not take that for an erasure and delete every
    # user's subscription at the shared Orion (an outside review found it did).
    gw0, gw1 = cluster.gateways
    alice = oidc.password_token("alice")
    for device in ("kept-thermo", "sentinel-thermo"):
        assert gw0.api("POST", "/devices", alice, {"id": device, "type": "Thermometer"})[0] == 201
    cluster.in_force_everywhere()
    kept = _subscribe_in_orion(gw0, alice, "kept-thermo")
    sentinel = _subscribe_in_orion(gw0, alice, "sentinel-thermo")
    cluster.in_force_everywhere()
    cluster.postgres.kill()
    try:
        deadline = time.monotonic() + 15
        while gw0.readyz()[0] != 503 or gw1.readyz()[0] != 503:
            assert time.monotonic() < deadline, "the gateways did not fail closed"
            time.sleep(0.05)
        time.sleep(2.0)   # several rounds of each guard while failed closed
    finally:
        cluster.postgres.start()
    deadline = time.monotonic() + 20
    while gw0.readyz()[0] != 200 or gw1.readyz()[0] != 200:
        assert time.monotonic() < deadline, "the gateways did not come back"
        time.sleep(0.1)
    # The sentinel: a real withdrawal after the outage (the device deleted) is carried out; by then the
    # guards have run on the caught-up facts, and the other subscription is still there.
    assert gw1.api("DELETE", "/devices/sentinel-thermo", alice)[0] == 204
    deadline = time.monotonic() + 20
    while sentinel in _orion_subscriptions(cluster):
        assert time.monotonic() < deadline, "the guard did not withdraw the deleted device's subscription"
        time.sleep(0.1)
    assert kept in _orion_subscriptions(cluster)
