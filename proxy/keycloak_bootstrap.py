"""``keygate keycloak bootstrap``: make a running Keycloak match the shipped realm export.

Idempotent and additive: each piece of the export (realm settings, realm
roles, default roles, client scopes and their mappers, clients and their
mappers, default scopes, client roles) is read first, created when missing,
updated when it differs, and left alone when it matches. Nothing that exists
only in Keycloak is deleted, so running it against a realm an operator has
extended is safe. A second run reports no change.

``--device-client ID`` creates a confidential client for a device that
authenticates with client_credentials instead of K1/K2; its secret is printed
once, when it is made.

Admin calls go through python-keycloak's ``KeycloakAdmin`` (its async ``a_*``
methods); it is never used for validating tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from proxy.errors import CommandError

DEFAULT_REALM_FILE = "keycloak-realm/iot-realm.json"
# Parts of a realm representation that have their own admin endpoints.
NESTED_REALM_KEYS = frozenset({
    "roles", "clients", "clientScopes", "groups", "users", "scopeMappings", "clientScopeMappings",
    "defaultRole", "defaultDefaultClientScopes", "defaultOptionalClientScopes", "identityProviders",
    "identityProviderMappers", "components", "authenticationFlows", "authenticatorConfig",
    "requiredActions", "id",
})
NESTED_CLIENT_KEYS = frozenset({"protocolMappers", "defaultClientScopes", "optionalClientScopes", "secret", "id"})
DEVICE_TOKEN_LIFESPAN_SECONDS = 3600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keycloak_command", metavar="SUBCOMMAND", required=True)
    b = sub.add_parser("bootstrap", help="create or update the realm (and device clients) in a running Keycloak",
                       description="Create or update the realm from its export, idempotently.")
    b.add_argument("--server-url", default=os.environ.get("KEYCLOAK_URL", ""),
                   help="Keycloak base URL, e.g. http://localhost:8080 (env KEYCLOAK_URL)")
    b.add_argument("--admin-user", default=os.environ.get("KEYCLOAK_ADMIN", "admin"),
                   help="admin user of the admin realm (default: admin, env KEYCLOAK_ADMIN)")
    b.add_argument("--admin-password-file", metavar="FILE",
                   help="file holding the admin password (default: env KEYCLOAK_ADMIN_PASSWORD)")
    b.add_argument("--admin-realm", default="master", help="realm the admin user belongs to (default: master)")
    b.add_argument("--realm-file", default=DEFAULT_REALM_FILE,
                   help=f"realm export to apply (default: {DEFAULT_REALM_FILE})")
    b.add_argument("--device-client", action="append", default=[], metavar="DEVICE_ID",
                   help="create a confidential client_credentials client for this device (repeatable)")
    b.add_argument("--rotate-device-secret", action="store_true",
                   help="for an existing --device-client, generate and print a new secret")
    b.add_argument("--ca-file", help="CA bundle to verify Keycloak's TLS certificate")
    b.add_argument("--timeout", type=int, default=20, help="seconds per admin request (default: 20)")


def run(args: argparse.Namespace) -> int:
    if not args.server_url:
        raise CommandError("--server-url is required (or set KEYCLOAK_URL)")
    password = admin_password(args.admin_password_file)
    realm = load_realm_file(args.realm_file)
    for device in args.device_client:
        check_device_id(device)
    return asyncio.run(_run(args, password, realm))


async def _run(args: argparse.Namespace, password: str, realm: dict[str, Any]) -> int:
    from keycloak import KeycloakAdmin

    admin = KeycloakAdmin(server_url=args.server_url.rstrip("/") + "/", username=args.admin_user,
                          password=password, realm_name=realm["realm"], user_realm_name=args.admin_realm,
                          verify=args.ca_file or True, timeout=args.timeout)
    try:
        report = await bootstrap(admin, realm, devices=args.device_client,
                                 rotate_device_secrets=args.rotate_device_secret)
    except CommandError:
        raise
    except Exception as exc:
        raise CommandError(describe_failure(exc, args.server_url)) from None
    finally:
        await admin.connection.aclose()
    print(report.summary(realm["realm"]))
    return 0


# --------------------------------------------------------------------------- inputs


def admin_password(path: str | None) -> str:
    if path:
        try:
            value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise CommandError(f"{path}: cannot read the admin password: {exc.strerror}") from None
        if not value:
            raise CommandError(f"{path}: the admin password file is empty")
        return value
    value = os.environ.get("KEYCLOAK_ADMIN_PASSWORD", "")
    if not value:
        raise CommandError("no admin password: pass --admin-password-file FILE or set KEYCLOAK_ADMIN_PASSWORD")
    return value


def load_realm_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"{path}: cannot read the realm export: {exc.strerror}") from None
    try:
        realm = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(realm, dict) or not isinstance(realm.get("realm"), str) or not realm["realm"]:
        raise CommandError(f"{path}: not a realm export (no \"realm\" name)")
    return realm


def check_device_id(device: str) -> None:
    # Same alphabet the ownership store accepts for device ids; also a safe client id.
    if not device or len(device) > 128 or not all(c.isalnum() or c in "-_.:" for c in device):
        raise CommandError(f"--device-client {device!r}: use letters, digits and - _ . : (at most 128)")


def describe_failure(exc: Exception, url: str) -> str:
    from keycloak.exceptions import KeycloakAuthenticationError, KeycloakConnectionError, KeycloakError

    if isinstance(exc, KeycloakAuthenticationError):
        return "Keycloak refused the admin login (check --admin-user, the password and --admin-realm)"
    if isinstance(exc, (KeycloakConnectionError, OSError)) or type(exc).__module__.startswith("httpx"):
        return f"cannot reach Keycloak at {url}: {exc}"
    if isinstance(exc, KeycloakError):
        raw = exc.response_body
        body = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else exc.error_message
        return f"Keycloak answered {exc.response_code}: {str(body)[:200]}"
    return f"bootstrap failed: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- reconciling


@dataclass
class Report:
    out: TextIO = field(default_factory=lambda: sys.stdout)
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    secrets: dict[str, str] = field(default_factory=dict)

    def create(self, what: str) -> None:
        self.created.append(what)
        print(f"created {what}", file=self.out)

    def update(self, what: str) -> None:
        self.updated.append(what)
        print(f"updated {what}", file=self.out)

    def same(self) -> None:
        self.unchanged += 1

    def summary(self, realm: str) -> str:
        return (f"realm {realm}: {len(self.created)} created, {len(self.updated)} updated, "
                f"{self.unchanged} unchanged")


def differs(desired: Any, existing: Any) -> bool:
    """Whether ``existing`` lacks something ``desired`` sets (extra keys in Keycloak's copy are fine)."""
    if isinstance(desired, dict):
        if not isinstance(existing, dict):
            return True
        return any(differs(v, existing.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(existing, list):
            return True
        if all(isinstance(x, str) for x in desired):
            return bool(sorted(desired) != sorted(existing))
        return bool(desired != existing)
    return bool(desired != existing)


async def bootstrap(admin: Any, realm: dict[str, Any], *, devices: Sequence[str] = (),
                    rotate_device_secrets: bool = False, out: TextIO | None = None) -> Report:
    report = Report(out=out or sys.stdout)
    name = realm["realm"]
    await ensure_realm(admin, realm, report)
    admin.connection.realm_name = name
    await ensure_realm_roles(admin, realm, report)
    scope_ids = await ensure_client_scopes(admin, realm, report)
    await ensure_default_scopes(admin, realm, scope_ids, report)
    await ensure_scope_mappings(admin, realm, scope_ids, report)
    for client in realm.get("clients", []):
        await ensure_client(admin, client, scope_ids, report)
    await ensure_client_roles(admin, realm, report)
    for device in devices:
        await ensure_device_client(admin, device, scope_ids, report, rotate=rotate_device_secrets)
    return report


async def ensure_realm(admin: Any, realm: dict[str, Any], report: Report) -> None:
    from keycloak.exceptions import KeycloakGetError

    settings = {k: v for k, v in realm.items() if k not in NESTED_REALM_KEYS}
    try:
        existing = await admin.a_get_realm(realm["realm"])
    except KeycloakGetError as exc:
        if exc.response_code != 404:
            raise
        await admin.a_create_realm(settings)
        report.create(f"realm {realm['realm']}")
        return
    if differs(settings, existing):
        await admin.a_update_realm(realm["realm"], settings)
        report.update(f"realm {realm['realm']} settings")
    else:
        report.same()


async def ensure_realm_roles(admin: Any, realm: dict[str, Any], report: Report) -> None:
    from keycloak.exceptions import KeycloakGetError

    default_name = (realm.get("defaultRole") or {}).get("name", f"default-roles-{realm['realm']}")
    default_composites: list[str] = []
    for role in realm.get("roles", {}).get("realm", []):
        if role["name"] == default_name:
            # Keycloak makes this role with the realm; only its members are ours to add.
            default_composites = role.get("composites", {}).get("realm", [])
            continue
        wanted = {k: role[k] for k in ("name", "description") if k in role}
        try:
            existing = await admin.a_get_realm_role(role["name"])
        except KeycloakGetError as exc:
            if exc.response_code != 404:
                raise
            await admin.a_create_realm_role(wanted)
            report.create(f"realm role {role['name']}")
            continue
        if differs(wanted, existing):
            await admin.a_update_realm_role(role["name"], wanted)
            report.update(f"realm role {role['name']}")
        else:
            report.same()
    if default_composites:
        current = {r["name"] for r in await admin.a_get_realm_default_roles()}
        missing = [n for n in default_composites if n not in current]
        if missing:
            reps = [await admin.a_get_realm_role(n) for n in missing]
            await admin.a_add_realm_default_roles([{"id": r["id"], "name": r["name"]} for r in reps])
            report.update(f"default roles (+{', '.join(missing)})")
        else:
            report.same()


async def ensure_mappers(desired: list[dict[str, Any]], existing: list[dict[str, Any]], what: str,
                         add: Callable[[dict[str, Any]], Awaitable[None]],
                         update: Callable[[str, dict[str, Any]], Awaitable[None]], report: Report) -> None:
    by_name = {m["name"]: m for m in existing}
    for mapper in desired:
        have = by_name.get(mapper["name"])
        if have is None:
            await add(mapper)
            report.create(f"mapper {mapper['name']!r} on {what}")
        elif differs(mapper, have):
            await update(have["id"], {**have, **mapper, "config": {**have.get("config", {}), **mapper["config"]}})
            report.update(f"mapper {mapper['name']!r} on {what}")
        else:
            report.same()


async def ensure_client_scopes(admin: Any, realm: dict[str, Any], report: Report) -> dict[str, str]:
    existing = {s["name"]: s for s in await admin.a_get_client_scopes()}
    for scope in realm.get("clientScopes", []):
        settings = {k: v for k, v in scope.items() if k not in ("protocolMappers", "id")}
        have = existing.get(scope["name"])
        if have is None:
            scope_id = await admin.a_create_client_scope(settings)
            existing[scope["name"]] = {**settings, "id": scope_id}
            report.create(f"client scope {scope['name']}")
            mappers: list[dict[str, Any]] = []
        else:
            scope_id = have["id"]
            if differs(settings, have):
                await admin.a_update_client_scope(scope_id, {**have, **settings})
                report.update(f"client scope {scope['name']}")
            else:
                report.same()
            mappers = await admin.a_get_mappers_from_client_scope(scope_id)

        async def add(m: dict[str, Any], sid: str = scope_id) -> None:
            await admin.a_add_mapper_to_client_scope(sid, m)

        async def update(mid: str, m: dict[str, Any], sid: str = scope_id) -> None:
            await admin.a_update_mapper_in_client_scope(sid, mid, m)

        await ensure_mappers(scope.get("protocolMappers", []), mappers, f"client scope {scope['name']}",
                             add, update, report)
    return {name: s["id"] for name, s in existing.items()}


async def ensure_default_scopes(admin: Any, realm: dict[str, Any], scope_ids: dict[str, str],
                                report: Report) -> None:
    """The scopes every new client gets, as defaults and as optional scopes."""
    for key, get, add, what in (
            ("defaultDefaultClientScopes", admin.a_get_default_default_client_scopes,
             admin.a_add_default_default_client_scope, "realm default client scopes"),
            ("defaultOptionalClientScopes", admin.a_get_default_optional_client_scopes,
             admin.a_add_default_optional_client_scope, "realm optional client scopes")):
        current = {s["name"] for s in await get()}
        missing = [n for n in realm.get(key, []) if n not in current]
        for name in missing:
            await add(scope_ids[name])
            report.update(f"{what} (+{name})")
        if not missing:
            report.same()


async def ensure_scope_mappings(admin: Any, realm: dict[str, Any], scope_ids: dict[str, str],
                                report: Report) -> None:
    """Realm roles a client scope carries (e.g. ``device`` for the device scope).

    python-keycloak's ``*_client_scope`` role helpers address a client's scope,
    not a client scope's, so these two calls go through its connection.
    """
    from keycloak.exceptions import KeycloakGetError, KeycloakPostError, raise_error_from_response

    conn = admin.connection
    for mapping in realm.get("scopeMappings", []):
        scope = mapping.get("clientScope")
        if not scope:
            continue
        path = f"admin/realms/{realm['realm']}/client-scopes/{scope_ids[scope]}/scope-mappings/realm"
        answer = await conn.a_raw_get(path)
        current = raise_error_from_response(answer, KeycloakGetError)  # a list of roles (JSON)
        have = {r["name"] for r in current} if isinstance(current, list) else set()
        missing = [r for r in mapping.get("roles", []) if r not in have]
        if not missing:
            report.same()
            continue
        reps = [await admin.a_get_realm_role(r) for r in missing]
        payload = json.dumps([{"id": r["id"], "name": r["name"]} for r in reps])
        raise_error_from_response(await conn.a_raw_post(path, data=payload), KeycloakPostError,
                                  expected_codes=[204])
        report.update(f"client scope {scope} roles (+{', '.join(missing)})")


async def find_client(admin: Any, client_id: str) -> dict[str, Any] | None:
    for c in await admin.a_get_clients():
        if c.get("clientId") == client_id:
            found: dict[str, Any] = c
            return found
    return None


async def ensure_client(admin: Any, client: dict[str, Any], scope_ids: dict[str, str], report: Report) -> str:
    settings = {k: v for k, v in client.items() if k not in NESTED_CLIENT_KEYS}
    have = await find_client(admin, client["clientId"])
    what = f"client {client['clientId']}"
    if have is None:
        uuid: str = await admin.a_create_client(settings)
        report.create(what)
        mappers: list[dict[str, Any]] = []
    else:
        uuid = have["id"]
        if differs(settings, have):
            merged = {**have, **settings,
                      "attributes": {**have.get("attributes", {}), **settings.get("attributes", {})}}
            await admin.a_update_client(uuid, merged)
            report.update(what)
        else:
            report.same()
        mappers = await admin.a_get_mappers_from_client(uuid)

    async def add(m: dict[str, Any]) -> None:
        await admin.a_add_mapper_to_client(uuid, m)

    async def update(mid: str, m: dict[str, Any]) -> None:
        await admin.a_update_client_mapper(uuid, mid, m)

    await ensure_mappers(client.get("protocolMappers", []), mappers, what, add, update, report)
    for key, get, add_scope, kind in (
            ("defaultClientScopes", admin.a_get_client_default_client_scopes,
             admin.a_add_client_default_client_scope, "default"),
            ("optionalClientScopes", admin.a_get_client_optional_client_scopes,
             admin.a_add_client_optional_client_scope, "optional")):
        if not client.get(key):
            continue
        current = {s["name"] for s in await get(uuid)}
        for name in client[key]:
            if name not in current:
                await add_scope(uuid, scope_ids[name], {})
                report.update(f"{what} {kind} scopes (+{name})")
    return uuid


async def ensure_client_roles(admin: Any, realm: dict[str, Any], report: Report) -> None:
    for client_id, roles in realm.get("roles", {}).get("client", {}).items():
        client = await find_client(admin, client_id)
        if client is None:
            raise CommandError(f"the realm export has roles for client {client_id} but no such client")
        have = {r["name"] for r in await admin.a_get_client_roles(client["id"])}
        for role in roles:
            if role["name"] in have:
                report.same()
                continue
            await admin.a_create_client_role(client["id"], {k: role[k] for k in ("name", "description") if k in role})
            report.create(f"client role {client_id}:{role['name']}")


def device_client(device_id: str) -> dict[str, Any]:
    """A confidential client whose service account is the device (client_credentials only)."""
    return {
        "clientId": device_id,
        "name": f"device {device_id}",
        "description": "Device service account (client_credentials); made by keygate keycloak bootstrap",
        "enabled": True,
        "publicClient": False,
        "clientAuthenticatorType": "client-secret",
        "protocol": "openid-connect",
        "standardFlowEnabled": False,
        "implicitFlowEnabled": False,
        "directAccessGrantsEnabled": False,
        "serviceAccountsEnabled": True,
        # Only the roles the device scope maps (the realm role "device") reach its tokens.
        "fullScopeAllowed": False,
        "attributes": {
            "access.token.lifespan": str(DEVICE_TOKEN_LIFESPAN_SECONDS),
            "client_credentials.use_refresh_token": "false",
        },
        "defaultClientScopes": ["basic", "roles", "device"],
    }


async def ensure_device_client(admin: Any, device_id: str, scope_ids: dict[str, str], report: Report, *,
                               rotate: bool = False) -> None:
    existed = await find_client(admin, device_id) is not None
    uuid = await ensure_client(admin, device_client(device_id), scope_ids, report)
    user = await admin.a_get_client_service_account_user(uuid)
    roles = {r["name"] for r in await admin.a_get_realm_roles_of_user(user["id"])}
    if "device" not in roles:
        role = await admin.a_get_realm_role("device")
        await admin.a_assign_realm_roles(user["id"], [{"id": role["id"], "name": role["name"]}])
        report.update(f"device client {device_id} service account (+role device)")
    if existed and not rotate:
        print(f"device client {device_id} exists; its secret is not shown again "
              "(--rotate-device-secret makes a new one)", file=report.out)
        return
    secret = (await admin.a_generate_client_secrets(uuid) if existed else await admin.a_get_client_secrets(uuid))
    report.secrets[device_id] = secret["value"]
    print(f"device client {device_id} secret (shown once): {secret['value']}", file=report.out)
