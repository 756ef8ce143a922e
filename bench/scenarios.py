"""The benchmark scenarios (issue 8): each one measured directly and through keygate.

A scenario is a list of *cases* (e.g. QoS 0 / 1 / 2) and the *modes* it is
measured in:

* ``direct``: the client talks plain MQTT to Mosquitto (the broker with no
  security at all, what keygate is put in front of);
* ``direct-tls``: Mosquitto's own TLS listener, same certificate as keygate;
* ``relay``: a bare TLS-terminating byte relay in Python (:mod:`bench.relay`),
  the same process model as keygate without any of its work: the floor;
* ``keygate``: TLS into keygate (token validated, every publish, subscribe
  and delivery checked against the shipped policies and the ownership
  store), plain from keygate to the same Mosquitto;
* for HTTP: ``direct`` (the NGSI stand-in itself), ``nginx`` (TLS reverse
  proxy in front of it) and ``keygate`` (TLS, token, policy, ownership).

Every run yields a :class:`Row`; ``ok`` says the run completed and its counts
match, which is all that ``--quick`` checks.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import identity_suite
from bench.loadgen import Interactive, run_load
from bench.propagation import CASES as propagation_cases
from bench.propagation import propagation
from bench.rows import Row
from bench.stack import OWNER, STRANGER, Stack, proc_tree_cpu_seconds, proc_tree_rss_kib

# The attacks of the "under attack" scenario (ATTACKS below), as its cases name them.
ATTACK_LABEL = {"slowloris_tls": "slowloris, MQTT over TLS", "slowloris_ws": "slowloris, WebSocket upgrade",
                "connect_flood": "pre-auth CONNECT flood", "unsubscribe_flood": "UNSUBSCRIBE flood",
                "subscribe_flood": "long-filter SUBSCRIBE flood", "http_slow_headers": "HTTP slow headers"}


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; ``quick()`` for CI, ``full()`` for the published figures."""

    reps: int
    sipmba_messages: int
    ingest_publishers: int
    ingest_per_publisher: int
    fanout_subscribers: int
    fanout_messages: int
    latency_rates: tuple[int, ...]
    latency_seconds: float
    cpu_clients: int
    cpu_rate: int
    cpu_seconds: float
    storm_workers: int
    storm_seconds: float
    storm_tokens: int
    idle_counts: tuple[int, ...]
    http_connections: int
    http_seconds: float
    quick_mode: bool = False  # True only from quick(); a field named `quick` would take the classmethod as default
    attack_seconds: float = 3.0   # the legitimate client's measurement, per case
    attack_ramp_s: float = 1.0    # attackers open their connections before it starts
    attack_cases: tuple[str, ...] = ("quiet", "all at once")  # full(): each attack alone as well
    propagation_revocations: int = 100          # through gateway A, each waited out on B and C
    propagation_service_revocations: int = 500  # bench/bench_propagation.py, ownership services only

    @classmethod
    def full(cls, messages: int = 1_000_000, reps: int = 3) -> Sizes:
        return cls(reps=reps, sipmba_messages=messages, ingest_publishers=20, ingest_per_publisher=10_000,
                   fanout_subscribers=10, fanout_messages=20_000, latency_rates=(1000, 10000),
                   latency_seconds=4.0, cpu_clients=100, cpu_rate=5000, cpu_seconds=5.0, storm_workers=16,
                   storm_seconds=4.0, storm_tokens=6000, idle_counts=(1000, 8000), http_connections=32,
                   http_seconds=3.0, attack_cases=("quiet", *ATTACK_LABEL.values(), "all at once"))

    @classmethod
    def quick(cls, messages: int = 2000) -> Sizes:
        return cls(reps=1, sipmba_messages=messages, ingest_publishers=4, ingest_per_publisher=250,
                   fanout_subscribers=3, fanout_messages=300, latency_rates=(1000, 10000),
                   latency_seconds=0.3, cpu_clients=10, cpu_rate=2000, cpu_seconds=0.3, storm_workers=4,
                   storm_seconds=0.5, storm_tokens=400, idle_counts=(40, 100), http_connections=8,
                   http_seconds=1.0, quick_mode=True, attack_seconds=1.5, attack_ramp_s=1.0,
                   propagation_revocations=3, propagation_service_revocations=3)


def _cred(stack: Stack, client_id: str, user: str = OWNER) -> dict:
    return {"client_id": client_id, "username": "bench", "password": stack.token(user)}


def _error(res: dict) -> str:
    return res.get("error", "")


# --------------------------------------------------------------------------- the scenarios


@dataclass
class Scenario:
    name: str
    title: str
    modes: tuple[str, ...]
    cases: Callable[[Sizes], list[str]]
    run: Callable[[Stack, Sizes, str, str, int], Row | list[Row]]
    reps: Callable[[Sizes], int] = lambda s: s.reps
    before: Callable[[Stack], None] | None = None  # e.g. a fresh keygate process
    after: Callable[[Stack], None] | None = None   # once its last run is done, e.g. keygate as it was


def sipmba(stack: Stack, sz: Sizes, case: str, mode: str, rep: int) -> Row:
    qos = int(case[-1])
    target = stack.mqtt_target(mode).spec()
    topic = f"devices/{stack.device(0)}/telemetry"
    spec: dict[str, Any] = {
        "mode": "sipmba", "qos": qos, "messages": sz.sipmba_messages, "topic": topic, "target": target,
        "pub": stack.device_cred(0), "sub": _cred(stack, f"sip-sub-{rep}"),
        "window": 1000, "timeout": max(15, sz.sipmba_messages / 2000)}
    dropped_before = broker_dropped(stack)
    res = run_load("mqttload", spec, timeout=spec["timeout"] + 120)
    ok = bool(res.get("completed")) and res.get("lost") == 0 and res.get("out_of_order") == 0
    metrics = {k: res[k] for k in ("elapsed_s", "received", "in_order", "lost", "out_of_order") if k in res}
    # Where a loss happened: Mosquitto counts what it dropped itself (a subscriber's queue full).
    dropped_after = broker_dropped(stack)
    if dropped_before >= 0 and dropped_after >= 0:
        metrics["broker_dropped"] = dropped_after - dropped_before
    if "elapsed_s" in res:
        metrics["rate"] = res["in_order"] / res["elapsed_s"] if res["elapsed_s"] else 0.0
    return Row("sipmba", case, mode, rep, metrics, ok, _error(res))


def broker_dropped(stack: Stack) -> int:
    """Mosquitto's own count of PUBLISHes it dropped (``$SYS/broker/publish/messages/dropped``,
    refreshed every second: the stack sets ``sys_interval 1``)."""
    time.sleep(1.2)
    try:
        port = str(stack.started_broker.port)
        out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-C", "1", "-W", "5",
                              "-t", "$SYS/broker/publish/messages/dropped"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        return int(out.split()[-1]) if out else -1
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return -1


def ingest(stack: Stack, sz: Sizes, case: str, mode: str, rep: int) -> Row:
    qos = int(case[-1])
    pubs = [{**stack.device_cred(k), "topic": f"devices/{stack.device(k)}/telemetry"}
            for k in range(sz.ingest_publishers)]
    spec = {"mode": "ingest", "qos": qos, "messages_per_publisher": sz.ingest_per_publisher,
            "target": stack.mqtt_target(mode).spec(), "publishers": pubs,
            "counter_target": stack.mqtt_target("direct").spec(), "counter": {"client_id": f"ing-count-{rep}"},
            "counter_filter": "devices/+/telemetry", "window": 20000, "batch": 50, "timeout": 120}
    # CPU of the broker and of the process terminating TLS over the whole run (the publishers'
    # connects are a few hundredths of it): where the time of each message goes.
    pids = {"broker": stack.pid("broker")}
    if mode in ("keygate", "relay"):
        pids[mode] = stack.pid(mode)
    before = {k: proc_tree_cpu_seconds(p) for k, p in pids.items()}
    res = run_load("mqttload", spec, timeout=300)
    after = {k: proc_tree_cpu_seconds(p) for k, p in pids.items()}
    ok = bool(res.get("completed")) and res.get("received") == res.get("sent")
    metrics = {k: res[k] for k in ("rate", "elapsed_s", "sent", "received") if k in res}
    if res.get("sent"):
        metrics.update({f"{k}_us_per_msg": 1e6 * (after[k] - before[k]) / res["sent"] for k in pids})
        metrics["us_per_msg"] = metrics[f"{mode}_us_per_msg" if mode in pids else "broker_us_per_msg"]
    return Row("ingest", case, mode, rep, metrics, ok, _error(res))


def fanout(stack: Stack, sz: Sizes, case: str, mode: str, rep: int) -> Row:
    n = sz.fanout_subscribers
    subs = [{**_cred(stack, f"fan-{rep}-{k}"), "filter": "devices/+/telemetry", "expect": True} for k in range(n)]
    # Someone who may read none of the owner's devices, on the same wildcard:
    # through keygate every delivery to it must be dropped by the per-message check.
    subs.append({**_cred(stack, f"fan-{rep}-stranger", STRANGER), "filter": "devices/+/telemetry",
                 "expect": False})
    target = stack.mqtt_target(mode).spec()
    spec = {"mode": "fanout", "messages": sz.fanout_messages, "pub_target": target, "sub_target": target,
            "publisher": stack.device_cred(0), "subscribers": subs,
            "topics": [f"devices/{stack.device(0)}/telemetry"], "timeout": 120}
    res = run_load("mqttload", spec, timeout=300)
    ok = bool(res.get("completed")) and (mode != "keygate" or res.get("unexpected") == 0)
    metrics = {k: res[k] for k in ("rate", "elapsed_s", "deliveries", "expected_deliveries", "unexpected")
               if k in res}
    return Row("fanout", case, mode, rep, metrics, ok, _error(res))


def latency(stack: Stack, sz: Sizes, case: str, mode: str, rep: int) -> Row:
    rate = int(case.split()[0].replace(",", ""))
    topic = f"devices/{stack.device(1)}/telemetry"
    spec = {"mode": "latency", "rate": rate, "duration_s": sz.latency_seconds, "topic": topic,
            "target": stack.mqtt_target(mode).spec(), "pub": stack.device_cred(1),
            "sub": _cred(stack, f"lat-sub-{rep}"), "timeout": 10}
    res = run_load("mqttload", spec, timeout=sz.latency_seconds + 90)
    ok = bool(res.get("completed"))
    metrics = {k: res[k] for k in ("p50_us", "p99_us", "p999_us", "max_us", "achieved_rate", "received")
               if k in res}
    return Row("latency", case, mode, rep, metrics, ok, _error(res), {"quantiles_us": res.get("quantiles_us", [])})


def cpu(stack: Stack, sz: Sizes, case: str, mode: str, rep: int) -> Row:
    clients = [{**stack.device_cred(k), "topic": f"devices/{stack.device(k)}/telemetry"}
               for k in range(sz.cpu_clients)]
    total = int(sz.cpu_rate * sz.cpu_seconds)
    spec = {"mode": "cpu", "target": stack.mqtt_target(mode).spec(), "clients": clients, "rate": sz.cpu_rate,
            "messages": total}
    gen = Interactive("mqttload", spec)
    try:
        gen.read_line(120)  # READY: everyone connected
        pids = {"broker": stack.pid("broker")}
        if mode in ("keygate", "relay"):
            pids[mode] = stack.pid(mode)
        # The process tree: keygate serve --workers N does its work in the supervisor's children.
        before = {k: proc_tree_cpu_seconds(p) for k, p in pids.items()}
        gen.send()
        res = json.loads(gen.read_line(sz.cpu_seconds + 120))
        after = {k: proc_tree_cpu_seconds(p) for k, p in pids.items()}
        gen.finish(30)
    except Exception as exc:
        gen.kill()
        return Row("cpu", case, mode, rep, {}, False, str(exc))
    metrics = {f"{k}_us_per_msg": 1e6 * (after[k] - before[k]) / total for k in pids}
    # The process that pays for TLS: the broker itself when direct, keygate otherwise.
    metrics["us_per_msg"] = metrics[f"{mode}_us_per_msg" if mode in ("keygate", "relay") else "broker_us_per_msg"]
    metrics["achieved_rate"] = res["achieved_rate"]
    return Row("cpu", case, mode, rep, metrics, res.get("sent") == total)


def storm(stack: Stack, sz: Sizes, case: str, mode: str, rep: int) -> Row:
    tokens = [stack.token(OWNER) for _ in range(sz.storm_tokens)]
    spec = {"mode": "storm", "target": stack.mqtt_target(mode).spec(), "tokens": tokens,
            "workers": sz.storm_workers, "duration_s": sz.storm_seconds}
    res = run_load("mqttload", spec, timeout=sz.storm_seconds + 120)
    ok = bool(res.get("completed"))
    metrics = {k: res[k] for k in ("rate", "connects", "failed", "connect_p50_ms", "tokens_used") if k in res}
    if res.get("tokens_used", 0) > len(tokens):
        metrics["reused_tokens"] = res["tokens_used"] - len(tokens)
    return Row("storm", case, mode, rep, metrics, ok,
               _error(res) or (json.dumps(res.get("errors")) if res.get("errors") else ""))


def idle_memory(stack: Stack, sz: Sizes, case: str, mode: str, rep: int) -> Row:
    """Cumulative: open the smaller count, measure, open the rest up to the larger, measure.

    Memory is read as VmRSS of the process that holds the TLS connections
    (keygate, or Mosquitto on its TLS listener) minus its RSS before, after a
    warm-up of a few connections opened and closed (one-time allocations such
    as the TLS context and the token cache entry are not per connection).
    """
    holder = mode if mode in ("keygate", "relay") else "broker"
    target = stack.mqtt_target(mode).spec()
    token = stack.token(OWNER)
    warm = run_load("mqttload", {"mode": "storm", "target": target, "tokens": [token], "workers": 4,
                                 "duration_s": 0.3}, timeout=60)
    if not warm.get("connects"):
        return Row("memory", case, mode, rep, {}, False, "warm-up failed: " + json.dumps(warm)[:300])
    time.sleep(0.5)
    pid = stack.pid(holder)
    base = proc_tree_rss_kib(pid)
    gens: list[Interactive] = []
    metrics: dict[str, float] = {}
    ok = True
    detail = ""
    opened = 0
    try:
        for i, count in enumerate(sz.idle_counts):
            more = count - opened
            gen = Interactive("mqttload", {"mode": "idle", "target": target, "token": token, "count": more,
                                           "prefix": f"idle{rep}-{i}", "concurrency": 128})
            gens.append(gen)
            res = json.loads(gen.read_line(600))
            opened += res["open"]
            if res["open"] != more:
                ok = False
                detail = f"{more - res['open']} of {more} connections failed: {json.dumps(res['failures'])[:300]}"
            time.sleep(1.0)
            rss = proc_tree_rss_kib(pid)
            metrics[f"kb_per_conn_{count}"] = (rss - base) * 1.024 / max(1, opened)  # KiB -> kB
            metrics[f"rss_delta_mb_{count}"] = (rss - base) / 1024
            metrics[f"open_s_{count}"] = res["open_s"]
    except Exception as exc:
        ok = False
        detail = str(exc)
    finally:
        for gen in gens:
            try:
                gen.finish(60)
            except Exception:
                gen.kill()
    return Row("memory", case, mode, rep, metrics, ok, detail)


def _restart_keygate(stack: Stack) -> None:
    # A fresh process, so earlier scenarios' heap does not hide (or inflate) the per-connection cost.
    stack.start_keygate(http=bool(stack.keygate_http_port))


def http(stack: Stack, sz: Sizes, case: str, mode: str, rep: int) -> Row:
    device = stack.device(2 + rep % 8)
    if mode == "nginx" and not stack.nginx_port:
        return Row("http", case, mode, rep, {}, False, "nginx not installed")
    base = stack.http_base(mode)
    headers = {"Accept": "application/json"}
    if mode == "keygate":
        headers["Authorization"] = f"Bearer {stack.token(OWNER)}"
    if case == "GET":
        method, url, body = "GET", f"{base}/v2/entities/{device}", ""
    else:
        method, url = "PATCH", f"{base}/v2/entities/{device}/attrs"
        body = json.dumps({"temperature": {"type": "Number", "value": 21.5}})
        headers["Content-Type"] = "application/json"
    spec = {"url": url, "method": method, "headers": headers, "body": body, "connections": sz.http_connections,
            "duration_s": sz.http_seconds, "ca": stack.ca, "engine": stack_http_engine(stack)}
    # CPU per request of each process on the path (user + system from /proc/<pid>/stat, children
    # included: nginx's worker): unlike requests/s, not capped by whichever process saturates a core first.
    pids = {"upstream": stack.pid("standin")}
    if mode in ("nginx", "keygate", "relay"):
        pids["proxy"] = stack.pid("http-relay" if mode == "relay" else mode)
    before = {k: proc_tree_cpu_seconds(p) for k, p in pids.items()}
    res = run_load("httpload", spec, timeout=sz.http_seconds + 90)
    after = {k: proc_tree_cpu_seconds(p) for k, p in pids.items()}
    ok = bool(res.get("completed")) and res.get("non_2xx") == 0 and res.get("errors") == 0
    metrics = {k: res[k] for k in ("rate", "requests", "non_2xx", "errors", "p50_ms", "p99_ms") if k in res}
    if res.get("requests"):
        # The load generator's own start and end fall inside the window: over a run of seconds, noise.
        for k in pids:
            metrics[f"{k}_us_per_req"] = 1e6 * (after[k] - before[k]) / res["requests"]
    return Row("http", case, mode, rep, metrics, ok, _error(res) or res.get("raw", ""),
               {"engine": res.get("engine", "")})


def stack_http_engine(stack: Stack) -> str:
    return getattr(stack, "http_engine", "auto")


def identity(stack: Stack, sz: Sizes, case: str, mode: str, rep: int) -> list[Row]:
    return identity_suite.run(stack, sz, case, rep)


def _identity_cases(sz: Sizes) -> list[str]:
    return identity_suite.CASES


# --------------------------------------------------------------------------- under attack (issue 14)

ATTACKERS = 10  # signed-in attacker identities (their own tokens), apart from the owner and the stranger

# Each attack: how many connections it keeps (or how fast it opens them), from which source addresses
# (attackload.addresses: first_address .. first_address + addresses - 1, mapped into 127.0.0.2..254).
# slowloris_ws comes from one address, so its 100 connections meet the cap of 64 unauthenticated ones
# per address; the CONNECT flood from 5, so each address goes over 20 new connections per second;
# the rest are spread thin, as a botnet's would be, and must be borne within the memory bound.
ATTACKS: dict[str, dict] = {
    "slowloris_tls": {"connections": 300, "addresses": 10, "first_address": 0, "declared": 30000,
                      "initial": 28000, "trickle_s": 1.0},
    "slowloris_ws": {"connections": 100, "addresses": 1, "first_address": 10, "trickle_s": 1.0},
    "connect_flood": {"rate": 300, "in_flight": 100, "addresses": 3, "first_address": 20},
    "unsubscribe_flood": {"connections": 50, "addresses": 10, "first_address": 30, "filters": 16,
                          "filter_bytes": 1000, "interval_s": 0.05},
    "subscribe_flood": {"connections": 50, "addresses": 10, "first_address": 40, "filters": 8,
                        "filter_bytes": 1000, "oversized_bytes": 60000, "interval_s": 0.1},
    "http_slow_headers": {"connections": 100, "addresses": 5, "first_address": 50, "trickle_s": 1.0},
}

# What the limits promise for memory: every connection keygate holds costs at most the
# pre-authentication buffer (mqtt.limits.connect_max_bytes, as configured in stack.HARDENED_MQTT)
# plus PER_CONNECTION_KIB for its TLS state, socket buffers and objects; besides those, the shared
# decision cache may fill up to policies.cache_max_bytes (32 MiB by default) and FIXED_MIB is left
# for the allocator and the rest.
CONNECT_MAX_KIB = 32
PER_CONNECTION_KIB = 64
CACHE_MAX_MIB = 32
FIXED_MIB = 16
LEGIT_RATE = 150  # messages/s of the legitimate device: within the 200/s per identity of HARDENED_MQTT


def attack_spec(stack: Stack, sz: Sizes, which: list[str]) -> dict:
    tokens = [stack.token(f"mallory-{k}") for k in range(ATTACKERS)]
    half = ATTACKERS // 2
    attacks = {}
    for name in which:
        cfg = dict(ATTACKS[name])
        if name == "unsubscribe_flood":
            cfg["tokens"] = tokens[:half]
        elif name == "subscribe_flood":
            cfg["tokens"] = tokens[half:]
        attacks[name] = cfg
    return {"host": "127.0.0.1", "ca": stack.ca, "mqtt_port": stack.keygate_mqtt_port,
            "ws_port": stack.keygate_ws_port, "http_port": stack.keygate_http_port, "tokens": tokens,
            "victim_devices": [stack.device(k) for k in range(10)], "attacks": attacks,
            "ramp_s": sz.attack_ramp_s, "max_seconds": sz.attack_ramp_s + sz.attack_seconds + 30}


def _attacks_of(case: str) -> list[str]:
    if case == "quiet":
        return []
    if case == "all at once":
        return list(ATTACKS)
    return [a for a, label in ATTACK_LABEL.items() if label == case]


class _RssSampler:
    """keygate's VmRSS every 0.1 s in a thread, for the peak."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak = pid, proc_tree_rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, proc_tree_rss_kib(self.pid))
            except OSError:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def under_attack(stack: Stack, sz: Sizes, case: str, mode: str, rep: int) -> Row:
    """The legitimate client's connect time and message latency, with the attackers of ``case`` running
    against the same keygate, a fresh process with the hardened settings (stack.HARDENED_MQTT)."""
    stack.start_keygate(http=bool(stack.keygate_http_port), hardened=True)
    target = stack.mqtt_target(mode).spec()
    owner = stack.token(OWNER)
    # Warm-up: the JWKS fetched, the owner's token cached, one TLS handshake done.
    warm = run_load("mqttload", {"mode": "storm", "target": target, "tokens": [owner], "workers": 2,
                                 "duration_s": 0.2}, timeout=30)
    if not warm.get("connects"):
        return Row("attack", case, mode, rep, {}, False, "warm-up failed: " + json.dumps(warm)[:300])
    time.sleep(0.3)
    pid = stack.pid("keygate")
    before = proc_tree_rss_kib(pid)
    audit = stack.workdir / "keygate" / "audit.log"
    audit_before = audit.stat().st_size if audit.exists() else 0
    which = _attacks_of(case)
    gen = Interactive("attackload", attack_spec(stack, sz, which)) if which else None
    sampler = None
    try:
        if gen is not None:
            gen.read_line(sz.attack_ramp_s + 30)
        sampler = _RssSampler(pid)
        cpu_before, wall_before = proc_tree_cpu_seconds(pid), time.monotonic()
        topic = f"devices/{stack.device(1)}/telemetry"
        spec = {"mode": "legit", "rate": LEGIT_RATE, "duration_s": sz.attack_seconds, "topic": topic, "target": target,
                "pub": stack.device_cred(1), "sub": _cred(stack, f"legit-sub-{rep}"),
                "probe": {"username": "bench", "password": owner}, "probe_client_id": f"legit-probe-{rep}",
                "probe_interval_s": 0.25, "timeout": 5,
                "http": {"host": "127.0.0.1", "port": stack.keygate_http_port, "ca": stack.ca, "token": owner,
                         "path": f"/v2/entities/{stack.device(2)}"} if stack.keygate_http_port else None}
        res = run_load("mqttload", spec, timeout=sz.attack_seconds + 60)
        after = proc_tree_rss_kib(pid)
        keygate_cpu = (proc_tree_cpu_seconds(pid) - cpu_before) / (time.monotonic() - wall_before)
        audit_after = audit.stat().st_size if audit.exists() else 0
        attackers: dict[str, Any] = gen.finish(40) if gen is not None else {"completed": True, "attacks": {}}
    except Exception as exc:
        if gen is not None:
            gen.kill()
        return Row("attack", case, mode, rep, {}, False, f"{type(exc).__name__}: {exc}")
    finally:
        peak = sampler.stop() if sampler is not None else 0
    held = sum(a.get("peak_open", 0) for a in attackers.get("attacks", {}).values())
    metrics = {"rss_before_mb": before / 1024, "rss_after_mb": after / 1024, "rss_peak_mb": peak / 1024,
               "rss_growth_mb": (max(peak, after) - before) / 1024, "attack_connections_peak": held,
               "rss_bound_mb": held * (CONNECT_MAX_KIB + PER_CONNECTION_KIB) / 1024 + CACHE_MAX_MIB + FIXED_MIB,
               "keygate_cpu_pct": 100 * keygate_cpu, "audit_mb": (audit_after - audit_before) / 1e6,
               "measured_s": sz.attack_seconds}
    if "cpu_s" in attackers and attackers.get("elapsed_s"):
        metrics["attackers_cpu_pct"] = 100 * attackers["cpu_s"] / attackers["elapsed_s"]
    for k in ("p50_us", "p99_us", "max_us", "received", "sent"):
        if k in res:
            metrics[k] = res[k]
    for what in ("connect", "http"):
        got = res.get(what) or {}
        for k in ("median_ms", "max_ms", "failed", "n"):
            if k in got:
                metrics[f"{what}_{k}"] = got[k]
    ok = bool(res.get("completed")) and bool(attackers.get("completed"))
    detail = _error(res) or attackers.get("error", "") or "; ".join(attackers.get("errors", []))
    return Row("attack", case, mode, rep, metrics, ok, detail, {"attacks": attackers.get("attacks", {})})


def _restore_keygate(stack: Stack) -> None:
    stack.start_keygate(http=bool(stack.keygate_http_port))


SCENARIOS: list[Scenario] = [
    Scenario("sipmba", "SIP-MBA table: one publisher, one subscriber, \"hello i\" in order",
             ("direct", "keygate"), lambda s: ["QoS 0", "QoS 1", "QoS 2"], sipmba, reps=lambda s: 1),
    Scenario("ingest", "Bulk ingest, many publishers", ("direct", "direct-tls", "relay", "keygate"),
             lambda s: ["QoS 0", "QoS 1"], ingest),
    Scenario("fanout", "Fan-out: one publisher, wildcard subscribers (per-message delivery checks)",
             ("direct", "keygate"), lambda s: [f"{s.fanout_subscribers} subscribers"], fanout),
    Scenario("latency", "End-to-end latency at a fixed rate", ("direct", "direct-tls", "relay", "keygate"),
             lambda s: [f"{r:,} msg/s" for r in s.latency_rates], latency),
    Scenario("cpu", "CPU per message, many clients, one message per write",
             ("direct", "direct-tls", "relay", "keygate"),
             lambda s: [f"{s.cpu_clients} clients, {s.cpu_rate:,} msg/s"], cpu),
    Scenario("storm", "Reconnect storm: TLS connects per second with token validation",
             ("direct-tls", "keygate"), lambda s: [f"{s.storm_workers} concurrent"], storm),
    Scenario("memory", "Memory per idle TLS connection", ("direct-tls", "relay", "keygate"),
             lambda s: [" / ".join(f"{c:,}" for c in s.idle_counts) + " connections"], idle_memory,
             reps=lambda s: 1, before=_restart_keygate),
    Scenario("http", "HTTP: authorized NGSI requests", ("direct", "nginx", "relay", "keygate"),
             lambda s: ["GET", "PATCH"], http),
    Scenario("identity", "Identity micro-benchmarks (in process)", ("keygate",), _identity_cases, identity,
             reps=lambda s: 1),
    Scenario("attack", "Under attack: a legitimate client while attackers run against the same keygate",
             ("keygate",), lambda s: list(s.attack_cases), under_attack, reps=lambda s: 1,
             after=_restore_keygate),
    Scenario("propagation", "Propagation: a revocation through one of 3 gateways, deliveries on the others",
             ("keygate",), lambda s: list(propagation_cases), propagation, reps=lambda s: 1),
]


def plan(sizes: Sizes, only: set[str] | None, modes: set[str] | None) -> list[tuple[Scenario, str, str, int]]:
    """Every run in order: per scenario, repetitions of every case, modes alternating who goes first."""
    steps = []
    for sc in SCENARIOS:
        if only and sc.name not in only:
            continue
        for rep in range(sc.reps(sizes)):
            for case in sc.cases(sizes):
                order = list(sc.modes) if rep % 2 == 0 else list(reversed(sc.modes))
                for mode in order:
                    if modes and mode not in modes and sc.name != "identity":
                        continue
                    steps.append((sc, case, mode, rep))
    return steps
