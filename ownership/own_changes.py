"""The change numbers this process wrote itself (both stores; read by ownership/feed.py).

Its facts hold those changes already, so its change feed skips them. A number is this process's
own only once its transaction's COMMIT is answered: one rolled back may be given out again (SQLite
does), and must then be read as the other writer's; one whose answer was lost may well have
committed, and is read back like another process's change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["OwnChanges"]


class OwnChanges:
    """Used from the store's one thread only."""

    def __init__(self) -> None:
        self._own: set[int] = set()
        self._pending: list[int] = []   # numbered in the transactions open now

    def numbered(self, seq: int) -> None:
        """A write in the open transaction appended change ``seq``."""
        self._pending.append(seq)

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

    def fold(self, since: int, rows: Iterable[tuple[int, Any]],
             touched: Callable[[Any], list[str] | None]) -> tuple[int, set[str] | None, bool]:
        """The changes after ``since``, in order, as (seq, its row), folded into (the newest seq, the
        device ids the others' changes touched or None for everything, whether any change was
        another's); ``touched`` reads a row's ids, and only the others' rows are read (this
        process's own are in its facts already). The own ones passed are forgotten."""
        devices: set[str] | None = set()
        last, foreign = since, False
        for seq, row in rows:
            last = seq
            if seq in self._own:
                self._own.discard(seq)
                continue
            foreign = True
            ids = touched(row)
            if ids is None or devices is None:
                devices = None
            else:
                devices |= set(ids)
        self._own = {n for n in self._own if n > last}
        return last, devices, foreign
