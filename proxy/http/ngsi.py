"""NGSI-v2 request analysis, sans-IO.

:func:`analyse` takes what the client asked for (method, normalised path,
parsed query, parsed JSON body) and says what it *is*: a read or write on one
device, a listing, a batch, a subscription operation, or an endpoint that
only a policy may open. It does no I/O and consults nothing; the decisions are
made in :mod:`proxy.http.plan`. Keeping the two apart means the mapping from
Orion's URL space to device actions can be tested and fuzzed on its own.

A device's entity id is its device id. Ids and attribute names must follow
Orion's identifier rules; anything else is refused here, before it can mean
one thing to the gateway and another to Orion.

Bodies the decision depends on are parsed here too (:func:`parse_json_body`),
strictly: nesting deeper than ``http.max_json_depth`` (measured before
parsing, without recursion), invalid UTF-8, duplicate keys, lone surrogates
(``"\\ud800"``), ``NaN``/``Infinity`` and numbers beyond a double's range
(``1e400``) are refused with a :class:`Reject` in Orion's ``ParseError`` shape.
What is accepted re-serialises as the same, finite, valid JSON, which is what
the gateway sends on to Orion.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.jsonlimits import too_deep

Access = Literal["read", "write"]

READ_METHODS = frozenset({"GET", "HEAD"})

# Orion's identifier rules (ids, types, attribute names): printable ASCII without
# whitespace and without the characters Orion forbids (& ? / # and < > " ' = ; ( )).
# '%' is refused as well, so an id means the same thing encoded and decoded.
_IDENT = re.compile(r"[!$*+,\-.0-9:@A-Z\[\\\]^_`a-z{|}~]{1,256}")
_SUBSCRIPTION_ID = re.compile(r"[0-9a-f]{24}")

# Query parameters Orion understands on GET /v2/entities; anything else is refused
# rather than forwarded, so nothing can widen a rewritten listing.
LIST_PARAMS = frozenset({"id", "idPattern", "type", "typePattern", "q", "mq", "attrs", "metadata", "limit",
                         "offset", "options", "orderBy", "georel", "geometry", "coords"})


def valid_ident(text: Any) -> bool:
    return isinstance(text, str) and _IDENT.fullmatch(text) is not None


def valid_subscription_id(text: str) -> bool:
    return _SUBSCRIPTION_ID.fullmatch(text) is not None


class NoBody:
    """No body was sent (distinct from a JSON ``null``)."""

    def __repr__(self) -> str:
        return "NO_BODY"


NO_BODY: Any = NoBody()


@dataclass(frozen=True)
class NgsiRequest:
    method: str                              # upper case
    path: str                                # already normalised
    query: tuple[tuple[str, str], ...] = ()  # in order, no duplicate names
    body: Any = NO_BODY                      # parsed JSON where :func:`needs_json_body` says so

    def param(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.query:
            if k == name:
                return v
        return default


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Reject:
    """Malformed for Orion's grammar: answered at once, nothing forwarded."""
    status: int
    error: str
    description: str


@dataclass(frozen=True)
class EntityOp:
    """A read or write on one device's entity (``/v2/entities/{id}[/attrs[/{attr}[/value]]]``)."""
    device_id: str
    access: Access


@dataclass(frozen=True)
class CreateEntity:
    device_id: str


@dataclass(frozen=True)
class ListEntities:
    """``GET /v2/entities``: restricted to the readable ids for non-admins."""


@dataclass(frozen=True)
class QueryEntities:
    """``POST /v2/op/query``: selectors are (id or None, idPattern or None, type fields)."""
    selectors: tuple[tuple[str | None, str | None, tuple[tuple[str, str], ...]], ...] | None


@dataclass(frozen=True)
class BatchUpdate:
    """``POST /v2/op/update``: (device id, method of the equivalent single request) per entity."""
    entities: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class NotificationTarget:
    kind: Literal["http", "mqtt"]
    url: str
    topic: str = ""


@dataclass(frozen=True)
class SubscriptionBody:
    entity_ids: tuple[str, ...] = ()
    patterns: bool = False                      # an idPattern subject
    targets: tuple[NotificationTarget, ...] = ()


@dataclass(frozen=True)
class CreateSubscription:
    body: SubscriptionBody


@dataclass(frozen=True)
class ListSubscriptions:
    pass


@dataclass(frozen=True)
class SubscriptionOp:
    subscription_id: str
    method: str
    body: SubscriptionBody = field(default_factory=SubscriptionBody)


@dataclass(frozen=True)
class PolicyOnly:
    """Everything else (registrations, types, version, Orion's admin API...): closed unless a policy opens it."""


Action = (Reject | EntityOp | CreateEntity | ListEntities | QueryEntities | BatchUpdate | CreateSubscription
          | ListSubscriptions | SubscriptionOp | PolicyOnly)


def bad_request(description: str) -> Reject:
    return Reject(400, "BadRequest", description)


# --------------------------------------------------------------------------- JSON bodies

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")   # only an escape can spell a surrogate in UTF-8 text
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_DOUBLE = sys.float_info.max


class _Refused(ValueError):
    pass


def _pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in items:
        if k in out:
            # Read differently by different parsers: refused, not resolved one way here and another in Orion.
            raise _Refused(f"duplicate key {k!r}")
        out[k] = v
    return out


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _float(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise _Refused(f"number {text[:40]} is out of range")
    return number


def _int(text: str) -> int:
    number = int(text)   # more than 4300 digits: ValueError from Python itself
    if abs(number) > _MAX_DOUBLE:
        # Orion reads numbers as doubles: this one would be infinite there.
        raise _Refused(f"number {text[:40]}... is out of range")
    return number


# One decoder for every body: json.loads with hooks builds a decoder and its scanner per call, 4.3 µs
# of a 10 µs parse. (json.loads also refuses a leading BOM by name; decode() refuses it as a value
# that does not parse, which is the same answer here.)
_STRICT_JSON = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float,
                                parse_int=_int)


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_error(description: str) -> Reject:
    return Reject(400, "ParseError", description)


def parse_json_body(raw: bytes, max_depth: int) -> Any:
    """The parsed body, or a :class:`Reject`; never raises."""
    if too_deep(raw, max_depth):
        return parse_error(f"JSON nested deeper than {max_depth} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return parse_error("request body is not valid UTF-8")
    try:
        value = _STRICT_JSON.decode(text)
    except _Refused as exc:
        return parse_error(str(exc))
    except (ValueError, RecursionError):
        return parse_error("Errors found in incoming JSON buffer")
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        return parse_error("JSON string with a lone surrogate (not a Unicode character)")
    return value


# --------------------------------------------------------------------------- analysis


def needs_json_body(method: str, path: str) -> bool:
    """Whether the decision depends on the body: then it is read whole, parsed and re-serialised."""
    if method == "POST":
        return path in ("/v2/entities", "/v2/op/update", "/v2/op/query", "/v2/subscriptions")
    return method == "PATCH" and path.startswith("/v2/subscriptions/")


_ATTRS_WRITE = re.compile(r"/v2/entities/[^/]+/attrs(/[^/]+(/value)?)?")


def checks_json_body(method: str, path: str, content_type: str) -> bool:
    """Whether a body the decision does not need is still read whole and checked (nesting depth,
    non-finite numbers, lone surrogates, duplicate keys) before it is forwarded as sent: the JSON
    attribute writes, which would otherwise stream to Orion unchecked. A ``text/plain`` value is not JSON."""
    if method not in ("POST", "PATCH", "PUT") or not _ATTRS_WRITE.fullmatch(path):
        return False
    return content_type.split(";", 1)[0].strip().lower() != "text/plain"


def analyse(req: NgsiRequest) -> Action:
    parts = req.path.split("/")[1:]  # the path is normalised: no empty segments, no dot segments
    if parts[:2] == ["v2", "entities"]:
        return _entities(req, parts[2:])
    if parts[:2] == ["v2", "op"] and len(parts) == 3 and req.method == "POST":
        if parts[2] == "update":
            return _op_update(req)
        if parts[2] == "query":
            return _op_query(req)
    if parts[:2] == ["v2", "subscriptions"]:
        return _subscriptions(req, parts[2:])
    return PolicyOnly()


def _entities(req: NgsiRequest, rest: list[str]) -> Action:
    if not rest:
        if req.method == "GET":
            return ListEntities()
        if req.method == "POST":
            body = req.body
            if body is NO_BODY:
                return Reject(411, "ContentLengthRequired", "Zero/No Content-Length in PUT/POST/PATCH request")
            if not isinstance(body, dict) or "id" not in body:
                return bad_request("entity id is missing")
            if not valid_ident(body["id"]):
                return bad_request("Invalid characters in entity id")
            return CreateEntity(body["id"])
        return Reject(405, "MethodNotAllowed", "method not allowed")
    entity_id = rest[0]
    if not valid_ident(entity_id):
        return bad_request("Invalid characters in entity id")
    tail = rest[1:]
    shape_ok = (not tail or (tail[0] == "attrs" and (
        len(tail) == 1
        or (len(tail) == 2 and valid_ident(tail[1]))
        or (len(tail) == 3 and valid_ident(tail[1]) and tail[2] == "value"))))
    if not shape_ok:
        return bad_request("Invalid path")
    return EntityOp(entity_id, "read" if req.method in READ_METHODS else "write")


# The single request each batch action stands for; the policy is asked about that one.
_BATCH_METHOD = {"append": "POST", "appendStrict": "POST", "update": "PATCH", "replace": "PUT", "delete": "DELETE"}


def _op_update(req: NgsiRequest) -> Action:
    body = req.body
    if not isinstance(body, dict) or not isinstance(body.get("entities"), list):
        return bad_request("Invalid JSON payload: entities is missing")
    action = body.get("actionType")
    method = _BATCH_METHOD.get(action) if isinstance(action, str) else None
    if method is None:
        return bad_request("invalid value for actionType")
    out = []
    for item in body["entities"]:
        if not isinstance(item, dict) or "idPattern" in item or not valid_ident(item.get("id")):
            return bad_request("each entity needs a valid id")
        out.append((item["id"], method))
    return BatchUpdate(tuple(out))


def _type_fields(sel: dict[str, Any]) -> tuple[tuple[str, str], ...] | None:
    fields = []
    for key in ("type", "typePattern"):
        if key in sel:
            if not isinstance(sel[key], str) or not sel[key]:
                return None
            fields.append((key, sel[key]))
    return tuple(fields)


def _op_query(req: NgsiRequest) -> Action:
    body = req.body
    if body is NO_BODY:
        return Reject(411, "ContentLengthRequired", "Zero/No Content-Length in PUT/POST/PATCH request")
    if not isinstance(body, dict):
        return bad_request("Parse Error")
    if "entities" not in body:
        return QueryEntities(None)
    if not isinstance(body["entities"], list):
        return bad_request("entities must be an array")
    out: list[tuple[str | None, str | None, tuple[tuple[str, str], ...]]] = []
    for sel in body["entities"]:
        if not isinstance(sel, dict) or ("id" in sel) == ("idPattern" in sel):
            return bad_request("exactly one of id and idPattern per entity")
        types = _type_fields(sel)
        if types is None:
            return bad_request("invalid entity type")
        if "id" in sel:
            if not valid_ident(sel["id"]):
                return bad_request("Invalid characters in entity id")
            out.append((sel["id"], None, types))
        else:
            if not isinstance(sel["idPattern"], str):
                return bad_request("invalid idPattern")
            out.append((None, sel["idPattern"], types))
    return QueryEntities(tuple(out))


def _subscriptions(req: NgsiRequest, rest: list[str]) -> Action:
    if not rest:
        if req.method == "GET":
            return ListSubscriptions()
        if req.method == "POST":
            if req.body is NO_BODY:
                return Reject(411, "ContentLengthRequired", "Zero/No Content-Length in PUT/POST/PATCH request")
            parsed = subscription_body(req.body, creating=True)
            return parsed if isinstance(parsed, Reject) else CreateSubscription(parsed)
        return Reject(405, "MethodNotAllowed", "method not allowed")
    if len(rest) != 1:
        return bad_request("Invalid path")
    if req.method not in ("GET", "PATCH", "DELETE"):
        return Reject(405, "MethodNotAllowed", "method not allowed")
    if not _SUBSCRIPTION_ID.fullmatch(rest[0]):
        # Orion's ids are 24 hex digits; anything else cannot exist, and saying so leaks nothing.
        return Reject(404, "NotFound", "The requested subscription has not been found. Check id")
    if req.method == "PATCH":
        parsed = subscription_body(req.body, creating=False)
        if isinstance(parsed, Reject):
            return parsed
        return SubscriptionOp(rest[0], "PATCH", parsed)
    return SubscriptionOp(rest[0], req.method)


def subscription_body(body: Any, *, creating: bool) -> SubscriptionBody | Reject:
    """The subject entities and notification targets of a subscription (or of a PATCH to one)."""
    if not isinstance(body, dict):
        return bad_request("Parse Error")
    ids: list[str] = []
    patterns = False
    subject = body.get("subject")
    if subject is not None or creating:
        if not isinstance(subject, dict) or not isinstance(subject.get("entities"), list) \
                or not subject["entities"]:
            return bad_request("Subscription subject entities are missing")
        for sel in subject["entities"]:
            if not isinstance(sel, dict) or ("id" in sel) == ("idPattern" in sel):
                return bad_request("exactly one of id and idPattern per entity")
            if "idPattern" in sel:
                patterns = True
            elif not valid_ident(sel["id"]):
                return bad_request("Invalid characters in entity id")
            else:
                ids.append(sel["id"])
    targets: list[NotificationTarget] = []
    notification = body.get("notification")
    if notification is not None or creating:
        if not isinstance(notification, dict):
            return bad_request("Subscription notification is missing")
        for key, kind in (("http", "http"), ("httpCustom", "http"), ("mqtt", "mqtt"), ("mqttCustom", "mqtt")):
            if key not in notification:
                continue
            target = notification[key]
            if not isinstance(target, dict) or not isinstance(target.get("url"), str):
                return bad_request(f"notification {key} needs a url")
            topic = target.get("topic", "")
            if kind == "mqtt" and not isinstance(topic, str):
                return bad_request(f"notification {key} topic must be a string")
            targets.append(NotificationTarget(kind, target["url"],  # type: ignore[arg-type]
                                              topic if kind == "mqtt" else ""))
        if creating and not targets:
            return bad_request("Subscription notification needs http, httpCustom, mqtt or mqttCustom")
    return SubscriptionBody(tuple(ids), patterns, tuple(targets))


# --------------------------------------------------------------------------- headers

_TENANT = re.compile(r"[a-z0-9_]{1,50}")
_SCOPE_PART = r"[A-Za-z0-9_]{1,50}"
_SCOPE = re.compile(rf"/|(/{_SCOPE_PART}){{1,10}}")
_SCOPE_QUERY = re.compile(rf"/#|/|(/{_SCOPE_PART}){{1,10}}(/#)?")


def tenant_of(header: str | None) -> str | Reject:
    """The client's ``Fiware-Service``, lower-cased as Orion does; "" for the default tenant."""
    if header is None or header == "":
        return ""
    low = header.lower()
    if not _TENANT.fullmatch(low):
        return bad_request("bad character in tenant name")
    return low


def check_service_path(header: str | None, *, query: bool) -> Reject | None:
    """Orion's ``Fiware-ServicePath`` grammar: queries take up to 10 comma-separated scopes (``/#``
    allowed at the end), updates exactly one plain scope."""
    if header is None:
        return None
    scopes = [s.strip() for s in header.split(",")]
    if len(scopes) > (10 if query else 1):
        return bad_request("too many service paths")
    for scope in scopes:
        if not (_SCOPE_QUERY if query else _SCOPE).fullmatch(scope):
            return bad_request("a component of ServicePath contains an illegal character")
    return None
