"""The development token issuer of ``keygate dev``. NOT FOR PRODUCTION.

It signs whatever it is asked to: any user, any role. It exists so that a
laptop can try keygate without a Keycloak, while keygate itself validates its
tokens through exactly the code that validates Keycloak's (discovery, JWKS,
``iss``, ``aud``, ``typ``, expiry): the issuer serves the two documents
Keycloak serves, at Keycloak's paths, and mints tokens shaped like
Keycloak's access tokens.

The signing key (ES256) is made at every start and kept in the data folder
(mode 0600) with the issuer URL, so that ``keygate dev token`` can mint
tokens for the running stack from another shell.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

REALM = "dev"
AUDIENCE = "iot-proxy"
CLIENT_ID = "iot-portal"
KEY_FILE = "issuer.key"
INFO_FILE = "issuer.json"
WARNING = "keygate dev token issuer: NOT FOR PRODUCTION (it signs tokens for anyone who asks)"
# Fixed namespace: a username maps to the same "sub" across restarts, so the
# devices alice registered yesterday are still hers today.
SUB_NAMESPACE = uuid.UUID("6d2b8f0e-5a3c-4f59-9d0e-4b6f1f0c2a11")


def subject_of(username: str) -> str:
    return str(uuid.uuid5(SUB_NAMESPACE, username))


@dataclass
class SigningKey:
    """The issuer's ES256 key and the issuer URL it signs for."""

    private_key: ec.EllipticCurvePrivateKey
    kid: str
    issuer: str = ""

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(ec.generate_private_key(ec.SECP256R1()), kid=secrets.token_hex(8))

    def jwk(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private_key.public_key()))
        return {**public, "kid": self.kid, "use": "sig", "alg": "ES256"}

    def mint(self, username: str, *, roles: Iterable[str] = ("iot-user",), groups: Iterable[str] = (),
             ttl: float = 3600, audience: str = AUDIENCE, client_id: str = CLIENT_ID,
             now: float | None = None) -> str:
        """A Keycloak-shaped access token (``typ: Bearer``) for ``username``."""
        if not self.issuer:
            raise ValueError("the issuer URL is not known yet (start the issuer first)")
        now = time.time() if now is None else now
        claims = {
            "exp": int(now + ttl),
            "iat": int(now),
            "jti": str(uuid.uuid4()),
            "iss": self.issuer,
            "aud": [audience, "account"],
            "sub": subject_of(username),
            "typ": "Bearer",
            "azp": client_id,
            "sid": str(uuid.uuid4()),
            "scope": "openid profile email",
            "preferred_username": username,
            "realm_access": {"roles": sorted(set(roles))},
            "resource_access": {"account": {"roles": ["view-profile"]}},
            "groups": sorted(set(groups)),
        }
        return jwt.encode(claims, self.private_key, algorithm="ES256", headers={"kid": self.kid, "typ": "JWT"})

    # -- persistence in the data folder

    def save(self, folder: Path) -> None:
        pem = self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        write_private(folder / KEY_FILE, pem)
        info = {"issuer": self.issuer, "kid": self.kid, "warning": WARNING}
        write_private(folder / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())

    @classmethod
    def load(cls, folder: Path) -> SigningKey:
        """The running stack's key; FileNotFoundError when no stack wrote one."""
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
        key = serialization.load_pem_private_key((folder / KEY_FILE).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{folder / KEY_FILE}: not an EC key")
        return cls(key, kid=info["kid"], issuer=info["issuer"])


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only, atomically (never a half-written key)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class DevIssuer:
    """Serves discovery and JWKS on loopback at Keycloak's paths (``/realms/dev/...``)."""

    def __init__(self, key: SigningKey, host: str = "127.0.0.1", port: int = 0):
        self.key = key
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        from proxy.dev_login import DevLogin  # (it imports this module)

        self.login = DevLogin(key, self.base)   # the portal's sign-in (a user name, no password)

    @property
    def base(self) -> str:
        return f"/realms/{REALM}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(f"{self.base}/.well-known/openid-configuration", self._discovery)
        app.router.add_get(f"{self.base}/protocol/openid-connect/certs", self._jwks)
        self.login.add_routes(app)
        return app

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.key.issuer = f"http://{self.host}:{self.port}{self.base}"
        return self.key.issuer

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _discovery(self, request: web.Request) -> web.Response:
        issuer = self.key.issuer
        return web.json_response({
            "issuer": issuer,
            "jwks_uri": f"{issuer}/protocol/openid-connect/certs",
            **self.login.endpoints(issuer),
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "keygate_dev": WARNING,
        })

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [self.key.jwk()]})
