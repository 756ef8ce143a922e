"""The lean HTTP/1.1 server for the NGSI path: an ``asyncio.Protocol`` in front of aiohttp's.

aiohttp's server costs more CPU per request than nginx's whole proxy (its request object,
its stream reader, its response writer and the task per connection). Orion's clients send
plain requests: this protocol reads their heads with llhttp (:mod:`.lean_head`), hands them
to the gateway's handler as a small request object, and writes the answer as bytes framed as
aiohttp frames them (:mod:`.lean_answer`). Anything else, from the first head it does not
take (the ownership API, the portal, a chunked body, an upgrade, a head that does not parse,
HTTP/1.0...), is aiohttp's: the connection is handed to the listener's
:class:`~proxy.http.listener.DeadlineRequestHandler` with every byte not yet served, once the
answers before it are written, and stays with it.

The listener's promises hold here too:

* a head within ``header_timeout_seconds`` of the connection or of the previous answer, else
  408 (when part of one came) or a silent close;
* a body within ``body_timeout_seconds`` of its head, else the gateway's 408 and a close;
  a body over ``max_body_bytes`` is answered 413 unread, and the connection closed;
* at most ``max_pipelined_requests`` requests read ahead of their answers: past that the
  socket is not read until half of them are answered;
* answers that the client does not read: the connection is aborted when its write buffer
  has not drained within ``write_timeout_seconds``;
* one place in ``max_connections`` per connection, given back once (by aiohttp's handler
  after a hand-over).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http.lean_answer import head_bytes, response_bytes
from proxy.http.lean_head import Head, head_end, read_head
from proxy.http.listener import (
    ConnectionSlot,
    DeadlineRequestHandler,
    RequestTimeout,
    WriteDeadline,
    head_timeout_response,
)

if TYPE_CHECKING:
    from proxy.http.gateway import GatewayHandler

log = logging.getLogger("keygate.http")

_WRITE_HIGH_WATER = 64 * 1024
#: Body bytes that have arrived and not been read, past which the socket is not read until the
#: gateway has read half of them (as aiohttp's stream reader): a client that pipelines requests
#: with bodies holds at most this much of them per connection, not max_pipelined bodies.
_BODY_HIGH_WATER = 256 * 1024
_COMPACT_AT = 64 * 1024
#: Reads of one head without its end after which it is aiohttp's: each read rescans the head
#: here, so a head sent a byte at a time would cost quadratic time (clients send a head in a read
#: or two; a TLS record boundary may make it three).
_MAX_PARTIAL_READS = 8
_CACHED_HEAD = 4096    # longest head kept in the cache of heads read
_CACHED_HEADS = 1024   # heads kept, all connections of a listener together (then it starts again)
# Most fields of a head kept: a parsed field costs several times its bytes, so 1024 heads of many
# short fields would hold ~6x the 4 MiB of their bytes (outside review, round 2).
_CACHED_HEAD_FIELDS = 32


class Relayed:
    """What the gateway's handler returns when it has written the answer itself (a relay)."""

    __slots__ = ("status",)

    def __init__(self, status: int):
        self.status = status


class LeanBody:
    """A request body with a known length, as the gateway reads it (``iter_chunked``, ``read``).

    ``size`` is what has arrived and not been read; ``on_size`` is told of each change, so the
    connection can stop and start reading the socket (see :data:`_BODY_HIGH_WATER`)."""

    __slots__ = ("_chunks", "_waiter", "_exception", "_eof", "_discarding", "size", "_on_size")

    def __init__(self, eof: bool = False, on_size: Callable[[int], None] | None = None) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._exception: BaseException | None = None
        self._eof = eof
        self._discarding = False
        self.size = 0
        self._on_size = on_size

    def _resize(self, delta: int) -> None:
        self.size += delta
        if self._on_size is not None:
            self._on_size(delta)

    def feed(self, data: bytes) -> None:
        if self._discarding:
            return
        self._chunks.append(data)
        self._resize(len(data))
        self._wake()

    def discard(self) -> None:
        """Nobody reads the rest (the request is answered): what arrives of it is dropped."""
        self._discarding = True
        self._chunks.clear()
        self._resize(-self.size)

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def is_eof(self) -> bool:
        return self._eof

    def set_exception(self, exc: BaseException) -> None:
        self._exception = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        while True:
            if self._exception is not None:
                raise self._exception
            if self._chunks:
                chunk = self._chunks.popleft()
                self._resize(-len(chunk))
                while len(chunk) > n:
                    yield chunk[:n]
                    chunk = chunk[n:]
                yield chunk
                continue
            if self._eof:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_chunked(1 << 30)])


_NO_BODY = LeanBody(eof=True)


class LeanRequest:
    """The request as the gateway's handler reads it: the subset of ``web.Request`` it uses."""

    __slots__ = ("_connection", "method", "raw_path", "headers", "content_length", "body_exists", "content",
                 "host", "keep_alive", "close_after", "answered", "memo")

    def __init__(self, head: Head, connection: LeanConnection, body: LeanBody, memo: dict[Any, Any] | None = None):
        self._connection = connection
        self.method = head.method
        self.raw_path = head.target
        self.headers: CIMultiDictProxy[str] = head.headers
        self.content_length = head.content_length
        self.body_exists = bool(head.content_length)
        self.content = body
        self.host = head.host
        self.keep_alive = head.keep_alive
        self.close_after = False   # the connection ends after this answer (its body was not read)
        self.answered = False
        # What the gateway derived from this very head before (the upstream headers), for the
        # next request with the same bytes; None when the head is not kept.
        self.memo = memo

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._connection.transport

    @property
    def remote(self) -> str | None:
        return self._connection.remote

    @property
    def scheme(self) -> str:
        return self._connection.scheme

    async def relay(self, status: int, reason: str, headers: CIMultiDict[str], length: int | None,
                    whole: bytes | None, chunks: AsyncIterator[bytes] | None) -> Relayed:
        """Write an answer relayed from Orion: the head, then ``whole`` or the ``chunks``. An answer
        broken off (Orion went away mid-body) ends the connection: the client cannot tell where."""
        head, chunked = head_bytes(self.method, status, reason, headers, length, self.keep_alive)
        return await self.relay_head(status, head, chunked, length, whole, chunks)

    async def relay_head(self, status: int, head: bytes, chunked: bool, length: int | None, whole: bytes | None,
                         chunks: AsyncIterator[bytes] | None) -> Relayed:
        """:meth:`relay` with the head already built (``lean_answer.plain_head``)."""
        self.answered = True
        try:
            return await self._relay(status, head, chunked, length, whole, chunks)
        except BaseException:
            self.close_after = True
            raise

    async def _relay(self, status: int, head: bytes, chunked: bool, length: int | None, whole: bytes | None,
                     chunks: AsyncIterator[bytes] | None) -> Relayed:
        write = self._connection.write
        if self.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            await write(head)
            return Relayed(status)
        if whole is not None and chunks is None:
            if length is not None:
                whole = whole[:length]
            await write(head + (b"%x\r\n%s\r\n0\r\n\r\n" % (len(whole), whole) if chunked and whole
                                else b"0\r\n\r\n" if chunked else whole))
            return Relayed(status)
        await write(head)
        left = length
        if chunks is not None:
            async for chunk in chunks:
                if not chunk:
                    continue
                if left is not None:
                    chunk = chunk[:left]
                    left -= len(chunk)
                    if not chunk:
                        continue
                await write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        if chunked:
            await write(b"0\r\n\r\n")
        return Relayed(status)


class LeanConnections:
    """The lean server's open connections, and tallies of what it served and handed over."""

    __slots__ = ("open", "served", "handed_over", "heads")

    def __init__(self) -> None:
        self.open: set[LeanConnection] = set()
        # Heads read, by their bytes: clients send the same head again and again (a Head is
        # immutable), each with what the gateway derived from it (LeanRequest.memo).
        self.heads: dict[bytes, tuple[Head, dict[Any, Any]]] = {}
        self.served = 0        # requests answered on the lean server
        self.handed_over = 0   # connections handed to aiohttp's server

    def __iter__(self) -> Iterator[LeanConnection]:
        return iter(list(self.open))

    def __len__(self) -> int:
        return len(self.open)


class _Handover:
    """The place in the queue from which the connection is aiohttp's."""


_HANDOVER = _Handover()


class LeanConnection(asyncio.Protocol):
    """One client connection on the lean server (see the module's docstring)."""

    def __init__(self, gateway: GatewayHandler, *, prefixes: tuple[str, ...], header_timeout: float,
                 body_timeout: float, write_timeout: float, max_pipelined: int, max_body: int,
                 fallback: Callable[[ConnectionSlot | None, float | None], DeadlineRequestHandler],
                 slot: ConnectionSlot | None = None,
                 admit: Callable[[], ConnectionSlot | None] | None = None,
                 registry: LeanConnections | None = None):
        self._gateway = gateway
        self._prefixes = prefixes
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._max_pipelined = max_pipelined
        self._max_body = max_body
        self._fallback = fallback
        self._slot = slot
        self._admit = admit
        self._registry = registry
        self._heads = registry.heads if registry is not None else None
        self._loop = asyncio.get_running_loop()
        self._write_deadline = WriteDeadline(self._loop, write_timeout)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.scheme = "http"
        self._early: list[bytes] = []
        self._made = False
        self._closed = False
        self._handed_over = False
        self._shutting = False
        self._handing_over = False   # the bytes from the head handed over on are kept for aiohttp
        self._partial_reads = 0      # reads that brought part of a head and not its end
        self._buffer = bytearray()
        self._pos = 0
        self._stopped = False       # nothing more is parsed (hand-over, an unread body, a close)
        self._held = False          # parsing waits for the queue to shrink (the pipelining cap)
        self._body_full = False     # parsing waits for the gateway to read bodies (_BODY_HIGH_WATER)
        self._unread = 0            # body bytes arrived and not read, all requests together
        self._body: LeanBody | None = None   # the body being received
        self._body_left = 0
        self._queue: collections.deque[LeanRequest | _Handover] = collections.deque()
        self._current: LeanRequest | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_due: float | None = None   # when the next head is late (None: one is in)
        self._body_timer: asyncio.TimerHandle | None = None
        self.peak_queued = 0     # most requests read ahead of their answers (tests and benchmarks)
        self.request_count = 0   # heads read

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._admit is not None:
            self._slot = self._admit()
            if self._slot is None:
                if isinstance(transport, asyncio.Transport):
                    transport.abort()
                else:
                    transport.close()
                self._closed = True
                return
        # A stream transport (uvloop's TLS transport is one without deriving from asyncio.Transport).
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._made = True
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (list, tuple)) and peer:
            self.remote = str(peer[0])
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        if self._registry is not None:
            self._registry.open.add(self)
        self._task = self._loop.create_task(self._serve(), name="keygate-http-lean-connection")
        self._arm_head_timer()
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if not self._made:
            self._early.append(data)   # TLS data before connection_made (see listener.DeadlineSite)
            return
        if self._closed or (self._stopped and not self._handing_over):
            return   # closing after the answer in progress: nothing more of this client is read
        self._buffer += data
        if not self._stopped and not self._held and not self._body_full:
            self._parse()

    def eof_received(self) -> bool | None:
        # A half-close ends the connection, answers in progress with it (as on aiohttp's server):
        # asyncio closes the transport, whose close has the write deadline as the server's own.
        if self.transport is not None:
            self._write_deadline.closing(self.transport)
        return None

    def pause_writing(self) -> None:
        self._drain = self._loop.create_future()
        if self.transport is not None:
            self._write_deadline.paused(self.transport)

    def resume_writing(self) -> None:
        self._write_deadline.resumed()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._handed_over:
            return
        self._closed = True
        self._cancel_timers()
        lost = ConnectionResetError("Connection lost")
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(lost)
            self._drain.exception()   # retrieved: nobody may be waiting
        for request in [self._current, *self._queue]:
            if isinstance(request, LeanRequest) and not request.content.is_eof():
                request.content.set_exception(lost)
        self._queue.clear()
        self._wake()
        if self._slot is not None:
            self._slot.release()
        if self._registry is not None:
            self._registry.open.discard(self)

    # ------------------------------------------------------------------ reading

    def _parse(self) -> None:
        buffer = self._buffer
        while not self._stopped:
            if self._body is not None:
                take = min(self._body_left, len(buffer) - self._pos)
                if not take:
                    break
                self._body.feed(bytes(buffer[self._pos:self._pos + take]))
                self._pos += take
                self._body_left -= take
                if not self._body_left:
                    self._body.feed_eof()
                    self._body = None
                    if self._body_timer is not None:
                        self._body_timer.cancel()
                        self._body_timer = None
                if self._unread >= _BODY_HIGH_WATER:
                    self._body_full = True
                    self._pause_reading()
                    break
                if self._body is not None:
                    break   # the rest of it has not come yet
                continue
            if len(self._queue) >= self._max_pipelined:
                self._held = True
                self._pause_reading()
                break
            end = head_end(buffer, self._pos)
            if end == -1:
                self._partial_reads += 1
                if self._partial_reads <= _MAX_PARTIAL_READS:
                    break
                end = -2   # a head dripped in pieces: aiohttp's parser reads it incrementally, not this scan
            self._partial_reads = 0
            raw = bytes(buffer[self._pos:end]) if end > 0 else b""
            known = self._heads.get(raw) if self._heads is not None else None
            memo: dict[Any, Any] | None = None
            if known is not None:
                head: Head | str = known[0]
                memo = known[1]
            else:
                head = read_head(raw, self._prefixes) if raw else "not lean"
                if isinstance(head, Head) and self._heads is not None and len(raw) <= _CACHED_HEAD \
                        and len(head.headers) <= _CACHED_HEAD_FIELDS:
                    if len(self._heads) >= _CACHED_HEADS:
                        self._heads.clear()
                    memo = {}
                    self._heads[raw] = (head, memo)
            if isinstance(head, str):
                self._stopped = self._handing_over = True
                self._queue.append(_HANDOVER)
                self._pause_reading()   # what comes next is aiohttp's to read
                self._wake()
                break
            self._pos = end
            self.request_count += 1
            length = head.content_length or 0
            if length > self._max_body:
                request = LeanRequest(head, self, LeanBody(), memo)
                request.close_after = True   # answered 413 unread: its body is never taken for a head
                self._stopped = True
                self._pause_reading()
            elif length:
                body = LeanBody(on_size=self._body_resized)
                request = LeanRequest(head, self, body, memo)
                self._body, self._body_left = body, length
                if self._body_timer is not None:
                    self._body_timer.cancel()
                self._body_timer = self._loop.call_later(self._body_timeout, self._body_late, request)
            else:
                request = LeanRequest(head, self, _NO_BODY, memo)
            self._head_due = None   # the timer stays: re-arming it for each request costs more than a late wake-up
            self._queue.append(request)
            self.peak_queued = max(self.peak_queued, len(self._queue))
            self._wake()
        if self._pos and self._pos == len(buffer):
            buffer.clear()
            self._pos = 0
        elif self._pos > _COMPACT_AT and not self._stopped:
            del buffer[:self._pos]
            self._pos = 0

    def _body_resized(self, delta: int) -> None:
        self._unread += delta
        if delta < 0 and self._body_full and self._unread <= _BODY_HIGH_WATER // 2:
            self._body_full = False
            if not self._held and not self._stopped:
                self._resume_reading()
                self._parse()

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # ------------------------------------------------------------------ answering

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _serve(self) -> None:
        queue = self._queue
        while not self._closed:
            if not queue:
                self._wakeup = self._loop.create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
                continue
            item = queue.popleft()
            if self._held and len(queue) <= self._max_pipelined // 2:
                self._held = False
                if not self._body_full:
                    self._resume_reading()
                    self._parse()
            if isinstance(item, _Handover):
                self._hand_over()
                return
            self._current = item
            if self._registry is not None:
                self._registry.served += 1
            try:
                keep = await self._answer(item)
            except ConnectionResetError:   # the client went away mid-answer; the gateway has audited it
                keep = False
            except Exception:   # a defect here: this connection ends, the server goes on
                log.exception("HTTP lean server: answering %s %s failed", item.method, item.raw_path[:200])
                keep = False
            finally:
                self._current = None
            # What is left of its body (arrived or to come) is dropped: nobody reads it any more, and
            # it must not count against the bodies read ahead.
            item.content.discard()
            if not keep or self._closed or self._shutting:
                self._close()
                return
            if not queue:
                self._arm_head_timer()

    async def _answer(self, request: LeanRequest) -> bool:
        """Serve one request; whether the connection may carry another."""
        response = await self._gateway.handle(request)
        keep = request.keep_alive and not request.close_after
        if request.answered:
            # Relayed in full, or broken off (then the gateway's error answer cannot follow it).
            return keep and isinstance(response, Relayed)
        request.answered = True
        if not isinstance(response, web.Response):
            raise TypeError("the gateway answered the lean server with an unprepared stream")
        await self.write(response_bytes(request.method, response, request.keep_alive))
        return keep and response.headers.get("Connection", "").lower() != "close"

    async def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self._closed or transport.is_closing():
            raise ConnectionResetError("Connection lost")
        transport.write(data)
        if self._drain is not None:
            await self._drain

    def _close(self) -> None:
        self._closed = True
        self._wake()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
            self._write_deadline.closing(self.transport)

    def shut(self) -> asyncio.Task[None] | None:
        """End the connection after the answer in progress (the listener is stopping); its task."""
        self._shutting = True
        if self._current is None and not self._queue:
            self._close()
        return self._task

    def _hand_over(self) -> None:
        """From here the connection is aiohttp's: its handler gets the transport, the slot and
        every byte not served (the head handed over and what followed)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._cancel_timers()
        self._handed_over = True
        if self._registry is not None:
            self._registry.open.discard(self)
            self._registry.handed_over += 1
        rest = bytes(self._buffer[self._pos:])
        self._buffer = bytearray()
        # A head begun here is still due when it was (a head dripped in, then handed over, gets no new deadline).
        handler = self._fallback(self._slot, self._head_due)
        self._slot = None
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if rest:
            handler.data_received(rest)
        transport.resume_reading()

    # ------------------------------------------------------------------ deadlines

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
        self._write_deadline.ended()

    def _arm_head_timer(self) -> None:
        self._head_due = self._loop.time() + self._header_timeout
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(self._head_due, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        due = self._head_due
        if due is None or self._closed or self._current is not None or self._queue:
            return
        if self._loop.time() < due:   # a later deadline than the one this timer was set for
            self._head_timer = self._loop.call_at(due, self._head_late)
            return
        if self._pos < len(self._buffer) and self.transport is not None:
            self.transport.write(head_timeout_response(self._header_timeout))
        self._close()

    def _body_late(self, request: LeanRequest) -> None:
        self._body_timer = None
        if request.content.is_eof() or self._closed:
            return
        self._stopped = True   # what is left of the body is not waited for
        if request is self._current:
            request.close_after = True
            request.content.set_exception(RequestTimeout(
                reason=f"the request body did not arrive within {self._body_timeout:g} seconds",
                headers={"Connection": "close"}))
        else:
            self._close()   # queued behind another request: nothing to say

    # ------------------------------------------------------------------ tests and benchmarks

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def buffered_bytes(self) -> int:
        """Bytes read from the client that the gateway has not taken: unparsed, and bodies not read."""
        return len(self._buffer) - self._pos + self._unread

    def __repr__(self) -> str:
        return f"<LeanConnection {self.remote} requests={self.request_count} queued={len(self._queue)}>"


def lean_prefixes(*paths: str | None) -> tuple[str, ...]:
    """The mounted prefixes (the ownership API, the portal) as the lean head check compares them."""
    return tuple(p.rstrip("/") for p in paths if p)

