"""The HTTP listener: aiohttp's server, with deadlines for slow clients (slowloris).

Connections start on the lean server for the NGSI path (:mod:`.lean_server`, given to
:class:`DeadlineSite` as ``lean``), which keeps the same deadlines and limits itself and hands
aiohttp's :class:`DeadlineRequestHandler` every connection it does not serve; what follows is
about aiohttp's side.

What aiohttp (3.14) offers, and what it does not:

* ``keepalive_timeout`` (default 3630 s) is armed when a connection is made and
  again when a response ends, and closes the connection if by then no complete
  request head has arrived. Bytes that arrive do not push it back, so it is,
  in effect, a deadline for the next request's head. The listener sets it to
  ``http.header_timeout_seconds``; an idle keep-alive connection is therefore
  closed after as long.
* No deadline for the TLS handshake, which comes before aiohttp's protocol
  exists: asyncio's ``ssl_handshake_timeout`` (default 60 s) is set to
  ``http.header_timeout_seconds`` too.
* No read deadline for bodies (``lingering_time`` only bounds the reading of a
  body nobody wanted). :class:`DeadlineRequestHandler` arms one timer per body
  when its head is parsed: a body not complete within
  ``http.body_timeout_seconds`` makes the reader waiting for it raise
  :class:`RequestTimeout` (an HTTP 408), which the NGSI gateway and the
  ownership API answer in their own error shapes; the connection is closed
  after the answer. A body that nobody is reading any more closes the
  connection at once.

A connection whose head is late is answered 408 (Orion's error shape) when it
has sent part of a head, so a real but slow client learns why; one that sent
nothing is closed without a word, as an idle keep-alive connection.

Clients that send without reading (pipelining):

* aiohttp parses at most a fixed 32 requests ahead of their answers, then
  keeps the rest of what it read unparsed and stops reading the socket until
  the queue is half empty. The number is fixed in its (C) parser, so the
  handler builds its own parser with ``http.max_pipelined_requests``.
* Answers are written into the transport's buffer; past its high-water mark
  (64 KiB) aiohttp waits for it to drain before the next write. Nothing bounds
  that wait: :class:`DeadlineRequestHandler` arms a timer when the transport
  pauses writing and aborts the connection (a close would wait for the very
  buffer that does not drain) if it has not resumed within
  ``http.write_timeout_seconds``.

Connections are counted from accept (:class:`DeadlineSite`): past
``http.max_connections`` a socket is aborted at once, before any TLS state
exists, so a flood of connections costs neither handshakes nor more open files
than the budget ``keygate serve`` checks at start. TLS is therefore started by
the site (``loop.start_tls``) on admitted sockets, not by ``create_server``.
On uvloop (which ``keygate serve`` installs) a server-side ``start_tls`` does
not complete its handshake (0.23), so there the loop does TLS and a TLS
connection is counted once its handshake is done: a refused one costs its
handshake (under ``header_timeout_seconds``) first. uvloop's TLS layer also
keeps its own 512 KiB write buffer.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_parser import HttpRequestParser
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

_WRITE_HIGH_WATER = 64 * 1024


class RequestTimeout(web.HTTPRequestTimeout):
    """The body did not arrive in time."""


def head_timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": "RequestTimeout",
                       "description": f"the request head did not arrive within {seconds:g} seconds"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class WriteDeadline:
    """A connection's write deadline, kept here for both servers: a client that reads none of its
    answers for ``seconds`` is aborted, since what is buffered for it will not leave.

    It runs while the transport has paused writing (its buffer over the high-water mark) and after
    a close (the server's, or asyncio's when the client ends its side): a close waits for the
    buffer to drain, which such a client never lets happen, and below the high-water mark no pause
    starts the deadline. It ends when the connection is lost (:meth:`ended`)."""

    __slots__ = ("_closing", "_loop", "_timer", "seconds")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float):
        self._loop = loop
        self.seconds = seconds
        self._timer: asyncio.TimerHandle | None = None
        self._closing: asyncio.TimerHandle | None = None

    def paused(self, transport: asyncio.BaseTransport) -> None:
        """The transport paused writing: abort it unless it resumes within the deadline."""
        if self._timer is None:
            self._timer = self._loop.call_later(self.seconds, self._late, transport)

    def resumed(self) -> None:
        """It resumed (or the connection is gone): the deadline ends."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def closing(self, transport: asyncio.BaseTransport) -> None:
        """After ``transport.close()``: what is still buffered after the deadline is given up. On TLS
        whatever the transport says it holds: its count leaves out what the socket transport under
        it holds, which is where the bytes of a client that reads nothing wait."""
        stream = cast(asyncio.Transport, transport)   # a stream transport (uvloop's TLS one without the base class)
        try:
            buffered = stream.get_write_buffer_size()
        except AttributeError:   # asyncio's TLS transport once its connection is gone: nothing is buffered
            return
        if self._closing is None and (buffered or stream.get_extra_info("sslcontext") is not None):
            self._closing = self._loop.call_later(self.seconds, stream.abort)   # a no-op once it has closed

    def ended(self) -> None:
        """The connection is lost (or handed over): no deadline runs for it any more."""
        self.resumed()
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None

    def _late(self, transport: asyncio.BaseTransport) -> None:
        self._timer = None
        cast(asyncio.Transport, transport).abort()


class ConnectionSlot:
    """One place in ``http.max_connections``; given back once, however the connection ends."""

    __slots__ = ("_count", "_held")

    def __init__(self, count: list[int]):
        self._count = count
        self._held = True
        count[0] += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._count[0] -= 1


class DeadlineRequestHandler(RequestHandler):
    """aiohttp's protocol, plus the 408 for a late head, the body and write deadlines and the pipelining cap."""

    __slots__ = ("_body_timeout", "_body_timer", "_body_payload", "_head_started", "_late_head_response",
                 "_write_deadline", "_slot", "_admit", "_made", "_early", "peak_queued", "_head_due")

    def __init__(self, manager: web.Server, *, header_timeout: float, body_timeout: float,
                 write_timeout: float = 30.0, max_pipelined: int = 16, slot: ConnectionSlot | None = None,
                 admit: Callable[[], ConnectionSlot | None] | None = None, head_due: float | None = None,
                 **kwargs: Any):
        super().__init__(manager, keepalive_timeout=header_timeout, **kwargs)
        self._head_due = head_due   # handed over by the lean server with a head begun: still due then
        self._body_timeout = body_timeout
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_payload: Any = None
        self._head_started = False
        self._late_head_response = head_timeout_response(header_timeout)
        self._write_deadline = WriteDeadline(self._loop, write_timeout)
        self._slot = slot
        self._admit = admit   # counted once made (TLS done by the loop, see DeadlineSite), or refused
        self._made = False
        self._early: list[bytes] = []   # TLS data that came before connection_made (see DeadlineSite)
        self.peak_queued = 0            # most requests parsed ahead of their answers (tests and benchmarks)
        # The pipelining cap: the parser stops emitting requests, and the protocol stops reading, at it.
        self._max_msg_queue_size = max_pipelined
        self._msg_queue_resume_size = max_pipelined // 2
        self._parser = HttpRequestParser(
            self, self._loop, self._read_bufsize, max_line_size=self.max_line_size,
            max_field_size=self.max_field_size, max_headers=self.max_headers,
            payload_exception=RequestPayloadError, auto_decompress=kwargs.get("auto_decompress", True),
            max_msg_queue_size=max_pipelined)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admit is not None:
            self._slot = self._admit()
            if self._slot is None:
                _Refused().connection_made(transport)
                return
        self._made = True
        if isinstance(transport, asyncio.WriteTransport):
            # The TLS layer buffers up to 512 KiB of answers by default before it pauses the writer; as the socket.
            transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        super().connection_made(transport)
        if self._head_due is not None and self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._next_keepalive_close_time = self._head_due
            self._keepalive_handle = self._loop.call_at(self._head_due, self._process_keepalive)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if not self._made:
            self._early.append(data)   # at most one read: the socket is not read again before connection_made
            return
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads and self._messages:
            # A head is complete (the handler task has not taken it yet): time its body.
            self._head_started = False
            _, payload = self._messages[-1]
            if not payload.is_eof():
                self._arm_body_timer(payload)
        elif data and (self._body_payload is None or self._body_payload.is_eof()):
            self._head_started = True   # part of a head, not of a body
        self.peak_queued = max(self.peak_queued, len(self._messages))

    @property
    def queued(self) -> int:
        """Requests parsed ahead of their answers (tests and benchmarks, as the lean server's)."""
        return len(self._messages)

    @property
    def request_count(self) -> int:
        return self._request_count

    def force_close(self) -> None:
        transport = self.transport
        super().force_close()
        if transport is not None:
            self._write_deadline.closing(transport)

    async def start(self) -> None:
        await super().start()
        if self.transport is not None and self.transport.is_closing():   # closed at the end of its requests
            self._write_deadline.closing(self.transport)

    def eof_received(self) -> None:
        # The client ended its side: asyncio closes the transport next, as after force_close.
        if self.transport is not None:
            self._write_deadline.closing(self.transport)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.transport is not None:
            self._write_deadline.paused(self.transport)

    def resume_writing(self) -> None:
        self._write_deadline.resumed()
        super().resume_writing()

    def _arm_body_timer(self, payload: Any) -> None:
        # HTTP/1.1 reads one body at a time: a new head means the previous body is complete.
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_payload = payload
        self._body_timer = self._loop.call_later(self._body_timeout, self._body_late, payload)

    def _body_late(self, payload: Any) -> None:
        self._body_timer = None
        if payload.is_eof() or self.transport is None:
            return
        self._lingering_time = 0.0   # what is left of the body is not waited for: close after the answer
        request = self._current_request
        if request is not None and request.content is payload:
            payload.set_exception(RequestTimeout(
                reason=f"the request body did not arrive within {self._body_timeout:g} seconds",
                headers={"Connection": "close"}))
        else:
            self.force_close()   # answered already, or queued behind another request: nothing to say

    def _process_keepalive(self) -> None:
        if (self._head_started and self.transport is not None and not self._force_close and self._keepalive
                and self._waiter is not None and not self._waiter.done()
                and self._loop.time() >= self._next_keepalive_close_time):
            self.transport.write(self._late_head_response)   # aiohttp closes it next (close() flushes first)
            self._head_started = False
        super()._process_keepalive()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = None
        self._write_deadline.ended()
        self._body_payload = None
        if self._slot is not None:
            self._slot.release()
        if self._made:   # a TLS connection can end between its handshake and connection_made
            super().connection_lost(exc)


class _Refused(asyncio.Protocol):
    """A socket past ``http.max_connections``: aborted at accept (no TLS state, no answer)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.Transport):
            transport.abort()   # no FIN handshake, no lingering: the cheapest close
        else:
            transport.close()


class _StartTls(asyncio.Protocol):
    """An admitted socket on a TLS listener: the handshake (under its deadline), then the HTTP handler."""

    def __init__(self, site: DeadlineSite, context: ssl.SSLContext, handler: asyncio.Protocol,
                 slot: ConnectionSlot):
        self._site = site
        self._context = context
        self._handler = handler
        self._slot = slot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):   # create_server gives a stream transport
            transport.close()
            self._slot.release()
            return
        transport.pause_reading()   # the ClientHello waits in the kernel until start_tls reads it
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self._site._handshakes.add(task)
        task.add_done_callback(self._site._handshakes.discard)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._slot.release()   # gone before start_tls took the socket over

    async def _handshake(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(transport, self._handler, self._context, server_side=True,
                                       ssl_handshake_timeout=self._site._header_timeout)
        except (OSError, TimeoutError, RuntimeError, asyncio.CancelledError):   # SSLError is an OSError
            transport.abort()
            self._slot.release()
            return
        if tls is None or tls.is_closing():
            self._slot.release()
            return
        self._handler.connection_made(tls)


#: Builds a lean connection: (its slot or None, the admission when it has none, the aiohttp
#: handler to hand over to).
LeanFactory = Callable[[ConnectionSlot | None, Callable[[], ConnectionSlot | None] | None,
                        Callable[[ConnectionSlot | None, float | None], DeadlineRequestHandler]], asyncio.Protocol]


class DeadlineSite(web.TCPSite):
    """A TCP(+TLS) site whose connections are counted from accept and get :class:`DeadlineRequestHandler`."""

    __slots__ = ("_header_timeout", "_body_timeout", "_write_timeout", "_max_pipelined", "_max_connections",
                 "_count", "_handshakes", "_lean")

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, header_timeout: float, body_timeout: float,
                 write_timeout: float = 30.0, max_pipelined: int = 16, max_connections: int = 1000,
                 lean: LeanFactory | None = None, **kwargs: Any):
        super().__init__(runner, host, port, **kwargs)
        # Given: each connection starts on the lean server (proxy.http.lean_server), which hands
        # what it does not serve to the handler built here.
        self._lean = lean
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._write_timeout = write_timeout
        self._max_pipelined = max_pipelined
        self._max_connections = max_connections
        self._count = [0]   # connections from accept to their end, TLS handshakes included
        self._handshakes: set[asyncio.Task[None]] = set()

    @property
    def open_connections(self) -> int:
        return self._count[0]

    async def start(self) -> None:
        await web.BaseSite.start(self)   # registers the site with its runner; the rest is TCPSite.start's
        loop = asyncio.get_running_loop()
        server = self._runner.server
        if server is None:   # BaseSite.start checks the runner was set up
            raise RuntimeError("the runner is not set up")
        # The handler takes the server's own keyword arguments (access log, debug...), as aiohttp's would.
        handler_kwargs = {k: v for k, v in server._kwargs.items() if k != "keepalive_timeout"}

        # TLS by start_tls on admitted sockets works on the stdlib loop; on uvloop (0.23) a server-side
        # start_tls does not complete its handshake, so there the loop does TLS and connections are
        # counted once their handshake is done (bounded by the handshake deadline).
        site_tls = self._ssl_context if isinstance(loop, asyncio.BaseEventLoop) else None
        loop_tls = None if site_tls is not None else self._ssl_context

        def admit() -> ConnectionSlot | None:
            return ConnectionSlot(self._count) if self._count[0] < self._max_connections else None

        def aiohttp_handler(slot: ConnectionSlot | None, head_due: float | None = None) -> DeadlineRequestHandler:
            return DeadlineRequestHandler(server, loop=loop, header_timeout=self._header_timeout,
                                          body_timeout=self._body_timeout, write_timeout=self._write_timeout,
                                          max_pipelined=self._max_pipelined, slot=slot,
                                          admit=admit if slot is None else None, head_due=head_due,
                                          **handler_kwargs)

        def handler(slot: ConnectionSlot | None) -> asyncio.Protocol:
            if self._lean is None:
                return aiohttp_handler(slot)
            return self._lean(slot, admit if slot is None else None, aiohttp_handler)

        def protocol() -> asyncio.Protocol:
            if loop_tls is not None:
                return handler(None)
            slot = admit()
            if slot is None:
                return _Refused()
            return handler(slot) if site_tls is None else _StartTls(self, site_tls, handler(slot), slot)

        self._server = await loop.create_server(
            protocol, self._host, self._port, backlog=self._backlog, ssl=loop_tls,
            ssl_handshake_timeout=self._header_timeout if loop_tls is not None else None,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        for task in list(self._handshakes):
            task.cancel()
        await super().stop()
