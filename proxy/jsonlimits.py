"""How deeply a JSON text nests, counted before it is parsed.

Python's ``json`` module recurses once per array or object level; a body of
50,000 ``[`` raises ``RecursionError`` from deep inside the parser. Both HTTP
APIs (the NGSI gateway and the ownership API) therefore measure the nesting
first, without recursion: escape pairs are dropped, then whole strings, so only
the brackets that structure the document are left, and a running sum over them
gives the deepest level. For a text that is not valid JSON the figure may be
off, but such a text is refused by the parser anyway, and before the parser
recurses deeper than the figure.
"""

from __future__ import annotations

import re
from itertools import accumulate

_ESCAPE = re.compile(rb"\\.", re.S)          # outside strings a backslash is invalid JSON anyway
_STRING = re.compile(rb'"[^"]*"')             # with the escapes gone, a string ends at the next quote
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def nesting_depth(raw: bytes) -> int:
    """The deepest level of arrays and objects in ``raw`` (0 for a scalar)."""
    brackets = _STRING.sub(b"", _ESCAPE.sub(b"", raw)).translate(None, _NOT_BRACKET)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def too_deep(raw: bytes, limit: int) -> bool:
    if raw.count(b"[") + raw.count(b"{") <= limit:   # the common case, at memchr speed
        return False
    return nesting_depth(raw) > limit
