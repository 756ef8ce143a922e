"""The change numbers this process wrote itself (both stores; read by ownership/feed.py).

Its facts hold those changes already, so its change feed skips them. A number is this process's
own only once its transaction's COMMIT is answered: one rolled back may be given out again (SQLite
does), and must then be read as the other writer's; one whose answer was lost may well have
committed, and is read back like another process's change.

Each number is kept with its change's time (``at``, written in the clear beside the sealed value,
so a rekey does not alter it): after a restore or a failover the same number can name another
process's change, and then it is not this one's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["OwnChanges"]

log = logging.getLogger("keygate.ownership.feed")


class OwnChanges:
    """Used from the store's one thread only."""

    def __init__(self) -> None:
        self._own: dict[int, float] = {}          # seq -> its change's time
        self._pending: list[tuple[int, float]] = []   # numbered in the transactions open now

    def numbered(self, seq: int, at: float) -> None:
        """A write in the open transaction appended change ``seq`` at time ``at``."""
        self._pending.append((seq, at))

    def opened(self) -> int:
        """A transaction begins: where its numbers start (above 0 only for a read inside a write)."""
        return len(self._pending)

    def committed(self) -> None:
        self._own.update(self._pending)
        self._pending.clear()

    def abandoned(self, start: int = 0) -> None:
        """Rolled back, or its COMMIT not answered: none of its numbers is this process's own."""
        del self._pending[start:]

    def forget(self) -> None:
        """The store went back (a restore, a failover): every number may be given out again."""
        self._own.clear()

    def fold(self, since: int, rows: Iterable[tuple[int, float, Any]],
             touched: Callable[[Any], list[str] | None]) -> tuple[int, set[str] | None, bool]:
        """The changes after ``since``, in order, as (seq, its time, its row), folded into (the
        newest seq, the device ids the others' changes touched or None for everything, whether any
        change was another's); ``touched`` reads a row's ids, and only the others' rows are read
        (this process's own are in its facts already). The own ones passed are forgotten. An own
        number whose change is another (the history was replaced) makes everything changed."""
        devices: set[str] | None = set()
        last, foreign = since, False
        for seq, at, row in rows:
            last = seq
            mine = self._own.pop(seq, None)
            if mine == at:
                continue
            if mine is not None:
                log.error("change feed: change %d is not the one this process wrote (the store was restored, or "
                          "failed over to a standby that lagged): everything is read again", seq)
                self._own.clear()
                devices = None
            foreign = True
            ids = touched(row)
            if ids is None or devices is None:
                devices = None
            else:
                devices |= set(ids)
        self._own = {n: at for n, at in self._own.items() if n > last}
        return last, devices, foreign
