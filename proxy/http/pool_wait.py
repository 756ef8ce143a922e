"""Telling the aiohttp client's wait for a free connection from a slow Orion.

aiohttp runs its pool wait under the ``connect`` timeout and raises the same
``ConnectionTimeoutError`` whether no connection came free or Orion took too long to
accept one. The two differ for the caller: a request that waited for the pool was never
sent (503 and ``Retry-After``, its outcome known, as the lean pool's ``UpstreamBusy``),
while one cut during connect may have reached Orion (504). aiohttp's trace signals
``on_connection_queued_start`` / ``_end`` mark the wait: a :class:`PoolWait` passed as the
request's ``trace_request_ctx`` says whether the timeout found the request still queued.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import aiohttp

__all__ = ["PoolWait", "pool_wait_trace"]


class PoolWait:
    """One request's place in the client's pool: ``queued`` while it waits for a connection."""

    __slots__ = ("queued",)

    def __init__(self) -> None:
        self.queued = False


async def _queued(_session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: Any) -> None:
    wait = ctx.trace_request_ctx
    if isinstance(wait, PoolWait):   # (the side calls pass none)
        wait.queued = True


async def _dequeued(_session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: Any) -> None:
    wait = ctx.trace_request_ctx
    if isinstance(wait, PoolWait):
        wait.queued = False


def pool_wait_trace() -> aiohttp.TraceConfig:
    """The trace that keeps each :class:`PoolWait` up to date (one per client session)."""
    trace = aiohttp.TraceConfig()
    trace.on_connection_queued_start.append(_queued)
    trace.on_connection_queued_end.append(_dequeued)
    return trace
