"""Keycloak access-token validation: the heart of user and service authentication.

``TokenValidator.validate(token)`` returns an :class:`Identity` or raises
:class:`AuthError` with a typed reason. The order of checks follows what an
attacker controls: the header is parsed, the algorithm checked against the
allow-list *and* the key's type (no ``none``, no HMAC keyed with a public key,
no RSA kid under an EC alg), the signature verified; only then are claims
read: ``iss`` pinned, ``typ == Bearer`` (ID and refresh tokens are not access
tokens), ``exp``/``nbf``/``iat`` with leeway, ``aud`` when configured, ``sub``.

Validated tokens are cached by the SHA-256 of the token (bounded LRU) until
their ``exp``, and only while the key that signed them is still published.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.core import CounterMetricFamily

from proxy.config import OidcConfig, read_secret
from proxy.identity.introspection import Introspector
from proxy.identity.jwks import ALG_KEY_TYPES, FetchError, KeySet, get_json
from proxy.identity.model import AuthError, AuthReason, Identity
from proxy.metrics import REGISTRY, add_readiness_check, remove_readiness_check

log = logging.getLogger("keygate.oidc")



class _ValidationCounts:
    """``keygate_token_validations_total{result,reason}`` from plain ints.

    prometheus-client's Counter takes a lock per increment, which would be a
    third of a cached validation; the event loop is one thread, so plain
    integers are exact here, and they are read only when /metrics is scraped.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {("ok", ""): 0, ("ok", "cached"): 0}

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("keygate_token_validations", "Access-token validations by result and reason",
                                     labels=["result", "reason"])
        for (result, reason), n in list(self.counts.items()):
            family.add_metric([result, reason], n)
        yield family

    def describe(self) -> list[CounterMetricFamily]:
        return []


VALIDATIONS = _ValidationCounts()
REGISTRY.register(VALIDATIONS)
_OK_FRESH = ("ok", "")
_OK_CACHED = ("ok", "cached")

MAX_TOKEN_BYTES = 16384      # Keycloak tokens with many roles stay far below
ACCESS_TOKEN_TYPES = ("Bearer",)
REFRESH_TOKEN_TYPES = ("Refresh", "Offline")
SERVICE_ACCOUNT_PREFIX = "service-account-"


def _b64decode(segment: str) -> bytes:
    try:
        return base64.b64decode(segment + "=" * (-len(segment) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise AuthError(AuthReason.MALFORMED, "bad base64url") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise AuthError(AuthReason.MALFORMED, f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise AuthError(AuthReason.MALFORMED, f"{what} is not a JSON object")
    return obj


def _number(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuthError(AuthReason.MALFORMED, f"{name} is not a number")
    return float(value)


def claim_path(claims: dict[str, Any], path: str) -> Any:
    """``resource_access.iot-proxy.roles`` -> the value there (split on dots only), or None."""
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def token_digest(token: str) -> bytes:
    """What the validator's cache knows a token by (not the token itself)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2


def _client_of(claims: dict[str, Any]) -> tuple[str, str]:
    """The token's client_id (Keycloak also writes clientId) and azp claims, "" where not a string."""
    claimed, azp = claims.get("client_id", claims.get("clientId")), claims.get("azp")
    return (claimed if isinstance(claimed, str) else ""), (azp if isinstance(azp, str) else "")


def discovery_url(oidc: OidcConfig) -> str:
    return oidc.discovery_url or oidc.issuer.rstrip("/") + "/.well-known/openid-configuration"


def check_discovery(doc: Any, oidc: OidcConfig, url: str) -> str | None:
    """What the gateway needs of the issuer's discovery document (``keygate check`` asks the same):
    FetchError when it lacks it; the warning to give when it names another issuer, else None."""
    if not isinstance(doc, dict) or not isinstance(doc.get("jwks_uri"), str):
        raise FetchError(f"discovery {url}: no jwks_uri")
    intro = oidc.introspection
    if intro.enabled:
        endpoint = intro.endpoint or doc.get("introspection_endpoint")
        if not isinstance(endpoint, str) or not endpoint:
            raise FetchError("introspection enabled but the issuer advertises no introspection_endpoint")
    if doc.get("issuer") != oidc.issuer:
        # Behind a split-horizon setup the internal document may name the public issuer;
        # iss stays pinned to the configured value either way.
        return f"discovery document names issuer {doc.get('issuer')!r}, configured {oidc.issuer!r}"
    return None


class TokenValidator:
    """Validates access tokens of one pinned issuer. See module docstring."""

    def __init__(self, oidc: OidcConfig, *, session: aiohttp.ClientSession | None = None,
                 clock: Callable[[], float] = time.time, base_dir: str | Path = "."):
        self.config = oidc
        self.clock = clock
        self.base_dir = Path(base_dir)
        self._session = session
        self._own_session = session is None
        self.algorithms = tuple(a for a in oidc.algorithms if a in ALG_KEY_TYPES)
        self.keyset = KeySet(algorithms=self.algorithms, cooldown=oidc.unknown_kid_cooldown_seconds,
                             timeout=oidc.http_timeout_seconds, clock=clock)
        self.introspector: Introspector | None = None
        self._cache: OrderedDict[bytes, tuple[Identity, float, str | None]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._discovered = False
        self._discovery: dict[str, Any] = {}
        self._client_secret = ""
        # Told of every freshly validated identity (not cache hits): the ownership service learns
        # which user name each sub goes by. An observer must not raise.
        self.observers: list[Callable[[Identity], None]] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self.keyset.loaded

    @property
    def discovery_url(self) -> str:
        return discovery_url(self.config)

    async def start(self) -> None:
        """Discovery and the first JWKS fetch; when the issuer is down, keeps retrying in the background."""
        intro = self.config.introspection
        # A missing secret file is a configuration error: say so now, not from a background task.
        self._client_secret = read_secret(intro.client_secret, str(self.base_dir / intro.client_secret_file)
                                          if intro.client_secret_file else "") if intro.enabled else ""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        add_readiness_check("oidc", self._readiness)
        try:
            await self._load()
        except FetchError as exc:
            log.error("OIDC issuer not reachable yet (%s); retrying in the background", exc)
        self._task = asyncio.create_task(self._refresh_loop(), name="keygate-jwks-refresh")

    async def close(self) -> None:
        remove_readiness_check("oidc")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _readiness(self) -> tuple[bool, str]:
        if self.keyset.loaded:
            stale = f" (last refresh failed: {self.keyset.last_error})" if self.keyset.last_error else ""
            return True, f"{len(self.keyset.keys)} signing keys{stale}"
        return False, self.keyset.last_error or "no signing keys loaded yet"

    @property
    def _http(self) -> aiohttp.ClientSession:
        """The client session, from :meth:`start` (given or made there) until :meth:`stop`."""
        if self._session is None:
            raise RuntimeError("the token validator is not started")
        return self._session

    async def _load(self) -> None:
        if not self._discovered:
            await self._discover()
        if not await self.keyset.refresh(self._http):
            raise FetchError(self.keyset.last_error)

    async def _discover(self) -> None:
        doc = await get_json(self._http, self.discovery_url, self.config.http_timeout_seconds, "discovery")
        warning = check_discovery(doc, self.config, self.discovery_url)
        if warning:
            log.warning("%s", warning)
        self._discovery = doc
        self.keyset.jwks_uri = doc["jwks_uri"]
        intro = self.config.introspection
        if intro.enabled:
            endpoint = intro.endpoint or doc["introspection_endpoint"]  # (check_discovery: there is one)
            self.introspector = Introspector(self._http, endpoint, intro.client_id, self._client_secret,
                                             cache_seconds=intro.cache_seconds,
                                             cache_size=min(self.config.token_cache_size, 10000),
                                             timeout=self.config.http_timeout_seconds, clock=self.clock)
        self._discovered = True

    async def _refresh_loop(self) -> None:
        backoff = 1.0
        while True:
            if self.keyset.loaded:
                await asyncio.sleep(self.config.jwks_refresh_seconds)
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
            try:
                await self._load()
                backoff = 1.0
            except FetchError as exc:
                log.warning("OIDC refresh failed: %s", exc)
            except Exception:  # the loop must outlive any surprise, or keys would silently go stale
                log.exception("OIDC refresh failed unexpectedly")

    # ------------------------------------------------------------------ validation

    async def validate(self, token: str) -> Identity:
        try:
            identity = await self._validate(token)
        except AuthError as exc:
            key = ("rejected", exc.reason.value)
            VALIDATIONS.counts[key] = VALIDATIONS.counts.get(key, 0) + 1
            raise
        return identity

    def cached(self, digest: bytes) -> Identity | None:
        """The identity of a token validated before, known by its digest alone (the HTTP gateway
        keeps the digest with a request head it has seen): what :meth:`validate` answers from its
        cache, or None (not cached, expired, its key gone, or introspection asked every time)."""
        if self._introspects_always:
            return None
        identity = self._hit(digest)
        if identity is not None:
            VALIDATIONS.counts[_OK_CACHED] += 1
        return identity

    @property
    def _introspects_always(self) -> bool:
        """Every request's token is asked of the introspection endpoint, cached or not."""
        return self.introspector is not None and self.config.introspection.always

    def _hit(self, digest: bytes) -> Identity | None:
        hit = self._cache.get(digest)
        if hit is None:
            return None
        identity, until, kid = hit
        # Never past exp, and never once the signing key left the published set.
        if self.clock() < until and (kid is None or kid in self.keyset.keys):
            self._cache.move_to_end(digest)
            return identity
        del self._cache[digest]
        return None

    async def _validate(self, token: str) -> Identity:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            raise AuthError(AuthReason.MALFORMED, "empty or oversized token")
        digest = token_digest(token)
        identity = self._hit(digest)
        if identity is not None:
            if self._introspects_always and self.introspector is not None:
                await self.introspector.introspect(token)
            VALIDATIONS.counts[_OK_CACHED] += 1
            return identity

        if not looks_like_jwt(token):
            if self.introspector is None:
                raise AuthError(AuthReason.MALFORMED, "not a JWT and introspection is off")
            identity = self._identity(self._check_introspected(await self.introspector.introspect(token)),
                                      "introspection")
            VALIDATIONS.counts[_OK_FRESH] += 1
            self._tell(identity)
            return identity

        claims, kid = await self._verify_jwt(token)
        method = "token"
        needs_introspection = not isinstance(claims.get("sub"), str) or not claims.get("sub")
        if self.introspector is not None and (needs_introspection or self.config.introspection.always):
            answer = self._check_introspected(await self.introspector.introspect(token))
            if needs_introspection:  # lightweight token: fill in what it lacks, signed claims win
                claims = {**answer, **{k: v for k, v in claims.items() if k != "sub"}}
                method = "introspection"
        self._check_subject(claims)
        identity = self._identity(claims, method)
        self._remember(digest, identity, kid)
        VALIDATIONS.counts[_OK_FRESH] += 1
        self._tell(identity)
        return identity

    def _tell(self, identity: Identity) -> None:
        for observer in self.observers:
            try:
                observer(identity)
            except Exception:
                log.exception("token observer failed")

    async def _verify_jwt(self, token: str) -> tuple[dict[str, Any], str | None]:
        head_b64, payload_b64, sig_b64 = token.split(".")
        header = _json_object(_b64decode(head_b64), "header")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthError(AuthReason.MALFORMED, "header has no alg")
        if "crit" in header:
            raise AuthError(AuthReason.MALFORMED, "critical header extensions are not supported")
        if alg not in self.algorithms:
            if alg.upper().startswith("HS") and self._unverified_typ(payload_b64) in REFRESH_TOKEN_TYPES:
                raise AuthError(AuthReason.NOT_AN_ACCESS_TOKEN, "a refresh token")
            raise AuthError(AuthReason.ALGORITHM_NOT_ALLOWED, f"alg {alg[:20]!r}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError(AuthReason.MALFORMED, "kid is not a string")
        if not self.keyset.loaded:
            raise AuthError(AuthReason.ISSUER_UNREACHABLE, "no signing keys loaded")
        key = self.keyset.get(kid, alg)
        if key is None:
            await self.keyset.refresh_for_unknown_kid(self._http)
            key = self.keyset.get(kid, alg)
            if key is None:
                raise AuthError(AuthReason.UNKNOWN_KID, "kid not in the issuer's key set")
        if not key.fits(alg):
            raise AuthError(AuthReason.ALGORITHM_NOT_ALLOWED, f"alg {alg} does not fit key {kid!r}")
        signature = _b64decode(sig_b64)
        try:
            good = key.verify(alg, f"{head_b64}.{payload_b64}".encode("ascii"), signature)
        except (ValueError, TypeError, UnicodeEncodeError):
            good = False
        if not good:
            raise AuthError(AuthReason.BAD_SIGNATURE)
        claims = _json_object(_b64decode(payload_b64), "payload")
        self._check_claims(claims)
        return claims, kid

    @staticmethod
    def _unverified_typ(payload_b64: str) -> Any:
        """Only to name the reason of a rejection that is certain anyway."""
        try:
            return _json_object(_b64decode(payload_b64), "payload").get("typ")
        except AuthError:
            return None

    def _check_claims(self, claims: dict[str, Any]) -> None:
        cfg = self.config
        if claims.get("iss") != cfg.issuer:
            raise AuthError(AuthReason.WRONG_ISSUER)
        typ = claims.get("typ")
        if typ not in ACCESS_TOKEN_TYPES:
            raise AuthError(AuthReason.NOT_AN_ACCESS_TOKEN, f"typ {str(typ)[:20]!r}")
        now, leeway = self.clock(), cfg.leeway_seconds
        exp = _number(claims, "exp")
        if exp is None:
            raise AuthError(AuthReason.MISSING_CLAIM, "exp")
        if now > exp + leeway:
            raise AuthError(AuthReason.EXPIRED)
        nbf = _number(claims, "nbf")
        if nbf is not None and now + leeway < nbf:
            raise AuthError(AuthReason.NOT_YET_VALID, "nbf")
        iat = _number(claims, "iat")
        if iat is not None and now + leeway < iat:
            raise AuthError(AuthReason.NOT_YET_VALID, "iat in the future")
        if cfg.audience and cfg.audience not in _strings(claims.get("aud")):
            raise AuthError(AuthReason.WRONG_AUDIENCE)

    def _check_introspected(self, answer: dict[str, Any]) -> dict[str, Any]:
        """An active introspection answer still has to be ours and an access token."""
        cfg = self.config
        if "iss" in answer and answer["iss"] != cfg.issuer:
            raise AuthError(AuthReason.WRONG_ISSUER, "introspection")
        typ = answer.get("typ", answer.get("token_type"))
        if typ is not None and typ not in ACCESS_TOKEN_TYPES:
            raise AuthError(AuthReason.NOT_AN_ACCESS_TOKEN, "introspection")
        exp = _number(answer, "exp")
        if exp is not None and self.clock() > exp + cfg.leeway_seconds:
            raise AuthError(AuthReason.EXPIRED, "introspection")
        if cfg.audience and "aud" in answer and cfg.audience not in _strings(answer["aud"]):
            raise AuthError(AuthReason.WRONG_AUDIENCE, "introspection")
        self._check_subject(answer)
        return answer

    @staticmethod
    def _check_subject(claims: dict[str, Any]) -> None:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError(AuthReason.MISSING_CLAIM, "sub")

    def _service_client(self, claims: dict[str, Any], username: str) -> str:
        """The client id when the provider says this token is a service account's, else "".

        What says so is configured (``oidc.service_accounts``); a ``client_id`` claim alone does
        not (RFC 9068 makes it a claim of every JWT access token, users' included)."""
        rules = self.config.service_accounts
        client_id, azp = _client_of(claims)
        sub: str = claims["sub"]  # checked to be a non-empty string before
        # Keycloak names a client's service-account user "service-account-<client id>" and gives its
        # tokens the client_id claim: both must agree, so a user who picked such a name is still a user.
        if rules.keycloak and client_id and username == SERVICE_ACCOUNT_PREFIX + client_id:
            return client_id
        if rules.sub_equals_client_id and sub in (client_id, azp) and sub:
            return sub
        gty = claims.get("gty")
        if rules.gty and isinstance(gty, str) and gty in rules.gty and (client_id or azp):
            return client_id or azp
        return ""

    def _identity(self, claims: dict[str, Any], method: str) -> Identity:
        cfg = self.config
        client_id, azp = _client_of(claims)
        username = claims.get(cfg.username_claim)
        username = username if isinstance(username, str) else ""
        if _lone_surrogate(claims["sub"]) or _lone_surrogate(username):
            raise AuthError(AuthReason.MALFORMED, "sub or user name is not valid Unicode")
        service_client = self._service_client(claims, username)
        service = bool(service_client)
        if service:
            # A service account is known by its client id, not the provider's synthetic user name.
            username = service_client
        elif not username:
            # Never the client id: every user of one client would share one name.
            username = claims["sub"]
        roles: set[str] = set()
        for path in cfg.roles:
            roles.update(_strings(claim_path(claims, path)))
        client_roles: set[str] = set()
        resource_access = claims.get("resource_access")
        if isinstance(resource_access, dict):
            for client, entry in resource_access.items():
                if isinstance(entry, dict):
                    client_roles.update(f"{client}:{role}" for role in _strings(entry.get("roles")))
        scope = claims.get("scope")
        exp = claims.get("exp")
        return Identity(
            kind="service" if service else "user",
            sub=claims["sub"],
            username=username,
            method=method,  # type: ignore[arg-type]
            roles=frozenset(roles),
            client_roles=frozenset(client_roles),
            scopes=frozenset(scope.split()) if isinstance(scope, str) else frozenset(),
            groups=frozenset(g.lstrip("/") for g in _strings(claims.get("groups"))),
            azp=azp or client_id,
            expires_at=float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None,
            claims=tuple(claims.items()),
        )

    def _remember(self, digest: bytes, identity: Identity, kid: str | None) -> None:
        if identity.expires_at is None or self.config.token_cache_size <= 0:
            return
        self._cache[digest] = (identity, identity.expires_at, kid)
        while len(self._cache) > self.config.token_cache_size:
            self._cache.popitem(last=False)
