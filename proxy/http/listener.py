"""The HTTP listener: aiohttp's server, with deadlines for slow clients (slowloris).

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
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler


class RequestTimeout(web.HTTPRequestTimeout):
    """The body did not arrive in time."""


def _head_timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": "RequestTimeout",
                       "description": f"the request head did not arrive within {seconds:g} seconds"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class DeadlineRequestHandler(RequestHandler):
    """aiohttp's protocol, plus the 408 for a late head and the body deadline."""

    __slots__ = ("_body_timeout", "_body_timer", "_body_payload", "_head_started", "_late_head_response")

    def __init__(self, manager: web.Server, *, header_timeout: float, body_timeout: float, **kwargs: Any):
        super().__init__(manager, keepalive_timeout=header_timeout, **kwargs)
        self._body_timeout = body_timeout
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_payload: Any = None
        self._head_started = False
        self._late_head_response = _head_timeout_response(header_timeout)

    def data_received(self, data: bytes) -> None:
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
        self._body_payload = None
        super().connection_lost(exc)


class DeadlineSite(web.TCPSite):
    """A TCP(+TLS) site whose connections get :class:`DeadlineRequestHandler` and a handshake deadline."""

    __slots__ = ("_header_timeout", "_body_timeout")

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, header_timeout: float, body_timeout: float,
                 **kwargs: Any):
        super().__init__(runner, host, port, **kwargs)
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)   # registers the site with its runner; the rest is TCPSite.start's
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        # The handler takes the server's own keyword arguments (access log, debug...), as aiohttp's would.
        handler_kwargs = {k: v for k, v in server._kwargs.items() if k != "keepalive_timeout"}

        def protocol() -> DeadlineRequestHandler:
            return DeadlineRequestHandler(server, loop=loop, header_timeout=self._header_timeout,
                                          body_timeout=self._body_timeout, **handler_kwargs)

        self._server = await loop.create_server(
            protocol, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=self._header_timeout if self._ssl_context else None)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
