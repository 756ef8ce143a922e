"""keygate in its own process, for the benchmarks.

``python -m bench.gateway_proc -c keygate.yaml --devices devices.json --ready ready.json``

Builds the services exactly as ``keygate serve`` does (``proxy.app``), registers
the benchmark's devices in the store through ``OwnershipService`` (what the
ownership API does), then runs the listeners until SIGTERM. Running apart
from the orchestrator and the load generators means the gateway's CPU time
and memory can be read per process from ``/proc/<pid>``.

``ready.json`` gets the listening ports once everything accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
import sys
from pathlib import Path


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _register(services, devices: list[dict]) -> dict[str, str]:
    """Register each device for its owner; returns device id -> K1 (devices publish with it)."""
    from proxy.identity.model import Identity

    keys = {}
    for d in devices:
        owner = Identity(kind="user", sub=f"sub-{d['owner']}", username=d["owner"], method="token")
        # adopt: the stack made the entities in Orion first, as an operator would
        _, k1, _ = await services.ownership.register_device(owner, {"id": d["id"], "type": "Sensor"}, adopt=True)
        keys[d["id"]] = k1
    return keys


async def _main(args: argparse.Namespace) -> int:
    from proxy.app import build_services, run_services
    from proxy.config import load_config

    config = load_config(args.config)
    services = await build_services(config)
    devices = json.loads(Path(args.devices).read_text()) if args.devices else []
    keys = await _register(services, devices)
    if args.workers > 1:
        return await _supervise(args, config, services, keys)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def on_ready(_services, listeners) -> None:
        ready = {"pid": os.getpid(),
                 "mqtt_port": getattr(listeners.mqtt, "port", None),
                 "http_port": getattr(listeners.http, "port", None), "keys": keys}
        tmp = Path(args.ready + ".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.replace(args.ready)

    from proxy.app import close_services
    try:
        await run_services(config, stop=stop, services=services, on_ready=on_ready)
    finally:
        await close_services(services)
    return 0


async def _supervise(args: argparse.Namespace, config, services, keys: dict[str, str]) -> int:
    """``keygate serve --workers N`` after the registration: each worker loads the devices from the store."""
    from proxy.app import close_services
    from proxy.config import parse_hostport
    from proxy.workers import Supervisor, worker_argv

    await close_services(services)
    ready = {"pid": os.getpid(), "workers": args.workers, "keys": keys,
             "mqtt_port": parse_hostport(config.mqtt.listen)[1] if config.mqtt else None,
             "http_port": parse_hostport(config.http.listen)[1] if config.http else None}

    def on_ready() -> None:
        tmp = Path(args.ready + ".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.replace(args.ready)

    supervisor = Supervisor(worker_argv(str(Path(args.config).resolve()), "WARNING"), args.workers,
                            on_ready=on_ready,
                            metrics_listen=parse_hostport(config.metrics.listen) if config.metrics else None)
    return await supervisor.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("--devices", default="")
    parser.add_argument("--ready", required=True)
    parser.add_argument("--workers", type=int, default=1, help="keygate serve --workers N (default 1: in-process)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _raise_nofile()
    from proxy.app import install_uvloop
    install_uvloop()
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
