"""Running a load generator (``python -m bench.<module> spec.json``) from a scenario.

Load generators run in processes of their own, so that the gateway's CPU time is read apart
from theirs; each gets its spec as a JSON file and answers with one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time

from bench.stack import PYTHON, REPO


def _spec_file(spec: dict) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, prefix="bench-spec-") as f:
        json.dump(spec, f)
        return f.name


def run_load(module: str, spec: dict, timeout: float) -> dict:
    """Run ``python -m bench.<module> spec.json`` and return its JSON result."""
    path = _spec_file(spec)
    try:
        proc = subprocess.run([PYTHON, "-m", f"bench.{module}", path], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"completed": False, "error": f"load generator timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"completed": False, "error": f"load generator exited {proc.returncode}: {proc.stderr[-400:]}"}
    return json.loads(lines[-1])


class Interactive:
    """A load generator that prints lines and waits for ours (CPU and memory sampling)."""

    def __init__(self, module: str, spec: dict):
        self.proc = subprocess.Popen([PYTHON, "-m", f"bench.{module}", _spec_file(spec)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)

    def read_line(self, timeout: float) -> str:
        import selectors

        sel = selectors.DefaultSelector()
        out, err = self.proc.stdout, self.proc.stderr
        assert out is not None and err is not None  # both are pipes (see __init__)
        sel.register(out, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = out.readline()
                if not line:
                    break
                return line.strip()
            if self.proc.poll() is not None:
                break
        sel.close()
        raise RuntimeError(f"load generator silent or gone ({self.proc.poll()}): "
                           f"{err.read()[-400:] if self.proc.poll() is not None else ''}")

    def send(self, text: str = "go") -> None:
        stdin = self.proc.stdin
        assert stdin is not None  # a pipe (see __init__)
        stdin.write(text + "\n")
        stdin.flush()

    def finish(self, timeout: float = 60) -> dict:
        self.send()
        line = self.read_line(timeout)
        self.proc.wait(timeout)
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
