"""``keygate check -c proxy.yaml``: the preflight an operator runs before ``serve``.

One line per check, ``ok`` / ``warn`` / ``fail`` with the reason; exit 1 when
any check fails; ``--json`` for monitoring. The checks, in order:

* ``config``: the file loads as ``serve`` loads it (errors name file:line);
* ``tls``: the certificate, key and CAs load; when the server certificate
  expires; whether it covers the names in ``ownership.advertise_*``;
* ``issuer``: discovery, the JWKS, and the algorithms it offers against
  ``oidc.algorithms``;
* ``store``: opened read-only with the key (never created), its schema version;
* ``broker`` / ``orion``: reached, the broker with the upstream credentials;
* ``policies``: ``keygate policy check`` on ``policies.dir``;
* ``ports``: each listener's address is free (with ``--running``: answers);
* ``open files``: the configuration fits the open-file limit.

``serve`` runs the same checks before it opens or creates anything
(:func:`preflight`). There, the services keygate reaches over the network
(issuer, broker, Orion) are reported as warnings: in a compose stack they start
together, and keygate retries them; everything local refuses the start.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import json
import os
import secrets
import socket
import sys
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from proxy.config import Config, ConfigError, load_config, parse_hostport, read_secret, store_key

# A certificate that expires within this is a warning: time to renew.
EXPIRY_WARNING_DAYS = 30
# Checks of services reached over the network: warnings when ``serve`` starts (retried there).
REMOTE = ("issuer", "broker", "orion")
# How long serve waits for the remote checks: they only warn there, so they must not hold a start.
PREFLIGHT_REMOTE_BUDGET = 3.0


@dataclass(frozen=True)
class Result:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


def ok(name: str, detail: str) -> Result:
    return Result(name, "ok", detail)


def warn(name: str, detail: str) -> Result:
    return Result(name, "warn", detail)


def fail(name: str, detail: str) -> Result:
    return Result(name, "fail", detail)


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="proxy.yaml", help="configuration file (default: proxy.yaml)")
    parser.add_argument("--json", action="store_true", help="one JSON object: {ok, checks: [{name, status, detail}]}")
    parser.add_argument("--running", action="store_true",
                        help="keygate serve runs with this configuration: its ports must answer, not be free")


def run(args: argparse.Namespace) -> int:
    results = asyncio.run(run_checks(args.config, running=args.running))
    failed = any(r.status == "fail" for r in results)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [asdict(r) for r in results]}))
    else:
        for r in results:
            print(r.line())
    return 1 if failed else 0


async def run_checks(config_path: str | os.PathLike[str], *, running: bool = False) -> list[Result]:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [fail("config", str(exc))]
    results = [ok("config", f"{config_path}: valid")]
    results += check_local_first(config, running=running)
    results += await check_remote(config)
    results += check_local_last(config)
    return results


def check_local_first(config: Config, *, running: bool = False) -> list[Result]:
    return [*check_tls(config), check_store(config), *check_ports(config, running=running)]


def check_local_last(config: Config) -> list[Result]:
    return [check_policies(config), check_open_files(config)]


async def check_remote(config: Config, *, budget: float | None = None) -> list[Result]:
    """The issuer, broker and Orion checks side by side; with a ``budget`` (seconds), a check
    still waiting when it runs out is a warning saying so, instead of holding the caller."""
    names = dict(zip(REMOTE, (check_issuer(config), check_broker(config), check_orion(config)), strict=True))
    tasks = {name: asyncio.ensure_future(c) for name, c in names.items()}
    await asyncio.wait(tasks.values(), timeout=budget)
    found: list[Result | None] = []
    for name, task in tasks.items():
        if task.done():
            found.append(task.result())
        else:
            task.cancel()
            found.append(warn(name, f"no answer within {budget:g} s; keygate check waits longer"))
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    return [r for r in found if r is not None]


async def preflight(config: Config) -> list[Result]:
    """What ``serve`` runs before it creates anything: every failure refuses the start, except the
    remote services', which come back as warnings (with the rest of the warnings)."""
    results = [*check_local_first(config), *await check_remote(config, budget=PREFLIGHT_REMOTE_BUDGET),
               *check_local_last(config)]
    return [warn(r.name, r.detail) if r.status == "fail" and r.name in REMOTE else r for r in results]


# --------------------------------------------------------------------------- tls


def check_tls(config: Config) -> list[Result]:
    from proxy.tls import server_context, upstream_context

    try:   # local, unlike the orion check: a bad http.upstream_ca refuses the start
        upstream_context(config)
    except ConfigError as exc:
        return [fail("tls", str(exc))]
    uses_tls = (config.mqtt is not None and config.mqtt.tls) or (config.http is not None and config.http.tls)
    if not uses_tls:
        return [ok("tls", "no listener uses TLS")]
    try:
        server_context(config.tls, config.base_dir)
    except ConfigError as exc:
        return [fail("tls", str(exc))]
    if config.tls.client_ca_key:
        from ownership.enrollment import DeviceCA

        try:
            DeviceCA.from_config(config)
        except ConfigError as exc:
            return [fail("tls", str(exc))]
    return [certificate_result(config)]


def certificate_result(config: Config, now: dt.datetime | None = None) -> Result:
    from cryptography import x509

    path = config.resolve(config.tls.cert)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        return fail("tls", f"tls.cert {path}: cannot read the certificate: {exc}")
    now = now or dt.datetime.now(dt.UTC)
    until = cert.not_valid_after_utc
    days = (until - now).days
    if until <= now:
        return fail("tls", f"tls.cert {path}: expired on {until:%Y-%m-%d %H:%M} UTC")
    if cert.not_valid_before_utc > now:
        return fail("tls", f"tls.cert {path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    names = advertised_names(config)
    uncovered = [n for n in names if not covers(cert, n)]
    when = f"tls.cert {path}: valid until {until:%Y-%m-%d} ({days} days)"
    if uncovered:
        return warn("tls", f"{when}; does not cover {', '.join(uncovered)} (ownership.advertise_*)")
    if days < EXPIRY_WARNING_DAYS:
        return warn("tls", f"{when}: renew it soon")
    return ok("tls", f"{when}, covers {', '.join(names)}" if names else when)


def advertised_names(config: Config) -> list[str]:
    """The host names devices and apps are told to use (the certificate must cover them)."""
    names: list[str] = []
    for url, used in ((config.ownership.advertise_mqtt, config.mqtt is not None and config.mqtt.tls),
                      (config.ownership.advertise_http, config.http is not None and config.http.tls)):
        host = urlsplit(url).hostname if used else None
        if host and host not in names:
            names.append(host)
    return names


def covers(cert: Any, name: str) -> bool:
    """Does ``cert`` name ``name`` in its subjectAltName (RFC 6125: one leftmost wildcard label)?"""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    name = name.lower().rstrip(".")
    for dns in san.get_values_for_type(x509.DNSName):
        dns = dns.lower().rstrip(".")
        if dns == name:
            return True
        if dns.startswith("*.") and "." in name and name.split(".", 1)[1] == dns[2:]:
            return True
    return False


# --------------------------------------------------------------------------- store


def check_store(config: Config) -> Result:
    from ownership import store as st
    from ownership.migrations import LATEST

    label = config.store.path
    try:
        passphrase = store_key(config)
    except ConfigError as exc:
        return fail("store", str(exc))
    if config.store.backend == "postgres":
        return check_postgres_store(config, passphrase)
    path = config.resolve(config.store.path)
    if not path.exists():
        return warn("store", f"store {label}: does not exist yet (serve creates it at the first start)")
    try:
        version = st.Store.inspect(path, passphrase, label=label)
    except st.StoreError as exc:
        return fail("store", str(exc))
    if version > LATEST:
        return fail("store", f"store {label}: schema version {version} is newer than this keygate ({LATEST})")
    if version < LATEST:
        return ok("store", f"store {label}: opened with the key, schema version {version} "
                           f"(serve migrates it to {LATEST})")
    return ok("store", f"store {label}: opened with the key, schema version {version}")


def check_postgres_store(config: Config, passphrase: str) -> Result:
    from ownership import store as st
    from ownership.pg_migrations import LATEST
    from ownership.pg_store import PgStore

    try:
        version = PgStore.inspect(config.store.dsn, passphrase, connect_timeout=3.0)
    except st.StoreError as exc:
        return fail("store", str(exc))
    if version is None:
        return warn("store", "store postgres: reached; no keygate store there yet (serve creates it at first start)")
    if version > LATEST:
        return fail("store", f"store postgres: schema version {version} is newer than this keygate ({LATEST})")
    return ok("store", f"store postgres: opened with the key, schema version {version}"
                       + (f" (serve migrates it to {LATEST})" if version < LATEST else ""))


# --------------------------------------------------------------------------- listener ports


def listeners(config: Config) -> list[tuple[str, str]]:
    """(key, host:port) of every listener the configuration asks for."""
    out = []
    if config.mqtt is not None:
        out.append(("mqtt.listen", config.mqtt.listen))
        if config.mqtt.websocket_listen:
            out.append(("mqtt.websocket_listen", config.mqtt.websocket_listen))
    if config.http is not None:
        out.append(("http.listen", config.http.listen))
    if config.metrics is not None:
        out.append(("metrics.listen", config.metrics.listen))
    return out


def port_problem(host: str, port: int) -> str | None:
    """Why keygate could not listen on host:port, or None when it could (bound and closed at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the listeners do: a port whose old connections linger in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def answers(host: str, port: int, timeout: float = 2.0) -> bool:
    # A listener on every interface answers on loopback (this connects, it binds nothing).
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host  # noqa: S104
    try:
        with socket.create_connection((target, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_ports(config: Config, *, running: bool = False) -> list[Result]:
    bad: list[str] = []
    good: list[str] = []
    for key, listen in listeners(config):
        host, port = parse_hostport(listen)
        if running:
            (good if answers(host, port) else bad).append(f"{key} {listen}")
            continue
        problem = port_problem(host, port) if port else None
        if problem:
            bad.append(f"{key} {listen}: {problem.lower()}")
        else:
            good.append(f"{key} {listen}")
    if not good and not bad:
        return [ok("ports", "no listener configured")]
    if bad:
        what = "not answering" if running else "cannot listen"
        return [fail("ports", f"{what}: " + "; ".join(bad))]
    return [ok("ports", ("answering: " if running else "free: ") + ", ".join(good))]


# --------------------------------------------------------------------------- policies and limits


def check_policies(config: Config) -> Result:
    """The set as ``serve`` and a reload load it: what that loader refuses is a failure; what
    ``keygate policy check`` adds (shadowed, unreachable, untested rules) is a warning here,
    because a reload of the same set would be accepted and the start must not be stricter."""
    from proxy.policy.checker import check_source
    from proxy.policy.decision import PolicyError
    from proxy.policy.language import load_dir

    if config.policies.source == "store":  # checked by keygate policy push; loaded at start from the store
        return ok("policies", "policies.source is store: the set pushed with keygate policy push")
    where = config.resolve(config.policies.dir)
    try:
        src = load_dir(str(where))
    except (PolicyError, OSError) as exc:
        return fail("policies", str(exc) if str(where) in str(exc) else f"{where}: {exc}")
    summary = f"{where}: {len(src.rules)} rules in {len(src.files)} files"
    findings = check_source(src)
    if findings:
        more = f" (and {len(findings) - 1} more: keygate policy check {where})" if len(findings) > 1 else ""
        return warn("policies", f"{summary}; {findings[0].where}: {findings[0].message}{more}")
    return ok("policies", summary)


def check_open_files(config: Config) -> Result:
    from proxy.app import descriptors_needed, ensure_open_files
    from proxy.errors import CommandError

    try:
        limit = ensure_open_files(config)
    except CommandError as exc:
        return fail("open files", str(exc))
    return ok("open files", f"needs {descriptors_needed(config)}, limit {limit}")


# --------------------------------------------------------------------------- issuer


async def check_issuer(config: Config) -> Result:
    import aiohttp

    from proxy.identity.jwks import ALG_KEY_TYPES, FetchError, get_json, parse_jwks
    from proxy.identity.tokens import check_discovery, discovery_url

    oidc = config.oidc
    url = discovery_url(oidc)
    timeout = oidc.http_timeout_seconds
    try:
        async with aiohttp.ClientSession() as session:
            doc = await get_json(session, url, timeout, "discovery")
            warning = check_discovery(doc, oidc, url)  # what the gateway itself asks of it
            jwks = await get_json(session, doc["jwks_uri"], timeout, "JWKS")
    except FetchError as exc:
        return fail("issuer", f"oidc.issuer: {exc}")
    try:
        usable = parse_jwks(jwks, oidc.algorithms)
        every = parse_jwks(jwks, tuple(ALG_KEY_TYPES))
    except FetchError as exc:
        return fail("issuer", f"oidc.issuer: {exc}")
    offered = sorted({a for k in every.values() for a in ALG_KEY_TYPES if k.fits(a)}
                     & set(doc.get("id_token_signing_alg_values_supported") or ALG_KEY_TYPES))
    if not usable:
        return fail("issuer", f"{oidc.issuer}: none of its {len(every)} signing keys fits oidc.algorithms "
                              f"{list(oidc.algorithms)} (it offers {offered or 'none'})")
    agreed = [a for a in oidc.algorithms if a in offered]
    keys = f"{len(usable)} signing key" + ("s" if len(usable) != 1 else "")
    if warning:  # served too (split horizon), tokens still checked against oidc.issuer
        return warn("issuer", f"{oidc.issuer}: {warning}; tokens must still name {oidc.issuer!r} as iss")
    return ok("issuer", f"{oidc.issuer}: {keys}, algorithms {agreed or offered} "
                        f"(oidc.algorithms {list(oidc.algorithms)})")


# --------------------------------------------------------------------------- broker and Orion


CONNACK_REASONS = {1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
                   4: "bad user name or password (mqtt.upstream_username / upstream_password)",
                   5: "not authorized (mqtt.upstream_username / upstream_password)"}


async def check_broker(config: Config) -> Result | None:
    from proxy.mqtt import codec
    from proxy.mqtt.cleaner import dial_broker
    from proxy.mqtt.packets import MQTT_311, Connect

    mqtt = config.mqtt
    if mqtt is None:
        return None
    where = mqtt.upstream
    try:
        password = read_secret(mqtt.upstream_password, mqtt.upstream_password_file, config)
    except ConfigError as exc:
        return fail("broker", str(exc))
    timeout = mqtt.connect_timeout_seconds or 10.0
    try:
        reader, writer = await asyncio.wait_for(dial_broker(where), timeout)
    except (TimeoutError, OSError) as exc:
        return fail("broker", f"mqtt.upstream {where}: cannot connect: {_reason(exc)}")
    try:
        username = mqtt.upstream_username or None
        writer.write(codec.encode_connect(Connect("MQTT", MQTT_311, True, 10, f"keygate-check-{secrets.token_hex(4)}",
                                                  username, password.encode() if username and password else None,
                                                  None, [])))
        await writer.drain()
        connack = await asyncio.wait_for(reader.readexactly(4), timeout)
        if connack[0] != 0x20:
            return fail("broker", f"mqtt.upstream {where}: answered something other than MQTT CONNACK")
        if connack[3] != 0:
            return fail("broker", f"mqtt.upstream {where}: refused the connection: "
                                  f"{CONNACK_REASONS.get(connack[3], f'code {connack[3]}')}")
        writer.write(b"\xe0\x00")  # DISCONNECT
        await writer.drain()
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        return fail("broker", f"mqtt.upstream {where}: no MQTT answer: {_reason(exc)}")
    finally:
        writer.close()
    who = f" as {mqtt.upstream_username}" if mqtt.upstream_username else ""
    return ok("broker", f"mqtt.upstream {where}: MQTT connection accepted{who}")


async def check_orion(config: Config) -> Result | None:
    import aiohttp

    from proxy.tls import upstream_context

    http = config.http
    if http is None:
        return None
    try:
        context = upstream_context(config)
    except ConfigError:   # the tls check names the problem: said once
        return fail("orion", f"http.upstream {http.upstream}: not tried: http.upstream_ca cannot be used "
                             "(see the tls check)")
    url = http.upstream.rstrip("/") + "/version"
    headers = {"Fiware-Service": http.fiware_service} if http.fiware_service else {}
    timeout = aiohttp.ClientTimeout(total=min(http.upstream_timeout_seconds, 10))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context or True)) as session, \
                session.get(url, headers=headers, allow_redirects=False, timeout=timeout) as r:
            status = r.status
    except aiohttp.ClientConnectorCertificateError as exc:
        trusted = f"http.upstream_ca {config.resolve(http.upstream_ca)}" if http.upstream_ca else \
            "the system's store (set http.upstream_ca to Orion's CA)"
        why = getattr(exc.certificate_error, "verify_message", None) or _reason(exc)
        return fail("orion", f"http.upstream {http.upstream}: its certificate does not verify against {trusted}: {why}")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        problem = f"http.upstream {http.upstream}: cannot reach Orion: {_reason(exc)}"
        if not config.ownership.orion_lifecycle:
            return warn("orion", f"{problem} (ownership.orion_lifecycle is false: none expected)")
        return fail("orion", problem)
    if status != 200:
        return fail("orion", f"http.upstream {http.upstream}: GET /version answered HTTP {status}")
    return ok("orion", f"http.upstream {http.upstream}: answers")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    os_error = getattr(exc, "os_error", None)  # aiohttp's ClientConnectorError wraps the OSError
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror.lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc)
    return text.split(": ", 1)[-1] if text else type(exc).__name__


def print_results(results: list[Result], stream: Any = sys.stderr) -> None:
    for r in results:
        print(r.line(), file=stream)


