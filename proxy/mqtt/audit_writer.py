"""The shell's audit writer: the sessions' :class:`~proxy.mqtt.commands.AuditRecords`,
written off the event loop, in batches, in order.

A write to the audit log is a file write behind a lock; on the event loop it would stall
every connection behind one slow disk. Records handed over during one turn of the loop go
to one worker thread as one batch (``loop.call_soon``), which writes them in the order they
came. :meth:`AuditWriter.drain` waits until everything handed over is written (tests, and
the gateway's stop).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence

from proxy.audit import AuditLog
from proxy.mqtt.commands import Record

log = logging.getLogger("keygate.mqtt")

__all__ = ["AuditWriter"]


class AuditWriter:
    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._batch: list[Record] = []
        self._queue: queue.SimpleQueue[list[Record] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._done = threading.Condition()
        self._unwritten = 0  # batches handed to the thread and not yet written

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def write(self, records: Sequence[Record]) -> None:
        if self._loop is None:  # not started (no loop to defer to): write now
            self._write(list(records))
            return
        if not self._batch:
            self._loop.call_soon(self._hand_off)
        self._batch.extend(records)

    def _hand_off(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="keygate-mqtt-audit", daemon=True)
            self._thread.start()
        with self._done:
            self._unwritten += 1
        self._queue.put(batch)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            self._write(batch)
            with self._done:
                self._unwritten -= 1
                self._done.notify_all()

    def _write(self, batch: list[Record]) -> None:
        for record in batch:
            try:
                self.audit.record(**record.as_kwargs())
            except Exception:  # a broken log must not take the writer (and every later line) down
                log.exception("audit record could not be written")

    def drain(self, timeout: float = 10.0) -> bool:
        """Hand over what is waiting and wait until all of it is written (True if it was)."""
        self._hand_off()
        with self._done:
            return self._done.wait_for(lambda: self._unwritten == 0, timeout)

    async def close(self) -> None:
        self._hand_off()
        if self._thread is not None:
            thread, self._thread = self._thread, None
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10.0)
