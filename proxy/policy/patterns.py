"""Topic and path patterns: parsing, and matching one pattern at a time.

A pattern is a tuple of levels (MQTT topic levels or HTTP path segments).
A level is a literal ``str`` or a :class:`Special`:

* ``PLUS`` (MQTT ``+``, HTTP ``*``): any one level, including an empty one;
* ``HASH`` (MQTT ``#``, HTTP ``**``): the rest, zero or more levels (last only);
* ``DEVICE`` (``{device}``): one non-empty level, bound to a device id;
* a placeholder (``{sub}``, ``{username}``, ``{client_id}``): exactly the
  caller's value. A value that is empty or holds ``+``, ``#``, ``/`` or NUL
  never matches, so a crafted username cannot widen a rule.

Placeholders stand for a whole level: ``users/{username}`` is valid,
``users/x-{username}`` is an error. ``{device}`` appears at most once.

MQTT's ``$`` rule (spec 4.7.2) holds for patterns too: a pattern whose first
level is not a literal never matches a topic starting with ``$``, so ``#``
does not open ``$SYS``; only a rule naming ``$SYS/...`` literally does.

The compiled engine (:mod:`.engine`) answers with a trie; the functions here
are the plain one-pattern versions, used by ``keygate policy explain`` and
the checker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeAlias

__all__ = ["Special", "PLUS", "HASH", "DEVICE", "PLACEHOLDERS", "parse_topic_pattern", "parse_path_pattern",
           "valid_value", "identity_values", "match", "contains", "topic_problem", "filter_problem"]


class Special:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


PLUS = Special("+")
HASH = Special("#")
DEVICE = Special("{device}")
PLACEHOLDERS = {name: Special(f"{{{name}}}") for name in ("sub", "username", "client_id")}
_BY_TEXT = {"{device}": DEVICE, **{p.name: p for p in PLACEHOLDERS.values()}}

Pattern: TypeAlias = tuple[str | Special, ...]


def _placeholder(level: str) -> Special | str | None:
    """The Special for a ``{name}`` level; an error text for a malformed one; None for literals."""
    if "{" not in level and "}" not in level:
        return None
    sp = _BY_TEXT.get(level)
    if sp is not None:
        return sp
    if level.startswith("{") and level.endswith("}"):
        return f"unknown placeholder {level} (known: {{device}}, {{sub}}, {{username}}, {{client_id}})"
    return f"a placeholder must be a whole level, not part of {level!r}"


def _parse(levels: list[str], plus: str, hash_: str, what: str) -> Pattern:
    out: list[str | Special] = []
    for i, level in enumerate(levels):
        if level == hash_:
            if i != len(levels) - 1:
                raise ValueError(f"{hash_} must be the last {what}")
            out.append(HASH)
        elif level == plus:
            out.append(PLUS)
        elif plus in level or hash_[0] in level:
            raise ValueError(f"{plus} and {hash_} must stand alone in a {what}, not in {level!r}")
        else:
            sp = _placeholder(level)
            if isinstance(sp, str):
                raise ValueError(sp)
            if sp is DEVICE and DEVICE in out:
                raise ValueError("{device} may appear only once")
            if "\x00" in level:
                raise ValueError("NUL in a pattern")
            out.append(sp if sp is not None else level)
    return tuple(out)


def parse_topic_pattern(text: str) -> Pattern:
    """``devices/{device}/#`` -> levels; raises ValueError with the reason."""
    if text == "":
        raise ValueError("an empty topic pattern")
    return _parse(text.split("/"), "+", "#", "topic level")


def parse_path_pattern(text: str) -> Pattern:
    """``/v2/entities/{device}/**`` -> segments; raises ValueError with the reason."""
    if not text.startswith("/"):
        raise ValueError("a path pattern must start with /")
    segs = [s for s in text.split("/") if s]
    if any(s in (".", "..") for s in segs):
        raise ValueError("dot segments are not allowed in a path pattern")
    if any("%" in s for s in segs):
        raise ValueError("write path patterns decoded (no %-escapes); requests are matched after decoding")
    return _parse(segs, "*", "**", "path segment")


_WIDENING = re.compile(r"[+#/\x00]")


def valid_value(value: str) -> bool:
    """Whether a caller's value may stand for a placeholder level."""
    return bool(value) and _WIDENING.search(value) is None


def identity_values(sub: str, username: str, client_id: str) -> dict[Special, str]:
    """Placeholder -> value, leaving out values that can never match."""
    out = {}
    for name, value in (("sub", sub), ("username", username), ("client_id", client_id)):
        if valid_value(value):
            out[PLACEHOLDERS[name]] = value
    return out


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` is not a valid MQTT topic name (for publish / delivery), or None."""
    if not topic:
        return "empty topic"
    if "+" in topic or "#" in topic:
        return "wildcards in a topic name"
    if "\x00" in topic:
        return "NUL in a topic"
    return None


def filter_problem(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid MQTT topic filter, or None."""
    if not topic_filter:
        return "empty topic filter"
    if "\x00" in topic_filter:
        return "NUL in a topic filter"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "# must be a whole, last level"
        if "+" in level and level != "+":
            return "+ must be a whole level"
    return None


def match(pattern: Pattern, levels: list[str], values: Mapping[Special, str], *,
          dollar_rule: bool) -> tuple[bool, str | None]:
    """Does ``pattern`` match the concrete ``levels``? Returns (matched, bound device)."""
    if dollar_rule and levels and levels[0].startswith("$") and pattern and not isinstance(pattern[0], str):
        return False, None
    device = None
    for i, p in enumerate(pattern):
        if p is HASH:
            return True, device
        if i >= len(levels):
            return False, None
        lv = levels[i]
        if isinstance(p, str):
            if p != lv:
                return False, None
        elif p is DEVICE:
            if not lv:
                return False, None
            device = lv
        elif p is not PLUS and values.get(p) != lv:
            return False, None
    return len(pattern) == len(levels), device


def contains(outer: Pattern, inner: Pattern) -> bool:
    """Does every concrete level list matched by ``inner`` also match ``outer``, for any caller?

    Used by the checker for shadowing: placeholders only contain the same
    placeholder, ``{device}`` contains ``{device}`` and non-empty literals,
    ``+`` contains every single level.
    """
    if outer and inner and not isinstance(outer[0], str) and (isinstance(inner[0], str) and inner[0].startswith("$")):
        return False
    for i, o in enumerate(outer):
        if o is HASH:
            return True
        if i >= len(inner):
            return False
        n = inner[i]
        if n is HASH:
            return False
        if o is PLUS:
            continue
        if o is DEVICE:
            if not (n is DEVICE or (isinstance(n, str) and n)):
                return False
            continue
        if o is not n and o != n:
            return False
    return len(outer) == len(inner)


def pattern_text(pattern: Pattern, http: bool = False) -> str:
    def show(p: str | Special) -> str:
        if p is PLUS:
            return "*" if http else "+"
        if p is HASH:
            return "**" if http else "#"
        return p.name if isinstance(p, Special) else p

    text = "/".join(show(p) for p in pattern)
    return "/" + text if http else text
