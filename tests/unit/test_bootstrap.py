"""``keygate keycloak bootstrap`` against a small fake of Keycloak's admin REST API.

No Keycloak runs here, so the fake implements the few endpoints bootstrap
calls (the master realm's token endpoint and the admin endpoints), behaving
as Keycloak does where it matters: it makes ``default-roles-<realm>`` and its
built-in client scopes with a new realm, generates client secrets and ids,
and answers 404 for what does not exist. The tests assert the requests made
and that a second run changes nothing.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy import keycloak_bootstrap as kb
from proxy.cli import main
from proxy.errors import CommandError

ROOT = Path(__file__).resolve().parents[2]
REALM = json.loads((ROOT / "keycloak-realm" / "iot-realm.json").read_text())
ADMIN_PASSWORD = "correct horse"
WRITES = ("POST", "PUT", "DELETE")


class FakeKeycloak:
    def __init__(self) -> None:
        self.realms: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.tokens: set[str] = set()
        self.url = ""  # set once it listens

    # -- state helpers

    def new_realm(self, settings: dict) -> dict:
        name = settings["realm"]
        r: dict[str, Any] = {
             "rep": {"id": name, **copy.deepcopy(settings)}, "roles": {}, "composites": {}, "scopes": {},
             "default_scopes": [], "optional_scopes": [], "scope_roles": {}, "clients": {}, "client_roles": {},
             "client_scopes": {}, "client_optional": {},
             "mappers": {}, "users": {}, "user_roles": {}, "secrets": {}}
        for role in ("offline_access", "uma_authorization", f"default-roles-{name}"):
            r["roles"][role] = {"id": str(uuid.uuid4()), "name": role, "description": ""}
        r["composites"][r["roles"][f"default-roles-{name}"]["id"]] = ["offline_access", "uma_authorization"]
        # Keycloak's built-in "roles" scope, whose realm-roles mapper is already right.
        sid = self.add_scope(r, {"name": "roles", "protocol": "openid-connect", "description": "built in",
                                 "attributes": {"include.in.token.scope": "false",
                                                "display.on.consent.screen": "true"}})
        builtin = next(s for s in REALM["clientScopes"] if s["name"] == "roles")["protocolMappers"][0]
        r["mappers"][sid].append({**copy.deepcopy(builtin), "id": str(uuid.uuid4())})
        r["default_scopes"].append(sid)
        self.realms[name] = r
        return r

    def add_scope(self, r: dict, rep: dict) -> str:
        sid = str(uuid.uuid4())
        r["scopes"][sid] = {**copy.deepcopy(rep), "id": sid}
        r["mappers"][sid] = []
        r["scope_roles"][sid] = []
        return sid

    def add_client(self, r: dict, rep: dict) -> str:
        cid = str(uuid.uuid4())
        rep = copy.deepcopy(rep)
        r["mappers"][cid] = [{**m, "id": str(uuid.uuid4())} for m in rep.pop("protocolMappers", [])]
        names = rep.pop("defaultClientScopes", ["roles"])
        by_name = {s["name"]: i for i, s in r["scopes"].items()}
        r["client_scopes"][cid] = [by_name[n] for n in names if n in by_name]
        r["client_optional"][cid] = [by_name[n] for n in rep.pop("optionalClientScopes", []) if n in by_name]
        r["clients"][cid] = {"attributes": {}, **rep, "id": cid}
        r["client_roles"][cid] = []
        if not rep.get("publicClient"):
            r["secrets"][cid] = uuid.uuid4().hex
        if rep.get("serviceAccountsEnabled"):
            user = str(uuid.uuid4())
            r["users"][cid] = {"id": user, "username": f"service-account-{rep['clientId']}"}
            r["user_roles"][user] = []
        return cid

    # -- HTTP

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append((request.method, path))
        if path == "/realms/master/protocol/openid-connect/token":
            form = await request.post()
            if form.get("client_id") != "admin-cli" or form.get("grant_type") != "password" \
                    or form.get("username") != "admin" or form.get("password") != ADMIN_PASSWORD:
                return web.json_response({"error": "invalid_grant"}, status=401)
            token = uuid.uuid4().hex
            self.tokens.add(token)
            return web.json_response({"access_token": token, "expires_in": 60, "token_type": "Bearer"})
        if request.headers.get("Authorization", "").removeprefix("Bearer ") not in self.tokens:
            return web.json_response({"error": "HTTP 401 Unauthorized"}, status=401)
        body: Any = await request.json() if request.can_read_body else None
        m = re.fullmatch(r"/admin/realms(?:/([^/]+)(/.*)?)?", path)
        if not m:
            return web.json_response({"error": "unknown"}, status=404)
        realm, rest = m.group(1), m.group(2) or ""
        if realm is None:
            if request.method == "POST":
                if body["realm"] in self.realms:
                    return web.json_response({"errorMessage": "Conflict detected"}, status=409)
                self.new_realm(body)
                return web.Response(status=201, headers={"Location": f"{request.url}/{body['realm']}"})
            return web.json_response([r["rep"] for r in self.realms.values()])
        r = self.realms.get(realm)
        if r is None:
            return web.json_response({"error": "Realm not found."}, status=404)
        return self.route(r, request.method, rest, body, str(request.url))

    def route(self, r: dict, method: str, rest: str, body, url: str) -> web.StreamResponse:
        ok = web.Response(status=204)
        nf = web.json_response({"error": "Could not find"}, status=404)

        def created(new_id: str) -> web.Response:
            return web.Response(status=201, headers={"Location": f"{url}/{new_id}"})

        if rest == "":
            if method == "GET":
                return web.json_response(r["rep"])
            r["rep"].update(body)
            return ok
        if rest == "/roles":
            if method == "GET":
                return web.json_response(list(r["roles"].values()))
            r["roles"][body["name"]] = {"description": "", **body, "id": str(uuid.uuid4())}
            return created(body["name"])
        if m := re.fullmatch(r"/roles/([^/]+)", rest):
            role = r["roles"].get(m.group(1))
            if role is None:
                return nf
            if method == "GET":
                return web.json_response(role)
            role.update(body)
            return ok
        if m := re.fullmatch(r"/roles-by-id/([^/]+)/composites(/realm)?", rest):
            members = r["composites"].setdefault(m.group(1), [])
            if method == "GET":
                return web.json_response([r["roles"][n] for n in members])
            members += [x["name"] for x in body]
            return ok
        if rest == "/client-scopes":
            if method == "GET":
                return web.json_response(list(r["scopes"].values()))
            return created(self.add_scope(r, body))
        if m := re.fullmatch(r"/client-scopes/([^/]+)(/.*)?", rest):
            sid, sub = m.group(1), m.group(2) or ""
            if sid not in r["scopes"]:
                return nf
            if sub == "":
                r["scopes"][sid].update(body)
                return ok
            if sub == "/protocol-mappers/models":
                if method == "GET":
                    return web.json_response(r["mappers"][sid])
                r["mappers"][sid].append({**body, "id": str(uuid.uuid4())})
                return web.Response(status=201)
            if mm := re.fullmatch(r"/protocol-mappers/models/([^/]+)", sub):
                for i, mapper in enumerate(r["mappers"][sid]):
                    if mapper["id"] == mm.group(1):
                        r["mappers"][sid][i] = {**body, "id": mapper["id"]}
                        return ok
                return nf
            if sub == "/scope-mappings/realm":
                if method == "GET":
                    return web.json_response([r["roles"][n] for n in r["scope_roles"][sid]])
                r["scope_roles"][sid] += [x["name"] for x in body]
                return ok
        for kind, key in (("default", "default_scopes"), ("optional", "optional_scopes")):
            if rest == f"/default-{kind}-client-scopes":
                return web.json_response([{"id": s, "name": r["scopes"][s]["name"]} for s in r[key]])
            if m := re.fullmatch(rf"/default-{kind}-client-scopes/([^/]+)", rest):
                r[key].append(m.group(1))
                return ok
        if rest == "/clients":
            if method == "GET":
                return web.json_response(list(r["clients"].values()))
            if any(c["clientId"] == body["clientId"] for c in r["clients"].values()):
                return web.json_response({"errorMessage": "exists"}, status=409)
            return created(self.add_client(r, body))
        if m := re.fullmatch(r"/clients/([^/]+)(/.*)?", rest):
            cid, sub = m.group(1), m.group(2) or ""
            if cid not in r["clients"]:
                return nf
            if sub == "":
                r["clients"][cid] = {**body, "id": cid}
                return ok
            if sub == "/protocol-mappers/models":
                if method == "GET":
                    return web.json_response(r["mappers"][cid])
                r["mappers"][cid].append({**body, "id": str(uuid.uuid4())})
                return web.Response(status=201)
            if mm := re.fullmatch(r"/protocol-mappers/models/([^/]+)", sub):
                for i, mapper in enumerate(r["mappers"][cid]):
                    if mapper["id"] == mm.group(1):
                        r["mappers"][cid][i] = {**body, "id": mapper["id"]}
                        return ok
                return nf
            for kind, key in (("default", "client_scopes"), ("optional", "client_optional")):
                if sub == f"/{kind}-client-scopes":
                    return web.json_response([{"id": s, "name": r["scopes"][s]["name"]} for s in r[key][cid]])
                if mm := re.fullmatch(rf"/{kind}-client-scopes/([^/]+)", sub):
                    r[key][cid].append(mm.group(1))
                    return ok
            if sub == "/roles":
                if method == "GET":
                    return web.json_response(r["client_roles"][cid])
                r["client_roles"][cid].append({**body, "id": str(uuid.uuid4())})
                return created(body["name"])
            if sub == "/service-account-user":
                return web.json_response(r["users"][cid]) if cid in r["users"] else nf
            if sub == "/client-secret":
                if method == "POST":
                    r["secrets"][cid] = uuid.uuid4().hex
                return web.json_response({"type": "secret", "value": r["secrets"][cid]})
        if m := re.fullmatch(r"/users/([^/]+)/role-mappings/realm", rest):
            roles = r["user_roles"].setdefault(m.group(1), [])
            if method == "GET":
                return web.json_response([r["roles"][n] for n in roles])
            roles += [x["name"] for x in body]
            return ok
        return web.json_response({"error": f"fake has no {method} {rest}"}, status=405)

    def writes(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.requests if m in WRITES and not p.startswith("/realms/")]


@pytest.fixture
async def keycloak():
    fake = FakeKeycloak()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = f"http://127.0.0.1:{server.port}"
    yield fake
    await server.close()


async def run_bootstrap(fake: FakeKeycloak, *, devices=(), rotate=False, password=ADMIN_PASSWORD,
                        realm=REALM) -> tuple[kb.Report, str]:
    from keycloak import KeycloakAdmin

    admin = KeycloakAdmin(server_url=fake.url + "/", username="admin", password=password,
                          realm_name=realm["realm"], user_realm_name="master")
    out = io.StringIO()
    try:
        report = await kb.bootstrap(admin, copy.deepcopy(realm), devices=list(devices),
                                    rotate_device_secrets=rotate, out=out)
    finally:
        await admin.connection.aclose()
    return report, out.getvalue()


async def test_first_run_creates_everything_from_the_export(keycloak):
    report, _ = await run_bootstrap(keycloak)
    r = keycloak.realms["iot"]
    assert ("POST", "/admin/realms") in keycloak.requests
    assert r["rep"]["accessTokenLifespan"] == REALM["accessTokenLifespan"]
    assert {"iot-user", "iot-admin", "device"} <= set(r["roles"])
    default_id = r["roles"]["default-roles-iot"]["id"]
    assert "iot-user" in r["composites"][default_id]
    clients = {c["clientId"]: c for c in r["clients"].values()}
    assert clients["iot-portal"]["directAccessGrantsEnabled"] is False
    assert clients["iot-portal"]["attributes"]["pkce.code.challenge.method"] == "S256"
    assert clients["iot-proxy"]["serviceAccountsEnabled"] is True
    portal_mappers = r["mappers"][clients["iot-portal"]["id"]]
    assert [m["config"]["included.client.audience"] for m in portal_mappers] == ["iot-proxy"]
    scopes = {s["name"]: sid for sid, s in r["scopes"].items()}
    assert set(scopes) == {s["name"] for s in REALM["clientScopes"]}
    assert r["scope_roles"][scopes["device"]] == ["device"]
    assert r["scope_roles"][scopes["offline_access"]] == ["offline_access"]
    assert [r["scopes"][s]["name"] for s in r["optional_scopes"]] == ["offline_access"]
    assert [r["scopes"][s]["name"] for s in r["client_optional"][clients["iot-portal"]["id"]]] == ["offline_access"]
    assert [x["name"] for x in r["client_roles"][clients["iot-proxy"]["id"]]] == ["operator"]
    # The built-in roles scope already had the right realm-roles mapper: not duplicated.
    assert [m["name"] for m in r["mappers"][scopes["roles"]]].count("realm roles") == 1
    assert report.created and "realm iot" in report.created


async def test_second_run_changes_nothing(keycloak):
    await run_bootstrap(keycloak)
    before = copy.deepcopy(keycloak.realms)
    keycloak.requests.clear()
    report, _ = await run_bootstrap(keycloak)
    assert keycloak.writes() == []
    assert report.created == [] and report.updated == []
    assert report.unchanged > 10
    assert keycloak.realms == before


async def test_drift_is_updated_in_place_not_recreated(keycloak):
    # An operator (or attacker) turned on the password grant and lengthened tokens.
    await run_bootstrap(keycloak)
    r = keycloak.realms["iot"]
    portal = next(c for c in r["clients"].values() if c["clientId"] == "iot-portal")
    portal["directAccessGrantsEnabled"] = True
    portal["attributes"]["extra.setting"] = "kept"
    r["rep"]["accessTokenLifespan"] = 86400
    aud = r["mappers"][portal["id"]][0]
    aud["config"]["included.client.audience"] = "someone-else"
    keycloak.requests.clear()

    report, out = await run_bootstrap(keycloak)

    writes = keycloak.writes()
    assert ("PUT", "/admin/realms/iot") in writes
    assert ("PUT", f"/admin/realms/iot/clients/{portal['id']}") in writes
    assert ("PUT", f"/admin/realms/iot/clients/{portal['id']}/protocol-mappers/models/{aud['id']}") in writes
    assert not [w for w in writes if w[0] == "POST"]
    portal = r["clients"][portal["id"]]
    assert portal["directAccessGrantsEnabled"] is False
    assert portal["attributes"]["extra.setting"] == "kept"
    assert r["rep"]["accessTokenLifespan"] == REALM["accessTokenLifespan"]
    assert r["mappers"][portal["id"]][0]["config"]["included.client.audience"] == "iot-proxy"
    assert "updated client iot-portal" in out
    assert report.created == []


async def test_device_client_made_once_with_secret_shown_once(keycloak):
    report, out = await run_bootstrap(keycloak, devices=["thermo-1"])
    r = keycloak.realms["iot"]
    client = next(c for c in r["clients"].values() if c["clientId"] == "thermo-1")
    assert client["publicClient"] is False and client["serviceAccountsEnabled"] is True
    assert client["standardFlowEnabled"] is False and client["directAccessGrantsEnabled"] is False
    assert client["fullScopeAllowed"] is False
    secret = r["secrets"][client["id"]]
    assert report.secrets == {"thermo-1": secret}
    assert out.count(secret) == 1
    scope_names = {r["scopes"][s]["name"] for s in r["client_scopes"][client["id"]]}
    assert "device" in scope_names
    user = r["users"][client["id"]]["id"]
    assert r["user_roles"][user] == ["device"]

    keycloak.requests.clear()
    report, out = await run_bootstrap(keycloak, devices=["thermo-1"])
    assert keycloak.writes() == []
    assert secret not in out and "not shown again" in out
    assert report.secrets == {}


async def test_rotating_a_device_secret(keycloak):
    await run_bootstrap(keycloak, devices=["thermo-1"])
    r = keycloak.realms["iot"]
    cid = next(c["id"] for c in r["clients"].values() if c["clientId"] == "thermo-1")
    old = r["secrets"][cid]
    report, _out = await run_bootstrap(keycloak, devices=["thermo-1"], rotate=True)
    assert r["secrets"][cid] != old
    assert report.secrets == {"thermo-1": r["secrets"][cid]}
    assert ("POST", f"/admin/realms/iot/clients/{cid}/client-secret") in keycloak.requests


async def test_wrong_admin_password_is_one_line(keycloak):
    from keycloak.exceptions import KeycloakAuthenticationError

    with pytest.raises(KeycloakAuthenticationError) as info:
        await run_bootstrap(keycloak, password="wrong")
    assert kb.describe_failure(info.value, keycloak.url).startswith("Keycloak refused the admin login")
    assert keycloak.realms == {}


# --------------------------------------------------------------------------- command line


def test_cli_runs_against_the_fake(keycloak_thread, tmp_path, capsys):
    pw = tmp_path / "pw"
    pw.write_text(ADMIN_PASSWORD + "\n")
    argv = ["keycloak", "bootstrap", "--server-url", keycloak_thread.url, "--admin-password-file", str(pw),
            "--realm-file", str(ROOT / "keycloak-realm" / "iot-realm.json"), "--device-client", "d-1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "created realm iot" in out and "device client d-1 secret (shown once):" in out
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "realm iot: 0 created, 0 updated" in out


def test_cli_unreachable_keycloak_is_one_line(tmp_path, capsys, monkeypatch):
    from tests.rig.ports import free_port

    monkeypatch.setenv("KEYCLOAK_ADMIN_PASSWORD", "x")
    code = main(["keycloak", "bootstrap", "--server-url", f"http://127.0.0.1:{free_port()}",
                 "--realm-file", str(ROOT / "keycloak-realm" / "iot-realm.json"), "--timeout", "3"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("keygate: cannot reach Keycloak at http://127.0.0.1:") and err.count("\n") == 1


@pytest.mark.parametrize("content, message", [
    ('{"realm": "iot",\n  oops}', ":2: invalid JSON"),
    ('[1, 2]', "not a realm export"),
])
def test_bad_realm_file_names_file_and_line(tmp_path, content, message):
    f = tmp_path / "realm.json"
    f.write_text(content)
    with pytest.raises(CommandError, match=re.escape(message)):
        kb.load_realm_file(str(f))


def test_missing_password_and_bad_device_id(monkeypatch, tmp_path):
    monkeypatch.delenv("KEYCLOAK_ADMIN_PASSWORD", raising=False)
    with pytest.raises(CommandError, match="no admin password"):
        kb.admin_password(None)
    with pytest.raises(CommandError, match="cannot read"):
        kb.admin_password(str(tmp_path / "absent"))
    for bad in ("", "a b", "../x", "x" * 129):
        with pytest.raises(CommandError, match="--device-client"):
            kb.check_device_id(bad)


def test_server_url_required(monkeypatch):
    monkeypatch.delenv("KEYCLOAK_URL", raising=False)
    args = argparse.Namespace(server_url="", admin_password_file=None)
    with pytest.raises(CommandError, match="--server-url"):
        kb.run(args)


@pytest.fixture
def keycloak_thread():
    """The fake in a thread of its own, for the synchronous CLI (which runs its own loop)."""
    import asyncio
    import threading

    fake = FakeKeycloak()
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def serve():
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        fake.runner = runner
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    thread.start()
    started.wait(10)
    yield fake
    asyncio.run_coroutine_threadsafe(fake.runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
