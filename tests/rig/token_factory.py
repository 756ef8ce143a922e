"""Forged and well-formed tokens for the cases no real provider makes.

Fixture ``token_factory``: a :class:`TokenFactory` with its own issuer (an
``http.server`` thread on a free 127.0.0.1 port serving discovery and the JWKS
at Keycloak's paths) and keys: RSA ``rsa-1`` and EC P-256 ``ec-1`` published,
``rsa-rotated`` held back until :meth:`TokenFactory.rotate`. The server is
shared by the session; its state (published keys, fetch counter, down flag) is
reset for every test.

    cfg = token_factory.oidc_config()              # OidcConfig for this issuer
    token_factory.valid(preferred_username="bob")  # RS256, Keycloak-shaped
    token_factory.valid(alg="ES256")
    token_factory.expired(); token_factory.alg_none(); token_factory.hs256_with_public_key()
    token_factory.jwks_fetches                     # how often the JWKS was fetched
    token_factory.opaque(preferred_username="bob") # known to the introspection endpoint
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.config import IntrospectionConfig, OidcConfig

REALM_PATH = "/realms/test"
AUDIENCE = "iot-proxy"
INTROSPECTION_CLIENT = "iot-proxy"
INTROSPECTION_SECRET = "factory-introspection-secret"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def public_jwk(key, kid: str, alg: str) -> dict[str, Any]:
    pub = key.public_key()
    text = RSAAlgorithm.to_jwk(pub) if isinstance(pub, rsa.RSAPublicKey) else ECAlgorithm.to_jwk(pub)
    jwk = json.loads(text)
    jwk.pop("key_ops", None)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


class _Keys:
    """Generated once per session: RSA keys are slow to make."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # never published
        self.realm_hmac = hashlib.sha256(b"keycloak realm hs512 secret").digest() * 2


class _IssuerServer:
    """Discovery + JWKS over plain HTTP on 127.0.0.1, in a thread."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.down = False
        self.introspectable: dict[str, dict[str, Any]] = {}  # token -> claims while active
        self.introspections = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                with server.lock:
                    down = server.down
                    if self.path == f"{REALM_PATH}/protocol/openid-connect/token/introspect" and not down:
                        server.introspections += 1
                        status, body = server.introspect(self.headers.get("authorization", ""), form)
                    else:
                        status, body = (503 if down else 404), {}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                with server.lock:
                    down = server.down
                    if self.path == f"{REALM_PATH}/.well-known/openid-configuration":
                        server.discovery_fetches += 1
                        body = server.discovery()
                    elif self.path == f"{REALM_PATH}/protocol/openid-connect/certs":
                        server.jwks_fetches += 1
                        body = server.jwks
                    else:
                        body = None
                if down:
                    self.send_response(503)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if body is None:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.issuer = f"http://127.0.0.1:{self.port}{REALM_PATH}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="token-factory-issuer", daemon=True)
        self.thread.start()

    def introspect(self, auth: str, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        expected = "Basic " + base64.b64encode(f"{INTROSPECTION_CLIENT}:{INTROSPECTION_SECRET}".encode()).decode()
        if not hmac.compare_digest(auth, expected):
            return 401, {"error": "invalid_client"}
        token = (form.get("token") or [""])[0]
        claims = self.introspectable.get(token)
        return 200, ({"active": True, **claims} if claims is not None else {"active": False})

    def discovery(self) -> dict[str, Any]:
        base = f"{self.issuer}/protocol/openid-connect"
        return {"issuer": self.issuer, "jwks_uri": f"{base}/certs", "token_endpoint": f"{base}/token",
                "introspection_endpoint": f"{base}/token/introspect",
                "id_token_signing_alg_values_supported": ["RS256", "ES256"]}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class TokenFactory:
    """Mints tokens for :attr:`issuer`; every method returns the compact JWS string."""

    def __init__(self, server: _IssuerServer, keys: _Keys, clock=time.time):
        self._server = server
        self.keys = keys
        self.clock = clock
        self.issuer = server.issuer
        self.audience = AUDIENCE
        self.reset()

    # -- the issuer's state
    def reset(self) -> None:
        with self._server.lock:
            self._server.jwks = {"keys": [public_jwk(self.keys.rsa, "rsa-1", "RS256"),
                                          public_jwk(self.keys.ec, "ec-1", "ES256")]}
            self._server.jwks_fetches = 0
            self._server.discovery_fetches = 0
            self._server.down = False
            self._server.introspectable = {}
            self._server.introspections = 0

    @property
    def introspections(self) -> int:
        return self._server.introspections

    def opaque(self, *, active: bool = True, **claims: Any) -> str:
        """An opaque (non-JWT) token that the introspection endpoint knows, with these claims."""
        token = f"opaque-{uuid.uuid4().hex}"
        if active:
            self.set_introspection(token, **claims)
        return token

    def set_introspection(self, token: str, *, active: bool = True, **claims: Any) -> None:
        """What introspection answers for ``token`` (``active=False``: revoked)."""
        with self._server.lock:
            if active:
                self._server.introspectable[token] = self.claims(**claims)
            else:
                self._server.introspectable.pop(token, None)

    @property
    def jwks_fetches(self) -> int:
        return self._server.jwks_fetches

    @property
    def discovery_fetches(self) -> int:
        return self._server.discovery_fetches

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/certs"

    def set_down(self, down: bool = True) -> None:
        """The issuer answers 503 to everything while down."""
        with self._server.lock:
            self._server.down = down

    def publish(self, jwks: dict[str, Any]) -> None:
        with self._server.lock:
            self._server.jwks = jwks

    def add_published(self, *jwks: dict[str, Any]) -> None:
        with self._server.lock:
            self._server.jwks = {"keys": [*self._server.jwks["keys"], *jwks]}

    def rotate(self) -> None:
        """Keycloak's rotation: the new key ``rsa-rotated`` is published first, the old ones stay."""
        self.publish({"keys": [public_jwk(self.keys.rotated, "rsa-rotated", "RS256"),
                               *self._server.jwks["keys"]]})

    def oidc_config(self, *, introspection: bool = False, always: bool = False, **overrides: Any) -> OidcConfig:
        intro = IntrospectionConfig(enabled=introspection, always=always, client_id=INTROSPECTION_CLIENT,
                                    client_secret=INTROSPECTION_SECRET)
        return dataclasses.replace(OidcConfig(issuer=self.issuer, audience=self.audience,
                                              roles=("realm_access.roles", "resource_access.iot-proxy.roles"),
                                              introspection=intro), **overrides)

    # -- claims
    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Keycloak-shaped access-token claims for user ``alice``; ``None`` values drop a claim."""
        now = int(self.clock())
        base: dict[str, Any] = {
            "exp": now + 300, "iat": now, "jti": str(uuid.uuid4()), "iss": self.issuer,
            "aud": [self.audience, "account"], "sub": "0b6e1b2e-3f0d-4c50-9f84-8c1c1e8f2a11", "typ": "Bearer",
            "azp": "iot-portal", "preferred_username": "alice", "scope": "openid profile email",
            "realm_access": {"roles": ["iot-user", "default-roles-test"]},
            "resource_access": {"iot-proxy": {"roles": ["reader"]}, "account": {"roles": ["view-profile"]}},
            "groups": ["/users", "/fleet/north"],
        }
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}

    # -- signing
    def token(self, *, alg: str = "RS256", kid: str | None = "", key: Any = None,
              headers: dict[str, Any] | None = None, **claims: Any) -> str:
        """A signed token. ``kid=""`` picks the published kid for ``alg``; ``kid=None`` omits it."""
        if key is None:
            key = self.keys.ec if alg.startswith("ES") else self.keys.rsa
        if kid == "":
            kid = "ec-1" if alg.startswith("ES") else "rsa-1"
        hdr = {**({"kid": kid} if kid is not None else {}), **(headers or {})}
        return jwt.encode(self.claims(**claims), key, algorithm=alg, headers=hdr)

    def valid(self, **claims: Any) -> str:
        return self.token(**claims)

    def service_token(self, client: str = "iot-backend", **claims: Any) -> str:
        """A Keycloak client_credentials token for ``client``."""
        return self.token(**{"azp": client, "client_id": client,
                             "preferred_username": f"service-account-{client}", "aud": self.audience,
                             "sub": "6d0f7c1e-9a53-4b8a-9d61-1f8e1a0c7b21", "groups": None, "scope": "profile",
                             "realm_access": {"roles": ["iot-service"]}, "resource_access": None, **claims})

    def expired(self, by: int = 3600, **claims: Any) -> str:
        now = int(self.clock())
        return self.token(**{"iat": now - by - 300, "exp": now - by, **claims})

    def not_yet_valid(self, by: int = 3600, **claims: Any) -> str:
        now = int(self.clock())
        return self.token(**{"nbf": now + by, **claims})

    def issued_in_future(self, by: int = 3600, **claims: Any) -> str:
        now = int(self.clock())
        return self.token(**{"iat": now + by, "exp": now + by + 300, **claims})

    def wrong_issuer(self, **claims: Any) -> str:
        return self.token(**{"iss": "https://evil.example/realms/test", **claims})

    def wrong_audience(self, **claims: Any) -> str:
        return self.token(**{"aud": ["some-other-api", "account"], **claims})

    def id_token(self, **claims: Any) -> str:
        """Keycloak ID token: RS256, ``typ: ID``, aud = the client (presented as an access token)."""
        return self.token(**{"typ": "ID", "aud": "iot-portal", "nonce": "n-0S6_WzA2Mj", **claims})

    def refresh_token(self, **claims: Any) -> str:
        """Keycloak refresh token: HS512 with the realm's secret, ``typ: Refresh``."""
        payload = self.claims(**{"typ": "Refresh", "aud": self.issuer, "scope": "openid profile email",
                                 "realm_access": None, "resource_access": None, "groups": None, **claims})
        return jwt.encode(payload, self.keys.realm_hmac, algorithm="HS512", headers={"kid": "hmac-realm-key"})

    def rs256_refresh_typ(self, **claims: Any) -> str:
        """Correctly signed by the issuer's key but ``typ: Refresh``: only the typ check stops it."""
        return self.token(**{"typ": "Offline", **claims})

    def alg_none(self, **claims: Any) -> str:
        return f"{b64json({'alg': 'none', 'typ': 'JWT', 'kid': 'rsa-1'})}.{b64json(self.claims(**claims))}."

    def hs256_with_public_key(self, **claims: Any) -> str:
        """The classic confusion attack: HMAC keyed with the issuer's RSA public key PEM."""
        pem = self.keys.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa-1'})}.{b64json(self.claims(**claims))}"
        sig = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(sig)}"

    def unknown_kid(self, kid: str | None = None, **claims: Any) -> str:
        """Signed by a key the issuer never published, under a kid it does not have."""
        return self.token(kid=kid or f"forged-{uuid.uuid4().hex}", key=self.keys.stranger, **claims)

    def wrong_key(self, **claims: Any) -> str:
        """Claims the published kid ``rsa-1`` but is signed by another key."""
        return self.token(kid="rsa-1", key=self.keys.stranger, **claims)

    def rotated(self, **claims: Any) -> str:
        """Signed by ``rsa-rotated``, which the issuer publishes only after :meth:`rotate`."""
        return self.token(kid="rsa-rotated", key=self.keys.rotated, **claims)

    def tampered(self, **claims: Any) -> str:
        """A valid token whose payload was edited after signing (roles escalated)."""
        head, _, sig = self.valid(**claims).split(".")
        payload = self.claims(**{"realm_access": {"roles": ["iot-admin"]}, **claims})
        return f"{head}.{b64json(payload)}.{sig}"

    def alg_key_mismatch(self, **claims: Any) -> str:
        """Header says ES256 but names the RSA kid."""
        return self.token(alg="ES256", kid="rsa-1", **claims)


_keys: _Keys | None = None


@pytest.fixture(scope="session")
def _token_issuer():
    server = _IssuerServer()
    yield server
    server.close()


@pytest.fixture
def token_factory(_token_issuer) -> Iterator[TokenFactory]:
    global _keys
    if _keys is None:
        _keys = _Keys()
    factory = TokenFactory(_token_issuer, _keys)
    yield factory
    factory.reset()
