"""``keygate serve --workers N``: a supervisor and N worker processes sharing every listener.

The supervisor runs the preflight once and opens the store once (so schema migrations run in one
process, before any worker), then starts N copies of ``keygate serve`` with ``KEYGATE_WORKER``
set (proxy/sharing.py): each binds every configured listener with ``SO_REUSEPORT`` (the kernel
spreads new connections over them) and, over a SQLCipher file, polls the file's change table for
the others' writes (ownership/feed.py). A worker says it is ready by writing one line to a pipe
the supervisor holds.

- A worker that dies is started again, after a back-off that doubles from
  :data:`FIRST_BACKOFF_SECONDS` to :data:`MAX_BACKOFF_SECONDS` while it keeps dying, and is reset
  once a worker has run :data:`STABLE_SECONDS`.
- A worker that dies before it is ready :data:`MAX_START_FAILURES` times in a row means the
  configuration or the host is wrong, not bad luck: the supervisor stops the others and exits 1,
  naming the worker and its last exit status.
- SIGTERM/SIGINT: forwarded to every worker as SIGTERM (each closes its listeners and drains as
  ``keygate serve`` does); a worker still running after :data:`STOP_GRACE_SECONDS` is killed.
- A worker whose supervisor is gone (killed with -9) stops by itself: it watches its parent.
- ``metrics.listen`` is the supervisor's: it answers for the host from every worker's registry,
  each served on a Unix socket in a private folder (proxy/worker_metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.sharing import WORKER_ENV
from proxy.worker_metrics import METRICS_DIR_ENV, WorkerMetrics

log = logging.getLogger("keygate.workers")

READY_FD_ENV = "KEYGATE_WORKER_READY_FD"
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 10.0
STABLE_SECONDS = 30.0
MAX_START_FAILURES = 5
STOP_GRACE_SECONDS = 20.0


@dataclass
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready: bool = False
    start_failures: int = 0   # in a row, before ready
    deaths: int = 0           # in a row, reset once it has run STABLE_SECONDS
    restarts: int = 0
    readers: list[asyncio.Task[None]] = field(default_factory=list)


class Supervisor:
    def __init__(self, argv: list[str], count: int, *, first_backoff: float = FIRST_BACKOFF_SECONDS,
                 on_ready: Callable[[], None] | None = None, metrics_listen: tuple[str, int] | None = None):
        self._argv = argv            # the worker's command line (keygate serve without --workers)
        self._count = count
        self._first_backoff = first_backoff
        self._on_ready = on_ready    # called once, when every worker first says it is ready
        self._workers = [Worker(i + 1) for i in range(count)]
        self._stopping = False
        self.failure: str | None = None   # why the supervisor gave up, one line
        self.ever_ready = False
        self._all_ready = asyncio.Event()
        self._done = asyncio.Event()
        self._metrics_listen = metrics_listen
        self._metrics: WorkerMetrics | None = None
        self._metrics_dir: str | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.stop)
        if self._metrics_listen is not None:
            self._metrics_dir = tempfile.mkdtemp(prefix="keygate-worker-metrics-")  # 0700: only this user
            self._metrics = WorkerMetrics(self._metrics_dir, self._count, self._metrics_state)
            try:
                await self._metrics.start(*self._metrics_listen)
            except OSError as exc:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
                host, port = self._metrics_listen
                self.failure = f"metrics.listen {host}:{port}: {exc.strerror or exc}"
                return 1
        try:
            return await self._run_workers()
        finally:
            if self._metrics is not None:
                await self._metrics.stop()
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)

    def _metrics_state(self) -> tuple[int, dict[int, int]]:
        alive = [w for w in self._workers if w.ready and w.proc is not None and w.proc.returncode is None]
        return len(alive), {w.index: w.restarts for w in self._workers}

    async def _run_workers(self) -> int:
        watchers = [asyncio.create_task(self._keep(w), name=f"keygate-worker-{w.index}") for w in self._workers]
        ready = asyncio.create_task(self._announce())
        await self._done.wait()
        await self._stop_all()
        for task in (*watchers, ready):
            task.cancel()
        await asyncio.gather(*watchers, ready, return_exceptions=True)
        return 1 if self.failure is not None else 0

    def stop(self) -> None:
        if not self._stopping:
            log.info("stopping %d workers", self._count)
        self._stopping = True
        self._done.set()

    async def _announce(self) -> None:
        await self._all_ready.wait()
        pids = ", ".join(str(w.proc.pid) for w in self._workers if w.proc is not None)
        log.info("keygate ready: %d workers (pids %s)", self._count, pids)
        if self._on_ready is not None:
            self._on_ready()

    async def _keep(self, w: Worker) -> None:
        """Run worker ``w``, and again each time it dies, until stopping."""
        while not self._stopping:
            await self._start(w)
            assert w.proc is not None  # noqa: S101 (narrowing: _start set it)
            code = await w.proc.wait()
            for task in w.readers:
                task.cancel()
            if self._stopping:
                return
            ran = time.monotonic() - w.started_at
            status = f"signal {-code}" if code < 0 else f"exit status {code}"
            if not w.ready:
                w.start_failures += 1
                if w.start_failures >= MAX_START_FAILURES:
                    self.failure = (f"worker {w.index} died before it was ready {w.start_failures} times in a row "
                                    f"(last: {status}); its log is above: stopping")
                    self.stop()
                    return
            else:
                w.start_failures = 0
            w.deaths = 1 if ran >= STABLE_SECONDS else w.deaths + 1
            backoff = min(MAX_BACKOFF_SECONDS, self._first_backoff * 2 ** (w.deaths - 1))
            log.warning("worker %d (pid %d) died (%s) after %.1fs; starting it again in %.1fs",
                        w.index, w.proc.pid, status, ran, backoff)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._done.wait(), backoff)
            w.restarts += 1

    async def _start(self, w: Worker) -> None:
        read_fd, write_fd = os.pipe()
        env = {**os.environ, WORKER_ENV: f"{w.index}/{self._count}", READY_FD_ENV: str(write_fd)}
        if self._metrics_dir is not None:
            env[METRICS_DIR_ENV] = self._metrics_dir
        try:
            w.proc = await asyncio.create_subprocess_exec(*self._argv, env=env, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        w.started_at = time.monotonic()
        w.ready = False
        w.readers = [asyncio.create_task(self._await_ready(w, read_fd))]

    async def _await_ready(self, w: Worker, read_fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                    os.fdopen(read_fd, "rb", buffering=0))
        try:
            line = await reader.readline()
            if line.strip() == b"ready":
                w.ready = True
                self.ever_ready = True
                if w.restarts:
                    log.info("worker %d ready again (pid %d)", w.index, w.proc.pid if w.proc else -1)
                if all(x.ready for x in self._workers):
                    self._all_ready.set()
        finally:
            transport.close()

    async def _stop_all(self) -> None:
        procs = [w.proc for w in self._workers if w.proc is not None and w.proc.returncode is None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        if not procs:
            return
        _, late = await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=STOP_GRACE_SECONDS)
        if late:
            log.warning("%d workers still running %gs after SIGTERM: killing them", len(late), STOP_GRACE_SECONDS)
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            await asyncio.gather(*(p.wait() for p in procs))


def worker_argv(config_path: str, log_level: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "serve", "-c", config_path, "--log-level", log_level]


def tell_supervisor_ready() -> None:
    """In a worker: one line on the pipe the supervisor reads (nothing when not a worker)."""
    fd = os.environ.pop(READY_FD_ENV, "")
    if not fd.isdigit():
        return
    with contextlib.suppress(OSError):
        os.write(int(fd), b"ready\n")
        os.close(int(fd))


async def stop_when_orphaned(stop: asyncio.Event, every: float = 1.0) -> None:
    """In a worker: set ``stop`` once the supervisor is gone (the worker was re-parented)."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(every)
        if os.getppid() != parent:
            logging.getLogger("keygate").warning("supervisor (pid %d) gone: stopping", parent)
            stop.set()
            return
