"""Signing in (authorization code + PKCE), the session behind each request, and signing out."""

from __future__ import annotations

import secrets
import time

from aiohttp import web

from proxy.identity.model import AuthError
from proxy.portal.oidc import LoginError
from proxy.portal.security import COOKIE
from proxy.portal.sessions import Session
from proxy.portal.signin import LOGIN_SECONDS, SIGNIN_COOKIE
from proxy.portal.state import PORTAL, Portal

# Refresh the access token when it has less than this left, so an API call never carries an expired one.
REFRESH_MARGIN_SECONDS = 15.0


def _portal(request: web.Request) -> Portal:
    return request.app[PORTAL]


def session_of(request: web.Request) -> Session | None:
    session_id = request.cookies.get(COOKIE, "")
    return _portal(request).sessions.get(session_id) if session_id else None


def _set_cookie(response: web.StreamResponse, portal: Portal, session: Session) -> None:
    response.set_cookie(COOKIE, session.id, path=portal.base, httponly=True, secure=True, samesite="Lax")


def _signin_cookie(response: web.StreamResponse, portal: Portal, sealed: str) -> None:
    response.set_cookie(SIGNIN_COOKIE, sealed, path=portal.base, max_age=int(LOGIN_SECONDS), httponly=True,
                        secure=True, samesite="Lax")


async def login(request: web.Request) -> web.StreamResponse:
    """Start a sign-in: nothing is kept here (a sealed cookie holds the state and the PKCE verifier),
    so no number of these, from anyone, touches anyone else's sign-in or session."""
    portal = _portal(request)
    if session_of(request) is not None:
        raise web.HTTPFound(f"{portal.base}devices")
    from proxy.portal.oidc import pkce_pair

    state = secrets.token_urlsafe(24)
    verifier, challenge = pkce_pair()
    try:
        url = await portal.oidc.authorization_url(state, challenge)
    except LoginError as exc:
        from proxy.portal.pages import error_page

        return error_page(request, 503, str(exc))
    response = web.HTTPFound(url)
    _signin_cookie(response, portal, portal.signins.seal(state, verifier))
    raise response


async def callback(request: web.Request) -> web.StreamResponse:
    from proxy.portal.pages import error_page

    portal = _portal(request)

    def refused(status: int, message: str) -> web.StreamResponse:
        answer = error_page(request, status, message, sign_in=True)
        answer.del_cookie(SIGNIN_COOKIE, path=portal.base)   # a sign-in ends with its callback
        return answer

    if request.query.get("error"):
        return refused(400, "The sign-in was cancelled or refused. You can try again.")
    code = request.query.get("code", "")
    verifier = portal.signins.open(request.cookies.get(SIGNIN_COOKIE, ""), request.query.get("state", ""))
    if verifier is None or not code:
        return refused(400, "This sign-in link is not valid any more. Please sign in again.")
    try:
        tokens = await portal.oidc.exchange_code(code, verifier)
        identity = await portal.services.tokens.validate(tokens.access_token)
    except (LoginError, AuthError) as exc:
        return refused(400, str(exc) if isinstance(exc, LoginError) else
                       "The sign-in service gave a token keygate refuses.")
    if identity.kind != "user":
        return refused(403, "Only people can use this portal.")
    earlier = session_of(request)
    if earlier is not None:   # this browser's earlier session is replaced, not kept beside it
        portal.sessions.end(earlier)
    session = portal.sessions.start(tokens, identity.username, identity.sub)
    response = web.HTTPFound(f"{portal.base}devices")
    _set_cookie(response, portal, session)
    response.del_cookie(SIGNIN_COOKIE, path=portal.base)
    raise response


async def access_token(request: web.Request, session: Session) -> str:
    """The session's access token, refreshed first when about to expire; HTTPFound to sign in when the
    refresh token is gone."""
    portal = _portal(request)
    tokens = session.tokens
    if tokens is None:
        raise web.HTTPFound(f"{portal.base}login")
    if tokens.access_expires_at - time.time() > REFRESH_MARGIN_SECONDS:
        return tokens.access_token
    if not tokens.refresh_token:
        portal.sessions.end(session)
        raise web.HTTPFound(f"{portal.base}login")
    try:
        session.tokens = await portal.oidc.refresh(tokens)
    except LoginError:
        portal.sessions.end(session)   # the refresh token ended: so does the session
        raise web.HTTPFound(f"{portal.base}login") from None
    return session.tokens.access_token


def require_session(request: web.Request) -> Session:
    session = session_of(request)
    if session is None:
        raise web.HTTPFound(f"{_portal(request).base}login")
    return session


async def require_form(request: web.Request) -> tuple[Session, dict[str, str]]:
    """A POST's session and fields, refused (403) without the session's CSRF token."""
    session = session_of(request)
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if session is None or not session.csrf_ok(fields.get("csrf", "")):
        raise web.HTTPForbidden(reason="csrf")
    return session, fields


async def logout(request: web.Request) -> web.StreamResponse:
    portal = _portal(request)
    if session_of(request) is None:   # ended already (expired): nothing to sign out of
        response = web.HTTPFound(portal.base)
        response.del_cookie(COOKIE, path=portal.base)
        raise response
    session, _ = await require_form(request)
    portal.sessions.end(session)
    tokens = session.tokens
    url = await portal.oidc.end_session_url(tokens.id_token if tokens else "")
    if tokens is not None and tokens.refresh_token:
        await portal.oidc.revoke(tokens.refresh_token)
    response = web.HTTPFound(url or portal.base)
    response.del_cookie(COOKIE, path=portal.base)
    raise response
