"""A real OpenID Connect provider for integration tests (npm ``oidc-provider``).

Fixture ``oidc`` (session scope) starts ``node tests/oidc/server.mjs`` on a free
127.0.0.1 port with realm ``iot``, Keycloak's endpoint paths and Keycloak-shaped
JWT access tokens. Test users (password grant, client ``iot-portal``):

========  ==========  ==============================
user      realm role  notes
========  ==========  ==============================
alice     iot-user    client role iot-proxy:reader
bob       iot-user
carol     iot-user
admin     iot-admin
========  ==========  ==============================

Confidential clients: ``iot-proxy`` (the gateway itself: introspection) and
``iot-backend`` (a service account with realm role ``iot-service``).

Use::

    token = oidc.password_token("alice")          # sync, urllib
    token = oidc.client_token("iot-backend")      # client_credentials
    oidc.revoke(token)                            # introspection now says active: false
    oidc.restart_with_rotated_key()               # same port/issuer, keys [new, old]
    cfg = oidc.oidc_config(introspection=True)    # proxy.config.OidcConfig for it

The provider's log is attached to the report of every failing test that used
the fixture.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from proxy.config import IntrospectionConfig, OidcConfig

OIDC_DIR = Path(__file__).resolve().parents[1] / "oidc"
REALM = "iot"
AUDIENCE = "iot-proxy"
PUBLIC_CLIENT = "iot-portal"
PROXY_CLIENT = "iot-proxy"
PROXY_SECRET = "iot-proxy-test-secret"
BACKEND_CLIENT = "iot-backend"
BACKEND_SECRET = "iot-backend-test-secret"

USERS: dict[str, dict[str, Any]] = {
    "alice": {"roles": ["iot-user"], "client_roles": {"iot-proxy": ["reader"]}, "groups": ["/users"]},
    "bob": {"roles": ["iot-user"], "groups": ["/users"]},
    "carol": {"roles": ["iot-user"], "groups": ["/users"]},
    "admin": {"roles": ["iot-admin"], "groups": ["/admins"]},
}


def user_sub(username: str) -> str:
    """The stable ``sub`` of a test user (a UUID, as Keycloak's)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"keygate-test/{REALM}/{username}"))


def password_of(username: str) -> str:
    return f"{username}-password"


def new_signing_key() -> dict[str, Any]:
    """A private RSA JWK (kid, alg RS256, use sig) for the provider's keys file."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key))
    jwk.pop("key_ops", None)  # use: sig says it; both together confuse the provider's keystore
    return {**jwk, "kid": f"rsa-{uuid.uuid4().hex[:12]}", "alg": "RS256", "use": "sig"}


class OidcProviderError(RuntimeError):
    pass


class OidcProvider:
    """One running provider process; restartable with rotated keys on the same port."""

    def __init__(self, workdir: Path, *, rfc9068: bool = False, portal_url: str = "", port: int = 0,
                 access_token_ttl: int = 300):
        """``rfc9068``: user tokens keep the client_id claim (RFC 9068) instead of dropping it as
        Keycloak does. ``portal_url`` (the portal's base URL, e.g. ``http://127.0.0.1:PORT/portal/``):
        ``iot-portal`` also does the authorization code flow, back to ``PORTAL_URL``callback."""
        self.portal_url = portal_url
        self.access_token_ttl = access_token_ttl
        self.workdir = workdir
        self.rfc9068 = rfc9068
        self.realm = REALM
        self.audience = AUDIENCE
        self.log_path = workdir / "oidc-provider.log"
        self.keys_path = workdir / "keys.json"
        self.config_path = workdir / "config.json"
        self.port = port
        self.issuer = ""
        self.keys: list[dict[str, Any]] = [new_signing_key()]
        self.restarts = 0
        self._proc: subprocess.Popen | None = None

    # -- addresses
    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/certs"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/token"

    @property
    def introspection_endpoint(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/token/introspect"

    @property
    def revocation_endpoint(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/revoke"

    @property
    def signing_kid(self) -> str:
        return self.keys[0]["kid"]

    def user_sub(self, username: str) -> str:
        return user_sub(username)

    # -- configuration for the gateway
    def oidc_config(self, *, introspection: bool = False, always: bool = False,
                    introspection_cache_seconds: float = 10.0, **overrides: Any) -> OidcConfig:
        """An :class:`OidcConfig` pointing at this provider (audience ``iot-proxy``)."""
        intro = IntrospectionConfig(enabled=introspection, client_id=PROXY_CLIENT, client_secret=PROXY_SECRET,
                                    always=always, cache_seconds=introspection_cache_seconds)
        base = OidcConfig(issuer=self.issuer, audience=self.audience,
                          roles=("realm_access.roles", "resource_access.iot-proxy.roles"), introspection=intro)
        return dataclasses.replace(base, **overrides)

    def config_yaml(self) -> str:
        """The ``oidc:`` section of a proxy.yaml for this provider (secret from the environment)."""
        return (f"oidc:\n  issuer: {self.issuer}\n  audience: {self.audience}\n"
                f"  roles: [realm_access.roles, resource_access.iot-proxy.roles]\n"
                f"  introspection:\n    enabled: false\n    client_id: {PROXY_CLIENT}\n"
                f"    client_secret: ${{KEYGATE_OIDC_CLIENT_SECRET:-{PROXY_SECRET}}}\n")

    # -- process
    def _write_config(self) -> None:
        self.keys_path.write_text(json.dumps({"keys": self.keys}))
        self.keys_path.chmod(0o600)
        users = [{"username": name, "password": password_of(name), "sub": user_sub(name), **spec}
                 for name, spec in USERS.items()]
        portal: dict[str, Any] = {"client_id": PUBLIC_CLIENT}
        if self.portal_url:
            portal.update(redirect_uris=[f"{self.portal_url}callback"], post_logout_redirect_uris=[self.portal_url])
        clients = [
            portal,
            {"client_id": PROXY_CLIENT, "secret": PROXY_SECRET},
            {"client_id": BACKEND_CLIENT, "secret": BACKEND_SECRET, "service_roles": ["iot-service"]},
        ]
        self.config_path.write_text(json.dumps({
            "port": self.port, "realm": self.realm, "audience": self.audience,
            "keys_file": str(self.keys_path), "users": users, "clients": clients, "rfc9068": self.rfc9068,
            "access_token_ttl": self.access_token_ttl,
        }))

    def start(self, timeout: float = 20.0) -> None:
        node = shutil.which("node")
        if node is None:
            raise OidcProviderError("node is not installed (scripts/setup --test installs it)")
        if not (OIDC_DIR / "node_modules" / "oidc-provider").is_dir():
            subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=OIDC_DIR,
                           check=True, stdout=subprocess.DEVNULL)
        self._write_config()
        log = open(self.log_path, "ab")
        log.write(f"--- start #{self.restarts} keys={[k['kid'] for k in self.keys]}\n".encode())
        log.flush()
        offset = log.tell()
        # stdin is a pipe only we hold: if this process dies, the provider sees EOF and exits.
        self._proc = subprocess.Popen([node, str(OIDC_DIR / "server.mjs"), str(self.config_path)], cwd=OIDC_DIR,
                                      stdout=log, stderr=log, stdin=subprocess.PIPE,
                                      env={**os.environ, "KEYGATE_OIDC_EXIT_WITH_STDIN": "1"})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                for line in f.read().decode(errors="replace").splitlines():
                    if line.startswith("READY "):
                        ready = json.loads(line[6:])
                        self.port, self.issuer = ready["port"], ready["issuer"]
                        return
            if self._proc.poll() is not None:
                raise OidcProviderError(f"oidc provider exited with {self._proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.stop()
        raise OidcProviderError(f"oidc provider not ready after {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdin is not None:
            proc.stdin.close()

    def restart_with_rotated_key(self) -> str:
        """Restarts on the same port with keys ``[new, old]``; returns the new signing kid."""
        self.stop()
        self.keys = [new_signing_key(), self.keys[0]]
        self.restarts += 1
        self.start()
        return self.signing_kid

    def log(self, tail: int = 200) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-tail:])

    # -- HTTP
    def _post(self, url: str, form: dict[str, str], auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
        data = urllib.parse.urlencode(form).encode()
        req = urllib.request.Request(url, data=data, method="POST",
                                     headers={"content-type": "application/x-www-form-urlencoded"})
        if auth is not None:
            cred = ":".join(urllib.parse.quote(p, safe="") for p in auth)
            req.add_header("authorization", "Basic " + base64.b64encode(cred.encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def token_response(self, username: str, *, password: str | None = None, client_id: str = PUBLIC_CLIENT,
                       scope: str | None = None, ttl: int | None = None) -> dict[str, Any]:
        form = {"grant_type": "password", "username": username,
                "password": password if password is not None else password_of(username)}
        if scope:
            form["scope"] = scope
        if ttl:
            form["ttl"] = str(ttl)
        secret = {PROXY_CLIENT: PROXY_SECRET, BACKEND_CLIENT: BACKEND_SECRET}.get(client_id)
        if secret is None:
            form["client_id"] = client_id
        status, body = self._post(self.token_endpoint, form, (client_id, secret) if secret else None)
        if status != 200:
            raise OidcProviderError(f"password grant for {username}: HTTP {status} {body[:300]!r}")
        return json.loads(body)

    def password_token(self, username: str, **kw: Any) -> str:
        """An access token for a test user (password grant)."""
        return self.token_response(username, **kw)["access_token"]

    def client_token(self, client_id: str = BACKEND_CLIENT, secret: str | None = None) -> str:
        """A service-account access token (client_credentials)."""
        secret = secret or {PROXY_CLIENT: PROXY_SECRET, BACKEND_CLIENT: BACKEND_SECRET}[client_id]
        status, body = self._post(self.token_endpoint, {"grant_type": "client_credentials"}, (client_id, secret))
        if status != 200:
            raise OidcProviderError(f"client_credentials for {client_id}: HTTP {status} {body[:300]!r}")
        return json.loads(body)["access_token"]

    def revoke(self, token: str) -> None:
        status, body = self._post(self.revocation_endpoint, {"token": token, "token_type_hint": "access_token"},
                                  (PROXY_CLIENT, PROXY_SECRET))
        if status != 200:
            raise OidcProviderError(f"revocation: HTTP {status} {body[:300]!r}")

    def introspect(self, token: str) -> dict[str, Any]:
        status, body = self._post(self.introspection_endpoint, {"token": token}, (PROXY_CLIENT, PROXY_SECRET))
        if status != 200:
            raise OidcProviderError(f"introspection: HTTP {status} {body[:300]!r}")
        return json.loads(body)


@pytest.fixture(scope="session")
def oidc(tmp_path_factory) -> Iterator[OidcProvider]:
    provider = OidcProvider(tmp_path_factory.mktemp("oidc"))
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()
        if os.environ.get("KEYGATE_OIDC_LOG"):
            print(provider.log())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    provider = getattr(item, "funcargs", {}).get("oidc")
    if report.failed and isinstance(provider, OidcProvider):
        report.sections.append(("oidc provider log", provider.log()))
