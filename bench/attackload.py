"""The attackers of the "under attack" scenario (issue 14), in their own process.

``python -m bench.attackload SPEC.json`` runs every attack the spec names as
asyncio tasks against one keygate, all on loopback, each from its own source
addresses in 127.0.0.2-127.0.0.254 (all of 127.0.0.0/8 is loopback on Linux),
so that keygate's per-address limits meet them as they would meet a botnet in
the field while the legitimate client keeps 127.0.0.1 to itself.

Every attack is bounded in connections and in time: it keeps at most its
``connections`` open (reopening what keygate closes, after a short pause) or
paces itself at ``rate`` attempts per second with at most ``in_flight``
pending, and everything stops at ``max_seconds`` even if nobody says so.
The process prints ``READY`` once the holding attacks have had ``ramp_s`` to
open their connections, then runs until a line arrives on stdin (or
``max_seconds``), closes everything and prints one JSON line of counts per
attack.

Attacks (``spec["attacks"]``, a dict name -> settings):

* ``slowloris_tls``: TLS to the MQTT listener, the start of a CONNECT that
  declares ``declared`` bytes, ``initial`` of them sent at once, then one more
  byte every ``trickle_s`` (memory held before authentication);
* ``slowloris_ws``: TLS to the WebSocket listener, ``GET /mqtt HTTP/1.1`` and a
  Host line, then one header line every ``trickle_s`` (the upgrade never ends);
* ``connect_flood``: new TLS connections at ``rate``/s, each with one bad
  CONNECT (a wrong token, an oversized client id, a CONNECT declared far over
  the pre-authentication size), waiting for keygate's answer or close;
* ``unsubscribe_flood``: signed-in clients (their own tokens) sending
  UNSUBSCRIBEs of ``filters`` filters of ``filter_bytes`` bytes every
  ``interval_s``; reconnect when keygate disconnects them;
* ``subscribe_flood``: signed-in clients sending SUBSCRIBEs of distinct long
  filters on devices they do not own (denied, audited) every ``interval_s``;
* ``http_slow_headers``: TLS to the HTTP listener, a request line and one
  header line every ``trickle_s``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import ssl
import struct
import sys
import time

from bench.mqttload import _fixed, _str, _varint, connect_packet, run_main

PAUSE_AFTER_CLOSE_S = 0.2  # before a holding attacker reopens what keygate closed


class Stats:
    def __init__(self) -> None:
        self.attempts = 0
        self.established = 0      # TCP and TLS done (the attack's bytes could be sent)
        self.refused = 0          # closed or reset before TLS completed (e.g. refused at accept)
        self.closed_by_keygate = 0  # closed after the attack started sending
        self.open = 0
        self.peak_open = 0
        self.answers: dict[str, int] = {}

    def opened(self) -> None:
        self.established += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)

    def answer(self, what: str) -> None:
        self.answers[what] = self.answers.get(what, 0) + 1

    def as_dict(self) -> dict:
        return {"attempts": self.attempts, "established": self.established, "refused": self.refused,
                "closed_by_keygate": self.closed_by_keygate, "open_at_end": self.open,
                "peak_open": self.peak_open, "answers": self.answers}


def addresses(first: int, count: int) -> list[str]:
    return [f"127.0.0.{2 + (first + k) % 253}" for k in range(count)]


class Attack:
    def __init__(self, name: str, cfg: dict, spec: dict, stop: asyncio.Event):
        self.name, self.cfg, self.spec, self.stop = name, cfg, spec, stop
        self.stats = Stats()
        self.addrs = addresses(cfg.get("first_address", 0), cfg.get("addresses", 1))
        self.ctx = ssl.create_default_context(cafile=spec["ca"])

    async def open(self, port: int, slot: int):
        """One TLS connection from this attack's next source address, or None when refused."""
        self.stats.attempts += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.spec["host"], port, ssl=self.ctx, server_hostname="localhost",
                local_addr=(self.addrs[slot % len(self.addrs)], 0)), 5.0)
        except (TimeoutError, OSError, ssl.SSLError):
            self.stats.refused += 1
            return None
        self.stats.opened()
        return reader, writer

    async def sleep_or_stop(self, seconds: float) -> bool:
        """True when the attack is over."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
            return True
        except TimeoutError:
            return False

    async def hold(self, slot: int, port: int, first: bytes, trickle: bytes) -> None:
        """Open, send ``first``, then ``trickle`` every ``trickle_s`` until the stop; reopen when closed."""
        while not self.stop.is_set():
            conn = await self.open(port, slot)
            if conn is None:
                if await self.sleep_or_stop(PAUSE_AFTER_CLOSE_S):
                    return
                continue
            reader, writer = conn
            closed = False
            try:
                writer.write(first)
                await writer.drain()
                while not self.stop.is_set():
                    read = asyncio.ensure_future(reader.read(65536))
                    stopped = asyncio.ensure_future(self.stop.wait())
                    done, _ = await asyncio.wait({read, stopped}, timeout=self.cfg.get("trickle_s", 1.0),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    stopped.cancel()
                    if read in done:
                        data = read.result()
                        if not data:
                            closed = True
                            break
                        self.stats.answer("bytes back")
                        continue
                    read.cancel()
                    if self.stop.is_set():
                        break
                    writer.write(trickle)
                    await writer.drain()
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                closed = True
            finally:
                self.stats.open -= 1
                writer.transport.abort()
            if closed:
                self.stats.closed_by_keygate += 1
                if await self.sleep_or_stop(PAUSE_AFTER_CLOSE_S):
                    return

    async def paced(self, one) -> None:
        """``one(k)`` at ``rate`` per second, at most ``in_flight`` at a time."""
        rate = self.cfg["rate"]
        sem = asyncio.Semaphore(self.cfg.get("in_flight", 100))
        tasks: set[asyncio.Task] = set()
        start = time.monotonic()
        k = 0
        while not self.stop.is_set():
            due = int((time.monotonic() - start) * rate)
            while k < due and not self.stop.is_set():
                if sem.locked():
                    self.stats.answer("skipped: in flight at the cap")
                    k = due
                    break
                await sem.acquire()
                task = asyncio.ensure_future(one(k))
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: sem.release())
                tasks.add(task)
                k += 1
            await self.sleep_or_stop(0.005)
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --------------------------------------------------------------------------- the attacks


def partial_connect(declared: int, initial: int) -> tuple[bytes, bytes]:
    """The fixed header of a CONNECT of ``declared`` bytes (a short client id and user name, a long
    password, as a large token would be) and the first ``initial`` bytes of its body."""
    fields = _str(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60) + _str(b"slow") + _str(b"bench")
    password_len = declared - len(fields) - 2
    body_start = fields + struct.pack("!H", password_len)
    head = b"\x10" + _varint(declared) + body_start
    return head + b"e" * max(0, initial - len(body_start)), b"e"


async def slowloris_tls(a: Attack) -> None:
    first, trickle = partial_connect(a.cfg.get("declared", 30000), a.cfg.get("initial", 28000))
    await asyncio.gather(*(a.hold(k, a.spec["mqtt_port"], first, trickle) for k in range(a.cfg["connections"])))


async def slowloris_ws(a: Attack) -> None:
    first = b"GET /mqtt HTTP/1.1\r\nHost: x\r\n"
    await asyncio.gather(*(a.hold(k, a.spec["ws_port"], first, b"X-Slow: 1\r\n")
                           for k in range(a.cfg["connections"])))


async def http_slow_headers(a: Attack) -> None:
    first = b"GET /v2/entities HTTP/1.1\r\nHost: x\r\n"
    await asyncio.gather(*(a.hold(k, a.spec["http_port"], first, b"X-Slow: 1\r\n")
                           for k in range(a.cfg["connections"])))


def bad_connects(token: str) -> list[tuple[str, bytes]]:
    return [
        ("wrong token", connect_packet("flood", "bench", token[:-8] + "AAAAAAAA")),
        ("client id over the limit", connect_packet("c" * 2000, "bench", token)),
        ("declared over the pre-auth size", b"\x10" + _varint(1_000_000) + _str(b"MQTT") + bytes([4, 2, 0, 60])
         + b"\x00" * 4000),
        ("garbage", b"\x10\x05\x00\x04MQTX"),
    ]


async def connect_flood(a: Attack) -> None:
    kinds = bad_connects(a.spec["tokens"][0])

    async def one(k: int) -> None:
        conn = await a.open(a.spec["mqtt_port"], k)
        if conn is None:
            return
        reader, writer = conn
        what, packet = kinds[k % len(kinds)]
        try:
            writer.write(packet)
            data = await asyncio.wait_for(reader.read(16), 3.0)
            a.stats.answer(f"{what}: " + (f"CONNACK {data[3]:#04x}" if len(data) >= 4 and data[0] == 0x20 else
                                          "closed" if not data else "other"))
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            a.stats.answer(f"{what}: {type(exc).__name__}")
        finally:
            a.stats.open -= 1
            writer.transport.abort()
    await a.paced(one)


async def signed_in(a: Attack, slot: int):
    """A signed-in attacker (its own token); None when keygate would not take it."""
    conn = await a.open(a.spec["mqtt_port"], slot)
    if conn is None:
        return None
    reader, writer = conn
    tokens = a.spec["tokens"]
    writer.write(connect_packet(f"{a.name}-{slot}-{a.stats.attempts}", "bench", tokens[slot % len(tokens)]))
    try:
        head = await asyncio.wait_for(reader.readexactly(4), 5.0)
    except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
        head = b""
    if len(head) < 4 or head[0] != 0x20 or head[3] != 0:
        a.stats.answer("CONNECT refused")
        a.stats.open -= 1
        writer.transport.abort()
        return None
    return reader, writer


async def flood_loop(a: Attack, slot: int, packet_for) -> None:
    """Signed in, one packet every ``interval_s``; reconnect (after a pause) when keygate closes."""
    k = 0
    while not a.stop.is_set():
        conn = await signed_in(a, slot)
        if conn is None:
            if await a.sleep_or_stop(PAUSE_AFTER_CLOSE_S):
                return
            continue
        reader, writer = conn
        drain_task = asyncio.ensure_future(_discard(reader))
        try:
            while not a.stop.is_set() and not drain_task.done():
                writer.write(packet_for(slot, k))
                k += 1
                a.stats.answer("packets sent")
                await writer.drain()
                if await a.sleep_or_stop(a.cfg.get("interval_s", 0.05)):
                    break
        except (OSError, ssl.SSLError):
            pass
        finally:
            closed = drain_task.done()
            drain_task.cancel()
            a.stats.open -= 1
            writer.transport.abort()
        if closed:
            a.stats.closed_by_keygate += 1
            if await a.sleep_or_stop(PAUSE_AFTER_CLOSE_S):
                return


async def _discard(reader: asyncio.StreamReader) -> None:
    try:
        while await reader.read(65536):
            pass
    except (OSError, ssl.SSLError):
        pass


def long_filters(prefix: str, n: int, size: int, salt: str) -> list[bytes]:
    return [(f"{prefix}/{salt}-{j}-".encode() + os.urandom(size).hex().encode())[:size] for j in range(n)]


async def unsubscribe_flood(a: Attack) -> None:
    n, size = a.cfg.get("filters", 16), a.cfg.get("filter_bytes", 1000)

    def packet(slot: int, k: int) -> bytes:
        body = struct.pack("!H", k % 65535 + 1) + b"".join(_str(f) for f in long_filters("x", n, size, f"{slot}"))
        return _fixed(0xA2, body)
    await asyncio.gather(*(flood_loop(a, s, packet) for s in range(a.cfg["connections"])))


async def subscribe_flood(a: Attack) -> None:
    n, size = a.cfg.get("filters", 8), a.cfg.get("filter_bytes", 1000)
    devices = a.spec.get("victim_devices") or ["bench-0"]

    def packet(slot: int, k: int) -> bytes:
        fs = long_filters(f"devices/{devices[(slot + k) % len(devices)]}", n, size, f"{slot}-{k}")
        if a.cfg.get("oversized_bytes"):
            fs.append(b"devices/" + b"z" * a.cfg["oversized_bytes"])
        body = struct.pack("!H", k % 65535 + 1) + b"".join(_str(f) + b"\x00" for f in fs)
        return _fixed(0x82, body)
    await asyncio.gather(*(flood_loop(a, s, packet) for s in range(a.cfg["connections"])))


ATTACKS = {"slowloris_tls": slowloris_tls, "slowloris_ws": slowloris_ws, "connect_flood": connect_flood,
           "unsubscribe_flood": unsubscribe_flood, "subscribe_flood": subscribe_flood,
           "http_slow_headers": http_slow_headers}


async def run(spec: dict) -> dict:
    stop = asyncio.Event()
    attacks = [Attack(name, cfg, {**spec, "tokens": cfg.get("tokens") or spec.get("tokens", [])}, stop)
               for name, cfg in spec["attacks"].items()]
    tasks = [asyncio.ensure_future(ATTACKS[a.name](a)) for a in attacks]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.sleep(spec.get("ramp_s", 1.0))
    print(json.dumps({"ready": {a.name: a.stats.open for a in attacks}}), flush=True)
    line = loop.run_in_executor(None, sys.stdin.readline)
    try:
        await asyncio.wait_for(asyncio.shield(line), max(0.0, spec.get("max_seconds", 60) - (loop.time() - t0)))
    except TimeoutError:
        pass
    held = {a.name: a.stats.open for a in attacks}
    stop.set()
    await asyncio.wait(tasks, timeout=10)
    for t in tasks:
        if not t.done():
            t.cancel()
    errors = [repr(t.exception()) for t in tasks if t.done() and not t.cancelled() and t.exception()]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"elapsed_s": loop.time() - t0, "held_at_stop": held, "cpu_s": usage.ru_utime + usage.ru_stime,
            "attacks": {a.name: a.stats.as_dict() for a in attacks}, "errors": errors,
            "completed": not errors}


def main(argv: list[str] | None = None) -> int:
    # Connections keygate resets are the point here, not news: asyncio would log each one, and
    # nobody reads this process's stderr while it runs.
    return run_main(run, argv, quiet_asyncio=True)


if __name__ == "__main__":
    sys.exit(main())
