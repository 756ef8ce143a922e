"""The portal's server-side sessions, PKCE pair and configuration (no browser, no network)."""

from __future__ import annotations

import base64
import hashlib
import re
import time

import pytest

from proxy.config import ConfigError, load_config_text
from proxy.portal.oidc import Tokens, _tokens, pkce_pair
from proxy.portal.sessions import SessionStore
from proxy.portal.signin import LOGIN_SECONDS, SignInSealer

BASE = "oidc:\n  issuer: https://idp.example/realms/iot\n"


def tokens(*, access_in: float = 300, refresh_in: float = 1800, refresh: str = "r") -> Tokens:
    now = time.time()
    return Tokens("a", now + access_in, refresh, now + refresh_in if refresh_in else 0.0, "i")


def test_a_session_starts_signed_in_under_fresh_random_ids():
    store = SessionStore(10)
    a, b = store.start(tokens(), "alice", "sub-a"), store.start(tokens(), "alice", "sub-a")
    assert a.id != b.id and a.csrf != b.csrf and len(a.id) >= 43
    assert store.get(a.id) is a and a.signed_in
    store.end(a)
    assert store.get(a.id) is None and store.get(b.id) is b


def test_session_ends_with_its_refresh_token():
    store = SessionStore(10)
    session = store.start(tokens(refresh_in=-1), "alice", "sub-a")
    assert store.get(session.id) is None


def test_without_a_refresh_token_the_access_token_ends_the_session():
    store = SessionStore(10)
    session = store.start(tokens(access_in=-1, refresh=""), "alice", "sub-a")
    assert store.get(session.id) is None


def test_the_least_recently_used_session_goes_first_past_the_bound():
    store = SessionStore(2)
    a, b = (store.start(tokens(), name, name) for name in ("a", "b"))
    store.get(a.id)
    store.start(tokens(), "c", "c")
    assert store.get(b.id) is None and store.get(a.id) is a


def test_csrf_check_is_exact():
    session = SessionStore(1).start(tokens(), "alice", "sub-a")
    assert session.csrf_ok(session.csrf)
    assert not session.csrf_ok("") and not session.csrf_ok(session.csrf + "x") and not session.csrf_ok("forged")


# --------------------------------------------------------------------------- sign-ins under way (sealed cookie)

class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_a_sealed_sign_in_opens_only_with_its_own_state():
    sealer = SignInSealer()
    sealed = sealer.seal("state-1", "verifier-1")
    assert "verifier-1" not in sealed and "state-1" not in sealed   # the browser cannot read it
    assert sealer.open(sealed, "state-1") == "verifier-1"
    assert sealer.open(sealed, "state-2") is None                  # someone else's callback (login CSRF)
    assert sealer.open(sealed, "") is None


def test_a_sealed_sign_in_cannot_be_forged_moved_or_kept():
    clock = Clock()
    sealer = SignInSealer(clock=clock)
    sealed = sealer.seal("s", "v")
    flipped = sealed[:20] + ("A" if sealed[20] != "A" else "B") + sealed[21:]
    assert sealer.open(flipped, "s") is None                       # tampered
    assert SignInSealer().open(sealed, "s") is None                # another process's key (or a restart)
    assert sealer.open("not-base64!!", "s") is None and sealer.open("", "s") is None
    clock.t += LOGIN_SECONDS + 1
    assert sealer.open(sealed, "s") is None                        # too old


def test_starting_sign_ins_keeps_nothing_a_flood_could_push_out():
    # The attack this replaces: GET /portal/login without an account made a server-side pending
    # session, and max_sessions of them pushed out a person's sign-in under way. Now a sign-in
    # is only its sealed cookie: a flood of them leaves the person's still opening, and the store
    # of signed-in sessions untouched.
    sealer, store = SignInSealer(), SessionStore(2)
    signed_in = store.start(tokens(), "bob", "sub-b")
    person = sealer.seal("state-of-the-person", "verifier")
    for i in range(10_000):
        sealer.seal(f"s{i}", "v")
    assert sealer.open(person, "state-of-the-person") == "verifier"
    assert len(store) == 1 and store.get(signed_in.id) is signed_in


def test_pkce_challenge_is_the_s256_of_the_verifier():
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    assert challenge == base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert pkce_pair()[0] != verifier


def test_a_refresh_without_a_new_refresh_token_keeps_the_old_one_and_its_end():
    first = tokens()
    again = _tokens({"access_token": "b", "expires_in": 60}, time.time(), first)
    assert again.refresh_token == first.refresh_token and again.refresh_expires_at == first.refresh_expires_at


@pytest.mark.parametrize(("text", "message"), [
    ("portal:\n  path: /portal\n", "portal.path: must be a path"),
    ("portal:\n  path: portal/\n", "portal.path: must be a path"),
    ("http:\n  tls: false\nportal:\n  path: /api/v1/portal/\n", "portal.path: must not lie under http.api_prefix"),
    ("portal:\n  public_url: ftp://x/\n", "portal.public_url: must be an http(s) URL"),
    ("portal:\n  max_sessions: 0\n", "portal.max_sessions: must be at least 1"),
    ("portal:\n  client_secret: literal\n", "secrets may not be written in the file"),
])
def test_bad_portal_settings_are_refused_naming_the_key(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config_text(BASE + text)


def test_portal_defaults():
    portal = load_config_text(BASE).portal
    assert portal.enabled and portal.path == "/portal/" and portal.client_id == "iot-portal"
