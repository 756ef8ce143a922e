"""The MQTT shell's sockets: asyncio protocols that move bytes, and nothing that decides.

* the client's socket, plain (:class:`PlainClientSide`) or with TLS done here on
  ``ssl.MemoryBIO`` (:class:`TlsClientSide`), and the broker's (:class:`BrokerSide`), each
  handing what it reads to its :class:`~proxy.mqtt.connection.Connection`. They all read into
  receive buffers shared by every connection of the gateway (a protocol's ``buffer_updated``
  runs to completion before the loop reads the next socket, so the buffers are free again by
  then); TLS decrypts into the shared buffer too: per idle TLS connection this costs ~22 KiB,
  against ~47 KiB with uvloop's TLS transport and ~280 KiB with the stdlib's (which keeps a
  256 KiB buffer per connection);
* the write-buffer marks a socket's backpressure is reported at (the connection then stops
  reading the *other* side);
* how a connection's sockets end without losing its last bytes: a lingering close towards the
  client (:func:`lingering_close`), a half-close towards the broker (:func:`close_upstream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from proxy.config import Config
from proxy.mqtt.events import Buffer
from proxy.mqtt.transport import ClientReceiver, Transport
from proxy.tls import server_context

if TYPE_CHECKING:
    from proxy.mqtt.connection import Connection
    from proxy.mqtt.server import MqttGateway
    from proxy.mqtt.session import Session

log = logging.getLogger("keygate.mqtt")

__all__ = ["CLIENT_READ_SIZE", "LINGER_SECONDS", "RECV_BUFFER_SIZE", "WRITE_HIGH", "WRITE_LOW", "BrokerSide",
           "PlainClientSide", "TlsClientSide", "close_upstream", "joined", "lingering_close", "server_ssl_context"]

# One receive buffer for every connection of a gateway (see the module docstring).
RECV_BUFFER_SIZE = 256 * 1024
# Deliveries first: one read from a client takes at most a quarter of what one read
# from the broker may take. Clients can be slowed down losslessly (TCP backpressure);
# the broker cannot: when the gateway drains it slower than it is fed, it queues, and
# past max_queued_messages it drops QoS 0 messages. Reading publishers in smaller bites
# than deliveries keeps the gateway from feeding the broker faster than it drains it.
CLIENT_READ_SIZE = 64 * 1024
# Write-buffer marks per socket: above HIGH the other side stops reading.
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024


def joined(items: Sequence[Buffer]) -> bytes:
    """One ``bytes`` for one write. Items may be slices of the shared receive buffer,
    which must not outlive this call: transports (uvloop's in particular) may keep a
    reference to what they are given, so they only ever get ``bytes``."""
    if len(items) == 1:
        first = items[0]
        if type(first) is bytes:
            return first
    return b"".join(items)


def server_ssl_context(config: Config) -> ssl.SSLContext:
    """The listener's TLS context (server certificate; device certificates if ``tls.client_ca``)."""
    return server_context(config.tls, config.base_dir)


# --------------------------------------------------------------------------- protocols


class _ClientSide(asyncio.BufferedProtocol):
    """What both client sockets pass on as it is to what receives their bytes (``conn``)."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        self.conn: ClientReceiver | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.client_lost(exc)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_writing()


class PlainClientSide(_ClientSide):
    """The client's socket on a plain listener (``mqtt.tls: false``)."""

    __slots__ = ("_gateway", "_session")

    def __init__(self, gateway: MqttGateway):
        super().__init__()
        self._gateway = gateway
        self._session: Session | None = gateway.new_session()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn = self._gateway.accept_transport(cast(Transport, transport), self._session)  # a stream socket's
        self._session = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._gateway.client_read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        if conn is not None:
            conn.client_data(self._gateway.recv_buffer[:nbytes])

    def eof_received(self) -> bool:
        return False  # close: a half-open MQTT connection is of no use


class TlsClientSide(_ClientSide):
    """The client's socket with TLS done here, on ``ssl.MemoryBIO``s, instead of by the loop.

    Why not ``create_server(ssl=...)``: the stdlib's TLS layer keeps a 256 KiB
    buffer per connection and uvloop's costs ~40 KiB; here ciphertext and
    plaintext both land in buffers shared by every connection, leaving OpenSSL's
    own state as the per-connection cost. The :class:`Connection` exists from
    accept, so its CONNECT deadline covers the handshake; it sees no byte before
    the handshake is complete. To the connection this object is the transport.
    """

    __slots__ = ("_gateway", "_accept", "_raw", "_in", "_out", "_tls", "_c", "_ready", "_closing")

    def __init__(self, gateway: MqttGateway, accept: Callable[[Transport], ClientReceiver | None] | None = None):
        super().__init__()
        self._gateway = gateway
        # accept(self) -> what receives the plaintext (a Connection, or the WebSocket listener's
        # HTTP side), or None when refused; by default an MQTT connection of the gateway.
        self._accept = accept or gateway.accept_transport
        self._raw: asyncio.Transport | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls: ssl.SSLObject | None = None
        # The SSLObject's C object: its read and write are what SSLObject.read and .write call
        # (same arguments, results and errors), a Python frame fewer each, once or twice per chunk.
        self._c: Any = None
        self._ready = False
        self._closing = False

    # -- the raw socket's events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = cast(asyncio.Transport, transport)  # a stream socket's
        self.conn = self._accept(self)
        if self.conn is not None:  # refused connections cost no TLS state
            ctx = self._gateway.ssl_context
            if ctx is None:
                raise RuntimeError("a TLS client side without a TLS context")
            self._tls = ctx.wrap_bio(self._in, self._out, server_side=True)
            self._c = getattr(self._tls, "_sslobj", self._tls)  # (the SSLObject itself if it has none)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._gateway.tls_read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        tls = self._tls
        if self._closing or tls is None:
            return
        self._in.write(self._gateway.tls_buffer[:nbytes])
        try:
            if not self._ready:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    self._flush()
                    return
                self._ready = True
            self._read_plaintext(self._c)
        except ssl.SSLError as exc:  # a failed handshake or a corrupt record: nothing to answer
            log.debug("TLS error from %s: %s", self.get_extra_info("peername"), exc)
            self._flush()
            self.abort()
            return
        if self._out.pending:
            self._flush()

    def _read_plaintext(self, tls: Any) -> None:
        """Decrypt everything the BIO holds into the shared buffer; one client_data per fill."""
        buf = self._gateway.recv_buffer
        size = len(buf)
        got = 0
        peer_closed = False
        bio = self._in
        try:
            while got < size:
                n: int = tls.read(size - got, buf[got:] if got else buf)  # into a buffer: the count
                if not n:
                    peer_closed = True
                    break
                got += n
                if not bio.pending:
                    # All read: spare the SSLWantReadError the next read would raise. (A read
                    # returns one record's plaintext at most; if that filled the buffer, the
                    # loop ends anyway and the call below picks up the rest.)
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            peer_closed = True
        if got and self.conn is not None:
            self.conn.client_data(buf[:got])
        if peer_closed:
            # close_notify: the client is done; answer in kind and let the connection go.
            self.close()
        elif got == size and not self._closing:
            self._read_plaintext(tls)  # the buffer was full: more records may wait in the BIO

    def _flush(self) -> None:
        if self._out.pending and self._raw is not None and not self._raw.is_closing():
            self._raw.write(self._out.read())

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        super().connection_lost(exc)

    # -- the transport the connection sees
    def write(self, data: bytes) -> None:
        if self._closing or not self._ready:
            return
        try:
            self._c.write(data)  # (_ready: the handshake made it)
        except ssl.SSLError:
            self.abort()
            return
        raw = self._raw  # self._flush(), inline: once per chunk
        if self._out.pending and raw is not None and not raw.is_closing():
            raw.write(self._out.read())

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._ready and self._tls is not None:
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._tls.unwrap()  # queues close_notify
            if self._out.pending and self._raw is not None and not self._raw.is_closing():
                self._raw.write(self._out.read())
        if self._raw is not None:
            self._gateway.linger_close(self._raw)

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def pause_reading(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def writelines(self, chunks: Iterable[Buffer]) -> None:
        self.write(b"".join(chunks))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._tls if self._ready else default
        if name == "sslcontext":
            return self._gateway.ssl_context if self._ready else default
        return self._raw.get_extra_info(name, default) if self._raw is not None else default


class BrokerSide(asyncio.BufferedProtocol):
    """The connection to the broker, opened after authentication."""

    __slots__ = ("conn", "_buffer")

    def __init__(self, conn: Connection):
        self.conn = conn
        self._buffer = conn.gateway.recv_buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)  # a stream's

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.broker_data(self._buffer[:nbytes])

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.broker_lost(exc)

    def pause_writing(self) -> None:
        # The broker is not keeping up with us: stop reading from the client.
        self.conn.client_reading(False, "broker")

    def resume_writing(self) -> None:
        self.conn.client_reading(True, "broker")


# --------------------------------------------------------------------------- closing

LINGER_SECONDS = 2.0  # how long a closed client's socket still reads (and drops) what it sends

def lingering_close(raw: asyncio.Transport, loop: asyncio.AbstractEventLoop | None,
                    done: Callable[[], None] | None = None) -> bool:
    """Close a client socket without losing our last bytes (a refusal) to a TCP reset.

    A socket closed with unread input answers with a reset, and the client's
    system then drops what it had not read yet, our CONNACK or DISCONNECT with
    it. So: our bytes, then FIN (``write_eof``); what the client still sends is
    read and dropped (its connection is closed), until it closes too (EOF: the
    transport then closes) or ``LINGER_SECONDS`` pass (abort). The socket is no
    longer counted as a connection meanwhile; new connections are still bounded
    by the per-address rate, and by the gateway's ``lingering_sockets_max``
    (:meth:`MqttGateway.linger_close`). True: lingering (``done`` is called when
    its time is up).
    """
    if raw.is_closing():
        return False
    if loop is None or not raw.can_write_eof():
        raw.close()
        return False
    raw.write_eof()
    raw.resume_reading()

    def end() -> None:
        raw.abort()
        if done is not None:
            done()

    loop.call_later(LINGER_SECONDS, end)
    return True


def close_upstream(transport: asyncio.Transport, loop: asyncio.AbstractEventLoop | None) -> None:
    """Half-close towards the broker and let it close its side.

    A full close here would answer the broker's next write (a PUBACK for the
    client's last publish, say) with a reset, and a reset makes the broker drop
    what it has not read yet: the last publishes, or the DISCONNECT, so that a
    Will would be sent for a client that left cleanly. After ``write_eof`` the
    broker reads everything, then closes; what it still sends is discarded (the
    connection is closed). A broker that never closes is cut after 2 s. Without
    a DISCONNECT in the stream the broker sends the client's Will, as it should.
    """
    if loop is not None and transport.can_write_eof():
        transport.write_eof()
        transport.resume_reading()
        loop.call_later(2.0, transport.abort)
    else:
        transport.close()
