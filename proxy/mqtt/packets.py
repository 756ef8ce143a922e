"""MQTT packet types, reason codes, property ids and the decoded packet records.

Only the packets the gateway must understand get a record (CONNECT, CONNACK,
PUBLISH's routing fields, SUBSCRIBE, SUBACK, UNSUBSCRIBE, DISCONNECT, AUTH);
everything else travels as its original bytes.

Properties are kept as an ordered list of ``(property id, value)`` pairs so
that a rewritten packet carries the client's properties (user properties
included, in order) unchanged except for the ones the gateway owns.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# Protocol levels (the CONNECT "protocol level" byte).
MQTT_31 = 3
MQTT_311 = 4
MQTT_5 = 5

PropValue = int | str | bytes | tuple[str, str]
Properties = list[tuple[int, PropValue]]


class PacketType(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


# Fixed-header flags each packet type must carry ([MQTT-2.2.2-1]); PUBLISH is checked apart.
REQUIRED_FLAGS = {
    PacketType.CONNECT: 0, PacketType.CONNACK: 0, PacketType.PUBACK: 0, PacketType.PUBREC: 0,
    PacketType.PUBREL: 2, PacketType.PUBCOMP: 0, PacketType.SUBSCRIBE: 2, PacketType.SUBACK: 0,
    PacketType.UNSUBSCRIBE: 2, PacketType.UNSUBACK: 0, PacketType.PINGREQ: 0, PacketType.PINGRESP: 0,
    PacketType.DISCONNECT: 0, PacketType.AUTH: 0,
}


class Reason(enum.IntEnum):
    """MQTT 5 reason codes (the ones the gateway uses)."""
    SUCCESS = 0x00
    GRANTED_QOS_1 = 0x01
    GRANTED_QOS_2 = 0x02
    DISCONNECT_WITH_WILL = 0x04
    NO_MATCHING_SUBSCRIBERS = 0x10
    CONTINUE_AUTHENTICATION = 0x18
    REAUTHENTICATE = 0x19
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BAD_AUTHENTICATION_METHOD = 0x8C
    SERVER_SHUTTING_DOWN = 0x8B
    KEEP_ALIVE_TIMEOUT = 0x8D
    SESSION_TAKEN_OVER = 0x8E
    TOPIC_FILTER_INVALID = 0x8F
    TOPIC_NAME_INVALID = 0x90
    PACKET_IDENTIFIER_IN_USE = 0x91
    PACKET_IDENTIFIER_NOT_FOUND = 0x92
    RECEIVE_MAXIMUM_EXCEEDED = 0x93
    TOPIC_ALIAS_INVALID = 0x94
    PACKET_TOO_LARGE = 0x95
    MESSAGE_RATE_TOO_HIGH = 0x96
    QUOTA_EXCEEDED = 0x97
    ADMINISTRATIVE_ACTION = 0x98
    PAYLOAD_FORMAT_INVALID = 0x99
    SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
    CONNECTION_RATE_EXCEEDED = 0x9F
    MAXIMUM_CONNECT_TIME = 0xA0


class V3ConnackCode(enum.IntEnum):
    """MQTT 3.1 / 3.1.1 CONNACK return codes."""
    ACCEPTED = 0x00
    UNACCEPTABLE_PROTOCOL_VERSION = 0x01
    IDENTIFIER_REJECTED = 0x02
    SERVER_UNAVAILABLE = 0x03
    BAD_USERNAME_OR_PASSWORD = 0x04
    NOT_AUTHORIZED = 0x05


# What a v5 CONNACK reason means for a 3.1.1 client.
V3_CONNACK_FOR = {
    Reason.UNSUPPORTED_PROTOCOL_VERSION: V3ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION,
    Reason.CLIENT_IDENTIFIER_NOT_VALID: V3ConnackCode.IDENTIFIER_REJECTED,
    Reason.SERVER_UNAVAILABLE: V3ConnackCode.SERVER_UNAVAILABLE,
    Reason.SERVER_BUSY: V3ConnackCode.SERVER_UNAVAILABLE,
    Reason.BAD_USER_NAME_OR_PASSWORD: V3ConnackCode.BAD_USERNAME_OR_PASSWORD,
    Reason.BAD_AUTHENTICATION_METHOD: V3ConnackCode.BAD_USERNAME_OR_PASSWORD,
    Reason.NOT_AUTHORIZED: V3ConnackCode.NOT_AUTHORIZED,
}

# SUBACK failure code: 0x80 in 3.1.1, "not authorized" in 5.
V3_SUBACK_FAILURE = 0x80


class Prop(enum.IntEnum):
    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_IDENTIFIER = 0x0B
    SESSION_EXPIRY_INTERVAL = 0x11
    ASSIGNED_CLIENT_IDENTIFIER = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RESPONSE_INFORMATION = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUBSCRIPTION_AVAILABLE = 0x28
    SUBSCRIPTION_IDENTIFIER_AVAILABLE = 0x29
    SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class PropType(enum.Enum):
    BYTE = 1
    U16 = 2
    U32 = 3
    VARINT = 4
    UTF8 = 5
    BINARY = 6
    PAIR = 7


PROP_TYPES: dict[int, PropType] = {
    Prop.PAYLOAD_FORMAT_INDICATOR: PropType.BYTE,
    Prop.MESSAGE_EXPIRY_INTERVAL: PropType.U32,
    Prop.CONTENT_TYPE: PropType.UTF8,
    Prop.RESPONSE_TOPIC: PropType.UTF8,
    Prop.CORRELATION_DATA: PropType.BINARY,
    Prop.SUBSCRIPTION_IDENTIFIER: PropType.VARINT,
    Prop.SESSION_EXPIRY_INTERVAL: PropType.U32,
    Prop.ASSIGNED_CLIENT_IDENTIFIER: PropType.UTF8,
    Prop.SERVER_KEEP_ALIVE: PropType.U16,
    Prop.AUTHENTICATION_METHOD: PropType.UTF8,
    Prop.AUTHENTICATION_DATA: PropType.BINARY,
    Prop.REQUEST_PROBLEM_INFORMATION: PropType.BYTE,
    Prop.WILL_DELAY_INTERVAL: PropType.U32,
    Prop.REQUEST_RESPONSE_INFORMATION: PropType.BYTE,
    Prop.RESPONSE_INFORMATION: PropType.UTF8,
    Prop.SERVER_REFERENCE: PropType.UTF8,
    Prop.REASON_STRING: PropType.UTF8,
    Prop.RECEIVE_MAXIMUM: PropType.U16,
    Prop.TOPIC_ALIAS_MAXIMUM: PropType.U16,
    Prop.TOPIC_ALIAS: PropType.U16,
    Prop.MAXIMUM_QOS: PropType.BYTE,
    Prop.RETAIN_AVAILABLE: PropType.BYTE,
    Prop.USER_PROPERTY: PropType.PAIR,
    Prop.MAXIMUM_PACKET_SIZE: PropType.U32,
    Prop.WILDCARD_SUBSCRIPTION_AVAILABLE: PropType.BYTE,
    Prop.SUBSCRIPTION_IDENTIFIER_AVAILABLE: PropType.BYTE,
    Prop.SHARED_SUBSCRIPTION_AVAILABLE: PropType.BYTE,
}

# Properties that may appear more than once; every other one is unique ([MQTT-2.2.2]).
REPEATABLE_PROPS = frozenset({Prop.USER_PROPERTY, Prop.SUBSCRIPTION_IDENTIFIER})

WILL = "will"  # key for the Will Properties in ALLOWED_PROPS

_P = Prop
# Which properties each packet may carry (MQTT 5 spec, 2.2.2.2 table).
ALLOWED_PROPS: dict[object, frozenset[int]] = {
    PacketType.CONNECT: frozenset({
        _P.SESSION_EXPIRY_INTERVAL, _P.AUTHENTICATION_METHOD, _P.AUTHENTICATION_DATA,
        _P.REQUEST_PROBLEM_INFORMATION, _P.REQUEST_RESPONSE_INFORMATION, _P.RECEIVE_MAXIMUM,
        _P.TOPIC_ALIAS_MAXIMUM, _P.USER_PROPERTY, _P.MAXIMUM_PACKET_SIZE}),
    WILL: frozenset({
        _P.PAYLOAD_FORMAT_INDICATOR, _P.MESSAGE_EXPIRY_INTERVAL, _P.CONTENT_TYPE, _P.RESPONSE_TOPIC,
        _P.CORRELATION_DATA, _P.WILL_DELAY_INTERVAL, _P.USER_PROPERTY}),
    PacketType.CONNACK: frozenset({
        _P.SESSION_EXPIRY_INTERVAL, _P.ASSIGNED_CLIENT_IDENTIFIER, _P.SERVER_KEEP_ALIVE,
        _P.AUTHENTICATION_METHOD, _P.AUTHENTICATION_DATA, _P.RESPONSE_INFORMATION,
        _P.SERVER_REFERENCE, _P.REASON_STRING, _P.RECEIVE_MAXIMUM, _P.TOPIC_ALIAS_MAXIMUM,
        _P.MAXIMUM_QOS, _P.RETAIN_AVAILABLE, _P.USER_PROPERTY, _P.MAXIMUM_PACKET_SIZE,
        _P.WILDCARD_SUBSCRIPTION_AVAILABLE, _P.SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        _P.SHARED_SUBSCRIPTION_AVAILABLE}),
    PacketType.PUBLISH: frozenset({
        _P.PAYLOAD_FORMAT_INDICATOR, _P.MESSAGE_EXPIRY_INTERVAL, _P.CONTENT_TYPE, _P.RESPONSE_TOPIC,
        _P.CORRELATION_DATA, _P.SUBSCRIPTION_IDENTIFIER, _P.TOPIC_ALIAS, _P.USER_PROPERTY}),
    PacketType.SUBSCRIBE: frozenset({_P.SUBSCRIPTION_IDENTIFIER, _P.USER_PROPERTY}),
    PacketType.SUBACK: frozenset({_P.REASON_STRING, _P.USER_PROPERTY}),
    PacketType.UNSUBSCRIBE: frozenset({_P.USER_PROPERTY}),
    PacketType.DISCONNECT: frozenset({
        _P.SESSION_EXPIRY_INTERVAL, _P.SERVER_REFERENCE, _P.REASON_STRING, _P.USER_PROPERTY}),
    PacketType.AUTH: frozenset({
        _P.AUTHENTICATION_METHOD, _P.AUTHENTICATION_DATA, _P.REASON_STRING, _P.USER_PROPERTY}),
}


def get_prop(props: Properties, pid: int, default: PropValue | None = None) -> PropValue | None:
    for k, v in props:
        if k == pid:
            return v
    return default


def without_props(props: Properties, *pids: int) -> Properties:
    return [(k, v) for k, v in props if k not in pids]


# --------------------------------------------------------------------------- records


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties = field(default_factory=list)


@dataclass
class Connect:
    protocol_name: str          # "MQTT" (3.1.1, 5) or "MQIsdp" (3.1)
    protocol_level: int         # 3, 4 or 5
    clean_start: bool
    keepalive: int
    client_id: str
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=list)


@dataclass
class Connack:
    session_present: bool
    reason: int                 # the v3 return code or the v5 reason code
    properties: Properties = field(default_factory=list)


@dataclass(slots=True)
class PublishInfo:
    """The routing fields of a PUBLISH; the payload stays in the original buffer."""
    qos: int
    retain: bool
    dup: bool
    topic: bytes                # raw, as sent (empty when only a topic alias is given)
    packet_id: int | None
    topic_alias: int | None = None
    # Offsets inside the packet (from the first byte of the fixed header).
    topic_end: int = 0          # just past the topic string
    props_start: int = 0        # start of the property length (v5), or of the payload
    payload_start: int = 0


@dataclass
class Subscription:
    topic_filter: str
    options: int                # the raw options byte (QoS in bits 0-1, v5 flags above)
    # Set by the decoder (the length in bytes) for a filter over the caller's limit, left
    # undecoded: topic_filter then holds only its start, for the audit record, never a filter.
    too_long: int = 0

    @property
    def qos(self) -> int:
        return self.options & 0x03


@dataclass
class Subscribe:
    packet_id: int
    subscriptions: list[Subscription]
    properties: Properties = field(default_factory=list)


@dataclass
class Suback:
    packet_id: int
    reasons: list[int]
    properties: Properties = field(default_factory=list)


@dataclass
class Unsubscribe:
    packet_id: int
    topic_filters: list[str]
    properties: Properties = field(default_factory=list)


@dataclass
class Disconnect:
    reason: int = 0
    properties: Properties = field(default_factory=list)


@dataclass
class Auth:
    reason: int = 0
    properties: Properties = field(default_factory=list)
