"""A minimal OpenID Connect token issuer for the benchmarks: discovery, JWKS, signed tokens.

The benchmarks need thousands of distinct, valid access tokens (a reconnect
storm with uncached validation) minted in milliseconds, and an issuer that
costs nothing while the gateway runs. This is that: an ES256 key, a discovery
document and a JWKS served from a thread on loopback, and Keycloak-shaped
access tokens made with PyJWT. Not for anything but benchmarks.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

AUDIENCE = "iot-proxy"
REALM_PATH = "/realms/bench"


class BenchIssuer:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = uuid.uuid4().hex[:16]
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}{REALM_PATH}"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def jwks(self) -> dict:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "ES256"})
        return {"keys": [jwk]}

    def discovery(self) -> dict:
        base = self.issuer
        return {"issuer": base, "jwks_uri": f"{base}/protocol/openid-connect/certs",
                "token_endpoint": f"{base}/protocol/openid-connect/token",
                "id_token_signing_alg_values_supported": ["ES256"],
                "response_types_supported": ["code"], "subject_types_supported": ["public"]}

    def token(self, username: str, *, roles: tuple[str, ...] = (), ttl: float = 3600.0) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer, "sub": f"sub-{username}", "aud": AUDIENCE, "azp": "bench",
            "typ": "Bearer", "iat": now, "nbf": now - 5, "exp": now + int(ttl), "jti": uuid.uuid4().hex,
            "preferred_username": username, "scope": "openid profile",
            "realm_access": {"roles": list(roles)},
        }
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.kid})

    def start(self) -> None:
        docs: dict[str, bytes] = {}
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = docs.get(self.path.split("?", 1)[0])
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        d = issuer.discovery()
        docs[f"{REALM_PATH}/.well-known/openid-configuration"] = json.dumps(d).encode()
        docs[f"{REALM_PATH}/protocol/openid-connect/certs"] = json.dumps(issuer.jwks()).encode()
        self._thread = threading.Thread(target=self._server.serve_forever, name="bench-issuer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
