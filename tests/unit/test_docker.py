"""The Docker deployment: compose file valid, isolated, and in agreement with keygate's config.

``docker-compose config`` (Debian's 1.29) validates and interpolates the file
without an engine. The rest parses the result and checks what an attacker on
the host network would try: reaching Mosquitto, Orion or MongoDB directly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.config import load_config, parse_hostport

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
SECRETS = {
    "KEYGATE_STORE_KEY": "ab" * 32,
    "KEYCLOAK_PUBLIC_URL": "https://keycloak.example.org",
    "KEYCLOAK_ADMIN_PASSWORD": "admin-secret",
    "KEYCLOAK_DB_PASSWORD": "db-secret",
}
BACKENDS = ("mosquitto", "orion", "mongo", "keycloak", "keycloak-db")


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed (apt-get install docker-compose); "
                    "scripts/setup --test installs it")
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run([exe, "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True,
                          env=clean, timeout=60, cwd=ROOT)


@pytest.fixture(scope="module")
def compose() -> dict:
    result = compose_config(SECRETS)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def keygate_config(compose):
    env = {k: str(v) for k, v in compose["services"]["keygate"]["environment"].items()}
    return load_config(DOCKER / "proxy.yaml", env=env)


def test_compose_refuses_to_start_without_the_store_key():
    result = compose_config({k: v for k, v in SECRETS.items() if k != "KEYGATE_STORE_KEY"})
    assert result.returncode != 0
    assert "KEYGATE_STORE_KEY" in result.stderr


def test_compose_file_version_suits_compose_1_29():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    major, minor = (int(x) for x in raw["version"].split("."))
    assert (major, minor) <= (3, 8)


def test_only_keygate_is_published(compose):
    published = {name for name, svc in compose["services"].items() if svc.get("ports")}
    assert published == {"keygate"}


@pytest.mark.parametrize("name", BACKENDS)
def test_backends_only_on_the_internal_network(compose, name):
    svc = compose["services"][name]
    assert set(svc["networks"]) == {"internal"}
    assert "ports" not in svc
    assert "network_mode" not in svc


def test_internal_network_has_no_route_out(compose):
    assert compose["networks"]["internal"]["internal"] is True
    assert set(compose["services"]["keygate"]["networks"]) == {"edge", "internal"}


def published_ports(svc: dict) -> set[int]:
    out = set()
    for p in svc["ports"]:
        if isinstance(p, dict):
            out.add(int(p["target"]))
        else:
            out.add(int(str(p).rsplit(":", 1)[-1].split("/")[0]))
    return out


def test_published_ports_are_the_listeners(compose, keygate_config):
    listeners = {parse_hostport(keygate_config.mqtt.listen)[1],
                 parse_hostport(keygate_config.mqtt.websocket_listen)[1],
                 parse_hostport(keygate_config.http.listen)[1]}
    assert published_ports(compose["services"]["keygate"]) == listeners
    # Metrics stay inside: /metrics reveals traffic patterns.
    assert parse_hostport(keygate_config.metrics.listen)[1] not in published_ports(compose["services"]["keygate"])


def test_config_upstreams_are_compose_services(compose, keygate_config):
    host, port = parse_hostport(keygate_config.mqtt.upstream)
    assert host == "mosquitto" and str(port) in compose["services"]["mosquitto"]["expose"]
    m = re.match(r"http://([^:/]+):(\d+)$", keygate_config.http.upstream)
    assert m and m.group(1) == "orion" and m.group(2) in compose["services"]["orion"]["expose"]
    m = re.match(r"http://([^:/]+):(\d+)/realms/iot/", keygate_config.oidc.discovery_url)
    assert m and m.group(1) == "keycloak" and m.group(2) in compose["services"]["keycloak"]["expose"]


def test_issuer_is_keycloaks_public_hostname(compose, keygate_config):
    kc_env = compose["services"]["keycloak"]["environment"]
    assert keygate_config.oidc.issuer == kc_env["KC_HOSTNAME"] + "/realms/iot"
    assert kc_env["KC_HOSTNAME_BACKCHANNEL_DYNAMIC"] == "true"


def test_secrets_come_from_the_environment(compose, keygate_config):
    env = compose["services"]["keygate"]["environment"]
    assert env["KEYGATE_STORE_KEY"] == SECRETS["KEYGATE_STORE_KEY"]
    assert keygate_config.store.key == SECRETS["KEYGATE_STORE_KEY"]
    # Every variable docker/proxy.yaml needs without a default is passed in.
    text = (DOCKER / "proxy.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    assert required and required <= set(env)
    optional = set(re.findall(r"\$\{([A-Z0-9_]+):-", text))
    assert optional <= set(env) | {"KEYGATE_TLS_CLIENT_CA", "KEYGATE_TLS_CLIENT_CA_KEY", "KEYGATE_FIWARE_SERVICE",
                                   "KEYGATE_ADVERTISE_MQTT", "KEYGATE_ADVERTISE_HTTP"}


def test_keycloak_imports_the_shipped_realm(compose):
    kc = compose["services"]["keycloak"]
    assert "--import-realm" in kc["command"]
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in kc["volumes"]]
    assert any(m.startswith(str(ROOT / "keycloak-realm")) and ":/opt/keycloak/data/import" in m for m in mounts)


def test_mosquitto_listens_where_keygate_points(keygate_config):
    conf = (DOCKER / "mosquitto.conf").read_text()
    listeners = re.findall(r"^listener\s+(\d+)", conf, re.M)
    assert listeners == [str(parse_hostport(keygate_config.mqtt.upstream)[1])]


def test_config_paths_are_mounted(compose, keygate_config):
    targets = {v.split(":")[1] if isinstance(v, str) else v["target"]
               for v in compose["services"]["keygate"]["volumes"]}
    assert "/etc/keygate/certs" in targets and "/etc/keygate/policies" in targets
    assert "/var/lib/keygate" in targets
    assert keygate_config.tls.cert.startswith("certs/")
    assert keygate_config.store.path.startswith("/var/lib/keygate/")


# --------------------------------------------------------------------------- Dockerfile


@pytest.fixture(scope="module")
def stages() -> list[list[str]]:
    """The Dockerfile's stages, each a list of instructions (continuations joined)."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    out: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out


def test_dockerfile_is_multi_stage_on_slim(stages):
    assert len(stages) == 2
    assert "--mount" not in " ".join(stages[1])  # the classic builder (docker-compose 1.29) must work too
    assert stages[0][0].startswith("FROM python:3.11-slim AS builder")
    assert stages[1][0] == "FROM python:3.11-slim"


def test_final_stage_runs_as_non_root_without_build_tools(stages):
    final = stages[1]
    users = [i.split()[1] for i in final if i.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    text = " ".join(final)
    for tool in ("apt-get", "gcc", "build-essential", "pip install", "COPY proxy/", "COPY ownership/"):
        assert tool not in text
    # Only the builder's finished virtualenv comes across, without pip in it.
    assert "COPY --from=builder /opt/keygate /opt/keygate" in final
    assert "pip uninstall -y pip setuptools wheel" in " ".join(stages[0])


def test_healthcheck_hits_healthz_on_the_metrics_listener(stages, keygate_config):
    checks = [i for i in stages[1] if i.startswith("HEALTHCHECK")]
    assert len(checks) == 1
    port = parse_hostport(keygate_config.metrics.listen)[1]
    assert f":{port}/healthz" in checks[0]


def test_dockerfile_copies_exist_and_are_in_the_context(stages):
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for stage in stages:
        for instr in stage:
            if instr.startswith("COPY ") and "--from" not in instr:
                for src in instr.split()[1:-1]:
                    assert (ROOT / src).exists(), src
                    assert f"!{src}" in ignore, f"{src} is excluded from the build context"
