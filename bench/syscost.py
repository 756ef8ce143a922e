"""The machine's system-call cost: a loopback TCP ping-pong round trip between two processes.

One round trip is two ``send`` and two ``recv`` calls and two wake-ups of a
sleeping process: the same kind of work every proxied request or relayed
message costs a gateway. Printed beside the ratios, it tells a reader a
slower machine (dearer system calls and wake-ups, as on some virtual
machines) from a slower gateway.

The cost depends on where the two processes run: on one CPU a round trip is
two context switches; across CPUs each wake-up is an inter-processor
interrupt, which on a virtual machine can cost ten times more. Both are
measured (pinned with ``sched_setaffinity``), and once unpinned as the
benchmark's processes run.

``python -m bench.syscost`` prints one JSON line: ``rtt_us`` (unpinned),
``same_cpu_rtt_us``, ``cross_cpu_rtt_us`` (each the median of its batches;
the latter only with two CPUs or more), ``round_trips`` per measurement.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time

ROUND_TRIPS = 10_000
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
    cpus = sorted(os.sched_getaffinity(0))
    out = {"rtt_us": _round_trip(round_trips, batches, None, None),
           "same_cpu_rtt_us": _round_trip(round_trips, batches, cpus[0], cpus[0]),
           "round_trips": float(round_trips // batches * batches)}
    if len(cpus) > 1:
        out["cross_cpu_rtt_us"] = _round_trip(round_trips, batches, cpus[0], cpus[1])
    return out


def _round_trip(round_trips: int, batches: int, parent_cpu: int | None, child_cpu: int | None) -> float:
    """The median µs per round trip, the parent and the child on the CPUs given (None: anywhere)."""
    allowed = os.sched_getaffinity(0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # the echoing child
        try:
            if child_cpu is not None:
                os.sched_setaffinity(0, {child_cpu})
            _echo(listener)
        finally:
            os._exit(0)
    listener.close()
    if parent_cpu is not None:
        os.sched_setaffinity(0, {parent_cpu})
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
        os.sched_setaffinity(0, allowed)
    return statistics.median(results)


def main() -> int:
    print(json.dumps(measure()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
