"""``keygate serve --workers 2``: one supervisor, two worker processes sharing every listener (issue 17).

Over SQLCipher (the workers share one file and poll its change table) and over PostgreSQL (LISTEN/
NOTIFY): subscribers are opened until both workers hold some (read from /proc: which worker owns
each accepted socket), then a delegation revoked through the API (whichever worker answers) stops
deliveries on all of them, those held by the other worker too. ``kill -9`` of a worker: the
supervisor starts it again and the listener keeps answering meanwhile; SIGTERM stops all. A worker
that dies at every start makes the supervisor give up with one line (exit 1).

"Stops" is waited for on sentinels: the device publishes numbered messages until a round reaches
none of the subscribers; the rounds after it must reach none either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.rig.api import api_call
from tests.rig.mqtt_clients import V311, Paho
from tests.rig.oidc import user_sub
from tests.rig.ports import free_port, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
KEYGATE = [sys.executable, "-m", "proxy"]


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _listening_inodes_of(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def connections_held(pid: int, port: int) -> int:
    """Established TCP connections on local ``port`` whose socket process ``pid`` holds."""
    mine = _listening_inodes_of(pid)
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "01" and int(local.split(":")[1], 16) == port and inode in mine:
            held += 1
    return held


class WorkersGateway:
    """One ``keygate serve --workers 2`` (what Paho needs of a rig: host, port, client_ssl)."""

    def __init__(self, workdir: Path, oidc, mosquitto, backend: str, dsn: str = ""):
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.certs = workdir / "certs"
        shutil.copytree(ROOT / "policies", workdir / "policies")
        subprocess.run([*KEYGATE, "certs", "init", str(self.certs)], check=True, cwd=ROOT, capture_output=True)
        self.ssl = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        self.env = {**os.environ, "KEYGATE_STORE_KEY": "workers-store-key", "KEYGATE_STORE_DSN": dsn}
        store = ("  backend: postgres\n  dsn: ${KEYGATE_STORE_DSN}\n" if backend == "postgres"
                 else "  path: ownership.db\n")
        self.log = workdir / "serve.log"
        self.config = workdir / "proxy.yaml"
        self.config.write_text(oidc.config_yaml() + f"""
tls:
  cert: certs/server.crt
  key: certs/server.key
mqtt:
  listen: 127.0.0.1:{self.port}
  upstream: {mosquitto.address}
  max_connections: 500
  limits:
    unauthenticated_rate_per_address: 0   # every client here comes from 127.0.0.1, reconnecting fast
http:
  listen: 127.0.0.1:{self.http_port}
  upstream: http://127.0.0.1:9
store:
{store}  key: ${{KEYGATE_STORE_KEY}}
  feed_max_silence_seconds: 2.0
ownership:
  orion_lifecycle: false   # no Orion here: the API's own writes are what the workers share
  advertise_mqtt: mqtts://127.0.0.1:{self.port}
  advertise_http: https://127.0.0.1:{self.http_port}
policies:
  dir: policies/
audit:
  path: audit.log
metrics:
  listen: 127.0.0.1:{self.metrics_port}
""")
        self.proc: subprocess.Popen | None = None

    def start(self, workers: int = 2) -> None:
        self.proc = subprocess.Popen([*KEYGATE, "serve", "-c", str(self.config), "--workers", str(workers)],
                                     cwd=ROOT, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        self.wait_for_log(f"keygate ready: {workers} workers")
        for port in (self.metrics_port, self.http_port, self.port):
            wait_for_port(port, proc=self.proc, timeout=30)

    def wait_for_log(self, text: str, timeout: float = 60.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log_text().count(text) < count:
            assert self.proc is not None and self.proc.poll() is None, self.log_text()
            assert time.monotonic() < deadline, f"no {text!r} in the log:\n{self.log_text()}"
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def workers(self) -> list[int]:
        assert self.proc is not None
        return children(self.proc.pid)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)

    def client_ssl(self, cert=None) -> ssl.SSLContext:
        return self.ssl

    def api(self, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
        return api_call(self.http_port, self.ssl, method, path, token, body)


@pytest.fixture(params=["sqlcipher", "postgres"])
def gateway(request, tmp_path, oidc, mosquitto):
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else ""
    gw = WorkersGateway(tmp_path, oidc, mosquitto, request.param, dsn)
    gw.start()
    yield gw
    assert gw.stop() == 0, gw.log_text()
    assert "Traceback" not in gw.log_text(), gw.log_text()


async def _subscribers_on_both_workers(gw: WorkersGateway, token: str, topic: str) -> tuple[list[Paho], dict]:
    """Open subscribers until each worker holds at least two (the kernel picks the worker)."""
    held: dict[int, int] = {}
    subs: list[Paho] = []
    pids = gw.workers()
    assert len(pids) == 2
    deadline = time.monotonic() + 20
    for i in range(40):
        while True:  # a refusal: the grant, written through the other worker, is not in force here yet
            s = Paho(gw, f"bob-{i}", username="bob", password=token, version=V311)
            assert await s.connect() == 0
            if await s.subscribe(topic, 1) == [1]:
                break
            await s.close()
            assert time.monotonic() < deadline, "the grant did not reach every worker"
        subs.append(s)
        held = {pid: connections_held(pid, gw.port) for pid in pids}
        if len(subs) >= 6 and all(n >= 2 for n in held.values()):
            return subs, held
    raise AssertionError(f"the connections did not spread over both workers: {held}")


async def _let_in_by_every_worker(gw: WorkersGateway, device: str, key: str) -> None:
    """Registered through one worker: the device connects again until each worker has let it in once
    (the sentinel that the registration is in force everywhere)."""
    let_in: set[int] = set()
    deadline = time.monotonic() + 10
    while len(let_in) < 2:
        assert time.monotonic() < deadline, f"a key registered through one worker not let in by both: {let_in}"
        d = Paho(gw, device, username=device, password=key, version=V311)
        if await d.connect() == 0:
            let_in |= {pid for pid in gw.workers() if connections_held(pid, gw.port)}
        await d.close()


async def _round(device: Paho, subs: list[Paho], n: int) -> int:
    """Publish message ``n``; how many subscribers got it (each waits for a later sentinel too)."""
    payload = f"round {n}".encode()
    await device.publish("devices/w-thermo/telemetry", payload, qos=1)
    got = 0
    for s in subs:
        if any(m.payload == payload for m in await s.received_within(0.3)):
            got += 1
    return got


async def test_a_revocation_through_either_worker_stops_deliveries_on_both(gateway, oidc):
    gw = gateway
    alice, bob = oidc.password_token("alice"), oidc.password_token("bob")
    status, created = gw.api("POST", "/devices", alice, {"id": "w-thermo", "type": "Thermometer"})
    assert status == 201, created
    await _let_in_by_every_worker(gw, "w-thermo", created["k1"])
    status, grant = gw.api("POST", "/devices/w-thermo/delegations", alice, {"to": {"user": user_sub("bob")},
                                                                              "permission": "read"})
    assert status == 201, grant
    subs, held = await _subscribers_on_both_workers(gw, bob, "devices/w-thermo/telemetry")
    device = Paho(gw, "w-thermo", username="w-thermo", password=created["k1"], version=V311)
    assert await device.connect() == 0
    # The grant is in force on both workers: a round reaches every subscriber.
    n = 0
    deadline = time.monotonic() + 10
    while await _round(device, subs, n) < len(subs):
        assert time.monotonic() < deadline, f"the grant did not reach every worker ({held})"
        n += 1
    assert gw.api("DELETE", f"/devices/w-thermo/delegations/{grant['id']}", alice)[0] == 204
    revoked_at = time.monotonic()
    while await _round(device, subs, n := n + 1) > 0:
        assert time.monotonic() < revoked_at + 10, "the revocation did not reach every worker"
    for _ in range(3):  # and it stays so
        n += 1
        assert await _round(device, subs, n) == 0
    await device.close()
    for s in subs:
        await s.close()


async def test_a_worker_killed_is_started_again_and_the_listener_keeps_answering(gateway, oidc):
    gw = gateway
    alice = oidc.password_token("alice")
    status, created = gw.api("POST", "/devices", alice, {"id": "k-thermo", "type": "Thermometer"})
    assert status == 201, created
    await _let_in_by_every_worker(gw, "k-thermo", created["k1"])
    before = gw.workers()
    os.kill(before[0], signal.SIGKILL)
    # Once it is gone, the other worker answers every connection: TLS handshakes one after another
    # from then until the new worker is ready, and a few after, are all answered. "Gone" is the
    # supervisor's "died" line, not /proc: a killed process's main thread shows as a zombie while
    # its other threads still exit and its descriptors (the listening socket) are still open, and
    # a connection the kernel queues on that socket then is reset (SO_REUSEPORT's known limit;
    # net.ipv4.tcp_migrate_req=1 moves them, docs/scale-out.md). The supervisor hears of the death
    # only once every thread has exited.
    gw.wait_for_log("died (signal 9)")
    assert not _alive(before[0])
    answered = after_ready = 0
    deadline = time.monotonic() + 30
    while after_ready < 10:
        assert time.monotonic() < deadline, gw.log_text()
        ready = "ready again" in gw.log_text()
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw, \
                gw.ssl.wrap_socket(raw, server_hostname="127.0.0.1"):
            answered += 1
            after_ready += ready
        time.sleep(0.01)
    assert answered > after_ready  # some of them while the worker was being started again
    for _ in range(5):
        d = Paho(gw, "k-thermo", username="k-thermo", password=created["k1"], version=V311)
        assert await d.connect() == 0
        await d.close()
    after = gw.workers()
    assert len(after) == 2 and before[0] not in after and before[1] in after, (before, after)
    assert re.search(rf"worker \d \(pid {before[0]}\) died \(signal 9\)", gw.log_text()), gw.log_text()
    # The new worker loaded the device from the store: connections reaching it are let in too.
    served_by_new = 0
    for _ in range(40):
        d = Paho(gw, "k-thermo", username="k-thermo", password=created["k1"], version=V311)
        assert await d.connect() == 0
        new = [pid for pid in gw.workers() if pid not in before]
        served_by_new += sum(connections_held(pid, gw.port) for pid in new)
        await d.close()
        if served_by_new:
            break
    assert served_by_new, "the restarted worker took no connection"


def test_sigterm_stops_the_supervisor_and_every_worker(tmp_path, oidc, mosquitto):
    gw = WorkersGateway(tmp_path, oidc, mosquitto, "sqlcipher")
    gw.start()
    pids = gw.workers()
    assert len(pids) == 2
    assert gw.stop() == 0, gw.log_text()
    for pid in pids:
        assert not _alive(pid)
    assert "stopping 2 workers" in gw.log_text()
    assert "Traceback" not in gw.log_text(), gw.log_text()


async def test_workers_that_keep_dying_at_start_make_the_supervisor_give_up():
    """The supervisor with a worker command that exits at once: it gives up with one line."""
    from proxy import workers

    sup = workers.Supervisor([sys.executable, "-c", "raise SystemExit(3)"], 2, first_backoff=0.01)
    assert await sup.run() == 1
    assert sup.failure is not None and "died before it was ready 5 times in a row (last: exit status 3)" in \
        sup.failure, sup.failure
    assert not sup.ever_ready


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _listening_on(pid: int, port: int) -> bool:
    mine = _listening_inodes_of(pid)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port and fields[9] in mine:
            return True
    return False


async def test_the_metrics_port_answers_for_every_worker_and_readyz_for_the_host(tmp_path, oidc, mosquitto):
    # One scrape is the whole host: each worker's samples labelled with its index, not whichever
    # worker the kernel picked; /readyz is 503 while a worker is down, 200 once it is back.
    gw = WorkersGateway(tmp_path, oidc, mosquitto, "sqlcipher")
    gw.start()
    try:
        assert gw.proc is not None
        pids = gw.workers()
        assert _listening_on(gw.proc.pid, gw.metrics_port)
        assert not any(_listening_on(pid, gw.metrics_port) for pid in pids)
        env = dict(v.split("=", 1) for v in Path(f"/proc/{pids[0]}/environ").read_text().split("\0") if "=" in v)
        folder = Path(env["KEYGATE_WORKER_METRICS_DIR"])
        assert folder.stat().st_mode & 0o777 == 0o700
        for _ in range(3):  # every scrape: both workers
            status, text = _get(gw.metrics_port, "/metrics")
            assert status == 200
            for index in (1, 2):
                assert re.search(rf'^keygate_mqtt_connections_active\{{worker="{index}"\}} ', text, re.M), text
            assert 'keygate_workers{state="ready"} 2.0' in text and "keygate_workers_unreachable 0.0" in text
        status, body = _get(gw.metrics_port, "/readyz")
        ready = json.loads(body)
        assert status == 200 and ready["checks"] == {"worker 1": "ready", "worker 2": "ready"}, ready
        assert set(ready["workers"]) == {"1", "2"} and ready["workers"]["1"]["status"] == "ready"

        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _get(gw.metrics_port, "/readyz")[0] != 503:
            assert time.monotonic() < deadline, "/readyz stayed 200 with a worker down"
            time.sleep(0.02)
        gw.wait_for_log("ready again")
        status, body = _get(gw.metrics_port, "/readyz")
        assert status == 200, body
        status, text = _get(gw.metrics_port, "/metrics")
        restarted = [int(m) for m in re.findall(r'^keygate_worker_restarts_total\{worker="(\d)"\} 1\.0$', text, re.M)]
        assert len(restarted) == 1, text
    finally:
        assert gw.stop() == 0, gw.log_text()
    assert "Traceback" not in gw.log_text(), gw.log_text()
    assert not folder.exists()  # the sockets' folder goes with the supervisor
