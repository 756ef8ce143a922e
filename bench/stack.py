"""Everything a benchmark run talks to, started on loopback and torn down after.

* Mosquitto (``tests.rig.mosquitto.start_mosquitto``) with a plain listener
  (what keygate forwards to, and "direct") and a TLS listener with the same
  certificate keygate uses ("direct-tls"), so the broker's own TLS cost can be
  compared with keygate's;
* a token issuer (:mod:`bench.issuer`) that keygate fetches its JWKS from;
* the NGSI-v2 stand-in for Orion, in its own process;
* nginx (Debian's), one worker, TLS with the same certificate, a keep-alive
  reverse proxy to the same stand-in;
* keygate itself (:mod:`bench.gateway_proc`) in its own process, so that its
  CPU time and memory are read from ``/proc/<pid>`` alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.issuer import BenchIssuer

if TYPE_CHECKING:  # the test rig loads when the stack starts
    from tests.rig.mosquitto import Broker
    from tests.rig.pki import Pki

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CLK_TCK = os.sysconf("SC_CLK_TCK")

OWNER = "owner"        # owns every benchmark device
STRANGER = "stranger"  # owns one device of its own, may read none of the owner's


# --------------------------------------------------------------------------- /proc


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (nginx: the master and its worker;
    keygate serve --workers N: the supervisor and its workers)."""
    total = proc_cpu_seconds(pid)
    for child in _children(pid):
        try:
            total += proc_tree_cpu_seconds(child)
        except OSError:   # exited meanwhile
            pass
    return total


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def proc_tree_rss_kib(pid: int) -> int:
    """VmRSS of a process and its live children (keygate serve --workers N: the supervisor and its
    workers; pages they share, such as the interpreter's, are counted once per process)."""
    total = proc_rss_kib(pid)
    for child in _children(pid):
        try:
            total += proc_tree_rss_kib(child)
        except OSError:   # exited meanwhile
            pass
    return total


def _wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    from tests.rig.ports import wait_for_port

    wait_for_port(port, timeout=timeout, proc=proc)


def _free_port() -> int:
    from tests.rig.ports import free_port

    return free_port()


def _stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- the stack


@dataclass
class Target:
    """Where a load generator connects, as it goes into a load generator's spec."""

    host: str
    port: int
    tls: bool
    ca: str = ""

    def spec(self) -> dict:
        return {"host": self.host, "port": self.port, "tls": self.tls, "ca": self.ca}


@dataclass
class Stack:
    workdir: Path
    devices: int = 120
    keep: bool = False
    issuer: BenchIssuer = field(default_factory=BenchIssuer)
    broker: Broker | None = None
    broker_tls_port: int = 0
    standin: subprocess.Popen | None = None
    standin_port: int = 0
    nginx: subprocess.Popen | None = None
    nginx_port: int = 0
    relay: subprocess.Popen | None = None
    relay_port: int = 0
    http_relay: subprocess.Popen | None = None   # the same relay in front of the NGSI stand-in
    http_relay_port: int = 0
    keygate: subprocess.Popen | None = None
    keygate_mqtt_port: int = 0
    keygate_http_port: int = 0
    keygate_ws_port: int = 0
    hardened: bool = False  # keygate runs with HARDENED_MQTT (the "under attack" scenario)
    pki: Pki | None = None
    keys: dict[str, str] = field(default_factory=dict)  # device id -> K1, from keygate's store
    log: list[str] = field(default_factory=list)
    http_engine: str = "auto"  # httpload's engine: auto, wrk or python (python -m bench --http-engine)
    workers: int = 1  # keygate serve --workers N (python -m bench --workers); CPU figures then cover the tree

    # -- the parts start() made (every use below comes after it)
    @property
    def started_pki(self) -> Pki:
        assert self.pki is not None, "Stack.start() makes the PKI"
        return self.pki

    @property
    def started_broker(self) -> Broker:
        assert self.broker is not None, "Stack.start() starts the broker"
        return self.broker

    @staticmethod
    def _running(proc: subprocess.Popen[bytes] | None, what: str) -> subprocess.Popen[bytes]:
        assert proc is not None, f"{what} is not running"
        return proc

    # -- addresses
    @property
    def ca(self) -> str:
        return str(self.started_pki.ca)

    def mqtt_target(self, mode: str) -> Target:
        if mode == "direct":
            return Target("127.0.0.1", self.started_broker.port, False)
        if mode == "direct-tls":
            return Target("127.0.0.1", self.broker_tls_port, True, self.ca)
        if mode == "keygate":
            return Target("127.0.0.1", self.keygate_mqtt_port, True, self.ca)
        if mode == "relay":
            return Target("127.0.0.1", self.relay_port, True, self.ca)
        raise ValueError(mode)

    def http_base(self, mode: str) -> str:
        return {"direct": f"http://127.0.0.1:{self.standin_port}",
                "nginx": f"https://127.0.0.1:{self.nginx_port}",
                "keygate": f"https://127.0.0.1:{self.keygate_http_port}",
                "relay": f"https://127.0.0.1:{self.http_relay_port}"}[mode]

    def pid(self, what: str) -> int:
        procs = {"broker": self.started_broker.proc, "keygate": self.keygate, "relay": self.relay,
                 "nginx": self.nginx, "standin": self.standin, "http-relay": self.http_relay}
        return self._running(procs[what], what).pid

    def device(self, k: int) -> str:
        return f"bench-{k}"

    def token(self, username: str = OWNER, **kw) -> str:
        return self.issuer.token(username, **kw)

    # -- lifecycle
    def start(self, *, http: bool = True) -> None:
        from tests.rig.pki import make_pki

        self.pki = make_pki(self.workdir / "pki")
        self.issuer.start()
        self._start_broker()
        self._start_relay()
        if http:
            self._start_standin()
            self._start_nginx()
            self.http_relay, self.http_relay_port = self._relay_to(f"127.0.0.1:{self.standin_port}", "http-relay")
        self.start_keygate(http=http)

    def stop(self) -> None:
        _stop(self.keygate)
        _stop(self.relay)
        _stop(self.http_relay)
        _stop(self.nginx)
        _stop(self.standin)
        if self.broker is not None:
            self.broker.stop()
        self.issuer.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _start_broker(self) -> None:
        from tests.rig.mosquitto import start_mosquitto

        self.broker_tls_port = _free_port()
        # set_tcp_nodelay: as keygate does on its sockets; without it Nagle holds back small
        # writes (a CONNACK behind a TLS session ticket, a lone PUBLISH) for a delayed ACK.
        # sys_interval 1: $SYS counters (messages dropped by the broker) fresh within a second.
        extra = ["set_tcp_nodelay true", "sys_interval 1", f"listener {self.broker_tls_port} 127.0.0.1",
                 f"certfile {self.started_pki.server_cert}", f"keyfile {self.started_pki.server_key}"]
        if os.geteuid() == 0:
            extra.append("user root")  # else Mosquitto drops to its own user and cannot read the key
        self.broker = start_mosquitto(self.workdir / "mosquitto", extra)
        _wait_port(self.broker_tls_port, self.started_broker.proc)

    def _start_relay(self) -> None:
        self.relay, self.relay_port = self._relay_to(self.started_broker.address, "relay")

    def _relay_to(self, upstream: str, name: str) -> tuple[subprocess.Popen, int]:
        port = _free_port()
        log = open(self.workdir / f"{name}.log", "wb")
        pki = self.started_pki
        proc = subprocess.Popen([PYTHON, "-m", "bench.relay", "--listen", str(port), "--upstream", upstream,
                                 "--cert", str(pki.server_cert), "--key", str(pki.server_key)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        _wait_port(port, proc)
        return proc, port

    def _start_standin(self) -> None:
        self.standin_port = _free_port()
        log = open(self.workdir / "standin.log", "wb")
        self.standin = subprocess.Popen([PYTHON, "-m", "tests.rig.ngsi_standin", "--port", str(self.standin_port)],
                                        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _wait_port(self.standin_port, self.standin)
        for k in range(self.devices):
            body = json.dumps({"id": self.device(k), "type": "Sensor",
                               "temperature": {"type": "Number", "value": 20.5},
                               "humidity": {"type": "Number", "value": 40}}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{self.standin_port}/v2/entities", data=body,
                                         method="POST", headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=10).read()

    def _start_nginx(self) -> None:
        if not Path(NGINX).exists():
            self.log.append("nginx is not installed: the HTTP comparison leaves it out")
            return
        self.nginx_port = _free_port()
        prefix = self.workdir / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        conf.write_text(f"""{user}daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream standin {{ server 127.0.0.1:{self.standin_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{self.nginx_port} ssl;
        ssl_certificate {self.started_pki.server_cert};
        ssl_certificate_key {self.started_pki.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://standin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
        }}
    }}
}}
""")
        log = open(prefix / "logs" / "stderr.log", "wb")
        self.nginx = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf)], stdout=log,
                                      stderr=subprocess.STDOUT)
        _wait_port(self.nginx_port, self.nginx)

    def keygate_config(self, *, http: bool, hardened: bool = False) -> Path:
        d = self.workdir / "keygate"
        d.mkdir(parents=True, exist_ok=True)
        (d / "store.key").write_text(os.urandom(32).hex())
        self.keygate_mqtt_port = _free_port()
        self.keygate_http_port = _free_port() if http else 0
        http_section = f"""http:
  listen: 127.0.0.1:{self.keygate_http_port}
  upstream: http://127.0.0.1:{self.standin_port}
""" if http else ""
        text = f"""# Generated by python -m bench: keygate in front of the benchmark's Mosquitto and NGSI stand-in.
oidc:
  issuer: {self.issuer.issuer}
  discovery_url: {self.issuer.discovery_url}
  audience: iot-proxy
  algorithms: [ES256]
  roles: [realm_access.roles]
  token_cache_size: 100000
tls:
  cert: {self.started_pki.server_cert}
  key: {self.started_pki.server_key}
mqtt:
  listen: 127.0.0.1:{self.keygate_mqtt_port}
  upstream: 127.0.0.1:{self.started_broker.port}
  connect_timeout_seconds: 60
  max_keepalive_seconds: 3600
  max_connections: 19000
  # The benchmark's publishers share one identity; the per-identity limit is
  # a protection against a runaway client, not what is measured here.
  rate_limit: {{messages_per_second: 100000000, burst: 100000000}}
  # Every benchmark client connects from 127.0.0.1, as if behind a load balancer that hides
  # addresses: the per-address limits on unauthenticated connections are off.
  # connections_per_identity off too: the memory scenario holds 8,000 connections of one identity.
  limits: {{unauthenticated_per_address: 0, unauthenticated_rate_per_address: 0, connections_per_identity: 0}}
{http_section}store:
  path: {d / "ownership.db"}
  key_file: {d / "store.key"}
ownership:
  max_devices_per_user: {self.devices + 10}
policies:
  dir: {REPO / "policies"}
  watch: false
audit:
  path: {d / "audit.log"}
"""
        if hardened:
            self.keygate_ws_port = _free_port()
            text = harden(text, self.keygate_ws_port)
        path = d / "keygate.yaml"
        path.write_text(text)
        devices = [{"owner": OWNER, "id": self.device(k)} for k in range(self.devices)]
        devices.append({"owner": STRANGER, "id": "stranger-0"})
        (d / "devices.json").write_text(json.dumps(devices))
        return path

    def start_keygate(self, *, http: bool = True, hardened: bool = False) -> None:
        _stop(self.keygate)
        shutil.rmtree(self.workdir / "keygate", ignore_errors=True)
        self.hardened = hardened
        config = self.keygate_config(http=http, hardened=hardened)
        ready = config.parent / "ready.json"
        log = open(config.parent / "keygate.log", "ab")
        self.keygate = subprocess.Popen([PYTHON, "-m", "bench.gateway_proc", "-c", str(config),
                                         "--devices", str(config.parent / "devices.json"), "--ready", str(ready),
                                         "--workers", str(self.workers)],
                                        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.keygate.poll() is not None:
                raise RuntimeError("keygate exited before listening:\n" + self.keygate_log_tail())
            if time.monotonic() > deadline:
                raise RuntimeError("keygate did not get ready in 60 s:\n" + self.keygate_log_tail())
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.keygate_mqtt_port = info.get("mqtt_port") or self.keygate_mqtt_port
        self.keygate_http_port = info.get("http_port") or self.keygate_http_port
        self.keys = info.get("keys", {})

    def device_cred(self, k: int) -> dict:
        """A device connects as itself: client id = username = device id, password = K1."""
        dev = self.device(k)
        return {"client_id": dev, "username": dev, "password": self.keys.get(dev, "")}

    def keygate_log_tail(self, lines: int = 30) -> str:
        path = self.workdir / "keygate" / "keygate.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# The "under attack" scenario's keygate: the settings of a deployment facing the internet (the
# defaults, stated), instead of the throughput scenarios' (one identity publishing 10^5 msg/s, one
# address opening thousands of connections, a minute to finish a CONNECT).
HARDENED_MQTT = """  websocket_listen: 127.0.0.1:{ws_port}
  connect_timeout_seconds: 10
  max_connections: 5000
  rate_limit: {{messages_per_second: 200, burst: 400, action: disconnect}}
  limits:
    connect_max_bytes: 32768
    client_id_max_bytes: 256
    topic_max_bytes: 1024
    subscriptions_per_connection: 100
    subscriptions_per_identity: 1000
    unauthenticated_per_address: 64
    unauthenticated_rate_per_address: 20
    unauthenticated_burst_per_address: 40
"""


def harden(text: str, ws_port: int) -> str:
    """``text`` (a generated keygate.yaml) with its mqtt tuning, everything after ``upstream``,
    replaced by HARDENED_MQTT."""
    import re

    return re.sub(r"(?ms)^(mqtt:\n  listen: [^\n]*\n  upstream: [^\n]*\n).*?(?=^\S)",
                  lambda m: m.group(1) + HARDENED_MQTT.format(ws_port=ws_port), text, count=1)


def new_stack(keep: bool = False, devices: int = 120) -> Stack:
    return Stack(Path(tempfile.mkdtemp(prefix="keygate-bench-")), devices=devices, keep=keep)
