"""Cost of the ownership read path and of a device key check, in microseconds.

``python -m bench.bench_ownership [--devices N] [--seconds S] [--json]``

Opens an SQLCipher store in a temporary folder, registers N devices (a tenth
public, a third with a delegation) through :class:`OwnershipService`, then
times each as the median and the best of several rounds (the best is the
least disturbed by other processes on a shared machine):

- ``facts.device`` (cached): the in-memory lookup every PUBLISH and HTTP request makes;
- ``store.get_device`` (uncached): the same device read from the encrypted
  database on the store thread (query + decryption of the touched pages);
- ``load_device`` (uncached, from the event loop): the above plus the hop to
  the store thread and back, what a gateway would pay without the cache;
- ``readable_devices``: the listing filter for one user;
- ``authenticate_device_key``: a correct key, a wrong key, an unknown device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ownership.service import OwnershipService
from proxy.audit import AuditLog
from proxy.config import load_config_text
from proxy.identity.model import AuthError, Identity

ROUNDS = 5


def _time_sync(fn: Callable[[str], Any], ids: list[str], seconds: float) -> tuple[float, float]:
    """(median, best) µs per call of ``fn(id)`` over ROUNDS rounds, each a tight loop over ``ids``."""
    def batch() -> float:
        t0 = time.perf_counter()
        for device_id in ids:
            fn(device_id)
        return time.perf_counter() - t0

    per_batch = batch()
    repeats = max(1, int(seconds / ROUNDS / max(per_batch, 1e-6)))
    results = []
    for _ in range(ROUNDS):
        total = sum(batch() for _ in range(repeats))
        results.append(total / (repeats * len(ids)) * 1e6)
    return statistics.median(results), min(results)


async def _time_async(fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    results = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(calls):
            await fn()
        results.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(results), min(results)


async def measure(devices: int = 10_000, seconds: float = 1.0) -> dict[str, Any]:
    """Figure name -> (median µs, best µs), plus "devices"."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config_text(
            "oidc: {issuer: 'https://issuer.bench'}\n"
            f"store: {{path: '{Path(tmp) / 'ownership.db'}', key: '${{K}}'}}\n"
            f"ownership: {{max_devices_per_user: {devices}}}\n",
            env={"K": "bench store key"})
        service = await OwnershipService.open(config, audit=AuditLog.null())
        try:
            users = [Identity(kind="user", sub=f"sub-u{i}", username=f"u{i}", method="token") for i in range(100)]
            for user in users:  # each has signed in once, so a delegation can name them
                await service.remember_user(user)
            keys: dict[str, str] = {}
            for i in range(devices):
                owner = users[i % len(users)]
                device_id = f"urn:ngsi-ld:Sensor:{i:06d}"
                _, k1, _ = await service.register_device(owner, {"id": device_id, "type": "Sensor",
                                                                 "public": i % 10 == 0, "name": f"sensor {i}"})
                keys[device_id] = k1
                if i % 3 == 0:
                    await service.create_delegation(owner, device_id, users[(i + 1) % len(users)].username,
                                                    "read")
            ids = list(keys)
            rng = random.Random(7)
            probe = [rng.choice(ids) for _ in range(1000)]
            unknown = [f"no-such-device-{i}" for i in range(1000)]
            facts = service.facts
            store = service._store
            out: dict[str, Any] = {"devices": devices}
            out["facts.device (cached)"] = _time_sync(facts.device, probe, seconds)
            out["facts.device, unknown id (cached)"] = _time_sync(facts.device, unknown, seconds)
            # The store's connection belongs to its thread: time the uncached read there.
            out["store.get_device (uncached, store thread)"] = await service._run(
                _time_sync, store.get_device, probe[:200], seconds)
            it = iter(probe * 3)
            out["load_device (uncached, via event loop)"] = await _time_async(
                lambda: service.load_device(next(it)), 500)
            out["readable_devices (one user)"] = _time_sync(
                lambda _: facts.readable_devices("u1", "sub-u1"), probe[:100], seconds)

            def right_key(device_id: str) -> None:
                service.check_device_key(device_id, keys[device_id])

            def wrong_key(device_id: str) -> None:
                try:
                    service.check_device_key(device_id, "x" * 43)
                except AuthError:
                    pass

            out["device key check: right key"] = _time_sync(right_key, probe, seconds)
            out["device key check: wrong key"] = _time_sync(wrong_key, probe, seconds)
            out["device key check: unknown device"] = _time_sync(wrong_key, unknown, seconds)
            out["(reference) one HMAC-SHA256 of a 43-byte key"] = _time_sync(
                lambda k: service.hash_key(k), [keys[d] for d in probe], seconds)
            return out
        finally:
            await service.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_ownership", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10_000, help="devices in the store (default 10000)")
    p.add_argument("--seconds", type=float, default=1.0, help="timing per figure (default 1.0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    results = asyncio.run(measure(args.devices, args.seconds))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"ownership read path, {results.pop('devices')} devices; µs per call over {ROUNDS} rounds")
    print(f"  {'':<46} {'median':>8} {'best':>8}")
    for name, (median, best) in results.items():
        print(f"  {name:<46} {median:8.2f} {best:8.2f}")
    print(f"(total {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
