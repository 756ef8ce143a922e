"""Outside review (s29), area 3: a client that reads none of its answers and then ends its side.

test_unread_answers_hold_slot.py: a client that stops reading with less than the write buffer's
high water unsent, and goes quiet, is closed by the header deadline, and the write deadline
(``WriteDeadline.closing``) aborts what its close cannot send. Two ways round it held the
connection, and its place in ``max_connections``, for ever (no deadline left, connection_lost
never comes):

* **a half-close** (the client's FIN, ``shutdown(SHUT_WR)``) before the header deadline: the
  protocol's ``eof_received`` returns None, so asyncio closes the transport itself, which waits
  for its buffer to drain; nobody armed the after-close deadline (both servers, TCP and TLS);
* **TLS**: the answers the client does not read sit in the socket transport *below* the TLS
  one, whose ``get_write_buffer_size()`` leaves them out: ``closing`` saw 0 bytes and armed
  nothing. When the client then ends the TLS session (``close_notify`` after the header
  deadline), the TLS shutdown completes and closes the socket transport, which waits for its
  buffer for ever (asyncio's ``ssl_shutdown_timeout`` only bounds a shutdown still in progress).

The client calibrates how much to leave unsent; here the test reads the server's buffers in
place of that calibration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl

import pytest

from ownership.api import create_api_app
from proxy.config import TlsConfig
from proxy.http.gateway import HttpGateway
from tests.integration.lean_attacks.rig import ScriptedUpstream, ok
from tests.integration.test_http_upstream_differential import gateway_pair as shared_pair
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration

TIMEOUT = 0.5
DENIED = b"GET /v2/entities/a-1 HTTP/1.1\r\nHost: k\r\n\r\n"   # answered 401: no credentials needed


async def _script(method: str, target: str) -> tuple[bytes, bool]:
    return ok(), False


def _buffered(transport: asyncio.BaseTransport) -> int:
    """What the server holds for the client: the transport's buffer and, under TLS, the socket transport's."""
    inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    size = transport.get_write_buffer_size()   # type: ignore[attr-defined]
    return size + (inner.get_write_buffer_size() if inner is not None else 0)


def _server_buffered(gateway: HttpGateway) -> int:
    return max((_buffered(c.transport) for c in gateway.connections() if c.transport is not None), default=0)


class _Client:
    """A client socket with a tiny receive window that is never read after the TLS handshake."""

    def __init__(self, tls: ssl.SSLContext | None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        self.sock.setblocking(False)
        self.loop = asyncio.get_running_loop()
        self.tls: ssl.SSLObject | None = None
        if tls is not None:
            self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = tls.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    async def connect(self, port: int) -> None:
        await self.loop.sock_connect(self.sock, ("127.0.0.1", port))
        while self.tls is not None:
            try:
                self.tls.do_handshake()
                await self._flush()
                return
            except ssl.SSLWantReadError:
                await self._flush()
                data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), 5)
                assert data, "the server closed during the handshake"
                self.incoming.write(data)

    async def _flush(self) -> None:
        if self.tls is not None and self.outgoing.pending:
            await self.loop.sock_sendall(self.sock, self.outgoing.read())

    def send(self, data: bytes) -> None:
        if self.tls is None:
            self.sock.send(data)
            return
        self.tls.write(data)
        self.sock.send(self.outgoing.read())

    async def close_notify(self) -> None:
        assert self.tls is not None
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        await self._flush()


def _maker(pki, tls: bool):
    def make(services, name: str) -> HttpGateway:
        if tls:   # the listener behind TLS, with the PKI's server certificate
            config = services.config
            config = dataclasses.replace(config, tls=TlsConfig(cert=str(pki.server_cert), key=str(pki.server_key)),
                                         http=dataclasses.replace(config.http, tls=True))
            services = dataclasses.replace(services, config=config)
        return HttpGateway(services, create_api_app(services), server=name)
    return make


@pytest.mark.parametrize("end", ["fin", "tls fin", "tls close_notify"])
@pytest.mark.parametrize("server", ["lean", "aiohttp"])
async def test_a_client_that_reads_nothing_and_ends_its_side_is_closed_within_the_deadlines(
        tmp_path, oidc, server, end):
    pki = make_pki(tmp_path / "pki")
    tls = end.startswith("tls")
    async with shared_pair(tmp_path, oidc, _maker(pki, tls), ("lean", "aiohttp"), recorder=ScriptedUpstream(_script),
                           header_timeout_seconds=TIMEOUT, write_timeout_seconds=TIMEOUT) as (_u, gateways, _t):
        gateway = gateways[server]
        assert gateway.port is not None and gateway.site is not None
        client = _Client(ssl.create_default_context(cafile=str(pki.ca)) if tls else None)
        try:
            await client.connect(gateway.port)
            for _ in range(4000):
                client.send(DENIED * 16)
                await asyncio.sleep(0.002)
                if _server_buffered(gateway) > 16 * 1024:   # well under the 64 KiB high water
                    break
            buffered = _server_buffered(gateway)
            assert buffered > 16 * 1024, buffered
            if end == "tls close_notify":
                await asyncio.sleep(TIMEOUT * 2)   # the header deadline closes; the client then ends the session
                await client.close_notify()
            else:
                client.sock.shutdown(socket.SHUT_WR)
            await asyncio.sleep(TIMEOUT * 8)   # header and write deadlines, several times over
            still = gateway.site.open_connections
            print(f"\n[{server}, {end}] {buffered} bytes left in the server's buffers; after {TIMEOUT * 8:g} s "
                  f"open connections: {still}")
            assert still == 0, "the connection and its slot are held with no deadline left"
        finally:
            client.sock.close()
