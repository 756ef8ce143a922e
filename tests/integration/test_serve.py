"""``keygate serve`` as an operator runs it: one process, a proxy.yaml, every listener.

End to end through the real parts: the real test OIDC provider, a real
Mosquitto, the NGSI stand-in as its own process, the ``mosquitto_pub`` /
``mosquitto_sub`` command-line clients and plain HTTPS. What this adds to the
component tests is the wiring: configuration to listeners, the ownership API
mounted beside the NGSI gateway, a registration through the API taking effect
on the MQTT gateway, metrics and audit on, and a clean exit on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.rig.api import api_call
from tests.rig.ports import free_port, wait_for_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
KEYGATE = [sys.executable, "-m", "proxy"]
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
STDBUF = shutil.which("stdbuf") or "/usr/bin/stdbuf"


class Stack:
    def __init__(self, workdir: Path, oidc, mosquitto):
        self.workdir = workdir
        self.certs = workdir / "certs"
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.orion_port = free_port()
        self.audit = workdir / "audit.log"
        self.policies = workdir / "policies"
        shutil.copytree(ROOT / "policies", self.policies)
        subprocess.run([*KEYGATE, "certs", "init", str(self.certs)], check=True, cwd=ROOT,
                       capture_output=True)
        self.config = workdir / "proxy.yaml"
        self.config.write_text(oidc.config_yaml() + f"""
tls:
  cert: certs/server.crt
  key: certs/server.key
  client_ca: certs/devices-ca.crt
mqtt:
  listen: 127.0.0.1:{self.mqtt_port}
  upstream: {mosquitto.address}
  max_connections: 1000  # serve refuses a configuration that cannot fit the open-file limit
http:
  listen: 127.0.0.1:{self.http_port}
  upstream: http://127.0.0.1:{self.orion_port}
store:
  path: data/ownership.db
  key: ${{KEYGATE_STORE_KEY}}
ownership:
  advertise_mqtt: mqtts://127.0.0.1:{self.mqtt_port}
  advertise_http: https://127.0.0.1:{self.http_port}
policies:
  dir: policies/
  watch: true
audit:
  path: audit.log
metrics:
  listen: 127.0.0.1:{self.metrics_port}
""")
        self.env = {**os.environ, "KEYGATE_STORE_KEY": "serve-test-store-key"}
        self.procs: list[subprocess.Popen] = []
        self.log = workdir / "keygate.log"
        self.ssl = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))

    def start(self) -> None:
        orion = subprocess.Popen([sys.executable, "-m", "tests.rig.ngsi_standin", "--port", str(self.orion_port)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(orion)
        wait_for_port(self.orion_port, proc=orion)
        self.gateway = subprocess.Popen([*KEYGATE, "serve", "-c", str(self.config)], cwd=ROOT, env=self.env,
                                        stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.procs.append(self.gateway)
        for port in (self.metrics_port, self.http_port, self.mqtt_port):
            wait_for_port(port, proc=self.gateway, timeout=30)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()

    def api(self, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
        return api_call(self.http_port, self.ssl, method, path, token, body)

    def ngsi(self, method: str, path: str, token: str, body: dict | list | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {token}"}
        if data:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(f"https://127.0.0.1:{self.http_port}{path}", data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def mqtt_args(self, username: str, password: str) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.mqtt_port), "--cafile", str(self.certs / "ca.crt"),
                "-u", username, "-P", password, "-V", "mqttv311"]


@pytest.fixture
def stack(tmp_path, oidc, mosquitto):
    s = Stack(tmp_path, oidc, mosquitto)
    s.start()
    yield s
    s.stop()
    if s.gateway.returncode not in (0, None, -signal.SIGTERM):
        print(s.log.read_text(errors="replace"))


def test_serve_wires_api_mqtt_ngsi_metrics_and_audit(stack, oidc):
    alice = oidc.password_token("alice")
    bob = oidc.password_token("bob")

    status, created = stack.api("POST", "/devices", alice, {"id": "serve-thermo", "type": "Thermometer"})
    assert status == 201, created
    k1 = created["k1"]
    assert created["mqtt"] == f"mqtts://127.0.0.1:{stack.mqtt_port}"

    # The owner subscribes with her token; the device publishes with K1.
    # Line-buffered (stdbuf): mosquitto_sub's stdout to a pipe is otherwise written only at its exit.
    sub = subprocess.Popen([STDBUF, "-oL", MOSQUITTO_SUB, *stack.mqtt_args("alice", alice),
                            "-t", "devices/serve-thermo/telemetry", "-C", "1", "-W", "15", "-d"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert sub.stdout is not None
    # The SUBACK (-d prints "Subscribed (mid: 1): <granted QoS>"), not a pause: the subscription is in place.
    debug: list[bytes] = []
    for line in iter(sub.stdout.readline, b""):
        debug.append(line)
        if line.startswith(b"Subscribed (mid: 1): "):
            break
    assert debug and debug[-1].strip() == b"Subscribed (mid: 1): 0", debug
    pub = subprocess.run([MOSQUITTO_PUB, *stack.mqtt_args("serve-thermo", k1), "-t", "devices/serve-thermo/telemetry",
                          "-m", '{"t": 21.5}', "-q", "1"], capture_output=True, timeout=15)
    assert pub.returncode == 0, pub.stderr
    out, err = sub.communicate(timeout=20)
    payloads = [line for line in out.splitlines() if not line.startswith(b"Client ")]  # -d's lines
    assert payloads == [b'{"t": 21.5}'], (out, err)

    # Another user cannot read it: the subscription is refused (SUBACK 0x80) and nothing arrives.
    bob_sub = subprocess.run([MOSQUITTO_SUB, *stack.mqtt_args("bob", bob), "-t", "devices/serve-thermo/telemetry",
                              "-C", "1", "-W", "3", "-d"], capture_output=True, timeout=20)
    assert b"Subscribed (mid: 1): 128" in bob_sub.stdout, bob_sub.stdout

    # NGSI: the device's entity through the HTTP gateway, for the owner only; ids do not leak.
    status, _ = stack.ngsi("POST", "/v2/entities", alice,
                           {"id": "serve-thermo", "type": "Thermometer", "t": {"value": 21.5, "type": "Number"}})
    assert status == 201
    status, body = stack.ngsi("GET", "/v2/entities/serve-thermo", alice)
    assert status == 200 and json.loads(body)["id"] == "serve-thermo"
    status, _ = stack.ngsi("GET", "/v2/entities/serve-thermo", bob)
    assert status in (403, 404)
    status, body = stack.ngsi("GET", "/v2/entities", bob)
    assert status == 200 and json.loads(body) == []
    status, _ = stack.api("GET", "/devices/serve-thermo", bob)
    assert status == 404

    # Metrics and readiness on their own listener.
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/readyz", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=5) as r:
        assert b"keygate_" in r.read()

    # The audit log has the registration and the refusals, and never a key or a token.
    audit = stack.audit.read_text()
    records = [json.loads(line) for line in audit.splitlines()]
    assert any(r["decision"] == "deny" and r.get("protocol") == "mqtt" for r in records)
    assert k1 not in audit and alice not in audit and bob not in audit


def test_serve_stops_cleanly_on_sigterm(stack):
    stack.gateway.send_signal(signal.SIGTERM)
    assert stack.gateway.wait(15) == 0
    assert "Traceback" not in stack.log.read_text(errors="replace")


def test_serve_refuses_a_bad_config_with_one_line(tmp_path):
    bad = tmp_path / "proxy.yaml"
    bad.write_text("oidc:\n  issuer: https://id.example.org/realms/iot\n  audiance: iot-proxy\n")
    r = subprocess.run([*KEYGATE, "serve", "-c", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip() == f"keygate: {bad}:3: oidc.audiance: unknown key (did you mean audience?)"


def test_serve_refuses_a_wrong_store_key(stack, tmp_path):
    stack.stop()
    env = {**stack.env, "KEYGATE_STORE_KEY": "not-the-key"}
    r = subprocess.run([*KEYGATE, "serve", "-c", str(stack.config)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1
    assert "wrong key" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_serve_with_the_metrics_port_taken_is_one_line_and_leaves_no_store(tmp_path, oidc, mosquitto):
    """Was a raw OSError traceback, after data/ownership.db had been created (so the next try with
    another key said "wrong key")."""
    import socket

    s = Stack(tmp_path, oidc, mosquitto)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", s.metrics_port))
        taken.listen()
        r = subprocess.run([*KEYGATE, "serve", "-c", str(s.config)], cwd=ROOT, env=s.env, capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"keygate: cannot listen: metrics.listen 127.0.0.1:{s.metrics_port}: address already in use")
    assert [line for line in r.stderr.splitlines() if line.startswith("keygate:")] == \
        r.stderr.strip().splitlines()[-1:]
    assert not (tmp_path / "data" / "ownership.db").exists()
    assert not (tmp_path / "audit.log").exists()


def test_serve_with_a_missing_certificate_names_key_and_path(tmp_path, oidc, mosquitto):
    """Was "tls.cert/tls.key: no such file: None"."""
    s = Stack(tmp_path, oidc, mosquitto)
    (s.certs / "server.crt").unlink()
    r = subprocess.run([*KEYGATE, "serve", "-c", str(s.config)], cwd=ROOT, env=s.env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"keygate: tls.cert: no such file: {s.certs / 'server.crt'}"
    assert not (tmp_path / "data").exists()


async def test_a_start_that_fails_after_the_store_was_made_removes_it(tmp_path, oidc, mosquitto, monkeypatch):
    """The port taken between the preflight and the listener (a race): one line naming key and
    port, and the store this start created is gone again."""
    import socket

    from proxy import app
    from proxy.config import ConfigError, load_config

    s = Stack(tmp_path, oidc, mosquitto)
    monkeypatch.setenv("KEYGATE_STORE_KEY", s.env["KEYGATE_STORE_KEY"])
    config = load_config(s.config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", s.http_port))
        taken.listen()
        with pytest.raises(ConfigError, match=f"^http.listen 127.0.0.1:{s.http_port}: cannot listen: "):
            await app._serve_until_signal(config)
    assert not (tmp_path / "data" / "ownership.db").exists()
    assert not (tmp_path / "audit.log").exists()
