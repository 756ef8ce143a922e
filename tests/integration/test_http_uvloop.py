"""The HTTP listener on uvloop (what ``keygate serve`` installs), over TLS: the lean server takes
NGSI requests (uvloop's TLS transport is not an ``asyncio.Transport``), hands the ownership API
to aiohttp's server in the middle of a keep-alive connection, reads bodies, and keeps the head
deadline."""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest
import uvloop

from ownership.api import create_api_app
from proxy.http.gateway import HttpGateway
from proxy.tls import client_context
from tests.integration.http_rig import build_services, close_services, gateway_config
from tests.rig.ngsi_standin import NgsiStandin
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 1.0


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return int(head.split(b" ", 2)[1]), await reader.readexactly(length)


async def _exercise(gateway: HttpGateway, ctx: ssl.SSLContext, token: str) -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    auth = f"Host: k\r\nAuthorization: Bearer {token}\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port, ssl=ctx, server_hostname="localhost")
    try:
        body = b'{"temperature":{"type":"Number","value":3}}'
        writer.write(f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}\r\n".encode()
                     + f"PATCH /v2/entities/a-1/attrs HTTP/1.1\r\n{auth}Content-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        status, answer = await _read_answer(reader)
        assert status == 200 and json.loads(answer)["id"] == "a-1"
        writer.write(body[10:])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 204 ")
        served = gateway.lean_connections.served
        assert served == 2 and gateway.lean_connections.handed_over == 0
        writer.write(f"GET /api/v1/devices HTTP/1.1\r\n{auth}\r\n".encode())
        status, answer = await _read_answer(reader)
        assert status == 200 and [d["id"] for d in json.loads(answer)["devices"]] == ["a-1"]
        assert gateway.lean_connections.handed_over == 1
        writer.write(f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}Connection: close\r\n\r\n".encode())
        status, _ = await _read_answer(reader)   # served by aiohttp now, on the same connection
        assert status == 200 and gateway.lean_connections.served == served
    finally:
        writer.close()
    # A head that never ends: the 408 at the deadline.
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port, ssl=ctx, server_hostname="localhost")
    try:
        writer.write(b"GET /v2/entities/a-1 HTTP/1.1\r\nHost: k\r\n")
        status, answer = await _read_answer(reader)
        assert status == 408 and json.loads(answer)["error"] == "RequestTimeout"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


def test_the_lean_server_runs_on_uvloop_over_tls(tmp_path, oidc):
    async def main() -> None:
        pki = make_pki(tmp_path / "pki")
        standin = NgsiStandin()
        await standin.start()
        config = gateway_config(standin.url, tmp_path, tls={"cert": str(pki.server_cert), "key": str(pki.server_key)},
                                header_timeout_seconds=HEADER_TIMEOUT)
        services, tokens = await build_services(config, oidc)
        alice = await services.tokens.validate(tokens["alice"])
        await services.ownership.register_device(alice, {"id": "a-1", "type": "Thermometer"})
        standin.tenant("").entities["a-1"] = {"id": "a-1", "type": "Thermometer",
                                              "temperature": {"type": "Number", "value": 1, "metadata": {}}}
        gateway = HttpGateway(services, create_api_app(services))
        await gateway.start()
        try:
            await _exercise(gateway, client_context(pki.ca), tokens["alice"])
        finally:
            await gateway.stop()
            await close_services(services)
            await standin.stop()

    uvloop.run(main())
