"""The lean server against aiohttp's: the same bytes from clients give the same bytes to Orion
and the same bytes back (``Date`` aside).

Two gateways on the same services, both on the lean upstream client, one on each server, in
front of the differential test's recording upstream. The requests are those of the client
differential test (header, path and smuggling defences), and the ones that exercise the
server itself: keep-alive and pipelined sequences, bodies (in one piece, in pieces, over the
cap), heads the lean server hands to aiohttp (the ownership API, dot segments and encodings
that route elsewhere, HTTP/1.0, chunked, a bare LF, obs-fold, repeated Content-Length,
absolute form, lower-case and unknown methods), and a hand-over in the middle of a connection.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from ownership.api import create_api_app
from proxy.http.gateway import HttpGateway
from tests.integration.test_http_upstream_differential import _dechunk, _requests, gateway_pair

pytestmark = pytest.mark.integration


async def _exchange(port: int, parts: list[bytes]) -> bytes:
    """Send ``parts`` (a pause between them), read until the gateway closes; ``Date`` left out."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0.05)
            writer.write(part)
            await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return re.sub(rb"\r\nDate: [^\r]*", b"", data)


def _server_requests(token: str) -> list[tuple[str, list[bytes]]]:
    auth = f"Authorization: Bearer {token}\r\n"
    keep = "Host: keygate.example\r\n" + auth
    close = keep + "Connection: close\r\n"
    body = b'{"temperature":{"type":"Number","value":22}}'
    patch = (f"PATCH /v2/entities/a-1/attrs HTTP/1.1\r\n{keep}Content-Type: application/json\r\n"
             f"Content-Length: {len(body)}\r\n\r\n").encode()
    read = f"GET /v2/entities/a-1 HTTP/1.1\r\n{keep}\r\n".encode()
    last = f"GET /v2/entities/a-2 HTTP/1.1\r\n{close}\r\n".encode()
    api = f"GET /api/v1/devices HTTP/1.1\r\n{keep}\r\n".encode()
    return [
        ("keep-alive sequence, pipelined", [read + patch + body + read + last]),
        ("keep-alive sequence, one by one", [read, patch, body, last]),
        ("a body in pieces", [patch, body[:5], body[5:20], body[20:] + last]),
        ("a head in pieces", [read[:7], read[7:30], read[30:] + last]),
        ("a body over the cap, unread",
         [(f"PUT /v2/entities/a-1/attrs HTTP/1.1\r\n{close}Content-Type: application/json"
           "\r\nContent-Length: 5000\r\n\r\n").encode() + b"x" * 5000]),
        ("a denied write's body is skipped, not parsed as a head",
         [(f"PATCH /v2/entities/b-1/attrs HTTP/1.1\r\n{keep}Content-Type: application/json\r\n"
           "Content-Length: 40\r\n\r\n").encode() + b"GET /v2/entities/b-1 HTTP/1.1\r\nHost: x\r\n\r\n" + last]),
        ("the ownership API", [api + last]),
        ("an NGSI read, then the API on the same connection (hand-over)", [read + api + last]),
        ("dot segments routing to the API", [f"GET /v2/../api/v1/devices HTTP/1.1\r\n{close}\r\n".encode()]),
        ("an encoded slash", [f"GET /v2/entities%2Fa-1 HTTP/1.1\r\n{close}\r\n".encode()]),
        ("HTTP/1.0", [f"GET /v2/entities/a-1 HTTP/1.0\r\n{keep}\r\n".encode()]),
        ("chunked body, then more", [(f"PATCH /v2/entities/a-1/attrs HTTP/1.1\r\n{keep}Content-Type: application/json"
                                      "\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
                                     + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) + last]),
        ("bare LF", [f"GET /v2/entities/a-1 HTTP/1.1\n{close}\r\n".replace("\r\n", "\n").encode()]),
        ("obs-fold", [f"GET /v2/entities/a-1 HTTP/1.1\r\n{close}X-A: 1\r\n  folded\r\n\r\n".encode()]),
        ("Content-Length twice, equal", [(f"PATCH /v2/entities/a-1/attrs HTTP/1.1\r\n{close}Content-Type: "
                                          f"application/json\r\nContent-Length: {len(body)}\r\nContent-Length: "
                                          f"{len(body)}\r\n\r\n").encode() + body]),
        ("Content-Length with a sign", [(f"PATCH /v2/entities/a-1/attrs HTTP/1.1\r\n{close}Content-Type: "
                                         f"application/json\r\nContent-Length: +{len(body)}\r\n\r\n").encode() + body]),
        ("absolute form", [f"GET http://keygate.example/v2/entities/a-1 HTTP/1.1\r\n{close}\r\n".encode()]),
        ("lower-case method", [f"get /v2/entities/a-1 HTTP/1.1\r\n{close}\r\n".encode()]),
        ("unknown method", [f"PROPFIND /v2/entities/a-1 HTTP/1.1\r\n{close}\r\n".encode()]),
        ("no Host", [f"GET /v2/entities/a-1 HTTP/1.1\r\n{auth}Connection: close\r\n\r\n".encode()]),
        ("two Hosts", [f"GET /v2/entities/a-1 HTTP/1.1\r\nHost: evil\r\n{close}\r\n".encode()]),
        ("a header without a value", [f"GET /v2/entities/a-1 HTTP/1.1\r\n{close}X-Empty:\r\n\r\n".encode()]),
        ("a space before the colon", [f"GET /v2/entities/a-1 HTTP/1.1\r\n{close}X-A : 1\r\n\r\n".encode()]),
        ("a control character in a value", [f"GET /v2/entities/a-1 HTTP/1.1\r\n{close}X-A: a\x01b\r\n\r\n".encode()]),
        ("a long header", [f"GET /v2/entities/a-1 HTTP/1.1\r\n{close}X-Long: {'y' * 9000}\r\n\r\n".encode()]),
        ("leading blank lines", [f"\r\n\r\nGET /v2/entities/a-1 HTTP/1.1\r\n{close}\r\n".encode()]),
        ("repeated query parameter", [f"GET /v2/entities?type=A&type=B HTTP/1.1\r\n{close}\r\n".encode()]),
        ("CORS preflight", [(b"OPTIONS /v2/entities HTTP/1.1\r\nHost: k\r\nOrigin: https://app.example\r\n"
                             b"Access-Control-Request-Method: GET\r\nConnection: close\r\n\r\n")]),
        ("no credentials", [b"GET /v2/entities/a-1 HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n"]),
        ("garbage", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40]),
    ]


@pytest.fixture
async def pair(tmp_path, oidc):
    def make(services, name):
        return HttpGateway(services, create_api_app(services), server=name)

    async with gateway_pair(tmp_path, oidc, make, ("lean", "aiohttp")) as (recorder, gateways, tokens):
        yield recorder, gateways, tokens["alice"]


def _cases(token: str) -> list[tuple[str, list[bytes]]]:
    return [(what, [raw]) for what, raw in _requests(token)] + _server_requests(token)


async def through_both(recorder: Any, gateways: dict[str, HttpGateway],
                       parts: list[bytes]) -> tuple[dict[str, list[bytes]], dict[str, bytes | None]]:
    """``parts`` through each server in turn: what the upstream saw, and the answer (None: the
    connection was not closed within 10 s)."""
    seen: dict[str, list[bytes]] = {}
    answers: dict[str, bytes | None] = {}
    for name in ("aiohttp", "lean"):
        recorder.seen.clear()
        port = gateways[name].port
        assert port is not None
        try:
            answers[name] = await _exchange(port, parts)
        except TimeoutError:
            answers[name] = None
        seen[name] = list(recorder.seen)
    return seen, answers


async def test_the_lean_server_answers_as_aiohttp_and_sends_orion_the_same(pair):
    recorder, gateways, token = pair
    for what, parts in _cases(token):
        seen, answers = await through_both(recorder, gateways, parts)
        for name, answer in answers.items():
            assert answer is not None, f"{what}: {name} did not close the connection"
        assert seen["lean"] == seen["aiohttp"], what
        assert _normal(answers["lean"]) == _normal(answers["aiohttp"]), what
    tally = gateways["lean"].lean_connections
    print(f"\nlean server: {tally.served} requests served, {tally.handed_over} connections handed to aiohttp")
    assert tally.served >= 30 and tally.handed_over >= 15   # both servers were compared, not one twice


def _normal(data: bytes) -> Any:
    """The answers of one connection, with chunked bodies joined (chunk boundaries are the relay's)."""
    if b"Transfer-Encoding: chunked" not in data:
        return data
    out, rest = [], data
    while rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        if b"Transfer-Encoding: chunked" in head:
            end = rest.index(b"0\r\n\r\n") + 5
            out.append((head, _dechunk(rest[:end])))
            rest = rest[end:]
        else:
            length = re.search(rb"(?i)\r\ncontent-length: (\d+)", head)
            size = int(length.group(1)) if length and not head.startswith(b"HTTP/1.1 204") else 0
            out.append((head, rest[:size]))
            rest = rest[size:]
    return out


async def test_connections_the_lean_server_took_are_counted_and_served_by_it(pair):
    _recorder, gateways, token = pair
    lean = gateways["lean"]
    reader, writer = await asyncio.open_connection("127.0.0.1", lean.port)
    try:
        writer.write(f"GET /v2/entities/a-1 HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        (connection,) = lean.lean_connections.open
        assert connection.request_count == 1
        assert lean.site is not None and lean.site.open_connections == 1
        writer.write(f"GET /api/v1/devices HTTP/1.1\r\nHost: k\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        assert not lean.lean_connections.open   # handed over to aiohttp, with its place in max_connections
        assert lean.site.open_connections == 1
    finally:
        writer.close()
    for _ in range(100):
        if lean.site.open_connections == 0:
            break
        await asyncio.sleep(0.02)
    assert lean.site.open_connections == 0
