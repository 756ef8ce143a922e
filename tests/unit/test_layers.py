"""The layering of keygate, read from the imports of every module (ast, nothing imported).

A module may import modules of its own layer and of the layers below it, never of a layer
above: the protocol code (MQTT, HTTP) is built on identity, policy and ownership, so
those must not know it, or a change to a listener would ripple into the decisions. Every
import counts, also one inside a function or under ``TYPE_CHECKING``: a type is a
dependency too. A new module that fits no layer fails the test until it is placed here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("proxy", "ownership")

#: Lowest first. A module belongs to the layer with the longest prefix that names it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # What every part reads: errors, configuration, metrics, facts, limits, TLS contexts, and the
    # notification-target rules (pure; the configuration checks its allow-list entries with them).
    ("base", ("proxy", "proxy.errors", "proxy.config", "proxy.ssrf", "proxy.tls", "proxy.metrics",
              "proxy.facts", "proxy.jsonlimits", "proxy.sharing")),
    ("identity", ("proxy.identity",)),
    ("policy", ("proxy.policy",)),
    ("audit", ("proxy.audit",)),
    ("ownership", ("ownership",)),
    # The bundle of running parts every listener is handed.
    ("services", ("proxy.services",)),
    # The fronts: each speaks one protocol, on top of the services.
    ("protocols", ("proxy.mqtt", "proxy.http", "ownership.api", "proxy.metrics_server")),
    # The web portal: pages for people over the ownership API and the MQTT listener.
    ("portal", ("proxy.portal",)),
    # What starts and wires everything: the command line and its commands that build a stack.
    ("entry", ("proxy.app", "proxy.check", "proxy.cli", "proxy.__main__", "proxy.dev", "proxy.dev_issuer",
               "proxy.dev_login", "proxy.certs", "proxy.keycloak_bootstrap", "proxy.workers")),
)

#: Fronts of one layer that must not lean on each other (each could be deployed alone).
SIBLINGS = ("proxy.mqtt", "proxy.http", "ownership.api")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules(packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {module_name(p): p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports (absolute names; ``from X import y`` counts as X.y when that is a module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in known)
    return found


def prefix_of(name: str, prefixes: tuple[str, ...]) -> str | None:
    matching = [p for p in prefixes if name == p or name.startswith(p + ".")]
    return max(matching, key=len) if matching else None


def layer_of(name: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        prefix = prefix_of(name, prefixes)
        if prefix is not None and (best is None or len(prefix) > best[0]):
            best = (len(prefix), index)
    return None if best is None else best[1]


def edges(packages: tuple[str, ...] = PACKAGES) -> list[tuple[str, str]]:
    modules = all_modules(packages)
    known = set(modules)
    return sorted((name, target) for name, path in modules.items() for target in imports_of(name, path, known)
                  if target.split(".")[0] in (*PACKAGES, "bench", "tests"))


def test_the_scan_sees_the_tree():
    # Guards against a test that passes because it read nothing.
    found = edges()
    assert len(all_modules()) > 50
    assert ("proxy.mqtt.server", "proxy.services") in found
    assert ("proxy.services", "ownership.service") in found  # under TYPE_CHECKING
    assert ("proxy.app", "proxy.http.gateway") in found  # inside a function


def test_every_module_has_a_layer():
    unplaced = [name for name in all_modules() if layer_of(name) is None]
    assert not unplaced, f"place these modules in a layer of LAYERS: {unplaced}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for name, target in edges():
        if target.split(".")[0] in ("bench", "tests"):
            upward.append(f"{name} imports {target} (bench and tests sit above everything)")
            continue
        mine, theirs = layer_of(name), layer_of(target)
        assert mine is not None and theirs is not None, (name, target)
        if theirs > mine:
            upward.append(f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_fronts_do_not_import_each_other():
    crossing = [f"{name} imports {target}" for name, target in edges()
                if (a := prefix_of(name, SIBLINGS)) and (b := prefix_of(target, SIBLINGS)) and a != b]
    assert not crossing, "\n".join(crossing)


def test_the_layer_order_says_what_the_design_says():
    # identity and policy never import mqtt or http; ownership never imports proxy.mqtt or proxy.http.
    for low in ("proxy.identity.model", "proxy.policy.engine", "ownership.service", "ownership.store"):
        for high in ("proxy.mqtt.session", "proxy.http.gateway"):
            mine, theirs = layer_of(low), layer_of(high)
            assert mine is not None and theirs is not None and mine < theirs, (low, high)


def test_the_benchmark_modules_import_no_cycle():
    # bench.scenarios and bench.identity_suite once imported each other (one of them inside a function).
    graph: dict[str, set[str]] = {}
    for name, target in edges(("bench",)):
        if target.startswith("bench.") and target != name:
            graph.setdefault(name, set()).add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, goal, seen):
                    return True
        return False

    assert len(graph) > 5
    assert sorted(m for m in graph if reaches(m, m, set())) == []
