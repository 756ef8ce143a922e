"""The HTTP gateway in front of Orion: the asyncio/aiohttp shell around the sans-IO parts.

Per request: normalise the path, parse the query, fix the tenant, authenticate
(:mod:`.auth`), read the body when the decision depends on it (capped at
``http.max_body_bytes``) and parse it strictly (:func:`.ngsi.parse_json_body`:
nesting capped at ``http.max_json_depth`` before parsing; lone surrogates,
non-finite and out-of-range numbers, duplicate keys refused 400 ``ParseError``; the JSON
attribute writes, which the decision does not read, are checked the same way and forwarded as sent),
analyse (:mod:`.ngsi`), plan (:mod:`.plan`), check notification targets
(:mod:`proxy.ssrf`, with Orion's own address never a target), then forward to Orion
over the lean upstream client's keep-alive pool (:mod:`.upstream`; aiohttp's client for an
``https://`` upstream, and for the subscription reads and withdrawals), and audit the outcome
(batched per turn of the event loop, :mod:`.outcomes`). Orion is only ever sent
the canonical path, the re-encoded query, and (where the body was checked) the
re-serialised body: what was checked is what Orion reads. A forwarded write is
counted on the entity ids it touches until Orion answers (``ownership.writes``):
a device's deletion waits for those before its clean-up, and writes on an id
whose deletion has begun are refused 409; a subscription is checked again once
recorded and withdrawn if its device is being deleted meanwhile.

Slow clients are cut off by the listener (:mod:`.listener`): a head within
``http.header_timeout_seconds``, a body within ``http.body_timeout_seconds``,
else 408. A non-admin's ``GET /v2/subscriptions`` reads from Orion only the
subscriptions the store records for the caller, one by one, so its cost is
bounded by what the caller owns, not by the tenant's list.

Headers. Hop-by-hop headers (and those named in ``Connection``) never cross.
The gateway owns, and replaces whatever the client sent for them:
``Authorization`` and ``X-Auth-Token`` (never forwarded), ``Forwarded``,
``X-Forwarded-For/Proto/Host``, ``X-Real-IP``, ``Fiware-Service``, the
``X-HTTP-Method-Override`` family and every ``X-Keygate-*`` header; it sets ``X-Keygate-Kind``, ``-Sub``, ``-User``,
``-Roles`` and ``-Device`` from the authenticated identity. The identity headers other
gateways set (:data:`IDENTITY_HEADERS`: FIWARE Wilma's ``X-Nick-Name`` family, oauth2-proxy's
``X-Auth-Request-*`` and ``X-Forwarded-User`` family, ``Remote-User``), and the names listed in
``http.strip_request_headers``, are dropped, so a backend that trusts them cannot be lied to.

Tenancy. With ``http.fiware_service`` set, that tenant is forced on every
request. Otherwise the client's ``Fiware-Service`` (lower-cased, as Orion does)
is the tenant, and a device counts as a device only in the tenant its facts
record. ``Fiware-ServicePath`` is passed on when it follows Orion's grammar
(one plain scope for updates; up to ten, ``/#`` allowed, for queries) and
refused otherwise: a service path only narrows what Orion looks at, and every
entity id a request touches is checked whatever the path, so it cannot widen
anyone's access. An operator who wants it closed can deny the endpoints by
policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, quote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Counter, Histogram
from yarl import URL

from proxy.config import HttpConfig, parse_hostport
from proxy.http import ngsi
from proxy.http import plan as planning
from proxy.http.auth import authenticate, known_bearer
from proxy.http.lean_answer import head_bytes, plain_head
from proxy.http.lean_server import LeanConnection, LeanConnections, LeanRequest, Relayed, lean_prefixes
from proxy.http.listener import ConnectionSlot, DeadlineRequestHandler, DeadlineSite, RequestTimeout
from proxy.http.outcomes import Outcomes
from proxy.http.pool_wait import PoolWait, pool_wait_trace
from proxy.http.subscription_guard import SubscriptionGuard
from proxy.http.upstream import UpstreamBusy, UpstreamError, UpstreamPool, UpstreamResponse, pool_for
from proxy.identity.model import ANONYMOUS, AuthError, AuthReason, Identity
from proxy.metrics import REGISTRY
from proxy.policy.paths import PathError, normalize_path
from proxy.services import Services
from proxy.sharing import reuse_port
from proxy.ssrf import Allowlist, Resolver, check_target, default_resolver
from proxy.tls import upstream_context

log = logging.getLogger("keygate.http")

#: A request as the handler reads it: aiohttp's, or the lean server's (the same attributes).
Request = web.Request | LeanRequest

#: What a forwarded request writes to the store after Orion answered (plan.Forward.after).
SUBSCRIPTION_WRITES = frozenset({"record_subscription", "forget_subscription", "update_subscription"})

REQUESTS = Counter("keygate_http_requests", "HTTP gateway requests by decision and status",
                   ["decision", "status"], registry=REGISTRY)
LATENCY = Histogram("keygate_http_request_seconds", "HTTP gateway request latency, end to end",
                    ["decision"], registry=REGISTRY,
                    buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
UPSTREAM_LATENCY = Histogram("keygate_http_upstream_seconds", "Time Orion took to answer (headers)",
                             registry=REGISTRY, buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                                         2.5, 5, 10, 30))

# RFC 9110 7.6.1 hop-by-hop headers, plus the ones this gateway owns and sets itself.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade"})
_OWN_REQUEST_HEADERS = frozenset({"host", "authorization", "x-auth-token", "forwarded", "x-forwarded-for",
                                  "x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "x-real-ip",
                                  "fiware-service", "content-length", "accept-encoding", "expect",
                                  # the method checked is the method sent: no override by header
                                  "x-http-method-override", "x-http-method", "x-method-override"})
IDENTITY_PREFIX = "x-keygate-"
# Identity headers other gateways of the ecosystem set, which backends written for them trust:
# a client must not be able to send them through keygate. http.strip_request_headers adds names.
IDENTITY_HEADERS = frozenset({
    # FIWARE PEP Proxy Wilma (X-Auth-Token, its token header, is one the gateway owns, above)
    "x-nick-name", "x-display-name", "x-roles", "x-organizations", "x-eidas-profile", "x-app-id",
    # oauth2-proxy: --set-xauthrequest, --pass-user-headers, --pass-access-token
    "x-auth-request-user", "x-auth-request-email", "x-auth-request-groups", "x-auth-request-preferred-username",
    "x-auth-request-access-token", "x-forwarded-user", "x-forwarded-email", "x-forwarded-groups",
    "x-forwarded-preferred-username", "x-forwarded-access-token", "gap-auth",
    # web servers' and SSO modules' REMOTE_USER
    "remote-user", "x-remote-user",
})
_CORS_EXPOSE = "Location, Fiware-Total-Count, Fiware-Correlator"
_MAX_QUERY_FIELDS = 64
_CHUNK = 65536
_SUBSCRIPTION_FETCH_CONCURRENCY = 16
_IDENTITY_BLOCKS = 4096
_UPSTREAM_CONNECTIONS = 256   # to Orion at most, both clients together (proxy.app.HTTP_UPSTREAM_DESCRIPTORS)
_UPSTREAM_HEADER_MEMO = 8    # upstream header lists kept per request head (identities, tenants, peers)
_SHUTDOWN_SECONDS = 10.0      # for the answers in progress on the lean server when the listener stops
_SIDE_CONNECTIONS = 32        # of which the aiohttp client's, beside the lean pool


def orion_error(status: int, error: str, description: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": error, "description": description}, status=status, headers=headers)


class BodyTooLarge(Exception):
    pass


def _broken_off(request: web.Request) -> ConnectionResetError:
    """Orion's answer broke off after its head went to the client: the client cannot be told (an
    error answer would land inside the body it is reading), so its connection is ended."""
    if request.transport is not None:
        request.transport.close()
    return ConnectionResetError("the context broker broke off its answer")


class _UpstreamRefused(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _relayable(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Orion's answer headers that go on to the client, in order: not the hop-by-hop ones nor those
    its Connection header names, not Content-Length (the gateway frames the answer itself), no CORS
    header (the gateway's own CORS answer is the only one). Names are compared without trailing
    spaces: aiohttp's client (an https:// Orion) reads ``Content-Length : 2``, and the other framing
    and hop-by-hop names so spelled, as those headers and hands them on as ``"Content-Length "``."""
    pairs = list(pairs)
    connection_named = {t.strip().lower() for name, value in pairs if name.lower().rstrip() == "connection"
                        for t in value.split(",")}
    return [(name, value) for name, value in pairs
            if not ((low := name.lower().rstrip()) in HOP_BY_HOP or low in connection_named
                    or low == "content-length" or low.startswith("access-control-"))]


_NO_SUBSCRIPTION = object()


def audit_record(method: str, audit: dict[str, Any], status: int, latency_ms: float,
                 remote: str | None) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """A request's audit record, and the key naming its body: every field but latency_ms, so that
    two records with one key are written alike (tests/unit/test_http_audit_record.py holds them)."""
    devices = tuple(audit["devices"])
    reason = audit["reason"] or None
    subscription = audit.get("subscription", _NO_SUBSCRIPTION)
    record = {"protocol": "http", "action": method, "resource": audit["path"], "decision": audit["decision"],
              "identity": audit["identity"], "rule": audit["rule"], "reason": reason, "devices": list(devices),
              "status": status, "upstream_status": audit["upstream_status"], "latency_ms": latency_ms,
              "remote": remote}
    if subscription is not _NO_SUBSCRIPTION:
        record["subscription"] = subscription
    return record, (method, audit["path"], audit["decision"], audit["identity"], audit["rule"], reason, devices,
                    status, audit["upstream_status"], remote, subscription)


def _milliseconds(seconds: float) -> float:
    """``seconds`` in ms to three decimals: round(x, 3) converts to decimal and back, 1.3 µs a request."""
    return int(seconds * 1_000_000 + 0.5) / 1000


def _header_value(text: str) -> str:
    # Identity values come from tokens: keep them one printable ASCII line.
    return quote(text, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")


@functools.lru_cache(maxsize=4096)   # the same entities are read and written again and again
def _quote_path(path: str) -> str:
    return "/".join(quote(seg, safe="!$&'()*+,;=:@-._~") for seg in path.split("/"))


_UNPARSED: tuple[tuple[str, str], ...] = (("", "does not parse"),)
_REPEATED: tuple[tuple[str, str], ...] = (("", "a parameter repeated"),)


def _query_of(raw: str) -> tuple[tuple[str, str], ...]:
    """The query's parameters in order; _UNPARSED or _REPEATED (compared by identity) when refused.
    Clients repeat their queries (options=keyValues, type=...&limit=...): a short one is parsed once."""
    return _short_query(raw) if len(raw) <= _REMEMBERED_QUERY else _parse_query(raw)


def _parse_query(raw: str) -> tuple[tuple[str, str], ...]:
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=False, errors="strict",
                          max_num_fields=_MAX_QUERY_FIELDS)
    except (ValueError, UnicodeDecodeError):
        return _UNPARSED
    if len({k for k, _ in pairs}) != len(pairs):
        return _REPEATED
    return tuple(pairs)


_REMEMBERED_QUERY = 256   # longest query kept parsed (1,024 of them: a bounded few hundred KiB)
_short_query = functools.lru_cache(maxsize=1024)(_parse_query)


_REMEMBERED_REQUEST = 512   # longest path and query whose analysis is kept (2,048 of them)


@functools.lru_cache(maxsize=2048)
def _analysed(method: str, path: str, query: tuple[tuple[str, str], ...]) -> tuple[ngsi.NgsiRequest, ngsi.Action]:
    """A request without a body the decision needs, and its NGSI analysis: a pure function of these
    three (both frozen), so the same request's is kept; what it is allowed is planned every time."""
    req = ngsi.NgsiRequest(method, path, query)
    return req, ngsi.analyse(req)


def _quote_query(query: tuple[tuple[str, str], ...]) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe=',:')}" for k, v in query)


def http_section(services: Services) -> HttpConfig:
    """The configuration's http section: the HTTP gateway is built only when there is one."""
    if services.config.http is None:
        raise ValueError("the HTTP gateway needs the http section of the configuration")
    return services.config.http


class GatewayHandler:
    """The catch-all request handler; one per application."""

    def __init__(self, services: Services, *, resolver: Resolver = default_resolver, client: str = "lean"):
        self.services = services
        # "lean": forwarded requests go over proxy.http.upstream's pool (for an http:// upstream);
        # "aiohttp": over the old aiohttp client session, kept for the differential test and https://.
        if client not in ("lean", "aiohttp"):
            raise ValueError(f"unknown upstream client {client!r}")
        self.client = client
        self.pool: UpstreamPool | None = None
        self.config = http_section(services)
        self.upstream = self.config.upstream.rstrip("/")
        self.admin_role = services.config.ownership.admin_role
        self.allowlist = Allowlist(self.config.notification_allowlist)
        self.cors = frozenset(self.config.cors_origins)
        self.stripped = IDENTITY_HEADERS | {name.lower().replace("_", "-")
                                            for name in self.config.strip_request_headers}
        self.resolver = resolver
        self.session: aiohttp.ClientSession | None = None
        self.guard = SubscriptionGuard(services, self)
        self.outcomes = Outcomes(services.audit, REQUESTS, LATENCY, UPSTREAM_LATENCY)
        # identity -> its X-Keygate-* headers (Identity compares every field that says who it is)
        self._identity_blocks: dict[Identity, tuple[tuple[str, str], ...]] = {}
        # (tenant, subscription id) -> [its lock, requests holding or waiting for it]
        self._subscription_turns: dict[tuple[str, str], list[Any]] = {}

    async def open(self, _app: web.Application | None = None) -> None:
        # connect: the wait for a free connection of the pool as well (clients reading large answers
        # slowly hold theirs), as the lean pool's; sock_connect, sock_read: Orion's own.
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.upstream_timeout_seconds,
                                        sock_connect=self.config.upstream_timeout_seconds,
                                        sock_read=self.config.upstream_timeout_seconds)
        if self.client == "lean":
            # The two clients share the connections proxy.app budgets for (HTTP_UPSTREAM_DESCRIPTORS):
            # the old one keeps a few for the subscription reads and withdrawals.
            self.pool = pool_for(self.upstream, timeout=self.config.upstream_timeout_seconds,
                                 limit=_UPSTREAM_CONNECTIONS - _SIDE_CONNECTIONS)
        limit = _SIDE_CONNECTIONS if self.pool is not None else _UPSTREAM_CONNECTIONS
        # An https:// Orion is verified against http.upstream_ca (or the system's store): proxy.tls.
        connector = aiohttp.TCPConnector(limit=limit, ttl_dns_cache=60,
                                         ssl=upstream_context(self.services.config) or True)
        # auto_decompress off: bodies pass through as Orion sent them.
        self.session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False,
                                             skip_auto_headers=("User-Agent", "Accept-Encoding"),
                                             trace_configs=[pool_wait_trace()])

    async def close(self, _app: web.Application | None = None) -> None:
        self.outcomes.flush()
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    # ------------------------------------------------------------------ entry point

    async def handle(self, request: Request) -> web.StreamResponse | Relayed:
        started = time.perf_counter()
        audit: dict[str, Any] = {"identity": None, "decision": "deny", "rule": None, "reason": "",
                                 "devices": (), "upstream_status": None, "path": request.raw_path.split("?")[0]}
        try:
            response = await self._handle(request, audit)
        except asyncio.CancelledError:
            audit["reason"] = audit["reason"] or "client went away"
            self._finish(request, audit, 499, started)
            raise
        except ConnectionResetError:   # closed mid-answer (the write deadline, or the client): nobody to tell
            audit["reason"] = audit["reason"] or "client went away"
            self._finish(request, audit, 499, started)
            raise
        except RequestTimeout as exc:   # the listener's body deadline
            response = self._timed_out(audit, exc)
        except Exception:  # the one place that turns an unforeseen error into an answer
            log.exception("error handling %s %s", request.method, audit["path"])
            audit["decision"], audit["reason"] = "error", "internal error"
            response = orion_error(500, "InternalServerError", "internal error")
        self._finish(request, audit, response.status, started)
        return response

    async def handle_aiohttp(self, request: web.Request) -> web.StreamResponse:
        """:meth:`handle` for aiohttp's server (only a lean request is answered by a relay of its own)."""
        response = await self.handle(request)
        if not isinstance(response, web.StreamResponse):
            raise TypeError("an aiohttp request was answered as a lean one")
        return response

    def _finish(self, request: Request, audit: dict[str, Any], status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        record, key = audit_record(request.method, audit, status, _milliseconds(elapsed), request.remote)
        self.outcomes.add(audit["decision"], status, elapsed, record, key)

    def _deny(self, audit: dict[str, Any], status: int, error: str, description: str, reason: str,
              headers: dict[str, str] | None = None) -> web.Response:
        audit["decision"], audit["reason"] = "deny", reason
        return orion_error(status, error, description, headers)

    async def _handle(self, request: Request, audit: dict[str, Any]) -> web.StreamResponse | Relayed:
        method = request.method.upper()
        raw_path, _, raw_query = request.raw_path.partition("?")
        try:
            path = normalize_path(raw_path)
        except PathError as exc:
            return self._deny(audit, 400, "BadRequest", "invalid path", f"path: {exc}")
        audit["path"] = path
        if method == "OPTIONS" and request.headers.get("Origin") and self.cors:
            return self._preflight(request, audit)
        query = _query_of(raw_query) if raw_query else ()
        if query is _UNPARSED:
            return self._deny(audit, 400, "BadRequest", "invalid query string", "query does not parse")
        if query is _REPEATED:
            # Repeated parameters are read differently by different parsers: refuse, do not pick one.
            return self._deny(audit, 400, "BadRequest", "repeated query parameter", "repeated query parameter")

        tenant = self._tenant(request)
        if isinstance(tenant, ngsi.Reject):
            return self._deny(audit, tenant.status, tenant.error, tenant.description, "bad Fiware-Service")
        is_query = method in ngsi.READ_METHODS or path == "/v2/op/query"
        bad_scope = ngsi.check_service_path(request.headers.get("Fiware-ServicePath"), query=is_query)
        if bad_scope is not None:
            return self._deny(audit, 400, bad_scope.error, bad_scope.description, "bad Fiware-ServicePath")

        length = request.content_length
        if length is not None and length > self.config.max_body_bytes:
            return self._too_large(audit)

        # A head seen before with a token still valid: its identity without a coroutine, a header
        # parse and a SHA-256 of the token (35k instructions a request, bench/http_instr.py).
        memo = request.memo if isinstance(request, LeanRequest) else None
        known = known_bearer(memo, self.services)
        try:
            identity = known if known is not None else await authenticate(
                request.headers, request.transport.get_extra_info("ssl_object") if request.transport else None,
                self.services, memo)
        except AuthError as exc:
            audit["identity"] = None
            if exc.reason is AuthReason.ISSUER_UNREACHABLE:
                return self._deny(audit, 503, "ServiceUnavailable", "cannot validate credentials now",
                                  f"auth: {exc}", {"Retry-After": "5"})
            return self._deny(audit, 401, "Unauthorized", "not authorized", f"auth: {exc}",
                              {"WWW-Authenticate": 'Bearer realm="keygate"'})
        audit["identity"] = identity

        body: Any = ngsi.NO_BODY
        buffered: bytes | None = None
        has_body = bool(length) or request.headers.get("Transfer-Encoding", "").lower() == "chunked" \
            or (length is None and request.body_exists)
        needed = ngsi.needs_json_body(method, path)
        checked = has_body and ngsi.checks_json_body(method, path, request.headers.get("Content-Type", ""))
        if needed or checked or (has_body and length is None):
            # Bodies the decision needs, JSON attribute writes (checked, then forwarded as sent), and
            # chunked bodies (whose size only their end tells) are read in full before anything goes upstream.
            try:
                buffered = await self._read_capped(request)
            except BodyTooLarge:
                return self._too_large(audit)
            if (needed or checked) and buffered:
                parsed = ngsi.parse_json_body(buffered, self.config.max_json_depth)
                if isinstance(parsed, ngsi.Reject):
                    return self._deny(audit, parsed.status, parsed.error, parsed.description,
                                      f"json: {parsed.description}")
                if needed:
                    body = parsed

        if body is ngsi.NO_BODY and len(path) + len(raw_query) <= _REMEMBERED_REQUEST:
            req, action = _analysed(method, path, query)
        else:
            req = ngsi.NgsiRequest(method, path, query, body)
            action = ngsi.analyse(req)
        decided = planning.plan(req, action, self.context(identity, tenant))
        audit["rule"], audit["devices"] = decided.rule, decided.devices
        if isinstance(decided, planning.Deny):
            return self._refuse(audit, decided, identity)
        if isinstance(decided, planning.Answer):
            audit["decision"], audit["reason"] = "allow", decided.reason
            return self._cors(request, web.json_response(decided.body, status=decided.status,
                                                         headers=dict(decided.headers)))
        for target in decided.targets:
            why = await check_target(target.url, target.kind, self.allowlist, resolve=self.resolver,
                                     upstream=self.upstream)
            if why is not None:
                return self._deny(audit, 403, "Forbidden", f"notification URL not allowed: {why}", f"ssrf: {why}")
        audit["decision"], audit["reason"] = "allow", decided.reason
        if decided.body is not None:
            upstream_body: Any = decided.body
        elif buffered is not None:
            upstream_body = buffered
        elif has_body:
            upstream_body = self._stream_capped(request)
        else:
            upstream_body = None
        # A write is counted on the ids it touches until Orion has answered, so that a device's
        # deletion waits for it before its clean-up; a write on an id whose deletion has begun is refused.
        writes = self.services.ownership.writes
        counted = decided.devices if not is_query and decided.devices else ()
        if not counted:
            return await self._forward(request, decided, upstream_body, identity, tenant, audit)
        if not writes.begin(counted):
            return self._deny(audit, 409, "Conflict", "the device is being deleted", "write during deletion")
        # The count ends when the write is over at the gateway. Without Orion's answer (timed out,
        # connection lost, an error, the handler cancelled as the gateway stops) its outcome is
        # unknown and it may still land: its ids stay unsettled for the grace period, so a deletion's
        # clean-up stays owed until then. Neither server cancels a handler whose client leaves, so
        # the exchange runs to Orion's answer in the handler's own task (a task of its own and a
        # shield cost 36k instructions a write, bench/http_instr.py).
        over = False
        try:
            response = await self._forward(request, decided, upstream_body, identity, tenant, audit)
            over = not audit.get("outcome_unknown")
            return response
        finally:
            if not over:
                writes.unsettled(counted)
            writes.end(counted)

    # ------------------------------------------------------------------ pieces

    def _tenant(self, request: Request) -> str | ngsi.Reject:
        forced = self.config.fiware_service
        if forced:
            return forced.lower()
        return ngsi.tenant_of(request.headers.get("Fiware-Service"))

    def _too_large(self, audit: dict[str, Any]) -> web.Response:
        return self._deny(audit, 413, "RequestEntityTooLarge",
                          f"request body larger than {self.config.max_body_bytes} bytes", "body over the cap",
                          {"Connection": "close"})

    def _timed_out(self, audit: dict[str, Any], exc: RequestTimeout) -> web.Response:
        return self._deny(audit, 408, "RequestTimeout", exc.reason, "body too slow", {"Connection": "close"})

    def _refuse(self, audit: dict[str, Any], d: planning.Deny, identity: Identity) -> web.Response:
        if d.status == 403 and identity.is_anonymous:
            # No credentials and not open to anonymous: ask for credentials.
            return self._deny(audit, 401, "Unauthorized", "authentication required", d.reason,
                              {"WWW-Authenticate": 'Bearer realm="keygate"'})
        headers = {"WWW-Authenticate": 'Bearer realm="keygate"'} if d.status == 401 else None
        return self._deny(audit, d.status, d.error, d.description, d.reason, headers)

    async def _read_capped(self, request: Request) -> bytes:
        cap = self.config.max_body_bytes
        chunks, size = [], 0
        async for chunk in request.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > cap:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def _stream_capped(self, request: Request) -> AsyncIterator[bytes]:
        # Only used with a Content-Length already checked against the cap; aiohttp's
        # parser stops at that length, the count is a second line of defence.
        cap, size = self.config.max_body_bytes, 0
        async for chunk in request.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > cap:
                raise BodyTooLarge
            yield chunk

    def _upstream_headers(self, request: Request, identity: Identity, tenant: str,
                          rewritten: bool) -> CIMultiDict[str]:
        """The headers Orion gets; the same for the same head, identity, tenant and connection, so
        a lean request keeps them with its head (``memo``) for the next one."""
        memo = request.memo if isinstance(request, LeanRequest) else None
        if memo is None:
            return self._build_upstream_headers(request, identity, tenant, rewritten)
        key = (identity, tenant, rewritten, request.remote, request.scheme)
        built = memo.get(key)
        if built is None:
            if len(memo) >= _UPSTREAM_HEADER_MEMO:
                memo.clear()
            built = memo[key] = tuple(self._build_upstream_headers(request, identity, tenant, rewritten).items())
        return CIMultiDict(built)

    def _build_upstream_headers(self, request: Request, identity: Identity, tenant: str,
                                rewritten: bool) -> CIMultiDict[str]:
        connection_named = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            low = name.lower()
            # Compared with "_" read as "-": backends that map headers into a CGI/WSGI environment
            # (X_Keygate_Sub and X-Keygate-Sub are both HTTP_X_KEYGATE_SUB) would take one for the other.
            dashed = low.replace("_", "-")
            if low in HOP_BY_HOP or low in connection_named or low in _OWN_REQUEST_HEADERS \
                    or dashed in self.stripped or dashed.startswith(IDENTITY_PREFIX):
                continue
            if rewritten and low == "content-type":
                continue
            out.add(name, value)
        if rewritten:
            out["Content-Type"] = "application/json"
        elif request.content_length is not None and request.content_length > 0:
            out["Content-Length"] = str(request.content_length)
        if tenant:
            out["Fiware-Service"] = tenant
        out["X-Forwarded-For"] = request.remote or ""
        out["X-Forwarded-Proto"] = request.scheme
        if request.host:
            out["X-Forwarded-Host"] = _header_value(request.host)
        out.extend(self._identity_headers(identity))
        return out

    def _identity_headers(self, identity: Identity) -> tuple[tuple[str, str], ...]:
        """The X-Keygate-* headers of ``identity``, built once per identity (quoting is not free)."""
        block = self._identity_blocks.get(identity)
        if block is None:
            pairs: list[tuple[str, str]] = [("X-Keygate-Kind", identity.kind)]
            if not identity.is_anonymous:
                pairs.append(("X-Keygate-Sub", _header_value(identity.sub)))
                pairs.append(("X-Keygate-User", _header_value(identity.username)))
                if identity.roles:
                    pairs.append(("X-Keygate-Roles", _header_value(",".join(sorted(identity.roles)))))
                if identity.device_id:
                    pairs.append(("X-Keygate-Device", _header_value(identity.device_id)))
            if len(self._identity_blocks) >= _IDENTITY_BLOCKS:
                self._identity_blocks.clear()
            block = self._identity_blocks[identity] = tuple(pairs)
        return block

    def _url(self, path: str, query: tuple[tuple[str, str], ...]) -> URL:
        text = self.upstream + _quote_path(path)
        if query:
            text += "?" + _quote_query(query)
        return URL(text, encoded=True)

    async def _forward(self, request: Request, d: planning.Forward, body: Any, identity: Identity,
                       tenant: str, audit: dict[str, Any]) -> web.StreamResponse | Relayed:
        assert self.session is not None, "the gateway's client session is not open"  # noqa: S101 (narrowing)
        headers = self._upstream_headers(request, identity, tenant, rewritten=d.body is not None)
        if isinstance(body, bytes):
            headers["Content-Length"] = str(len(body))
        if d.after == "filter_subscriptions":
            return await self._own_subscriptions(request, d, headers, tenant, audit)
        if d.after in ("update_subscription", "forget_subscription"):
            # Orion applies a subscription's changes in the order it gets them, and the store must end
            # with the subject Orion holds: one change of a subscription at a time, from sending it to
            # recording it (two PATCHes answered in the other order left the store naming a device
            # Orion no longer watched, so that device's deletion missed the subscription).
            async with self._subscription_turn((tenant, d.path.rsplit("/", 1)[-1])):
                return await self._exchange(request, d, body, identity, tenant, headers, audit)
        return await self._exchange(request, d, body, identity, tenant, headers, audit)

    @contextlib.asynccontextmanager
    async def _subscription_turn(self, key: tuple[str, str]) -> AsyncIterator[None]:
        turn = self._subscription_turns.get(key)
        if turn is None:
            turn = self._subscription_turns[key] = [asyncio.Lock(), 0]
        turn[1] += 1
        try:
            async with turn[0]:
                yield
        finally:
            turn[1] -= 1
            if not turn[1]:
                del self._subscription_turns[key]

    async def _exchange(self, request: Request, d: planning.Forward, body: Any, identity: Identity,
                        tenant: str, headers: CIMultiDict[str], audit: dict[str, Any]) -> web.StreamResponse | Relayed:
        assert self.session is not None, "the gateway's client session is not open"  # noqa: S101 (narrowing)
        # Taken before Orion is asked: an erasure of the caller's data from here on finds no row
        # this request records later, and what it records is then taken back (_record_subscription).
        erasure_mark = self.services.ownership.erasure_mark(identity.sub) if d.after == "record_subscription" else 0
        if d.after in SUBSCRIPTION_WRITES and not self.services.ownership.allow_write(identity.sub):
            # Recording or forgetting it is a write to the store like the ownership API's, under its rate.
            audit["decision"], audit["reason"] = "deny", "write rate limited (ownership.write_rate_per_user)"
            rate = self.services.config.ownership.write_rate_per_user
            return orion_error(429, "TooManyRequests", f"too many subscription writes: at most {rate:g} per second "
                               "per user; try again later", {"Retry-After": self.services.ownership.write_retry_after})
        t0 = time.perf_counter()
        upstream: aiohttp.ClientResponse | UpstreamResponse
        try:
            if self.pool is not None:
                upstream = await self.pool.request(d.method, _quote_path(d.path) + (
                    "?" + _quote_query(d.query) if d.query else ""), list(headers.items()), body)
            else:
                wait = PoolWait()
                try:
                    upstream = await self.session.request(d.method, self._url(d.path, d.query), headers=headers,
                                                          data=body, allow_redirects=False, trace_request_ctx=wait)
                except aiohttp.ConnectionTimeoutError:
                    if wait.queued:   # timed out waiting for a free connection: not sent
                        raise UpstreamBusy("no connection to Orion came free in time") from None
                    raise
        except BodyTooLarge:
            return self._too_large(audit)
        except RequestTimeout as exc:   # the client's body, streamed to the lean client, stopped coming
            return self._timed_out(audit, exc)
        except UpstreamBusy:   # not sent: every connection to Orion is taken (clients reading large answers slowly)
            audit["reason"] = "no upstream connection free"
            return orion_error(503, "ServiceUnavailable", "the context broker is busy; try again later",
                               {"Retry-After": "1"})
        except (TimeoutError, aiohttp.ServerTimeoutError):
            audit["reason"], audit["outcome_unknown"] = "upstream timeout", True   # Orion may yet apply it
            return orion_error(504, "GatewayTimeout", "the context broker did not answer in time")
        except (aiohttp.ClientError, UpstreamError) as exc:
            if isinstance(exc.__cause__, RequestTimeout):   # the client's body, streamed, stopped coming
                return self._timed_out(audit, exc.__cause__)
            audit["reason"], audit["outcome_unknown"] = f"upstream unreachable: {type(exc).__name__}", True
            return orion_error(502, "BadGateway", "the context broker is unreachable")
        self.outcomes.upstream_answered(time.perf_counter() - t0)
        audit["upstream_status"] = upstream.status
        try:
            if d.after == "record_subscription" and upstream.status == 201:
                location = upstream.headers.get("Location", "") if isinstance(upstream, aiohttp.ClientResponse) \
                    else upstream.header("Location") or ""
                refusal = await self._record_subscription(location, d, identity, tenant, headers, audit,
                                                          erasure_mark)
                if refusal is not None:
                    return refusal
            elif d.after == "forget_subscription" and upstream.status in (200, 204):
                sub_id = d.path.rsplit("/", 1)[-1]
                await self.services.ownership.forget_subscription(sub_id, tenant)
                self.guard.forgotten(sub_id, tenant)
            elif d.after == "update_subscription" and upstream.status in (200, 204):
                refusal = await self._record_subject(d, identity, tenant, headers, audit)
                if refusal is not None:
                    return refusal
            if isinstance(upstream, UpstreamResponse):
                return await self._relay_lean(request, upstream)
            return await self._relay(request, upstream)
        finally:
            upstream.release()

    async def _record_subscription(self, location: str, d: planning.Forward, identity: Identity,
                                   tenant: str, headers: CIMultiDict[str], audit: dict[str, Any],
                                   erasure_mark: int) -> web.Response | None:
        """Tie the new subscription to its creator; if that fails, take it back out of Orion, so no
        subscription runs that nobody owns. Then check again that its subject's devices stand and the
        creator may still read them: a device deleted while Orion was making the subscription has had
        its clean-up without it, and the subscription would notify the id's next owner's data to the
        old one. Such a subscription is withdrawn at once. None: recorded; else the answer to send."""
        sub_id = location.rstrip("/").rsplit("/", 1)[-1]
        if not location.startswith("/v2/subscriptions/") or not ngsi.valid_subscription_id(sub_id):
            audit["reason"] = "subscription created without a usable Location"
            log.warning("Orion answered 201 to a subscription without a usable Location: %r", location)
            return None
        try:
            # What was checked is kept, so access can be re-checked later (subscription_guard).
            await self.services.ownership.record_subscription(sub_id, identity, tenant, entities=d.devices,
                                                              unrestricted=d.unrestricted)
        except Exception:
            log.exception("recording subscription %s failed; deleting it from Orion", sub_id)
            audit["decision"], audit["reason"] = "error", "subscription not recorded, withdrawn"
            await self._withdraw(sub_id, headers)
            return orion_error(503, "ServiceUnavailable", "the subscription could not be recorded")
        if self.services.ownership.erased_since(identity.sub, erasure_mark):
            # The creator's erasure ran while Orion was making it, and may have looked before the row was in.
            return await self._take_back(sub_id, tenant, headers, audit, "creator's data erased meanwhile",
                                         "your data was erased while the subscription was being made")
        gone = self._subject_gone(d, identity, tenant)
        if gone is not None:
            return await self._take_back(sub_id, tenant, headers, audit, f"subject {gone!r} deleted meanwhile",
                                         f"device {gone!r} was deleted while the subscription was being made")
        self.guard.recorded(sub_id, tenant)
        audit["subscription"] = sub_id
        return None

    async def _record_subject(self, d: planning.Forward, identity: Identity, tenant: str,
                              headers: CIMultiDict[str], audit: dict[str, Any]) -> web.Response | None:
        """Record a PATCHed subscription's new subject, then check it again as a new subscription is
        (:meth:`_record_subscription`): a device deleted while Orion was taking the PATCH has had its
        clean-up without this subscription, which would notify the id's next owner's data to the old one.
        Such a subscription is withdrawn and forgotten. None: recorded; else the answer to send."""
        sub_id = d.path.rsplit("/", 1)[-1]
        await self.services.ownership.set_subscription_subject(sub_id, tenant, entities=d.devices,
                                                               unrestricted=d.unrestricted)
        gone = self._subject_gone(d, identity, tenant)
        if gone is None:
            return None
        return await self._take_back(sub_id, tenant, headers, audit, f"subject {gone!r} deleted meanwhile",
                                     f"device {gone!r} was deleted while the subscription was being changed")

    async def _take_back(self, sub_id: str, tenant: str, headers: CIMultiDict[str], audit: dict[str, Any],
                         reason: str, why: str) -> web.Response:
        """Withdraw a subscription just made or changed from Orion and forget it (the guard too): a
        409 saying ``why``."""
        audit["decision"], audit["reason"] = "deny", f"{reason}, withdrawn"
        await self._withdraw(sub_id, headers)
        await self.services.ownership.forget_subscription(sub_id, tenant)
        self.guard.forgotten(sub_id, tenant)
        return orion_error(409, "Conflict", f"{why}; the subscription has been withdrawn")

    def context(self, identity: Identity, tenant: str) -> planning.Context:
        """What a request of ``identity`` in ``tenant`` is planned against (also the guard's re-checks)."""
        ownership = self.services.ownership
        return planning.Context(identity=identity, tenant=tenant, default_service=self.config.fiware_service.lower(),
                                is_admin=identity.has_role(self.admin_role), facts=ownership.facts,
                                policies=self.services.policies, ownership=ownership)

    def _subject_gone(self, d: planning.Forward, identity: Identity, tenant: str) -> str | None:
        """A subject id whose deletion has begun, or that the creator may no longer read (checked after
        the subscription is recorded, so a deletion committing later finds it and removes it)."""
        ctx = self.context(identity, tenant)
        for entity_id in d.devices:
            if self.services.ownership.writes.closed(entity_id) or not planning.may_read(ctx, entity_id).allowed:
                return entity_id
        return None

    async def _withdraw(self, sub_id: str, headers: CIMultiDict[str]) -> None:
        """Delete a just-made subscription from Orion (best effort: logged when Orion does not take it)."""
        headers = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in ("content-length",
                                                                                       "content-type"))
        try:
            # No redirect followed, as on every call to Orion: it would carry the identity headers elsewhere.
            async with self.session.delete(self._url(f"/v2/subscriptions/{sub_id}", ()),  # type: ignore[union-attr]
                                           headers=headers, allow_redirects=False) as answer:
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.error("could not withdraw subscription %s from Orion: %s", sub_id, type(exc).__name__)
            return
        if status not in (200, 204, 404):   # 404: Orion no longer has it
            log.error("could not withdraw subscription %s from Orion: it answered %d", sub_id, status)

    async def _relay(self, request: Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse | Relayed:
        pairs, length = upstream.headers.items(), upstream.content_length
        if isinstance(request, LeanRequest):
            headers = self._relayed_headers(request, _relayable(pairs), length)
            return await request.relay(upstream.status, upstream.reason or "", headers, length, None,
                                       upstream.content.iter_chunked(_CHUNK))
        response = await self._prepared(request, upstream.status, upstream.reason, pairs, length)
        try:
            if request.method != "HEAD":
                async for chunk in upstream.content.iter_chunked(_CHUNK):
                    await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _broken_off(request) from exc
        await response.write_eof()
        return response

    async def _relay_lean(self, request: Request, upstream: UpstreamResponse) -> web.StreamResponse | Relayed:
        """As :meth:`_relay`, for the lean client's answer: a body already in whole (Orion's usual
        small answer) goes out with the head in one write."""
        length = upstream.header("Content-Length")
        size = int(length) if length is not None and length.isdigit() else None   # llhttp checked it: one decimal
        if request.method != "HEAD" and not upstream.complete:
            # The body's first bytes may come after its head: what fits below the read-ahead is waited
            # for, so that it goes out whole, Orion's connection given back first (below).
            await upstream.read_ahead()
        if isinstance(request, LeanRequest):
            kept = _relayable(upstream.headers)
            # Orion's usual answer in one pass; another shape, or CORS headers to add, through the headers object.
            head = None if self._cors_applies(request) else plain_head(
                request.method, upstream.status, upstream.reason, kept, size, request.keep_alive)
            chunked = False
            if head is None:
                head, chunked = head_bytes(request.method, upstream.status, upstream.reason,
                                           self._relayed_headers(request, kept, size), size, request.keep_alive)
            if request.method == "HEAD" or upstream.complete:
                whole = b"" if request.method == "HEAD" else await upstream.read()
                # Orion's connection goes back before the client is written to: a client that reads
                # slowly holds its own connection, not one of the pool's.
                upstream.release()
                return await request.relay_head(upstream.status, head, chunked, size, whole, None)
            return await request.relay_head(upstream.status, head, chunked, size, None, upstream.chunks())
        response = await self._prepared(request, upstream.status, upstream.reason, upstream.headers, size)
        if request.method == "HEAD" or upstream.complete:
            whole = b"" if request.method == "HEAD" else await upstream.read()
            upstream.release()   # (as above)
            await response.write_eof(whole)
        else:
            try:
                async for chunk in upstream.chunks():
                    await response.write(chunk)
            except (UpstreamError, TimeoutError) as exc:
                raise _broken_off(request) from exc
            await response.write_eof()
        return response

    def _relayed_headers(self, request: LeanRequest, kept: list[tuple[str, str]],
                         length: int | None) -> CIMultiDict[str]:
        """Orion's answer headers (``kept``: :func:`_relayable`'s) as the lean server writes them (in the
        order aiohttp's would be)."""
        headers: CIMultiDict[str] = CIMultiDict(kept)
        if length is not None:
            headers["Content-Length"] = str(length)
        self._cors_headers(request, headers)
        return headers

    async def _prepared(self, request: web.Request, status: int, reason: str | None,
                        pairs: Iterable[tuple[str, str]], length: int | None) -> web.StreamResponse:
        """An aiohttp answer relaying Orion's, its head sent."""
        response = web.StreamResponse(status=status, reason=reason, headers=CIMultiDict(_relayable(pairs)))
        if length is not None:
            response.content_length = length
        self._cors(request, response)
        await response.prepare(request)
        return response

    async def _own_subscriptions(self, request: Request, d: planning.Forward, headers: CIMultiDict[str],
                                 tenant: str, audit: dict[str, Any]) -> web.StreamResponse:
        """The caller's subscriptions only, fetched one by one (``GET /v2/subscriptions/{id}``) from the ids
        the store records for them: the upstream cost is bounded by what the caller owns, never by the
        size of the tenant's list. Paged here, in creation order as Orion lists them; with
        ``options=count`` every own subscription is fetched, so ``Fiware-Total-Count`` is exact.
        One the store records but Orion no longer has (404) is left out."""
        limit, offset, count = d.page
        # Orion's ids are MongoDB ObjectIds, which begin with their creation time: sorted is creation order.
        ids = sorted(d.keep)
        wanted = len(ids) if count else offset + limit
        found: list[Any] = []
        fetched = 0
        try:
            while fetched < len(ids) and len(found) < wanted:
                batch = ids[fetched:fetched + min(wanted - len(found), _SUBSCRIPTION_FETCH_CONCURRENCY)]
                fetched += len(batch)
                for item in await asyncio.gather(*(self._one_subscription(sub_id, headers) for sub_id in batch)):
                    if item is not None:
                        found.append(item)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            audit["reason"] = "upstream timeout"
            return orion_error(504, "GatewayTimeout", "the context broker did not answer in time")
        except aiohttp.ClientError as exc:
            audit["reason"] = f"upstream unreachable: {type(exc).__name__}"
            return orion_error(502, "BadGateway", "the context broker is unreachable")
        except _UpstreamRefused as exc:
            audit["upstream_status"] = exc.status
            audit["reason"] = f"upstream answered {exc.status} to a subscription read"
            return orion_error(502, "BadGateway", "the context broker refused to list subscriptions")
        audit["upstream_status"] = 200
        headers_out = {"Fiware-Total-Count": str(len(found))} if count else None
        return self._cors(request, web.json_response(found[offset:offset + limit], headers=headers_out))

    async def _one_subscription(self, sub_id: str, headers: CIMultiDict[str]) -> Any:
        """Orion's subscription ``sub_id``, or None when it has none by that id."""
        assert self.session is not None  # noqa: S101 (narrowing: open from on_startup to on_cleanup)
        async with self.session.get(self._url(f"/v2/subscriptions/{sub_id}", ()), headers=headers,
                                    allow_redirects=False) as upstream:
            if upstream.status == 404:
                return None
            if upstream.status != 200:
                raise _UpstreamRefused(upstream.status)
            try:
                item = json.loads(await upstream.read())
            except ValueError:
                raise _UpstreamRefused(upstream.status) from None
        if not isinstance(item, dict) or item.get("id") != sub_id:
            raise _UpstreamRefused(upstream.status)
        return item

    # ------------------------------------------------------------------ CORS

    def _cors(self, request: Request, response: web.StreamResponse) -> web.StreamResponse:
        self._cors_headers(request, response.headers)
        return response

    def _cors_applies(self, request: Request) -> bool:
        origin = request.headers.get("Origin")
        return bool(origin) and (origin in self.cors or "*" in self.cors)

    def _cors_headers(self, request: Request, headers: CIMultiDict[str]) -> None:
        if self._cors_applies(request):
            origin = request.headers["Origin"]
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = _CORS_EXPOSE
            headers["Vary"] = "Origin"

    def _preflight(self, request: Request, audit: dict[str, Any]) -> web.Response:
        origin = request.headers.get("Origin", "")
        audit["identity"] = ANONYMOUS
        if origin not in self.cors and "*" not in self.cors:
            return self._deny(audit, 403, "Forbidden", "origin not allowed", "CORS origin not allowed")
        audit["decision"], audit["reason"] = "allow", "CORS preflight"
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, Fiware-Service, Fiware-ServicePath, "
                                            "Fiware-Correlator",
            "Access-Control-Expose-Headers": _CORS_EXPOSE,
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        })


GATEWAY_KEY = web.AppKey("keygate_http_gateway", GatewayHandler)


def create_gateway_app(services: Services, api_app: web.Application | None = None, *,
                       resolver: Resolver = default_resolver, client: str = "lean",
                       portal_app: web.Application | None = None) -> web.Application:
    """The NGSI gateway; ``api_app`` (the ownership API) is mounted at ``http.api_prefix`` and
    ``portal_app`` at ``portal.path``, both before the catch-all, so neither path reaches Orion."""
    http = http_section(services)
    # client_max_size: aiohttp's own cap for request.read(); our reader enforces ours.
    app = web.Application(client_max_size=http.max_body_bytes + 1)
    handler = GatewayHandler(services, resolver=resolver, client=client)
    app[GATEWAY_KEY] = handler
    app.on_startup.append(handler.open)
    app.on_startup.append(handler.guard.start)
    app.on_shutdown.append(handler.guard.stop)
    app.on_cleanup.append(handler.close)
    if api_app is not None:
        app.add_subapp(http.api_prefix.rstrip("/"), api_app)
    if portal_app is not None:
        app.add_subapp(services.config.portal.path.rstrip("/"), portal_app)
    app.router.add_route("*", "/{tail:.*}", handler.handle_aiohttp)
    return app


class HttpGateway:
    """The listener: ``await start()``, ``.port``, ``await stop()``."""

    def __init__(self, services: Services, api_app: web.Application | None = None, *,
                 resolver: Resolver = default_resolver, client: str = "lean",
                 portal_app: web.Application | None = None, server: str = "lean"):
        # server "lean": connections start on proxy.http.lean_server, which serves plain NGSI requests
        # and hands the rest to aiohttp's server; "aiohttp": aiohttp's alone (the differential test).
        if server not in ("lean", "aiohttp"):
            raise ValueError(f"unknown HTTP server {server!r}")
        self.services = services
        self.server = server
        self.app = create_gateway_app(services, api_app, resolver=resolver, client=client, portal_app=portal_app)
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self.site: DeadlineSite | None = None
        self.lean_connections = LeanConnections()   # open on the lean server, and its tallies

    async def start(self) -> None:
        config = self.services.config
        http = http_section(self.services)
        host, port = parse_hostport(http.listen)
        ssl_context = None
        if http.tls:
            from proxy.tls import server_context

            ssl_context = server_context(config.tls, config.base_dir)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        # Slow clients: a head within header_timeout_seconds (TLS handshake included), a body within
        # body_timeout_seconds (see proxy.http.listener).
        site = DeadlineSite(self._runner, host, port, ssl_context=ssl_context, backlog=1024,
                            header_timeout=http.header_timeout_seconds,
                            body_timeout=http.body_timeout_seconds,
                            write_timeout=http.write_timeout_seconds,
                            max_pipelined=http.max_pipelined_requests,
                            max_connections=http.max_connections, reuse_port=reuse_port() or None,
                            lean=self._lean_factory(http) if self.server == "lean" else None)
        await site.start()
        self.site = site
        self.port = self._runner.addresses[0][1]

    def connections(self) -> list[Any]:
        """The open client connections, on either server (each has ``transport``, ``queued``,
        ``peak_queued`` and ``request_count``)."""
        handlers: list[Any] = []
        if self._runner is not None and self._runner.server is not None:
            handlers.extend(self._runner.server.connections)
        return handlers + list(self.lean_connections)

    def _lean_factory(self, http: HttpConfig) -> Callable[..., asyncio.Protocol]:
        gateway = self.app[GATEWAY_KEY]
        prefixes = lean_prefixes(http.api_prefix, self.services.config.portal.path)

        def lean(slot: ConnectionSlot | None, admit: Callable[[], ConnectionSlot | None] | None,
                 fallback: Callable[[ConnectionSlot | None, float | None], DeadlineRequestHandler]) -> asyncio.Protocol:
            return LeanConnection(gateway, prefixes=prefixes, header_timeout=http.header_timeout_seconds,
                                  body_timeout=http.body_timeout_seconds, write_timeout=http.write_timeout_seconds,
                                  max_pipelined=http.max_pipelined_requests, max_body=http.max_body_bytes,
                                  fallback=fallback, slot=slot, admit=admit, registry=self.lean_connections)
        return lean

    async def stop(self) -> None:
        if self.site is not None and self.site._server is not None:
            self.site._server.close()   # no new connection while those open finish their answers
        tasks = [task for task in (c.shut() for c in list(self.lean_connections)) if task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_SHUTDOWN_SECONDS)
            for task in pending:
                task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
