"""Input rules for device records and delegations, shared by the API and the service.

Device ids and types follow Orion's entity id rules, since a device's id is
its NGSI entity id: printable ASCII, 1-256 characters, no whitespace and none
of ``&?/#<>"'=;()``; nor ``%`` or ``\\``, and not ``.`` or ``..``, which the NGSI
gateway refuses (or cannot address) in an entity's path, so such a device's entity
could never be used. Each check returns a reason for the client or None.
"""

from __future__ import annotations

import math
import re
from typing import Any

ORION_FORBIDDEN = frozenset("&?/#<>\"'=;()")
# The NGSI gateway never reaches an id with these: its identifier rule (proxy.http.ngsi) refuses %,
# its path normaliser (proxy.policy.paths) a backslash.
GATEWAY_FORBIDDEN = frozenset("%\\")
MAX_ID = 256
MAX_TEXT = 256
MAX_GRANTEE = 255
SERVICE_RE = re.compile(r"[A-Za-z0-9_]{0,50}")  # Orion's Fiware-Service rule
PERMISSIONS = ("read", "write", "readwrite")
KEY_SLOTS = ("k1", "k2")


def orion_id_problem(value: Any, what: str = "id", *, new: bool = True) -> str | None:
    """Why ``value`` is no id (``new=False``: to look up a device, possibly registered before the
    gateway's own rule was applied here, so one with % or \\ can still be read and deleted)."""
    if not isinstance(value, str):
        return f"{what} must be a string"
    if not 1 <= len(value) <= MAX_ID:
        return f"{what} must be 1 to {MAX_ID} characters"
    for ch in value:
        if not 33 <= ord(ch) <= 126:
            return f"{what} may contain only printable ASCII without spaces"
        if ch in ORION_FORBIDDEN:
            return f"{what} may not contain any of & ? / # < > \" ' = ; ( )"
        if new and ch in GATEWAY_FORBIDDEN:
            return f"{what} may not contain % or \\ (the NGSI gateway refuses them in entity ids)"
    if new and value in (".", ".."):
        return f"{what} may not be . or .. (a path cannot name it)"
    return None


def is_device_id(value: str, *, new: bool = True) -> bool:
    return orion_id_problem(value, new=new) is None


def text_problem(value: Any, what: str, *, nullable: bool = True) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        return f"{what} must be a string"
    if len(value) > MAX_TEXT:
        return f"{what} must be at most {MAX_TEXT} characters"
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in value):
        return f"{what} may not contain control characters"
    if has_lone_surrogate(value):
        return f"{what} contains a lone surrogate (not valid Unicode)"
    return None


_LOCATION_FIELDS = {"lat": (-90.0, 90.0), "lon": (-180.0, 180.0), "alt": (-1e5, 1e6)}


def location_problem(value: Any) -> str | None:
    """A place in words (``"hall"``), ``{"lat", "lon", "alt"?, "label"?}``, or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return text_problem(value, "location", nullable=False)
    if not isinstance(value, dict):
        return "location must be a string or an object with lat and lon"
    unknown = set(value) - {*_LOCATION_FIELDS, "label"}
    if unknown:
        return f"location has unknown field {sorted(unknown)[0]!r}"
    for name, (lo, hi) in _LOCATION_FIELDS.items():
        if name not in value:
            if name != "alt":
                return f"location.{name} is required"
            continue
        v = value[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            return f"location.{name} must be a number between {lo:g} and {hi:g}"
    if "label" in value:
        return text_problem(value["label"], "location.label", nullable=False)
    return None


def has_lone_surrogate(text: str) -> bool:
    """A surrogate code point in a ``str`` is always unpaired (json.loads joins the pairs): it has
    no UTF-8 form, so it could be stored but never sent back."""
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def json_problem(value: Any, path: str = "body", *, depth: int = 0, max_depth: int = 32) -> str | None:
    """Why a parsed JSON value could not be returned as JSON: a lone surrogate in any string (keys
    included), a number that is not finite (``1e400`` parses to inf), nesting beyond ``max_depth``."""
    if isinstance(value, str):
        return f"{path} contains a lone surrogate (not valid Unicode)" if has_lone_surrogate(value) else None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} must be a finite number"
    if isinstance(value, (dict, list)):
        if depth >= max_depth:
            return f"{path} is nested deeper than {max_depth} levels"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and has_lone_surrogate(key):
                return f"{path} has a field name with a lone surrogate (not valid Unicode)"
            problem = json_problem(item, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]",
                                   depth=depth + 1, max_depth=max_depth)
            if problem:
                return problem
    return None


def _name_problem(value: Any, what: str) -> str | None:
    if not isinstance(value, str):
        return f"{what} must be a string"
    if not 1 <= len(value) <= MAX_GRANTEE:
        return f"{what} must be 1 to {MAX_GRANTEE} characters"
    if has_lone_surrogate(value):
        return f"{what} contains a lone surrogate (not valid Unicode)"
    if any(ord(ch) < 33 or 127 <= ord(ch) < 160 or ch.isspace() for ch in value):
        return f"{what} may not contain spaces or control characters"
    return None


#: The object forms of ``to``, each naming one kind of principal.
GRANTEE_KEYS = ("user", "service", "group", "public")


def parse_grantee(value: Any) -> tuple[str, str] | str:
    """``(kind, value)`` from a delegation's ``to``, or the reason it is not one.

    kind is ``username`` (a user name still to resolve to a sub), ``user`` (a sub), ``service``
    (a client id), ``group`` or ``public``. A string is a user name, except ``anonymous`` (the
    public) and ``group:NAME``; a user whose name is one of those is named ``{"user": SUB}``.
    """
    if isinstance(value, str):
        if value == "anonymous":
            return ("public", "")
        if value.startswith("group:"):
            problem = _name_problem(value[6:], "the group name")
            return problem or ("group", value[6:])
        problem = _name_problem(value, "to")
        return problem or ("username", value)
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in GRANTEE_KEYS:
            return 'to must be a user name, "anonymous", or one of {"user": SUB}, {"service": CLIENT_ID}, ' \
                   '{"group": NAME}, {"public": true}'
        kind, inner = next(iter(value.items()))
        if kind == "public":
            return ("public", "") if inner is True else "to.public must be true"
        problem = _name_problem(inner, f"to.{kind}")
        return problem or (kind, inner)
    return "to must be a user name or an object naming one principal"
