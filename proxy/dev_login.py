"""The login page of ``keygate dev``'s token issuer, so the portal works on a laptop. NOT FOR PRODUCTION.

The authorization code flow with PKCE (S256), refresh tokens and an end-session
endpoint, at Keycloak's paths: enough for the portal's real sign-in code to run
against it unchanged. The page asks only for a user name (no password: the
issuer signs for anyone, see :mod:`proxy.dev_issuer`), and sends codes only to
loopback redirect URIs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from proxy.dev_issuer import WARNING, SigningKey

CODE_SECONDS = 60.0
ACCESS_SECONDS = 300
REFRESH_SECONDS = 1800
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass
class _Code:
    username: str
    client_id: str
    redirect_uri: str
    challenge: str
    expires_at: float


class DevLogin:
    def __init__(self, key: SigningKey, base: str):
        self.key = key
        self.base = base
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, tuple[str, str, float]] = {}   # token -> (username, client id, expiry)

    def add_routes(self, app: web.Application) -> None:
        oidc = f"{self.base}/protocol/openid-connect"
        app.router.add_get(f"{oidc}/auth", self._auth_page)
        app.router.add_post(f"{oidc}/auth", self._auth_submit)
        app.router.add_post(f"{oidc}/token", self._token)
        app.router.add_get(f"{oidc}/logout", self._logout)

    def endpoints(self, issuer: str) -> dict[str, str]:
        oidc = f"{issuer}/protocol/openid-connect"
        return {"authorization_endpoint": f"{oidc}/auth", "token_endpoint": f"{oidc}/token",
                "end_session_endpoint": f"{oidc}/logout"}

    @staticmethod
    def _loopback(uri: str) -> bool:
        parts = urlsplit(uri)
        return parts.scheme in ("http", "https") and parts.hostname in _LOOPBACK

    async def _auth_page(self, request: web.Request) -> web.Response:
        q = request.query
        if not self._loopback(q.get("redirect_uri", "")) or q.get("code_challenge_method") != "S256" or \
                not q.get("code_challenge") or q.get("response_type") != "code":
            return web.Response(status=400, text="a code request with PKCE (S256) to a loopback redirect_uri only")
        hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(q.get(k, ""))}">'
                         for k in ("client_id", "redirect_uri", "state", "code_challenge"))
        return web.Response(content_type="text/html", text=f"""<!doctype html><html lang="en"><head>
<meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1"><title>Sign in (dev)</title>
</head><body><main><h1>keygate dev: sign in</h1><p><strong>{html.escape(WARNING)}</strong></p>
<form method="post">{hidden}<p><label for="username">User name</label>
<input id="username" name="username" required pattern="[A-Za-z0-9._-]{{1,64}}" autocomplete="username"></p>
<p><button type="submit">Sign in</button></p></form></main></body></html>""")

    async def _auth_submit(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        username = fields.get("username", "")
        redirect_uri = fields.get("redirect_uri", "")
        if not self._loopback(redirect_uri) or not username or len(username) > 64:
            return web.Response(status=400, text="a user name and a loopback redirect_uri are needed")
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Code(username, fields.get("client_id", ""), redirect_uri,
                                  fields.get("code_challenge", ""), time.time() + CODE_SECONDS)
        query = urlencode({"code": code, "state": fields.get("state", "")})
        raise web.HTTPFound(f"{redirect_uri}?{query}")

    def _answer(self, username: str, client_id: str) -> web.Response:
        refresh = secrets.token_urlsafe(32)
        self._refresh[refresh] = (username, client_id, time.time() + REFRESH_SECONDS)
        return web.json_response({
            "access_token": self.key.mint(username, ttl=ACCESS_SECONDS, client_id=client_id or "iot-portal"),
            "token_type": "Bearer", "expires_in": ACCESS_SECONDS, "refresh_token": refresh,
            "refresh_expires_in": REFRESH_SECONDS}, headers={"Cache-Control": "no-store"})

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        now = time.time()
        if fields.get("grant_type") == "authorization_code":
            code = self._codes.pop(fields.get("code", ""), None)
            verifier = fields.get("code_verifier", "")
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if code is None or code.expires_at < now or code.redirect_uri != fields.get("redirect_uri") or \
                    not hmac.compare_digest(challenge, code.challenge):
                return web.json_response({"error": "invalid_grant"}, status=400)
            return self._answer(code.username, code.client_id)
        if fields.get("grant_type") == "refresh_token":
            held = self._refresh.pop(fields.get("refresh_token", ""), None)
            if held is None or held[2] < now:
                return web.json_response({"error": "invalid_grant"}, status=400)
            return self._answer(held[0], held[1])
        return web.json_response({"error": "unsupported_grant_type"}, status=400)

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        target = request.query.get("post_logout_redirect_uri", "")
        if self._loopback(target):
            raise web.HTTPFound(target)
        return web.Response(text="signed out")
