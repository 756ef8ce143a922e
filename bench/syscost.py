"""The machine's system-call cost: a loopback TCP ping-pong round trip between two processes.

One round trip is two ``send`` and two ``recv`` calls and two wake-ups of a
sleeping process: the same kind of work every proxied request or relayed
message costs a gateway. Printed beside the ratios, it tells a reader a
slower machine (dearer system calls and wake-ups, as on some virtual
machines) from a slower gateway.

``python -m bench.syscost`` prints one JSON line: ``rtt_us`` (the median of
the batches), ``rtt_min_us``, ``round_trips``.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time

ROUND_TRIPS = 20_000
BATCHES = 5


def _echo(sock: socket.socket) -> None:
    """The child: echo one byte back until the parent closes."""
    conn, _ = sock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = conn.recv(1)
        if not data:
            break
        conn.sendall(data)
    conn.close()


def measure(round_trips: int = ROUND_TRIPS, batches: int = BATCHES) -> dict[str, float]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the echoing child
        try:
            _echo(listener)
        finally:
            os._exit(0)
    listener.close()
    client = socket.create_connection(("127.0.0.1", port))
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    per_batch = max(1, round_trips // batches)
    results = []
    try:
        for _ in range(200):  # warm up: both processes scheduled, caches filled
            client.sendall(b"x")
            client.recv(1)
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(per_batch):
                client.sendall(b"x")
                client.recv(1)
            results.append(1e6 * (time.perf_counter() - t0) / per_batch)
    finally:
        client.close()
        os.waitpid(pid, 0)
    return {"rtt_us": statistics.median(results), "rtt_min_us": min(results),
            "round_trips": float(per_batch * batches)}


def main() -> int:
    print(json.dumps(measure()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
