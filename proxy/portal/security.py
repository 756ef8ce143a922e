"""What every portal answer carries, and the checks every state-changing request passes.

* Headers: a strict Content-Security-Policy (scripts, styles and fetches from
  the portal itself only; forms may go to the portal and, for logout, to the
  provider), no framing, no referrer, no caching of pages (they show personal
  data; the one-time key page above all), no MIME sniffing.
* The session cookie: ``HttpOnly`` (no script reads it), ``Secure``,
  ``SameSite=Lax`` (a cross-site POST carries no cookie), scoped to the portal's
  path, and only ever a random id (the tokens stay in the server's memory), set
  when a sign-in completes. A sign-in under way is a second cookie, sealed
  (:mod:`proxy.portal.signin`), so starting one keeps nothing on the server.
* CSRF: every POST carries the session's token in a hidden field, compared in
  constant time; a POST without it (a cross-site form) is refused 403 before
  anything is done.
"""

from __future__ import annotations

from urllib.parse import urlsplit

COOKIE = "keygate_portal"


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy(issuer: str) -> str:
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            f"form-action 'self' {origin_of(issuer)}; frame-ancestors 'none'; base-uri 'none'")


def security_headers(issuer: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": content_security_policy(issuer),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "Cross-Origin-Opener-Policy": "same-origin",
    }
