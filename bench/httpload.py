"""The HTTP load generator: ``wrk`` when installed, else a raw asyncio keep-alive client.

Both keep a fixed number of connections, each with one request in flight,
for a fixed time, and report requests per second, non-2xx answers and the
latency median. ``wrk`` (Debian package ``wrk``) is a C program and costs
the machine far less per request than any Python client, which matters on two
cores shared with the servers being measured; the built-in client needs
nothing installed (CI) and pre-encodes its request, so it is cheap too.

``python -m bench.httpload SPEC.json`` prints one JSON line. ``spec``:
``url``, ``method``, ``headers`` (dict), ``body`` (str), ``connections``,
``duration_s``, ``ca`` (for https), ``engine`` ("auto", "wrk" or "python").
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


# --------------------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def run_wrk(spec: dict) -> dict:
    lua = [f"wrk.method = {json.dumps(spec['method'])}"]
    if spec.get("body"):
        lua.append(f"wrk.body = {json.dumps(spec['body'])}")
    for k, v in spec.get("headers", {}).items():
        lua.append(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("\n".join(lua) + "\n")
        script = f.name
    threads = spec.get("threads", 1)
    cmd = ["wrk", f"-t{threads}", f"-c{spec['connections']}", f"-d{max(1, round(spec['duration_s']))}s",
           "--latency", "-s", script, spec["url"]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=spec["duration_s"] + 60).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p50 = re.search(r"50%\s+(\S+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    n = int(total.group(1)) if total else 0
    return {"engine": "wrk", "requests": n, "rate": float(rate.group(1)) if rate else 0.0,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "errors": sum(int(x) for x in errors.groups()) if errors else 0,
            "p50_ms": _ms(p50.group(1)) if p50 else float("nan"),
            "p99_ms": _ms(p99.group(1)) if p99 else float("nan"),
            "completed": n > 0, "raw": out[-600:] if not n else ""}


# --------------------------------------------------------------------------- built-in


class _Conn(asyncio.Protocol):
    """One keep-alive connection: send, read one full response, send again."""

    transport: asyncio.Transport  # set by connection_made, before anything is sent

    def __init__(self, request: bytes, state: dict[str, Any], stop_at: float, done: asyncio.Future[None]):
        self.request, self.state, self.stop_at, self.done = request, state, stop_at, done
        self.buf = bytearray()
        self.need: int | None = None    # body bytes still expected (content-length)
        self.chunked = False
        self.status = 0
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream connection's is an asyncio.Transport
        self._send()

    def _send(self) -> None:
        self.sent_at = time.perf_counter()
        self.transport.write(self.request)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.state["errors"] += 1 if time.perf_counter() < self.stop_at else 0
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            if self.need is None and not self.chunked:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                del buf[:end + 4]
                self.status = int(head[9:12])
                m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
                if m:
                    self.need = int(m.group(1))
                elif b"\r\ntransfer-encoding: chunked" in head:
                    self.chunked = True
                else:
                    self.need = 0
            if self.chunked:
                # Walk the chunks; the body ends with a zero-size chunk.
                pos = 0
                finished = False
                while True:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        break
                    size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                    if len(buf) < eol + 2 + size + 2:
                        break
                    pos = eol + 2 + size + 2
                    if size == 0:
                        finished = True
                        break
                if not finished:
                    return
                del buf[:pos]
                self.chunked = False
            else:
                assert self.need is not None  # the head set it, or chunked above
                if len(buf) < self.need:
                    return
                del buf[:self.need]
                self.need = None
            self._complete()
            if self.done.done():
                return

    def _complete(self) -> None:
        st = self.state
        st["requests"] += 1
        st["latencies"].append(time.perf_counter() - self.sent_at)
        if not 200 <= self.status < 300:
            st["non_2xx"] += 1
        self.need = None
        if time.perf_counter() >= self.stop_at:
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)
        else:
            self._send()


async def _run_python(spec: dict) -> dict:
    url = urlsplit(spec["url"])
    tls = url.scheme == "https"
    port = url.port or (443 if tls else 80)
    path = url.path + (f"?{url.query}" if url.query else "")
    body = spec.get("body", "").encode()
    headers = {"Host": url.netloc, "Connection": "keep-alive", **spec.get("headers", {})}
    if body:
        headers["Content-Length"] = str(len(body))
    request = (f"{spec['method']} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
               + "\r\n").encode() + body
    ctx = ssl.create_default_context(cafile=spec["ca"]) if tls else None
    loop = asyncio.get_running_loop()
    state: dict[str, Any] = {"requests": 0, "non_2xx": 0, "errors": 0, "latencies": []}
    conns = []
    start = time.perf_counter()
    stop_at = start + spec["duration_s"]
    for _ in range(spec["connections"]):
        done = loop.create_future()
        await loop.create_connection(lambda: _Conn(request, state, stop_at, done),  # noqa: B023 (called at once)
                                     url.hostname, port, ssl=ctx,
                                     server_hostname="localhost" if tls else None)
        conns.append(done)
    await asyncio.wait_for(asyncio.gather(*conns), spec["duration_s"] + 30)
    elapsed = time.perf_counter() - start
    lat = sorted(state["latencies"])
    return {"engine": "python", "requests": state["requests"], "rate": state["requests"] / elapsed,
            "non_2xx": state["non_2xx"], "errors": state["errors"],
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else float("nan"),
            "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else float("nan"),
            "completed": state["requests"] > 0}


def run(spec: dict) -> dict:
    engine = spec.get("engine", "auto")
    if engine == "wrk" or (engine == "auto" and wrk_available()):
        return run_wrk(spec)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_run_python(spec))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    try:
        result = run(spec)
    except Exception as exc:  # reported as data to the orchestrator
        result = {"completed": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
