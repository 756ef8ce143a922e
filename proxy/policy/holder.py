"""The swappable holder of the current policy set, and hot reload.

:class:`Policies` is what the gateways hold. Every question goes to the
compiled set in force at the moment of the call; a reload compiles a whole
new set beside it and swaps one reference, so a decision never sees half an
edit. A reload that fails (broken YAML, a duplicate id, a bad subject...)
keeps the last good set, logs ``file:line:column: message``, counts
``keygate_policy_reload_errors_total`` and turns the ``policies`` readiness
check to not-ready with the error, until a good edit lands.

Callbacks registered with :meth:`Policies.subscribe` run after every swap
(gateways drop their decision caches and re-check open subscriptions).

With ``policies.source: store`` the set comes from the store instead of a
directory (ownership/policy_store.py feeds :meth:`Policies.load_source`);
the swap, its callbacks and a refusal are the same. Every load is logged with
the set's hash, and /readyz (field ``policies``) and the metrics carry it, so
an operator sees when two processes serve different sets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter, Gauge

from proxy.facts import OwnershipFacts
from proxy.identity.model import Identity
from proxy.metrics import REGISTRY, add_readiness_check, add_readiness_info
from proxy.policy.decision import Decision, PolicyError, SubscribeDecision
from proxy.policy.engine import CACHE_MAX_BYTES, CompiledPolicies
from proxy.policy.language import PolicySource, load_dir, load_text

__all__ = ["Policies"]

log = logging.getLogger("keygate.policy")

RELOAD_ERRORS = Counter("keygate_policy_reload_errors_total", "Policy reloads refused (the last good set stays)",
                        registry=REGISTRY)
RELOADS = Counter("keygate_policy_reloads_total", "Policy sets swapped in by hot reload", registry=REGISTRY)
GENERATION = Gauge("keygate_policy_generation", "Generation of the policy set in force (bumps on each swap)",
                   registry=REGISTRY)
INFO = Gauge("keygate_policy_info", "The policy set in force (value 1), by content hash", ["hash"],
             registry=REGISTRY)
RULES = Gauge("keygate_policy_rules", "Rules in the policy set in force", registry=REGISTRY)
LOADED_AT = Gauge("keygate_policy_loaded_timestamp_seconds", "When the policy set in force was loaded (Unix time)",
                  registry=REGISTRY)


def _snapshot(path: Path) -> tuple[tuple[str, int, int, int], ...] | None:
    """What the files look like (name, inode, size, mtime), to notice changes a dead watch missed."""
    try:
        return tuple(sorted((str(p), st.st_ino, st.st_size, st.st_mtime_ns)
                            for p in path.rglob("*") if p.suffix in (".yaml", ".yml") for st in (p.stat(),)))
    except OSError:
        return None


class Policies:
    """Holder of the current compiled policy set (hot reload swaps it)."""

    def __init__(self, compiled: CompiledPolicies, *, path: Path | None = None, version: int | None = None,
                 served: bool | None = None):
        self._compiled = compiled
        self._path = path
        # The store's version of the set in force (policies.source: store), else None.
        self.version = version
        self.origin = "store" if version is not None else "dir"
        self.generation = 1
        self.loaded_at = time.time()
        self.last_error: str | None = None
        self._listeners: list[Callable[[Policies], None]] = []
        self._seen = _snapshot(path) if path is not None else None
        # Sets built from text (tests, tools) are not the one being served: no metrics, no readiness.
        self._served = path is not None if served is None else served
        self._publish_metrics(None)
        if self._served:
            add_readiness_check("policies", self._readiness)
            add_readiness_info("policies", self.info)
            log.info("policies loaded from %s: generation %d, %d rules, hash %s", self._where(), self.generation,
                     len(compiled.source.rules), self.digest)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_dir(cls, path: str | Path, facts: OwnershipFacts, *, admin_role: str = "iot-admin",
                 clock: Callable[[], float] = time.time, cache_max_bytes: int = CACHE_MAX_BYTES) -> Policies:
        """Load and compile every file under ``path``; :class:`PolicyError` on a broken set."""
        src = load_dir(path)
        return cls(CompiledPolicies(src, facts, admin_role=admin_role, clock=clock, cache_max_bytes=cache_max_bytes),
                   path=Path(path))

    @classmethod
    def from_text(cls, text: str, facts: OwnershipFacts, filename: str = "test.yaml", *,
                  admin_role: str = "iot-admin", clock: Callable[[], float] = time.time) -> Policies:
        return cls(CompiledPolicies(load_text(text, filename), facts, admin_role=admin_role, clock=clock))

    @property
    def compiled(self) -> CompiledPolicies:
        return self._compiled

    @property
    def source(self) -> PolicySource:
        return self._compiled.source

    @property
    def digest(self) -> str:
        return self._compiled.source.digest

    # ------------------------------------------------------------------ questions

    def may_publish(self, identity: Identity, topic: str, *, qos: int = 0, retain: bool = False,
                    client_id: str = "", now: float | None = None) -> Decision:
        return self._compiled.may_publish(identity, topic, qos=qos, retain=retain, client_id=client_id, now=now)

    def may_subscribe(self, identity: Identity, topic_filter: str, *, qos: int = 0,
                      client_id: str = "", now: float | None = None) -> SubscribeDecision:
        return self._compiled.may_subscribe(identity, topic_filter, qos=qos, client_id=client_id, now=now)

    def may_receive(self, identity: Identity, topic: str, *, client_id: str = "",
                    now: float | None = None) -> Decision:
        return self._compiled.may_receive(identity, topic, client_id=client_id, now=now)

    def may_http(self, identity: Identity, method: str, path: str) -> Decision:
        return self._compiled.may_http(identity, method, path)

    # ------------------------------------------------------------------ reload

    def subscribe(self, callback: Callable[[Policies], None]) -> Callable[[], None]:
        """``callback(self)`` after every swap; returns a function that unsubscribes."""
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    def swap(self, compiled: CompiledPolicies, *, version: int | None = None) -> None:
        """Put ``compiled`` in force and tell the subscribers."""
        self._compiled = compiled
        self.generation += 1
        self.loaded_at = time.time()
        if version is not None:
            self.version = version
        self.last_error = None
        RELOADS.inc()
        self._publish_metrics(None)
        for cb in list(self._listeners):
            try:
                cb(self)
            except Exception:  # one broken listener must not stop the others hearing of the swap
                log.exception("policy swap listener failed")

    def reload(self) -> bool:
        """Load the directory again; swap if it is good. Returns whether it swapped."""
        try:
            compiled = self._build()
        except PolicyError as exc:
            self._refuse(exc)
            return False
        return self._apply(compiled)

    def _build(self) -> CompiledPolicies:
        if self._path is None:
            raise PolicyError("these policies were not loaded from a directory")
        self._seen = _snapshot(self._path)
        return self.compile(load_dir(self._path))

    def compile(self, src: PolicySource) -> CompiledPolicies:
        """``src`` compiled as the set in force is (same facts, admin role, clock, cache bound)."""
        return CompiledPolicies(src, self._compiled.facts, admin_role=self._compiled.admin_role,
                                clock=self._compiled.clock, cache_max_bytes=self._compiled.cache_max_bytes)

    async def load_source(self, build: Callable[[], PolicySource], *, version: int) -> bool:
        """Load a set from elsewhere (the store): ``build`` and the compilation run off the loop,
        the swap on it; a set that does not load is refused as a broken reload is (the last good
        set stays, logged, /readyz not ready). Returns whether the set is good."""
        try:
            compiled = await asyncio.to_thread(lambda: self.compile(build()))
        except PolicyError as exc:
            self._refuse(PolicyError(f"store version {version}: {exc}"))
            return False
        self._apply(compiled, version=version)
        return True

    def _refuse(self, exc: PolicyError) -> None:
        self.last_error = str(exc)
        RELOAD_ERRORS.inc()
        log.error("policy reload refused, keeping generation %d (hash %s): %s", self.generation, self.digest, exc)

    def _apply(self, compiled: CompiledPolicies, *, version: int | None = None) -> bool:
        if compiled.source.digest == self.digest and self.last_error is None:
            if version is not None:
                self.version = version  # the same files pushed again
            return False  # touched, not changed
        self.swap(compiled, version=version)
        log.info("policies reloaded from %s: generation %d, %d rules, hash %s", self._where(), self.generation,
                 len(compiled.source.rules), compiled.source.digest)
        return True

    def _where(self) -> str:
        if self.origin == "store":
            return f"the store (version {self.version})"
        return str(self._path) if self._path is not None else "text"

    async def watch(self, *, debounce_ms: int = 200) -> None:
        """Hot reload loop; run it as a task and cancel it on shutdown.

        Loading and compiling run in a worker thread (a big set takes a while
        and the event loop keeps serving with the old one); the swap itself
        happens on the loop. Once a second the watcher also compares the files
        with what it last loaded, so a directory removed or replaced under the
        watch (a remount, ``rm -r`` then a copy) is noticed and followed; while
        it is missing, readiness says so and the last good set stays.
        """
        from watchfiles import awatch

        if self._path is None:
            raise PolicyError("these policies were not loaded from a directory")
        resync = False
        while True:
            if resync:
                await self._reload_in_thread()
                resync = False
            try:
                async for changes in awatch(self._path, debounce=debounce_ms, step=50, recursive=True,
                                            rust_timeout=1000, yield_on_timeout=True):
                    if changes:
                        await self._reload_in_thread()
                    elif _snapshot(self._path) != self._seen:
                        # The files changed but the watch said nothing: the directory was
                        # removed or replaced under it. Watch the new one and load it.
                        resync = True
                        break
            except OSError as exc:  # the directory is missing or cannot be watched
                self._refuse(PolicyError(f"{self._path}: cannot watch: {exc}"))
                resync = True
                await asyncio.sleep(1.0)

    async def _reload_in_thread(self) -> bool:
        """Build off the loop, swap on it. Returns whether the set is good (swapped or unchanged)."""
        try:
            compiled = await asyncio.to_thread(self._build)
        except PolicyError as exc:
            self._refuse(exc)
            return False
        self._apply(compiled)
        return True

    def _readiness(self) -> tuple[bool, str]:
        if self.last_error:
            return False, f"reload refused, generation {self.generation} still in force: {self.last_error}"
        return True, f"generation {self.generation}, hash {self.digest}"

    def info(self) -> dict[str, object]:
        """The set in force, for /readyz: compare ``digest`` across processes and hosts."""
        return {"digest": self.digest, "source": self.origin, "version": self.version,
                "generation": self.generation, "rules": len(self._compiled.source.rules),
                "loaded_at": self.loaded_at, "error": self.last_error}

    def _publish_metrics(self, _: object) -> None:
        if not self._served:
            return
        GENERATION.set(self.generation)
        INFO.clear()
        INFO.labels(hash=self.digest).set(1)
        RULES.set(len(self._compiled.source.rules))
        LOADED_AT.set(self.loaded_at)
