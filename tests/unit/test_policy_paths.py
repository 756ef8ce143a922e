"""normalize_path: every trick that would make the gateway and Orion read a path differently."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.policy.paths import PathError, normalize_path


@pytest.mark.parametrize("raw,expected", [
    ("/", "/"),
    ("/v2/entities", "/v2/entities"),
    ("/v2/entities/", "/v2/entities"),              # trailing slash
    ("//v2///entities//d1", "/v2/entities/d1"),      # duplicate slashes
    ("/v2/entities/../admin", "/v2/admin"),          # plain dot segments are resolved...
    ("/v2/./entities/d1/.", "/v2/entities/d1"),
    ("/v2/entities/room%2D1", "/v2/entities/room-1"),  # decoding
    ("/v2/entities/%C3%A9t%C3%A9", "/v2/entities/été"),
    ("/v2/entities/%41", "/v2/entities/A"),
    ("/v2/entities/a..b", "/v2/entities/a..b"),      # not a dot segment
])
def test_normalises(raw, expected):
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", [
    "/..",                                   # above the root
    "/v2/../../admin",
    "/v2/entities/%2e%2e/admin",             # encoded dot segments
    "/v2/entities/%2E%2E/admin",
    "/v2/entities/.%2e/admin",
    "/v2/entities/%2e/admin",
    "/v2/entities/d1%2F..%2Fadmin",          # encoded slash inside a segment
    "/v2/entities/d1%2fx",
    "/v2/entities/d1%5C..%5Cadmin",          # encoded backslash
    "/v2/entities/d1\\..\\admin",            # raw backslash
    "/v2/entities/d1%00",                    # NUL, encoded
    "/v2/entities/d1\x00",                   # NUL, raw
    "/v2/entities/d1%0a",                    # control characters
    "/v2/entities/d1 x",                     # raw whitespace
    "/v2/entities/d1\u00a0x",
    "/v2/entities/room%201",                 # encoded whitespace (NGSI ids cannot hold it)
    "/v2/entities/%2541",                    # an encoded % would decode again the second time
    "/v2/entities/%252e%252e/admin",
    "/v2/entities/%3Fx",                     # encoded ? and #
    "/v2/entities/%23x",
    "/v2/entities/%zz",                      # invalid percent-encoding
    "/v2/entities/%4",
    "/v2/entities/%",
    "/v2/entities/%ff%fe",                   # not UTF-8
    "/v2/entities?x=1",                      # a query must be split off first
    "/v2/entities#frag",
    "v2/entities",                           # not absolute
    "",
])
def test_refuses(raw):
    with pytest.raises(PathError):
        normalize_path(raw)


def test_idempotent_on_its_output():
    once = normalize_path("//v2/./entities/x/../caf%C3%A9%2Dbar/")
    assert once == "/v2/entities/café-bar"
    assert normalize_path(once) == once


@given(st.lists(st.sampled_from(["v2", "..", ".", "", "%2e", "%2E%2e", "%2F", "%25", "%2541", "a%20b", "%41",
                                 "%C3%A9", "é", "%", "%zz", "x?y", "%3F", "%00", "entities"]), max_size=6))
def test_normalising_twice_changes_nothing(segments):
    raw = "/" + "/".join(segments)
    try:
        once = normalize_path(raw)
    except PathError:
        return
    assert normalize_path(once) == once
    assert "%" not in once and "/." not in once and "//" not in once
