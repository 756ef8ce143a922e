"""The NGSI gateway's body input: whatever the bytes, a parsed value or a typed refusal, never an exception.

``ngsi.parse_json_body`` is what stands between a client's bytes and the rest of the
gateway (analysis, planning, re-serialisation for Orion). The property tests throw
arbitrary bytes, JSON-looking text and real JSON with the awkward parts (deep nesting,
surrogate escapes, huge and non-finite numbers, duplicate keys) at it, then at
``ngsi.analyse`` and at the re-serialisation the gateway sends on.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.http import ngsi
from proxy.http.plan import _dump
from proxy.jsonlimits import nesting_depth, too_deep

SETTINGS = settings(max_examples=int(os.environ.get("KEYGATE_FUZZ_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
DEPTH = 32
PATHS = [("POST", "/v2/entities"), ("POST", "/v2/op/update"), ("POST", "/v2/op/query"),
         ("POST", "/v2/subscriptions"), ("PATCH", "/v2/subscriptions/5f0c1e2d3b4a59687a6b7c8d")]


def reference_depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30)

# Strings with any code point, lone surrogates included (json.dumps writes those as \\ud800-style escapes).
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=8)
json_with_surrogates = st.recursive(
    st.none() | st.integers() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=20)

# Fragments that JSON parsers, and the code after them, trip over.
AWKWARD = ["[", "]", "{", "}", '"', "\\", "\\u", "\\ud800", "\\udfff", "\\ud83d\\ude00", "1e400", "-1e400", "1e-400",
           "NaN", "Infinity", "-Infinity", "1" + "0" * 320, "9" * 5000, ",", ":", '"id"', '"a-1"', '"entities"',
           '"actionType"', '"update"', '"subject"', '"notification"', '"http"', '"url"', "null", "true", "0", " "]
json_like = st.lists(st.sampled_from(AWKWARD), max_size=60).map("".join)


def _check(raw: bytes) -> None:
    parsed = ngsi.parse_json_body(raw, DEPTH)
    if isinstance(parsed, ngsi.Reject):
        assert (parsed.status, parsed.error) == (400, "ParseError")
        return
    # What is accepted is what Orion will be sent: valid, finite JSON of no more than the cap's depth,
    # reading back as the same value.
    sent = _dump(parsed)
    assert json.loads(sent) == parsed
    assert reference_depth(parsed) <= DEPTH
    json.dumps(parsed, allow_nan=False)
    for method, path in PATHS:
        action = ngsi.analyse(ngsi.NgsiRequest(method, path, (), parsed))
        assert action is not None


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_parsed_or_refused(raw):
    _check(raw)


@SETTINGS
@given(json_like)
def test_json_looking_text_is_parsed_or_refused(text):
    _check(text.encode("utf-8", "surrogatepass"))


@SETTINGS
@given(json_values, st.integers(0, 40))
def test_real_json_nested_at_any_depth(value, extra):
    for _ in range(extra):
        value = [value]
    raw = json.dumps(value).encode()
    parsed = ngsi.parse_json_body(raw, DEPTH)
    if reference_depth(value) > DEPTH:
        assert isinstance(parsed, ngsi.Reject) and "nested deeper" in parsed.description
    else:
        assert parsed == value
    _check(raw)


@SETTINGS
@given(json_with_surrogates)
def test_strings_with_any_code_point_are_parsed_or_refused(value):
    raw = json.dumps(value).encode()
    parsed = ngsi.parse_json_body(raw, DEPTH)
    try:
        raw.decode("ascii").encode("utf-8")
        _dump(value)
        representable = True
    except UnicodeEncodeError:
        representable = False
    if representable:
        assert parsed == value
    else:
        assert isinstance(parsed, ngsi.Reject) and "lone surrogate" in parsed.description
    _check(raw)


@SETTINGS
@given(json_values)
def test_depth_is_counted_as_the_parser_nests(value):
    raw = json.dumps(value).encode()
    assert nesting_depth(raw) == reference_depth(value)
    assert too_deep(raw, reference_depth(value)) is False
    if reference_depth(value) > 0:
        assert too_deep(raw, reference_depth(value) - 1) is True


@pytest.mark.parametrize("raw", [b"[" * 100_000, b"{\"a\":" * 100_000, b"[" * 50_000 + b"]" * 50_000,
                                 b'["' + b"[" * 100_000 + b'"]'])
def test_deep_or_unclosed_nesting_is_refused_without_recursion(raw):
    parsed = ngsi.parse_json_body(raw, DEPTH)
    if raw.startswith(b'["'):
        assert parsed == ["[" * 100_000]   # brackets inside a string do not nest
    else:
        assert isinstance(parsed, ngsi.Reject) and parsed.description == "JSON nested deeper than 32 levels"


@pytest.mark.parametrize("raw,why", [
    (b'{"a": "\\ud800"}', "lone surrogate"), (b'["\\udc00x"]', "lone surrogate"), (b'{"\\ud800": 1}', "lone surrogate"),
    (b"[1e400]", "out of range"), (b"[-1e400]", "out of range"), (b"[" + b"1" * 400 + b"]", "out of range"),
    (b"[NaN]", "not JSON"), (b"[Infinity]", "not JSON"), (b"[-Infinity]", "not JSON"),
    (b'{"id": 1, "id": 2}', "duplicate key"), (b"\xff", "UTF-8"), (b"[" + b"1" * 5000 + b"]", "JSON buffer"),
    (b"[1,]", "JSON buffer"),
])
def test_each_refusal_says_what_is_wrong(raw, why):
    parsed = ngsi.parse_json_body(raw, DEPTH)
    assert isinstance(parsed, ngsi.Reject) and parsed.error == "ParseError" and why in parsed.description


def test_what_passes_round_trips():
    assert ngsi.parse_json_body(b'["\\ud83d\\ude00", 1e308, -1e-400, 12345678901234567890]', DEPTH) == \
        ["\U0001F600", 1e308, -0.0, 12345678901234567890]
    assert math.copysign(1, ngsi.parse_json_body(b"[-1e-400]", DEPTH)[0]) == -1
    assert ngsi.parse_json_body(b'"\\\\ud800"', DEPTH) == "\\ud800"   # an escaped backslash, not a surrogate
