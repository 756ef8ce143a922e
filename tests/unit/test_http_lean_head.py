"""Which heads the lean server serves itself (sans-IO): everything that is not the plain shape of
an NGSI request goes to aiohttp's server, and a head it serves reads as aiohttp reads it."""

from __future__ import annotations

import pytest

from proxy.http.lean_head import MAX_HEAD, MAX_HEADERS, Head, head_end, lean_target, read_head

PREFIXES = ("/api/v1", "/portal")


def _head(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def test_a_plain_read_is_served_as_sent():
    head = read_head(_head(["GET /v2/entities/a-1?attrs=t HTTP/1.1", "Host: k", "Authorization: Bearer x",
                            "X-Name: caf\u00e9", "X-Name: second"]), PREFIXES)
    assert isinstance(head, Head)
    assert (head.method, head.target, head.host, head.content_length, head.keep_alive) == \
        ("GET", "/v2/entities/a-1?attrs=t", "k", None, True)
    assert head.headers.getall("x-name") == ["caf\u00e9", "second"]   # UTF-8, in order, case-insensitive
    assert next(iter(head.headers.keys())) == "Host"


@pytest.mark.parametrize("connection,keep", [("close", False), ("keep-alive, Close", False), ("keep-alive", True),
                                             ("x-close", True)])
def test_keep_alive_follows_the_connection_header(connection, keep):
    head = read_head(_head(["GET /v2/entities HTTP/1.1", "Host: k", f"Connection: {connection}"]), PREFIXES)
    assert isinstance(head, Head) and head.keep_alive is keep


def test_a_body_length_is_read():
    head = read_head(_head(["PATCH /v2/entities/a/attrs HTTP/1.1", "Host: k", "Content-Length: 42"]), PREFIXES)
    assert isinstance(head, Head) and head.content_length == 42


@pytest.mark.parametrize("lines,why", [
    (["GET /v2/entities HTTP/1.0", "Host: k"], "not HTTP/1.1"),
    (["PROPFIND /v2/entities HTTP/1.1", "Host: k"], "method"),
    (["GET /api/v1/devices HTTP/1.1", "Host: k"], "target"),
    (["GET /v2/entities/%2e%2e HTTP/1.1", "Host: k"], "target"),
    (["GET http://k/v2/entities HTTP/1.1", "Host: k"], "target"),
    (["GET /v2/x HTTP/1.1"], "Host"),
    (["GET /v2/x HTTP/1.1", "Host: a", "Host: b"], "Host"),
    # both framings, or the same length twice: llhttp itself refuses them
    (["PATCH /v2/x HTTP/1.1", "Host: k", "Content-Length: 4", "Transfer-Encoding: chunked"], "does not parse"),
    (["PATCH /v2/x HTTP/1.1", "Host: k", "Transfer-Encoding: chunked"], "transfer-encoding"),
    (["PATCH /v2/x HTTP/1.1", "Host: k", "Content-Length: 4", "Content-Length: 4"], "does not parse"),
    (["PATCH /v2/x HTTP/1.1", "Host: k", "Expect: 100-continue", "Content-Length: 4"], "expect"),
    (["GET /v2/x HTTP/1.1", "Host: k", "Upgrade: h2c", "Connection: upgrade"], "upgrade"),
    (["GET /v2/x HTTP/1.1", "Host: k", "X-A: 1", " folded"], "does not parse"),
    (["GET /v2/x HTTP/1.1", "Host: k", "X-A : 1"], "does not parse"),
    (["GET /v2/x HTTP/1.1", "Host: k", "X-A: a\x01b"], "does not parse"),
    (["GET /v2/x HTTP/1.1", "Host: k", "X-Long: " + "y" * 9000], "field too long"),
    (["GET /v2/x HTTP/1.1", "Host: k"] + [f"X-{i}: v" for i in range(MAX_HEADERS)], "too many headers"),
])
def test_what_is_not_the_plain_shape_goes_to_aiohttp(lines, why):
    assert read_head(_head(lines), PREFIXES) == why


def test_a_content_length_with_a_sign_is_not_served():
    assert not isinstance(read_head(_head(["PATCH /v2/x HTTP/1.1", "Host: k", "Content-Length: +4"]), PREFIXES),
                          Head)


@pytest.mark.parametrize("target,served", [
    ("/v2", True), ("/v2?options=count", True), ("/v2/entities/urn:ngsi-ld:T:1.2", True),
    ("/v2/a/.b", True), ("/v20/entities", False), ("/v2/./entities", False), ("/v2/a/..", False),
    ("/v2/a/..?x=1", False), ("/v2/a%2Fb", False), ("/v2/a\\b", False), ("/v2/a#f", False), ("//v2/a", False),
    ("/v2/caf\u00e9", False), ("/portal", False),
])
def test_targets(target, served):
    assert lean_target(target, PREFIXES) is served


def test_a_mounted_prefix_under_v2_is_never_served_here():
    assert not lean_target("/v2/admin/x", ("/v2/admin",))
    assert lean_target("/v2/administrators", ("/v2/admin",))


def test_head_end():
    data = b"GET /v2/x HTTP/1.1\r\nHost: k\r\n\r\nGET /v2/y"
    end = head_end(data, 0)
    assert data[:end].endswith(b"\r\n\r\n") and head_end(data, end) == -1   # the second one is on its way
    assert head_end(b"GET /v2/x HTTP/1.1\r\nHost: k\r\n", 0) == -1
    assert head_end(b"GET /v2/x HTTP/1.1\nHost: k\n\n", 0) == -2             # a bare LF: aiohttp's to answer
    # A whole head with a bare LF ends where its CRLF CRLF does; read_head refuses it (and the
    # lean server caches only heads read_head took).
    lf = b"GET /v2/x HTTP/1.1\nHost: k\r\n\r\n"
    assert head_end(lf, 0) == len(lf) and read_head(lf, ()) == "bare LF"
    assert read_head(b"GET /v2/x HTTP/1.1\r\nHost: k\r\nX: a\nb\r\n\r\n", ()) == "bare LF"
    assert head_end(b"\x16\x03\x01\x02\x00", 0) == -2                      # a TLS hello on the plain port
    assert head_end(b"\r\nGET /v2/x", 0) == -2                              # leading blank lines
    assert head_end(b"GARBAGE\r\nHost: k\r\n", 0) == -2                     # not a request line
    assert head_end(b"GET /v2/x HTTP/1.1\r\nX: \x01", 0) == -2              # a control character
    assert head_end(b"GET /v2/" + b"x" * (MAX_HEAD + 10), 0) == -2          # too long to be served here
