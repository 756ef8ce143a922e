"""A real Mosquitto (Debian's package) on a free loopback port, for the test session.

``mosquitto`` fixture: session-scoped broker with anonymous access (the
gateway is its only security). ``mosquitto_factory`` starts extra brokers with
custom config lines. Logs are kept in the temp dir and printed on failure.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.rig.ports import free_port, wait_for_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass
class Broker:
    host: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_mosquitto(workdir: Path, extra: list[str] | None = None) -> Broker:
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed (apt-get install mosquitto); the test command installs it")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / f"mosquitto-{port}.conf"
    log = workdir / f"mosquitto-{port}.log"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "max_queued_messages 100000",
        "max_inflight_messages 0",
        *(extra or []),
    ]
    conf.write_text("\n".join(lines) + "\n")
    logf = open(log, "wb")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"mosquitto did not start: {log.read_text(errors='replace')}") from None
    return Broker("127.0.0.1", port, proc, log)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    broker = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto_factory(tmp_path):
    started: list[Broker] = []

    def start(extra: list[str] | None = None) -> Broker:
        b = start_mosquitto(tmp_path / "mosq", extra)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()
