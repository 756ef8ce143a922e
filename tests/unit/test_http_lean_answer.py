"""``plain_head`` writes the head ``head_bytes`` writes for a relayed answer, or declines.

The gateway relays Orion's usual answer (known length, a body) with ``plain_head``, built in one
pass over a list; every other answer goes through the headers object and ``head_bytes``, which
the lean server's differential test holds to aiohttp's own bytes. Here the two are held to each
other on any header list, status, method and length: where ``plain_head`` answers, its bytes are
the general path's, byte for byte.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.http import lean_answer
from proxy.http.gateway import _relayable
from proxy.http.lean_answer import head_bytes, plain_head

NAMES = st.sampled_from(["Content-Type", "content-type", "CONTENT-TYPE", "Date", "date", "Server", "SERVER",
                         "Content-Length ", "Transfer-Encoding ", "Connection  ",   # as aiohttp's lenient client has it
                         "Fiware-Correlator", "Fiware-Total-Count", "Location", "Vary", "X-Other", "Content-Length",
                         "Transfer-Encoding", "Connection", "Keep-Alive", "Access-Control-Allow-Origin",
                         "Set-Cookie", "X-Named-By-Connection"])
# Printable Latin-1, tab, and the lone surrogates a byte that is not UTF-8 becomes (both heads leave them out).
VALUES = st.text(st.one_of(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
                           st.sampled_from(["\t", "\udc80", "\udcff"])), max_size=12)
CONNECTION = st.sampled_from(["Keep-Alive", "close", "X-Named-By-Connection", "keep-alive, x-named-by-connection"])
STATUSES = st.sampled_from([100, 101, 200, 201, 204, 206, 301, 304, 400, 404, 422, 500, 503])


def _general(method, status, reason, pairs, length, keep_alive) -> bytes:
    """The gateway's general path for a lean request without CORS: _relayed_headers, then head_bytes."""
    headers = CIMultiDict(_relayable(pairs))
    if length is not None:
        headers["Content-Length"] = str(length)
    return head_bytes(method, status, reason, headers, length, keep_alive)[0]


@settings(max_examples=600, derandomize=True, deadline=None)
@given(pairs=st.lists(st.one_of(st.tuples(NAMES, VALUES), st.tuples(st.just("Connection"), CONNECTION)),
                      max_size=8),
       status=STATUSES, method=st.sampled_from(["GET", "HEAD", "POST", "PATCH", "DELETE"]),
       length=st.one_of(st.none(), st.just(0), st.integers(1, 10**9)), keep_alive=st.booleans(),
       reason=st.sampled_from(["OK", "Created", "Not Found", ""]))
def test_plain_head_is_the_general_paths_head_where_it_answers(pairs, status, method, length, keep_alive, reason):
    with pytest.MonkeyPatch.context() as mp:
        # Both paths read the clock for Date: one value, so that a second's tick cannot tell them apart.
        mp.setattr(lean_answer, "rfc822_formatted_time", lambda: "Thu, 03 Dec 2026 17:50:00 GMT")
        plain = plain_head(method, status, reason, _relayable(pairs), length, keep_alive)
        general = _general(method, status, reason, pairs, length, keep_alive)
    if plain is not None:
        assert plain == general
    # It declines exactly the shapes whose framing differs: no length, or an answer that must be empty.
    empty = status in (204, 304) or status < 200 or method == "HEAD"
    assert (plain is None) == (length is None or empty)


def test_orions_usual_answer_takes_the_plain_path():
    pairs = [("Connection", "Keep-Alive"), ("Content-Length", "98"), ("Content-Type", "application/json"),
             ("Fiware-Correlator", "5d2e0a7e-8b5c-11ef-9a6f-0242ac120003"), ("Date", "Thu, 03 Dec 2026 17:49:59 GMT")]
    head = plain_head("GET", 200, "OK", _relayable(pairs), 98, True)
    assert head == (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Fiware-Correlator: 5d2e0a7e-8b5c-11ef-9a6f-0242ac120003\r\n"
                    b"Date: Thu, 03 Dec 2026 17:49:59 GMT\r\n"
                    b"Content-Length: 98\r\nServer: " + lean_answer.SERVER_SOFTWARE.encode() + b"\r\n\r\n")
    assert head == _general("GET", 200, "OK", pairs, 98, True)


def test_framing_and_hop_by_hop_names_with_a_trailing_space_are_not_relayed():
    """aiohttp's client (an https:// Orion) takes ``Content-Length : 2`` and hands the header on as
    ``"Content-Length "``: relayed, the client would get it beside the gateway's own framing."""
    pairs = [("Content-Type", "application/json"), ("Content-Length ", "2"), ("Transfer-Encoding  ", "chunked"),
             ("Connection ", "close, X-Named"), ("X-Named", "s"), ("Upgrade ", "h2c"),
             ("Proxy-Connection ", "keep-alive"), ("Fiware-Correlator", "c")]
    assert _relayable(pairs) == [("Content-Type", "application/json"), ("Fiware-Correlator", "c")]


@pytest.mark.parametrize("pairs, reason", [([("X-A", "a\r\nSet-Cookie: planted")], "OK"), ([("X-A", "a\nb")], "OK"),
                                           ([("X-A", "a\x01b")], "OK"), ([("X-A\r\nX-B", "1")], "OK"),
                                           ([], "OK\r\nSet-Cookie: planted"), ([], "O\x7fK")])
def test_a_control_character_is_refused_as_aiohttps_writer_refuses_it(pairs, reason):
    """The general path raises (aiohttp's writer does: "potential header injection"); plain_head,
    whose header values llhttp has checked, declines a reason phrase (which llhttp does not check)."""
    for length in (2, None):
        with pytest.raises(ValueError):
            _general("GET", 200, reason, pairs, length, True)
    if not pairs:
        assert plain_head("GET", 200, reason, [], 2, True) is None
    # Tab is allowed (plain_head leaves a reason with one to the general path).
    assert plain_head("GET", 200, "OK", [("X-A", "a\tb")], 2, True) is not None
    assert _general("GET", 200, "O\tK", [("X-A", "a\tb")], 2, True)
