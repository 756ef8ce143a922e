"""The portal's server-side sessions: the browser holds only a random id.

A session is made when a sign-in starts (it holds the PKCE verifier, state
and nonce) and replaced by a new id when the sign-in completes, so an id seen
before login (session fixation) is worth nothing after it. It holds the
person's tokens and a CSRF token, and ends when the refresh token does (or the
provider refuses a refresh), at logout, or when ``portal.max_sessions`` pushes
out the least recently used one. Sign-ins under way are held apart, under
the same bound: anyone can start one, so a flood of them pushes out only other
unfinished sign-ins, never a signed-in session.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from proxy.portal.oidc import Tokens

# A sign-in must come back from the provider within this.
LOGIN_SECONDS = 600.0


@dataclass
class Session:
    id: str
    csrf: str
    created_at: float
    # While signing in:
    state: str = ""
    nonce: str = ""
    verifier: str = ""
    # Once signed in:
    tokens: Tokens | None = None
    username: str = ""
    sub: str = ""
    # A message for the next page (what was done, or why not), shown once.
    notices: list[tuple[str, str]] = field(default_factory=list)

    @property
    def signed_in(self) -> bool:
        return self.tokens is not None

    def csrf_ok(self, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf.encode())

    def expired(self, now: float) -> bool:
        if self.tokens is None:
            return now - self.created_at > LOGIN_SECONDS
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
        self._sessions: OrderedDict[str, Session] = OrderedDict()   # signed in
        self._pending: OrderedDict[str, Session] = OrderedDict()    # signing in

    def __len__(self) -> int:
        return len(self._sessions) + len(self._pending)

    @staticmethod
    def _made() -> Session:
        return Session(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), created_at=time.time())

    @staticmethod
    def _add(held: OrderedDict[str, Session], session: Session, bound: int) -> None:
        held[session.id] = session
        while len(held) > bound:
            held.popitem(last=False)

    def new(self) -> Session:
        """A sign-in under way."""
        session = self._made()
        self._add(self._pending, session, self._max)
        return session

    def get(self, session_id: str) -> Session | None:
        for held in (self._sessions, self._pending):
            session = held.get(session_id)
            if session is None:
                continue
            if session.expired(time.time()):
                del held[session_id]
                return None
            held.move_to_end(session_id)
            return session
        return None

    def rotate(self, old: Session, tokens: Tokens, username: str, sub: str) -> Session:
        """The signed-in session, under a new id and a new CSRF token; the old id stops working."""
        self.end(old)
        session = self._made()
        session.tokens, session.username, session.sub = tokens, username, sub
        self._add(self._sessions, session, self._max)
        return session

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        self._pending.pop(session.id, None)
