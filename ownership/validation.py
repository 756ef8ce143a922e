"""Input rules for device records and delegations, shared by the API and the service.

Device ids and types follow Orion's entity id rules, since a device's id is
its NGSI entity id: printable ASCII, 1-256 characters, no whitespace and none
of ``&?/#<>"'=;()``. Each check returns a reason for the client or None.
"""

from __future__ import annotations

import math
import re
from typing import Any

ORION_FORBIDDEN = frozenset("&?/#<>\"'=;()")
MAX_ID = 256
MAX_TEXT = 256
MAX_GRANTEE = 255
SERVICE_RE = re.compile(r"[A-Za-z0-9_]{0,50}")  # Orion's Fiware-Service rule
PERMISSIONS = ("read", "write", "readwrite")
KEY_SLOTS = ("k1", "k2")


def orion_id_problem(value: Any, what: str = "id") -> str | None:
    if not isinstance(value, str):
        return f"{what} must be a string"
    if not 1 <= len(value) <= MAX_ID:
        return f"{what} must be 1 to {MAX_ID} characters"
    for ch in value:
        if not 33 <= ord(ch) <= 126:
            return f"{what} may contain only printable ASCII without spaces"
        if ch in ORION_FORBIDDEN:
            return f"{what} may not contain any of & ? / # < > \" ' = ; ( )"
    return None


def is_device_id(value: str) -> bool:
    return orion_id_problem(value) is None


def text_problem(value: Any, what: str, *, nullable: bool = True) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        return f"{what} must be a string"
    if len(value) > MAX_TEXT:
        return f"{what} must be at most {MAX_TEXT} characters"
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in value):
        return f"{what} may not contain control characters"
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


def grantee_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "to must be a string"
    if value == "anonymous":
        return None
    name = value[6:] if value.startswith("group:") else value
    if not 1 <= len(name) <= MAX_GRANTEE:
        return f"to must name a user or group:NAME of 1 to {MAX_GRANTEE} characters"
    if any(ord(ch) < 33 or 127 <= ord(ch) < 160 for ch in name):
        return "to may not contain spaces or control characters"
    if ":" in name and not value.startswith("group:"):
        return "to must be a username, group:NAME or anonymous"
    return None
