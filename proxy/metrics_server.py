"""The metrics listener: ``/metrics`` (Prometheus text), ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process serves requests at all (liveness);
``/readyz`` answers 200 only when every readiness check passes (keys loaded,
store open, upstreams reachable...) and 503 otherwise, with the checks' details
as JSON either way, so an orchestrator and a human read the same answer.
"""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.metrics import REGISTRY, readiness, readiness_info
from proxy.sharing import worker
from proxy.worker_metrics import METRICS_DIR_ENV, socket_path


async def _metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest(REGISTRY))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    ready, checks = readiness()
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks, **readiness_info()},
                             status=200 if ready else 503)


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


class MetricsServer:
    """``await server.start(host, port)`` ... ``await server.stop()``; ``port`` is the bound one (port 0 works)."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        runner = web.AppRunner(create_app(), access_log=None, handle_signals=False)
        await runner.setup()
        me, folder = worker(), os.environ.get(METRICS_DIR_ENV, "")
        site: web.BaseSite
        if me is not None and folder:  # a worker: the supervisor serves the port for all (proxy/worker_metrics.py)
            site = web.UnixSite(runner, str(socket_path(folder, me[0])))
        else:
            site = web.TCPSite(runner, host, port)  # workers never get here: the supervisor binds the port
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0] if runner.addresses else None
        self.port = address[1] if isinstance(address, tuple) else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
