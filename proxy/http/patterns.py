"""Evaluating a client's ``idPattern`` locally, without giving it a way to stall the gateway.

Python's ``re`` backtracks, so a pattern like ``(a+)+$`` can take exponential
time. Patterns are therefore parsed first and refused unless they are of a
shape whose matching cost is polynomial and small: at most 256 characters,
no repetition inside a repetition, no alternation under a repetition, no
back-references or look-arounds, and at most three repetitions in all. They are
only ever run against entity ids the caller may read (each at most 256
characters), never against Orion's whole database.

Orion's ``idPattern`` is a POSIX extended regex searched anywhere in the id
(``thermo`` matches ``my-thermo-1``); ``re.search`` keeps that meaning.
"""

from __future__ import annotations

import re

# The standard library's own regular-expression parser (keygate needs Python 3.11+, where it is
# re._parser; private, but stable from 3.11 on).
from re import _constants as _c
from re import _parser as _sre_parse
from typing import Any

MAX_PATTERN_LENGTH = 256
MAX_REPEATS = 3

_REPEATS = {_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT)}
_FORBIDDEN = {_c.GROUPREF, _c.GROUPREF_EXISTS, _c.ASSERT, _c.ASSERT_NOT}


class UnsafePattern(ValueError):
    """The pattern is refused; the message says why, for the client."""


def compile_id_pattern(pattern: str) -> re.Pattern[str]:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise UnsafePattern(f"idPattern longer than {MAX_PATTERN_LENGTH} characters")
    try:
        parsed = _sre_parse.parse(pattern)
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        raise UnsafePattern("Invalid regex for entity id pattern") from None
    repeats = _walk(parsed, inside_repeat=False)
    if repeats > MAX_REPEATS:
        raise UnsafePattern(f"idPattern with more than {MAX_REPEATS} repetitions")
    return compiled


def _walk(items: Any, inside_repeat: bool) -> int:
    """Count the repetitions; raise on a construct that can backtrack badly."""
    count = 0
    for op, arg in items:
        if op in _FORBIDDEN:
            raise UnsafePattern("idPattern with back-references or look-arounds")
        if op in _REPEATS:
            _low, high, sub = arg
            if high != 1:
                if inside_repeat:
                    raise UnsafePattern("idPattern with nested repetition")
                count += 1
            count += _walk(sub, inside_repeat or high != 1)
        elif op == _c.SUBPATTERN:
            count += _walk(arg[-1], inside_repeat)
        elif op == _c.BRANCH:
            if inside_repeat:
                raise UnsafePattern("idPattern with alternation under repetition")
            for branch in arg[1]:
                count += _walk(branch, inside_repeat)
        elif op == getattr(_c, "ATOMIC_GROUP", None):
            count += _walk(arg, inside_repeat)
    return count
