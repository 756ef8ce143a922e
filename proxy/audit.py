"""The audit log: one JSON line per decision.

Records carry who (identity), what (protocol, action, resource), the decision
and the rule or reason that made it. Secrets (tokens, device keys, passwords)
are never passed in; callers hand over identities and resource names only.

The log must not become the way to fill a disk, so :class:`AuditLog`

* **bounds every line**: a string longer than ``max_field_bytes`` (UTF-8) is
  cut, marked with ``…`` and its full length recorded beside it
  (``"resource_bytes": 65536``; inside a list, ``"devices_bytes": {"3": 65536}``);
  lists keep their first ``LIST_ITEMS`` items (``"devices_items"``: the count).
  No line is longer than :func:`record_bound` bytes: past that, the largest
  extra fields are omitted (``"omitted"`` names them) and, failing that, every
  string is cut shorter;
* **folds repeated denials**: a denial identical to one written less than
  ``fold_seconds`` ago by the same connection (``peer`` and ``client_id`` for
  MQTT, ``remote`` for HTTP) is only counted, and when the window ends one
  line says how many there were (``"repeated": N``). Nothing is dropped: the
  window's line is written at the next record after it ends, on
  :meth:`AuditLog.flush` (``keygate serve`` calls it periodically) and on
  :meth:`AuditLog.close`.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TextIO

from proxy.identity.model import Identity

__all__ = ["AuditLog", "MemoryAudit", "record_bound", "LIST_ITEMS", "MAX_FOLD_WINDOWS"]

ELLIPSIS = "…"
LIST_ITEMS = 64          # items kept of a list field (the rest are counted)
MAX_FOLD_WINDOWS = 512   # open folding windows; when full the oldest ends early (its line is written)
_MIN_RECORD_BYTES = 4096
# What is added to a bounded body when it becomes a line: the time, latency_ms, repeated
# and since (each a number of at most 24 characters), the separators and the newline.
_HEADROOM = 160
_CORE = frozenset({"protocol", "action", "resource", "decision", "identity", "rule", "reason"})
# Who asked: never omitted, and (peer/client_id, or remote) the connection a denial is folded for.
_WHO = ("peer", "client_id", "remote")
# Differ between otherwise identical records: kept out of the folding key (numbers only).
_VOLATILE = ("latency_ms",)
_DUMPS = json.JSONEncoder(separators=(",", ":"), default=str).encode


def record_bound(max_field_bytes: int) -> int:
    """The most bytes one audit line (newline included) can take."""
    return max(16 * max_field_bytes, _MIN_RECORD_BYTES)


def _utf8_len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def _cut(s: str, limit: int) -> tuple[str, int | None]:
    """``s``, or its first ``limit`` UTF-8 bytes (whole characters) and ``…``, and the full length if cut."""
    if len(s) * 4 <= limit:  # cannot be longer: no need to encode
        return s, None
    if s.isascii():
        return (s, None) if len(s) <= limit else (s[:limit] + ELLIPSIS, len(s))
    b = s.encode("utf-8", "surrogatepass")
    if len(b) <= limit:
        return s, None
    return b[:limit].decode("utf-8", "ignore") + ELLIPSIS, len(b)


def _escaped_cut(s: str, budget: int) -> str:
    """``s`` cut so that it takes at most ``budget`` bytes inside the JSON line (escapes included)."""
    if len(_DUMPS(s)) - 2 <= budget:
        return s
    lo, hi = 0, min(len(s), budget)
    while lo < hi:  # the longest prefix that fits beside the ellipsis (6 bytes escaped)
        mid = (lo + hi + 1) // 2
        if len(_DUMPS(s[:mid])) - 2 <= budget - 6:
            lo = mid
        else:
            hi = mid - 1
    return s[:lo] + ELLIPSIS


def _scalar(v: Any) -> Any:
    """A JSON scalar as is; anything else (and numbers JSON or Python would choke on) as text."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v if -2**63 <= v < 2**64 else str(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return str(v)


def _number(v: int | float) -> str:
    """A volatile number as JSON writes it (``repr`` of a finite float: what the encoder does),
    without an encoder call per record."""
    if type(v) is float and math.isfinite(v):
        return repr(v)
    return _DUMPS(_scalar(v))


_CONTAINERS = (dict, list, tuple, set, frozenset)


def _bounded(value: Any, limit: int, depth: int) -> tuple[Any, Any]:
    """(the value with every string cut and every list shortened, what was cut: the full length
    of a cut string, ``{index: full length}`` for a list with cut items, else None).
    Structures deeper than two levels are kept as their (cut) text."""
    if depth >= 2 and isinstance(value, _CONTAINERS):
        value = str(value)
    if isinstance(value, dict):
        return _bounded_dict(value, limit, depth + 1), None
    if isinstance(value, _CONTAINERS):
        items, cut = [], {}
        for i, item in enumerate(value):
            if i == LIST_ITEMS:
                break
            item, full = _bounded(item, limit, depth + 1)
            items.append(item)
            if isinstance(full, int):
                cut[str(i)] = full
        return items, cut or None
    if not isinstance(value, str):
        value = _scalar(value)
        if not isinstance(value, str):
            return value, None
    return _cut(value, limit)


def _bounded_dict(d: dict[str, Any], limit: int, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    short = limit // 4  # characters that cannot make more than limit bytes
    for key, value in d.items():
        kind = type(value)
        if type(key) is str and len(key) <= short and (
                (kind is str and len(value) <= short) or value is None or kind is bool
                or (kind is int and -2**63 <= value < 2**64)):
            out[key] = value  # the common case: nothing to cut
            continue
        name = _cut(key if isinstance(key, str) else str(key), limit)[0]
        out[name], full = _bounded(value, limit, depth)
        if full is not None:
            out[f"{name}_bytes"] = full
        if isinstance(value, _CONTAINERS) and not isinstance(value, dict) and len(value) > LIST_ITEMS \
                and depth < 2:
            out[f"{name}_items"] = len(value)
    return out


def _recut(value: Any, budget: int) -> Any:
    """Every string of ``value`` cut to ``budget`` bytes as written (the last resort of the bound)."""
    if isinstance(value, str):
        return _escaped_cut(value, budget)
    if isinstance(value, list):
        return [_recut(v, budget) for v in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            short = _recut(v, budget)
            out[_escaped_cut(k, budget)] = short
            if isinstance(v, str) and short != v and f"{k}_bytes" not in value:
                out[f"{k}_bytes"] = _utf8_len(v)
        return out
    return value


class _Window:
    """Denials folded into the one written at ``since`` (wall clock); ``ends`` is monotonic."""

    __slots__ = ("ends", "since", "last", "count", "body")

    def __init__(self, ends: float, since: float, body: str):
        self.ends = ends
        self.since = since
        self.last = since
        self.count = 0
        self.body = body


_BODY_MEMO = 1024   # bodies kept by _body_key; all dropped when full
# The values a kept body's key may hold: equal values of these types are written alike. Not bool
# or float: 1 == 1.0 == True, and each is written differently.
_PLAIN = (str, int, type(None))


_KEPT_STRING = 64   # what a string held by a kept key is counted for besides its characters (its object)


def _body_key(protocol: str, action: str, decision: str, resource: str, identity: Identity | None,
              rule: str | None, reason: str | None, extra: dict[str, Any], budget: int) -> tuple[Any, ...] | None:
    """What a record's body is made of, as a key; None (not kept) unless every field is a string,
    None, an int or a list of strings, and the identity an Identity (written from its strings), and
    unless its strings take at most ``budget`` (their characters and _KEPT_STRING each): a key holds
    them as long as the memo keeps it, and a denied batch names every id it held (thousands, each a
    long string, for a body the log cuts to one line)."""
    if identity is not None and type(identity) is not Identity:
        return None
    parts: list[Any] = [identity]
    for value in (protocol, action, decision, resource, rule, reason):
        if type(value) not in _PLAIN:
            return None
        if type(value) is str:
            budget -= len(value) + _KEPT_STRING
        parts.append(value)
    for name, value in extra.items():
        kind = type(value)
        if kind is list or kind is tuple:   # both written as a JSON array
            if not all(type(v) is str for v in value):
                return None
            budget -= len(value) * _KEPT_STRING + sum(map(len, value))
            parts += (name, tuple(value))
        elif kind in _PLAIN:
            if kind is str:
                budget -= len(value) + _KEPT_STRING
            parts += (name, value)
        else:
            return None
    return tuple(parts) if budget >= 0 else None


def _time(t: float) -> str:
    # Six decimals, as round(t, 6) then repr gave, in one formatting: round() and the shortest repr
    # each run the float-to-decimal algorithm, 2.8 µs per line against 1.0.
    return f"{float(t):.6f}"


class AuditLog:
    """JSON lines on a text stream, written synchronously (one ``write`` per record at most).

    ``max_field_bytes`` bounds every string (see the module); ``fold_seconds``
    (0: off) folds repeated identical denials of one connection. ``clock`` is
    the wall clock of the ``time`` fields, ``monotonic`` the clock windows end by."""

    def __init__(self, stream: TextIO, *, close: bool = False, max_field_bytes: int = 1024,
                 fold_seconds: float = 0.0, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self._stream = stream
        self._close = close
        self._lock = threading.Lock()  # the store's writer thread audits too
        self.max_field_bytes = max_field_bytes
        self.max_record_bytes = record_bound(max_field_bytes)
        self.fold_seconds = fold_seconds
        self._clock = clock
        self._monotonic = monotonic
        # fold key -> window, oldest first (all windows last fold_seconds, so they also end in this order)
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        # A record's body by its fields (_body_key): the HTTP gateway records the same request of the
        # same client again and again, and bounding and encoding it was a tenth of a request's CPU.
        self._bodies: dict[tuple[Any, ...], str] = {}
        self._keyed: dict[Hashable, str] = {}   # the same, by the caller's key (_prepare_keyed)

    @classmethod
    def open(cls, path: str, **options: Any) -> AuditLog:
        """``-`` for stdout, otherwise a file opened for appending (line buffered)."""
        if path == "-":
            return cls(sys.stdout, **options)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        return cls(open(p, "a", buffering=1, encoding="utf-8"), close=True, **options)

    @classmethod
    def null(cls) -> AuditLog:
        return _NullAudit()

    def record(self, *, protocol: str, action: str, decision: str, resource: str = "",
               identity: Identity | None = None, rule: str | None = None, reason: str | None = None,
               **extra: Any) -> None:
        line = self._prepare(protocol=protocol, action=action, decision=decision, resource=resource,
                             identity=identity, rule=rule, reason=reason, **extra)
        with self._lock:
            out = self._ended(self._monotonic())
            self._add(line, out)
            if out:
                self._stream.write("".join(out))

    def record_many(self, entries: Sequence[dict[str, Any]], keys: Sequence[Hashable] | None = None) -> None:
        """Several records (each the keyword arguments of :meth:`record`) in one write: the HTTP
        gateway hands over the records of one turn of the event loop together. ``keys``, one per
        record, name each one's body (see :meth:`_prepare_keyed`)."""
        if keys is None:
            lines = [self._prepare(**kw) for kw in entries]
        else:
            lines = [self._prepare_keyed(key, kw) for kw, key in zip(entries, keys, strict=True)]
        with self._lock:
            out = self._ended(self._monotonic())
            for line in lines:
                self._add(line, out)
            if out:
                self._stream.write("".join(out))

    def _prepare(self, *, protocol: str, action: str, decision: str, resource: str = "",
                 identity: Identity | None = None, rule: str | None = None, reason: str | None = None,
                 **extra: Any) -> tuple[float, str, bool, str]:
        """(wall time, bounded body, whether it may fold, the volatile tail) of one record."""
        return self._prepared(protocol=protocol, action=action, decision=decision, resource=resource,
                              identity=identity, rule=rule, reason=reason, **extra)[0]

    def _prepared(self, *, protocol: str, action: str, decision: str, resource: str = "",
                  identity: Identity | None = None, rule: str | None = None, reason: str | None = None,
                  **extra: Any) -> tuple[tuple[float, str, bool, str], bool]:
        """:meth:`_prepare`'s line, and whether its body may be kept (_body_key: small enough)."""
        wall = self._clock()
        extra.pop("time", None)  # the log's own
        volatile = {k: extra.pop(k) for k in _VOLATILE if isinstance(extra.get(k), (int, float))}
        folds = self._folds(decision, extra)
        tail = "".join(f',"{k}":{_number(v)}' for k, v in volatile.items())
        key = _body_key(protocol, action, decision, resource, identity, rule, reason, extra, self.max_record_bytes)
        body = self._bodies.get(key) if key is not None else None
        if body is None:
            body = self._entry_body(protocol, action, decision, resource, identity, rule, reason, extra)
            if key is not None:
                if len(self._bodies) >= _BODY_MEMO:
                    self._bodies.clear()
                self._bodies[key] = body
        return (wall, body, folds, tail), key is not None

    def _folds(self, decision: str, fields: dict[str, Any]) -> bool:
        """Whether a record may fold into a window: a denial of a connection, with folding on."""
        return self.fold_seconds > 0 and decision == "deny" and bool(fields.get("peer") or fields.get("remote"))

    def _prepare_keyed(self, key: Hashable, kw: dict[str, Any]) -> tuple[float, str, bool, str]:
        """:meth:`_prepare` for a record whose caller names its body by ``key``: records with equal
        keys must be equal in every field but ``latency_ms``, a float (the line's own tail). The
        body is then bounded and encoded once per key, and a record of the key seen before costs
        no look at its fields (_body_key's was a third of an HTTP request's audit line)."""
        latency = kw.get("latency_ms")
        if type(latency) is not float:
            return self._prepare(**kw)
        body = self._keyed.get(key)
        if body is None:
            line, keep = self._prepared(**kw)
            if keep:   # not a record whose key would hold more than a line's worth of strings
                if len(self._keyed) >= _BODY_MEMO:
                    self._keyed.clear()
                self._keyed[key] = line[1]
            return line
        return self._clock(), body, self._folds(kw["decision"], kw), f',"latency_ms":{_number(latency)}'

    def _entry_body(self, protocol: str, action: str, decision: str, resource: str, identity: Identity | None,
                    rule: str | None, reason: str | None, extra: dict[str, Any]) -> str:
        entry: dict[str, Any] = {
            "protocol": protocol,
            "action": action,
            "resource": resource,
            "decision": decision,
        }
        if identity is not None:
            entry["identity"] = {"kind": identity.kind, "sub": identity.sub, "username": identity.username,
                                 "method": identity.method}
            if identity.azp:
                entry["identity"]["azp"] = identity.azp
        if rule:
            entry["rule"] = rule
        if reason:
            entry["reason"] = reason
        entry.update(extra)
        return self._body(entry)

    def _add(self, line: tuple[float, str, bool, str], out: list[str]) -> None:
        """Fold or append one prepared record to ``out`` (the lock held)."""
        wall, body, folds, tail = line
        if folds:
            window = self._windows.get(body)
            if window is not None:
                window.count += 1
                window.last = wall
                return
            if len(self._windows) >= MAX_FOLD_WINDOWS:
                self._end(self._windows.popitem(last=False)[1], out)
            self._windows[body] = _Window(self._monotonic() + self.fold_seconds, wall, body)
        out.append(f'{{"time":{_time(wall)},{body[1:-1]}{tail}}}\n')

    def flush(self) -> None:
        """Write the lines of the folding windows that have ended (``keygate serve`` calls this
        periodically, so a burst of denials is on disk soon after it stops)."""
        with self._lock:
            out = self._ended(self._monotonic())
            if out:
                self._stream.write("".join(out))

    def close(self) -> None:
        with self._lock:
            out: list[str] = []
            while self._windows:
                self._end(self._windows.popitem(last=False)[1], out)
            if out:
                self._stream.write("".join(out))
        if self._close:
            self._stream.close()

    # ------------------------------------------------------------------ folding

    def _ended(self, now: float) -> list[str]:
        out: list[str] = []
        windows = self._windows
        while windows:
            window = next(iter(windows.values()))
            if window.ends > now:
                break
            windows.popitem(last=False)
            self._end(window, out)
        return out

    @staticmethod
    def _end(window: _Window, out: list[str]) -> None:
        if window.count:
            out.append(f'{{"time":{_time(window.last)},{window.body[1:-1]},"repeated":{window.count},'
                       f'"since":{_time(window.since)}}}\n')

    # ------------------------------------------------------------------ bounding

    def _body(self, entry: dict[str, Any]) -> str:
        """The entry as one JSON object, every string cut, at most max_record_bytes - _HEADROOM long."""
        bounded = _bounded_dict(entry, self.max_field_bytes, 0)
        body = _DUMPS(bounded)
        limit = self.max_record_bytes - _HEADROOM
        if len(body) <= limit:  # ensure_ascii: characters are bytes
            return body
        return self._shrink(bounded, len(body), limit)

    def _shrink(self, bounded: dict[str, Any], full: int, limit: int) -> str:
        """Past the line bound: omit the largest extra fields, then cut every string shorter."""
        parents = [k for k in bounded if k not in _CORE and k not in _WHO
                   and not any(k == f"{p}{s}" for p in bounded for s in ("_bytes", "_items"))]
        groups = {p: [k for k in (p, f"{p}_bytes", f"{p}_items") if k in bounded] for p in parents}
        by_size = sorted(groups, key=lambda p: len(_DUMPS({k: bounded[k] for k in groups[p]})), reverse=True)
        kept = dict(bounded)
        omitted: list[str] = []

        def attempt(fields: dict[str, Any]) -> str:
            extra: dict[str, Any] = {"record_bytes": full}
            if omitted:
                extra["omitted"] = [_escaped_cut(name, 64) for name in omitted[:16]]
            return _DUMPS({**fields, **extra})

        for name in by_size:
            for k in groups[name]:
                del kept[k]
            omitted.append(name)
            body = attempt(kept)
            if len(body) <= limit:
                return body
        budget = self.max_field_bytes
        while budget > 16:
            budget //= 2
            body = attempt(_recut(kept, budget))
            if len(body) <= limit:
                return body
        # Unreachable with the shapes callers pass; the bound holds regardless.
        omitted[:] = ["fields"]
        return attempt({k: _escaped_cut(str(bounded.get(k, "")), 64) for k in ("protocol", "action", "decision")})


class _NullAudit(AuditLog):
    def __init__(self) -> None:
        pass

    def record(self, **kw: Any) -> None:
        pass

    def record_many(self, entries: Sequence[dict[str, Any]], keys: Sequence[Hashable] | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryAudit(AuditLog):
    """Keeps records in a list, for tests (as passed: neither bounded nor folded)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, **kw: Any) -> None:
        ident = kw.pop("identity", None)
        if ident is not None:
            kw["identity"] = {"kind": ident.kind, "sub": ident.sub, "username": ident.username,
                              "method": ident.method}
        self.records.append(kw)

    def record_many(self, entries: Sequence[dict[str, Any]], keys: Sequence[Hashable] | None = None) -> None:
        for kw in entries:
            self.record(**kw)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
