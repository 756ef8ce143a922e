"""Who is asking: bearer token, device key (HTTP Basic), device certificate, or nobody.

One credential per request, in this order: an ``Authorization`` header
decides alone (a bad one is a failure, never a fall-back to the certificate
or to anonymous); without it a verified client certificate names a device, if it is one enrolled for it;
without either the caller is :data:`ANONYMOUS`, whom only ``anonymous``
policy rules let through. The failure's reason goes to the audit log; the
client learns only 401.
"""

from __future__ import annotations

import base64
import binascii
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from proxy.identity.model import ANONYMOUS, AuthError, AuthReason, Identity
from proxy.identity.tokens import token_digest

if TYPE_CHECKING:
    from proxy.services import Services
    from proxy.tls import PeerCertificate

MAX_CREDENTIAL_LENGTH = 16384


# A head's memo (LeanRequest.memo: what was derived from these very bytes) keeps the digest of the
# bearer token its Authorization header carried, once that token was valid.
_BEARER_DIGEST = "bearer-digest"


def known_bearer(memo: dict[Any, Any] | None, services: Services) -> Identity | None:
    """The identity of a head seen before (its ``memo``) whose bearer token the validator still
    holds valid, as :func:`authenticate` would give it; None: ask :func:`authenticate`. The same
    head bytes carry the same Authorization header, so the same token and the same checks, bar
    those the validator's cache makes again here (exp, the signing key, introspection)."""
    digest = memo.get(_BEARER_DIGEST) if memo is not None else None   # (None: not a lean request)
    # (a validator without a cache by digest, as tests stand in with, is asked every time)
    cached = getattr(services.tokens, "cached", None)
    if digest is None or cached is None:
        return None
    identity: Identity | None = cached(digest)
    return identity


async def authenticate(headers: Mapping[str, str], ssl_object: ssl.SSLObject | None, services: Services,
                       memo: dict[Any, Any] | None = None) -> Identity:
    header = headers.get("Authorization")
    if header is not None:
        return await _from_header(header, services, memo)
    if ssl_object is not None:
        peer = _peer_certificate(ssl_object)
        if peer is not None:
            return services.ownership.device_identity(peer.common_name, peer.fingerprint)
    return ANONYMOUS


async def _from_header(header: str, services: Services, memo: dict[Any, Any] | None = None) -> Identity:
    if len(header) > MAX_CREDENTIAL_LENGTH:
        raise AuthError(AuthReason.MALFORMED, "credential too long")
    scheme, _, credential = header.strip().partition(" ")
    credential = credential.strip()
    if not credential:
        raise AuthError(AuthReason.MALFORMED, "empty credential")
    scheme = scheme.lower()
    if scheme == "bearer":
        identity = await services.tokens.validate(credential)
        if memo is not None:
            memo[_BEARER_DIGEST] = token_digest(credential)
        return identity
    if scheme == "basic":
        device_id, key = _basic(credential)
        return await services.ownership.authenticate_device_key(device_id, key)
    raise AuthError(AuthReason.MALFORMED, "unsupported authorization scheme")


def _basic(credential: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(credential, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise AuthError(AuthReason.MALFORMED, "bad basic credential") from None
    device_id, sep, key = decoded.partition(":")
    if not sep or not device_id or not key:
        raise AuthError(AuthReason.MALFORMED, "bad basic credential")
    return device_id, key


def _peer_certificate(ssl_object: ssl.SSLObject) -> PeerCertificate | None:
    """The verified client certificate's CN and fingerprint (TLS verified it against ``tls.client_ca``)."""
    from proxy.tls import peer_certificate

    return peer_certificate(ssl_object)
