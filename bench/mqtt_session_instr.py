"""Instructions per message of the MQTT session's data path, for a load-independent
before/after check (wall time on a shared machine is noise; instruction counts are not).

Feeds ``count`` chunks of ``per_chunk`` cached QoS 0 PUBLISH packets through one open
:class:`~proxy.mqtt.session.Session` (the same session setup as :mod:`bench.mqtt_session_micro`)
on one side, nothing else. Run it under callgrind twice, with ``count`` N and 0, and divide the
difference by N * per_chunk: setup and interpreter start cancel out.

    PYTHONPATH=TREE valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/mqtt_session_instr.py client_to_broker 1 20000 [--full]
"""

from __future__ import annotations

import argparse

from bench.mqtt_session_micro import open_session
from proxy.mqtt import codec
from proxy.mqtt.packets import MQTT_5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("side", choices=("client_to_broker", "broker_to_client"))
    ap.add_argument("per_chunk", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--level", type=int, default=MQTT_5)
    args = ap.parse_args()
    packet = codec.encode_publish("devices/d1/telemetry", b"x" * 64, qos=0, level=args.level)
    chunk = memoryview(packet * args.per_chunk)
    client, broker = open_session(args.level)
    feed = client if args.side == "client_to_broker" else broker
    feed(chunk)  # warm the decision caches: a run of 0 pays the same setup
    for _ in range(args.count):
        feed(chunk)


if __name__ == "__main__":
    main()
