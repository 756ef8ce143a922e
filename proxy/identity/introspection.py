"""RFC 7662 token introspection: opaque and claim-less tokens, and revocation awareness.

The gateway authenticates as a confidential client (``client_secret_basic``).
Answers are cached briefly (``oidc.introspection.cache_seconds``, never past
the token's ``exp``) in a bounded LRU keyed by the token's hash, and concurrent
introspections of one token share one request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiohttp
from prometheus_client import Counter

from proxy.identity.model import AuthError, AuthReason
from proxy.metrics import REGISTRY

log = logging.getLogger("keygate.oidc")

INTROSPECTIONS = Counter("keygate_token_introspections", "RFC 7662 introspection requests to the issuer",
                         ["result"], registry=REGISTRY)


class Introspector:
    def __init__(self, session: aiohttp.ClientSession, endpoint: str, client_id: str, client_secret: str, *,
                 cache_seconds: float = 10.0, cache_size: int = 10000, timeout: float = 5.0,
                 clock: Callable[[], float] = time.time):
        self.session = session
        self.endpoint = endpoint
        # client_secret_basic: RFC 6749 2.3.1 form-encodes both parts before base64.
        cred = f"{urllib.parse.quote(client_id, safe='')}:{urllib.parse.quote(client_secret, safe='')}"
        self._authorization = "Basic " + base64.b64encode(cred.encode()).decode()
        self.cache_seconds = cache_seconds
        self.cache_size = cache_size
        self.timeout = timeout
        self.clock = clock
        self._cache: OrderedDict[bytes, tuple[float, dict[str, Any] | None]] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[dict[str, Any] | None]] = {}

    async def introspect(self, token: str) -> dict[str, Any]:
        """The active token's claims; AuthError(REVOKED) when inactive, ISSUER_UNREACHABLE on failure."""
        digest = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        hit = self._cache.get(digest)
        if hit is not None:
            until, claims = hit
            if now < until:
                self._cache.move_to_end(digest)
                return self._answer(claims)
            del self._cache[digest]
        fut = self._inflight.get(digest)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._inflight[digest] = fut
            try:
                claims = await self._request(token)
            except AuthError as exc:
                fut.set_exception(exc)
                fut.exception()  # retrieved: waiters may be none
                raise
            finally:
                self._inflight.pop(digest, None)
            fut.set_result(claims)
            self._store(digest, claims, now)
            return self._answer(claims)
        return self._answer(await asyncio.shield(fut))

    @staticmethod
    def _answer(claims: dict[str, Any] | None) -> dict[str, Any]:
        if claims is None:
            raise AuthError(AuthReason.REVOKED, "introspection: token is not active")
        return claims

    def _store(self, digest: bytes, claims: dict[str, Any] | None, now: float) -> None:
        until = now + self.cache_seconds
        exp = claims.get("exp") if claims else None
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            until = min(until, float(exp))
        self._cache[digest] = (until, claims)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _request(self, token: str) -> dict[str, Any] | None:
        try:
            async with self.session.post(self.endpoint, data={"token": token, "token_type_hint": "access_token"},
                                         timeout=aiohttp.ClientTimeout(total=self.timeout), allow_redirects=False,
                                         headers={"accept": "application/json",
                                                  "authorization": self._authorization}) as resp:
                status = resp.status
                body = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            INTROSPECTIONS.labels("error").inc()
            raise AuthError(AuthReason.ISSUER_UNREACHABLE, f"introspection: {type(exc).__name__}") from None
        if status != 200:
            INTROSPECTIONS.labels("error").inc()
            log.warning("introspection endpoint answered HTTP %d", status)
            raise AuthError(AuthReason.ISSUER_UNREACHABLE, f"introspection: HTTP {status}")
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("active"), bool):
            INTROSPECTIONS.labels("error").inc()
            raise AuthError(AuthReason.ISSUER_UNREACHABLE, "introspection: malformed answer")
        if doc["active"] is not True:
            INTROSPECTIONS.labels("inactive").inc()
            return None
        INTROSPECTIONS.labels("active").inc()
        return doc
