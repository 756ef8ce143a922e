"""What a WebSocket client may make the gateway hold before its CONNECT is authenticated (sans-IO).

aiohttp parses the upgrade request and the WebSocket frames; its own limits are
sized for authenticated clients (a message of ``max_packet_size`` plus slack, 128
header lines of 8 KiB). Before authentication a stranger gets much less, so the
bytes are looked at before aiohttp sees them, by :class:`PreauthGuard`:

* the upgrade request's head (request line and headers, up to the blank line)
  may be at most ``HEAD_MAX_BYTES``; longer: ``431`` and close;
* after the head, every data message (the sum of its fragments) may be at most
  ``message_max`` bytes (``mqtt.limits.connect_max_bytes``), refused at the
  frame header where the length is announced, before its payload is read:
  close 1009 (message too big).

The shell stops feeding the guard once the broker's CONNACK went out: from
then on aiohttp's ``max_msg_size`` (``max_packet_size`` + 64 KiB) applies and
nothing here costs anything per frame.
"""

from __future__ import annotations

__all__ = ["HEAD_MAX_BYTES", "HEAD_TOO_LARGE", "MESSAGE_TOO_BIG", "PreauthGuard", "close_frame"]

HEAD_MAX_BYTES = 16384  # a browser's upgrade request is well under 2 KiB; cookies may add a few
HEAD_TOO_LARGE = "upgrade_head_too_large"
MESSAGE_TOO_BIG = "websocket_message_too_big"
_OPCODE_CONTINUATION, _OPCODE_TEXT, _OPCODE_BINARY = 0, 1, 2

HEAD_REFUSAL = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: 86\r\n\r\n"
                b'{"error":{"code":"header_too_large","message":"the upgrade request head is too long"}}')
if len(HEAD_REFUSAL.split(b"\r\n\r\n", 1)[1]) != 86:  # the Content-Length above
    raise RuntimeError("HEAD_REFUSAL: Content-Length does not match its body")


def _header_size(byte2: int) -> int:
    """A frame header's size from its second byte: the extended length and the mask key."""
    length7 = byte2 & 0x7F
    return 2 + (2 if length7 == 126 else 8 if length7 == 127 else 0) + (4 if byte2 & 0x80 else 0)


def close_frame(code: int) -> bytes:
    """An unmasked (server) WebSocket close frame with ``code`` and no reason."""
    return bytes((0x88, 2, code >> 8, code & 0xFF))


class PreauthGuard:
    """Watches one connection's incoming plaintext until authentication; :meth:`feed` returns
    None while it is within bounds, else the refusal (``HEAD_TOO_LARGE`` / ``MESSAGE_TOO_BIG``)."""

    __slots__ = ("message_max", "head_max", "_head_seen", "_tail", "_head_done", "_header", "_skip", "_message")

    def __init__(self, message_max: int, head_max: int = HEAD_MAX_BYTES):
        self.message_max = message_max
        self.head_max = head_max
        self._head_seen = 0        # bytes of the HTTP head so far
        self._tail = b""           # its last 3 bytes: the blank line may straddle two chunks
        self._head_done = False
        self._header = bytearray()  # a WebSocket frame header split across chunks (at most 14 bytes)
        self._skip = 0             # payload bytes of the current frame still to pass
        self._message = 0          # payload bytes of the current data message so far

    def feed(self, data: bytes) -> str | None:
        pos = 0
        if not self._head_done:
            window = self._tail + data
            end = window.find(b"\r\n\r\n")
            if end < 0:
                self._head_seen += len(data)
                if self._head_seen > self.head_max:
                    return HEAD_TOO_LARGE
                self._tail = window[-3:]
                return None
            pos = end + 4 - len(self._tail)  # offset in data just after the blank line
            self._head_seen += pos
            if self._head_seen > self.head_max:
                return HEAD_TOO_LARGE
            self._head_done = True
            self._tail = b""
        return self._frames(data, pos)

    def _frames(self, data: bytes, pos: int) -> str | None:
        end = len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            header = self._header
            need = 2 if len(header) < 2 else _header_size(header[1])
            while pos < end and len(header) < need:
                header.append(data[pos])
                pos += 1
                if len(header) == 2:
                    need = _header_size(header[1])
            if len(header) < need:
                return None  # the rest of the header comes in the next chunk
            refused = self._frame_header(bytes(header))
            header.clear()
            if refused:
                return refused
        return None

    def _frame_header(self, header: bytes) -> str | None:
        fin, opcode, length7 = header[0] & 0x80, header[0] & 0x0F, header[1] & 0x7F
        if length7 == 126:
            length = int.from_bytes(header[2:4], "big")
        elif length7 == 127:
            length = int.from_bytes(header[2:10], "big")
        else:
            length = length7
        if opcode in (_OPCODE_TEXT, _OPCODE_BINARY):
            self._message = 0
        if opcode in (_OPCODE_CONTINUATION, _OPCODE_TEXT, _OPCODE_BINARY):
            self._message += length
            if self._message > self.message_max:
                return MESSAGE_TOO_BIG
            if fin:
                self._message = 0
        self._skip = length  # control frames (at most 125 bytes: aiohttp checks) pass too
        return None
