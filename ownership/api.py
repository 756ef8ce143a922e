"""The ownership REST API (aiohttp), mounted by the gateway under ``/api/v1``.

Every route but ``/openapi.json`` needs a user's (or service account's)
bearer token. A device the caller may not manage answers 404, exactly as a
device that does not exist, so ids do not leak. Every refusal is
``{"error": {"code", "message"}}`` with its status; an unexpected exception
becomes a 500 with the same shape and no traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from ownership.openapi import build_openapi
from ownership.service import OwnershipError
from ownership.validation import (
    KEY_SLOTS,
    PERMISSIONS,
    SERVICE_RE,
    is_device_id,
    json_problem,
    location_problem,
    orion_id_problem,
    text_problem,
)
from proxy.identity.model import AuthError, AuthReason, Identity
from proxy.jsonlimits import too_deep
from proxy.services import Services

log = logging.getLogger("keygate.ownership.api")

SERVICES = web.AppKey("services", Services)
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OPENAPI = web.AppKey("openapi", dict)
IDENTITY = web.RequestKey("identity", Identity)
MAX_BODY_BYTES = 16 * 1024
JSON_TYPES = ("application/json", "application/merge-patch+json")
CSR_TYPES = ("application/pkcs10", "application/x-pem-file")
# Route params: anything but "/", so ids with braces (allowed by Orion) reach the handler.
_ID = "{id:[^/]+}"

_PATH_SAFE = ":@!$*+,~-._"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout", 413: "body_too_large",
               415: "unsupported_media_type"}


# --------------------------------------------------------------------------- middlewares


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except OwnershipError as exc:
        return error_response(exc.status, exc.code, str(exc), getattr(exc, "headers", None))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "error"), exc.reason, headers)
    except Exception:
        log.exception("ownership API: unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.match_info.route.name == "openapi" or request.match_info.http_exception is not None:
        return await handler(request)
    identity = await _authenticate(request)
    if request.method in WRITE_METHODS and not request.app[SERVICES].ownership.allow_write(identity.sub):
        # Every write is a change each gateway process applies (docs/scale-out.md): one user writing
        # in a loop would keep them all reloading.
        services = request.app[SERVICES]
        services.audit.record(protocol="ownership", action="write", decision="deny", resource=request.path,
                              identity=identity, reason="rate_limited")
        rate = services.config.ownership.write_rate_per_user
        raise ApiError(429, "rate_limited", f"too many writes: at most {rate:g} per second per user "
                       f"(bursts of {services.config.ownership.write_burst_per_user}); try again later",
                       {"Retry-After": services.ownership.write_retry_after})
    # Every caller's current user name: what {"to": NAME} resolves through.
    await request.app[SERVICES].ownership.remember_user(identity)
    request[IDENTITY] = identity
    return await handler(request)


async def _authenticate(request: web.Request) -> Identity:
    services = request.app[SERVICES]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "a bearer token is required",
                       {"WWW-Authenticate": 'Bearer realm="keygate"'})
    try:
        identity = await services.tokens.validate(token)
    except AuthError as exc:
        services.audit.record(protocol="ownership", action="authenticate", decision="deny",
                              resource=request.path, reason=exc.reason.value)
        if exc.reason is AuthReason.ISSUER_UNREACHABLE:
            raise ApiError(503, "issuer_unreachable", "the token issuer cannot be reached; try again",
                           {"Retry-After": "5"}) from None
        raise ApiError(401, "invalid_token", "the token is not valid",
                       {"WWW-Authenticate": 'Bearer realm="keygate", error="invalid_token"'}) from None
    if identity.kind not in ("user", "service"):
        raise ApiError(403, "forbidden", "only users and service accounts may use this API")
    return identity


# --------------------------------------------------------------------------- helpers


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _caller(request: web.Request) -> Identity:
    return request[IDENTITY]


def _is_admin(request: web.Request) -> bool:
    return _caller(request).has_role(_services(request).config.ownership.admin_role)


def _managed_device(request: web.Request) -> dict[str, Any]:
    """The device in the path if the caller owns it or is an admin; 404 otherwise."""
    device_id = request.match_info["id"]
    device = _services(request).ownership.get_device(device_id) if is_device_id(device_id, new=False) else None
    if device is None or (device["owner_sub"] != _caller(request).sub and not _is_admin(request)):
        raise ApiError(404, "not_found", "no such device")
    return device


async def _json_body(request: web.Request, *, allowed: set[str], required: frozenset[str] | set[str] = frozenset()
                     ) -> dict[str, Any]:
    if request.content_type not in JSON_TYPES:
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, "body_too_large", f"the body may be at most {MAX_BODY_BYTES} bytes")
    raw = await _read_bounded(request, MAX_BODY_BYTES)
    http = _services(request).config.http
    max_depth = http.max_json_depth if http is not None else 32
    if too_deep(raw, max_depth):   # before json.loads, which recurses once per level
        raise ApiError(400, "invalid_json", f"the body is nested deeper than {max_depth} levels")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    # The store must never hold what the API cannot send back: "\ud800" parses to a lone
    # surrogate, 1e400 to inf; neither has a JSON (UTF-8) form.
    http = _services(request).config.http
    problem = json_problem(body, max_depth=http.max_json_depth if http is not None else 32)
    if problem:
        raise ApiError(400, "invalid_json", problem)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field {unknown[0]!r}")
    missing = sorted(required - set(body))
    if missing:
        raise ApiError(400, "missing_field", f"{missing[0]} is required")
    return body


async def _read_bounded(request: web.Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes ``limit``, whatever Content-Length said."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(limit + 1 - size)  # may return less: loop until EOF
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the body may be at most {limit} bytes")
        chunks.append(chunk)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _invalid(problem: str | None) -> None:
    if problem:
        raise ApiError(400, "invalid_field", problem)


def _check_device_fields(body: dict[str, Any]) -> None:
    if "id" in body:
        _invalid(orion_id_problem(body["id"]))
    if "type" in body:
        _invalid(orion_id_problem(body["type"], "type"))
    for name in ("name", "model"):
        if name in body:
            _invalid(text_problem(body[name], name))
    if "location" in body:
        _invalid(location_problem(body["location"]))
    if "public" in body and not isinstance(body["public"], bool):
        _invalid("public must be true or false")
    if "service" in body and not (isinstance(body["service"], str) and SERVICE_RE.fullmatch(body["service"])):
        _invalid("service must be up to 50 letters, digits or underscores")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def _parse_time(value: Any, what: str) -> float:
    if not isinstance(value, str) or len(value) > 64:
        _invalid(f"{what} must be an RFC 3339 date-time string")
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        _invalid(f"{what} must be an RFC 3339 date-time string")
        raise
    if when.tzinfo is None:
        _invalid(f"{what} must carry a time zone (e.g. Z)")
    try:
        ts = when.timestamp()
        _iso(ts)  # what is stored must be what the API can give back (e.g. 9999-12-31T23:59-12:00 is year 10000)
    except (OverflowError, ValueError, OSError):
        _invalid(f"{what} is out of range")
        raise
    return ts


def device_out(device: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": device["id"], "type": device["type"], "name": device["name"], "model": device["model"],
        "location": device["location"], "public": device["public"], "service": device["service"],
        "owner": {"sub": device["owner_sub"], "username": device["owner_username"]},
        "created_at": _iso(device["created_at"]), "updated_at": _iso(device["updated_at"]),
    }


def principal_out(d: dict[str, Any], display_name: str) -> dict[str, Any]:
    """A delegation's principal, in the object form the API takes (a user also by name, for display;
    ``user`` null for a user name a migrated store could not tie to a sub: it matches nobody)."""
    kind = d["grantee_kind"]
    if kind == "public":
        return {"public": True}
    if kind == "user":
        return {"user": d["grantee_id"] or None, "username": display_name or None}
    return {kind: d["grantee_id"]}


def delegation_out(d: dict[str, Any], now: float, display_name: str = "") -> dict[str, Any]:
    return {
        "id": d["id"], "device": d["device_id"], "to": principal_out(d, display_name or d["grantee_name"]),
        "permission": d["permission"],
        "expires_at": _iso(d["expires_at"]), "active": d["expires_at"] is None or now < d["expires_at"],
        "granted_by": d["granted_by_username"], "created_at": _iso(d["created_at"]),
    }


def _now(request: web.Request) -> float:
    return _services(request).ownership.now()


# --------------------------------------------------------------------------- handlers

_DEVICE_FIELDS = {"id", "type", "name", "model", "location", "public", "service"}
# Admin only: register for someone else, and adopt an entity that already exists in Orion.
_ADMIN_FIELDS = {"adopt", "owner", "owner_username"}
_PATCH_FIELDS = {"type", "name", "model", "location", "public"}


def _registration_tenant(request: web.Request, requested: str | None) -> str:
    """The tenant asked for (or the configured one), if the caller's roles allow it; 403 otherwise."""
    ownership = _services(request).ownership
    if requested is None or requested == "":
        return ownership.default_tenant()
    tenant = requested.lower()   # Orion's tenants are lower-case
    if tenant not in ownership.tenants_for(_caller(request)):
        raise ApiError(403, "tenant_not_allowed", f"you may not register devices in tenant {requested!r}")
    return tenant


def _registration_owner(request: web.Request, body: dict[str, Any]) -> Identity:
    """The caller, or (admins only) the user named by ``owner`` / ``owner_username``."""
    caller = _caller(request)
    if "owner" not in body:
        if "owner_username" in body:
            _invalid("owner_username needs owner")
        return caller
    sub, name = body["owner"], body.get("owner_username")
    _invalid(text_problem(sub, "owner", nullable=False) or (None if sub else "owner must not be empty"))
    if name is not None:
        _invalid(text_problem(name, "owner_username", nullable=False) or
                 (None if name else "owner_username must not be empty"))
    if sub == caller.sub:
        return caller
    if name is None:  # the name the owner's other devices carry, else the sub itself
        owned = _services(request).ownership.devices_of(sub)
        name = owned[0]["owner_username"] if owned else sub
    return Identity(kind="user", sub=sub, username=name, method="token")


async def register_device(request: web.Request) -> web.Response:
    body = await _json_body(request, allowed=_DEVICE_FIELDS | _ADMIN_FIELDS, required={"id", "type"})
    _check_device_fields(body)
    if "adopt" in body and not isinstance(body["adopt"], bool):
        _invalid("adopt must be true or false")
    if _ADMIN_FIELDS & set(body) and not _is_admin(request):
        raise ApiError(403, "forbidden", "adopt, owner and owner_username need the admin role")
    owner = _registration_owner(request, body)
    fields = {k: v for k, v in body.items() if k not in _ADMIN_FIELDS}
    fields["service"] = _registration_tenant(request, body.get("service"))
    services = _services(request)
    device, k1, k2 = await services.ownership.register_device(owner, fields, adopt=body.get("adopt", False),
                                                              actor=_caller(request))
    own = services.config.ownership
    out = {**device_out(device), "k1": k1, "k2": k2, "mqtt": own.advertise_mqtt, "http": own.advertise_http}
    location = f"{request.raw_path.partition('?')[0]}/{quote(device['id'], safe=_PATH_SAFE)}"
    # Keys are shown once: nothing between here and the client may keep them.
    return web.json_response(out, status=201, headers={"Location": location, "Cache-Control": "no-store"})


async def list_devices(request: web.Request) -> web.Response:
    include = request.query.get("include", "")
    unknown = set(request.query) - {"include"}
    if unknown:
        raise ApiError(400, "unknown_parameter", f"unknown query parameter {sorted(unknown)[0]!r}")
    if include not in ("", "delegated", "all"):
        raise ApiError(400, "invalid_parameter", "include must be delegated or all")
    caller = _caller(request)
    ownership = _services(request).ownership
    if include == "all":
        if not _is_admin(request):
            raise ApiError(403, "forbidden", "include=all needs the admin role")
        devices = [{**device_out(d), "relation": "owner" if d["owner_sub"] == caller.sub else "admin"}
                   for d in ownership.all_devices()]
        return web.json_response({"devices": devices})
    devices = [{**device_out(d), "relation": "owner"} for d in ownership.devices_of(caller.sub)]
    if include == "delegated":
        for record, grants in ownership.delegated_to(caller):
            perms = sorted({g["permission"] for g in grants})
            devices.append({**device_out(record), "relation": "delegate", "permissions": perms})
    return web.json_response({"devices": devices})


async def get_device(request: web.Request) -> web.Response:
    return web.json_response(device_out(_managed_device(request)))


async def patch_device(request: web.Request) -> web.Response:
    device = _managed_device(request)
    body = await _json_body(request, allowed=_PATCH_FIELDS)
    _check_device_fields(body)
    updated = await _services(request).ownership.update_device(_caller(request), device["id"], body)
    return web.json_response(device_out(updated))


async def delete_device(request: web.Request) -> web.Response:
    device = _managed_device(request)
    await _services(request).ownership.delete_device(_caller(request), device["id"])
    return web.Response(status=204)


async def rotate_key(request: web.Request) -> web.Response:
    device = _managed_device(request)
    slot = request.match_info["slot"]
    if slot not in KEY_SLOTS:
        raise ApiError(404, "not_found", "no such key; the keys are k1 and k2")
    key = await _services(request).ownership.rotate_key(_caller(request), device["id"], slot)
    return web.json_response({"device": device["id"], "slot": slot, "key": key},
                             headers={"Cache-Control": "no-store"})


async def create_delegation(request: web.Request) -> web.Response:
    device = _managed_device(request)
    body = await _json_body(request, allowed={"to", "permission", "expires_at"}, required={"to", "permission"})
    ownership = _services(request).ownership
    if body["permission"] not in PERMISSIONS:
        _invalid("permission must be read, write or readwrite")
    grantee = ownership.resolve_grantee(body["to"])
    if grantee.kind == "user" and grantee.id == device["owner_sub"]:
        _invalid("the owner already has every permission")
    expires_at = None
    if body.get("expires_at") is not None:
        expires_at = _parse_time(body["expires_at"], "expires_at")
        if expires_at <= _now(request):
            _invalid("expires_at is in the past")
    row = await ownership.create_delegation(_caller(request), device["id"], grantee, body["permission"], expires_at)
    location = f"{request.raw_path.partition('?')[0]}/{row['id']}"
    return web.json_response(delegation_out(row, _now(request), ownership.display_name(row)), status=201,
                             headers={"Location": location})


async def list_delegations(request: web.Request) -> web.Response:
    device = _managed_device(request)
    now = _now(request)
    ownership = _services(request).ownership
    rows = ownership.delegations_of(device["id"])
    return web.json_response({"delegations": [delegation_out(d, now, ownership.display_name(d)) for d in rows]})


async def revoke_delegation(request: web.Request) -> web.Response:
    device = _managed_device(request)
    await _services(request).ownership.revoke_delegation(
        _caller(request), device["id"], request.match_info["delegation"])
    return web.Response(status=204)


def certificate_out(c: dict[str, Any]) -> dict[str, Any]:
    return {"serial": c["serial"], "fingerprint": f"sha256:{c['fingerprint']}", "not_after": _iso(c["not_after"]),
            "created_at": _iso(c["created_at"])}


async def _csr_body(request: web.Request) -> bytes:
    """The CSR: the body itself (application/pkcs10, PEM or DER) or ``{"csr": PEM}``."""
    if request.content_type in CSR_TYPES:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise ApiError(413, "body_too_large", f"the body may be at most {MAX_BODY_BYTES} bytes")
        return await _read_bounded(request, MAX_BODY_BYTES)
    if request.content_type not in JSON_TYPES:
        raise ApiError(415, "unsupported_media_type", "the body must be application/pkcs10 or application/json")
    body = await _json_body(request, allowed={"csr"}, required={"csr"})
    csr = body["csr"]
    if not isinstance(csr, str):
        raise ApiError(400, "invalid_field", "csr must be a PEM string")
    try:
        return csr.encode("ascii")
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_csr", "csr must be a PEM certificate signing request") from None


async def enroll_certificate(request: web.Request) -> web.Response:
    device = _managed_device(request)
    csr = await _csr_body(request)
    issued = await _services(request).ownership.enroll_certificate(_caller(request), device["id"], csr)
    out = {"certificate": issued["certificate"], "chain": issued["chain"], "serial": issued["serial"],
           "fingerprint": f"sha256:{issued['fingerprint']}", "not_after": _iso(issued["not_after"])}
    location = f"{request.raw_path.partition('?')[0]}/{issued['serial']}"
    return web.json_response(out, status=201, headers={"Location": location})


async def list_certificates(request: web.Request) -> web.Response:
    device = _managed_device(request)
    rows = _services(request).ownership.certificates_of(device["id"])
    return web.json_response({"certificates": [certificate_out(c) for c in rows]})


async def revoke_certificates(request: web.Request) -> web.Response:
    device = _managed_device(request)
    await _services(request).ownership.revoke_certificates(_caller(request), device["id"],
                                                           request.match_info.get("serial"))
    return web.Response(status=204)


async def export_me(request: web.Request) -> web.Response:
    caller = _caller(request)
    ownership = _services(request).ownership
    data = await ownership.export_user_data(caller)
    now = _now(request)
    for d in data["devices"]:
        d["delegations"] = [delegation_out(x, now, ownership.display_name(x)) for x in d["delegations"]]
        d["keys"] = [{"slot": k["slot"], "created_at": _iso(k["created_at"])} for k in d["keys"]]
        d["certificates"] = [certificate_out(c) for c in d["certificates"]]
        for name in ("created_at", "updated_at"):
            d[name] = _iso(d[name])
    for name in ("delegations_granted", "delegations_received"):
        data[name] = [delegation_out(x, now, ownership.display_name(x)) for x in data[name]]
    if data.get("known_user") is not None:
        data["known_user"]["seen_at"] = _iso(data["known_user"]["seen_at"])
    for s in data["subscriptions"]:
        s["created_at"] = _iso(s["created_at"])
    data["exported_at"] = _iso(now)
    body = json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8")
    safe = "".join(ch for ch in caller.username if ch.isalnum() or ch in "-_.")[:64] or "user"
    return web.Response(body=body, content_type="application/json", headers={
        "Content-Disposition": f'attachment; filename="keygate-data-{safe}.json"',
        "Cache-Control": "no-store"})


async def erase_me(request: web.Request) -> web.Response:
    counts = await _services(request).ownership.erase_user_data(_caller(request))
    return web.json_response({"erased": counts})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


# --------------------------------------------------------------------------- the app


def create_api_app(services: Services) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, auth_middleware], client_max_size=MAX_BODY_BYTES)
    app[SERVICES] = services
    app[OPENAPI] = build_openapi(services.config)
    r = app.router
    r.add_get("/openapi.json", openapi, name="openapi")
    r.add_post("/devices", register_device)
    r.add_get("/devices", list_devices, allow_head=False)
    r.add_get(f"/devices/{_ID}", get_device, name="device", allow_head=False)
    r.add_patch(f"/devices/{_ID}", patch_device)
    r.add_delete(f"/devices/{_ID}", delete_device)
    r.add_post(f"/devices/{_ID}/keys/{{slot}}", rotate_key)
    r.add_post(f"/devices/{_ID}/delegations", create_delegation)
    r.add_get(f"/devices/{_ID}/delegations", list_delegations, allow_head=False)
    r.add_delete(f"/devices/{_ID}/delegations/{{delegation}}", revoke_delegation, name="delegation")
    r.add_post(f"/devices/{_ID}/certificate", enroll_certificate)
    r.add_get(f"/devices/{_ID}/certificate", list_certificates, allow_head=False)
    r.add_delete(f"/devices/{_ID}/certificate", revoke_certificates)
    r.add_delete(f"/devices/{_ID}/certificate/{{serial}}", revoke_certificates)
    r.add_get("/me/data", export_me, allow_head=False)
    r.add_delete("/me/data", erase_me)
    return app
