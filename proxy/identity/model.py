"""The immutable identity every decision is made for, and the typed failure.

Every authenticator (token validator, device key check, certificate check)
yields an :class:`Identity` or raises :class:`AuthError` whose ``reason`` goes
to the audit log; the client itself only ever learns "not authorized".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Literal

IdentityKind = Literal["user", "service", "device", "anonymous"]
AuthMethod = Literal["token", "introspection", "device_key", "certificate", "none"]


class AuthReason(str, enum.Enum):
    MALFORMED = "malformed"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    BAD_SIGNATURE = "bad_signature"
    ALGORITHM_NOT_ALLOWED = "algorithm_not_allowed"
    UNKNOWN_KID = "unknown_kid"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    NOT_AN_ACCESS_TOKEN = "not_an_access_token"  # noqa: S105 (a reason code, not a secret)
    MISSING_CLAIM = "missing_claim"
    REVOKED = "revoked"  # introspection answered active: false
    ISSUER_UNREACHABLE = "issuer_unreachable"
    UNKNOWN_DEVICE_OR_KEY = "unknown_device_or_key"  # one reason for both: ids must not leak
    BAD_CERTIFICATE = "bad_certificate"
    NO_CREDENTIALS = "no_credentials"


class AuthError(Exception):
    """Authentication failed; ``reason`` is for the audit log only."""

    def __init__(self, reason: AuthReason, detail: str = ""):
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Identity:
    kind: IdentityKind
    # Stable subject: the token's "sub" for users and services, "device:<id>" for devices.
    sub: str
    # preferred_username (else sub) for users, client id for service accounts, device id for devices.
    # kind "service" only where the provider says so (oidc.service_accounts), never for a client_id
    # claim alone: RFC 9068 puts one in users' tokens too.
    username: str
    method: AuthMethod
    roles: frozenset[str] = frozenset()          # from the configured claim paths
    client_roles: frozenset[str] = frozenset()   # "CLIENT:ROLE" from resource_access
    scopes: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()         # Keycloak "groups" claim, leading "/" removed
    azp: str = ""
    expires_at: float | None = None              # unix time; None = does not expire
    device_id: str = ""                          # for devices
    owner_sub: str = ""                          # for devices: who owns it
    owner_username: str = ""
    # What authenticated a device, so a later change can tell whether it still does:
    # "k1:<hash hex>" / "k2:<hash hex>" for a device key, "cert:<sha256 hex>" for a certificate.
    credential: str = field(default="", compare=False, repr=False)
    claims: tuple[tuple[str, object], ...] = field(default=(), compare=False, repr=False)
    # The hash, once computed (0: not yet). An identity is a dict key several times a request or
    # message (policy decisions, header blocks, audit bodies): the fields eq compares are
    # hashed once, not at each look-up. Not a field anything compares, copies or passes.
    _hash: int = field(default=0, init=False, compare=False, repr=False)

    def __hash__(self) -> int:
        if self._hash:
            return self._hash
        value = hash(tuple(getattr(self, name) for name in _COMPARED))
        object.__setattr__(self, "_hash", value)
        return value

    def __getstate__(self) -> list[Any]:
        # A str's hash differs between processes: a copy made elsewhere hashes itself anew.
        return [getattr(self, f) for f in _STATE]

    def __setstate__(self, state: list[Any]) -> None:
        for name, value in zip(_STATE, state, strict=True):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_hash", 0)

    @property
    def is_device(self) -> bool:
        return self.kind == "device"

    @property
    def is_anonymous(self) -> bool:
        return self.kind == "anonymous"

    def has_role(self, role: str) -> bool:
        return role in self.roles


_STATE = tuple(f.name for f in fields(Identity) if f.name != "_hash")
_COMPARED = tuple(f.name for f in fields(Identity) if f.compare)   # what eq compares, so what the hash covers

ANONYMOUS = Identity(kind="anonymous", sub="", username="", method="none")


#: The identity attributes policies read, kept with a subscription to re-check it later.
SNAPSHOT_FIELDS = ("kind", "sub", "username", "method", "roles", "client_roles", "scopes", "groups", "azp",
                   "device_id", "owner_sub", "owner_username")


def identity_snapshot(identity: Identity) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in SNAPSHOT_FIELDS:
        value = getattr(identity, name)
        out[name] = sorted(value) if isinstance(value, frozenset) else value
    return out


def identity_from_snapshot(snapshot: dict[str, Any]) -> Identity:
    """The creator as recorded (no expiry: the subscription outlives the token, not the access)."""
    fields = {name: snapshot[name] for name in SNAPSHOT_FIELDS if name in snapshot}
    for name in ("roles", "client_roles", "scopes", "groups"):
        fields[name] = frozenset(fields.get(name, ()))
    return Identity(**fields)
