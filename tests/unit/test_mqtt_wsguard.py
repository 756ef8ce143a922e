"""The pre-authentication WebSocket guard (sans-IO): head budget and message sizes, whatever
the chunking."""

from __future__ import annotations

from proxy.mqtt.wsguard import HEAD_TOO_LARGE, MESSAGE_TOO_BIG, PreauthGuard

HEAD = b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n"


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
    stream = HEAD + frame(10) + frame(200) + frame(1000, fin=False) + frame(24, opcode=0) + frame(0, opcode=9)
    assert PreauthGuard(1024).feed(stream) is None
    assert feed_bytewise(PreauthGuard(1024), stream) is None


def test_a_message_over_the_limit_is_refused_at_its_header():
    guard = PreauthGuard(1024)
    assert guard.feed(HEAD) is None
    assert guard.feed(frame(1025)[:8]) == MESSAGE_TOO_BIG  # the header alone
    assert feed_bytewise(PreauthGuard(1024), HEAD + frame(1 << 30)[:14]) == MESSAGE_TOO_BIG


def test_fragments_add_up_to_one_message():
    stream = HEAD + frame(600, fin=False) + frame(600, opcode=0)
    assert PreauthGuard(1024).feed(stream) == MESSAGE_TOO_BIG
    # after a FIN the count starts again
    assert PreauthGuard(1024).feed(HEAD + frame(600) + frame(600)) is None


def test_the_head_budget():
    pad = b"X: " + b"a" * 100 + b"\r\n"
    assert PreauthGuard(1024, head_max=1000).feed(b"GET / HTTP/1.1\r\n" + pad * 10) == HEAD_TOO_LARGE
    assert feed_bytewise(PreauthGuard(1024, head_max=1000), b"GET / HTTP/1.1\r\n" + pad * 10) == HEAD_TOO_LARGE
    ok = b"GET / HTTP/1.1\r\n" + pad * 8 + b"\r\n"
    assert len(ok) <= 1000 and feed_bytewise(PreauthGuard(1024, head_max=1000), ok) is None
