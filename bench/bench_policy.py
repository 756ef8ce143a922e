"""Policy decision cost for 10, 1,000 and 10,000 rules.

    .venv/bin/python -m bench.bench_policy [--quick]

Each rule set has the shipped policies plus N generated rules in three
shapes, a third each: per-user rules (``user:uK`` on ``tenants/tK/#`` and
``/tenants/tK/**``), rules for everyone on literal topics
(``anyone`` on ``sensors/sK/+/data``), and per-role relation rules
(``role:rK`` + ``owner`` on ``fleet/fK/{device}/#``). Every question is asked
of the compiled engine with its decision cache off (every call walks the
index); a second table shows cache hits. For comparison, the same publish is also answered by
a linear scan (every rule's patterns matched one by one, as the explain
tool does), which is what the index saves. Times are the median of 5 runs,
in microseconds per decision, on one core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from proxy.facts import Delegation, DeviceFacts, Principal, StaticFacts
from proxy.identity.model import Identity
from proxy.policy.engine import CompiledPolicies
from proxy.policy.language import load_dir, load_text
from proxy.policy.patterns import identity_values, match

ROOT = Path(__file__).resolve().parents[1]


def generated(n: int) -> str:
    out = ["version: 1", "rules:"]
    for k in range(n):
        shape = k % 3
        if shape == 0:
            out.append(f"  - id: user-{k}\n    subjects: ['user:u{k}']\n"
                       f"    mqtt: {{topics: ['tenants/t{k}/#'], actions: [publish, subscribe]}}\n"
                       f"    http: {{paths: ['/tenants/t{k}/**'], methods: ['*']}}")
        elif shape == 1:
            out.append(f"  - id: sensor-{k}\n    subjects: [anyone]\n"
                       f"    mqtt: {{topics: ['sensors/s{k}/+/data'], actions: [subscribe]}}")
        else:
            out.append(f"  - id: fleet-{k}\n    subjects: ['role:r{k}', owner]\n"
                       f"    mqtt: {{topics: ['fleet/f{k}/{{device}}/#'], actions: [publish, subscribe]}}")
    return "\n".join(out) + "\n"


def build(n: int, cache_size: int = 0) -> CompiledPolicies:
    shipped = load_dir(ROOT / "policies")
    extra = load_text(generated(n), "generated.yaml")
    for i, r in enumerate(extra.rules):
        object.__setattr__(r, "order", len(shipped.rules) + i)
    shipped.rules.extend(extra.rules)
    facts = StaticFacts([DeviceFacts("d1", "sub-alice", "alice"),
                         DeviceFacts("d2", "sub-bob", "bob", delegations=(
                             Delegation("g", "d2", Principal.user("sub-alice", "alice"), "read"),))]
                        + [DeviceFacts(f"x{k}", f"sub-o{k}", f"o{k}") for k in range(1000)])
    return CompiledPolicies(shipped, facts, cache_size=cache_size)


ALICE = Identity(kind="user", sub="sub-alice", username="alice", method="token",
                 roles=frozenset({"offline_access", "uma_authorization", "default-roles-iot"}))
DEVICE = Identity(kind="device", sub="device:d1", username="d1", method="device_key", device_id="d1",
                  owner_sub="sub-alice")
U3 = Identity(kind="user", sub="sub-u3", username="u3", method="token")


def cases(engine: CompiledPolicies) -> dict[str, Callable[[], object]]:
    return {
        "publish (device telemetry)": lambda: engine.may_publish(DEVICE, "devices/d1/telemetry", qos=1),
        "publish (per-user rule)": lambda: engine.may_publish(U3, "tenants/t3/a/b"),
        "publish (denied)": lambda: engine.may_publish(ALICE, "devices/d9/cmd/x"),
        "receive (owner)": lambda: engine.may_receive(ALICE, "devices/d1/telemetry"),
        "receive (delegate)": lambda: engine.may_receive(ALICE, "devices/d2/attrs/t"),
        "subscribe devices/d1/# (owner)": lambda: engine.may_subscribe(ALICE, "devices/d1/attrs/#"),
        "subscribe devices/+/telemetry": lambda: engine.may_subscribe(ALICE, "devices/+/telemetry"),
        "subscribe tenants/t3/# (user)": lambda: engine.may_subscribe(U3, "tenants/t3/#"),
        "subscribe sensors/+/x/nothing (worst)": lambda: engine.may_subscribe(ALICE, "sensors/+/x/nothing"),
        "http GET entity (owner)": lambda: engine.may_http(ALICE, "GET", "/v2/entities/d1/attrs"),
        "http PATCH ../ attack": lambda: engine.may_http(ALICE, "PATCH", "/v2/entities/d1/../d2"),
        "http GET per-user path": lambda: engine.may_http(U3, "GET", "/tenants/t3/a"),
    }


def linear_publish(engine: CompiledPolicies):
    rules = engine.source.rules
    vals = identity_values(DEVICE.sub, DEVICE.username, "")
    levels = ["devices", "d1", "telemetry"]

    def scan():
        hits = []
        for r in rules:
            if r.mqtt and "publish" in r.mqtt.actions:
                for p in r.mqtt.topics:
                    ok, dev = match(p, levels, vals, dollar_rule=True)
                    if ok:
                        hits.append((r, dev))
        return hits

    return scan


def per_call_us(fn, budget: float) -> float:
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt > budget / 5:
            break
        n *= 2
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing runs")
    args = ap.parse_args(argv)
    budget = 0.05 if args.quick else 0.25
    sizes = [10, 1000, 10000]
    engines = {}
    for n in sizes:
        t0 = time.perf_counter()
        engines[n] = build(n)
        print(f"compiled {len(engines[n].source.rules):>6} rules in {(time.perf_counter() - t0) * 1e3:8.1f} ms",
              file=sys.stderr)
    names = list(cases(engines[10]))
    header = f"{'decision (µs per call)':40}" + "".join(f"{f'{n:,} rules':>14}" for n in sizes)
    print(header)
    print("-" * len(header))
    for name in names:
        row = [per_call_us(cases(engines[n])[name], budget) for n in sizes]
        print(f"{name:40}" + "".join(f"{v:14.2f}" for v in row))
    row = [per_call_us(linear_publish(engines[n]), budget) for n in sizes]
    print(f"{'(linear scan, same publish, for contrast)':40}" + "".join(f"{v:14.2f}" for v in row))
    print()
    print("with the per-identity decision cache (repeat questions, the steady state of a connection):")
    cached = {n: CompiledPolicies(engines[n].source, engines[n].facts) for n in sizes}
    for name in ("publish (device telemetry)", "receive (owner)", "subscribe devices/+/telemetry",
                 "http GET entity (owner)"):
        row = [per_call_us(cases(cached[n])[name], budget) for n in sizes]
        print(f"{name:40}" + "".join(f"{v:14.2f}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
