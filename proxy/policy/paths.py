"""HTTP path normalisation: one canonical form for the policy and the upstream.

:func:`normalize_path` turns a raw request path (query already split off)
into the decoded canonical path every policy decision is made on, and
refuses what cannot be normalised without guessing, because a path the
gateway and Orion read differently is how an access check gets bypassed:

* percent-decoding is strict: ``%`` must be followed by two hex digits and
  the bytes must be UTF-8;
* an encoded ``/`` (``%2F``) or ``\\`` (``%5C``, or a raw backslash) inside a
  segment is refused: upstreams disagree on whether it separates segments;
* NUL and other control characters, raw or encoded, are refused;
* ``.`` and ``..`` segments are resolved when written plainly; a ``..`` that
  would climb above ``/`` is refused, and so is a dot segment spelt with
  percent escapes (``%2e%2e``, ``.%2E``): nobody writes those by accident;
* a decoded segment may not hold whitespace, ``%``, ``?`` or ``#`` either:
  NGSI-v2 forbids them in ids and attribute names, and refusing them makes
  the function idempotent -- its output never decodes to anything else, so
  a path normalised twice (by the gateway, then inside ``may_http``) is never
  double-decoded (``%2541`` is refused instead of becoming ``%41``, then ``A``);
* empty segments (``//``) and a trailing slash are dropped (Orion routes
  ``/v2/entities/`` as ``/v2/entities``).

The result is decoded text (``/v2/entities/caf\u00e9``); the HTTP gateway
forwards this form (re-quoted per segment), never the raw path.
"""

from __future__ import annotations

import functools
import re

__all__ = ["PathError", "normalize_path", "split_path"]


class PathError(ValueError):
    """The path does not normalise cleanly; the request is refused."""


_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_RAW = re.compile(r"[\x00-\x20\x7f\s\\?#]")
_BAD_DECODED = re.compile(r"[\x00-\x20\x7f\s%?#]")


def _describe(ch: str) -> str:
    return {"%": "%", "?": "?", "#": "#"}.get(ch, "whitespace or control character")


def _decode_segment(raw: str) -> str:
    if "%" not in raw:
        return raw
    out = bytearray()
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "%":
            m = _PCT.match(raw, i)
            if not m:
                raise PathError(f"invalid percent-encoding in {raw!r}")
            out.append(int(m.group(1), 16))
            i += 3
        else:
            out += ch.encode("utf-8")
            i += 1
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("percent-encoded bytes are not UTF-8") from None
    if "/" in text or "\\" in text:
        raise PathError("an encoded slash or backslash inside a segment")
    bad = _BAD_DECODED.search(text)
    if bad:
        raise PathError(f"an encoded {_describe(bad.group())} in the path")
    if text in (".", ".."):
        raise PathError("a percent-encoded dot segment")
    return text


@functools.lru_cache(maxsize=4096)   # the HTTP gateway normalises the same few paths again and again
def normalize_path(raw: str) -> str:
    """The canonical decoded path for ``raw``; raises :class:`PathError`."""
    if not raw.startswith("/"):
        raise PathError("the path must start with /")
    m = _BAD_RAW.search(raw)
    if m:
        what = {"?": "a query string (split it off first)", "#": "a fragment", "\\": "a backslash"}.get(
            m.group(), "whitespace or a control character")
        raise PathError(f"{what} in the path")
    out: list[str] = []
    for seg in raw.split("/"):
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if not out:
                raise PathError(".. climbs above the root")
            out.pop()
            continue
        out.append(_decode_segment(seg))
    return "/" + "/".join(out)


def split_path(path: str) -> list[str]:
    """Segments of an already normalised path (``/`` has none)."""
    return [s for s in path.split("/") if s]
