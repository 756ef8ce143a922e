"""The change feed: every gateway process applies every write committed by another.

Each write appends a row to the store's ``changes`` table in its own transaction. Two ways of
hearing of it, one logic after that:

- postgres (ownership/pg_store.py): the write also sends ``NOTIFY keygate_changes``; one
  connection LISTENs (:class:`PgListen`) and, on a notification and at least every heartbeat,
  asks for the newest sequence number.
- SQLCipher with ``keygate serve --workers N`` (ownership/store.py, proxy/workers.py): the
  workers share one file, so each polls ``max(seq)`` of its change table every
  :data:`LOCAL_POLL_SECONDS` (:class:`LocalPoll`): an index lookup in a WAL read snapshot, no
  lock taken, and nothing to run or lose between the processes (no socket, no supervisor in
  the path: a worker restarted by the supervisor catches up from the file like any other).

Anything newer than what this process applied (a notification, one it missed, or everything
written while it was away) is caught up from the store: the facts are replaced by a snapshot
read at that sequence number, and the devices the changes touched go to the subscribers (the
gateways re-check open connections on them, exactly as after a write made here).

When the feed has not answered for ``store.feed_max_silence_seconds``, this process can no longer
know what was revoked elsewhere: it fails closed (the facts are emptied, so every grant that rests
on the store is refused), says so in /readyz and the log, and catches up in full once back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from ownership.facts import EMPTY, MemoryFacts

log = logging.getLogger("keygate.ownership.feed")

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]

#: How often a worker over a SQLCipher file looks for changes made by the others.
LOCAL_POLL_SECONDS = 0.1


class FeedStore(Protocol):
    """What the feed reads of a store (both backends provide it)."""

    def changes_since(self, seq: int) -> tuple[int, set[str] | None, bool]: ...
    def load_all_at(self) -> tuple[int, dict[str, list[dict[str, Any]]]]: ...
    def forget_own(self) -> None: ...
    def change_mark(self, seq: int) -> Any: ...


class Heard(Protocol):
    """One connected spell of a signal: the newest sequence number, and a wait for the next change."""

    async def newest(self) -> int: ...
    async def wait(self, timeout: float) -> None: ...


class Signal(Protocol):
    def connect(self, timeout: float) -> contextlib.AbstractAsyncContextManager[Heard]: ...


class PgListen:
    """LISTEN keygate_changes on a connection of its own (the postgres backend)."""

    def __init__(self, dsn: str):
        self._dsn = dsn

    @contextlib.asynccontextmanager
    async def connect(self, timeout: float) -> AsyncIterator[Heard]:
        import psycopg
        from psycopg.conninfo import make_conninfo

        from ownership.pg_store import CHANNEL, LIVENESS

        conn = await asyncio.wait_for(psycopg.AsyncConnection.connect(
            make_conninfo(self._dsn, **LIVENESS), autocommit=True, connect_timeout=max(1, int(timeout))), timeout)
        async with conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            yield _PgHeard(conn)


class _PgHeard:
    def __init__(self, conn: Any):
        self._conn = conn

    async def newest(self) -> int:
        cur = await self._conn.execute("SELECT coalesce(max(seq), 0) FROM changes")
        row = await cur.fetchone()
        return int(row[0])

    async def wait(self, timeout: float) -> None:
        async for _ in self._conn.notifies(timeout=timeout, stop_after=1):
            pass


class LocalPoll:
    """The store file's own change table, polled on the store thread (SQCipher, several workers)."""

    def __init__(self, last_change: Callable[[], int], run: Runner, every: float = LOCAL_POLL_SECONDS):
        self._last_change = last_change
        self._run = run
        self._every = every

    @contextlib.asynccontextmanager
    async def connect(self, timeout: float) -> AsyncIterator[Heard]:
        yield self

    async def newest(self) -> int:
        return int(await self._run(self._last_change))

    async def wait(self, timeout: float) -> None:
        await asyncio.sleep(min(timeout, self._every))


class ChangeFeed:
    def __init__(self, signal: Signal, store: FeedStore, run: Runner, facts: MemoryFacts, *, applied: int,
                 mark: Any, max_silence: float, clock: Callable[[], float] = time.monotonic):
        self._signal = signal
        self._store = store
        self._run = run
        self._facts = facts
        self.applied = applied                 # the last change this process's facts include
        self._max_silence = max_silence
        self._beat = max(0.05, max_silence / 4)
        self._clock = clock
        self._last_heard = clock()
        self.failed_closed = False
        self._tasks: list[asyncio.Task[None]] = []
        # Run after each catch-up, before the feed listens again: other state that follows the store
        # (the policy set of policies.source: store, ownership/policy_store.py).
        self.after_catch_up: list[Callable[[], Awaitable[None]]] = []
        self._followers_behind = False
        self._mark = mark   # what identifies change ``applied`` in the store's history (change_mark)
        self._closed_because = ""
        # After the history changed: the (newest change, its mark) the last catch-up saw, until two
        # in a row agree (a restore in place is not one step: a half-restored store is not served).
        self._settling: tuple[int, Any] | None = None
        # Told when this process fails closed (the policy set of policies.source: store).
        self.on_fail_closed: list[Callable[[], None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen(), name="keygate-change-feed"),
                       asyncio.create_task(self._watch(), name="keygate-change-feed-watch")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # A connection to a database that vanished may take its time to close: do not wait on it.
            await asyncio.wait(self._tasks, timeout=2.0)
        self._tasks = []

    def readiness(self) -> tuple[bool, str]:
        if self.failed_closed:
            return False, f"{self._closed_because}: failing closed for grants that rest on the store"
        if self._followers_behind:
            return False, f"change feed at {self.applied}, but a follower of the store (the policy set) is behind"
        return True, f"change feed at {self.applied}"

    # ------------------------------------------------------------------ listening

    async def _listen(self) -> None:
        while True:
            try:
                async with self._signal.connect(self._max_silence) as heard:
                    while True:
                        newest = await asyncio.wait_for(heard.newest(), self._max_silence)
                        # The store went back (a restore, a standby that lagged): fewer changes than
                        # applied here, or, once new writes passed the old number, another change
                        # under it.
                        if newest < self.applied or not await self._run(self._same_history):
                            await self._rewound()
                        elif newest > self.applied or self.failed_closed:
                            await self._catch_up()
                            await self._after_catch_up()
                        elif self._followers_behind:  # one failed after an earlier catch-up: again
                            await self._after_catch_up()
                        self._last_heard = self._clock()
                        await heard.wait(self._beat)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database or the network went away: retry, the watch fails closed
                log.warning("change feed: %s%s; reconnecting", type(exc).__name__, f": {exc}" if str(exc) else "")
                await asyncio.sleep(min(self._beat, 0.5))

    def _same_history(self) -> bool:
        """On the store thread: whether change ``applied`` is still the one this process applied."""
        return bool(self._store.change_mark(self.applied) == self._mark)

    async def _after_catch_up(self) -> None:
        behind = False
        for follow in list(self.after_catch_up):
            try:
                await follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one follower failing must not stop the feed
                behind = True
                log.warning("change feed: a follower of the store failed (%s: %s); trying again at the next beat",
                            type(exc).__name__, exc)
        # ``applied`` is past the change already: without this, a policy push whose read failed once
        # would wait for the next unrelated change to be loaded.
        self._followers_behind = behind

    async def _catch_up(self) -> None:
        """Apply everything after :attr:`applied`: the devices the changes touched, and a snapshot.

        The reads and the building of the new facts run in one call on the store thread, and the
        new facts are put in force as soon as it returns: this process's own writes run on that
        thread too, so none falls between the reads, and none applied on the loop meanwhile is
        overwritten by a snapshot that predates it."""
        read = await self._run(self._read_catch_up, self.applied, self.failed_closed)
        if read is None:
            return
        seq, fresh, devices, mark = read
        if self._settling is not None and self._settling != (seq, mark):
            self._settling = (seq, mark)   # stays failed closed until the next catch-up agrees
            return
        self._settling = None
        if fresh is None:  # only this process's own writes since, applied when they committed
            if seq > self.applied:
                self.applied, self._mark = seq, mark
            return
        self._facts.adopt(fresh, devices)
        self.applied, self._mark = seq, mark
        if self.failed_closed:
            self.failed_closed = False
            log.warning("change feed back: caught up to change %d; grants that rest on the store are served again",
                        seq)

    def _read_catch_up(self, applied: int,
                       everything: bool) -> tuple[int, MemoryFacts | None, set[str] | None, Any] | None:
        """On the store thread: (the snapshot's change, the facts built from it, the devices to
        re-check or None for all, the snapshot's change mark); ``(last, None, None, its mark)`` when
        only own writes came since; None when the snapshot is older than ``applied``."""
        devices: set[str] | None = None
        last = applied
        if not everything:
            last, devices, foreign = self._store.changes_since(applied)
            if not foreign:
                return last, None, None, self._store.change_mark(last)
        seq, fresh, mark = self._read_snapshot()
        if seq < applied:  # never step back (the snapshot is of an older state)
            return None
        if devices is not None and seq > last:
            # Changes committed by others between the two reads are in the snapshot: their devices
            # are re-checked too (read again from ``last``: a superset, as more may have committed).
            _, later, _ = self._store.changes_since(last)
            devices = None if later is None else devices | later
        return seq, fresh, devices, mark

    def _read_snapshot(self) -> tuple[int, MemoryFacts, Any]:
        """On the store thread: the store's snapshot as new facts, with its change and that change's mark."""
        seq, snapshot = self._store.load_all_at()
        return seq, self._facts.built(snapshot), self._store.change_mark(seq)

    async def _rewound(self) -> None:
        """The store's history is not the one this process applied (fewer changes, or another under
        the number it applied): changes it applied are gone, and their numbers are given out again.
        Forget this process's own numbers and fail closed; the catch-ups that follow take the
        store's state in full once two in a row see the same (a restore may still be under way)."""
        log.error("change feed: the store's history is not the one this process applied up to change %d "
                  "(restored from a backup, or failed over to a standby that lagged): failing closed, then "
                  "reloading everything from the store once it stays the same", self.applied)
        await self._run(self._store.forget_own)
        self._fail_closed("the store's history changed")
        self.applied, self._mark = 0, None   # nothing of it is known: the catch-up reads all
        self._settling = (-1, None)

    # ------------------------------------------------------------------ failing closed

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._beat)
            silent = self._clock() - self._last_heard
            if silent > self._max_silence and not self.failed_closed:
                self._fail_closed(f"change feed silent for more than {self._max_silence:g}s")
                log.error("change feed silent for %.1fs (store.feed_max_silence_seconds is %g): failing closed "
                          "for grants that rest on the store until it is back", silent, self._max_silence)

    def _fail_closed(self, because: str) -> None:
        self.failed_closed, self._closed_because = True, because
        self._facts.replace(EMPTY, None)
        for tell in list(self.on_fail_closed):
            try:
                tell()
            except Exception:  # one failing must not keep the others from failing closed
                log.exception("change feed: failing closed: a follower of the store failed")
