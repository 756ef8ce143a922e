"""The supervisor's metrics listener under ``keygate serve --workers N``: one answer for the host.

Each worker serves its own registry on a Unix socket in a private folder the supervisor made
(:data:`METRICS_DIR_ENV`, ``worker-I.sock``); the supervisor alone binds ``metrics.listen``. So a
scrape is never one worker picked by the kernel:

- ``/metrics`` is every worker's families, each sample labelled ``worker="I"`` (sum them with
  ``sum without (worker) (...)``), plus the supervisor's own ``keygate_workers`` (configured,
  ready) and ``keygate_worker_restarts_total``. A worker that does not answer within
  :data:`FETCH_TIMEOUT_SECONDS` is left out and counted in ``keygate_workers_unreachable``.
- ``/readyz`` is 200 only when every worker is reached and ready, and the workers serve the same
  policy set (one digest); the body holds each worker's own answer.
- ``/healthz`` is the supervisor's liveness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

METRICS_DIR_ENV = "KEYGATE_WORKER_METRICS_DIR"
FETCH_TIMEOUT_SECONDS = 2.0


def socket_path(directory: str | Path, index: int) -> Path:
    return Path(directory) / f"worker-{index}.sock"


def merge(texts: dict[int, str]) -> list[Metric]:
    """Every worker's families as one list, each sample labelled with its worker (family order kept)."""
    families: dict[str, Metric] = {}
    for index in sorted(texts):
        for fam in text_string_to_metric_families(texts[index]):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                merged.samples.append(Sample(s.name, {**s.labels, "worker": str(index)}, s.value,
                                             s.timestamp, s.exemplar))
    return list(families.values())


class _Fixed:
    """A collector of families made already (generate_latest asks a registry)."""

    def __init__(self, families: Iterable[Metric]):
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(families: Iterable[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)


def host_readiness(answers: dict[int, tuple[int, dict[str, Any]] | None]) -> tuple[bool, dict[str, Any]]:
    """(ready, the body) from each worker's /readyz answer (None: not reached)."""
    checks: dict[str, str] = {}
    ready = True
    digests: set[str] = set()
    for index in sorted(answers):
        answer = answers[index]
        if answer is None:
            checks[f"worker {index}"] = "not reached"
            ready = False
            continue
        status, body = answer
        if status != 200:
            failing = [name for name, detail in (body.get("checks") or {}).items()
                       if isinstance(detail, str) and not detail.startswith("ok")]
            checks[f"worker {index}"] = "not ready" + (f": {', '.join(failing)}" if failing else "")
            ready = False
        else:
            checks[f"worker {index}"] = "ready"
        digest = (body.get("policies") or {}).get("digest")
        if digest:
            digests.add(str(digest))
    if len(digests) > 1:
        checks["policies"] = f"the workers serve different policy sets: {', '.join(sorted(digests))}"
        ready = False
    workers = {str(i): (a[1] if a is not None else None) for i, a in sorted(answers.items())}
    return ready, {"status": "ready" if ready else "not ready", "checks": checks, "workers": workers}


class WorkerMetrics:
    """The supervisor's ``metrics.listen``: ``await start(host, port)`` ... ``await stop()``."""

    def __init__(self, directory: str | Path, count: int, state: Callable[[], tuple[int, dict[int, int]]]):
        self._dir = Path(directory)
        self._count = count
        self._state = state        # (workers ready now, restarts per worker index)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _fetch(self, index: int, path: str) -> tuple[int, str] | None:
        connector = aiohttp.UnixConnector(path=str(socket_path(self._dir, index)))
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
        try:
            async with (aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                        session.get(f"http://worker{path}") as resp):
                return resp.status, await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    async def _all(self, path: str) -> dict[int, tuple[int, str] | None]:
        indexes = range(1, self._count + 1)
        answers = await asyncio.gather(*(self._fetch(i, path) for i in indexes))
        return dict(zip(indexes, answers, strict=True))

    async def _metrics(self, request: web.Request) -> web.Response:
        answers = await self._all("/metrics")
        texts = {i: a[1] for i, a in answers.items() if a is not None and a[0] == 200}
        try:
            families = merge(texts)
        except ValueError:  # a worker's text did not parse: say so rather than serve half of it
            return web.json_response({"error": {"code": "bad_worker_metrics",
                                                "message": "a worker's metrics did not parse"}}, status=502)
        ready, restarts = self._state()
        own = Metric("keygate_workers", "Worker processes of this keygate serve --workers N", "gauge")
        own.add_sample("keygate_workers", {"state": "configured"}, float(self._count))
        own.add_sample("keygate_workers", {"state": "ready"}, float(ready))
        unreachable = Metric("keygate_workers_unreachable", "Workers whose metrics this scrape could not read",
                             "gauge")
        unreachable.add_sample("keygate_workers_unreachable", {}, float(self._count - len(texts)))
        restarted = Metric("keygate_worker_restarts", "Times the supervisor started a worker again", "counter")
        for index in range(1, self._count + 1):
            restarted.add_sample("keygate_worker_restarts_total", {"worker": str(index)},
                                 float(restarts.get(index, 0)))
        resp = web.Response(body=render([*families, own, unreachable, restarted]))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        answers: dict[int, tuple[int, dict[str, Any]] | None] = {}
        for index, answer in (await self._all("/readyz")).items():
            body: Any = None
            if answer is not None:
                with contextlib.suppress(ValueError):
                    body = json.loads(answer[1])
            answers[index] = (answer[0], body) if answer is not None and isinstance(body, dict) else None
        ready, body = host_readiness(answers)
        return web.json_response(body, status=200 if ready else 503)
