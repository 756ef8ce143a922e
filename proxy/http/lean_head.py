"""Which request heads the lean server serves itself, read with llhttp (``httptools``); sans-IO.

The lean server (:mod:`.lean_server`) is a fast path, not a second HTTP implementation: it
serves only the plain shape of an NGSI request, and hands every other connection, at the
first head it does not take, to aiohttp's server with the bytes it has not served, so
aiohttp answers those exactly as it does without the fast path. A head is served here when
all of these hold (else :func:`read_head` says why it is handed over):

* it parses in full with llhttp (strict: no obs-fold, no bare LF, no invalid characters),
  within aiohttp's limits (8190 bytes a line and a field, :data:`MAX_HEADERS` fields);
* it is ``HTTP/1.1`` with one ``Host``, a method of NGSI-v2, no ``Transfer-Encoding``,
  ``Upgrade`` or ``Expect``, and at most one ``Content-Length`` of plain digits;
* its target is origin-form under ``/v2`` with no ``%``, ``#``, backslash or dot segment, and
  not under the ownership API's or the portal's prefix: for such a target the raw path is
  the decoded one, so aiohttp's router would send it to the same catch-all handler.

Header names and values are UTF-8 (a head with any other byte sequence is aiohttp's), decoded
as aiohttp's parser decodes them, so the gateway reads the same strings on either server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

#: Longest request line and longest header name or value aiohttp's parser takes (its defaults).
MAX_LINE = 8190
#: Most header fields a head served here may have (aiohttp's own limit is far higher: beyond
#: this, aiohttp decides).
MAX_HEADERS = 100
#: Bytes without the end of a head after which the head is aiohttp's to answer (a long head,
#: or garbage): the lean server never buffers more than this (plus one read) for a head.
MAX_HEAD = 2 * MAX_LINE
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REFUSED_HEADERS = frozenset({"transfer-encoding", "upgrade", "expect"})


@dataclass(frozen=True, slots=True)
class Head:
    """A request head the lean server serves."""

    method: str
    target: str                            # as sent: the raw path and query
    headers: CIMultiDictProxy[str]         # names and values as sent, in order (read-only)
    host: str
    content_length: int | None
    keep_alive: bool


class _Fields:
    __slots__ = ("url", "fields", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def lean_target(target: str, prefixes: tuple[str, ...]) -> bool:
    """Whether aiohttp would route ``target`` to the gateway's catch-all with this very raw path."""
    if not (target.startswith("/v2/") or target == "/v2" or target.startswith("/v2?")):
        return False
    if not target.isascii() or _ODD_TARGET.search(target) is not None:
        return False
    path = target.split("?", 1)[0]
    return not any(path == p or path.startswith(p + "/") for p in prefixes)


# An encoding, a fragment, a backslash, white space, or a dot segment (before the query).
_ODD_TARGET = re.compile(r"[%#\\\s]|/\.\.?(?:/|\?|$)")


def read_head(head: bytes, prefixes: tuple[str, ...]) -> Head | str:
    """``head``, ending with its blank line, as a :class:`Head`; or why aiohttp serves it instead."""
    if len(head) > MAX_HEAD:
        return "head too long"
    if head.count(b"\n") != head.count(b"\r\n"):
        return "bare LF"   # (llhttp in strict mode refuses it too: said here, not left to its flags)
    fields = _Fields()
    parser = httptools.HttpRequestParser(fields)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        return "upgrade"
    except httptools.HttpParserError:
        return "does not parse"
    if not fields.complete:
        return "incomplete head"
    if parser.get_http_version() != "1.1":
        return "not HTTP/1.1"
    method = parser.get_method().decode("ascii", "replace")
    if method not in METHODS:
        return "method"
    if len(fields.url) > MAX_LINE:
        return "line too long"
    target = fields.url.decode("utf-8", "surrogateescape")
    if not lean_target(target, prefixes):
        return "target"
    if len(fields.fields) > MAX_HEADERS:
        return "too many headers"
    headers: list[tuple[str, str]] = []
    hosts: list[str] = []
    lengths: list[str] = []
    keep_alive = True   # HTTP/1.1 unless a Connection header says close (llhttp's flag is not set yet here)
    for raw_name, raw_value in fields.fields:
        if len(raw_name) > MAX_LINE or len(raw_value) > MAX_LINE:
            return "field too long"
        try:   # not UTF-8: aiohttp reads it (with surrogate escapes) and answers it
            name = raw_name.decode("utf-8")
            value = raw_value.decode("utf-8")
        except UnicodeDecodeError:
            return "not UTF-8"
        low = name.lower()
        if low in _REFUSED_HEADERS:
            return low
        if low == "host":
            hosts.append(value)
        elif low == "content-length":
            lengths.append(value)
        elif low == "connection" and "close" in (token.strip().lower() for token in value.split(",")):
            keep_alive = False
        headers.append((name, value))
    if len(hosts) != 1:
        return "Host"
    length: int | None = None
    if lengths:
        if len(lengths) != 1 or not lengths[0].isascii() or not lengths[0].isdigit() or len(lengths[0]) > 18:
            return "Content-Length"
        length = int(lengths[0])
    return Head(method, target, CIMultiDictProxy(CIMultiDict(headers)), hosts[0], length, keep_alive)


def head_end(buffer: bytes | bytearray, start: int) -> int:
    """Where the head beginning at ``start`` ends (just after its first CRLF CRLF); -1 while it has
    not arrived; -2 when what has arrived cannot become one the lean server serves (a bare LF, too
    long already, garbage). A whole head's bare LFs are :func:`read_head`'s to find: the lean
    server reads a head it has seen before from its cache, checked when it was first read."""
    end = buffer.find(b"\r\n\r\n", start, start + MAX_HEAD + 4)
    if end >= 0:
        return end + 4
    if len(buffer) - start > MAX_HEAD or buffer.count(b"\n", start) != buffer.count(b"\r\n", start):
        return -2
    return -1 if _plausible(bytes(buffer[start:])) else -2


_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_REQUEST_LINE = re.compile(rb"[A-Z]{1,16} [\x21-\x7e]+ HTTP/1\.1")
_LINE_START = re.compile(rb"[A-Z]{0,16}(?: [\x21-\x7e]*(?: [\x21-\x7e]*)?)?\r?")


def _plausible(partial: bytes) -> bool:
    """Whether a head not complete yet can still become one served here: garbage (a TLS hello on
    the plain port, binary) goes to aiohttp at once, to be answered 400, not at the head deadline."""
    line, crlf, _ = partial.partition(b"\r\n")
    if partial.lstrip(b"\r\n") != partial:
        return False   # leading blank lines: aiohttp's to read
    if not crlf:
        return _LINE_START.fullmatch(line) is not None
    return _REQUEST_LINE.fullmatch(line) is not None and _CONTROL.search(partial) is None
