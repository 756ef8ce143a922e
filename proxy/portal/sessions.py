"""The portal's server-side sessions: the browser holds only a random id.

A session is made when a sign-in completes (the sign-in under way lives in a sealed cookie:
:mod:`proxy.portal.signin`), under a fresh id, so nothing a browser held before login
(session fixation) is worth anything after it; anyone can start a sign-in, and none of that
reaches this store. A session holds the person's tokens and a CSRF token, and ends when the
refresh token does (or the provider refuses a refresh), at logout, or when
``portal.max_sessions`` pushes out the least recently used one.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from proxy.portal.oidc import Tokens


@dataclass
class Session:
    id: str
    csrf: str
    created_at: float
    tokens: Tokens | None = None   # None once ended (a refresh refused)
    username: str = ""
    sub: str = ""
    live_streams: int = 0          # live views open now (pages.live caps them)
    # A message for the next page (what was done, or why not), shown once.
    notices: list[tuple[str, str]] = field(default_factory=list)

    @property
    def signed_in(self) -> bool:
        return self.tokens is not None

    def csrf_ok(self, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf.encode())

    def expired(self, now: float) -> bool:
        if self.tokens is None:
            return True
        ends = self.tokens.refresh_expires_at
        if not self.tokens.refresh_token:
            ends = self.tokens.access_expires_at
        return bool(ends) and now >= ends

    def notify(self, kind: str, text: str) -> None:
        self.notices.append((kind, text))

    def take_notices(self) -> list[tuple[str, str]]:
        out, self.notices = self.notices, []
        return out


class SessionStore:
    def __init__(self, max_sessions: int):
        self._max = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def start(self, tokens: Tokens, username: str, sub: str) -> Session:
        """A signed-in session under a new id and CSRF token (the least recently used one goes past the bound)."""
        session = Session(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), created_at=time.time(),
                          tokens=tokens, username=username, sub=sub)
        self._sessions[session.id] = session
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expired(time.time()):
            del self._sessions[session_id]
            return None
        self._sessions.move_to_end(session_id)
        return session

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
