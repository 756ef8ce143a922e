"""What a WebSocket client may make the gateway hold before its CONNECT is authenticated (sans-IO).

aiohttp parses the upgrade request and the WebSocket frames; its own limits are
sized for authenticated clients (a message of ``max_packet_size`` plus slack, 128
header lines of 8 KiB). Before authentication a stranger gets much less, so the
bytes are looked at before aiohttp sees them, by :class:`PreauthGuard`:

* the upgrade request's head (request line and headers, up to the blank line)
  may be at most ``HEAD_MAX_BYTES``; longer: ``431`` and close;
* exactly one request before the upgrade (aiohttp would keep a connection
  after a 404 or 400 and parse the next pipelined request, which this guard
  would read as frames): the head must be a ``GET`` of an MQTT path over
  HTTP/1.1 with CRLF line endings, an ``Upgrade: websocket`` header and no
  body (no ``Content-Length`` / ``Transfer-Encoding``), else ``400`` and close
  (``UPGRADE_INVALID``); a byte after the head before the shell says the 101
  is going out (:meth:`PreauthGuard.upgraded`) closes (``UPGRADE_PIPELINED``);
* after the upgrade, every data message (the sum of its fragments) may be at most
  ``message_max`` bytes (``mqtt.limits.connect_max_bytes``), refused at the
  frame header where the length is announced, before its payload is read:
  close 1009 (message too big).

Safety does not rest on this parser alone: aiohttp's own WebSocket reader is
made with ``max_msg_size`` of ``message_max`` (it too refuses at the frame
header). Once the broker's CONNACK went out, the shell waits for the first
chunk that ends at a message boundary (:attr:`PreauthGuard.at_message_boundary`),
gives aiohttp a reader of ``max_packet_size`` + 64 KiB, and stops feeding the
guard: from then on nothing here costs anything per frame.
"""

from __future__ import annotations

__all__ = ["HEAD_MAX_BYTES", "HEAD_TOO_LARGE", "MESSAGE_TOO_BIG", "UPGRADE_INVALID", "UPGRADE_PIPELINED",
           "PreauthGuard", "close_frame", "refusal_response"]

HEAD_MAX_BYTES = 16384  # a browser's upgrade request is well under 2 KiB; cookies may add a few
HEAD_TOO_LARGE = "upgrade_head_too_large"
MESSAGE_TOO_BIG = "websocket_message_too_big"
UPGRADE_INVALID = "upgrade_request_invalid"
UPGRADE_PIPELINED = "upgrade_request_pipelined"
_FORBIDDEN_HEADERS = (b"content-length", b"transfer-encoding")
_OPCODE_CONTINUATION, _OPCODE_TEXT, _OPCODE_BINARY = 0, 1, 2

def refusal_response(status: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 JSON error response that closes the connection."""
    body = b'{"error":{"code":"%s","message":"%s"}}' % (code.encode(), message.encode())
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            % (status.encode(), len(body))) + body


HEAD_REFUSAL = refusal_response("431 Request Header Fields Too Large", "header_too_large",
                                "the upgrade request head is too long")
INVALID_REFUSAL = refusal_response("400 Bad Request", "websocket_required",
                                   "MQTT over WebSocket: one GET upgrade request with subprotocol mqtt")


def upgrade_head_problem(head: bytes, paths: tuple[str, ...]) -> str | None:
    """Why ``head`` (up to and including its blank line) is not the one upgrade request allowed."""
    if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
        return "line endings other than CRLF"
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
        return "not a GET over HTTP/1.1"
    if parts[1].split(b"?", 1)[0].decode("latin-1") not in paths:
        return "not an MQTT path"
    upgrade = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        name = name.lower()
        if not sep or name != name.strip() or not name:
            return "a malformed header line"
        if name in _FORBIDDEN_HEADERS:
            return "a request body"
        if name == b"upgrade" and b"websocket" in value.lower():
            upgrade = True
    return None if upgrade else "not a WebSocket upgrade"


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

    __slots__ = ("message_max", "head_max", "paths", "problem", "_head", "_head_done", "_upgraded", "_header",
                 "_skip", "_message")

    def __init__(self, message_max: int, head_max: int = HEAD_MAX_BYTES, paths: tuple[str, ...] = ("/mqtt", "/")):
        self.message_max = message_max
        self.head_max = head_max
        self.paths = paths
        self.problem = ""          # what was wrong with the head (for the audit line)
        self._head = bytearray()   # the HTTP head so far (at most head_max bytes)
        self._head_done = False
        self._upgraded = False     # the shell is answering 101: what follows is WebSocket frames
        self._header = bytearray()  # a WebSocket frame header split across chunks (at most 14 bytes)
        self._skip = 0             # payload bytes of the current frame still to pass
        self._message = 0          # payload bytes of the current data message so far

    @property
    def head_done(self) -> bool:
        return self._head_done

    def feed(self, data: bytes) -> str | None:
        """None: within bounds (until :attr:`head_done` the bytes are held here, not passed on:
        aiohttp sees only a head that was checked, via :meth:`take_head`)."""
        if self._upgraded:
            return self._frames(data, 0)
        if self._head_done:
            return UPGRADE_PIPELINED if data else None  # a second request, or frames before the 101
        head = self._head
        old = len(head)
        head += data
        # A bare LF (or CR) anywhere: not the CRLF head asked for, refused before aiohttp parses it.
        region = head[max(0, old - 1):]  # (a CR last time may pair with an LF now)
        pairs = region.count(b"\r\n")
        if data.count(b"\n") != pairs or region.count(b"\r") - pairs > (1 if region.endswith(b"\r") else 0):
            self._head_done = True
            self.problem = "line endings other than CRLF"
            return UPGRADE_INVALID
        end = head.find(b"\r\n\r\n", max(0, old - 3))
        if end < 0:
            return HEAD_TOO_LARGE if len(head) > self.head_max else None
        end += 4
        if end > self.head_max:
            return HEAD_TOO_LARGE
        self._head_done = True
        problem = upgrade_head_problem(bytes(head[:end]), self.paths)
        if problem is not None:
            self.problem = problem
            return UPGRADE_INVALID
        return UPGRADE_PIPELINED if len(head) > end else None

    def take_head(self) -> bytes:
        """The checked head, to pass on (once)."""
        head, self._head = bytes(self._head), bytearray()
        return head

    @property
    def at_message_boundary(self) -> bool:
        """Upgraded, and the bytes so far end where a frame and a data message end."""
        return self._upgraded and not self._skip and not self._header and not self._message

    def upgraded(self) -> None:
        """The shell accepted the upgrade (the 101 is going out): from now on, frames."""
        self._upgraded = True

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
