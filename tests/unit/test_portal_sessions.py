"""The portal's server-side sessions, PKCE pair and configuration (no browser, no network)."""

from __future__ import annotations

import base64
import hashlib
import re
import time

import pytest

from proxy.config import ConfigError, load_config_text
from proxy.portal.oidc import Tokens, _tokens, pkce_pair
from proxy.portal.sessions import LOGIN_SECONDS, SessionStore

BASE = "oidc:\n  issuer: https://idp.example/realms/iot\n"


def tokens(*, access_in: float = 300, refresh_in: float = 1800, refresh: str = "r") -> Tokens:
    now = time.time()
    return Tokens("a", now + access_in, refresh, now + refresh_in if refresh_in else 0.0, "i")


def test_rotation_at_login_gives_a_new_id_and_csrf_token_and_ends_the_old_one():
    store = SessionStore(10)
    pending = store.new()
    session = store.rotate(pending, tokens(), "alice", "sub-a")
    assert session.id != pending.id and session.csrf != pending.csrf
    assert store.get(pending.id) is None
    assert store.get(session.id) is session and session.signed_in


def test_session_ends_with_its_refresh_token():
    store = SessionStore(10)
    session = store.rotate(store.new(), tokens(refresh_in=-1), "alice", "sub-a")
    assert store.get(session.id) is None


def test_without_a_refresh_token_the_access_token_ends_the_session():
    store = SessionStore(10)
    session = store.rotate(store.new(), tokens(access_in=-1, refresh=""), "alice", "sub-a")
    assert store.get(session.id) is None


def test_a_sign_in_not_completed_in_time_is_gone():
    store = SessionStore(10)
    pending = store.new()
    pending.created_at -= LOGIN_SECONDS + 1
    assert store.get(pending.id) is None


def test_the_least_recently_used_session_goes_first_past_the_bound():
    store = SessionStore(2)
    a, b = (store.rotate(store.new(), tokens(), name, name) for name in ("a", "b"))
    store.get(a.id)
    store.rotate(store.new(), tokens(), "c", "c")
    assert store.get(b.id) is None and store.get(a.id) is a


def test_a_flood_of_sign_ins_started_never_pushes_out_a_signed_in_session():
    store = SessionStore(2)
    signed_in = store.rotate(store.new(), tokens(), "alice", "sub-a")
    started = [store.new() for _ in range(10)]
    assert store.get(signed_in.id) is signed_in
    assert store.get(started[0].id) is None and store.get(started[-1].id) is started[-1]


def test_csrf_check_is_exact():
    session = SessionStore(1).new()
    assert session.csrf_ok(session.csrf)
    assert not session.csrf_ok("") and not session.csrf_ok(session.csrf + "x") and not session.csrf_ok("forged")


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
