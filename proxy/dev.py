"""``keygate dev``: the whole stack on a laptop, in one command. NOT FOR PRODUCTION.

In the spirit of ``vault server -dev``: no configuration. It makes a data
folder with a throwaway CA and server certificate, an SQLCipher store and its
key (mode 0600), starts a development token issuer in this process, starts
Mosquitto on loopback (or uses ``--upstream``), writes an ordinary
``proxy.yaml`` into the folder and runs the gateway from it through the same
code as ``keygate serve`` (so tokens go through the same validator as
Keycloak's). It registers the demo device ``demo-thermo`` for ``alice`` and
prints commands to paste. Ctrl-C (or SIGTERM) stops everything it started.

A port that is taken is refused, naming the flag that changes it (the tour's
commands name the defaults). What a restart on the same folder keeps: the CA,
the store, the issuer's key and address (tokens printed earlier still work)
and the broker's retained messages (Mosquitto persists into the folder).

``keygate dev token --user NAME [--role ROLE]`` mints a token for the running
stack from another shell.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.dev_issuer import DevIssuer, SigningKey, subject_of, write_private
from proxy.errors import CommandError

if TYPE_CHECKING:  # the stack's modules load only when it starts
    from proxy.app import Listeners
    from proxy.services import Services

log = logging.getLogger("keygate.dev")

DEFAULT_DATA = "keygate-dev"
DEMO_USER = "alice"
OTHER_USER = "bob"
DEMO_DEVICE = "demo-thermo"
BANNER = """\
======================================================================
  keygate dev: a throwaway local stack. NOT FOR PRODUCTION.
  Its token issuer signs a token for anyone who asks, and its CA key,
  store key and issuer key lie unencrypted in {data}.
======================================================================"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=DEFAULT_DATA, metavar="DIR",
                        help=f"data folder (default: ./{DEFAULT_DATA}); made if missing, reused if present")
    parser.add_argument("--mqtt-port", type=int, default=8883,
                        help="MQTT over TLS port on 127.0.0.1 (default 8883; 0: any free one)")
    parser.add_argument("--http-port", type=int, default=8443,
                        help="HTTPS port (ownership API, NGSI-v2) on 127.0.0.1 (default 8443; 0: any free one)")
    parser.add_argument("--metrics-port", type=int, default=9100,
                        help="metrics, /healthz and /readyz on 127.0.0.1 (default 9100; 0: any free one)")
    parser.add_argument("--upstream", metavar="HOST:PORT",
                        help="use this MQTT broker instead of starting Mosquitto")
    parser.add_argument("--orion", default="http://127.0.0.1:1026", metavar="URL",
                        help="Orion behind the HTTP gateway (default: http://127.0.0.1:1026)")
    parser.add_argument("--policies", metavar="DIR",
                        help="policies copied into the data folder on first start (default: ./policies)")
    parser.add_argument("--ttl", type=int, default=3600, help="lifetime of the printed tokens, seconds (default 3600)")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="dev_command", metavar="SUBCOMMAND")
    tok = sub.add_parser("token", help="mint a token for the running dev stack (NOT FOR PRODUCTION)",
                         description="Print an access token from the running keygate dev's issuer.")
    tok.add_argument("--user", required=True, help="preferred_username (and a stable sub derived from it)")
    tok.add_argument("--role", action="append", default=[], help="extra realm role, e.g. iot-admin (repeatable)")
    tok.add_argument("--group", action="append", default=[], help="group, for group:NAME policies (repeatable)")
    tok.add_argument("--data", dest="token_data", metavar="DIR", help=f"data folder (default: ./{DEFAULT_DATA})")
    tok.add_argument("--ttl", dest="token_ttl", type=int, help="lifetime in seconds (default 3600)")


def run(args: argparse.Namespace) -> int:
    if args.dev_command == "token":
        return mint_token(args)
    if args.upstream:
        from proxy.config import parse_hostport

        try:
            parse_hostport(args.upstream)
        except ValueError as exc:
            raise CommandError(f"--upstream: {exc}") from None
    for name in ("mqtt_port", "http_port", "metrics_port"):
        if not 0 <= getattr(args, name) <= 65535:
            raise CommandError(f"--{name.replace('_', '-')}: must be between 0 and 65535")
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from proxy.app import install_uvloop

    install_uvloop()
    return asyncio.run(DevStack(args).run())


# --------------------------------------------------------------------------- keygate dev token


def mint_token(args: argparse.Namespace) -> int:
    folder = Path(args.token_data or args.data)
    if running_pid(folder) is None:
        raise CommandError(f"keygate dev is not running with data folder {folder} (start it with `keygate dev`)")
    try:
        key = SigningKey.load(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise CommandError(f"{folder}: cannot read the dev issuer key: {exc}") from None
    roles = ["iot-user", *args.role]
    print(key.mint(args.user, roles=roles, groups=args.group, ttl=args.token_ttl or 3600))
    return 0


def running_pid(folder: Path) -> int | None:
    """The pid of the keygate dev that owns ``folder``, if it is alive."""
    try:
        pid = int((folder / "dev.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


# --------------------------------------------------------------------------- the data folder


def make_dev_pki(certs: Path) -> None:
    """A CA, a server certificate for localhost/127.0.0.1/::1 and a device-signing CA (``keygate certs init``)."""
    from proxy.certs import init_dir

    certs.mkdir(mode=0o700, parents=True, exist_ok=True)
    init_dir(certs, days=825, force=True)


def find_policies(given: str | None) -> Path:
    candidates = [Path(given)] if given else [Path("policies"), Path(__file__).resolve().parents[1] / "policies"]
    for c in candidates:
        if c.is_dir() and any(c.glob("*.yaml")):
            return c
    if given:
        raise CommandError(f"{given}: no policy files (*.yaml) there")
    raise CommandError("no policies found: run from the keygate source folder, or pass --policies DIR")


def claim_ports(args: argparse.Namespace) -> dict[str, int]:
    """The three listener ports: each as asked, or a refusal naming the port and the flag that changes it.
    (Never another port in silence: the tour's commands name 8883 and 8443.) 0 asks for any free port."""
    from proxy.check import port_problem

    ports = {}
    for name in ("mqtt_port", "http_port", "metrics_port"):
        asked = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if asked:
            problem = port_problem("127.0.0.1", asked)
            if problem:
                raise CommandError(f"port {asked} on 127.0.0.1 is taken ({problem.lower()}): stop what listens "
                                   f"there, or choose another port with {flag} PORT")
        ports[name] = asked or pick_port(0)
    return ports


def pick_port(preferred: int) -> int:
    """``preferred`` if it is free on loopback, else any free port."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As the listeners do: a port whose old connections linger in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            bound: int = s.getsockname()[1]
            return bound
    raise CommandError("no free port on 127.0.0.1")


def render_config(*, folder: Path, issuer: str, mqtt_port: int, http_port: int, metrics_port: int, upstream: str,
                  orion: str) -> str:
    return f"""\
# Written by `keygate dev` at every start. NOT FOR PRODUCTION: see proxy.yaml
# in the keygate source for the reference configuration.
oidc:
  issuer: {issuer}           # the in-process development issuer
  audience: iot-proxy
  algorithms: [ES256]
  roles: [realm_access.roles, resource_access.iot-proxy.roles]
tls:
  cert: {folder}/certs/server.crt
  key: {folder}/certs/server.key
  client_ca: {folder}/certs/devices-ca.crt
  client_ca_key: {folder}/certs/devices-ca.key   # certificate enrollment works out of the box
mqtt:
  listen: 127.0.0.1:{mqtt_port}
  upstream: {upstream}
  max_connections: 1000   # a local stack: fits the usual open-file limits (2 per connection)
http:
  listen: 127.0.0.1:{http_port}
  upstream: {orion}
store:
  path: ownership.db
  key_file: store.key
ownership:
  advertise_mqtt: mqtts://localhost:{mqtt_port}
  advertise_http: https://localhost:{http_port}
  orion_lifecycle: false   # keygate dev starts no Orion; true when one runs at --orion
policies:
  dir: policies/
  watch: true
audit:
  path: audit.log
metrics:
  listen: 127.0.0.1:{metrics_port}
"""


# --------------------------------------------------------------------------- Mosquitto


def _load_prctl() -> Any:
    # Resolved before any fork: the child of a threaded process must not import or dlopen.
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if keygate dev dies, even by SIGKILL (Linux)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Broker:
    proc: subprocess.Popen[bytes]
    port: int

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            for _ in range(50):
                if self.proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                self.proc.kill()
        await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)


async def start_mosquitto(folder: Path) -> Broker:
    exe = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                              if os.access(p, os.X_OK)), None)
    if exe is None:
        raise CommandError("mosquitto is not installed (apt-get install mosquitto), or pass --upstream HOST:PORT")
    port = pick_port(0)
    conf = folder / "mosquitto.conf"
    (folder / "mosquitto-data").mkdir(mode=0o700, exist_ok=True)  # Mosquitto does not make it
    # "user" = whoever runs keygate dev: started as root, Mosquitto would otherwise switch
    # to the mosquitto user, and changing credentials clears the parent-death signal.
    conf.write_text(f"# Written by keygate dev: reachable on loopback only, behind keygate.\n"
                    f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                    # Retained messages survive a restart of keygate dev, as with a real broker.
                    f"persistence true\npersistence_location {folder / 'mosquitto-data'}/\n"
                    f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
                    f"log_dest stderr\nlog_type error\nlog_type warning\n")
    # Blocking for a moment is fine here: the broker starts once, before anything is served.
    with open(folder / "mosquitto.log", "ab") as logfile:  # noqa: ASYNC230
        # Its own session: Ctrl-C reaches keygate dev, which stops the broker after the gateway.
        proc = subprocess.Popen([exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=logfile,  # noqa: ASYNC220
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
    broker = Broker(proc, port)
    for _ in range(100):
        if proc.poll() is not None:
            raise CommandError(f"mosquitto exited with {proc.returncode}; see {folder / 'mosquitto.log'}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return broker
        await asyncio.sleep(0.05)
    await broker.stop()
    raise CommandError(f"mosquitto did not listen on 127.0.0.1:{port}; see {folder / 'mosquitto.log'}")


# --------------------------------------------------------------------------- the stack


@dataclass
class DevStack:
    args: argparse.Namespace
    folder: Path = field(init=False)
    issuer: DevIssuer | None = None
    issuer_moved: bool = False
    broker: Broker | None = None
    _lock_fd: int | None = None

    def __post_init__(self) -> None:
        self.folder = Path(self.args.data).resolve()

    def prepare_folder(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.lock_folder()
        if not (self.folder / "certs" / "ca.crt").exists():
            make_dev_pki(self.folder / "certs")
        if not (self.folder / "store.key").exists():
            write_private(self.folder / "store.key", (secrets.token_hex(32) + "\n").encode())
        policies = self.folder / "policies"
        if not policies.is_dir():
            source = find_policies(self.args.policies)
            shutil.copytree(source, policies, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    def lock_folder(self) -> None:
        """One keygate dev per folder: an exclusive lock on dev.pid, held until exit."""
        fd = os.open(self.folder / "dev.pid", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = running_pid(self.folder)
            raise CommandError(f"keygate dev is already running with {self.folder}"
                               + (f" (pid {pid})" if pid else "")) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    async def run(self) -> int:
        print(BANNER.format(data=self.folder), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        self.prepare_folder()
        try:
            await self._run(stop)
        finally:
            await self.shutdown()
        print("keygate dev stopped; everything it started has exited.", flush=True)
        return 0

    async def _run(self, stop: asyncio.Event) -> None:
        from proxy.app import build_services, close_services, ensure_open_files, run_services
        from proxy.config import load_config

        ports = claim_ports(self.args)
        key = await self.start_issuer()
        log.warning("development token issuer on %s: NOT FOR PRODUCTION", key.issuer)

        if self.args.upstream:
            upstream = self.args.upstream
        else:
            self.broker = await start_mosquitto(self.folder)
            upstream = f"127.0.0.1:{self.broker.port}"
        config_path = self.folder / "proxy.yaml"
        config_path.write_text(render_config(folder=self.folder, issuer=key.issuer, upstream=upstream,
                                             orion=self.args.orion, **ports))
        config = load_config(config_path)
        ensure_open_files(config)

        services = await build_services(config)
        try:
            k1 = await self.demo_device(services)

            def on_ready(_services: Services, _listeners: Listeners) -> None:
                print(self.instructions(key, k1, upstream, **ports), flush=True)

            await run_services(config, stop=stop, services=services, on_ready=on_ready)
        finally:
            await close_services(services)

    async def start_issuer(self) -> SigningKey:
        """The issuer with the key and address of the last start, when there was one: tokens printed
        before a restart keep working. Only when its old port is taken does it move (and say so)."""
        from urllib.parse import urlsplit

        try:
            key = SigningKey.load(self.folder)
            port = urlsplit(key.issuer).port or 0
        except (OSError, ValueError, KeyError):
            key, port = SigningKey.generate(), 0
        self.issuer = DevIssuer(key, port=port)
        try:
            await self.issuer.start()
        except OSError:
            await self.issuer.stop()
            self.issuer = DevIssuer(key, port=0)
            await self.issuer.start()
            self.issuer_moved = True
        key.save(self.folder)
        return key

    async def demo_device(self, services: Services) -> str:
        """Register alice's demo device; on a reused folder, give it a fresh K1 (keys are shown once)."""
        from proxy.identity.model import Identity

        alice = Identity(kind="user", sub=subject_of(DEMO_USER), username=DEMO_USER, method="token",
                         roles=frozenset({"iot-user"}))
        if services.ownership.get_device(DEMO_DEVICE) is None:
            _, k1, _ = await services.ownership.register_device(
                alice, {"id": DEMO_DEVICE, "type": "Thermometer", "name": "Demo thermometer"})
            return k1
        return await services.ownership.rotate_key(alice, DEMO_DEVICE, "k1")

    async def shutdown(self) -> None:
        if self.broker is not None:
            await self.broker.stop()
        if self.issuer is not None:
            await self.issuer.stop()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                (self.folder / "dev.pid").unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def instructions(self, key: SigningKey, k1: str, upstream: str, *, mqtt_port: int, http_port: int,
                     metrics_port: int) -> str:
        q = shlex.quote
        ca = q(str(self.folder / "certs" / "ca.crt"))
        alice = key.mint(DEMO_USER, ttl=self.args.ttl)
        bob = key.mint(OTHER_USER, ttl=self.args.ttl)
        topic = f"devices/{DEMO_DEVICE}/telemetry"
        tls = f"--cafile {ca} -h localhost -p {mqtt_port}"
        data_opt = "" if self.args.data == DEFAULT_DATA else f" --data {q(self.args.data)}"
        moved = ("\nThe issuer's old port was taken, so it moved: tokens printed before this start no longer "
                 "work." if self.issuer_moved else "")
        broker = (f"mosquitto (pid {self.broker.proc.pid}) on {upstream}" if self.broker
                  else f"your broker at {upstream}")
        return f"""
keygate dev is ready (NOT FOR PRODUCTION)
  MQTT over TLS   localhost:{mqtt_port}  -> {broker}
  HTTPS           https://localhost:{http_port}  (ownership API under /api/v1; NGSI-v2 -> {self.args.orion})
  portal          https://localhost:{http_port}/portal/  (sign in with any user name, e.g. {DEMO_USER})
  metrics         http://127.0.0.1:{metrics_port}/metrics
  token issuer    {key.issuer}
  data folder     {self.folder}  (CA: certs/ca.crt, config: proxy.yaml, audit: audit.log)

User {DEMO_USER} owns device {DEMO_DEVICE}; its key K1 is shown once, here: {k1}
Tokens below expire in {self.args.ttl} s and survive a restart of keygate dev (the issuer's key is kept
in {self.folder / "issuer.key"}; delete the folder to start afresh); mint more with:
keygate dev token --user NAME{data_opt}{moved}

# 1. {DEMO_USER}, the owner, subscribes to the device's telemetry:
mosquitto_sub {tls} -u {DEMO_USER} -P {alice} -t {topic} -v

# 2. the device publishes with its key K1 (client id = device id):
mosquitto_pub {tls} -i {DEMO_DEVICE} -u {DEMO_DEVICE} -P {q(k1)} -t {topic} -m {q('{"temperature": 21.5}')}

# 3. {DEMO_USER}'s devices through the ownership API:
curl --cacert {ca} -H {q("Authorization: Bearer " + alice)} https://localhost:{http_port}/api/v1/devices

# 4. {OTHER_USER} is not the owner; the same subscription is refused:
mosquitto_sub {tls} -u {OTHER_USER} -P {bob} -t {topic} -v
#    prints: All subscription requests were denied.
#    and the ownership API answers 404 (ids do not leak):
curl --cacert {ca} -H {q("Authorization: Bearer " + bob)} https://localhost:{http_port}/api/v1/devices/{DEMO_DEVICE}
#    prints: {{"error": {{"code": "not_found", "message": "no such device"}}}}

# 5. devices may use certificates too: the owner enrolls the device's CSR with
#    POST /api/v1/devices/{DEMO_DEVICE}/certificate (see docs/devices.md).

More to try: the five-minute tour in keygate's README (register a device, delegate, rotate a key,
edit a policy in {self.folder / "policies"}).
Ctrl-C stops keygate dev, the token issuer and mosquitto.
"""
