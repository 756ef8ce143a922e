"""MQTT framing, decoding and encoding, without I/O.

:class:`Framer` cuts a byte stream into packets. It reads the fixed header
first and refuses, before buffering any body, a remaining length longer than
four bytes, a packet larger than the configured maximum, an unknown packet
type or wrong reserved flags. Packets that arrive whole inside one chunk are
handed out as :class:`memoryview` slices of that chunk (no copy); only a
packet split across chunks is reassembled into its own ``bytes``.

The decoders read the packets the gateway must understand and reject
everything a broker would reject, so that gateway and broker never read the
same bytes differently. Strings are strict UTF-8 ([MQTT-1.5.4]): no encoded
surrogates, no U+0000; topic names, topic filters and client ids additionally
refuse control characters and non-characters (as Mosquitto does). Every
failure is a :class:`ProtocolError` carrying the MQTT 5 reason code.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from proxy.mqtt.packets import (
    ALLOWED_PROPS,
    MQTT_5,
    MQTT_31,
    MQTT_311,
    PROP_TYPES,
    REPEATABLE_PROPS,
    REQUIRED_FLAGS,
    WILL,
    Auth,
    Connack,
    Connect,
    Disconnect,
    PacketType,
    Properties,
    PropType,
    PropValue,
    PublishInfo,
    Reason,
    Suback,
    Subscribe,
    Subscription,
    Unsubscribe,
)
from proxy.mqtt.packets import Will as WillRecord

MAX_REMAINING_LENGTH = 268_435_455  # what four length bytes can say


class ProtocolError(Exception):
    """The peer broke the protocol. ``reason_code`` is the MQTT 5 reason code to answer with."""

    def __init__(self, reason_code: int, message: str, *, protocol_level: int | None = None):
        super().__init__(message)
        self.reason_code = int(reason_code)
        self.message = message
        self.frames: list[Frame] = []  # set by Framer.feed: the packets complete before the error
        # Set by decode_connect once the level byte was read: which CONNACK format to answer in.
        self.protocol_level = protocol_level

    def __repr__(self) -> str:
        return f"ProtocolError(0x{self.reason_code:02X}, {self.message!r})"


class LimitExceeded(ProtocolError):
    """A field longer than the gateway's configured limit (not a violation of MQTT itself):
    refused before its bytes are decoded. ``action`` names the packet for the audit record."""

    def __init__(self, reason_code: int, message: str, *, action: str):
        super().__init__(reason_code, message)
        self.action = action


def _check_length(n: int, limit: int, what: str, reason_code: int, action: str) -> None:
    if limit and n > limit:
        raise LimitExceeded(reason_code, f"{what} of {n} bytes exceeds the limit of {limit}", action=action)


def peek_connect_level(head: bytes | bytearray | memoryview) -> int | None:
    """The protocol level of the CONNECT whose first bytes are ``head`` (fixed header included),
    0 if they are not a CONNECT of a known protocol name, None if more bytes are needed: lets a
    CONNECT refused at its fixed header be answered in its client's version."""
    i = 1
    while i < len(head) and head[i] & 0x80:
        i += 1
    i += 1  # past the last remaining-length byte
    if i + 2 > len(head):
        return None
    n = (head[i] << 8) | head[i + 1]
    if n not in (4, 6):
        return 0
    i += 2 + n
    if i >= len(head):
        return None
    return head[i] if bytes(head[i - n:i]) in (b"MQTT", b"MQIsdp") else 0


CONNECT_HEAD_BYTES = 14  # fixed header (<= 5), protocol name (2 + <= 6), level (1)


def _malformed(msg: str) -> ProtocolError:
    return ProtocolError(Reason.MALFORMED_PACKET, msg)


def _proto(msg: str) -> ProtocolError:
    return ProtocolError(Reason.PROTOCOL_ERROR, msg)


# --------------------------------------------------------------------------- framing


class Frame:
    """One packet: ``raw`` is the whole packet, fixed header included."""

    __slots__ = ("type", "flags", "raw", "body_start", "start", "end")

    def __init__(self, ptype: int, flags: int, raw: memoryview, body_start: int, start: int, end: int):
        self.type = ptype
        self.flags = flags
        self.raw = raw
        self.body_start = body_start
        # Offsets inside the chunk passed to feed(); -1 when reassembled from several chunks.
        self.start = start
        self.end = end

    @property
    def body(self) -> memoryview:
        return self.raw[self.body_start:]

    def __repr__(self) -> str:
        return f"Frame({PacketType(self.type).name}, flags={self.flags}, len={len(self.raw)})"


def _valid_first_byte(byte1: int) -> bool:
    try:
        check_fixed_header(byte1)
    except ProtocolError:
        return False
    return True


def check_fixed_header(byte1: int) -> tuple[int, int]:
    """Packet type and flags of a first header byte; refuses reserved types and wrong flags."""
    ptype, flags = byte1 >> 4, byte1 & 0x0F
    if ptype == 0:
        raise _malformed("reserved packet type 0")
    if ptype == PacketType.PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise _malformed("PUBLISH with QoS 3")
        if qos == 0 and flags & 0x08:
            raise _malformed("PUBLISH QoS 0 with DUP set")
    elif flags != REQUIRED_FLAGS[PacketType(ptype)]:
        raise _malformed(f"{PacketType(ptype).name} with reserved flags {flags:#x}")
    return ptype, flags


def parse_header(buf: bytes | bytearray | memoryview, pos: int, end: int,
                 max_size: int) -> tuple[int, int, int, int] | None:
    """``(type, flags, header length, total length)`` of the packet at ``pos``, or None if
    the header is not complete yet. Raises as soon as the header shows a bad packet."""
    if pos >= end:
        return None
    byte1 = buf[pos]
    if not VALID_BYTE1[byte1]:
        check_fixed_header(byte1)  # raises with the precise message
    ptype, flags = byte1 >> 4, byte1 & 0x0F
    length = 0
    shift = 0
    i = pos + 1
    while True:
        if i >= end:
            return None
        b = buf[i]
        length |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            break
        shift += 7
        if shift >= 28:
            raise _malformed("remaining length longer than four bytes")
    header_len = i - pos
    total = header_len + length
    if i - pos > 2 and b == 0:
        # A non-minimal encoding (trailing 0x00 continuation) hides the same length twice.
        raise _malformed("remaining length not minimally encoded")
    if total > max_size:
        raise ProtocolError(Reason.PACKET_TOO_LARGE, f"packet of {total} bytes exceeds the maximum {max_size}")
    return ptype, flags, header_len, total


# Which first header bytes are acceptable, decided once: the check costs one index per packet.
VALID_BYTE1 = bytes(_valid_first_byte(b) for b in range(256))


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """``data`` as a flat memoryview of bytes (format ``B``), without copying."""
    mv = data if isinstance(data, memoryview) else memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class Framer:
    """Cuts a byte stream into :class:`Frame` objects.

    Frames that lie whole inside the chunk given to :meth:`feed` are
    memoryview slices of it: they are valid until the caller reuses that
    buffer. A packet split across chunks is gathered in a private buffer.
    """

    def __init__(self, max_packet_size: int):
        self.max_packet_size = max_packet_size
        # The start of a packet split across chunks (read it, never write it: the fast paths'
        # "is anything held?" is a truth test of this, without a property call).
        self.pending = bytearray()
        self._need = 0  # total length of the pending packet, 0 while its header is incomplete

    @property
    def buffered(self) -> int:
        return len(self.pending)

    def feed(self, data: bytes | bytearray | memoryview, start: int = 0) -> list[Frame]:
        """The packets in ``data`` from offset ``start`` (a caller that consumed the
        packets before ``start`` itself; only when nothing is pending)."""
        mv = byte_view(data)
        out: list[Frame] = []
        try:
            return self._cut(mv, start, out)
        except ProtocolError as exc:
            # The whole packets before the bad one still count, as they would at the broker,
            # and whatever the chunking: the caller handles them, then the error.
            exc.frames = out
            raise

    def _cut(self, mv: memoryview, pos: int, out: list[Frame]) -> list[Frame]:
        end = len(mv)
        if self.pending:
            if pos:
                raise RuntimeError("feed from an offset with a packet pending")
            pos = self._complete_pending(mv, out)
            if pos < 0:
                return out
        max_size = self.max_packet_size
        valid = VALID_BYTE1
        while pos < end:
            # Fast path: a valid first byte and a one- or two-byte remaining length.
            byte1 = mv[pos]
            if pos + 2 < end and valid[byte1]:
                b = mv[pos + 1]
                if b < 0x80:
                    hlen, total = 2, 2 + b
                else:
                    b2 = mv[pos + 2]
                    if b2 < 0x80 and b2:
                        hlen, total = 3, 3 + ((b & 0x7F) | (b2 << 7))
                    else:
                        hlen = 0
                if hlen and total <= max_size:
                    if pos + total > end:
                        self.pending += mv[pos:end]
                        self._need = total
                        break
                    out.append(Frame(byte1 >> 4, byte1 & 0x0F, mv[pos:pos + total], hlen, pos, pos + total))
                    pos += total
                    continue
            hdr = parse_header(mv, pos, end, max_size)
            if hdr is None or pos + hdr[3] > end:
                self.pending += mv[pos:end]
                self._need = hdr[3] if hdr else 0
                break
            ptype, flags, hlen, total = hdr
            out.append(Frame(ptype, flags, mv[pos:pos + total], hlen, pos, pos + total))
            pos += total
        return out

    def _complete_pending(self, mv: memoryview, out: list[Frame]) -> int:
        """Finish the packet started in an earlier chunk; the offset in ``mv`` after it, or -1."""
        pos = 0
        end = len(mv)
        while not self._need:
            hdr = parse_header(self.pending, 0, len(self.pending), self.max_packet_size)
            if hdr is not None:
                self._need = hdr[3]
                break
            if pos >= end:
                return -1
            self.pending.append(mv[pos])  # the header is at most 5 bytes: byte by byte is fine
            pos += 1
        take = min(self._need - len(self.pending), end - pos)
        self.pending += mv[pos:pos + take]
        pos += take
        if len(self.pending) < self._need:
            return -1
        raw = bytes(self.pending)
        self.pending.clear()
        self._need = 0
        ptype, flags, hlen, _ = parse_header(raw, 0, len(raw), self.max_packet_size)  # type: ignore[misc]
        out.append(Frame(ptype, flags, memoryview(raw), hlen, -1, -1))
        return pos


# --------------------------------------------------------------------------- strings

# C0/C1 controls and the non-characters: Mosquitto refuses them in topics and client ids.
# Every one of them is a control (Cc) or unassigned (Cn), so a string that ``str.isprintable()``
# passes has none: that C loop settles almost every real string. The rest (a no-break space, a
# private-use character ... make it say no) is settled on the UTF-8 bytes by ``bytes.translate``
# and substring searches, also C loops: a regular expression costs ~30-90 ns per character.
def _byte_classes(classes: dict[str, list[int]]) -> bytes:
    table = bytearray(b"." * 256)
    for name, values in classes.items():
        for b in values:
            table[b] = ord(name)
    return bytes(table)


def _span(first: int, last: int) -> list[int]:
    return list(range(first, last + 1))


_C0_DEL = bytes(range(0x20)) + b"\x7f"            # U+0000-U+001F, U+007F: one byte each
_C1_CLASSES = _byte_classes({"C": [0xC2], "c": _span(0x80, 0x9F)})  # U+0080-U+009F: C2 80..C2 9F
# Non-characters: U+FDD0-U+FDEF (EF B7 90..EF B7 AF), U+FFFE/U+FFFF (EF BF BE/BF) and
# U+nFFFE/U+nFFFF of planes 1-16 ([F0-F4] [8F 9F AF BF] BF [BE BF]).
_NONCHAR_CLASSES = _byte_classes({
    "E": [0xEF], "L": _span(0xF0, 0xF4), "S": [0xB7], "m": [0x8F], "n": [0x9F, 0xAF],
    "d": _span(0x90, 0x9E) + _span(0xA0, 0xAE), "b": [0xBE], "F": [0xBF]})
_NONCHAR_NEEDLES = (b"ESd", b"ESn", b"EFb", b"EFF", b"LmFb", b"LmFF", b"LnFb", b"LnFF", b"LFFb", b"LFFF")


def has_forbidden_code_point(text: str, raw: bytes) -> bool:
    """Does ``text`` (``raw``, valid UTF-8, decoded) hold a C0/C1 control or a non-character?"""
    if text.isprintable():
        return False
    if len(raw.translate(None, _C0_DEL)) != len(raw):
        return True
    if b"\xc2" in raw and b"Cc" in raw.translate(_C1_CLASSES):
        return True
    # Every non-character's encoding holds one of these three byte pairs: most strings have none.
    if b"\xbf\xbe" in raw or b"\xbf\xbf" in raw or b"\xef\xb7" in raw:
        classes = raw.translate(_NONCHAR_CLASSES)
        return any(needle in classes for needle in _NONCHAR_NEEDLES)
    return False


def decode_utf8(raw: bytes | bytearray | memoryview, what: str, *, strict: bool = False) -> str:
    raw = bytes(raw)
    try:
        text: str = raw.decode("utf-8")  # strict: refuses surrogates and overlong forms
    except UnicodeDecodeError:
        raise _malformed(f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise _malformed(f"{what} contains U+0000")
    if strict and has_forbidden_code_point(text, raw):
        raise _malformed(f"{what} contains a control character or non-character")
    return text


def validate_topic_name(topic: str, what: str = "topic") -> None:
    """A PUBLISH (or Will) topic: no wildcards; emptiness is the caller's concern (aliases)."""
    if "+" in topic or "#" in topic:
        raise ProtocolError(Reason.TOPIC_NAME_INVALID, f"{what} contains a wildcard")


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``$share/<group>/<filter>`` into ``(group, filter)``; ``(None, filter)`` otherwise."""
    if not topic_filter.startswith("$share/"):
        return None, topic_filter
    rest = topic_filter[7:]
    group, sep, inner = rest.partition("/")
    if not sep or not group or not inner or "+" in group or "#" in group:
        raise ProtocolError(Reason.TOPIC_FILTER_INVALID, "malformed shared subscription")
    return group, inner


def validate_topic_filter(topic_filter: str) -> None:
    if not topic_filter:
        raise ProtocolError(Reason.TOPIC_FILTER_INVALID, "empty topic filter")
    _, inner = split_shared(topic_filter)
    levels = inner.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ProtocolError(Reason.TOPIC_FILTER_INVALID, "'#' must be the last level, alone")
        if "+" in level and level != "+":
            raise ProtocolError(Reason.TOPIC_FILTER_INVALID, "'+' must fill a whole level")


# --------------------------------------------------------------------------- reading


class _Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: memoryview, pos: int = 0, end: int | None = None):
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def _take(self, n: int) -> memoryview:
        if self.pos + n > self.end:
            raise _malformed("packet ends too early")
        v = self.buf[self.pos:self.pos + n]
        self.pos += n
        return v

    def u8(self) -> int:
        if self.pos >= self.end:
            raise _malformed("packet ends too early")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def u16(self) -> int:
        v = self._take(2)
        return (v[0] << 8) | v[1]

    def u32(self) -> int:
        value: int = struct.unpack(">I", self._take(4))[0]
        return value

    def varint(self) -> int:
        value = shift = 0
        for n in range(4):
            b = self.u8()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                if n and b == 0:
                    raise _malformed("variable byte integer not minimally encoded")
                return value
            shift += 7
        raise _malformed("variable byte integer longer than four bytes")

    def binary(self) -> bytes:
        return bytes(self._take(self.u16()))

    def raw_string(self) -> memoryview:
        return self._take(self.u16())

    def utf8(self, what: str, *, strict: bool = False) -> str:
        return decode_utf8(self._take(self.u16()), what, strict=strict)

    def limited_utf8(self, what: str, limit: int, reason_code: int, action: str, *, strict: bool = False) -> str:
        """A string whose length is checked against ``limit`` (0: none) before it is decoded."""
        n = self.u16()
        _check_length(n, limit, what, reason_code, action)
        return decode_utf8(self._take(n), what, strict=strict)

    def properties(self, kind: object) -> Properties:
        length = self.varint()
        if length > self.left:
            raise _malformed("property length exceeds the packet")
        stop = self.pos + length
        allowed = ALLOWED_PROPS[kind]
        props: Properties = []
        seen: set[int] = set()
        saved_end, self.end = self.end, stop
        try:
            while self.pos < stop:
                pid = self.varint()
                ptype = PROP_TYPES.get(pid)
                if ptype is None:
                    raise _malformed(f"unknown property 0x{pid:02X}")
                if pid not in allowed:
                    raise _proto(f"property 0x{pid:02X} not allowed here")
                if pid in seen and pid not in REPEATABLE_PROPS:
                    raise _proto(f"property 0x{pid:02X} given twice")
                seen.add(pid)
                props.append((pid, self._prop_value(pid, ptype)))
        finally:
            self.end = saved_end
        return props

    def _prop_value(self, pid: int, ptype: PropType) -> PropValue:
        if ptype is PropType.BYTE:
            v = self.u8()
            if v > 1 and pid != 0x24:  # all byte properties are booleans except Maximum QoS
                raise _proto(f"property 0x{pid:02X} must be 0 or 1")
            if pid == 0x24 and v > 1:
                raise _proto("Maximum QoS must be 0 or 1")
            return v
        if ptype is PropType.U16:
            v = self.u16()
            if v == 0 and pid == 0x21:  # Receive Maximum
                raise _proto(f"property 0x{pid:02X} must not be 0")
            if v == 0 and pid == 0x23:  # Topic Alias 0 [MQTT-3.3.2-8]: its own reason code
                raise ProtocolError(Reason.TOPIC_ALIAS_INVALID, "Topic Alias 0")
            return v
        if ptype is PropType.U32:
            v = self.u32()
            if v == 0 and pid == 0x27:  # Maximum Packet Size
                raise _proto("Maximum Packet Size must not be 0")
            return v
        if ptype is PropType.VARINT:
            v = self.varint()
            if v == 0:  # Subscription Identifier
                raise _proto("Subscription Identifier must not be 0")
            return v
        if ptype is PropType.UTF8:
            return self.utf8(f"property 0x{pid:02X}")
        if ptype is PropType.BINARY:
            return self.binary()
        return (self.utf8("user property name"), self.utf8("user property value"))

    def done(self, what: str) -> None:
        if self.pos != self.end:
            raise _malformed(f"{what} has {self.end - self.pos} unexpected trailing bytes")


# --------------------------------------------------------------------------- decoders


def decode_connect(body: memoryview, *, max_client_id: int = 0, max_username: int = 0,
                   max_will_topic: int = 0) -> Connect:
    """A CONNECT. Fields longer than the ``max_*`` byte limits (0: none) raise
    :class:`LimitExceeded` before they are decoded: client id 0x85, user name 0x86, Will topic 0x90."""
    r = _Reader(body)
    name = r.raw_string().tobytes()
    level = r.u8()
    if (name == b"MQTT" and level in (MQTT_311, MQTT_5)) or (name == b"MQIsdp" and level == MQTT_31):
        pass
    elif name in (b"MQTT", b"MQIsdp"):
        raise ProtocolError(Reason.UNSUPPORTED_PROTOCOL_VERSION, f"protocol level {level} not supported",
                            protocol_level=level)
    else:
        raise ProtocolError(Reason.MALFORMED_PACKET, "unknown protocol name")
    try:
        return _decode_connect_rest(r, name.decode(), level, (max_client_id, max_username, max_will_topic))
    except ProtocolError as exc:
        exc.protocol_level = level
        raise


def _decode_connect_rest(r: _Reader, name: str, level: int, limits: tuple[int, int, int]) -> Connect:
    flags = r.u8()
    if flags & 0x01:
        raise _malformed("CONNECT reserved flag set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 3
    will_retain = bool(flags & 0x20)
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if will_qos == 3:
        raise _malformed("Will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise _malformed("Will QoS or retain without a Will")
    if level != MQTT_5 and has_password and not has_username:
        raise _malformed("password without user name")
    keepalive = r.u16()
    props = r.properties(PacketType.CONNECT) if level == MQTT_5 else []
    max_client_id, max_username, max_will_topic = limits
    client_id = r.limited_utf8("client id", max_client_id, Reason.CLIENT_IDENTIFIER_NOT_VALID, "connect",
                               strict=True)
    will = None
    if will_flag:
        will_props = r.properties(WILL) if level == MQTT_5 else []
        topic = r.limited_utf8("Will topic", max_will_topic, Reason.TOPIC_NAME_INVALID, "connect", strict=True)
        if not topic:
            raise ProtocolError(Reason.TOPIC_NAME_INVALID, "empty Will topic")
        validate_topic_name(topic, "Will topic")
        will = WillRecord(topic=topic, payload=r.binary(), qos=will_qos, retain=will_retain,
                          properties=will_props)
    username = r.limited_utf8("user name", max_username, Reason.BAD_USER_NAME_OR_PASSWORD, "connect") \
        if has_username else None
    password = r.binary() if has_password else None
    r.done("CONNECT")
    return Connect(protocol_name=name, protocol_level=level, clean_start=bool(flags & 0x02),
                   keepalive=keepalive, client_id=client_id, username=username, password=password,
                   will=will, properties=props)


def decode_connack(body: memoryview, level: int) -> Connack:
    r = _Reader(body)
    flags = r.u8()
    if flags & 0xFE:
        raise _malformed("CONNACK reserved flags set")
    reason = r.u8()
    props = r.properties(PacketType.CONNACK) if level == MQTT_5 else []
    r.done("CONNACK")
    return Connack(session_present=bool(flags & 1), reason=reason, properties=props)


def decode_publish(frame: Frame, level: int, *, check_topic: bool = True) -> PublishInfo:
    """The routing fields of a PUBLISH. The payload is neither copied nor read.

    ``check_topic=False`` skips the topic's UTF-8 and wildcard checks, for a
    caller that checks the raw topic itself (once per distinct topic) with
    :func:`topic_from_bytes`."""
    raw = frame.raw
    pos = frame.body_start
    end = len(raw)
    if pos + 2 > end:
        raise _malformed("packet ends too early")
    tend = pos + 2 + ((raw[pos] << 8) | raw[pos + 1])
    if tend > end:
        raise _malformed("packet ends too early")
    topic = raw[pos + 2:tend].tobytes()
    if check_topic and topic:
        topic_from_bytes(topic)
    flags = frame.flags
    qos = (flags >> 1) & 3
    packet_id = None
    pos = tend
    if qos:
        if pos + 2 > end:
            raise _malformed("packet ends too early")
        packet_id = (raw[pos] << 8) | raw[pos + 1]
        if packet_id == 0:
            raise _proto("PUBLISH with packet id 0")
        pos += 2
    props_start = pos
    alias = None
    if level == MQTT_5:
        if pos < end and raw[pos] == 0:
            pos += 1  # no properties: the common case
        else:
            r = _Reader(raw, pos)
            for pid, value in r.properties(PacketType.PUBLISH):
                if pid == 0x23 and isinstance(value, int):
                    alias = value
            pos = r.pos
    elif not topic:
        raise ProtocolError(Reason.TOPIC_NAME_INVALID, "empty topic")
    return PublishInfo(qos, bool(flags & 1), bool(flags & 8), topic, packet_id, alias, tend, props_start, pos)


def topic_from_bytes(topic: bytes) -> str:
    """A PUBLISH topic name, checked (strict UTF-8, no wildcards) and decoded."""
    text = decode_utf8(topic, "topic", strict=True)
    validate_topic_name(text)
    return text


def _subscription_options(options: int, level: int, shared: bool) -> None:
    if options & 3 == 3:
        raise _malformed("subscription QoS 3")
    if level != MQTT_5:
        if options & 0xFC:
            raise _malformed("SUBSCRIBE reserved bits set")
        return
    if options & 0xC0:
        raise _malformed("subscription options reserved bits set")
    if (options >> 4) & 3 == 3:
        raise _proto("Retain Handling 3")
    if shared and options & 0x04:
        raise _proto("No Local on a shared subscription")


def decode_subscribe(body: memoryview, level: int, max_filter_bytes: int = 0) -> Subscribe:
    """A SUBSCRIBE. A filter longer than ``max_filter_bytes`` (0: no limit) is neither decoded
    nor checked: its :class:`Subscription` has ``too_long`` set (its length) and, as
    ``topic_filter``, only the start of it for the record; the caller refuses it."""
    r = _Reader(body)
    packet_id = r.u16()
    if packet_id == 0:
        raise _proto("SUBSCRIBE with packet id 0")
    props = r.properties(PacketType.SUBSCRIBE) if level == MQTT_5 else []
    subs = []
    while r.left:
        n = r.u16()
        if max_filter_bytes and n > max_filter_bytes:
            raw = r._take(n)
            options = r.u8()
            _subscription_options(options, level, bytes(raw[:7]) == b"$share/")
            subs.append(Subscription(bytes(raw[:64]).decode("utf-8", "replace"), options, too_long=n))
            continue
        topic_filter = decode_utf8(r._take(n), "topic filter", strict=True)
        validate_topic_filter(topic_filter)
        options = r.u8()
        _subscription_options(options, level, topic_filter.startswith("$share/"))
        subs.append(Subscription(topic_filter, options))
    if not subs:
        raise _proto("SUBSCRIBE without topic filters")
    return Subscribe(packet_id=packet_id, subscriptions=subs, properties=props)


def decode_suback(body: memoryview, level: int) -> Suback:
    r = _Reader(body)
    packet_id = r.u16()
    props = r.properties(PacketType.SUBACK) if level == MQTT_5 else []
    reasons = list(r._take(r.left))
    if not reasons:
        raise _proto("SUBACK without reason codes")
    return Suback(packet_id=packet_id, reasons=reasons, properties=props)


def decode_unsubscribe(body: memoryview, level: int, max_filter_bytes: int = 0) -> Unsubscribe:
    """An UNSUBSCRIBE; a filter longer than ``max_filter_bytes`` (0: no limit) raises
    :class:`LimitExceeded` (0x8F) before it is decoded."""
    r = _Reader(body)
    packet_id = r.u16()
    if packet_id == 0:
        raise _proto("UNSUBSCRIBE with packet id 0")
    props = r.properties(PacketType.UNSUBSCRIBE) if level == MQTT_5 else []
    filters = []
    while r.left:
        topic_filter = r.limited_utf8("topic filter", max_filter_bytes, Reason.TOPIC_FILTER_INVALID, "unsubscribe",
                                      strict=True)
        validate_topic_filter(topic_filter)
        filters.append(topic_filter)
    if not filters:
        raise _proto("UNSUBSCRIBE without topic filters")
    return Unsubscribe(packet_id=packet_id, topic_filters=filters, properties=props)


def decode_disconnect(body: memoryview, level: int) -> Disconnect:
    if level != MQTT_5:
        if len(body):
            raise _malformed("DISCONNECT with a body")
        return Disconnect()
    r = _Reader(body)
    if not r.left:
        return Disconnect()
    reason = r.u8()
    props = r.properties(PacketType.DISCONNECT) if r.left else []
    r.done("DISCONNECT")
    return Disconnect(reason=reason, properties=props)


def decode_auth(body: memoryview) -> Auth:
    r = _Reader(body)
    if not r.left:
        return Auth()
    reason = r.u8()
    if reason not in (Reason.SUCCESS, Reason.CONTINUE_AUTHENTICATION, Reason.REAUTHENTICATE):
        raise _proto(f"AUTH reason 0x{reason:02X}")
    props = r.properties(PacketType.AUTH) if r.left else []
    r.done("AUTH")
    return Auth(reason=reason, properties=props)


def packet_id_of(frame: Frame, level: int) -> int:
    """The packet id of a PUBACK / PUBREC / PUBREL / PUBCOMP / UNSUBACK, checking its length."""
    n = len(frame.raw) - frame.body_start
    if n < 2 or (level != MQTT_5 and n != 2):
        raise _malformed(f"{PacketType(frame.type).name} of wrong length")
    raw = frame.raw
    b = frame.body_start
    pid = (raw[b] << 8) | raw[b + 1]
    if pid == 0:
        raise _proto(f"{PacketType(frame.type).name} with packet id 0")
    return pid


# --------------------------------------------------------------------------- encoding


def encode_varint(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer out of range: {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fixed_header(byte1: int, remaining: int) -> bytes:
    return bytes((byte1,)) + encode_varint(remaining)


def _str(text: str) -> bytes:
    b = text.encode("utf-8")
    return struct.pack(">H", len(b)) + b


def _bin(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + bytes(data)


def encode_properties(props: Properties) -> bytes:
    out = bytearray()
    for pid, value in props:
        out += encode_varint(pid)
        ptype = PROP_TYPES[pid]
        if ptype is PropType.BYTE:
            out.append(value)  # type: ignore[arg-type]
        elif ptype is PropType.U16:
            out += struct.pack(">H", value)
        elif ptype is PropType.U32:
            out += struct.pack(">I", value)
        elif ptype is PropType.VARINT:
            out += encode_varint(value)  # type: ignore[arg-type]
        elif ptype is PropType.UTF8:
            out += _str(value)  # type: ignore[arg-type]
        elif ptype is PropType.BINARY:
            out += _bin(value)  # type: ignore[arg-type]
        else:
            out += _str(value[0]) + _str(value[1])  # type: ignore[index,arg-type]
    return encode_varint(len(out)) + bytes(out)


def _packet(byte1: int, body: bytes) -> bytes:
    return fixed_header(byte1, len(body)) + body


def encode_connect(c: Connect) -> bytes:
    v5 = c.protocol_level == MQTT_5
    flags = 0x02 if c.clean_start else 0
    if c.will is not None:
        flags |= 0x04 | (c.will.qos << 3) | (0x20 if c.will.retain else 0)
    if c.password is not None:
        flags |= 0x40
    if c.username is not None:
        flags |= 0x80
    body = bytearray(_str(c.protocol_name))
    body += bytes((c.protocol_level, flags)) + struct.pack(">H", c.keepalive)
    if v5:
        body += encode_properties(c.properties)
    body += _str(c.client_id)
    if c.will is not None:
        if v5:
            body += encode_properties(c.will.properties)
        body += _str(c.will.topic) + _bin(c.will.payload)
    if c.username is not None:
        body += _str(c.username)
    if c.password is not None:
        body += _bin(c.password)
    return _packet(0x10, bytes(body))


def encode_connack(session_present: bool, reason: int, level: int,
                   properties: Sequence[tuple[int, PropValue]] = ()) -> bytes:
    body = bytes((1 if session_present else 0, reason))
    if level == MQTT_5:
        body += encode_properties(list(properties))
    return _packet(0x20, body)


def encode_ack(ptype: int, packet_id: int, level: int, reason: int = 0,
               properties: Sequence[tuple[int, PropValue]] = ()) -> bytes:
    """PUBACK, PUBREC, PUBREL, PUBCOMP (and UNSUBACK without reasons in 3.1.1)."""
    byte1 = (ptype << 4) | (2 if ptype == PacketType.PUBREL else 0)
    body = struct.pack(">H", packet_id)
    if level == MQTT_5 and (reason or properties):
        body += bytes((reason,))
        if properties:
            body += encode_properties(list(properties))
    return _packet(byte1, body)


def encode_subscribe(s: Subscribe, level: int) -> bytes:
    body = bytearray(struct.pack(">H", s.packet_id))
    if level == MQTT_5:
        body += encode_properties(s.properties)
    for sub in s.subscriptions:
        body += _str(sub.topic_filter) + bytes((sub.options,))
    return _packet(0x82, bytes(body))


def encode_suback(s: Suback, level: int) -> bytes:
    body = bytearray(struct.pack(">H", s.packet_id))
    if level == MQTT_5:
        body += encode_properties(s.properties)
    body += bytes(s.reasons)
    return _packet(0x90, bytes(body))


def encode_unsuback(packet_id: int, reasons: list[int], level: int) -> bytes:
    """UNSUBACK: one reason code per filter in v5, none in 3.1.1."""
    body = struct.pack(">H", packet_id)
    if level == MQTT_5:
        body += b"\x00" + bytes(reasons)
    return _packet(0xB0, body)


def encode_unsubscribe(u: Unsubscribe, level: int) -> bytes:
    body = bytearray(struct.pack(">H", u.packet_id))
    if level == MQTT_5:
        body += encode_properties(u.properties)
    for f in u.topic_filters:
        body += _str(f)
    return _packet(0xA2, bytes(body))


def encode_disconnect(level: int, reason: int = 0, properties: Sequence[tuple[int, PropValue]] = ()) -> bytes:
    if level != MQTT_5 or (reason == 0 and not properties):
        return b"\xe0\x00"
    body = bytes((reason,))
    if properties:
        body += encode_properties(list(properties))
    return _packet(0xE0, body)


def encode_auth(reason: int = 0, properties: Sequence[tuple[int, PropValue]] = ()) -> bytes:
    if reason == 0 and not properties:
        return b"\xf0\x00"
    return _packet(0xF0, bytes((reason,)) + encode_properties(list(properties)))


def encode_publish(topic: str | bytes, payload: bytes, *, qos: int = 0, retain: bool = False,
                   dup: bool = False, packet_id: int | None = None, level: int = MQTT_311,
                   properties: Sequence[tuple[int, PropValue]] = ()) -> bytes:
    """A whole PUBLISH (for tests and the gateway's own messages)."""
    head = publish_head(topic, qos=qos, retain=retain, dup=dup, packet_id=packet_id, level=level,
                        properties=properties, payload_len=len(payload))
    return head + bytes(payload)


def publish_head(topic: str | bytes, *, qos: int, retain: bool, dup: bool, packet_id: int | None,
                 level: int, properties: Sequence[tuple[int, PropValue]], payload_len: int) -> bytes:
    """Everything of a PUBLISH before its payload: lets the gateway rewrite the topic and
    properties and send the payload on as a slice of the original buffer."""
    tb = topic.encode("utf-8") if isinstance(topic, str) else topic
    var = bytearray(struct.pack(">H", len(tb)) + tb)
    if qos:
        var += struct.pack(">H", packet_id or 0)
    if level == MQTT_5:
        var += encode_properties(list(properties))
    byte1 = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    return fixed_header(byte1, len(var) + payload_len) + bytes(var)


def read_publish_properties(frame: Frame, info: PublishInfo) -> Properties:
    """The full property list of a v5 PUBLISH (only needed when the gateway rewrites it)."""
    r = _Reader(frame.raw, info.props_start, info.payload_start)
    return r.properties(PacketType.PUBLISH)
