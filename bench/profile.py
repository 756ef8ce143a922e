"""Sampling profiles of the keygate process while a scenario runs (``python -m bench --profile DIR``).

py-spy (``pip install py-spy``) samples keygate's Python stacks from outside
the process, so the gateway is profiled as it runs in the benchmark, with no
change to its code. Each keygate run writes ``DIR/<scenario>-<case>.txt`` in
the collapsed-stack format (one ``frame;frame;... count`` line per stack,
readable by flamegraph tools and speedscope), and :func:`summarize` turns a
file into the functions that take the most samples, by self time and by
inclusive time. A profiling run disturbs the timings a little: use it to find
the bottleneck, not for the published figures.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Recorder:
    def __init__(self, pid: int, out: Path, rate: int = 250):
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate),
                                      "--nonblocking", "--subprocesses", "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> Path | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.out if self.out.exists() else None


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: aggregate by function, not by line."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("/work/main/", "site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})"


def _line(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``file.py:123 func``."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("/work/main/", "site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{m.group('line') or '?'} {m.group('func')}"


# The HTTP path, part by part: a sample counts for the part its innermost Python frame belongs to
# (native work a frame calls into, such as a TLS write and its send(), counts for that frame).
_HTTP_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("writes to the client (TLS record, send)", ("LeanConnection.write ", "SSLObject.write ")),
    ("lean HTTP server: heads, framing, the connection", ("proxy/http/lean_",)),
    ("upstream client to Orion", ("proxy/http/upstream.py",)),
    ("checks: token, NGSI analysis, plan, policy, ownership",
     ("proxy/http/plan.py", "proxy/http/ngsi.py", "proxy/http/auth.py", "proxy/policy/", "proxy/identity/",
      "ownership/", "proxy/ssrf.py", "proxy/facts")),
    ("gateway glue: path, query, headers, answers", ("proxy/http/gateway.py", "urllib/parse.py", "multidict",
                                                     "yarl")),
    ("audit line and metrics", ("proxy/audit.py", "proxy/http/outcomes.py", "prometheus_client", "json/")),
    ("event loop, tasks, TLS layer", ("asyncio/", "uvloop", "ssl.py", "Runner.run", "selectors.py")),
    ("aiohttp (handed-over connections, the app)", ("aiohttp/",)),
)


def http_parts(self_time: Counter[str], total: int) -> list[str]:
    """Self time grouped into the parts of the HTTP path (empty when no sample is on it)."""
    parts: Counter[str] = Counter()
    for frame, n in self_time.items():
        part = next((name for name, marks in _HTTP_PARTS if any(m in frame for m in marks)), "other")
        parts[part] += n
    if not any(n for name, n in parts.items() if name != "other" and "loop" not in name):
        return []
    out = ["", "| self | part of the HTTP path |", "| ---: | --- |"]
    return out + [f"| {100 * n / total:.1f}% | {name} |" for name, n in parts.most_common()]


def summarize(path: Path, top: int = 15) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        raw = [f for f in stack.split(";") if f]
        frames = [_short(f) for f in raw]
        if not frames:
            continue
        lines[_line(raw[-1])] += n
        self_time[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return f"{path.name}: no samples"
    out = [f"### {path.stem} ({total} samples)", "", "| self | function |", "| ---: | --- |"]
    out += [f"| {100 * n / total:.1f}% | `{f}` |" for f, n in self_time.most_common(top)]
    out += ["", "| inclusive | function |", "| ---: | --- |"]
    out += [f"| {100 * n / total:.1f}% | `{f}` |" for f, n in inclusive.most_common(top)]
    out += ["", "| self | line |", "| ---: | --- |"]
    out += [f"| {100 * n / total:.1f}% | `{f}` |" for f, n in lines.most_common(10)]
    if path.stem.startswith("http"):
        out += http_parts(self_time, total)
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # python -m bench.profile DIR: summaries of every profile in DIR
    d = Path(sys.argv[1])
    for f in sorted(d.glob("*.txt")):
        print(summarize(f))
