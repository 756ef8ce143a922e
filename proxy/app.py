"""``keygate serve``: build the shared services and run every configured listener.

Start order follows the data flow: audit and metrics first, then identity
(token validator), ownership (store and read path), policies, and only then
the listeners that accept traffic; shutdown goes the other way, so no request
is ever decided without the parts it needs.

Before anything starts, the open-file limit: the soft ``RLIMIT_NOFILE`` is
raised to the hard one, and ``serve`` (and ``dev``) refuse to start when the
configuration cannot fit in it (:func:`ensure_open_files`): a gateway that
runs out of descriptors stops accepting everyone, so that is found at start,
not under load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.audit import AuditLog
from proxy.config import Config, ConfigError, load_config
from proxy.errors import CommandError
from proxy.services import Services

if TYPE_CHECKING:  # each listener's module loads only when the configuration asks for it
    from proxy.check import Result
    from proxy.http.gateway import HttpGateway
    from proxy.metrics_server import MetricsServer
    from proxy.mqtt.server import MqttGateway

#: Called once every listener listens; may be a coroutine function.
OnReady = Callable[[Services, "Listeners"], Awaitable[None] | None]

log = logging.getLogger("keygate")

# Descriptors set aside besides the MQTT connections: stdio, the store, the audit log, policy
# files and their watch, the listening sockets, the token issuer's client (BASE); the HTTP
# listener's pool of 256 connections to Orion (HTTP_UPSTREAM_DESCRIPTORS), plus one per
# http.max_connections (counted from accept, TLS handshakes included); the metrics listener (METRICS).
BASE_DESCRIPTORS = 64
HTTP_UPSTREAM_DESCRIPTORS = 256
METRICS_DESCRIPTORS = 16
# Each MQTT connection can hold two: the client's socket and the broker's.
DESCRIPTORS_PER_MQTT_CONNECTION = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="proxy.yaml", help="configuration file (default: proxy.yaml)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--workers", type=_worker_count, default=1, metavar="N",
                        help="worker processes sharing every listener (SO_REUSEPORT) under one supervisor "
                             "(default 1: this process serves; see docs/scale-out.md)")


def _worker_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 256, got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from proxy.sharing import worker

    me = worker()
    tag = f" worker {me[0]}/{me[1]} pid %(process)d" if me else (" supervisor pid %(process)d"
                                                                 if args.workers > 1 else "")
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
    config = load_config(args.config)
    if me is None:
        refuse_on_failure(asyncio.run(preflight(config)))
    else:  # the supervisor ran the preflight (the ports are the workers' now); the limit is per process
        raise_open_file_limit()
    if args.workers > 1 and me is None:
        return _supervise(config, args)
    install_uvloop()
    return asyncio.run(_serve_until_signal(config, worker=me is not None))


def _supervise(config: Config, args: argparse.Namespace) -> int:
    """Open the store once (its migrations run here, before any worker), then run the workers."""
    from ownership.service import open_store
    from ownership.store import StoreError
    from proxy.config import store_key
    from proxy.workers import Supervisor, worker_argv

    fresh = files_made_by_start(config)
    try:
        open_store(config, store_key(config)).close()
    except StoreError as exc:
        raise ConfigError(str(exc)) from None
    from proxy.config import parse_hostport

    metrics = parse_hostport(config.metrics.listen) if config.metrics is not None else None
    supervisor = Supervisor(worker_argv(str(Path(args.config).resolve()), args.log_level), args.workers,
                            metrics_listen=metrics)
    code = asyncio.run(supervisor.run())
    if code and not supervisor.ever_ready:  # as a single process does: a failed start leaves nothing
        for path in fresh:
            with contextlib.suppress(OSError):
                path.unlink()
    if code:
        raise CommandError(supervisor.failure or "workers failed")
    return 0


async def preflight(config: Config) -> list[Result]:
    from proxy.check import preflight as checks

    return await checks(config)


def refuse_on_failure(results: list[Result]) -> None:
    """On a failure, refuse the start: one line per failed check (each names its file, key or port),
    before anything is opened or created; else log the warnings and go on."""
    failed = [r.detail for r in results if r.status == "fail"]
    if failed:
        raise CommandError("\nkeygate: ".join(failed))
    for r in results:
        if r.status == "warn":
            log.warning("check %s: %s", r.name, r.detail)


def files_made_by_start(config: Config) -> list[Path]:
    """The files a start may create (the store and its journal, the audit log) that do not exist
    yet: a start that fails removes them again, so it leaves nothing half-made behind."""
    store = config.resolve(config.store.path)
    candidates = [store, Path(f"{store}-wal"), Path(f"{store}-shm")]
    if config.audit.path != "-":
        candidates.append(config.resolve(config.audit.path))
    return [p for p in candidates if not p.exists()]


def _descriptor_shares(config: Config) -> tuple[list[tuple[str, int, str | None]], int]:
    """The shares of :func:`descriptors_needed` a setting sizes, as (what, open files, the setting to
    lower, if any), and the open files for the rest (see the constants above)."""
    shares: list[tuple[str, int, str | None]] = []
    rest = BASE_DESCRIPTORS
    if config.mqtt is not None:
        mqtt = config.mqtt
        shares.append((f"mqtt.max_connections {mqtt.max_connections} x {DESCRIPTORS_PER_MQTT_CONNECTION}",
                       DESCRIPTORS_PER_MQTT_CONNECTION * mqtt.max_connections, "mqtt.max_connections"))
        linger = mqtt.limits.lingering_sockets_max  # closed, lingering: a descriptor each
        shares.append((f"mqtt.limits.lingering_sockets_max {linger}", linger, None))
    if config.http is not None:
        shares.append((f"http.max_connections {config.http.max_connections}", config.http.max_connections,
                       "http.max_connections"))
        rest += HTTP_UPSTREAM_DESCRIPTORS
    if config.metrics is not None:
        rest += METRICS_DESCRIPTORS
    return shares, rest


def descriptors_needed(config: Config) -> int:
    """Open files the configuration can make the process hold at once."""
    shares, rest = _descriptor_shares(config)
    return rest + sum(n for _, n, _ in shares)


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        # Linux refuses an infinite soft limit; the kernel's own ceiling is the most there is.
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def ensure_open_files(config: Config) -> int:
    """Raise the open-file limit, and refuse (one line naming both numbers) when the
    configuration needs more descriptors than the limit allows."""
    limit = raise_open_file_limit()
    shares, rest = _descriptor_shares(config)
    need = rest + sum(n for _, n, _ in shares)
    if need > limit:
        parts = [*(what for what, _, _ in shares), f"{rest} for the rest"]
        keys = [key for _, _, key in shares if key]
        lower = f"lower {' or '.join(keys)} or " if keys else ""
        raise CommandError(f"the configuration needs {need} open files ({' + '.join(parts)}), but the open-file "
                           f"limit (RLIMIT_NOFILE) is {limit}: {lower}raise the hard limit "
                           "(ulimit -Hn, systemd LimitNOFILE=)")
    return limit


def install_uvloop() -> None:
    """uvloop roughly halves the event loop's own cost per packet; optional."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve_until_signal(config: Config, *, worker: bool = False) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    # A worker's store was made by its supervisor: the clean-up of a failed start is the supervisor's.
    fresh = [] if worker else files_made_by_start(config)
    ready = False
    orphan_watch: asyncio.Task[None] | None = None

    def on_ready(_services: Services, _listeners: Listeners) -> None:
        nonlocal ready, orphan_watch
        ready = True
        if worker:
            from proxy.workers import stop_when_orphaned, tell_supervisor_ready

            tell_supervisor_ready()
            orphan_watch = asyncio.create_task(stop_when_orphaned(stop), name="keygate-orphan-watch")

    try:
        await run_services(config, stop=stop, on_ready=on_ready)
    except BaseException:
        if not ready:
            for path in fresh:
                with contextlib.suppress(OSError):
                    path.unlink()
        raise
    finally:
        if orphan_watch is not None:
            orphan_watch.cancel()
    return 0


async def build_services(config: Config, *, audit: AuditLog | None = None) -> Services:
    """Open the audit log, start the token validator, open the store, load policies."""
    from ownership.service import OwnershipService
    from proxy.identity.tokens import TokenValidator
    from proxy.policy import Policies

    audit = audit or AuditLog.open(str(config.resolve(config.audit.path)) if config.audit.path != "-" else "-",
                                   max_field_bytes=config.audit.max_field_bytes,
                                   fold_seconds=config.audit.fold_seconds)
    tokens = TokenValidator(config.oidc, base_dir=config.base_dir)
    await tokens.start()
    try:
        ownership = await OwnershipService.open(config, audit=audit)
    except BaseException:
        await tokens.close()
        raise
    following = None
    try:
        if config.policies.source == "store":  # pushed with keygate policy push, followed through the store
            from ownership.policy_store import StorePolicies, load_from_store

            policies = await load_from_store(config, ownership)
            following = StorePolicies(policies, ownership)
            following.start()
        else:
            policies = Policies.from_dir(config.resolve(config.policies.dir), ownership.facts,
                                         admin_role=config.ownership.admin_role,
                                         cache_max_bytes=config.policies.cache_max_bytes)
    except Exception as exc:
        await ownership.close()
        await tokens.close()
        raise ConfigError(str(exc)) from None
    tokens.observers.append(ownership.saw_identity)  # user names seen, for delegations by name
    return Services(config=config, tokens=tokens, ownership=ownership, policies=policies, audit=audit,
                    policy_store=following)


async def close_services(services: Services) -> None:
    if services.policy_store is not None:
        await services.policy_store.close()
    await services.ownership.close()
    await services.tokens.close()
    services.audit.close()


@contextlib.contextmanager
def listening(key: str, listen: str) -> Iterator[None]:
    """A listener that cannot bind (the port taken since the preflight): one line naming key and port."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(f"{key} {listen}: cannot listen: {(exc.strerror or str(exc)).lower()}") from None


class Listeners:
    """Every listener the configuration asks for, started and stopped together."""

    def __init__(self, services: Services):
        self.services = services
        self.mqtt: MqttGateway | None = None
        self.http: HttpGateway | None = None
        self.metrics: MetricsServer | None = None
        self._watch: asyncio.Task[None] | None = None
        self._audit_flush: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = self.services.config
        if config.policies.watch and config.policies.source == "dir":
            self._watch = asyncio.create_task(self.services.policies.watch(), name="policy-watch")
        if config.audit.fold_seconds > 0:
            self._audit_flush = asyncio.create_task(self._flush_audit(config.audit.fold_seconds), name="audit-flush")
        if config.metrics is not None:
            from proxy.config import parse_hostport
            from proxy.metrics_server import MetricsServer

            self.metrics = MetricsServer()
            with listening("metrics.listen", config.metrics.listen):
                await self.metrics.start(*parse_hostport(config.metrics.listen))
        if config.http is not None:
            from ownership.api import create_api_app
            from proxy.http.gateway import HttpGateway

            portal_app = None
            if config.portal.enabled:
                from proxy.portal.app import create_portal_app

                # The MQTT listener starts after this one: its presence is looked up when asked.
                portal_app = create_portal_app(self.services, lambda: self.mqtt.presence if self.mqtt else None)
            self.http = HttpGateway(self.services, create_api_app(self.services), portal_app=portal_app)
            with listening("http.listen", config.http.listen):
                await self.http.start()
        if config.mqtt is not None:
            from proxy.mqtt.server import MqttGateway

            self.mqtt = MqttGateway(self.services)
            where = ", ".join(filter(None, (config.mqtt.listen, config.mqtt.websocket_listen)))
            with listening("mqtt.listen/mqtt.websocket_listen" if config.mqtt.websocket_listen else "mqtt.listen",
                           where):
                await self.mqtt.start()

    async def stop(self) -> None:
        # Listeners first, so nothing new arrives while the rest shuts down.
        for part in (self.mqtt, self.http, self.metrics):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.stop()
        for task in (self._watch, self._audit_flush):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _flush_audit(self, every: float) -> None:
        """Folded denials reach the log within about two windows even when nothing else is audited."""
        while True:
            await asyncio.sleep(every)
            try:
                self.services.audit.flush()
            except OSError as exc:  # a full disk must not stop the flushing for good
                log.warning("audit log: cannot write folded denials: %s", exc)


async def run_services(config: Config, *, stop: asyncio.Event, services: Services | None = None,
                       on_ready: OnReady | None = None) -> None:
    """Run until ``stop`` is set. ``on_ready(services, listeners)`` is called once listening."""
    own = services is None
    services = services or await build_services(config)
    listeners = Listeners(services)
    try:
        await listeners.start()
        parts: list[str] = []
        if listeners.mqtt is not None and config.mqtt is not None:
            parts.append(f"mqtt on {config.mqtt.listen}")
        if listeners.http is not None and config.http is not None:
            parts.append(f"http on {config.http.listen}")
        if listeners.metrics is not None and config.metrics is not None:
            parts.append(f"metrics on {config.metrics.listen}")
        log.info("keygate ready: %s", ", ".join(parts) or "no listeners configured")
        if on_ready is not None:
            result = on_ready(services, listeners)
            if asyncio.iscoroutine(result):
                await result
        await stop.wait()
    finally:
        await listeners.stop()
        if own:
            await close_services(services)
