"""The audit log: one JSON line per decision.

Records carry who (identity), what (protocol, action, resource), the decision
and the rule or reason that made it. Secrets (tokens, device keys, passwords)
are never passed in; callers hand over identities and resource names only.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from proxy.identity.model import Identity


class AuditLog:
    def __init__(self, stream: TextIO, *, close: bool = False):
        self._stream = stream
        self._close = close
        self._lock = threading.Lock()  # the store's writer thread audits too

    @classmethod
    def open(cls, path: str) -> "AuditLog":
        """``-`` for stdout, otherwise a file opened for appending (line buffered)."""
        if path == "-":
            return cls(sys.stdout)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        return cls(open(p, "a", buffering=1, encoding="utf-8"), close=True)

    @classmethod
    def null(cls) -> "AuditLog":
        return _NullAudit()

    def record(self, *, protocol: str, action: str, decision: str, resource: str = "",
               identity: Identity | None = None, rule: str | None = None, reason: str | None = None,
               **extra: Any) -> None:
        entry: dict[str, Any] = {
            "time": round(time.time(), 6),
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
        line = json.dumps(entry, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            self._stream.write(line)

    def close(self) -> None:
        if self._close:
            self._stream.close()


class _NullAudit(AuditLog):
    def __init__(self) -> None:
        pass

    def record(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryAudit(AuditLog):
    """Keeps records in a list, for tests."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, **kw: Any) -> None:
        ident = kw.pop("identity", None)
        if ident is not None:
            kw["identity"] = {"kind": ident.kind, "sub": ident.sub, "username": ident.username,
                              "method": ident.method}
        self.records.append(kw)

    def close(self) -> None:
        pass
