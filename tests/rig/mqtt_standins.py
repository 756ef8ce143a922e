"""A token validator stand-in for runs without a token provider (benchmarks).

It follows the ``TokenValidator`` contract (``validate`` -> Identity or
AuthError) with opaque tokens it issued itself; the integration tests use the
real validator against the test OIDC provider or the token factory.
"""

from __future__ import annotations

import secrets
import time

from proxy.identity.model import AuthError, AuthReason, Identity


class StandinTokens:
    """Opaque tokens mapped to identities; unknown -> bad signature, old -> expired."""

    def __init__(self) -> None:
        self._tokens: dict[str, Identity] = {}
        self.ready = True

    def issue(self, username: str, *, roles: tuple[str, ...] = (), ttl: float = 300.0) -> str:
        token = "tok." + secrets.token_urlsafe(24)
        self._tokens[token] = Identity(kind="user", sub=f"sub-{username}", username=username, method="token",
                                       roles=frozenset(roles), expires_at=time.time() + ttl)
        return token

    async def start(self) -> None:
        pass

    async def validate(self, token: str) -> Identity:
        ident = self._tokens.get(token)
        if ident is None:
            raise AuthError(AuthReason.BAD_SIGNATURE)
        if ident.expires_at is not None and ident.expires_at < time.time():
            raise AuthError(AuthReason.EXPIRED)
        return ident

    async def close(self) -> None:
        pass
