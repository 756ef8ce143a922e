"""The pre-authentication WebSocket guard (sans-IO): head budget and message sizes, whatever
the chunking."""

from __future__ import annotations

from proxy.mqtt.wsguard import HEAD_TOO_LARGE, MESSAGE_TOO_BIG, UPGRADE_INVALID, UPGRADE_PIPELINED, PreauthGuard

HEAD = (b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def upgraded(message_max: int) -> PreauthGuard:
    """A guard past the upgrade head, the 101 sent."""
    guard = PreauthGuard(message_max)
    assert guard.feed(HEAD) is None and guard.head_done
    assert guard.take_head() == HEAD
    guard.upgraded()
    return guard


def frame(payload_len: int, *, fin: bool = True, opcode: int = 2, masked: bool = True) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    mask = 0x80 if masked else 0
    if payload_len < 126:
        head = bytes((b0, mask | payload_len))
    elif payload_len < 65536:
        head = bytes((b0, mask | 126)) + payload_len.to_bytes(2, "big")
    else:
        head = bytes((b0, mask | 127)) + payload_len.to_bytes(8, "big")
    return head + (b"\x01\x02\x03\x04" if masked else b"") + b"\x00" * payload_len


def feed_bytewise(guard: PreauthGuard, data: bytes) -> str | None:
    for i in range(len(data)):
        refused = guard.feed(data[i:i + 1])
        if refused:
            return refused
    return None


def test_frames_within_the_limit_pass_in_any_chunking():
    stream = frame(10) + frame(200) + frame(1000, fin=False) + frame(24, opcode=0) + frame(0, opcode=9)
    assert upgraded(1024).feed(stream) is None
    assert feed_bytewise(upgraded(1024), stream) is None


def test_a_message_over_the_limit_is_refused_at_its_header():
    assert upgraded(1024).feed(frame(1025)[:8]) == MESSAGE_TOO_BIG  # the header alone
    assert feed_bytewise(upgraded(1024), frame(1 << 30)[:14]) == MESSAGE_TOO_BIG


def test_fragments_add_up_to_one_message():
    stream = frame(600, fin=False) + frame(600, opcode=0)
    assert upgraded(1024).feed(stream) == MESSAGE_TOO_BIG
    # after a FIN the count starts again
    assert upgraded(1024).feed(frame(600) + frame(600)) is None


def test_the_head_budget():
    pad = b"X: " + b"a" * 100 + b"\r\n"
    assert PreauthGuard(1024, head_max=1000).feed(b"GET / HTTP/1.1\r\n" + pad * 10) == HEAD_TOO_LARGE
    assert feed_bytewise(PreauthGuard(1024, head_max=1000), b"GET / HTTP/1.1\r\n" + pad * 10) == HEAD_TOO_LARGE
    ok = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n" + pad * 8 + b"\r\n"
    assert len(ok) <= 1000 and feed_bytewise(PreauthGuard(1024, head_max=1000), ok) is None


# The outside attack (issue 14): a first request that is not the upgrade, answered by aiohttp
# (404/400) on a kept connection, made the guard read the next pipelined request as frames.
SKIP_ALL = b"\x83\xff" + (1 << 62).to_bytes(8, "big") + b"\0\0\0\0"  # a reserved opcode, a huge length


def test_only_one_request_the_upgrade_before_the_101():
    cases = {
        b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n": "not an MQTT path",
        b"POST /mqtt HTTP/1.1\r\nUpgrade: websocket\r\n\r\n": "not a GET over HTTP/1.1",
        b"GET /mqtt HTTP/1.0\r\nUpgrade: websocket\r\n\r\n": "not a GET over HTTP/1.1",
        b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n": "not a WebSocket upgrade",
        b"GET /mqtt HTTP/1.1\r\nUpgrade: websocket\r\nContent-Length: 14\r\n\r\n": "a request body",
        b"GET /mqtt HTTP/1.1\r\nUpgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n": "a request body",
        b"GET /mqtt HTTP/1.1\r\nUpgrade : websocket\r\n\r\n": "a malformed header line",
        b"GET /mqtt HTTP/1.1\nHost: x\n\n": "line endings other than CRLF",
        b"GET /mqtt HTTP/1.1\r\nHost: x\rUpgrade: websocket\r\n\r\n": "line endings other than CRLF",
    }
    for head, problem in cases.items():
        for feed in (lambda g, d: g.feed(d), feed_bytewise):
            guard = PreauthGuard(1024)
            assert feed(guard, head) == UPGRADE_INVALID, head
            assert guard.problem == problem, head
    assert PreauthGuard(1024).feed(HEAD.replace(b"/mqtt", b"/?x=1")) is None  # a query is fine


def test_bytes_after_the_head_before_the_101_are_refused():
    guard = PreauthGuard(1024)
    assert guard.feed(HEAD + b"\x82") == UPGRADE_PIPELINED  # in the same chunk
    guard = PreauthGuard(1024)
    assert guard.feed(HEAD) is None
    assert guard.feed(b"GET /mqtt HTTP/1.1\r\n") == UPGRADE_PIPELINED  # a second request
    # the attack: request 1 with a "body" that guard-side skips everything, then the upgrade
    req1 = b"GET /nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SKIP_ALL) + SKIP_ALL
    assert PreauthGuard(1024).feed(req1 + HEAD) == UPGRADE_INVALID


def test_the_head_is_held_until_checked():
    guard = PreauthGuard(1024)
    assert guard.feed(HEAD[:20]) is None and not guard.head_done
    assert guard.feed(HEAD[20:]) is None and guard.head_done
    assert guard.take_head() == HEAD
