"""Instructions per authorized NGSI request inside keygate's process (callgrind), for a
load-independent before/after check of the HTTP data path; ``python -m bench``'s HTTP rows give
CPU time, which this slow, shared 2-core machine spreads by ±10% between runs of the same tree.

keygate runs as in the benchmark (:mod:`bench.gateway_proc` over the bench stack's token issuer,
NGSI-v2 stand-in and ownership store), but under ``valgrind --tool=callgrind`` with counting off.
``CONNECTIONS`` TLS keep-alive connections send the same request each, all in flight together (as
wrk keeps its connections busy, so a turn of the loop serves several), for a warm-up and then for
``count`` requests with counting on; everything keygate executes for them is counted (TLS, the
lean server, the checks, the upstream client, the audit and metrics flushes), nothing of the
client's or the stand-in's. Needs valgrind (``apt-get install valgrind``); a run takes about a minute.

    python -m bench.http_instr [--count 1200] [--cases GET,PATCH] [--out DIR]

prints instructions per request for GET /v2/entities/{id} and PATCH /v2/entities/{id}/attrs.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from bench.stack import OWNER, PYTHON, REPO, new_stack

CONNECTIONS = 12
WARM_UP = 50   # requests per connection before counting starts


def _requests(device: str, other: str, token: str) -> dict[str, bytes]:
    body = json.dumps({"temperature": {"type": "Number", "value": 21.5}}).encode()
    common = f"Host: keygate\r\nAccept: application/json\r\nAuthorization: Bearer {token}\r\n"
    return {
        "GET": f"GET /v2/entities/{device} HTTP/1.1\r\n{common}\r\n".encode(),
        "PATCH": (f"PATCH /v2/entities/{other}/attrs HTTP/1.1\r\n{common}Content-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body,
    }


def _answer(sock: ssl.SSLSocket) -> None:
    """Reads one answer (with a Content-Length, as keygate frames Orion's) and checks it is a 2xx."""
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            raise RuntimeError("keygate closed the connection")
        buf += data
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            found = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
            if len(rest) >= (int(found.group(1)) if found else 0):
                if not head.startswith(b"HTTP/1.1 2"):
                    raise RuntimeError(f"keygate answered {head[:60]!r}")
                return


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def _total(path: Path) -> int:
    totals = next(line for line in path.read_text().splitlines() if line.startswith("totals:"))
    return int(totals.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1200, help="requests counted per case")
    parser.add_argument("--out", default=None, help="where callgrind's files go (default: a temp folder)")
    parser.add_argument("--cases", default="GET,PATCH", help="which requests, comma-separated")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="keygate-http-instr-")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    stack = new_stack(keep=False)
    from tests.rig.pki import make_pki

    stack.pki = make_pki(stack.workdir / "pki")
    stack.issuer.start()
    stack._start_broker()
    stack._start_standin()
    config = stack.keygate_config(http=True, hardened=False)
    ready = config.parent / "ready.json"
    with open(config.parent / "keygate.log", "ab") as log:
        keygate = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/keygate.%p",
             PYTHON, "-m", "bench.gateway_proc", "-c", str(config), "--devices", str(config.parent / "devices.json"),
             "--ready", str(ready), "--workers", "1"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    results: dict[str, float] = {}
    try:
        started = time.monotonic()
        while not ready.exists():
            if keygate.poll() is not None or time.monotonic() - started > 600:
                raise RuntimeError("keygate did not start under valgrind: " + stack.keygate_log_tail())
            time.sleep(0.2)
        port = json.loads(ready.read_text())["http_port"]
        context = ssl.create_default_context(cafile=str(stack.pki.ca))
        context.check_hostname = False
        socks = [context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
                 for _ in range(CONNECTIONS)]
        rounds = max(1, args.count // CONNECTIONS)
        wanted = _requests(stack.device(2), stack.device(3), stack.token(OWNER))
        for case, raw in ((c, wanted[c]) for c in args.cases.split(",")):
            for n in (WARM_UP, rounds):
                if n == rounds:
                    _control("-z", str(keygate.pid))
                    _control("-i", "on", str(keygate.pid))
                for _ in range(n):
                    for sock in socks:
                        sock.sendall(raw)
                    for sock in socks:
                        _answer(sock)
            time.sleep(1.0)   # the last turn's flush of the audit lines and metrics
            _control("-i", "off", str(keygate.pid))
            _control("-d", case, str(keygate.pid))
            dump = out / f"keygate.{keygate.pid}.{len(results) + 1}"   # callgrind numbers its dumps
            results[case] = _total(dump) / (rounds * CONNECTIONS)
        for sock in socks:
            sock.close()
    finally:
        keygate.terminate()
        keygate.wait(60)
        if stack.standin is not None:
            stack.standin.terminate()
        if stack.broker is not None:
            stack.broker.stop()
        stack.issuer.stop()
    for case, per_request in results.items():
        print(f"{case:5} {per_request:10,.0f} instructions per request ({args.count} requests, "
              f"{CONNECTIONS} connections)")
    print(f"callgrind files: {out}")


if __name__ == "__main__":
    main()
