"""The issuer's signing keys: discovery, JWKS fetch, kid lookup, rate-limited refresh.

Fetched with aiohttp (never PyJWT's blocking ``PyJWKClient`` inside the event
loop). Only keys fit for signature verification under an allowed algorithm
are kept. An unknown ``kid`` may trigger a refresh, but one at a time and at
most one per cooldown: a flood of forged kids must not become a flood of
requests to the issuer. A failed fetch keeps the last good set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from jwt.algorithms import ECAlgorithm, RSAAlgorithm, get_default_algorithms
from prometheus_client import Counter, Gauge

from proxy.metrics import REGISTRY

log = logging.getLogger("keygate.oidc")

JWKS_FETCHES = Counter("keygate_jwks_fetches", "JWKS and discovery fetches from the issuer",
                       ["document", "result"], registry=REGISTRY)
JWKS_KEYS = Gauge("keygate_jwks_keys", "Signing keys currently loaded", registry=REGISTRY)

# alg -> (kty, crv) it needs. HMAC and "none" are absent on purpose.
ALG_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
}
_ALGORITHMS = get_default_algorithms()
MAX_DOCUMENT_BYTES = 1 << 20  # a JWKS or discovery document; Keycloak's are a few KB


class FetchError(Exception):
    """The issuer could not be reached or answered nonsense."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None        # the JWK's own alg, when it names one
    key: Any               # cryptography public key

    def fits(self, alg: str) -> bool:
        need = ALG_KEY_TYPES.get(alg)
        if need is None or (self.alg is not None and self.alg != alg):
            return False
        return need[0] == self.kty and (need[1] is None or need[1] == self.crv)

    def verify(self, alg: str, signing_input: bytes, signature: bytes) -> bool:
        return _ALGORITHMS[alg].verify(signing_input, self.key, signature)


def parse_jwks(doc: Any, algorithms: tuple[str, ...]) -> dict[str | None, SigningKey]:
    """The usable keys of a JWKS document, by kid. Unusable keys are skipped, not fatal."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise FetchError("JWKS document has no 'keys' list")
    allowed = {a for a in algorithms if a in ALG_KEY_TYPES}
    keys: dict[str | None, SigningKey] = {}
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict):
            continue
        use, kty, alg, kid = jwk.get("use"), jwk.get("kty"), jwk.get("alg"), jwk.get("kid")
        if use not in (None, "sig") or kty not in ("RSA", "EC"):
            continue  # encryption keys and symmetric keys never verify tokens
        if kid is not None and not isinstance(kid, str):
            continue
        if alg is not None and alg not in allowed:
            continue
        try:
            material = {k: v for k, v in jwk.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "key_ops")}
            key = (RSAAlgorithm if kty == "RSA" else ECAlgorithm).from_jwk(json.dumps(material))
        except Exception as exc:  # a malformed key must not take the good ones with it
            log.warning("skipping unusable JWKS key %r: %s", kid, exc)
            continue
        if isinstance(key, (RSAPrivateKey, EllipticCurvePrivateKey)):  # a leaked private JWK: its public half only
            key = key.public_key()
        sk = SigningKey(kid, kty, jwk.get("crv"), alg, key)
        if any(sk.fits(a) for a in allowed):
            keys.setdefault(kid, sk)
    return keys


async def get_json(session: aiohttp.ClientSession, url: str, timeout: float, document: str) -> Any:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout),
                               headers={"accept": "application/json"}, allow_redirects=False) as resp:
            if resp.status != 200:
                raise FetchError(f"{document} {url}: HTTP {resp.status}")
            chunks, size = [], 0
            async for chunk in resp.content.iter_chunked(65536):
                size += len(chunk)
                if size > MAX_DOCUMENT_BYTES:
                    raise FetchError(f"{document} {url}: larger than {MAX_DOCUMENT_BYTES} bytes")
                chunks.append(chunk)
        doc = json.loads(b"".join(chunks))
    except FetchError:
        JWKS_FETCHES.labels(document, "error").inc()
        raise
    except (TimeoutError, aiohttp.ClientError, ValueError, OSError) as exc:
        JWKS_FETCHES.labels(document, "error").inc()
        raise FetchError(f"{document} {url}: {type(exc).__name__}: {exc}") from None
    JWKS_FETCHES.labels(document, "ok").inc()
    return doc


class KeySet:
    """The current keys and the rules for refreshing them."""

    def __init__(self, *, algorithms: tuple[str, ...], cooldown: float, timeout: float,
                 clock: Callable[[], float] = time.monotonic):
        self.algorithms = algorithms
        self.cooldown = cooldown
        self.timeout = timeout
        self.clock = clock
        self.keys: dict[str | None, SigningKey] = {}
        self.loaded = False
        self.jwks_uri = ""
        self.last_error = ""
        self._last_attempt: float | None = None
        self._inflight: asyncio.Future[bool] | None = None

    def get(self, kid: str | None, alg: str) -> SigningKey | None:
        if kid is not None:
            return self.keys.get(kid)
        # No kid: acceptable only when exactly one key could have made this signature.
        fitting = [k for k in self.keys.values() if k.fits(alg)]
        return fitting[0] if len(fitting) == 1 else None

    async def refresh(self, session: aiohttp.ClientSession) -> bool:
        """Fetch now, sharing one request among concurrent callers. True when a new set was loaded."""
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        self._inflight = asyncio.get_running_loop().create_future()
        self._last_attempt = self.clock()
        ok = False
        try:
            doc = await get_json(session, self.jwks_uri, self.timeout, "jwks")
            keys = parse_jwks(doc, self.algorithms)
            if not keys:
                raise FetchError(f"jwks {self.jwks_uri}: no usable signing key for {', '.join(self.algorithms)}")
            self.keys, self.loaded, self.last_error = keys, True, ""
            JWKS_KEYS.set(len(keys))
            ok = True
        except FetchError as exc:
            self.last_error = str(exc)
            log.warning("JWKS refresh failed, keeping %d known keys: %s", len(self.keys), exc)
        finally:
            fut, self._inflight = self._inflight, None
            fut.set_result(ok)
        return ok

    async def refresh_for_unknown_kid(self, session: aiohttp.ClientSession) -> bool:
        """A refresh on behalf of an unknown kid, unless one ran within the cooldown."""
        if self._inflight is not None:
            return await asyncio.shield(self._inflight)
        if self._last_attempt is not None and self.clock() - self._last_attempt < self.cooldown:
            return False
        return await self.refresh(session)
