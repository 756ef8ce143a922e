"""Slow clients (slowloris) against the HTTP listener over TLS: what they can hold, and for how long.

Each attack is measured: how many connections it opened, when each was closed
(against ``http.header_timeout_seconds`` / ``http.body_timeout_seconds``), what
it was told, and how a legitimate client fared meanwhile. Before the deadlines,
aiohttp kept a half-sent head for its keep-alive timeout (3,630 s) and a
half-sent body for ever.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import pytest

from ownership.api import create_api_app
from proxy.http.gateway import HttpGateway
from proxy.tls import client_context
from tests.integration.http_rig import build_services, close_services, gateway_config
from tests.rig.ngsi_standin import NgsiStandin
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
SLACK = 3.0            # a loaded 2-core machine: the deadline fires on time, the reply may lag behind
N_SLOW = 100


@pytest.fixture
async def tls_gateway(tmp_path, oidc):
    pki = make_pki(tmp_path / "pki")
    standin = NgsiStandin()
    await standin.start()
    config = gateway_config(standin.url, tmp_path, tls={"cert": str(pki.server_cert), "key": str(pki.server_key)},
                            header_timeout_seconds=HEADER_TIMEOUT, body_timeout_seconds=BODY_TIMEOUT)
    services, tokens = await build_services(config, oidc)
    alice = await services.tokens.validate(tokens["alice"])
    await services.ownership.register_device(alice, {"id": "a-1", "type": "Thermometer"})
    standin.tenant("").entities["a-1"] = {"id": "a-1", "type": "Thermometer"}
    gateway = HttpGateway(services, create_api_app(services))
    await gateway.start()
    try:
        yield gateway, standin, tokens, client_context(pki.ca)
    finally:
        await gateway.stop()
        await close_services(services)
        await standin.stop()


async def _open(port: int, ctx: ssl.SSLContext | None):
    return await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost" if ctx else None)


async def _until_closed(reader: asyncio.StreamReader, started: float) -> tuple[float, bytes]:
    """Read until the server closes; (seconds from ``started``, what it sent)."""
    data = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), HEADER_TIMEOUT + BODY_TIMEOUT + 2 * SLACK)
            if not chunk:
                break
            data += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return time.monotonic() - started, data


async def _slow_head(port: int, ctx: ssl.SSLContext) -> tuple[float, bytes]:
    reader, writer = await _open(port, ctx)
    try:
        writer.write(b"GET /v2/entities/a-1 HTTP/1.1\r\nHost: x\r\n")   # ... and never the blank line
        await writer.drain()
        return await _until_closed(reader, time.monotonic())
    finally:
        writer.close()


async def _legit_get(port: int, ctx: ssl.SSLContext, token: str) -> tuple[float, int]:
    started = time.monotonic()
    reader, writer = await _open(port, ctx)
    try:
        writer.write(f"GET /v2/entities/a-1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     "Connection: close\r\n\r\n".encode())
        await writer.drain()
        _, data = await _until_closed(reader, started)
    finally:
        writer.close()
    return time.monotonic() - started, int(data.split(b" ", 2)[1])


async def test_slow_headers_over_tls_are_closed_at_the_deadline_and_others_are_served(tls_gateway):
    gateway, _, tokens, ctx = tls_gateway
    attack = [asyncio.create_task(_slow_head(gateway.port, ctx)) for _ in range(N_SLOW)]
    held = 0
    for _ in range(20):   # the TLS handshakes take a while on a loaded machine
        held = max(held, len(gateway.connections()))
        if held == N_SLOW:
            break
        await asyncio.sleep(HEADER_TIMEOUT / 30)
    legit_seconds, legit_status = await _legit_get(gateway.port, ctx, tokens["alice"])
    results = await asyncio.gather(*attack)
    closed_after = sorted(seconds for seconds, _ in results)
    print(f"\nslow-header attack: {N_SLOW} TLS connections, {held} held at once; closed after "
          f"{closed_after[0]:.2f}..{closed_after[-1]:.2f} s (header_timeout {HEADER_TIMEOUT} s); "
          f"legitimate request meanwhile: {legit_status} in {legit_seconds * 1000:.0f} ms")
    assert legit_status == 200 and legit_seconds < HEADER_TIMEOUT
    assert held >= N_SLOW * 0.9
    # closed at the deadline, not before and not much after
    assert closed_after[0] >= HEADER_TIMEOUT * 0.9
    assert closed_after[-1] <= HEADER_TIMEOUT + SLACK
    for _, reply in results:
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:80]
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "RequestTimeout"
    for _ in range(50):   # nothing of the attack is left on the server
        if not gateway.connections():
            break
        await asyncio.sleep(0.1)
    assert len(gateway.connections()) == 0


async def test_a_silent_connection_and_a_stalled_tls_handshake_are_closed_without_a_word(tls_gateway):
    gateway, _, _, ctx = tls_gateway
    reader, writer = await _open(gateway.port, ctx)           # TLS done, then nothing
    raw_reader, raw_writer = await _open(gateway.port, None)   # TCP only: the handshake never starts
    started = time.monotonic()
    try:
        (silent, said), (no_tls, raw_said) = await asyncio.gather(_until_closed(reader, started),
                                                                  _until_closed(raw_reader, started))
    finally:
        writer.close()
        raw_writer.close()
    print(f"\nidle TLS connection closed after {silent:.2f} s, stalled handshake after {no_tls:.2f} s "
          f"(header_timeout {HEADER_TIMEOUT} s)")
    assert said == b"" and raw_said == b""
    for seconds in (silent, no_tls):
        assert HEADER_TIMEOUT * 0.9 <= seconds <= HEADER_TIMEOUT + SLACK


async def _slow_body(port: int, ctx: ssl.SSLContext, head: str) -> tuple[float, bytes]:
    reader, writer = await _open(port, ctx)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + b'{"entities": [')   # of 200 bytes
        await writer.drain()
        return await _until_closed(reader, time.monotonic())
    finally:
        writer.close()


@pytest.mark.parametrize("path,body_read", [
    ("/v2/op/update", "read whole by the gateway"),
    ("/v2/entities/a-1/attrs", "streamed on to Orion"),
])
async def test_slow_body_is_answered_408_at_the_deadline(tls_gateway, path, body_read):
    gateway, standin, tokens, ctx = tls_gateway
    method = "POST" if path == "/v2/op/update" else "PATCH"
    head = (f"{method} {path} HTTP/1.1\nHost: x\nAuthorization: Bearer {tokens['alice']}\n"
            "Content-Type: application/json\nContent-Length: 200")
    seconds, reply = await _slow_body(gateway.port, ctx, head)
    print(f"\nslow body ({body_read}): 408 after {seconds:.2f} s (body_timeout {BODY_TIMEOUT} s)")
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "RequestTimeout"
    assert BODY_TIMEOUT * 0.9 <= seconds <= BODY_TIMEOUT + SLACK
    assert not [r for r in standin.recorded if r.method == method]   # Orion never saw a half body as a request


async def test_slow_body_on_the_ownership_api_is_answered_408_in_its_shape(tls_gateway):
    gateway, _, tokens, ctx = tls_gateway
    head = (f"POST /api/v1/devices HTTP/1.1\nHost: x\nAuthorization: Bearer {tokens['alice']}\n"
            "Content-Type: application/json\nContent-Length: 200")
    seconds, reply = await _slow_body(gateway.port, ctx, head)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "request_timeout" and "message" in error
    assert BODY_TIMEOUT * 0.9 <= seconds <= BODY_TIMEOUT + SLACK
