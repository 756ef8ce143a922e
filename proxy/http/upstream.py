"""The lean upstream client: pooled keep-alive HTTP/1.1 connections to Orion on an ``asyncio.Protocol``.

What the gateway needs of a client, and nothing else: write one request whose head the
gateway has already decided (method, canonical target, the header list it built), read
one response with a C parser (``httptools``, llhttp), hand back its status, its headers
as sent and its body as bytes. No cookie jar, redirects, decompression, proxy support,
header merging or per-request objects beyond one response.

The request on the wire is the one ``aiohttp.ClientSession`` sent for the same call (the
old path, kept for an ``https://`` upstream or one with a path, and selectable with
``GatewayHandler(client="aiohttp")``; the differential test compares the bytes): ``Host``
first, the gateway's headers in its order, then ``Accept: */*`` when the gateway set none,
``Content-Length: 0`` for a bodiless method that takes a body, and
``Content-Type: application/octet-stream`` where aiohttp added it.

A connection goes back to the pool only after a complete response that keeps it alive
(``should_keep_alive``); a response to ``HEAD``, whose length llhttp cannot know, ends the
connection after its head. Timeouts follow the old client's: ``timeout`` to connect, and
``timeout`` between reads.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import re
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

# aiohttp's ClientRequest: these methods get Content-Length: 0 without a body, and
# POST_METHODS a Content-Type when none is set.
_GET_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_POST_METHODS = frozenset({"PATCH", "POST", "PUT"})
_HIGH_WATER = 256 * 1024   # answer bytes held for a client before reading Orion pauses
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")   # what aiohttp's header writer refuses (tab is allowed)
# The old client's (aiohttp's) limits on an answer's head: llhttp has none, and holds a field
# until it ends. Past them the answer is an UpstreamError (502), as the old client's was.
_MAX_HEADERS = 128
_MAX_FIELD = 8190                                    # a header name or value, the reason phrase
_MAX_HEAD = (_MAX_HEADERS + 1) * 2 * (_MAX_FIELD + 4)   # bytes before the head ends: every field at its limit


class UpstreamError(Exception):
    """The upstream could not be reached, or broke off, or answered something that is not HTTP."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """No connection, or no bytes, within the timeout."""


class UpstreamBusy(UpstreamError):
    """Every connection the pool may open is taken, and none came free within the timeout: the
    request was not sent (its outcome is known)."""


def request_head(method: str, target: str, host: str, headers: list[tuple[str, str]],
                 body: bytes | AsyncIterator[bytes] | None) -> bytes:
    """The request head as the old path (aiohttp's client) wrote it for the same call."""
    return _request_head(method, target, host, tuple(headers), body is None, body is not None)


@functools.lru_cache(maxsize=1024)   # clients repeat their requests: the same head, byte for byte
def _request_head(method: str, target: str, host: str, headers: tuple[tuple[str, str], ...], bodiless: bool,
                  has_body: bool) -> bytes:
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{n}: {v}" for n, v in headers]
    if "accept" not in names:
        lines.append("Accept: */*")
    if bodiless and method not in _GET_METHODS and "content-length" not in names:
        lines.append("Content-Length: 0")
    if "content-type" not in names and (method in _POST_METHODS or has_body):
        lines.append("Content-Type: application/octet-stream")
    # Header names and values come from parsed requests and quoted identities: a control
    # character (CR, LF, NUL...) in one would be a bug elsewhere, and a CR/LF would split the
    # upstream request (smuggling). Refused as aiohttp's writer refuses them, all lines at once.
    if _CONTROL.search("".join(lines)):
        raise ValueError("a request line or header contains a control character")
    # UTF-8 as aiohttp wrote it; what its parser read as surrogate escapes goes out as it came in.
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


class UpstreamResponse:
    """One response: ``status``, ``reason``, ``headers`` as sent; the body read with :meth:`read`
    or :meth:`chunks`. :meth:`release` gives the connection back (or closes it)."""

    __slots__ = ("_buffered", "_conn", "_done", "_error", "_parts", "_waiter", "headers", "reason", "status")

    def __init__(self, conn: _Connection):
        self._conn = conn
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self._parts: collections.deque[bytes] = collections.deque()
        self._buffered = 0   # bytes in _parts
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def header(self, name: str) -> str | None:
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return None

    @property
    def complete(self) -> bool:
        """The whole body has arrived (the common case for Orion's small answers)."""
        return self._done and self._error is None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            while self._parts:
                part = self._parts.popleft()
                self._buffered -= len(part)
                if self._buffered < _HIGH_WATER:
                    self._conn.resume()
                yield part
            if self._error is not None:
                raise self._error
            if self._done:
                return
            await self._more()

    async def _more(self) -> None:
        """Wait for the upstream's next bytes, within the timeout between reads; on any failure
        (the timeout, a cancellation) the connection is aborted and the error raised."""
        waiter = self._waiter = self._conn.loop.create_future()
        timer = self._conn.loop.call_later(self._conn.pool.timeout, self._conn._late, waiter)
        try:
            await waiter
        except BaseException:
            self._conn.abort()
            raise
        finally:
            timer.cancel()
            self._waiter = None

    async def read_ahead(self) -> None:
        """Wait until the body is in whole or what is read ahead of the client reaches the high-water
        mark (where reading Orion pauses), within the timeout between reads: a small answer that came
        in more reads than its head is then :attr:`complete`. Raises only on cancellation; a break or a
        timeout is the answer's error, which :meth:`chunks` raises after the bytes that came."""
        while not self._done and self._buffered < _HIGH_WATER:
            try:
                await self._more()
            except UpstreamTimeout as exc:
                self._conn._fail(exc)

    async def read(self) -> bytes:
        if self._done and self._error is None:
            body = b"".join(self._parts)
            self._parts.clear()
            self._buffered = 0
            self._conn.resume()
            return body
        return b"".join([chunk async for chunk in self.chunks()])

    def release(self) -> None:
        self._conn.finished(self)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.head: asyncio.Future[None] | None = None
        self.reusable = False   # the last response ended cleanly and keeps the connection alive
        self.closed = False
        self._head_only = False
        self._began = False
        self._paused = False
        # The answer began while the request body was still going out: the upstream may not have
        # read the rest, which would then be read as the next request (smuggling). Not pooled.
        self._sending_body = False
        self._answered_early = False
        self._head_left: int | None = _MAX_HEAD   # bytes the answer's head may still take (None once it is in)
        self._reason = b""   # the reason phrase's bytes: llhttp gives them a read at a time
        # Bytes since the last body bytes that were not body (chunk framing, a chunked answer's
        # trailer fields, which httptools holds as it holds the head's): bounded as the head is.
        self._framing = 0
        self._body_bytes = 0   # body bytes fed so far (on_body)
        self._peer_closed = False   # the upstream ended its side (not the gateway's abort)

    # -- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream connection's is an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self.pool.forget(self)
        response = self.response
        if response is not None and not response._done:
            if not self._ends_at_close(response):
                response._error = UpstreamError("the upstream closed the connection mid-response")
            response._done = True
            response._wake()
        if self.head is not None and not self.head.done():
            self.head.set_exception(UpstreamError("the upstream closed the connection"))

    def eof_received(self) -> bool | None:
        self._peer_closed = True   # asyncio closes the transport next
        return None

    def data_received(self, data: bytes) -> None:
        if self.response is None:   # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        try:
            head_open, body_before = self._head_left is not None, self._body_bytes
            self.parser.feed_data(data)
            if self._head_left is not None:   # the head is not complete yet
                self._head_left -= len(data)
                if self._head_left < 0:
                    raise UpstreamError("the upstream's answer has a head too large")
            elif not head_open:
                self._framing += len(data) - (self._body_bytes - body_before)
                if self._framing > _MAX_HEAD:
                    raise UpstreamError("the upstream's answer has trailer fields too large")
        except UpstreamError as exc:
            self._fail(exc)
        except httptools.HttpParserCallbackError as exc:
            self._fail(exc.__context__ if isinstance(exc.__context__, UpstreamError) else UpstreamError(str(exc)))
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the upstream answered with a protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"the upstream's answer does not parse: {exc}"))

    def _ends_at_close(self, response: UpstreamResponse) -> bool:
        """Whether the close is where the answer's body ends: the upstream closed, and the head is in
        and gives neither a length nor chunked framing (RFC 9112 6.3; llhttp reads such a body until
        the close). An abort of the gateway's (a timeout, the pool's close) is a break."""
        if not self._peer_closed or self._head_left is not None:
            return False
        # The last coding of all the Transfer-Encoding lines together, as llhttp reads them.
        codings = ",".join(v for k, v in response.headers if k.lower() == "transfer-encoding")
        coding = codings.rsplit(",", 1)[-1].strip().lower()
        return coding != "chunked" and response.header("Content-Length") is None

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        # One answer per request: bytes past it (a second answer in the same segment, which llhttp
        # would parse into this response) mean the upstream and the pool disagree on where answers
        # end, and the next request could read this one's. The connection is dropped.
        if self._began:
            raise UpstreamError("the upstream sent more than one answer to one request")
        self._began = True
        if self._sending_body:
            self._answered_early = True

    def on_status(self, status: bytes) -> None:
        assert self.response is not None  # noqa: S101 (data_received checked it)
        # Decoded once whole (on_headers_complete): a character may be cut between two reads.
        self._reason += status
        if len(self._reason) > _MAX_FIELD:
            raise UpstreamError("the upstream's answer has a reason phrase too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None  # noqa: S101
        if self._head_left is None:   # a chunked answer's trailer field: dropped, as aiohttp's client drops it
            return
        headers = self.response.headers
        if len(headers) >= _MAX_HEADERS or len(name) > _MAX_FIELD or len(value) > _MAX_FIELD:
            raise UpstreamError("the upstream's answer has too many headers, or one too long")
        # llhttp strips the whitespace before a value, not after it; aiohttp's client strips both.
        headers.append((name.decode("utf-8", "surrogateescape"),
                        value.rstrip(b" \t").decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None  # noqa: S101
        self._head_left = None
        # UTF-8 with surrogate escapes, as aiohttp's client reads a head (the relays write UTF-8).
        response.reason = self._reason.decode("utf-8", "surrogateescape")
        response.status = self.parser.get_status_code()
        if 100 <= response.status < 200:   # no Expect is ever sent: an interim answer is a broken upstream
            raise httptools.HttpParserError("interim response")
        if self.head is not None and not self.head.done():
            self.head.set_result(None)
        if self._head_only:   # a HEAD's answer has no body whatever its Content-Length says
            response._done = True
            self.reusable = False
            response._wake()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None  # noqa: S101
        self._body_bytes += len(body)
        self._framing = 0
        if not self._head_only:
            response._parts.append(body)
            response._buffered += len(body)
            if response._buffered >= _HIGH_WATER and self.transport is not None and not self._paused:
                # A large answer to a slow client: stop reading Orion until the client has taken some.
                self._paused = True
                self.transport.pause_reading()
            response._wake()

    def on_message_complete(self) -> None:
        response = self.response
        assert response is not None  # noqa: S101
        response._done = True
        self.reusable = not self._head_only and self.parser.should_keep_alive()
        response._wake()

    # -- the gateway's side
    def _fail(self, exc: BaseException) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
        if self.response is not None and not self.response._done:
            self.response._error = exc
            self.response._done = True
            self.response._wake()
        self.abort()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    async def exchange(self, method: str, head: bytes, body: bytes | AsyncIterator[bytes] | None) -> UpstreamResponse:
        assert self.transport is not None  # noqa: S101 (connected before use)
        response = self.response = UpstreamResponse(self)
        self.reusable = False
        self._head_only = method == "HEAD"
        self._began = False
        self._answered_early = False
        self._head_left = _MAX_HEAD
        self._reason = b""
        self._framing = 0
        self.parser = httptools.HttpResponseParser(self)
        self.head = self.loop.create_future()
        if body is None or isinstance(body, bytes):
            self.transport.write(head + body if body else head)
        else:
            self.transport.write(head)
            self._sending_body = True
            try:
                async for chunk in body:
                    if self.closed:
                        break
                    self.transport.write(chunk)
            except BaseException:
                self.abort()   # a body cut short leaves the upstream waiting for the rest
                raise
            finally:
                self._sending_body = False
        # A timer rather than asyncio.wait_for, which costs a task switch per request.
        timer = self.loop.call_later(self.pool.timeout, self._late, self.head)
        try:
            await self.head
        except BaseException:
            self.abort()
            raise
        finally:
            timer.cancel()
            self.head = None
        return response

    def _late(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(UpstreamTimeout("the upstream did not answer in time"))

    def finished(self, response: UpstreamResponse) -> None:
        if response is not self.response:
            return
        self.response = None
        if self.reusable and response._done and not self.closed and not self._answered_early:
            self.resume()
            self.pool.put_back(self)
        else:
            self.abort()
            self.pool.forget(self)


def _busy(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamBusy("no connection to the upstream came free in time"))


class _Slots:
    """A counting semaphore without asyncio's per-call bookkeeping (``Semaphore.locked`` scans
    its waiters on every acquire): a free slot is taken at once, else the first waiter gets the
    next one given back."""

    __slots__ = ("_free", "_waiters")

    def __init__(self, limit: int):
        self._free = limit
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self, timeout: float) -> None:
        """A slot, or UpstreamBusy once ``timeout`` has passed without one: the requests waiting
        for a connection that clients reading slowly hold (a large answer, relayed as they read it)
        are answered, not kept for as long as those clients take."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(timeout, _busy, waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()   # given a slot, but gone before taking it: the next one has it
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        finally:
            timer.cancel()

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class UpstreamPool:
    """Keep-alive connections to one ``http://host:port`` upstream, at most ``limit`` at once
    (as the old client's connector), the most recently used first."""

    def __init__(self, host: str, port: int, *, timeout: float, limit: int = 256):
        self.host, self.port = host, port
        self.host_header = f"{host}:{port}"
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._slots = _Slots(limit)
        self._held: dict[_Connection, bool] = {}

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Connection(self), self.host, self.port), self.timeout)
        except TimeoutError:
            raise UpstreamTimeout("no connection to the upstream in time") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to the upstream: {exc}") from exc
        self._open.add(conn)
        return conn

    async def request(self, method: str, target: str, headers: list[tuple[str, str]],
                      body: bytes | AsyncIterator[bytes] | None) -> UpstreamResponse:
        """Send one request; the answer's head is in. The caller must ``release()`` it."""
        head = request_head(method, target, self.host_header, headers, body)
        await self._slots.acquire(self.timeout)
        try:
            conn = await self._connection()
        except BaseException:
            self._slots.release()
            raise
        self._held[conn] = True
        try:
            return await conn.exchange(method, head, body)
        except BaseException:
            conn.abort()
            self.forget(conn)
            raise

    def put_back(self, conn: _Connection) -> None:
        if self._held.pop(conn, None):
            self._slots.release()
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        if self._held.pop(conn, None):
            self._slots.release()
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    async def close(self) -> None:
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        self._open.clear()


def pool_for(upstream: str, *, timeout: float, limit: int = 256) -> UpstreamPool | None:
    """A pool for ``http.upstream`` when it is plain ``http://host[:port]`` (with no path, user or
    query), else None: the gateway then keeps the old client (TLS to Orion, a path prefix)."""
    parts = urlsplit(upstream)
    if parts.scheme != "http" or not parts.hostname or parts.path.strip("/") or parts.query or parts.username:
        return None
    pool = UpstreamPool(parts.hostname, parts.port or 80, timeout=timeout, limit=limit)
    # As aiohttp's client wrote it: the name as given (an IPv6 literal in brackets), the port
    # only when it is not the scheme's.
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    pool.host_header = name if parts.port in (None, 80) else f"{name}:{parts.port}"
    return pool


__all__ = ["UpstreamBusy", "UpstreamError", "UpstreamPool", "UpstreamResponse", "UpstreamTimeout", "pool_for",
           "request_head"]
