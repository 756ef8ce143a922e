"""Whether this process is one of several workers of ``keygate serve --workers N`` (proxy/workers.py).

The supervisor sets :data:`WORKER_ENV` (``INDEX/COUNT``) in each worker's environment only; the
parts that behave differently read it here: the listeners bind with ``SO_REUSEPORT`` so the
workers share each port, and over a SQLCipher file the ownership service polls the file's change
table for the other workers' writes (ownership/feed.py). A process started any other way (one
``keygate serve``, ``keygate dev``, the tests' in-process gateways) is not a worker.
"""

from __future__ import annotations

import os

WORKER_ENV = "KEYGATE_WORKER"


def worker() -> tuple[int, int] | None:
    """(this worker's index from 1, the number of workers), or None when not a worker."""
    value = os.environ.get(WORKER_ENV, "")
    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit()):
        return None
    return int(index), int(count)


def is_worker() -> bool:
    return worker() is not None


def reuse_port() -> bool:
    """Bind listeners with SO_REUSEPORT: the kernel spreads connections over the workers."""
    return is_worker()
