"""Answers as bytes, framed as aiohttp's server frames them (sans-IO).

The gateway builds its answers as aiohttp ``web.Response`` objects (its errors, local answers
and JSON lists) or relays Orion's answer with a header list; on the lean server these
functions turn them into the bytes aiohttp would have written for the same request: the same
header order, the ``Content-Length``, ``Content-Type``, ``Date``, ``Server`` and
``Connection`` rules of aiohttp 3.14's ``StreamResponse._prepare_headers`` and
``Response._start``, chunked framing when the length is not known. The differential test
(``tests/integration/test_http_lean_server_differential.py``) holds the two to the same bytes.
"""

from __future__ import annotations

import re

from aiohttp import hdrs, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

_NO_BODY_STATUS = frozenset({204, 304})
# A byte of Orion's head that is not UTF-8 reaches a relay as a lone surrogate (both upstream
# clients read heads with surrogate escapes): aiohttp's header writer leaves it out, so do these.
_AS_AIOHTTP = "ignore"
# What aiohttp's header writer refuses in the status line, a name or a value (tab is allowed).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _joined(lines: list[str]) -> bytes:
    """The head of ``lines``; ValueError on a control character in one, as aiohttp's writer raises
    (a CR or LF in a line would split the answer)."""
    text = " ".join(lines)
    if not text.isprintable() and _CONTROL.search(text):   # (isprintable: a faster scan, False on a tab too)
        raise ValueError("a status line or header contains a control character")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", _AS_AIOHTTP)


def _must_be_empty(method: str, status: int) -> bool:
    return status in _NO_BODY_STATUS or 100 <= status < 200 or method == "HEAD"


def head_bytes(method: str, status: int, reason: str, headers: CIMultiDict[str], length: int | None,
               keep_alive: bool) -> tuple[bytes, bool]:
    """(the answer's head, whether its body is chunked); ``headers`` is completed in place."""
    empty = _must_be_empty(method, status)
    chunked = False
    if length is None and not empty:
        chunked = True
        headers[hdrs.TRANSFER_ENCODING] = "chunked"
    if empty:
        if hdrs.CONTENT_LENGTH in headers and (status in _NO_BODY_STATUS or 100 <= status < 200):
            del headers[hdrs.CONTENT_LENGTH]
        if hdrs.TRANSFER_ENCODING in headers:
            del headers[hdrs.TRANSFER_ENCODING]
    elif length != 0:
        headers.setdefault(hdrs.CONTENT_TYPE, "application/octet-stream")
    if hdrs.DATE not in headers:
        headers[hdrs.DATE] = rfc822_formatted_time()
    headers.setdefault(hdrs.SERVER, SERVER_SOFTWARE)
    if hdrs.CONNECTION not in headers and not keep_alive:
        headers[hdrs.CONNECTION] = "close"
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return _joined(lines), chunked


def plain_head(method: str, status: int, reason: str, headers: list[tuple[str, str]], length: int | None,
               keep_alive: bool) -> bytes | None:
    """What :func:`head_bytes` writes for ``headers`` (none of them framing ones: Content-Length,
    Transfer-Encoding, Connection) when the answer has the usual relayed shape, a body of known
    length that is not to be empty, built in one pass over a list; None for any other shape.
    Orion's answers have that shape, and each went through a ``CIMultiDict`` and a dozen of its
    calls to come out the same (tests/unit/test_http_lean_answer.py holds the two to each other).
    ``headers`` are as llhttp read them, with no control character but tab (which head_bytes
    refuses, as aiohttp's writer does); the reason phrase, which llhttp does not check, is checked."""
    if length is None or _must_be_empty(method, status) or not reason.isprintable():
        return None   # (a reason with a control character: head_bytes refuses it)
    lines = [f"HTTP/1.1 {status} {reason}"]
    typed = dated = served = False
    for name, value in headers:
        low = name.lower()
        if low == "content-type":
            typed = True
        elif low == "date":
            dated = True
        elif low == "server":
            served = True
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {length}")
    if length != 0 and not typed:
        lines.append("Content-Type: application/octet-stream")
    if not dated:
        lines.append(f"Date: {rfc822_formatted_time()}")
    if not served:
        lines.append(f"Server: {SERVER_SOFTWARE}")
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", _AS_AIOHTTP)


def response_bytes(method: str, response: web.Response, keep_alive: bool) -> bytes:
    """A whole ``web.Response`` (a body in bytes, or none) as aiohttp's server writes it."""
    body = response.body
    if body is not None and not isinstance(body, (bytes, bytearray)):
        raise TypeError("the lean server writes answers whose body is bytes")
    headers = CIMultiDict(response.headers)
    status = response.status
    if hdrs.CONTENT_LENGTH in headers:
        if status in _NO_BODY_STATUS or 100 <= status < 200:
            del headers[hdrs.CONTENT_LENGTH]
    else:
        size = len(body) if body else 0
        if size or (status != 304 and method != "HEAD"):
            headers[hdrs.CONTENT_LENGTH] = str(size)
    length = int(headers[hdrs.CONTENT_LENGTH]) if hdrs.CONTENT_LENGTH in headers else None
    head, _ = head_bytes(method, status, response.reason, headers, length if length is not None else 0,
                         keep_alive)
    if _must_be_empty(method, status) or not body:
        return head
    return head + bytes(body)
