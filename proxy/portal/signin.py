"""A sign-in under way lives in the browser, sealed, not in the server.

``GET /portal/login`` needs no account, so anything it kept on the server could be flooded: a
stranger sending enough of them would push out the sign-ins of people at the provider's login
page. Instead the state and the PKCE verifier travel in a cookie (``keygate_portal_signin``,
HttpOnly, Secure, SameSite=Lax, the portal's path, gone after :data:`LOGIN_SECONDS`), sealed
with AES-GCM under a key of this process: the browser can neither read the verifier nor forge
a pair, and the callback accepts a code only with the state its own browser's cookie names
(login CSRF: a victim sent someone else's callback address has no matching cookie).

The key is made at start, so a restart (or another worker) voids sign-ins under way: the
person signs in again, as after a restart the server-side sessions are gone too.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import time
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["LOGIN_SECONDS", "SIGNIN_COOKIE", "SignInSealer"]

SIGNIN_COOKIE = "keygate_portal_signin"
# A sign-in must come back from the provider within this.
LOGIN_SECONDS = 600.0
_AAD = b"keygate portal sign-in v1"


class SignInSealer:
    def __init__(self, key: bytes | None = None, clock: Callable[[], float] = time.time):
        self._aead = AESGCM(key or AESGCM.generate_key(bit_length=256))
        self._clock = clock

    def seal(self, state: str, verifier: str) -> str:
        nonce = os.urandom(12)
        body = json.dumps({"s": state, "v": verifier, "t": self._clock()}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, body, _AAD)).decode().rstrip("=")

    def open(self, sealed: str, state: str) -> str | None:
        """The PKCE verifier of the sign-in ``sealed`` stands for, if it was made here, is not too
        old and names ``state``; else None."""
        try:
            raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
            body = json.loads(self._aead.decrypt(raw[:12], raw[12:], _AAD))
            made, named, verifier = float(body["t"]), str(body["s"]), str(body["v"])
        except (ValueError, TypeError, KeyError, InvalidTag):
            return None
        if not 0 <= self._clock() - made <= LOGIN_SECONDS:
            return None
        if not state or not hmac.compare_digest(state.encode(), named.encode()):
            return None
        return verifier
