"""``docs/benchmarks.md`` and its plots, from the rows of one run.

Every figure is the median over the repetitions with the min–max range next
to it; ratios are gateway / direct computed on the medians. The targets
table of issue 8 is evaluated from the same numbers and says plainly which
are met.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import re
import shutil
import ssl
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import report_propagation
from bench.rows import Row
from bench.scenarios import LEGIT_RATE, SCENARIOS, Sizes

NAN = float("nan")

# What each scenario's table shows: (metric, label, format, higher is better).
COLUMNS: dict[str, list[tuple[str, str, str, bool]]] = {
    "sipmba": [("elapsed_s", "time (s)", "{:.1f}", False), ("rate", "messages/s", "{:,.0f}", True),
               ("in_order", "received in order", "{:,.0f}", True), ("lost", "lost", "{:,.0f}", False),
               ("broker_dropped", "dropped by Mosquitto ($SYS)", "{:,.0f}", False)],
    "ingest": [("rate", "messages/s", "{:,.0f}", True),
               ("us_per_msg", "CPU µs per message (process terminating TLS)", "{:.2f}", False),
               ("broker_us_per_msg", "Mosquitto CPU µs per message", "{:.2f}", False)],
    "fanout": [("rate", "deliveries/s", "{:,.0f}", True), ("unexpected", "deliveries to the stranger", "{:,.0f}",
                                                           False)],
    "latency": [("p50_us", "p50 (µs)", "{:,.0f}", False), ("p99_us", "p99 (µs)", "{:,.0f}", False),
                ("p999_us", "p99.9 (µs)", "{:,.0f}", False)],
    "cpu": [("us_per_msg", "CPU µs per message (process terminating TLS)", "{:.1f}", False),
            ("broker_us_per_msg", "Mosquitto CPU µs per message", "{:.1f}", False)],
    "storm": [("rate", "connects/s", "{:,.0f}", True), ("connect_p50_ms", "connect p50 (ms)", "{:.1f}", False)],
    "memory": [],  # filled per count below
    "http": [("rate", "requests/s", "{:,.0f}", True), ("p50_ms", "p50 (ms)", "{:.2f}", False),
             ("proxy_us_per_req", "CPU µs per request, proxy process", "{:,.0f}", False),
             ("upstream_us_per_req", "CPU µs per request, NGSI stand-in", "{:,.0f}", False)],
    "identity": [("us_per_op", "µs per operation", "{:.2f}", False), ("ops_per_s", "operations/s", "{:,.0f}", True)],
    "attack": [],  # attack_tables
    "propagation": [],  # bench/report_propagation.py
}

MODE_LABEL = {"direct": "direct", "direct-tls": "direct, TLS", "relay": "bare TLS relay", "keygate": "keygate",
              "nginx": "nginx"}


def values(rows: list[Row], scenario: str, case: str, mode: str, metric: str) -> list[float]:
    out = []
    for r in rows:
        if r.scenario == scenario and r.case == case and r.mode == mode and metric in r.metrics:
            v = r.metrics[metric]
            if isinstance(v, (int, float)) and v == v:
                out.append(float(v))
    return out


def median(rows: list[Row], scenario: str, case: str, mode: str, metric: str) -> float:
    v = values(rows, scenario, case, mode, metric)
    return statistics.median(v) if v else NAN


def cell(rows: list[Row], scenario: str, case: str, mode: str, metric: str, fmt: str) -> str:
    v = values(rows, scenario, case, mode, metric)
    if not v:
        return "–"
    text = fmt.format(statistics.median(v))
    if len(v) > 1 and min(v) != max(v):
        text += f" ({fmt.format(min(v))}–{fmt.format(max(v))})"
    return text


def ratio(a: float, b: float) -> str:
    if a != a or b != b or not b:
        return "–"
    return f"{a / b:.2f}x"


# --------------------------------------------------------------------------- machine


def _cmd(args: list[str]) -> str:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=10)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> list[tuple[str, str]]:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            found = re.search(r"MemTotal:\s+(\d+)", f.read())
        if found:
            mem = f"{int(found.group(1)) / 1024 / 1024:.0f} GiB"
    except (OSError, AttributeError):
        pass
    mosq = _cmd(["mosquitto", "-h"]).splitlines()
    nginx = _cmd(["nginx", "-v"])
    wrk = _cmd(["wrk", "-v"]).splitlines() if shutil.which("wrk") else []
    commit = _cmd(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "--short", "HEAD"])
    try:
        import uvloop
        loop = f"uvloop {uvloop.__version__}"  # type: ignore[attr-defined]  # set by uvloop, not re-exported
    except ImportError:
        loop = "asyncio"
    return [
        ("CPU", f"{os.cpu_count()} cores, {model}"), ("memory", mem),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()} ({loop})"),
        ("OpenSSL", ssl.OPENSSL_VERSION), ("Mosquitto", mosq[0] if mosq else "?"),
        ("nginx", nginx.replace("nginx version: ", "") or "not installed"),
        ("HTTP load generator", wrk[0] if wrk else "built-in asyncio client (wrk not installed)"),
        ("keygate commit", commit or "?"),
    ]


# --------------------------------------------------------------------------- targets


def targets(rows: list[Row]) -> list[tuple[str, str, str, str]]:
    """(scenario, target, measured, verdict) for the six targets of issue 8."""
    out = []
    # 1. 1M messages
    parts, met = [], True
    for q in ("QoS 0", "QoS 1", "QoS 2"):
        kg = [r for r in rows if r.scenario == "sipmba" and r.case == q and r.mode == "keygate"]
        d = median(rows, "sipmba", q, "direct", "elapsed_s")
        k = median(rows, "sipmba", q, "keygate", "elapsed_s")
        lost = median(rows, "sipmba", q, "keygate", "lost")
        complete = bool(kg) and all(r.ok for r in kg)
        ok = complete and lost == 0 and k == k and d == d and k <= 1.25 * d
        met &= ok
        parts.append(f"{q}: {'complete' if complete else 'NOT complete'}, lost {lost:,.0f}, "
                     f"{k:.1f} s vs {d:.1f} s = {ratio(k, d)}" if k == k else f"{q}: not measured")
    n = int(max(values(rows, "sipmba", "QoS 0", "direct", "received") or [0]))
    out.append((f"{n:,} messages, QoS 0 / 1 / 2", "all complete, zero loss, time ≤ 1.25x direct",
                "; ".join(parts), _verdict(met, rows, "sipmba")))
    # 2. bulk ingest
    d, k = median(rows, "ingest", "QoS 0", "direct", "rate"), median(rows, "ingest", "QoS 0", "keygate", "rate")
    out.append(("bulk QoS 0 ingest", "≥ 90% of direct",
                f"{k:,.0f} vs {d:,.0f} msg/s = {100 * k / d:.0f}%" if d == d and k == k and d else "not measured",
                _verdict(k == k and d == d and k >= 0.9 * d, rows, "ingest")))
    # 3. latency
    case = next((r.case for r in rows if r.scenario == "latency" and r.case.startswith("1,000 ")), "1,000 msg/s")
    d, k = median(rows, "latency", case, "direct", "p50_us"), median(rows, "latency", case, "keygate", "p50_us")
    added = k - d
    out.append(("added latency p50 at 1k msg/s", "< 0.2 ms",
                f"{added / 1000:.3f} ms ({k:,.0f} µs vs {d:,.0f} µs)" if added == added else "not measured",
                _verdict(added == added and added < 200, rows, "latency")))
    # 4. CPU
    case = next((r.case for r in rows if r.scenario == "cpu"), "")
    d, k = median(rows, "cpu", case, "direct-tls", "us_per_msg"), median(rows, "cpu", case, "keygate", "us_per_msg")
    out.append(("gateway CPU per message, TLS, one message per write",
                "≤ 2x the broker's own with TLS on the broker",
                f"{k:.1f} µs vs {d:.1f} µs = {ratio(k, d)}" if d == d and k == k else "not measured",
                _verdict(d == d and k == k and k <= 2 * d, rows, "cpu")))
    # 5. memory
    mem = [(m, median(rows, "memory", r.case, "keygate", m)) for r in rows if r.scenario == "memory"
           for m in r.metrics if m.startswith("kb_per_conn_")]
    mem = list(dict(mem).items())
    ok = bool(mem) and all(v == v and v <= 30 for _, v in mem)
    out.append(("memory per idle TLS connection", "≤ 30 KB",
                ", ".join(f"{v:.1f} KB at {int(m.rsplit('_', 1)[1]):,}" for m, v in mem) or "not measured",
                _verdict(ok, rows, "memory")))
    # 6. HTTP (issue 18: PATCH too, and CPU per request of the proxy process beside requests/s)
    for method in ("GET", "PATCH"):
        ng, k = median(rows, "http", method, "nginx", "rate"), median(rows, "http", method, "keygate", "rate")
        out.append((f"HTTP authorized {method}", "≥ 50% of nginx's requests/s, same upstream",
                    f"{k:,.0f} vs {ng:,.0f} req/s = {100 * k / ng:.0f}%" if ng == ng and k == k and ng
                    else "not measured", _verdict(ng == ng and k == k and k >= 0.5 * ng, rows, "http")))
        ng = median(rows, "http", method, "nginx", "proxy_us_per_req")
        k = median(rows, "http", method, "keygate", "proxy_us_per_req")
        out.append((f"HTTP authorized {method}, CPU per request", "≤ 2x nginx's (one worker each)",
                    f"{k:,.0f} µs vs {ng:,.0f} µs = {ratio(k, ng)}" if ng == ng and k == k and ng
                    else "not measured", _verdict(ng == ng and k == k and k <= 2 * ng, rows, "http")))
    # 7. issue 17: a revocation in force on every other gateway
    prop = report_propagation.target(rows)
    if prop is not None:
        out.append(prop)
    return out


def syscall_cost(rows: list[Row]) -> str:
    """The machine's loopback ping-pong round trip (bench/syscost.py), as the report states it."""
    def m(metric: str) -> float:
        return median(rows, "machine", "loopback round trip", "direct", metric)

    rtt, same, cross = m("rtt_us"), m("same_cpu_rtt_us"), m("cross_cpu_rtt_us")
    if rtt != rtt:
        return "not measured"
    text = f"{rtt:,.1f} µs unpinned"
    if same == same:
        text += f", {same:,.1f} µs on one CPU"
    if cross == cross:
        text += f", {cross:,.1f} µs across two"
    return text


def _verdict(ok: bool, rows: list[Row], scenario: str) -> str:
    if not any(r.scenario == scenario and r.mode == "keygate" for r in rows):
        return "not measured"
    return "**met**" if ok else "**not met**"


# --------------------------------------------------------------------------- under attack (issue 14)


def _ms_of_us(v: float) -> str:
    return f"{v / 1000:,.1f}" if v == v else "–"


def _fmt(v: float, fmt: str) -> str:
    return fmt.format(v) if v == v else "–"


def attack_targets(rows: list[Row]) -> list[list[str]]:
    """Per case with attackers: (case, target, measured, verdict) for the three targets of issue 14."""
    quiet = median(rows, "attack", "quiet", "keygate", "p99_us")
    out = []
    for case in dict.fromkeys(r.case for r in rows if r.scenario == "attack" and r.case != "quiet"):
        m = lambda k: median(rows, "attack", case, "keygate", k)  # noqa: E731, B023 (used in this iteration)
        worst, failed = m("connect_max_ms"), m("connect_failed")
        ok = worst == worst and worst <= 1000 and failed == 0
        out.append([case, "the legitimate client connects within 1 s",
                    f"every connect {worst:,.0f} ms or less, {failed:.0f} failed" if worst == worst else "no connect",
                    "**met**" if ok else "**not met**"])
        p99 = m("p99_us")
        ok = p99 == p99 and quiet == quiet and p99 <= 3 * quiet
        out.append([case, "p99 message latency within 3x quiet",
                    f"{_ms_of_us(p99)} ms vs {_ms_of_us(quiet)} ms = {ratio(p99, quiet)}",
                    "**met**" if ok else ("not measured" if quiet != quiet else "**not met**")])
        growth, bound = m("rss_growth_mb"), m("rss_bound_mb")
        ok = growth == growth and growth <= bound
        out.append([case, "RSS growth within what the limits promise",
                    f"{growth:,.1f} MB for {m('attack_connections_peak'):,.0f} connections at most, "
                    f"bound {bound:,.1f} MB", "**met**" if ok else "**not met**"])
    return out


def attack_tables(rows: list[Row]) -> str:
    mine = [r for r in rows if r.scenario == "attack" and r.mode == "keygate"]
    cases = list(dict.fromkeys(r.case for r in mine))
    body = []
    for case in cases:
        m = lambda k: median(rows, "attack", case, "keygate", k)  # noqa: E731, B023 (used in this iteration)
        body.append([case, f"{_fmt(m('connect_median_ms'), '{:,.1f}')} / {_fmt(m('connect_max_ms'), '{:,.1f}')}",
                     f"{m('connect_failed'):.0f} of {m('connect_n'):.0f}" if m("connect_n") == m("connect_n") else "–",
                     _ms_of_us(m("p50_us")), _ms_of_us(m("p99_us")),
                     ratio(m("p99_us"), median(rows, "attack", "quiet", "keygate", "p99_us")),
                     f"{_fmt(m('http_median_ms'), '{:,.1f}')} / {_fmt(m('http_max_ms'), '{:,.1f}')}",
                     f"{_fmt(m('rss_before_mb'), '{:,.1f}')} → {_fmt(m('rss_peak_mb'), '{:,.1f}')} "
                     f"→ {_fmt(m('rss_after_mb'), '{:,.1f}')}",
                     f"{_fmt(m('rss_growth_mb'), '{:,.1f}')} / {_fmt(m('rss_bound_mb'), '{:,.1f}')}",
                     _fmt(1048.576 * m("rss_growth_mb") / m("attack_connections_peak"), "{:,.0f}")
                     if m("attack_connections_peak") else "–",
                     _fmt(m("keygate_cpu_pct"), "{:.0f}%") + " / " + _fmt(m("attackers_cpu_pct"), "{:.0f}%"),
                     _fmt(m("audit_mb"), "{:,.2f}")])
    parts = [_table(["case", "connect median / max (ms)", "connects failed", "p50 (ms)", "p99 (ms)",
                     "p99 / quiet", "HTTP GET median / max (ms)", "keygate RSS before → peak → after (MB)",
                     "RSS growth / bound (MB)", "growth per held connection (kB)",
                     "CPU of one core: keygate / attackers", "audit log written (MB)"],
                    body)]
    verdicts = attack_targets(rows)
    if verdicts:
        parts += ["", "Targets (issue 14):", "", _table(["case", "target", "measured", "verdict"], verdicts)]
    from bench.scenarios import ATTACK_LABEL, ATTACKS

    attacked = [r for r in mine if r.extra.get("attacks")]
    if attacked:
        body = []
        for r in attacked:
            for name, st in r.extra["attacks"].items():
                cfg = ATTACKS.get(name, {})
                size = (f"{cfg['rate']}/s" if "rate" in cfg else f"{cfg.get('connections', 0)} connections")
                size += f" from {cfg.get('addresses', 1)} address{'es' if cfg.get('addresses', 1) > 1 else ''}"
                answers = ", ".join(f"{k} {v:,}" for k, v in sorted(st.get("answers", {}).items()))
                body.append([r.case, ATTACK_LABEL.get(name, name), size, f"{st['attempts']:,}",
                             f"{st['established']:,}", f"{st['refused']:,}", f"{st['closed_by_keygate']:,}",
                             f"{st['peak_open']:,}", answers or "–"])
        parts += ["", "What the attackers did and what keygate answered:", "",
                  _table(["case", "attack", "size", "connections opened", "TLS established",
                          "refused before TLS", "closed by keygate", "held at most", "keygate's answers"], body)]
    parts += attack_notes(rows)
    return "\n".join(parts)


def attack_notes(rows: list[Row]) -> list[str]:
    """What this run's own figures say about a missed target and about the audit log."""
    notes = []
    missed = [v[0] for v in attack_targets(rows) if v[1].startswith("p99") and "not met" in v[3]]
    for case in missed:
        m = lambda k: median(rows, "attack", case, "keygate", k)  # noqa: E731, B023 (used in this iteration)
        run = next(r for r in rows if r.scenario == "attack" and r.case == case and r.mode == "keygate")
        reopened = sum(st.get("closed_by_keygate", 0) + st.get("refused", 0) for st in
                       run.extra.get("attacks", {}).values())
        handshakes = sum(st.get("established", 0) for st in run.extra.get("attacks", {}).values())
        notes.append(f"- **{case}**: keygate used {_fmt(m('keygate_cpu_pct'), '{:.0f}%')} of one core and the "
                     f"attackers {_fmt(m('attackers_cpu_pct'), '{:.0f}%')} (two cores, shared with Mosquitto and "
                     f"the legitimate client); keygate completed {handshakes:,} TLS handshakes with attackers "
                     f"and closed or refused {reopened:,} of their connections, which they opened again.")
    audit = [(r.case, r.metrics["audit_mb"], r.metrics.get("measured_s", 0)) for r in rows
             if r.scenario == "attack" and r.mode == "keygate" and r.metrics.get("audit_mb", 0) >= 1]
    if audit:
        notes.append("- Audit log written during the measurement: " + "; ".join(
            f"{case} {mb:,.1f} MB" + (f" ({mb / s:,.1f} MB/s)" if s else "") for case, mb, s in audit) + ".")
    return ["", "Notes from this run's figures:", ""] + notes if notes else []


# --------------------------------------------------------------------------- markdown


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def scenario_table(rows: list[Row], name: str) -> str:
    sc = next(s for s in SCENARIOS if s.name == name)
    mine = [r for r in rows if r.scenario == name]
    if not mine:
        return ""
    if name == "attack":
        return attack_tables(rows)
    if name == "propagation":
        return report_propagation.table(rows)
    cases = list(dict.fromkeys(r.case for r in mine))
    modes = [m for m in sc.modes if any(r.mode == m for r in mine)]
    cols = COLUMNS[name]
    if name == "memory":
        counts = sorted({m.rsplit("_", 1)[1] for r in mine for m in r.metrics if m.startswith("kb_per_conn_")},
                        key=int)
        cols = [(f"kb_per_conn_{c}", f"KB per connection at {int(c):,}", "{:.1f}", False) for c in counts]
        cols += [(f"rss_delta_mb_{c}", f"RSS growth at {int(c):,} (MB)", "{:.1f}", False) for c in counts]
    if name == "identity":
        body = [[c] + [cell(rows, name, c, "keygate", m, f) for m, _, f, _ in cols] for c in cases]
        return _table(["operation"] + [label for _, label, _, _ in cols], body)
    base = "nginx" if name == "http" else ("direct-tls" if name in ("cpu", "storm", "memory") else "direct")
    header = ["case", "metric"] + [MODE_LABEL[m] for m in modes]
    with_ratio = "keygate" in modes and base in modes
    if with_ratio:
        header.append(f"keygate / {MODE_LABEL[base]}")
        if name == "http":
            header.append("keygate / direct")
            if "relay" in modes:
                header.append("keygate / relay")
    body = []
    for case in cases:
        for metric, label, fmt, _ in cols:
            if not any(metric in r.metrics for r in mine if r.case == case):
                continue
            line = [case, label] + [cell(rows, name, case, m, metric, fmt) for m in modes]
            if with_ratio:
                line.append(ratio(median(rows, name, case, "keygate", metric), median(rows, name, case, base, metric)))
                if name == "http":
                    line.append(ratio(median(rows, name, case, "keygate", metric),
                                      median(rows, name, case, "direct", metric)))
                    if "relay" in modes:
                        line.append(ratio(median(rows, name, case, "keygate", metric),
                                          median(rows, name, case, "relay", metric)))
            body.append(line)
    return _table(header, body)


def write_report(rows: list[Row], out: Path, *, sizes: Sizes, command: str, quick: bool, elapsed: float,
                 notes: Sequence[str] = (), extra_sections: Sequence[str] = (), workers: int = 1) -> Path:
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    plots = plot(rows, img)
    failed = [r for r in rows if not r.ok]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    md = [
        "# Benchmarks: keygate against the direct broker",
        "",
        "Written by `python -m bench` (see [`bench/`](../bench/)); every number and plot on this page is",
        "regenerated by that one command, which starts Mosquitto, a token issuer, the NGSI-v2 stand-in,",
        "nginx and keygate on loopback and measures each scenario directly and through keygate in the same",
        "run, alternating which goes first, and reports the median with the min–max range of the repetitions.",
        "",
        f"Run: {when}, `{command}`, {elapsed / 60:.1f} minutes"
        + (" — **quick mode: sizes too small for the figures to mean anything**" if quick else "") + ".",
        "",
        f"keygate ran as `keygate serve --workers {workers}`"
        + (" (one process)." if workers == 1 else
           f" (a supervisor and {workers} worker processes sharing the listeners with SO_REUSEPORT; its CPU "
           "and memory figures are those of the whole process tree)."),
        "",
        "## Machine",
        "",
        _table(["", ""], [[k, v] for k, v in machine()]
               + [["loopback TCP ping-pong round trip (system-call cost)", syscall_cost(rows)]]),
        "",
        "The round trip (`python -m bench.syscost`: two processes echoing one byte over loopback TCP, two",
        "`send`, two `recv` and two wake-ups) is the kind of work each proxied request or relayed message",
        "costs any gateway: where it is dear, every ratio against a C server moves, so it is stated here",
        "to tell a slower machine from a slower keygate. Across CPUs each wake-up is an inter-processor",
        "interrupt, which a virtual machine makes dear; unpinned, the scheduler decides, as it does for",
        "the benchmark's own processes.",
        "",
        "All processes share the same cores: the load generators (separate processes, raw asyncio",
        "sockets with pre-encoded packets, `wrk` for HTTP), Mosquitto, keygate and nginx. Mosquitto is",
        "Debian's, unmodified, anonymous on a plain loopback listener (what keygate forwards to) and with",
        "a TLS listener on the same certificate as keygate (`direct, TLS`). keygate runs as its own",
        "process (`bench/gateway_proc.py`, the same services as `keygate serve`) with the shipped",
        "`policies/`, an SQLCipher ownership store and ES256 tokens from a local issuer.",
        "",
        "## Targets (issue 8)",
        "",
        _table(["scenario", "target", "measured", "verdict"], [list(t) for t in targets(rows)]),
        "",
        f"Measured beside these ratios: a loopback ping-pong round trip of {syscall_cost(rows)} on this machine.",
        "",
    ]
    descriptions = {
        "sipmba": (f"One publisher and one subscriber, {sizes.sipmba_messages:,} messages `hello i` "
                   "(i = 1 … N) on one topic; the subscriber checks every payload is the next one. "
                   "QoS 1 and 2 with at most 1,000 messages in flight. Time is first publish to last "
                   "message received. One repetition (as the paper)."),
        "ingest": (f"{sizes.ingest_publishers} publishers, {sizes.ingest_per_publisher:,} messages each "
                   "(32-byte payload, 50 per write), each on its own device's topic; a subscriber directly "
                   "on Mosquitto counts arrivals, and publishers stop when 20,000 are unaccounted for, so "
                   "what is measured is the sustained rate with nothing lost."),
        "fanout": (f"One device publishing its telemetry, {sizes.fanout_subscribers} subscribers of its owner on "
                   "`devices/+/telemetry` (through keygate the policy grants the wildcard with a check on "
                   "every delivery) and one subscriber of another user on the same wildcard, who must get "
                   "nothing through keygate. Rate = deliveries/s to the entitled subscribers."),
        "latency": (f"One publisher at a fixed rate for {sizes.latency_seconds:g} s, one PUBLISH per write, "
                    "stamped with CLOCK_MONOTONIC; one subscriber. Through keygate both clients use TLS."),
        "cpu": (f"{sizes.cpu_clients} clients, each PUBLISH in its own write, {sizes.cpu_rate:,} messages/s in "
                f"total for {sizes.cpu_seconds:g} s; CPU time (user + system, `/proc/<pid>/stat`) of the "
                "process terminating TLS divided by the messages: Mosquitto itself for `direct, TLS`, "
                "keygate for `keygate` (Mosquitto's own share behind keygate in the second row)."),
        "storm": (f"{sizes.storm_workers} loops of TCP connect, full TLS handshake (no session resumption), "
                  "CONNECT, CONNACK, DISCONNECT for "
                  f"{sizes.storm_seconds:g} s. Through keygate every CONNECT carries a different token, so "
                  "each one is validated (signature, claims) without the token cache."),
        "memory": ("Idle TLS connections (CONNECT done, keepalive one hour) opened in a fresh keygate "
                   "process after a short warm-up; RSS growth of the process holding them divided by the "
                   "connections, cumulatively (the larger count includes the smaller)."),
        "http": (f"{sizes.http_connections} keep-alive connections for {sizes.http_seconds:g} s: "
                 "`GET /v2/entities/{id}` and `PATCH /v2/entities/{id}/attrs` on the NGSI-v2 stand-in "
                 "(one Python process, the common upstream), directly, through nginx (one worker, TLS, "
                 "keep-alive upstream) and through keygate (TLS, bearer token, policy, ownership). "
                 "CPU µs per request: user + system time (`/proc/<pid>/stat`, nginx's master and worker "
                 "together) of the process over the run divided by the requests completed; unlike "
                 "requests/s it does not depend on which process saturates a core first."),
        "attack": (
            "A fresh keygate with the settings of a deployment facing the internet (`bench/stack.py`, "
            "`HARDENED_MQTT`: the `mqtt.limits` defaults, 64 unauthenticated connections and 20 new ones "
            "per second per address, a 10 s connect deadline, 200 messages/s per identity, a WebSocket "
            f"listener). The legitimate client, from 127.0.0.1: a device publishing {LEGIT_RATE} messages/s "
            "(one per write, stamped) to its owner's subscriber for "
            f"{sizes.attack_seconds:g} s, and beside it a fresh TLS connection + CONNECT with the "
            "owner's token every 0.25 s timed to its CONNACK, and one HTTPS `GET /v2/entities/{id}` on a "
            "fresh connection every 0.25 s. `quiet`: nothing else; the other cases: the attackers of "
            "`bench/attackload.py` (one process, every connection bound to a source address in "
            "127.0.0.2–127.0.0.254, so keygate's per-address limits see them as separate hosts) opened "
            f"their connections {sizes.attack_ramp_s:g} s before and keep attacking throughout. RSS is "
            "keygate's VmRSS before the attackers start, at its peak (sampled every 0.1 s) and at the end "
            "of the measurement; the bound is what the limits promise: every connection the attackers held "
            "at most (the sum of each attack's peak) x (`connect_max_bytes` 32 KiB + 64 KiB for its TLS "
            "state, buffers and objects) + 32 MiB, what the shared decision cache may hold "
            "(`policies.cache_max_bytes`), + 16 MiB for the allocator and the rest. Every process shares "
            "the same two cores, the attackers too: their CPU is in the table."),
        "propagation": report_propagation.DESCRIPTION,
        "identity": "The identity micro-benchmarks (`bench/bench_tokens.py`, `bench/bench_ownership.py`, "
                    "`bench/bench_policy.py`) in one process, no network.",
    }
    for sc in SCENARIOS:
        table = scenario_table(rows, sc.name)
        if not table:
            continue
        md += [f"## {sc.title}", "", descriptions.get(sc.name, ""), "", table, ""]
        if sc.name in plots:
            md += [f"![{sc.title}](img/{plots[sc.name]})", ""]
    if plots.get("throughput"):
        md += ["## Throughput at a glance", "", f"![throughput](img/{plots['throughput']})", ""]
    md += findings(rows)
    md += list(extra_sections)
    if failed or notes:
        md += ["## Runs that did not complete", ""]
        md += [f"- {r.scenario} / {r.case} / {r.mode} (rep {r.rep + 1}): {r.detail or 'counts did not match'}"
               for r in failed]
        md += [f"- {n}" for n in notes]
        md += [""]
    md += ["## Reproduce", "", "```sh", "scripts/setup --test        # mosquitto, nginx, wrk, the venv",
           ".venv/bin/python -m bench   # ~10 minutes; --quick for a one-minute smoke run", "```", "",
           "Raw results of this run: `bench-results.json` next to this file.", ""]
    path = out / "benchmarks.md"
    path.write_text("\n".join(md))
    return path


# --------------------------------------------------------------------------- why

PROFILE_CMD = ".venv/bin/python -m bench --only ingest,fanout,cpu,http --modes keygate --reps 1 --profile /tmp/prof"


def findings(rows: list[Row]) -> list[str]:
    """Where a target is missed: what the profiler shows keygate spends its time on.

    The profile figures are from py-spy runs of the command in PROFILE_CMD on
    this machine (sampling slows keygate a little, so they are never taken in
    the measuring run); the numbers in brackets come from this run.
    """
    verdicts = {t[0]: t[3] for t in targets(rows)}
    missed = {k for k, v in verdicts.items() if "not met" in v}
    if not missed:
        return []
    out = ["## Why targets are missed (profiled)", "",
           f"Profiles: `{PROFILE_CMD}` (py-spy samples keygate while each scenario runs; "
           "`python -m bench.profile /tmp/prof` prints the tables). keygate is one Python process on one "
           "core; on this 2-core machine it shares the cores with Mosquitto and the load generators.", ""]
    qos0_lost = median(rows, "sipmba", "QoS 0", "keygate", "lost")
    if any(k.endswith("QoS 0 / 1 / 2") for k in missed):
        out += ["- **1M messages.** " + (
            f"At QoS 0 nothing paces the publisher but TCP. keygate reads clients in bites a quarter the "
            f"size of its reads from the broker (server.py, `CLIENT_READ_SIZE`), so that it drains the "
            f"broker faster than it feeds it; in this run the subscriber's queue in Mosquitto still "
            f"overflowed `max_queued_messages` ({qos0_lost:,.0f} lost, "
            f"{median(rows, 'sipmba', 'QoS 0', 'keygate', 'broker_dropped'):,.0f} of them counted by "
            "Mosquitto itself in `$SYS/broker/publish/messages/dropped`)."
            if qos0_lost and qos0_lost == qos0_lost else
            "Through keygate a flow took longer than 1.25x the direct run: each message crosses two TLS "
            "legs and two passes through the session."), ""]
    if "bulk QoS 0 ingest" in missed:
        cost = {m: median(rows, "ingest", "QoS 0", m, "us_per_msg") for m in ("direct", "relay", "keygate")}
        rate = {m: median(rows, "ingest", "QoS 0", m, "rate") for m in ("direct", "relay", "keygate")}
        costed = bool(all(v == v for v in (*cost.values(), *rate.values())) and rate["direct"])
        out += ["- **Bulk ingest.** With 50 messages per TLS record keygate's per-packet work is one compiled "
                "walk over the chunk (`proxy/mqtt/_walk.c`: the header, the topic compared with the packet "
                "before, the cached decision; the rate limiter charged once per chunk)."
                + (f" In this run keygate spends {cost['keygate']:.2f} µs of CPU per message, the bare TLS "
                   f"relay {cost['relay']:.2f} µs and Mosquitto {cost['direct']:.2f} µs; the relay alone "
                   f"reaches {rate['relay'] / rate['direct']:.0%} of direct. On 2 cores the publishers, "
                   "keygate and Mosquitto share the CPUs, so each µs keygate spends is taken from the broker or "
                   "the publishers; what is left above the relay is the per-chunk work (the session's "
                   "deadline checks, the TLS record, the write to the broker)." if costed else ""), ""]
    if "added latency p50 at 1k msg/s" in missed:
        case = next((r.case for r in rows if r.scenario == "latency"), "")
        d = median(rows, "latency", case, "direct", "p50_us")
        relay = median(rows, "latency", case, "relay", "p50_us")
        kg = median(rows, "latency", case, "keygate", "p50_us")
        floor = (f" The bare TLS relay (no parsing, no checks) adds {relay - d:,.0f} µs to the direct median "
                 f"in this run; keygate adds {kg - d:,.0f} µs, so {kg - relay:,.0f} µs is keygate's own work "
                 "and the rest is what any Python TLS hop pays here." if relay == relay and d == d else "")
        out += ["- **Latency.** Both clients go through keygate, so a message crosses it twice (publisher in, "
                "subscriber out), each time a wake-up from `epoll`, a TLS record, the session and one "
                "`send()`. At 1k msg/s every process sleeps between messages, and on this 2-vCPU virtual "
                "machine each extra wake-up of a process with a cold cache costs on the order of 100 µs; at "
                "10k msg/s, with the loop busy, the same path adds far less. Checked by hand once (not "
                "part of this run): with two `nice -n 19` busy loops keeping both vCPUs out of idle, the "
                "p50 at 1k msg/s fell from 275 to 147 µs through keygate and from 239 to 146 µs through the "
                "bare relay." + floor, ""]
    if "gateway CPU per message, TLS, one message per write" in missed:
        case = next((r.case for r in rows if r.scenario == "cpu"), "")
        relay = median(rows, "cpu", case, "relay", "us_per_msg")
        kg = median(rows, "cpu", case, "keygate", "us_per_msg")
        mq = median(rows, "cpu", case, "direct-tls", "us_per_msg")
        out += ["- **CPU per message, one message per write.** Per message keygate makes the fewest system "
                "calls there can be: one `epoll_pwait`, one `read`, one `write` (`strace -c -f -p <keygate>` "
                "during the run: 9,583 / 9,969 / 9,969 calls in 2 s). `perf record -p <keygate>` splits its "
                "CPU time into the kernel 46% (those calls and loopback TCP), the Python interpreter 34%, "
                "OpenSSL 9% and uvloop 6%. Replaying the same TLS records in process through "
                "`TlsClientSide`, `Connection` and `Session` costs 5.5 µs per message warm; in the "
                "benchmark the interpreter runs with cold caches (100 connections, 200 µs apart), which "
                f"is where keygate's cost above the relay comes from. A bare Python TLS relay costs "
                f"{relay:.0f} µs per message in this run ({_times(relay, mq)} Mosquitto's {mq:.0f} µs with TLS) "
                f"and keygate {kg:.0f} µs, so keygate's own work (framing, checks, session, metrics) is "
                f"{kg - relay:.0f} µs and the target ({2 * mq:.0f} µs) is {kg - 2 * mq:.0f} µs away. To go "
                "lower: fewer Python calls per chunk on the TLS path (the `ssl.SSLObject` wrappers, the "
                "`Actions` object), a compiled data path, or several worker processes sharing the "
                "listener (SO_REUSEPORT) to use more cores (that raises throughput, not efficiency).", ""]
    if "memory per idle TLS connection" in missed:
        out += ["- **Memory.** Compare keygate with the bare TLS relay in the memory table: most of the "
                "per-connection memory is the TLS connection in Python/OpenSSL plus the broker socket.", ""]
    if any(k.startswith("HTTP authorized") for k in missed):
        def us(method: str, mode: str) -> float:
            return median(rows, "http", method, mode, "proxy_us_per_req")
        k, ng, relay = us("GET", "keygate"), us("GET", "nginx"), us("GET", "relay")
        kp, ngp, relayp = us("PATCH", "keygate"), us("PATCH", "nginx"), us("PATCH", "relay")
        measured = (f"keygate {k:.0f} µs per GET and {kp:.0f} µs per PATCH, nginx {ng:.0f} and {ngp:.0f} µs, "
                    f"and the bare TLS relay in front of the same stand-in {relay:.0f} and {relayp:.0f} µs"
                    if k == k and ng == ng and relay == relay and kp == kp else "the HTTP table's figures")
        own = f" keygate's own work is therefore about {k - relay:.0f} µs per GET." if k == k and relay == relay else ""
        out += ["- **HTTP.** CPU per request of the proxy process in this run: " + measured + ". The relay "
                "(`bench/relay.py`: one Python process on uvloop terminating TLS and passing bytes, no HTTP) "
                "costs about what nginx does, so Python, TLS and the system calls are not the gap." + own +
                " Issue 18 took both aiohttp halves off the NGSI path: the lean upstream client "
                "(`proxy/http/upstream.py`) and the lean server (`proxy/http/lean_server.py`: an "
                "`asyncio.Protocol` reading heads with llhttp and writing answers as bytes, framed as aiohttp "
                "frames them; any other head hands the connection to aiohttp's server), and batched the audit "
                "lines and metrics per turn of the loop. Over the issue keygate's CPU per GET went from 243 µs "
                "to the figure above. Where the rest goes: `perf record -F 999 -g -p <keygate>` for 2 s of the "
                "GET run (by hand, once) puts 66% of keygate's CPU samples in the Python interpreter, 15% in "
                "the kernel, 5% in libc, 5% in OpenSSL, 4% in uvloop, 2% in multidict and 1% in llhttp. py-spy "
                "by part of the path (`" + PROFILE_CMD + "`, then `python -m bench.profile /tmp/prof`; its "
                "samples are wall-clock, so a write that wakes the load generator and is then preempted on "
                "this 2-core machine counts as write time): the writes to the client, the upstream client, "
                "the audit line and metrics, the gateway's path, query and header handling, and the lean "
                "server's head parsing and framing take between 5% and 40% each, the checks (token cache, NGSI "
                "analysis, plan, policy, ownership) about 3-5%. No part dominates: the interpreter's work is "
                "spread over some forty functions of ten modules, each a few µs. Counted without this machine's "
                "noise (`python -m bench.http_instr`: callgrind over keygate's process, 12 TLS connections in "
                "flight; by hand), a GET cost 421k instructions and a PATCH 552k at the start of the stop that "
                "added the count, and 346k and 426k at its end: the audit line's body keyed by the request's "
                "fields (53k of a GET before), the bearer token known by its head's memo (35k), one JSON "
                "decoder built once and no task and shield per write (51k of a PATCH). Taking one part away "
                "at a time, what remains of a GET is about a fifth in the reads (TLS and both HTTP parses), "
                "the planning against the policy's cached decision and the ownership facts some 45k, the "
                "audit line and metrics some 30k, and the rest in the coroutine chain from the head to the "
                "answer's write. Compiling the path's five modules with mypyc (tried, not shipped) took about "
                "a tenth off the CPU per request, at the price of a second semantics (annotations checked at "
                "run time) to test. What would close the gap to 2x nginx is a compiled request path (head "
                "parsing, header rewriting and answer framing in C), not another Python rewrite; several "
                "workers (`--workers`) raise throughput on a machine with idle cores, not the CPU per request.", ""]
    return out


# --------------------------------------------------------------------------- plots


def plot(rows: list[Row], img: Path) -> dict[str, str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made: dict[str, str] = {}
    colors = {"direct": "#4c72b0", "direct-tls": "#8172b2", "relay": "#937860", "keygate": "#dd8452",
              "nginx": "#55a868"}

    # Latency distributions, direct vs keygate, one panel per rate.
    lat = [r for r in rows if r.scenario == "latency" and r.extra.get("quantiles_us")]
    if lat:
        cases = list(dict.fromkeys(r.case for r in lat))
        fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4), squeeze=False)
        for ax, case in zip(axes[0], cases, strict=True):
            for mode in ("direct", "keygate"):
                runs = [r.extra["quantiles_us"] for r in lat if r.case == case and r.mode == mode]
                if not runs:
                    continue
                n = min(len(q) for q in runs)
                med = [statistics.median(q[i][1] for q in runs) for i in range(n)]
                xs = [-math.log10(max(1e-9, 1 - runs[0][i][0] / 100)) for i in range(n)]
                ax.plot(xs, med, label=MODE_LABEL[mode], color=colors[mode])
            ax.set_yscale("log")
            ax.set_xticks([0, math.log10(2), 1, 2, 3, 4])
            ax.set_xticklabels(["0", "50", "90", "99", "99.9", "99.99"])
            ax.set_xlabel("percentile (tail stretched)")
            ax.set_ylabel("end-to-end latency (µs)")
            ax.set_title(f"latency at {case}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(img / "bench-latency.png", dpi=110)
        plt.close(fig)
        made["latency"] = "bench-latency.png"

    # Throughput per scenario, bars with min–max whiskers.
    groups = [("sipmba", "rate", "SIP-MBA"), ("ingest", "rate", "ingest"), ("fanout", "rate", "fan-out"),
              ("http", "rate", "HTTP")]
    panels = [(sc, metric, title) for sc, metric, title in groups if any(r.scenario == sc for r in rows)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
        for ax, (sc, metric, title) in zip(axes[0], panels, strict=True):
            mine = [r for r in rows if r.scenario == sc]
            cases = list(dict.fromkeys(r.case for r in mine))
            modes = [m for m in next(s for s in SCENARIOS if s.name == sc).modes if any(r.mode == m for r in mine)]
            width = 0.8 / max(1, len(modes))
            for j, mode in enumerate(modes):
                meds, lo, hi = [], [], []
                for case in cases:
                    v = values(rows, sc, case, mode, metric)
                    m = statistics.median(v) if v else 0.0
                    meds.append(m)
                    lo.append(m - min(v) if v else 0.0)
                    hi.append(max(v) - m if v else 0.0)
                xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(cases))]
                ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=MODE_LABEL[mode], color=colors[mode])
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(cases, fontsize=8)
            ax.set_title(title)
            ax.set_ylabel("requests/s" if sc == "http" else ("deliveries/s" if sc == "fanout" else "messages/s"))
            ax.legend(fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(img / "bench-throughput.png", dpi=110)
        plt.close(fig)
        made["throughput"] = "bench-throughput.png"

    # Cost: CPU per message, connects/s, memory per connection.
    cost: list[tuple[str, str | None, str]] = [
        ("cpu", "us_per_msg", "CPU µs per message (TLS)"), ("storm", "rate", "TLS connects/s"),
        ("memory", None, "KB per idle TLS connection")]
    cost_panels = [c for c in cost if any(r.scenario == c[0] for r in rows)]
    if cost_panels:
        fig, axes = plt.subplots(1, len(cost_panels), figsize=(4.2 * len(cost_panels), 4), squeeze=False)
        for ax, (sc, cost_metric, title) in zip(axes[0], cost_panels, strict=True):
            mine = [r for r in rows if r.scenario == sc]
            modes = [m for m in next(s for s in SCENARIOS if s.name == sc).modes if any(r.mode == m for r in mine)]
            if sc == "memory":
                keys = sorted({m for r in mine for m in r.metrics if m.startswith("kb_per_conn_")},
                              key=lambda k: int(k.rsplit("_", 1)[1]))
                labels = [f"{int(k.rsplit('_', 1)[1]):,}" for k in keys]
            else:
                assert cost_metric is not None  # only "memory" has none
                keys, labels = [cost_metric], [""]
            width = 0.8 / max(1, len(modes))
            for j, mode in enumerate(modes):
                meds = []
                for k in keys:
                    v = [x for r in mine if r.mode == mode for x in ([r.metrics[k]] if k in r.metrics else [])]
                    meds.append(statistics.median(v) if v else 0.0)
                xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(keys))]
                ax.bar(xs, meds, width, label=MODE_LABEL[mode], color=colors[mode])
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(labels)
            ax.set_title(title)
            ax.legend(fontsize=8)
            ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(img / "bench-cost.png", dpi=110)
        plt.close(fig)
        made["cpu"] = "bench-cost.png"
    return made


if __name__ == "__main__":  # re-render from a saved run: python -m bench.report results.json OUTDIR
    import json

    data = json.loads(Path(sys.argv[1]).read_text())
    rows = [Row(**d) for d in data]
    print(write_report(rows, Path(sys.argv[2]), sizes=Sizes.full(), command="python -m bench", quick=False,
                       elapsed=0.0))


def _times(a: float, b: float) -> str:
    """``a / b`` as "N.Nx"; a quick run can measure 0 µs for ``b``."""
    return f"{a / b:.1f}x" if b else "n/a x"
