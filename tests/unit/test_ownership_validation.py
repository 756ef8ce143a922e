"""Input rules: device ids as Orion's entity ids, bounded text, locations, grantees.
The OpenAPI pattern for ids and the handler's rule must agree exactly."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from ownership.openapi import DEVICE_ID_PATTERN
from ownership.validation import (
    is_device_id,
    json_problem,
    location_problem,
    orion_id_problem,
    parse_grantee,
    text_problem,
)
from proxy.http.ngsi import valid_ident

ORION_FORBIDDEN = set("&?/#<>\"'=;()")
GATEWAY_FORBIDDEN = set("%\\")
# JSON Schema regexes are ECMA: "$" is the very end. Python's "$" also matches before a
# final newline, so compare with fullmatch on the unanchored body.
ID_BODY = re.compile(DEVICE_ID_PATTERN.removeprefix("^").removesuffix("$"))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=300), max_size=300))
def test_device_id_rule_matches_orion_and_the_openapi_pattern(text):
    expected = (1 <= len(text) <= 256 and text not in (".", "..")
                and all(33 <= ord(c) <= 126 and c not in ORION_FORBIDDEN | GATEWAY_FORBIDDEN for c in text))
    if expected:   # what registers is what the NGSI gateway takes as an entity id
        assert valid_ident(text)
    assert is_device_id(text) == expected
    assert bool(ID_BODY.fullmatch(text)) == expected


def test_device_id_edges():
    assert is_device_id("urn:ngsi-ld:Device:001")
    assert is_device_id("x" * 256) and not is_device_id("x" * 257)
    for bad in ("", " ", "a\nb", "a\n", "a\x00b", "a\x7fb", "ü", "a b"):
        assert not is_device_id(bad) and not ID_BODY.fullmatch(bad)
    for ch in ORION_FORBIDDEN:
        assert not is_device_id(f"a{ch}b")
    # Issue 15 (attack15): ids the NGSI gateway refuses registered, and their entity could never be used.
    for bad in ("\\d+", "a\\", "%2e", "a%b", ".", ".."):
        assert not is_device_id(bad) and not ID_BODY.fullmatch(bad), bad
    assert "NGSI gateway" in orion_id_problem("a\\") and "path" in orion_id_problem("..")
    assert is_device_id("...") and is_device_id(".a")
    assert orion_id_problem(12) == "id must be a string"


def test_text_is_bounded_and_printable():
    assert text_problem(None, "name") is None
    assert text_problem("Küche 🌡", "name") is None
    assert text_problem("x" * 257, "name")
    assert text_problem("a\u0085b", "name") and text_problem("a\tb", "name")
    assert text_problem(None, "name", nullable=False)


def test_locations():
    assert location_problem(None) is None
    assert location_problem({"lat": 43.7, "lon": 11.2, "alt": 50, "label": "lab"}) is None
    assert location_problem("hall, second floor") is None
    for bad in ({"lat": 43.7}, {"lat": "43", "lon": 1}, {"lat": True, "lon": 1}, {"lat": float("nan"), "lon": 1},
                {"lat": 1, "lon": 181}, {"lat": 1, "lon": 1, "extra": 1}, [1, 2], 12, "x" * 257, "a\x00b",
                {"lat": 1, "lon": 1, "label": 5}):
        assert location_problem(bad), bad


def test_grantees():
    for good in ("bob", "group:lab", "anonymous", "service-account-iot-backend", "a@b.example", "x:y",
                 {"user": "6d0f7c1e-9a53"}, {"service": "iot-backend"}, {"group": "lab"}, {"public": True}):
        assert isinstance(parse_grantee(good), tuple), good
    for bad in ("", "group:", "b o b", "tab\t", 7, None, "u" * 256, "bo\ud800b", {}, {"user": ""},
                {"user": "a", "group": "b"}, {"users": "a"}, {"public": False}, {"service": 7}, {"group": "a b"},
                {"user": "\udfff"}, ["bob"]):
        assert isinstance(parse_grantee(bad), str), bad


def test_each_form_of_to_names_its_own_kind():
    """A string is a user name except "anonymous" and group:NAME; the object forms are typed."""
    assert parse_grantee("bob") == ("username", "bob")
    assert parse_grantee("anonymous") == ("public", "")
    assert parse_grantee({"public": True}) == ("public", "")
    assert parse_grantee("group:lab") == ("group", "lab")
    assert parse_grantee({"group": "lab"}) == ("group", "lab")
    assert parse_grantee({"user": "anonymous"}) == ("user", "anonymous")      # a user whose sub is that word
    assert parse_grantee({"service": "group:lab"}) == ("service", "group:lab")


def test_json_problem_finds_what_json_cannot_carry():
    assert json_problem({"a": [1, 2.5, "x", {"b": None}]}) is None
    assert "lone surrogate" in json_problem({"location": {"label": "a\ud800"}})
    assert "lone surrogate" in json_problem({"\udc00": 1})
    assert "lone surrogate" in json_problem(["ok", "\udbff"])
    assert "finite" in json_problem({"lat": float("inf")})
    assert "finite" in json_problem({"lat": float("nan")})
    assert "nested" in json_problem([[[[1]]]], max_depth=3)
    assert json_problem([[[1]]], max_depth=3) is None
    assert json_problem("\U0001F600 paired") is None
