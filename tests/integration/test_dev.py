"""``keygate dev`` end to end: started as a user would, its printed commands run as printed.

The stack runs as a subprocess (``python -m proxy dev``, what the ``keygate``
script runs); the test reads its output, takes the ``mosquitto_sub``,
``mosquitto_pub`` and ``curl`` lines it printed and runs them with the real
clients. Then Ctrl-C (SIGINT) must leave no process behind.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import load_config
from proxy.dev import pick_port, render_config, running_pid
from proxy.dev_issuer import DevIssuer, SigningKey, subject_of
from proxy.errors import CommandError
from proxy.identity.model import AuthError, AuthReason

ROOT = Path(__file__).resolve().parents[2]
READY_LINE = "Ctrl-C stops keygate dev"
START_TIMEOUT = 60


def children_of(pid: int) -> set[int]:
    """Every live process whose parent is ``pid``."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Stack:
    proc: subprocess.Popen
    data: Path
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def read_until(self, marker: str, timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if marker in line:
                return line
        raise AssertionError(f"keygate dev did not print {marker!r}; output:\n" + "".join(self.lines))

    def printed(self, program: str) -> list[list[str]]:
        return [shlex.split(line) for line in self.lines if line.startswith(program + " ")]

    @property
    def mosquitto_pid(self) -> int:
        line = next(line for line in self.lines if "mosquitto (pid " in line)
        return int(line.split("mosquitto (pid ", 1)[1].split(")", 1)[0])

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("keygate dev did not stop within 20 s of " + signal.Signals(sig).name) from None
        return self.proc.returncode


def start_dev(data: Path, *extra: str, random_ports: bool = True) -> Stack:
    """``keygate dev`` on ``data``; on free ports unless ``random_ports`` is false (its defaults)."""
    ports = ["--mqtt-port", str(pick_port(0)), "--http-port", str(pick_port(0)),
             "--metrics-port", str(pick_port(0))] if random_ports else []
    cmd = [sys.executable, "-m", "proxy", "dev", "--data", str(data), "--policies", str(ROOT / "policies"),
           *ports, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=data.parent,
                            env=dev_env())
    stack = Stack(proc, data)

    def pump() -> None:
        assert proc.stdout is not None  # a pipe
        for line in proc.stdout:
            stack._queue.put(line)
        stack._queue.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        stack.read_until(READY_LINE)
    except BaseException:
        stack.stop(signal.SIGKILL)
        raise
    return stack


def dev_env() -> dict[str, str]:
    """The environment with this source tree importable (also when keygate is not pip-installed)."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} is not installed; scripts/setup installs it")
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need("mosquitto_sub"), need("curl")
    s = start_dev(tmp_path_factory.mktemp("dev") / "keygate-dev")
    yield s
    s.stop(signal.SIGINT)


def run(argv: list[str], timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- the printed commands


@pytest.mark.integration
def test_banner_says_not_for_production(stack):
    assert "NOT FOR PRODUCTION" in stack.lines[1]
    assert any("keygate dev is ready (NOT FOR PRODUCTION)" in line for line in stack.lines)


@pytest.mark.integration
def test_printed_subscriber_receives_printed_publish(stack):
    subs, pubs = stack.printed("mosquitto_sub"), stack.printed("mosquitto_pub")
    assert len(subs) == 2 and len(pubs) == 1
    alice_sub, pub = subs[0], pubs[0]
    assert "--cafile" in alice_sub and "--cafile" in pub and "-p" in pub
    # As printed, plus: exit after one message or 20 s.
    sub = subprocess.Popen(alice_sub + ["-C", "1", "-W", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + 20
        while sub.poll() is None and time.monotonic() < deadline:
            result = run(pub)  # repeated until the subscription is in place
            assert result.returncode == 0, result.stderr
            time.sleep(0.3)
        out, err = sub.communicate(timeout=5)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    assert sub.returncode == 0, err
    message = pub[pub.index("-m") + 1]
    assert out.strip() == f"devices/demo-thermo/telemetry {message}"


@pytest.mark.integration
def test_other_user_is_refused_as_printed(stack):
    bob_sub = stack.printed("mosquitto_sub")[1]
    assert bob_sub[bob_sub.index("-u") + 1] == "bob"
    result = run(bob_sub + ["-W", "10"])
    expected = next(line for line in stack.lines if line.strip().startswith("#    prints: All"))
    assert expected.split("prints: ", 1)[1].strip() in result.stdout + result.stderr


@pytest.mark.integration
def test_printed_curl_lists_the_demo_device_and_refuses_bob(stack):
    alice_curl, bob_curl = stack.printed("curl")
    result = run(alice_curl + ["-s"])
    assert result.returncode == 0, result.stderr
    devices = json.loads(result.stdout)
    assert [d["id"] for d in devices["devices"]] == ["demo-thermo"], result.stdout
    result = run(bob_curl + ["-s", "-w", "\n%{http_code}"])
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "404"
    expected = [line for line in stack.lines if line.strip().startswith("#    prints: {")]
    assert json.loads(body) == json.loads(expected[0].split("prints: ", 1)[1])


@pytest.mark.integration
def test_dev_token_mints_for_the_running_stack(stack, capsys):
    assert main(["dev", "token", "--user", "carol", "--role", "iot-admin", "--data", str(stack.data)]) == 0
    token = capsys.readouterr().out.strip()
    ca = str(stack.data / "certs" / "ca.crt")
    port = load_config(stack.data / "proxy.yaml").http.listen.rsplit(":", 1)[1]
    # An admin sees alice's device; the same token signed by another key does not pass.
    result = run(["curl", "-s", "--cacert", ca, "-H", f"Authorization: Bearer {token}",
                  f"https://localhost:{port}/api/v1/devices/demo-thermo"])
    assert json.loads(result.stdout)["id"] == "demo-thermo"
    forged = SigningKey.generate()
    forged.kid, forged.issuer = SigningKey.load(stack.data).kid, SigningKey.load(stack.data).issuer
    result = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca, "-H",
                  f"Authorization: Bearer {forged.mint('carol', roles=['iot-admin'])}",
                  f"https://localhost:{port}/api/v1/devices/demo-thermo"])
    assert result.stdout == "401"


@pytest.mark.integration
def test_data_folder_keys_are_private(stack):
    for name in ("store.key", "issuer.key", "certs/ca.key", "certs/server.key"):
        assert (stack.data / name).stat().st_mode & 0o077 == 0, name
    assert (stack.data / "proxy.yaml").exists()
    assert "NOT FOR PRODUCTION" in (stack.data / "proxy.yaml").read_text()


@pytest.mark.integration
def test_second_stack_on_the_same_folder_is_refused(stack):
    result = subprocess.run([sys.executable, "-m", "proxy", "dev", "--data", str(stack.data)],
                            capture_output=True, text=True, timeout=30, env=dev_env())
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"keygate: keygate dev is already running with {stack.data} (pid {stack.proc.pid})")


# --------------------------------------------------------------------------- stopping


@pytest.mark.integration
def test_sigint_stops_everything_and_a_restart_keeps_the_device(tmp_path):
    need("mosquitto")
    stack = start_dev(tmp_path / "keygate-dev")
    mosquitto = stack.mosquitto_pid
    children = children_of(stack.proc.pid)
    assert mosquitto in children and alive(mosquitto)
    old_k1 = stack.printed("mosquitto_pub")[0]

    assert stack.stop(signal.SIGINT) == 0
    stack.read_until("keygate dev stopped", timeout=5)
    assert not alive(mosquitto)
    assert not [p for p in children if alive(p)]
    assert not (stack.data / "dev.pid").exists()
    with pytest.raises(CommandError, match="keygate dev is not running"):
        import argparse

        from proxy.dev import mint_token
        mint_token(argparse.Namespace(token_data=str(stack.data), data="x", user="a", role=[], group=[],
                                      token_ttl=None))

    # Same folder again: alice still owns the device; it gets a new K1, the old one stops working.
    again = start_dev(tmp_path / "keygate-dev")
    try:
        new_pub = again.printed("mosquitto_pub")[0]
        key = new_pub.index("-P") + 1
        assert new_pub[key] != old_k1[key]
        ok = run(new_pub)
        assert ok.returncode == 0, ok.stderr
        stale = list(new_pub)
        stale[key] = old_k1[key]
        assert run(stale).returncode != 0
    finally:
        assert again.stop(signal.SIGTERM) == 0


@pytest.mark.integration
def test_killed_dev_takes_mosquitto_with_it(tmp_path):
    need("mosquitto")
    stack = start_dev(tmp_path / "keygate-dev")
    mosquitto = stack.mosquitto_pid
    stack.stop(signal.SIGKILL)  # no chance to clean up: the kernel's parent-death signal does it
    deadline = time.monotonic() + 10
    while alive(mosquitto) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(mosquitto)


# --------------------------------------------------------------------------- pieces


def test_preferred_port_taken_falls_back_to_a_free_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        port = pick_port(taken)
        assert port != taken and port > 0
    free = pick_port(0)
    assert pick_port(free) == free


def test_generated_config_loads_with_the_production_loader(tmp_path):
    text = render_config(folder=tmp_path, issuer="http://127.0.0.1:1/realms/dev", mqtt_port=1, http_port=2,
                         metrics_port=3, upstream="127.0.0.1:4", orion="http://127.0.0.1:5")
    (tmp_path / "proxy.yaml").write_text(text)
    cfg = load_config(tmp_path / "proxy.yaml", env={})
    assert cfg.mqtt.listen == "127.0.0.1:1" and cfg.http.listen == "127.0.0.1:2"
    assert cfg.oidc.audience == "iot-proxy" and cfg.store.key_file == "store.key"
    assert cfg.mqtt.tls and cfg.http.tls
    # Certificate enrollment works out of the box: the device CA's key is configured.
    assert cfg.tls.client_ca_key == f"{tmp_path}/certs/devices-ca.key"


def test_token_without_a_running_stack_is_one_line(tmp_path, capsys):
    assert main(["dev", "token", "--user", "alice", "--data", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"keygate: keygate dev is not running with data folder {tmp_path} "
                                       "(start it with `keygate dev`)\n")
    (tmp_path / "dev.pid").write_text("999999999\n")
    assert running_pid(tmp_path) is None


async def test_dev_tokens_pass_the_same_validator_as_keycloaks(tmp_path):
    from proxy.identity.tokens import TokenValidator

    key = SigningKey.generate()
    issuer = DevIssuer(key)
    await issuer.start()
    cfg = load_config_text_for(tmp_path, key.issuer)
    validator = TokenValidator(cfg.oidc)
    try:
        await validator.start()
        ident = await validator.validate(key.mint("alice", roles=["iot-user", "iot-admin"], groups=["lab"]))
        assert ident.kind == "user" and ident.username == "alice" and ident.sub == subject_of("alice")
        assert {"iot-user", "iot-admin"} <= ident.roles and "lab" in ident.groups
        with pytest.raises(AuthError) as info:
            await validator.validate(key.mint("alice", ttl=-3600))
        assert info.value.reason is AuthReason.EXPIRED
        with pytest.raises(AuthError) as info:
            await validator.validate(key.mint("alice", audience="someone-else"))
        assert info.value.reason is AuthReason.WRONG_AUDIENCE
    finally:
        await validator.close()
        await issuer.stop()


def load_config_text_for(folder: Path, issuer: str):
    from proxy.config import load_config_text

    return load_config_text(render_config(folder=folder, issuer=issuer, mqtt_port=1, http_port=2, metrics_port=3,
                                          upstream="127.0.0.1:4", orion="http://127.0.0.1:5"), env={})


@pytest.mark.integration
def test_upstream_broker_is_used_instead_of_starting_one(tmp_path, mosquitto):
    stack = start_dev(tmp_path / "keygate-dev", "--upstream", mosquitto.address)
    try:
        assert any(f"your broker at {mosquitto.address}" in line for line in stack.lines)
        assert not any("mosquitto (pid" in line for line in stack.lines)
        assert children_of(stack.proc.pid) == set()
        sub = stack.printed("mosquitto_sub")[0] + ["-C", "1", "-W", "20"]
        proc = subprocess.Popen(sub, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            assert run(stack.printed("mosquitto_pub")[0]).returncode == 0
            time.sleep(0.3)
        out, _ = proc.communicate(timeout=5)
        assert out.startswith("devices/demo-thermo/telemetry ")
    finally:
        assert stack.stop(signal.SIGINT) == 0


@pytest.mark.parametrize("argv, message", [
    (["dev", "--upstream", "no-port"], "keygate: --upstream: expected host:port, got 'no-port'\n"),
    (["dev", "--mqtt-port", "70000"], "keygate: --mqtt-port: must be between 0 and 65535\n"),
])
def test_bad_options_are_one_line(argv, message, capsys):
    assert main(argv) == 1
    assert capsys.readouterr().err == message


# --------------------------------------------------------------------------- the operator's first hour


def test_taken_port_is_refused_naming_it_and_the_flag(tmp_path):
    """Was: a random port in silence, while the tour's commands name 8883 (someone else's server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        cmd = [sys.executable, "-m", "proxy", "dev", "--data", str(tmp_path / "keygate-dev"),
               "--policies", str(ROOT / "policies"), "--mqtt-port", str(pick_port(0)),
               "--http-port", str(taken), "--metrics-port", str(pick_port(0))]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=dev_env())
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"keygate: port {taken} on 127.0.0.1 is taken (address already in use): stop what listens there, "
        "or choose another port with --http-port PORT"]


@pytest.mark.integration
def test_restart_keeps_tokens_and_the_retained_reading(tmp_path):
    """Was: every start made a new issuer key (tokens printed earlier refused, nothing said why)
    and the broker was throwaway (the tour's retained reading gone, its read block timed out)."""
    need("mosquitto_sub")
    stack = start_dev(tmp_path / "keygate-dev")
    try:
        assert any("survive a restart of keygate dev" in line for line in stack.lines)
        alice_sub = stack.printed("mosquitto_sub")[0]
        old_token = alice_sub[alice_sub.index("-P") + 1]
        pub = stack.printed("mosquitto_pub")[0]
        message = pub[pub.index("-m") + 1]
        published = run(pub + ["-r"])
        assert published.returncode == 0, published.stderr
    finally:
        assert stack.stop(signal.SIGINT) == 0
    again = start_dev(tmp_path / "keygate-dev")
    try:
        assert not any("no longer work" in line for line in again.lines)
        sub = again.printed("mosquitto_sub")[0]
        sub[sub.index("-P") + 1] = old_token  # the token printed before the restart
        result = run(sub + ["-C", "1", "-W", "10"])
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == f"devices/demo-thermo/telemetry {message}"
    finally:
        assert again.stop(signal.SIGTERM) == 0


@pytest.mark.integration
def test_portal_signs_in_through_the_dev_issuer(stack):
    """The one-minute path: the portal's real sign-in (code + PKCE) against the dev issuer's login page."""
    import re
    import urllib.parse

    import requests

    portal = next(line for line in stack.lines if line.strip().startswith("portal ")).split()[1]
    ca = str(stack.data / "certs" / "ca.crt")
    http = requests.Session()
    start = http.get(f"{portal}login", verify=ca, allow_redirects=False, timeout=10)
    assert start.status_code == 302
    login = http.get(start.headers["Location"], timeout=10)
    assert "NOT FOR PRODUCTION" in login.text
    form = dict(re.findall(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)">', login.text))
    assert form["code_challenge"] and form["redirect_uri"] == f"{portal}callback"
    back = http.post(start.headers["Location"].split("?")[0], data={**form, "username": "alice"},
                     allow_redirects=False, timeout=10)
    assert back.status_code == 302 and back.headers["Location"].startswith(f"{portal}callback?")
    # A tampered PKCE challenge: the code is refused at the token endpoint, so the sign-in fails.
    bad = http.post(start.headers["Location"].split("?")[0],
                    data={**form, "code_challenge": "A" * 43, "username": "alice"}, allow_redirects=False, timeout=10)
    callback = http.get(bad.headers["Location"], verify=ca, allow_redirects=False, timeout=10)
    assert callback.status_code == 400 and "sign in again" in callback.text
    # The real one (the failed callback cleared the sign-in cookie: start again).
    start = http.get(f"{portal}login", verify=ca, allow_redirects=False, timeout=10)
    # While alice is at the provider, a stranger floods /login: each start keeps nothing on the
    # server (no session cookie, only its own sealed sign-in), so hers still completes below.
    for _ in range(50):
        flood = requests.get(f"{portal}login", verify=ca, allow_redirects=False, timeout=10)
        assert flood.status_code == 302 and set(flood.cookies.keys()) == {"keygate_portal_signin"}
    login = http.get(start.headers["Location"], timeout=10)
    form = dict(re.findall(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)">', login.text))
    back = http.post(start.headers["Location"].split("?")[0], data={**form, "username": "alice"},
                     allow_redirects=False, timeout=10)
    signed_in = http.get(back.headers["Location"], verify=ca, allow_redirects=False, timeout=10)
    assert signed_in.status_code == 302 and signed_in.headers["Location"] == urllib.parse.urlsplit(
        f"{portal}devices").path
    devices = http.get(f"{portal}devices", verify=ca, timeout=10)
    assert devices.status_code == 200 and "demo-thermo" in devices.text and "alice" in devices.text
