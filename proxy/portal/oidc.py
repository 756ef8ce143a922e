"""The portal's OpenID Connect client: authorization code with PKCE (RFC 7636), refresh, end session.

Sans-IO where it can be (the URLs, the PKCE pair); the three exchanges with
the provider are thin calls on one aiohttp session. Tokens never leave the
server: what these return goes into :mod:`proxy.portal.sessions`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp

from proxy.config import Config, read_secret
from proxy.identity.tokens import discovery_url


class LoginError(Exception):
    """The provider refused or could not be reached; the message is for a person."""


@dataclass(frozen=True)
class Tokens:
    access_token: str
    access_expires_at: float
    refresh_token: str
    refresh_expires_at: float   # 0: the provider did not say (then the access token's expiry ends the session)
    id_token: str


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge)."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def _tokens(answer: dict[str, Any], now: float, previous: Tokens | None = None) -> Tokens:
    access = answer.get("access_token")
    if not isinstance(access, str) or not access:
        raise LoginError("the sign-in service gave no access token")
    expires_in = answer.get("expires_in")
    refresh = answer.get("refresh_token") or (previous.refresh_token if previous else "")
    refresh_in = answer.get("refresh_expires_in")
    if isinstance(refresh_in, int | float) and refresh_in > 0:
        refresh_at = now + float(refresh_in)
    elif previous is not None and not answer.get("refresh_token"):
        refresh_at = previous.refresh_expires_at
    else:
        refresh_at = 0.0
    return Tokens(access_token=access,
                  access_expires_at=now + float(expires_in) if isinstance(expires_in, int | float) else now + 60,
                  refresh_token=refresh if isinstance(refresh, str) else "", refresh_expires_at=refresh_at,
                  id_token=str(answer.get("id_token") or (previous.id_token if previous else "")))


class OidcClient:
    def __init__(self, config: Config, redirect_uri: str, post_logout_uri: str):
        self._config = config
        portal = config.portal
        self.client_id = portal.client_id
        self._secret = read_secret(portal.client_secret, portal.client_secret_file, config)
        self.redirect_uri = redirect_uri
        self.post_logout_uri = post_logout_uri
        self._session: aiohttp.ClientSession | None = None
        self._discovery: dict[str, Any] = {}

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._config.oidc.http_timeout_seconds or 10)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _endpoints(self) -> dict[str, Any]:
        if not self._discovery:
            try:
                async with self._http().get(discovery_url(self._config.oidc)) as answer:
                    doc = await answer.json(content_type=None) if answer.status == 200 else None
            except (aiohttp.ClientError, TimeoutError, ValueError):
                doc = None
            if not isinstance(doc, dict) or not isinstance(doc.get("authorization_endpoint"), str) or \
                    not isinstance(doc.get("token_endpoint"), str):
                raise LoginError("the sign-in service cannot be reached; try again in a moment")
            self._discovery = doc
        return self._discovery

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the portal's OIDC client is not started")
        return self._session

    async def authorization_url(self, state: str, challenge: str) -> str:
        """The provider's authorization request. No ``nonce``: the code flow with PKCE S256 and a
        state bound to the browser (proxy.portal.signin) is what protects the code, and who the
        person is comes from the access token, checked by the gateway's validator; the ID token is
        only handed back as ``id_token_hint`` at sign-out, so a nonce would guard nothing."""
        doc = await self._endpoints()
        query = urlencode({"response_type": "code", "client_id": self.client_id, "redirect_uri": self.redirect_uri,
                           "scope": self._config.portal.scope, "state": state,
                           "code_challenge": challenge, "code_challenge_method": "S256"})
        return f"{doc['authorization_endpoint']}?{query}"

    async def exchange_code(self, code: str, verifier: str) -> Tokens:
        return await self._token_request({"grant_type": "authorization_code", "code": code,
                                          "redirect_uri": self.redirect_uri, "code_verifier": verifier}, None)

    async def refresh(self, tokens: Tokens) -> Tokens:
        return await self._token_request({"grant_type": "refresh_token", "refresh_token": tokens.refresh_token},
                                         tokens)

    async def _token_request(self, form: dict[str, str], previous: Tokens | None) -> Tokens:
        doc = await self._endpoints()
        auth = None
        if self._secret:
            auth = aiohttp.BasicAuth(self.client_id, self._secret)
        else:
            form = {**form, "client_id": self.client_id}
        now = time.time()
        try:
            async with self._http().post(doc["token_endpoint"], data=form, auth=auth) as answer:
                body = await answer.json(content_type=None)
                status = answer.status
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise LoginError("the sign-in service cannot be reached; try again in a moment") from None
        if status != 200 or not isinstance(body, dict):
            raise LoginError("the sign-in service did not accept the sign-in; please sign in again")
        return _tokens(body, now, previous)

    async def end_session_url(self, id_token: str) -> str | None:
        try:
            doc = await self._endpoints()
        except LoginError:
            return None
        endpoint = doc.get("end_session_endpoint")
        if not isinstance(endpoint, str):
            return None
        query = {"client_id": self.client_id, "post_logout_redirect_uri": self.post_logout_uri}
        if id_token:
            query["id_token_hint"] = id_token
        return f"{endpoint}?{urlencode(query)}"

    async def revoke(self, token: str) -> None:
        """Best effort: the refresh token ends at the provider too (RFC 7009), where it offers that."""
        try:
            doc = await self._endpoints()
        except LoginError:
            return
        endpoint = doc.get("revocation_endpoint")
        if not isinstance(endpoint, str) or not token:
            return
        form = {"token": token, "token_type_hint": "refresh_token"}
        auth = aiohttp.BasicAuth(self.client_id, self._secret) if self._secret else None
        if auth is None:
            form["client_id"] = self.client_id
        try:
            async with self._http().post(endpoint, data=form, auth=auth) as answer:
                await answer.read()
        except (aiohttp.ClientError, TimeoutError):
            pass
