"""The portal's aiohttp application, mounted at ``portal.path`` on the HTTP listener.

Wiring only: the sign-in and session handling is :mod:`proxy.portal.auth`, the
pages :mod:`proxy.portal.pages`, the headers and CSRF rule
:mod:`proxy.portal.security`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from proxy.portal import auth, pages
from proxy.portal.api_client import ApiClient
from proxy.portal.oidc import OidcClient
from proxy.portal.security import security_headers
from proxy.portal.sessions import SessionStore
from proxy.portal.state import PORTAL, Portal, Presence
from proxy.services import Services

log = logging.getLogger("keygate.portal")

HERE = Path(__file__).resolve().parent
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def public_url(services: Services) -> str:
    config = services.config
    if config.portal.public_url:
        return config.portal.public_url.rstrip("/") + "/"
    return config.ownership.advertise_http.rstrip("/") + config.portal.path


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    portal = request.app[PORTAL]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:   # a redirect: raised on, with the headers
            for name, value in portal.headers.items():
                exc.headers.setdefault(name, value)
            raise
        response = pages.error_page(request, exc.status, pages.HTTP_MESSAGES.get(exc.status, exc.reason))
    except Exception:
        log.exception("portal: unexpected error on %s %s", request.method, request.path)
        response = pages.error_page(request, 500, "Something went wrong on our side. Please try again.")
    for name, value in portal.headers.items():
        if name not in response.headers:
            response.headers[name] = value
    return response


def create_portal_app(services: Services, presence: Presence | None = None) -> web.Application:
    base = services.config.portal.path
    url = public_url(services)
    portal = Portal(services=services, base=base, public_url=url,
                    oidc=OidcClient(services.config, f"{url}callback", url),
                    api=ApiClient(services), sessions=SessionStore(services.config.portal.max_sessions),
                    headers=security_headers(services.config.oidc.issuer), presence=presence)
    app = web.Application(middlewares=[headers_middleware], client_max_size=64 * 1024)
    app[PORTAL] = portal
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                               autoescape=jinja2.select_autoescape(default=True))
    env.globals["base"] = base

    async def start(_app: web.Application) -> None:
        await portal.api.start()
        await portal.oidc.start()

    async def stop(_app: web.Application) -> None:
        await portal.live.stop()
        await portal.oidc.close()
        await portal.api.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    r = app.router
    r.add_get("/", pages.home)
    r.add_get("/login", auth.login)
    r.add_get("/callback", auth.callback)
    r.add_post("/logout", auth.logout)
    r.add_get("/devices", pages.devices)
    r.add_post("/devices", pages.register)
    r.add_get("/devices/{id}", pages.device)
    r.add_get("/devices/{id}/live", pages.live)
    r.add_get("/devices/{id}/rotate/{slot}", pages.rotate_confirm)
    r.add_post("/devices/{id}/rotate/{slot}", pages.rotate)
    r.add_get("/devices/{id}/delete", pages.delete_confirm)
    r.add_post("/devices/{id}/delete", pages.delete)
    r.add_post("/devices/{id}/delegations", pages.grant)
    r.add_post("/devices/{id}/delegations/{delegation}/revoke", pages.revoke)
    r.add_post("/devices/{id}/certificate", pages.certificate)
    r.add_get("/shared", pages.shared)
    r.add_get("/shared/list", pages.shared_list)
    r.add_get("/shared/{id}", pages.shared_device)
    r.add_get("/shared/{id}/live", pages.live)
    r.add_post("/shared/{id}/command", pages.command)
    r.add_get("/data", pages.data)
    r.add_get("/data/export", pages.export)
    r.add_post("/data/erase", pages.erase)
    r.add_static("/static/", HERE / "static", append_version=False)
    return app


__all__ = ["create_portal_app", "public_url"]
