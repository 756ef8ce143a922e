"""Prometheus metrics and health.

Every module declares its own metrics on :data:`REGISTRY` (a private registry,
so tests can start several gateways in one process). Readiness is the
conjunction of the checks registered with :func:`add_readiness_check`; the
metrics listener serves ``/metrics``, ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)


class TallyChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Tally:
    """A labelled counter for the per-message path, exposed like a prometheus_client
    ``Counter`` (``<name>_total``) but read only when scraped.

    prometheus_client's counters take a lock on every ``inc``, a good part of the
    gateway's cost per small chunk. Tallies are plain integers: they are only ever
    incremented from the event loop's thread, and a scrape reads whole values.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] | list[str],
                 registry: CollectorRegistry = REGISTRY):
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._children: dict[tuple[str, ...], TallyChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> TallyChild:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        return self._children.setdefault(tuple(values), TallyChild())

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family


# name -> check returning (ready, detail)
_readiness: dict[str, Callable[[], tuple[bool, str]]] = {}


def add_readiness_check(name: str, check: Callable[[], tuple[bool, str]]) -> None:
    _readiness[name] = check


def remove_readiness_check(name: str) -> None:
    _readiness.pop(name, None)


# name -> what /readyz reports beside the checks (a JSON object), e.g. the policy set's digest
_readiness_info: dict[str, Callable[[], dict[str, object]]] = {}


def add_readiness_info(name: str, info: Callable[[], dict[str, object]]) -> None:
    _readiness_info[name] = info


def readiness_info() -> dict[str, dict[str, object]]:
    return {name: info() for name, info in list(_readiness_info.items())}


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
