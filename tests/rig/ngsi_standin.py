"""A small NGSI-v2 stand-in for FIWARE Orion.

Orion cannot be installed on the test machines, so this aiohttp app answers
the endpoints the gateway guards the way Orion does: status codes, error
shapes (``{"error": "NotFound", "description": ...}``), ``Location`` on 201,
``Fiware-Total-Count`` with ``options=count``, ``id`` / ``idPattern`` /
``type`` / ``limit`` / ``offset`` / ``attrs`` / ``keyValues`` / ``upsert``,
batch ``op/update`` and ``op/query``, subscriptions and registrations, one
tenant per lower-cased ``Fiware-Service`` header, and ``Fiware-ServicePath`` as
Orion documents it: an entity lives in one service path (``/`` when written
without the header); a query without the header looks at ``/#`` (every path), an
update or deletion without it at ``/`` only; queries take up to ten
comma-separated paths, ``/x/#`` for ``/x`` and below, updates exactly one plain
path; the ``servicePath`` builtin attribute (asked for in ``attrs``) tells the
path an entity lives in; several entities matching one id (types or paths) make
a by-id request 409 ``TooManyResults``.

It records every request it receives (``app[RECORDED]``), so tests can assert
what reached the upstream and, as important, what did not.

Like Orion, it notifies: after a write to an entity, every subscription whose
subject names that entity gets its ``http`` (a POST of the notification) or
``httpCustom`` (``method``, ``headers``, ``payload`` or ``json``) request sent,
for real, to its URL; what was sent is kept in ``app[NOTIFIED]``. That is
what makes a notification aimed at Orion itself an attack a test can show.

Run on its own for benchmarks: ``python -m tests.rig.ngsi_standin --port 1026``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["create_standin_app", "RECORDED", "TENANTS", "NOTIFIED", "Recorded", "NgsiStandin"]


@dataclass
class Recorded:
    method: str
    path: str          # raw path, percent-encoding kept
    query: str         # raw query string
    headers: dict[str, str]
    body: bytes


@dataclass
class Tenant:
    entities: dict[str, dict[str, Any]] = field(default_factory=dict)   # id -> {"id", "type", attrs...} under "/"
    paths: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)   # service path -> entities
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    registrations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.paths.setdefault("/", self.entities)

    def under(self, path: str) -> dict[str, dict[str, Any]]:
        """The entities living in exactly this service path."""
        return self.paths.setdefault(path, {})


@dataclass
class Hold:
    """A request the stand-in keeps waiting (a slow Orion): ``arrived`` is set when one comes, and it is
    handled once ``release`` is set."""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


RECORDED = web.AppKey("recorded", list)
HOLDS = web.AppKey("holds", dict)            # (method, path) -> Hold
ANSWERS = web.AppKey("answers", list)         # (method, path prefix, request -> response): an Orion's odd answer
NOTIFIED = web.AppKey("notified", list)       # (subscription id, method, url, status or error)
_ENTITY_WRITE = re.compile(r"^/v2/entities/([^/]+)(/attrs(/[^/]+(/value)?)?)?$")
TENANTS = web.AppKey("tenants", dict)

_DEFAULT_LIMIT = 20
_MAX_LIMIT = 1000


class OrionError(Exception):
    def __init__(self, status: int, error: str, description: str):
        super().__init__(description)
        self.status, self.error, self.description = status, error, description


def _not_found(what: str = "entity") -> OrionError:
    if what == "entity":
        return OrionError(404, "NotFound", "The requested entity has not been found. Check type and id")
    if what == "attribute":
        return OrionError(404, "NotFound", "The entity does not have such an attribute")
    return OrionError(404, "NotFound", f"The requested {what} has not been found. Check id")


def _bad(description: str) -> OrionError:
    return OrionError(400, "BadRequest", description)


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json", headers=headers)


# --------------------------------------------------------------------------- entity representation


def _default_type(value: Any) -> str:
    # Orion's defaults for an attribute sent without "type".
    if isinstance(value, bool):
        return "Boolean"
    if isinstance(value, (int, float)):
        return "Number"
    if isinstance(value, (dict, list)):
        return "StructuredValue"
    return "None" if value is None else "Text"


def _norm_attr(value: Any, key_values: bool) -> dict[str, Any]:
    if key_values or not isinstance(value, dict):
        return {"type": _default_type(value), "value": value, "metadata": {}}
    if "value" not in value and "type" not in value:
        raise _bad("attribute must be a JSON object with value and/or type")
    return {"type": value.get("type") or _default_type(value.get("value")), "value": value.get("value"),
            "metadata": value.get("metadata", {})}


def _attrs_of(body: Any, key_values: bool) -> dict[str, dict[str, Any]]:
    if not isinstance(body, dict):
        raise _bad("Parse Error")
    return {k: _norm_attr(v, key_values) for k, v in body.items() if k not in ("id", "type")}


def _render(entity: dict[str, Any], options: set[str], attrs: list[str] | None, with_id: bool = True,
            path: str = "/") -> Any:
    names = [k for k in entity if k not in ("id", "type")]
    if attrs:
        names = [n for n in names if n in attrs]
    if "values" in options:
        return [entity[n]["value"] for n in names]
    out: dict[str, Any] = {"id": entity["id"], "type": entity["type"]} if with_id else {}
    for n in names:
        out[n] = entity[n]["value"] if "keyValues" in options else entity[n]
    if attrs and "servicePath" in attrs and "servicePath" not in entity:   # the builtin, only when asked for
        out["servicePath"] = path if "keyValues" in options else {"type": "Text", "value": path, "metadata": {}}
    return out


# --------------------------------------------------------------------------- request helpers


def _tenant(request: web.Request) -> Tenant:
    name = request.headers.get("Fiware-Service", "").lower()
    return request.app[TENANTS].setdefault(name, Tenant())


def _scopes(request: web.Request, query: bool) -> list[tuple[str, bool]]:
    """The service paths a request acts on, each (path, with what lies below it)."""
    raw = request.headers.get("Fiware-ServicePath", "").strip()
    if not raw:
        return [("/", query)]           # a query: "/#"; an update: "/"
    parts = [p.strip() for p in raw.split(",")]
    if not query and (len(parts) > 1 or any(p.endswith("#") for p in parts)):
        raise _bad("a service path in an update is one plain scope, no '#' or list")
    out = []
    for part in parts:
        if not part.startswith("/"):
            raise _bad("Only /absolute/ Service Paths allowed [a service path must begin with /]")
        below = part.endswith("/#")
        out.append(((part[:-2] if below else part).rstrip("/") or "/", below))
    return out


def _scoped(request: web.Request, query: bool) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """(path, its entities) for every service path the request looks at (an update: exactly one)."""
    tenant = _tenant(request)
    scopes = _scopes(request, query)
    if not query:
        return [(scopes[0][0], tenant.under(scopes[0][0]))]

    def inside(path: str) -> bool:
        return any(path == base or (below and (base == "/" or path.startswith(base + "/"))) for base, below in scopes)

    return [(p, c) for p, c in list(tenant.paths.items()) if inside(p)]


def _options(request: web.Request) -> set[str]:
    return {o for o in request.query.get("options", "").split(",") if o}


def _paging(request: web.Request) -> tuple[int, int]:
    try:
        limit = int(request.query.get("limit", _DEFAULT_LIMIT))
        offset = int(request.query.get("offset", 0))
    except ValueError:
        raise _bad("Bad pagination limit or offset") from None
    if limit < 1 or limit > _MAX_LIMIT:
        raise _bad(f"Bad pagination limit: /{limit}/ [a value from 1 to {_MAX_LIMIT} is expected]")
    if offset < 0:
        raise _bad("Bad pagination offset")
    return limit, offset


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        raise OrionError(411, "ContentLengthRequired", "Zero/No Content-Length in PUT/POST/PATCH request")
    try:
        return json.loads(raw)
    except ValueError:
        raise OrionError(400, "ParseError", "Errors found in incoming JSON buffer") from None


def _list_param(request: web.Request, name: str) -> list[str] | None:
    v = request.query.get(name)
    return [x for x in v.split(",") if x] if v else None


def _simple_q(entity: dict[str, Any], q: str) -> bool:
    """The subset of Orion's Simple Query Language the tests use: ``attr==v``, ``attr>n``, ``attr<n``, ``;``."""
    for stmt in q.split(";"):
        m = re.fullmatch(r"([\w.]+)(==|!=|>=|<=|>|<)(.*)", stmt)
        if not m:
            if stmt and stmt not in entity:
                return False
            continue
        name, op, want = m.groups()
        if name not in entity:
            return False
        have = entity[name]["value"]
        try:
            wantv: Any = float(want) if isinstance(have, (int, float)) else want.strip("'")
        except ValueError:
            return False
        ok = {"==": have == wantv, "!=": have != wantv}.get(op)
        if ok is None:
            try:
                ok = {">": have > wantv, "<": have < wantv, ">=": have >= wantv, "<=": have <= wantv}[op]
            except TypeError:
                ok = False
        if not ok:
            return False
    return True


def _select(scoped: list[tuple[str, dict[str, dict[str, Any]]]], ids: list[str] | None, id_pattern: str | None,
            types: list[str] | None, q: str | None) -> list[tuple[str, dict[str, Any]]]:
    pattern = re.compile(id_pattern) if id_pattern else None
    out = []
    for path, e in ((p, e) for p, c in scoped for e in c.values()):  # insertion order, per path
        if ids is not None and e["id"] not in ids:
            continue
        if pattern is not None and not pattern.search(e["id"]):
            continue
        if types is not None and e["type"] not in types:
            continue
        if q and not _simple_q(e, q):
            continue
        out.append((path, e))
    return out


def _page(request: web.Request, items: list[Any], render) -> web.Response:
    limit, offset = _paging(request)
    headers = {"Fiware-Total-Count": str(len(items))} if "count" in _options(request) else None
    return _json([render(x) for x in items[offset:offset + limit]], headers=headers)


def _located(request: web.Request, query: bool | None = None) -> tuple[str, dict[str, dict[str, Any]], dict[str, Any]]:
    """The one entity a by-id request names: (its path, the entities of that path, it)."""
    entity_id, etype = request.match_info["id"], request.query.get("type")
    scoped = _scoped(request, request.method == "GET" if query is None else query)
    found = [(p, c, c[entity_id]) for p, c in scoped
             if entity_id in c and (not etype or c[entity_id]["type"] == etype)]
    if not found:
        raise _not_found()
    if len(found) > 1:
        raise OrionError(409, "TooManyResults", "More than one matching entity. Please refine your query")
    return found[0]


def _entity(request: web.Request) -> dict[str, Any]:
    return _located(request)[2]


# --------------------------------------------------------------------------- handlers: entities


async def list_entities(request: web.Request) -> web.Response:
    if "id" in request.query and "idPattern" in request.query:
        raise _bad("Incompatible parameters: id, IdPattern")
    id_pattern = request.query.get("idPattern")
    if id_pattern:
        try:
            re.compile(id_pattern)
        except re.error:
            raise _bad("Invalid regex for entity id pattern") from None
    found = _select(_scoped(request, True), _list_param(request, "id"), id_pattern, _list_param(request, "type"),
                    request.query.get("q"))
    opts, attrs = _options(request), _list_param(request, "attrs")
    return _page(request, found, lambda pe: _render(pe[1], opts, attrs, path=pe[0]))


async def create_entity(request: web.Request) -> web.Response:
    body = await _body(request)
    if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not body["id"]:
        raise _bad("entity id is missing")
    opts = _options(request)
    [(_, container)] = _scoped(request, False)
    eid, etype = body["id"], body.get("type") or "Thing"
    attrs = _attrs_of(body, "keyValues" in opts)
    existing = container.get(eid)
    if existing is not None:
        if "upsert" not in opts:
            raise OrionError(422, "Unprocessable", "Already Exists")
        existing.update(attrs)
        return web.Response(status=204)
    container[eid] = {"id": eid, "type": etype, **attrs}
    return web.Response(status=201, headers={"Location": f"/v2/entities/{eid}?type={etype}"})


async def get_entity(request: web.Request) -> web.Response:
    path, _, e = _located(request)
    return _json(_render(e, _options(request), _list_param(request, "attrs"), path=path))


async def delete_entity(request: web.Request) -> web.Response:
    _, container, _ = _located(request)
    del container[request.match_info["id"]]
    return web.Response(status=204)


async def get_attrs(request: web.Request) -> web.Response:
    path, _, e = _located(request)
    return _json(_render(e, _options(request), _list_param(request, "attrs"), with_id=False, path=path))


async def append_attrs(request: web.Request) -> web.Response:
    e = _entity(request)
    opts = _options(request)
    attrs = _attrs_of(await _body(request), "keyValues" in opts)
    if "append" in opts and any(k in e for k in attrs):
        raise OrionError(422, "Unprocessable", "one or more of the attributes in the request already exist")
    e.update(attrs)
    return web.Response(status=204)


async def update_attrs(request: web.Request) -> web.Response:
    e = _entity(request)
    attrs = _attrs_of(await _body(request), "keyValues" in _options(request))
    if any(k not in e for k in attrs):
        raise OrionError(422, "Unprocessable", "do not exist")
    e.update(attrs)
    return web.Response(status=204)


async def replace_attrs(request: web.Request) -> web.Response:
    e = _entity(request)
    attrs = _attrs_of(await _body(request), "keyValues" in _options(request))
    for k in [k for k in e if k not in ("id", "type")]:
        del e[k]
    e.update(attrs)
    return web.Response(status=204)


def _attr(request: web.Request) -> tuple[dict[str, Any], str]:
    e = _entity(request)
    name = request.match_info["attr"]
    if name not in e or name in ("id", "type"):
        raise _not_found("attribute")
    return e, name


async def get_attr(request: web.Request) -> web.Response:
    e, name = _attr(request)
    return _json(e[name])


async def put_attr(request: web.Request) -> web.Response:
    e, name = _attr(request)
    e[name] = _norm_attr(await _body(request), False)
    return web.Response(status=204)


async def delete_attr(request: web.Request) -> web.Response:
    e, name = _attr(request)
    del e[name]
    return web.Response(status=204)


async def get_attr_value(request: web.Request) -> web.Response:
    e, name = _attr(request)
    value = e[name]["value"]
    if isinstance(value, (dict, list)):
        return _json(value)
    if "application/json" in request.headers.get("Accept", "") and not isinstance(value, str):
        return _json(value)
    return web.Response(text=value if isinstance(value, str) else json.dumps(value), content_type="text/plain")


async def put_attr_value(request: web.Request) -> web.Response:
    e, name = _attr(request)
    raw = await request.read()
    if request.content_type == "text/plain":
        text = raw.decode("utf-8", "replace")
        try:
            value: Any = json.loads(text) if not text.startswith('"') else text.strip('"')
        except ValueError:
            value = text
    else:
        try:
            value = json.loads(raw)
        except ValueError:
            raise OrionError(400, "ParseError", "Errors found in incoming JSON buffer") from None
    e[name]["value"] = value
    return web.Response(status=204)


# --------------------------------------------------------------------------- handlers: batch


async def op_update(request: web.Request) -> web.Response:
    body = await _body(request)
    if not isinstance(body, dict) or not isinstance(body.get("entities"), list):
        raise _bad("Invalid JSON payload: entities is missing")
    action = body.get("actionType")
    if action not in ("append", "appendStrict", "update", "replace", "delete"):
        raise _bad("invalid value for actionType")
    [(_, container)] = _scoped(request, False)
    kv = "keyValues" in _options(request)
    for item in body["entities"]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise _bad("entity id is missing")
    for item in body["entities"]:
        eid = item["id"]
        attrs = _attrs_of(item, kv)
        e = container.get(eid)
        if action in ("append", "appendStrict"):
            if e is None:
                container[eid] = {"id": eid, "type": item.get("type") or "Thing", **attrs}
            else:
                if action == "appendStrict" and any(k in e for k in attrs):
                    raise OrionError(422, "Unprocessable", "one or more of the attributes already exist")
                e.update(attrs)
        elif e is None:
            raise _not_found()
        elif action == "update":
            e.update(attrs)
        elif action == "replace":
            for k in [k for k in e if k not in ("id", "type")]:
                del e[k]
            e.update(attrs)
        elif action == "delete":
            if attrs:
                for k in attrs:
                    e.pop(k, None)
            else:
                del container[eid]
    return web.Response(status=204)


async def op_query(request: web.Request) -> web.Response:
    body = await _body(request)
    if not isinstance(body, dict):
        raise _bad("Parse Error")
    scoped = _scoped(request, True)
    selectors = body.get("entities")
    expression = body.get("expression") or {}
    q = expression.get("q") if isinstance(expression, dict) else None
    if selectors is None:
        found = _select(scoped, None, None, None, q)
    else:
        if not isinstance(selectors, list):
            raise _bad("entities must be an array")
        seen: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
        for sel in selectors:
            if not isinstance(sel, dict) or ("id" in sel) == ("idPattern" in sel):
                raise _bad("exactly one of id and idPattern per entity")
            ids = [sel["id"]] if "id" in sel else None
            types = [sel["type"]] if sel.get("type") else None
            for path, e in _select(scoped, ids, sel.get("idPattern"), types, q):
                seen[(path, e["id"])] = (path, e)
        found = list(seen.values())
    opts, attrs = _options(request), body.get("attrs")
    return _page(request, found, lambda pe: _render(pe[1], opts, attrs, path=pe[0]))


# --------------------------------------------------------------------------- handlers: subscriptions etc.


_ids = itertools.count(secrets.randbelow(1 << 24))
_PROCESS = secrets.token_hex(5)


def _object_id() -> str:
    """Like a MongoDB ObjectId, as Orion's ids are: creation time, process, counter (so sorted = created)."""
    return f"{int(time.time()):08x}{_PROCESS}{next(_ids) % (1 << 24):06x}"


def _collection(kind: str):
    """CRUD for subscriptions and registrations, which behave alike in Orion."""

    def store(request: web.Request) -> dict[str, dict[str, Any]]:
        return getattr(_tenant(request), kind)

    async def create(request: web.Request) -> web.Response:
        body = await _body(request)
        if not isinstance(body, dict):
            raise _bad("Parse Error")
        if kind == "subscriptions" and not isinstance(body.get("notification"), dict):
            raise _bad("Subscription notification is missing")
        new_id = _object_id()
        store(request)[new_id] = {"id": new_id, **{k: v for k, v in body.items() if k != "id"},
                                  **({"status": "active"} if kind == "subscriptions" else {})}
        return web.Response(status=201, headers={"Location": f"/v2/{kind}/{new_id}"})

    async def listing(request: web.Request) -> web.Response:
        return _page(request, list(store(request).values()), lambda x: x)

    def one(request: web.Request) -> dict[str, Any]:
        item = store(request).get(request.match_info["id"])
        if item is None:
            raise _not_found(kind[:-1])
        return item

    async def get(request: web.Request) -> web.Response:
        return _json(one(request))

    async def patch(request: web.Request) -> web.Response:
        item = one(request)
        body = await _body(request)
        if not isinstance(body, dict):
            raise _bad("Parse Error")
        item.update({k: v for k, v in body.items() if k != "id"})
        return web.Response(status=204)

    async def delete(request: web.Request) -> web.Response:
        one(request)
        del store(request)[request.match_info["id"]]
        return web.Response(status=204)

    return create, listing, get, patch, delete


async def list_types(request: web.Request) -> web.Response:
    types: dict[str, dict[str, Any]] = {}
    for e in (e for c in _tenant(request).paths.values() for e in c.values()):
        t = types.setdefault(e["type"], {"type": e["type"], "attrs": {}, "count": 0})
        t["count"] += 1
        for k, v in e.items():
            if k not in ("id", "type"):
                t["attrs"].setdefault(k, {"types": []})
                if v["type"] not in t["attrs"][k]["types"]:
                    t["attrs"][k]["types"].append(v["type"])
    return _page(request, list(types.values()), lambda x: x)


async def version(request: web.Request) -> web.Response:
    return _json({"orion": {"version": "3.10.1", "uptime": "0 d, 0 h, 0 m, 1 s", "git_hash": "standin",
                            "compile_time": "n/a", "compiled_by": "keygate-tests", "compiled_in": "n/a",
                            "release_date": "n/a", "doc": "https://fiware-orion.rtfd.io/"}})


async def v2_root(request: web.Request) -> web.Response:
    return _json({"entities_url": "/v2/entities", "types_url": "/v2/types",
                  "subscriptions_url": "/v2/subscriptions", "registrations_url": "/v2/registrations"})


# --------------------------------------------------------------------------- app


def _middleware(record: bool):
    @web.middleware
    async def shape(request: web.Request, handler) -> web.StreamResponse:
        if record:
            body = await request.read()
            request.app[RECORDED].append(Recorded(request.method, request.raw_path.split("?", 1)[0],
                                                  request.query_string, dict(request.headers), body))
        correlator = request.headers.get("Fiware-Correlator") or secrets.token_hex(16)
        held = request.app[HOLDS].get((request.method, request.path))
        if held is not None:
            held.arrived.set()
            await held.release.wait()
        odd = next((make for method, prefix, make in request.app[ANSWERS]
                    if method == request.method and request.path.startswith(prefix)), None)
        try:
            response = odd(request) if odd is not None else await handler(request)
        except OrionError as exc:
            response = _json({"error": exc.error, "description": exc.description}, status=exc.status)
        except web.HTTPNotFound:
            response = _json({"error": "BadRequest", "description": "service not found"}, status=400)
        except web.HTTPMethodNotAllowed:
            response = _json({"error": "MethodNotAllowed", "description": "method not allowed"}, status=405)
        response.headers["Fiware-Correlator"] = correlator
        written = _ENTITY_WRITE.match(request.path)
        if written and request.method in ("POST", "PATCH", "PUT") and response.status in (200, 201, 204):
            await _notify(request, written.group(1))
        return response

    return shape


async def _notify(request: web.Request, entity_id: str) -> None:
    """Send the notifications of the subscriptions on this entity (awaited, so tests need not wait)."""
    import aiohttp

    tenant = _tenant(request)
    entity = next((c[entity_id] for c in tenant.paths.values() if entity_id in c), None)
    for sub in list(tenant.subscriptions.values()):
        subject = sub.get("subject", {}).get("entities", [])
        if not any(isinstance(e, dict) and e.get("id") == entity_id for e in subject):
            continue
        notification = sub.get("notification", {})
        custom = notification.get("httpCustom")
        target = custom or notification.get("http")
        if not isinstance(target, dict) or not isinstance(target.get("url"), str):
            continue
        method, headers = "POST", {"Content-Type": "application/json"}
        body = json.dumps({"subscriptionId": sub["id"], "data": [entity]})
        if custom:
            method = str(custom.get("method", "POST")).upper()
            headers.update(custom.get("headers") or {})
            if "json" in custom:
                body = json.dumps(custom["json"])
            elif "payload" in custom:
                body = str(custom["payload"])
        if request.headers.get("Fiware-Service"):
            headers["Fiware-Service"] = request.headers["Fiware-Service"]
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
                async with session.request(method, target["url"], data=body.encode(), headers=headers) as r:
                    outcome: Any = r.status
        except (aiohttp.ClientError, OSError) as exc:
            outcome = type(exc).__name__
        request.app[NOTIFIED].append((sub["id"], method, target["url"], outcome))


def create_standin_app(*, record: bool = True) -> web.Application:
    """``record=False`` for long benchmark runs, so the record list does not grow without bound."""
    app = web.Application(middlewares=[_middleware(record)])
    app[RECORDED] = []
    app[NOTIFIED] = []
    app[TENANTS] = {}
    app[HOLDS] = {}
    app[ANSWERS] = []
    r = app.router
    r.add_get("/version", version)
    r.add_get("/v2", v2_root)
    r.add_get("/v2/entities", list_entities)
    r.add_post("/v2/entities", create_entity)
    r.add_get("/v2/entities/{id}", get_entity)
    r.add_delete("/v2/entities/{id}", delete_entity)
    r.add_get("/v2/entities/{id}/attrs", get_attrs)
    r.add_post("/v2/entities/{id}/attrs", append_attrs)
    r.add_patch("/v2/entities/{id}/attrs", update_attrs)
    r.add_put("/v2/entities/{id}/attrs", replace_attrs)
    r.add_get("/v2/entities/{id}/attrs/{attr}", get_attr)
    r.add_put("/v2/entities/{id}/attrs/{attr}", put_attr)
    r.add_delete("/v2/entities/{id}/attrs/{attr}", delete_attr)
    r.add_get("/v2/entities/{id}/attrs/{attr}/value", get_attr_value)
    r.add_put("/v2/entities/{id}/attrs/{attr}/value", put_attr_value)
    r.add_post("/v2/op/update", op_update)
    r.add_post("/v2/op/query", op_query)
    for kind in ("subscriptions", "registrations"):
        create, listing, get, patch, delete = _collection(kind)
        r.add_post(f"/v2/{kind}", create)
        r.add_get(f"/v2/{kind}", listing)
        r.add_get(f"/v2/{kind}/{{id}}", get)
        r.add_patch(f"/v2/{kind}/{{id}}", patch)
        r.add_delete(f"/v2/{kind}/{{id}}", delete)
    r.add_get("/v2/types", list_types)
    return app


class NgsiStandin:
    """The stand-in on a loopback port, inside the test's event loop."""

    def __init__(self, port: int = 0, *, ssl_context: ssl.SSLContext | None = None):
        self.app = create_standin_app()
        self.port = port
        self.ssl_context = ssl_context   # given: an https:// Orion (the server certificate in it)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    @property
    def recorded(self) -> list[Recorded]:
        return self.app[RECORDED]

    def hold(self, method: str, path: str) -> Hold:
        """Keep the next requests with this method and (decoded) path waiting until released."""
        return self.app[HOLDS].setdefault((method, path), Hold())

    def answer(self, method: str, prefix: str, make: Callable[[web.Request], web.StreamResponse]) -> None:
        """Answer requests with this method and a (decoded) path beginning with ``prefix`` with
        ``make(request)`` instead of Orion's answer (the request is still recorded)."""
        self.app[ANSWERS].append((method, prefix, make))

    def tenant(self, service: str = "") -> Tenant:
        return self.app[TENANTS].setdefault(service, Tenant())

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="NGSI-v2 stand-in for Orion (tests and benchmarks)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1026)
    args = parser.parse_args(argv)
    web.run_app(create_standin_app(record=False), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
