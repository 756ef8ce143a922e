"""From an analysed NGSI request to what the gateway does: answer, refuse, or forward (rewritten).

Still sans-IO: the ownership facts and the policy set are in-memory and
synchronous; the only I/O the plan asks for (resolving notification hosts,
talking to Orion) is left to the shell in :mod:`proxy.http.gateway`.

Rules, in one place:

* one entity: the policy decides on the request's own method and path;
* creation (``POST /v2/entities``, batch ``append``): the id must be a device
  registered in this tenant (an admin may create anything), and writable;
* batch ``op/update``: every entity writable, or the whole batch is refused
  without naming which entity failed;
* listings (``GET /v2/entities``, ``op/query``) for non-admins: rewritten to an
  explicit list of the ids the caller may read; an empty list is answered
  ``[]`` here, Orion is never asked an unrestricted question;
* subscriptions: tied to their creator; creation needs read access to every
  subject entity (no ``idPattern`` for non-admins) and notification targets
  that pass the SSRF check; others' subscriptions are answered 404; a
  non-admin's listing is the caller's recorded subscriptions (the shell
  fetches them by id), paged with Orion's ``limit``/``offset``/``options=count``;
* tenancy: a device lives in the tenant recorded in its facts (``service``,
  defaulting to ``http.fiware_service``); outside it, it is not a device;
* everything else: closed unless a policy opens it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from proxy.facts import OwnershipFacts
from proxy.http import ngsi
from proxy.http.patterns import UnsafePattern, compile_id_pattern
from proxy.identity.model import Identity

# Above this, an id list no longer fits comfortably in a URL: use op/query instead.
MAX_ID_PARAM = 6000
OP_QUERY_PARAMS = frozenset({"limit", "offset", "options", "orderBy"})
ANONYMOUS_GRANTEE = "anonymous"


@dataclass(frozen=True)
class Check:
    """One authorization outcome, in the shape of the policy engine's Decision."""
    allowed: bool
    rule: str | None
    reason: str


@dataclass(frozen=True)
class Deny:
    status: int
    error: str
    description: str
    reason: str                      # for the audit log only
    rule: str | None = None
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Answer:
    """Answered by the gateway itself (e.g. an empty listing)."""
    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    rule: str | None = None
    devices: tuple[str, ...] = ()


After = Literal["record_subscription", "filter_subscriptions", "forget_subscription", "update_subscription"]


@dataclass(frozen=True)
class Forward:
    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    body: bytes | None                 # None: the client's body, streamed
    devices: tuple[str, ...] = ()
    rule: str | None = None
    reason: str = ""
    targets: tuple[ngsi.NotificationTarget, ...] = ()   # to pass the SSRF check first
    after: After | None = None
    keep: frozenset[str] = frozenset()                   # filter_subscriptions: the caller's ids
    page: tuple[int, int, bool] = (20, 0, False)         # filter_subscriptions: limit, offset, count
    unrestricted: bool = False                           # record/update_subscription: an idPattern subject


Plan = Deny | Answer | Forward


@dataclass
class Context:
    identity: Identity
    tenant: str                 # the effective Fiware-Service ("" = Orion's default tenant)
    default_service: str        # http.fiware_service: the tenant of devices recorded without one
    is_admin: bool
    facts: OwnershipFacts
    policies: Any               # proxy.policy.Policies (may_http, may_publish)
    ownership: Any              # subscription_owner / subscriptions_of


def forbidden(description: str, reason: str, rule: str | None = None, devices: Iterable[str] = ()) -> Deny:
    return Deny(403, "Forbidden", description, reason, rule, tuple(devices))


def from_reject(r: ngsi.Reject) -> Deny:
    return Deny(r.status, r.error, r.description, f"malformed: {r.description}")


def _dump(body: Any) -> bytes:
    # Re-serialised, not passed through: what Orion parses is exactly what was checked.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


# --------------------------------------------------------------------------- device checks


def _in_tenant(ctx: Context, device_id: str, *, creating: bool) -> str | None:
    """Why this device id is out of reach in this tenant, or None."""
    if ctx.is_admin:
        return None
    dev = ctx.facts.device(device_id)
    if dev is None:
        return "not a registered device" if creating else None
    if (dev.service or ctx.default_service).lower() != ctx.tenant:  # Orion lower-cases tenants
        return "device belongs to another tenant"
    return None


def may(ctx: Context, method: str, path: str, device_id: str, *, creating: bool = False) -> Check:
    why = _in_tenant(ctx, device_id, creating=creating)
    if why is not None:
        return Check(False, None, why)
    d = ctx.policies.may_http(ctx.identity, method, path)
    return Check(bool(d.allowed), d.rule, d.reason)


def may_read(ctx: Context, device_id: str) -> Check:
    return may(ctx, "GET", f"/v2/entities/{device_id}", device_id)


def readable_ids(ctx: Context) -> list[str]:
    """The ids the caller may read here, sorted (so paging is stable)."""
    ident = ctx.identity
    if ident.is_anonymous:
        candidates = set(ctx.facts.readable_devices(ANONYMOUS_GRANTEE, "", ()))
    elif ident.is_device:
        # A device's username is its id: it must not pick up grants made to a user of that name.
        candidates = set(ctx.facts.readable_devices("", ident.sub, ())) | {ident.device_id}
    else:
        candidates = set(ctx.facts.readable_devices(ident.username, ident.sub, ident.groups))
    return sorted(i for i in candidates if ngsi.valid_ident(i) and may_read(ctx, i).allowed)


# --------------------------------------------------------------------------- planning


# Requests on collections that the gateway restricts itself; the policy must open the endpoint
# first (the shipped set opens them to ``anyone``), then the per-entity checks apply.
_GATED = (ngsi.CreateEntity, ngsi.BatchUpdate, ngsi.ListEntities, ngsi.QueryEntities, ngsi.CreateSubscription,
          ngsi.ListSubscriptions, ngsi.SubscriptionOp)


def plan(req: ngsi.NgsiRequest, action: ngsi.Action, ctx: Context) -> Plan:
    if isinstance(action, ngsi.Reject):
        return from_reject(action)
    if isinstance(action, _GATED):
        d = ctx.policies.may_http(ctx.identity, req.method, req.path)
        if not d.allowed:
            return forbidden("not allowed", d.reason, d.rule)
        decided = _gated(req, action, ctx)
        if not isinstance(decided, Deny) and decided.rule is None and d.rule:  # audit the endpoint rule
            decided = dataclasses.replace(decided, rule=d.rule)
        return decided
    return _ungated(req, action, ctx)


def _ungated(req: ngsi.NgsiRequest, action: ngsi.Action, ctx: Context) -> Plan:
    if isinstance(action, ngsi.EntityOp):
        c = may(ctx, req.method, req.path, action.device_id)
        if not c.allowed:
            return forbidden("not allowed", c.reason, c.rule, [action.device_id])
        return Forward(req.method, req.path, req.query, None, (action.device_id,), c.rule, c.reason)
    d = ctx.policies.may_http(ctx.identity, req.method, req.path)
    if not d.allowed:
        return forbidden("not allowed", d.reason, d.rule)
    return Forward(req.method, req.path, req.query, None, (), d.rule, d.reason)


def _gated(req: ngsi.NgsiRequest, action: ngsi.Action, ctx: Context) -> Plan:
    if isinstance(action, ngsi.CreateEntity):
        c = may(ctx, "POST", f"/v2/entities/{action.device_id}/attrs", action.device_id, creating=True)
        if not c.allowed:
            return forbidden("not allowed to create this entity", c.reason, c.rule, [action.device_id])
        return Forward("POST", req.path, req.query, _dump(req.body), (action.device_id,), c.rule, c.reason)
    if isinstance(action, ngsi.BatchUpdate):
        return _batch(req, action, ctx)
    if isinstance(action, ngsi.ListEntities):
        return _list(req, ctx)
    if isinstance(action, ngsi.QueryEntities):
        return _query(req, action, ctx)
    return _subscriptions(req, action, ctx)


_BATCH_PATH = {"POST": "/attrs", "PATCH": "/attrs", "PUT": "/attrs", "DELETE": ""}


def _batch(req: ngsi.NgsiRequest, action: ngsi.BatchUpdate, ctx: Context) -> Plan:
    ids = tuple(i for i, _ in action.entities)
    rules = []
    for device_id, method in action.entities:
        c = may(ctx, method, f"/v2/entities/{device_id}{_BATCH_PATH[method]}", device_id,
                creating=method == "POST")
        if not c.allowed:
            # The client learns only that the batch was refused, not which entity made it so.
            return forbidden("not allowed to change every entity in the batch",
                             f"{device_id}: {c.reason}", c.rule, ids)
        if c.rule and c.rule not in rules:
            rules.append(c.rule)
    return Forward("POST", req.path, req.query, _dump(req.body), ids, ",".join(rules) or None, "every entity allowed")


def _count_header(req: ngsi.NgsiRequest) -> tuple[tuple[str, str], ...]:
    options = (req.param("options") or "").split(",")
    return (("Fiware-Total-Count", "0"),) if "count" in options else ()


def _unsafe_type_pattern(pattern: str | None, ctx: Context) -> Deny | None:
    """Orion runs ``typePattern`` itself: a pattern that would stall the gateway would stall Orion."""
    if pattern is None or ctx.is_admin:
        return None
    try:
        compile_id_pattern(pattern)
    except UnsafePattern as exc:
        return Deny(400, "BadRequest", str(exc).replace("idPattern", "typePattern"), "unsafe typePattern")
    return None


def _unsafe_query_patterns(ctx: Context, *expressions: Any) -> Deny | None:
    """The regexes in ``q`` / ``mq`` statements (``attr~=pattern``), which Orion also runs itself."""
    if ctx.is_admin:
        return None
    for expression in expressions:
        if not isinstance(expression, str) or "~=" not in expression:
            continue
        for statement in expression.split(";"):
            _, sep, pattern = statement.partition("~=")
            if not sep:
                continue
            try:
                compile_id_pattern(pattern.strip().strip("'"))
            except UnsafePattern as exc:
                return Deny(400, "BadRequest", str(exc).replace("idPattern", "pattern in q"), "unsafe q pattern")
    return None


def _nothing_readable(req: ngsi.NgsiRequest, ctx: Context) -> Plan:
    if ctx.identity.is_anonymous:
        # Nothing is open to anonymous callers here: ask for credentials rather than answer [].
        return forbidden("not allowed", "nothing readable anonymously")
    return Answer(200, [], _count_header(req), "nothing readable")


def _list(req: ngsi.NgsiRequest, ctx: Context) -> Plan:
    names = [k for k, _ in req.query]
    unknown = sorted(set(names) - ngsi.LIST_PARAMS)
    if unknown:
        return Deny(400, "BadRequest", f"unsupported query parameter: {unknown[0]}", "unsupported parameter")
    id_param, pattern_text = req.param("id"), req.param("idPattern")
    if id_param is not None and pattern_text is not None:
        return Deny(400, "BadRequest", "Incompatible parameters: id, IdPattern", "id and idPattern")
    unsafe = _unsafe_type_pattern(req.param("typePattern"), ctx) or \
        _unsafe_query_patterns(ctx, req.param("q"), req.param("mq"))
    if unsafe is not None:
        return unsafe
    if ctx.is_admin:
        return Forward("GET", req.path, req.query, None, (), None, "admin listing")
    ids = readable_ids(ctx)
    if id_param is not None:
        wanted = set(id_param.split(","))
        ids = [i for i in ids if i in wanted]
    if pattern_text is not None:
        try:
            pattern = compile_id_pattern(pattern_text)
        except UnsafePattern as exc:
            return Deny(400, "BadRequest", str(exc), "unsafe idPattern")
        ids = [i for i in ids if pattern.search(i)]
    if not ids:
        return _nothing_readable(req, ctx)
    rest = tuple((k, v) for k, v in req.query if k not in ("id", "idPattern"))
    joined = ",".join(ids)
    if len(joined) <= MAX_ID_PARAM:
        return Forward("GET", req.path, rest + (("id", joined),), None, tuple(ids), None, "restricted to readable ids")
    return _list_as_query(rest, ids)


def _list_as_query(rest: tuple[tuple[str, str], ...], ids: list[str]) -> Plan:
    """A long id list, sent as the equivalent op/query instead of a GET with an enormous URL."""
    params = dict(rest)
    types = [("type", t) for t in params.get("type", "").split(",") if t]
    if not types and params.get("typePattern"):
        types = [("typePattern", params["typePattern"])]
    entities = [{"id": i, **dict([t])} for i in ids for t in types] if types else [{"id": i} for i in ids]
    body: dict[str, Any] = {"entities": entities}
    for name in ("attrs", "metadata"):
        if params.get(name):
            body[name] = params[name].split(",")
    expression = {k: params[k] for k in ("q", "mq", "georel", "geometry", "coords") if params.get(k)}
    if expression:
        body["expression"] = expression
    query = tuple((k, v) for k, v in rest if k in OP_QUERY_PARAMS)
    return Forward("POST", "/v2/op/query", query, _dump(body), tuple(ids), None, "restricted to readable ids")


def _query(req: ngsi.NgsiRequest, action: ngsi.QueryEntities, ctx: Context) -> Plan:
    unknown = sorted({k for k, _ in req.query} - OP_QUERY_PARAMS)
    if unknown:
        return Deny(400, "BadRequest", f"unsupported query parameter: {unknown[0]}", "unsupported parameter")
    if ctx.is_admin:
        return Forward("POST", req.path, req.query, _dump(req.body), (), None, "admin query")
    expression = req.body.get("expression") if isinstance(req.body, dict) else None
    if isinstance(expression, dict):
        unsafe = _unsafe_query_patterns(ctx, expression.get("q"), expression.get("mq"))
        if unsafe is not None:
            return unsafe
    readable = readable_ids(ctx)
    if action.selectors is None:
        entities = [{"id": i} for i in readable]
    else:
        entities = []
        for sel_id, sel_pattern, types in action.selectors:
            unsafe = _unsafe_type_pattern(dict(types).get("typePattern"), ctx)
            if unsafe is not None:
                return unsafe
            if sel_id is not None:
                matched = [sel_id] if sel_id in readable else []
            else:
                try:
                    pattern = compile_id_pattern(sel_pattern or "")
                except UnsafePattern as exc:
                    return Deny(400, "BadRequest", str(exc), "unsafe idPattern")
                matched = [i for i in readable if pattern.search(i)]
            entities.extend({"id": i, **dict(types)} for i in matched)
    if not entities:
        return _nothing_readable(req, ctx)
    body = dict(req.body) if isinstance(req.body, dict) else {}
    body["entities"] = entities
    devices = tuple(dict.fromkeys(e["id"] for e in entities))
    return Forward("POST", req.path, req.query, _dump(body), devices, None, "restricted to readable ids")


# --------------------------------------------------------------------------- subscriptions


def _check_subscription_body(body: ngsi.SubscriptionBody, ctx: Context) -> Deny | None:
    if body.patterns and not ctx.is_admin:
        return forbidden("idPattern subscriptions are reserved to administrators", "idPattern subject")
    for device_id in body.entity_ids:
        c = may_read(ctx, device_id)
        if not c.allowed:
            return forbidden("not allowed to read every subject entity", f"{device_id}: {c.reason}", c.rule,
                             body.entity_ids)
    for target in body.targets:
        if "${" in target.url:
            # Orion expands macros in httpCustom URLs from entity data: the target would be
            # chosen after the check, by whoever can write the entity.
            return Deny(400, "BadRequest", "notification URL must not contain ${...} macros", "macro in URL")
        if target.kind == "mqtt":
            if "${" in target.topic and not ctx.is_admin:
                return forbidden("notification topic must not contain ${...} macros", "macro in topic")
            # Orion publishes straight to the broker, past the MQTT gateway: the creator
            # must be allowed to publish there themselves.
            d = ctx.policies.may_publish(ctx.identity, target.topic)
            if not d.allowed:
                return forbidden("not allowed to publish to the notification topic", d.reason, d.rule)
    return None


def _page_params(req: ngsi.NgsiRequest) -> tuple[int, int, bool] | Deny:
    try:
        limit = int(req.param("limit") or 20)
        offset = int(req.param("offset") or 0)
    except ValueError:
        return Deny(400, "BadRequest", "Bad pagination limit or offset", "bad paging")
    if not 1 <= limit <= 1000 or offset < 0:
        return Deny(400, "BadRequest", "Bad pagination limit or offset", "bad paging")
    return limit, offset, "count" in (req.param("options") or "").split(",")


def _subscriptions(req: ngsi.NgsiRequest, action: Any, ctx: Context) -> Plan:
    ident = ctx.identity
    if ident.is_anonymous:
        return Deny(401, "Unauthorized", "authentication required", "anonymous subscription request")
    if isinstance(action, ngsi.CreateSubscription):
        deny = _check_subscription_body(action.body, ctx)
        if deny is not None:
            return deny
        return Forward("POST", req.path, req.query, _dump(req.body), action.body.entity_ids, None,
                       "subject entities readable", action.body.targets, "record_subscription",
                       unrestricted=action.body.patterns)
    if isinstance(action, ngsi.ListSubscriptions):
        page = _page_params(req)
        if isinstance(page, Deny):
            return page
        if ctx.is_admin:
            return Forward("GET", req.path, req.query, None, (), None, "admin listing")
        own = frozenset(ctx.ownership.subscriptions_of(ident.sub, ctx.tenant))
        if not own:
            return Answer(200, [], _count_header(req), "no own subscriptions")
        return Forward("GET", req.path, (), None, (), None, "own subscriptions", (), "filter_subscriptions",
                       own, page)
    assert isinstance(action, ngsi.SubscriptionOp)  # noqa: S101 (narrowing: the last kind left)
    owner = ctx.ownership.subscription_owner(action.subscription_id, ctx.tenant)
    if owner != ident.sub and not ctx.is_admin:
        # Someone else's and no subscription at all look the same from outside.
        return Deny(404, "NotFound", "The requested subscription has not been found. Check id",
                    "not the subscription's owner")
    if action.method == "PATCH":
        deny = _check_subscription_body(action.body, ctx)
        if deny is not None:
            return deny
        # A new subject is what later re-checks must follow (see subscription_guard).
        new_subject = bool(action.body.entity_ids) or action.body.patterns
        return Forward("PATCH", req.path, req.query, _dump(req.body), action.body.entity_ids, None,
                       "own subscription", action.body.targets, "update_subscription" if new_subject else None,
                       unrestricted=action.body.patterns)
    after: After | None = "forget_subscription" if action.method == "DELETE" else None
    return Forward(action.method, req.path, req.query, None, (), None, "own subscription", (), after)
