"""``keygate check``: against a healthy stack (real OIDC provider, real Mosquitto, the NGSI
stand-in), then against each failure it names, each with its one-line reason.

The checks run in-process (:func:`proxy.check.run_checks`, what the command runs); one
test runs the command itself for the exit status and ``--json``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.check import run_checks
from tests.integration.test_serve import KEYGATE, ROOT, Stack
from tests.rig.ports import free_port, wait_for_port

pytestmark = pytest.mark.integration


@pytest.fixture
def healthy(tmp_path, oidc, mosquitto, monkeypatch):
    """The serve test's configuration with Orion running and the store made (no gateway)."""
    s = Stack(tmp_path, oidc, mosquitto)
    orion = subprocess.Popen([sys.executable, "-m", "tests.rig.ngsi_standin", "--port", str(s.orion_port)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s.procs.append(orion)
    wait_for_port(s.orion_port, proc=orion)
    monkeypatch.setenv("KEYGATE_STORE_KEY", s.env["KEYGATE_STORE_KEY"])
    from ownership.store import Store

    (tmp_path / "data").mkdir()
    Store.open(tmp_path / "data" / "ownership.db", s.env["KEYGATE_STORE_KEY"]).close()
    yield s
    s.stop()


def check(stack: Stack) -> dict[str, tuple[str, str]]:
    return {r.name: (r.status, r.detail) for r in asyncio.run(run_checks(stack.config))}


def edit(stack: Stack, old: str, new: str) -> None:
    text = stack.config.read_text()
    assert old in text
    stack.config.write_text(text.replace(old, new))


def test_healthy_stack_every_check_ok(healthy):
    results = check(healthy)
    assert set(results) == {"config", "tls", "store", "ports", "issuer", "broker", "orion", "policies", "open files"}
    assert {name: status for name, (status, _) in results.items()} == dict.fromkeys(results, "ok"), results
    assert "schema version" in results["store"][1]
    assert "valid until" in results["tls"][1] and "covers 127.0.0.1" in results["tls"][1]
    assert "ES256" in results["issuer"][1] or "RS256" in results["issuer"][1]


def test_command_exit_status_and_json(healthy):
    env = {**healthy.env}
    r = subprocess.run([*KEYGATE, "check", "-c", str(healthy.config)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 9 and all(line.startswith("ok   ") for line in lines), r.stdout
    edit(healthy, f"upstream: http://127.0.0.1:{healthy.orion_port}", f"upstream: http://127.0.0.1:{free_port()}")
    r = subprocess.run([*KEYGATE, "check", "-c", str(healthy.config), "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    assert [c["status"] for c in doc["checks"] if c["name"] == "orion"] == ["fail"]


def test_issuer_down(healthy, oidc):
    edit(healthy, oidc.issuer, f"http://127.0.0.1:{free_port()}/realms/iot")
    status, detail = check(healthy)["issuer"]
    assert status == "fail" and detail.startswith("oidc.issuer: discovery http://127.0.0.1:")
    assert "\n" not in detail


def test_algorithms_the_issuer_does_not_offer(healthy):
    edit(healthy, "oidc:\n", "oidc:\n  algorithms: [ES512]\n")
    status, detail = check(healthy)["issuer"]
    assert status == "fail" and "fits oidc.algorithms ['ES512']" in detail


def test_a_discovery_document_naming_another_issuer_warns_as_serve_does(healthy, oidc):
    """Split horizon: the gateway reads discovery at an internal address whose document names the
    public issuer. serve only warns (iss stays pinned to oidc.issuer), so check must not fail it."""
    public = "https://id.example.org/realms/iot"
    edit(healthy, oidc.issuer, public)
    edit(healthy, "oidc:\n", f"oidc:\n  discovery_url: {oidc.issuer}/.well-known/openid-configuration\n")
    status, detail = check(healthy)["issuer"]
    assert status == "warn" and f"names issuer {oidc.issuer!r}" in detail and public in detail, detail


def test_wrong_store_key(healthy, monkeypatch):
    monkeypatch.setenv("KEYGATE_STORE_KEY", "not-the-key")
    assert check(healthy)["store"] == ("fail", "store data/ownership.db: wrong key or not a keygate store")


def test_store_is_never_created(healthy):
    store = healthy.workdir / "data" / "ownership.db"
    store.unlink()
    status, detail = check(healthy)["store"]
    assert status == "warn" and "does not exist yet" in detail
    assert not store.exists()


def test_broker_down(healthy, mosquitto):
    edit(healthy, f"upstream: {mosquitto.address}", f"upstream: 127.0.0.1:{free_port()}")
    status, detail = check(healthy)["broker"]
    assert status == "fail" and detail.startswith("mqtt.upstream 127.0.0.1:") and "cannot connect" in detail


def test_orion_down(healthy):
    edit(healthy, f"upstream: http://127.0.0.1:{healthy.orion_port}", f"upstream: http://127.0.0.1:{free_port()}")
    status, detail = check(healthy)["orion"]
    assert status == "fail" and detail.startswith("http.upstream http://127.0.0.1:") and "cannot reach" in detail


def test_port_taken(healthy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", healthy.metrics_port))
        s.listen()
        status, detail = check(healthy)["ports"]
    assert status == "fail"
    assert detail == f"cannot listen: metrics.listen 127.0.0.1:{healthy.metrics_port}: address already in use"


def expired_pair(folder: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    (folder / "old.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "old.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))


def test_expired_certificate(healthy):
    expired_pair(healthy.certs)
    edit(healthy, "cert: certs/server.crt\n  key: certs/server.key", "cert: certs/old.crt\n  key: certs/old.key")
    status, detail = check(healthy)["tls"]
    assert status == "fail" and detail.startswith(f"tls.cert {healthy.certs / 'old.crt'}: expired on ")


def test_missing_certificate_names_key_and_path(healthy):
    edit(healthy, "cert: certs/server.crt", "cert: certs/nothing.crt")
    assert check(healthy)["tls"] == ("fail", f"tls.cert: no such file: {healthy.certs / 'nothing.crt'}")


def test_names_not_covered_warn(healthy):
    edit(healthy, f"advertise_mqtt: mqtts://127.0.0.1:{healthy.mqtt_port}",
         f"advertise_mqtt: mqtts://mqtt.example.org:{healthy.mqtt_port}")
    status, detail = check(healthy)["tls"]
    assert status == "warn" and "does not cover mqtt.example.org" in detail


def test_broken_policy(healthy):
    (healthy.policies / "broken.yaml").write_text("version: 1\nrules:\n  - id: x\n    subjects: [nobody-knows]\n"
                                                  "    mqtt: {topics: ['a/#'], actions: [publish]}\n")
    status, detail = check(healthy)["policies"]
    assert status == "fail" and "broken.yaml:" in detail and "\n" not in detail


def test_shadowed_rule_warns_as_a_reload_would_accept_it(healthy):
    # A deny covering an allow: `keygate policy check` fails on it, but the loader that serve and
    # a reload share accepts the set, so the start is not stricter than a reload (a warning).
    (healthy.policies / "shadowed.yaml").write_text(
        "version: 1\nrules:\n"
        "  - id: no-lab\n    effect: deny\n    subjects: [anyone]\n    mqtt: {topics: ['lab/#'], actions: [publish]}\n"
        "  - id: lab-sensor\n    subjects: [anyone]\n    mqtt: {topics: ['lab/x'], actions: [publish]}\n")
    from proxy.policy.checker import check_dir

    assert any("shadowed" in str(f) and f.error for f in check_dir(healthy.policies))
    status, detail = check(healthy)["policies"]
    assert status == "warn" and "'lab-sensor' is shadowed by deny rule 'no-lab'" in detail, detail


def test_serve_does_not_wait_on_a_silent_broker(healthy, mosquitto, monkeypatch):
    # A broker that accepts and never answers: `keygate check` waits for it (mqtt connect timeout),
    # serve's preflight gives the remote checks a budget and goes on with a warning.
    import proxy.check as check_module
    from proxy.config import load_config

    silent = socket.create_server(("127.0.0.1", 0))
    try:
        edit(healthy, f"upstream: {mosquitto.address}", f"upstream: 127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(check_module, "PREFLIGHT_REMOTE_BUDGET", 0.5)
        found = asyncio.run(check_module.preflight(load_config(healthy.config)))
        results = {r.name: (r.status, r.detail) for r in found}
        assert results["broker"] == ("warn", "no answer within 0.5 s; keygate check waits longer")
        assert results["issuer"][0] == "ok" and results["policies"][0] == "ok"
    finally:
        silent.close()


def test_bad_config_is_the_only_line(tmp_path):
    bad = tmp_path / "proxy.yaml"
    bad.write_text("oidc:\n  issuer: https://id.example.org/realms/iot\n  audiance: iot-proxy\n")
    results = asyncio.run(run_checks(bad))
    assert [(r.name, r.status, r.detail) for r in results] == [
        ("config", "fail", f"{bad}:3: oidc.audiance: unknown key (did you mean audience?)")]
