"""The lean upstream client (proxy.http.upstream) against a scripted upstream on a real socket:
keep-alive reuse, and the answers that must never put a pooled connection out of step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from proxy.http.upstream import _HIGH_WATER, UpstreamError, UpstreamPool, UpstreamTimeout, pool_for

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Scripted:
    """Answers each request head with ``answer(n)`` (n counts requests); counts connections."""

    def __init__(self, answer: Callable[[int], bytes | None]):
        self.answer = answer
        self.connections = 0
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                data = self.answer(self.requests)
                if data is None:   # hang: say nothing
                    await reader.read()
                    return
                writer.write(data)
                await writer.drain()
                if data.endswith(b"<close>"):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _get(pool: UpstreamPool, path: str = "/v2/entities/a-1") -> tuple[int, list[tuple[str, str]], bytes]:
    response = await pool.request("GET", path, [], None)
    try:
        return response.status, response.headers, await response.read()
    finally:
        response.release()


async def test_keep_alive_connections_are_reused():
    async with Scripted(lambda n: OK) as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        for _ in range(3):
            assert await _get(pool) == (200, [("Content-Length", "2")], b"ok")
        assert up.connections == 1
        await pool.close()


async def test_an_answer_that_closes_is_not_reused():
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with Scripted(lambda n: answer) as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        await _get(pool)
        await _get(pool)
        assert up.connections == 2
        await pool.close()


async def test_a_second_answer_in_the_same_segment_is_not_read_as_the_next_requests():
    # Response splitting / desync: an upstream (or something injected into its answer) sends two
    # answers to one request. Pooled as it is, the next caller would read the planted one.
    planted = b"HTTP/1.1 200 OK\r\nX-Planted: 1\r\nContent-Length: 7\r\n\r\nplanted"

    def answer(n: int) -> bytes:
        return OK + planted if n == 1 else b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"

    async with Scripted(answer) as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        status, headers, body = await _get(pool)
        assert (status, body) == (200, b"ok") and ("X-Planted", "1") not in headers
        assert await _get(pool) == (200, [("Content-Length", "6")], b"second")
        assert up.connections == 2   # the connection that carried the planted answer was dropped
        await pool.close()


async def test_an_answer_before_the_streamed_body_is_sent_does_not_pool_the_connection():
    # An upstream that answers at the head and does not read the body (an early 413, a broken
    # server): the rest of the body is still on that connection, and pooled, its bytes would be
    # read as the next caller's request. The connection is dropped instead.
    answered = asyncio.Event()

    def answer(n: int) -> bytes:
        answered.set()
        return OK

    async def body():
        yield b"first part;"
        await answered.wait()
        await asyncio.sleep(0.5)   # (ordering only: the answer reaches the client before the rest)
        yield b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

    async with Scripted(answer) as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        response = await pool.request("PATCH", "/v2/entities/a-1/attrs", [("Content-Length", "49")], body())
        assert response.status == 200 and await response.read() == b"ok"
        response.release()
        assert await _get(pool) == (200, [("Content-Length", "2")], b"ok")
        assert up.connections == 2   # the second request went on a fresh connection
        await pool.close()


async def test_a_large_answer_is_relayed_in_pieces_and_the_connection_stays_usable():
    # More than the client is given at once: reading Orion pauses while the bytes wait (a slow
    # client cannot make the gateway hold all of a large answer), and resumes as they are taken.
    big = bytes(range(256)) * 8192   # 2 MiB
    answers = {1: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big), 2: OK}
    async with Scripted(lambda n: answers[n]) as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        response = await pool.request("GET", "/", [], None)
        # Nobody reads for a while: what is held stops near the high-water mark, not at 2 MiB.
        while response._buffered < _HIGH_WATER:
            await asyncio.sleep(0.005)
        for _ in range(20):   # room for the reader to overfill, if it did not pause
            await asyncio.sleep(0.005)
        assert response._buffered < 2 * _HIGH_WATER
        got = []
        async for chunk in response.chunks():
            got.append(chunk)
        response.release()
        assert b"".join(got) == big
        assert await _get(pool) == (200, [("Content-Length", "2")], b"ok")
        assert up.connections == 1
        await pool.close()


async def test_an_answer_cut_short_is_an_error_not_a_short_body():
    # ten bytes of the promised twenty, then the upstream closes
    async with Scripted(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nabc<close>") as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        response = await pool.request("GET", "/", [], None)
        with pytest.raises(UpstreamError):
            await response.read()
        response.release()
        await pool.close()


async def test_a_garbled_answer_is_an_upstream_error():
    async with Scripted(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"2\r\nok\r\n0\r\n\r\n") as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        with pytest.raises(UpstreamError):
            await pool.request("GET", "/", [], None)
        await pool.close()


async def test_an_upstream_that_never_answers_times_out():
    async with Scripted(lambda n: None) as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=0.2)
        with pytest.raises(UpstreamTimeout):
            await pool.request("GET", "/", [], None)
        await pool.close()


async def test_a_refused_connection_is_an_upstream_error():
    async with Scripted(lambda n: OK) as up:
        port = up.port
    pool = UpstreamPool("127.0.0.1", port, timeout=2)
    with pytest.raises(UpstreamError):
        await pool.request("GET", "/", [], None)
    await pool.close()


@pytest.mark.parametrize("upstream,host", [("http://orion:1026", "orion:1026"), ("http://orion", "orion"),
                                           ("http://[::1]:1026", "[::1]:1026")])
async def test_the_host_header_is_written_as_the_old_client_wrote_it(upstream, host):
    pool = pool_for(upstream, timeout=1)
    assert pool is not None and pool.host_header == host


@pytest.mark.parametrize("upstream", ["https://orion:1026", "http://orion:1026/prefix", "http://u@orion:1026"])
async def test_what_the_lean_client_does_not_speak_stays_on_the_old_one(upstream):
    assert pool_for(upstream, timeout=1) is None


def _head(headers: int, value: bytes = b"v", reason: bytes = b"OK") -> bytes:
    return (b"HTTP/1.1 200 " + reason + b"\r\n" + b"".join(b"X-H-%d: %s\r\n" % (i, value) for i in range(headers))
            + b"Content-Length: 2\r\n\r\nok")


@pytest.mark.parametrize("answer", [_head(128), _head(129), _head(1, b"v" * 8191), _head(1, reason=b"O" * 8191),
                                    b"HTTP/1.1 200 OK\r\nX-Endless: " + b"v" * (8 << 20)],
                         ids=["129 headers", "130 headers", "a value over 8190 bytes", "a reason over 8190 bytes",
                              "an 8 MiB value, unterminated"])
async def test_a_head_over_the_old_clients_limits_is_an_upstream_error(answer):
    # aiohttp's client, the gateway's for an https:// Orion, refuses a head of more than 128 headers,
    # or a field or reason of more than 8190 bytes (502). The lean client held every byte of any head
    # (an Orion writing headers for upstream_timeout_seconds filled the gateway's memory) and relayed it.
    async with Scripted(lambda n: answer) as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=30)
        with pytest.raises(UpstreamError) as caught:
            await asyncio.wait_for(pool.request("GET", "/", [], None), 5)
        assert not isinstance(caught.value, UpstreamTimeout)   # refused as it came, not once the timer ran out
        await pool.close()


async def test_a_head_within_the_old_clients_limits_is_read():
    async with Scripted(lambda n: _head(127, b"v" * 8190, b"O" * 8190)) as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        status, headers, body = await _get(pool)
        assert (status, len(headers), body) == (200, 128, b"ok")
        await pool.close()


async def test_a_header_value_is_read_without_its_trailing_whitespace():
    # llhttp strips the whitespace before a value, not after (RFC 9110 5.5: neither is part of it);
    # aiohttp's client strips both. Kept, "Content-Length: 2 " was no length to the gateway, which
    # relayed a chunked answer (and a HEAD's answer without its length) where the old client kept it.
    async with Scripted(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 2 \t\r\nX-A: v  \r\n\r\nok") as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        assert await _get(pool) == (200, [("Content-Length", "2"), ("X-A", "v")], b"ok")
        await pool.close()


async def test_a_head_is_read_as_utf_8_with_surrogate_escapes_as_the_old_client_reads_it():
    # Read as Latin-1, Orion's "caf\xc3\xa9" (a correlator it echoes, say) went out encoded twice.
    answer = (b"HTTP/1.1 200 Tr\xc3\xa8s bien\r\nFiware-Correlator: caf\xc3\xa9\r\nX-Odd: a\xffb\r\n"
              b"Content-Length: 2\r\n\r\nok")
    async with Scripted(lambda n: answer) as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        response = await pool.request("GET", "/", [], None)
        try:
            assert response.reason == "Tr\u00e8s bien"
            assert response.headers[:2] == [("Fiware-Correlator", "caf\u00e9"), ("X-Odd", "a\udcffb")]
        finally:
            response.release()
        await pool.close()


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"],
                         ids=["no framing", "HTTP/1.0", "a coding other than chunked"])
async def test_an_answer_whose_body_ends_with_the_connection_is_whole_at_its_close(head):
    # RFC 9112 6.3: no Content-Length and not chunked, the body is what comes until the close. The
    # lean client took that close for a break: the relay ended the client's connection with the
    # body cut short (a chunked answer without its last chunk), where aiohttp's client (https://) relays it whole.
    async with Scripted(lambda n: head + b"hello<close>") as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        assert await _get(pool) == (200, [h for h in _headers(head)], b"hello<close>")
        await pool.close()


def _headers(head: bytes) -> list[tuple[str, str]]:
    return [tuple(line.decode().split(": ", 1)) for line in head.split(b"\r\n")[1:] if line]  # type: ignore[misc]


async def test_an_answer_read_until_the_close_is_cut_short_when_the_gateway_ends_the_connection():
    # Only the upstream's close ends such a body: the pool's own abort (its close, a timeout) is a break.
    async with Scripted(lambda n: b"HTTP/1.1 200 OK\r\n\r\npart") as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=5)
        response = await pool.request("GET", "/", [], None)
        await pool.close()
        with pytest.raises(UpstreamError):
            await response.read()
        response.release()


async def test_reading_ahead_waits_for_a_body_below_the_high_water_mark_and_stops_at_it():
    # The gateway waits for an answer's body before it writes to the client (s29-b finding 1): a
    # small one is whole when read_ahead returns, a large one stops at the high-water mark.
    big = b"b" * (4 * _HIGH_WATER)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            body = big if b" /big " in head else b"small" * 1000
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[:10]))
            await writer.drain()
            await asyncio.sleep(0.05)   # the rest of the body in another read
            writer.write(body[10:])
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = UpstreamPool("127.0.0.1", server.sockets[0].getsockname()[1], timeout=5)
    response = await pool.request("GET", "/small", [], None)
    assert not response.complete
    await response.read_ahead()
    assert response.complete and await response.read() == b"small" * 1000
    response.release()
    response = await pool.request("GET", "/big", [], None)
    await response.read_ahead()
    assert not response.complete and _HIGH_WATER <= response._buffered < 2 * _HIGH_WATER
    assert b"".join([chunk async for chunk in response.chunks()]) == big
    response.release()
    await pool.close()
    server.close()


async def test_reading_ahead_of_a_stalled_body_leaves_the_timeout_to_the_relay():
    # Orion stops mid-body: read_ahead returns after the timeout (the head is not yet written, the
    # relay decides), and the bytes that came are read before the timeout is raised.
    async with Scripted(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nabc") as up:
        pool = UpstreamPool("127.0.0.1", up.port, timeout=0.2)
        response = await pool.request("GET", "/", [], None)
        await response.read_ahead()
        assert not response.complete
        got = []
        with pytest.raises(UpstreamTimeout):
            async for chunk in response.chunks():
                got.append(chunk)
        assert got == [b"abc"]
        response.release()
        assert not pool._held and pool._slots._free == 256
        await pool.close()


async def test_a_reason_phrase_split_between_reads_inside_a_character_is_read_whole():
    # llhttp hands the reason phrase over in pieces, one per read: decoded piece by piece, a
    # character cut between two reads became two lone surrogates (which the lean heads leave
    # out) where the old client, reading the head whole, read it (s29-b finding 2).
    answer = b"HTTP/1.1 200 Tr\xc3\xa8s bien\r\nContent-Length: 2\r\n\r\nok"
    cut = answer.index(b"\xa8")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer[:cut])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(answer[cut:])
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = UpstreamPool("127.0.0.1", server.sockets[0].getsockname()[1], timeout=5)
    response = await pool.request("GET", "/", [], None)
    try:
        assert response.reason == "Tr\u00e8s bien"
        assert await response.read() == b"ok"
    finally:
        response.release()
    await pool.close()
    server.close()


@pytest.mark.parametrize("codings", [b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                                     b"Transfer-Encoding: gzip\r\nTransfer-Encoding: x, chunked\r\n"])
async def test_a_chunked_answer_cut_short_is_an_error_whatever_line_its_chunked_coding_is_on(codings):
    # llhttp takes the codings of every Transfer-Encoding line, chunked last: a chunked body, cut
    # here by the upstream's close. The close was taken for its end when the first line's coding
    # was not chunked, so the cut answer was whole and relayed with a last chunk (s29-b finding 3).
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n" + codings + b"\r\n5\r\nhello\r\n3\r\nab")   # 1 of 3 bytes left
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = UpstreamPool("127.0.0.1", server.sockets[0].getsockname()[1], timeout=5)
    response = await pool.request("GET", "/", [], None)
    with pytest.raises(UpstreamError):
        await response.read()
    assert not response.complete
    response.release()
    await pool.close()
    server.close()


async def test_a_trailer_past_the_heads_limits_is_an_upstream_error_as_it_comes():
    # llhttp hands a chunked answer's trailer fields to on_header as it does the head's, and httptools
    # holds a field until it ends: the head's byte bound (_head_left) ended with the head, so an
    # upstream writing one endless trailer value grew the gateway's memory (and copied it whole at
    # every read) until the timeout between reads (s29-b finding 4).
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Endless: ")
        try:
            for _ in range(8 << 4):   # 8 MiB, unterminated
                writer.write(b"v" * (64 << 10))
                await writer.drain()
            await reader.read()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = UpstreamPool("127.0.0.1", server.sockets[0].getsockname()[1], timeout=30)
    response = await pool.request("GET", "/", [], None)
    with pytest.raises(UpstreamError) as caught:
        await asyncio.wait_for(response.read(), 5)
    assert not isinstance(caught.value, UpstreamTimeout)   # refused as it came, not once the timer ran out
    response.release()
    await pool.close()
    server.close()
