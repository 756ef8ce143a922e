"""Prometheus metrics and health.

Every module declares its own metrics on :data:`REGISTRY` (a private registry,
so tests can start several gateways in one process). Readiness is the
conjunction of the checks registered with :func:`add_readiness_check`; the
metrics listener serves ``/metrics``, ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry

REGISTRY = CollectorRegistry(auto_describe=True)

# name -> check returning (ready, detail)
_readiness: dict[str, Callable[[], tuple[bool, str]]] = {}


def add_readiness_check(name: str, check: Callable[[], tuple[bool, str]]) -> None:
    _readiness[name] = check


def remove_readiness_check(name: str) -> None:
    _readiness.pop(name, None)


def readiness() -> tuple[bool, dict[str, str]]:
    results = {}
    ready = True
    for name, check in list(_readiness.items()):
        try:
            ok, detail = check()
        except Exception as exc:  # a broken check reports, it does not crash /readyz
            ok, detail = False, f"check failed: {exc}"
        ready &= ok
        results[name] = ("ok" if ok else "not ready") + (f": {detail}" if detail else "")
    return ready, results
