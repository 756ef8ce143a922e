"""The CONNECT handshake's pure pieces: which credential a CONNECT carries, the client id
the broker gets, the upstream CONNECT and the CONNACK properties the client gets.

Which credential a CONNECT carries (:func:`classify_credentials`):

1. v5 enhanced authentication, method ``keygate-token`` (:data:`AUTH_METHOD`),
   the access token as Authentication Data → token. Any other method is refused
   at once with CONNACK 0x8C and never asked about.
2. a password, and the user name is a registered device id → device key
   (user name = device id, password = K1 or K2).
3. any other password → access token (user name ignored).
4. no password → the verified TLS client certificate's CN (device certificate),
   if the shell has one.
5. nothing → ``("none",)``: the shell decides whether anonymous access is
   allowed (``Authenticated(ANONYMOUS)``) or answers
   ``AuthenticationFailed(AuthReason.NO_CREDENTIALS)``.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.config import MqttConfig
from proxy.identity.model import Identity
from proxy.mqtt.commands import AuthRequest
from proxy.mqtt.packets import Connect, Prop, Properties, Will, get_prop, without_props

__all__ = ["AUTH_METHOD", "Binding", "bind_client_id", "classify_credentials", "escape_sub", "upstream_connect"]

#: The v5 enhanced-authentication method the gateway answers itself.
AUTH_METHOD = "keygate-token"

Credentials = tuple[str] | tuple[str, str] | tuple[str, str, str]


def classify_credentials(req: AuthRequest, cert_cn: str | None,
                         is_device: Callable[[str], bool]) -> Credentials:
    """Which verifier to ask, by the rule in the module docstring.

    Returns ``("token", token)``, ``("device_key", device_id, key)``,
    ``("certificate", cn)`` or ``("none",)``. ``is_device(name)`` says whether
    a device with that id is registered (``ownership.facts.device(name) is not None``).
    """
    if req.auth_method == AUTH_METHOD and req.auth_data is not None:
        return ("token", req.auth_data.decode("utf-8", "replace"))
    if req.password is not None:
        secret = req.password.decode("utf-8", "replace")
        if req.username and is_device(req.username):
            return ("device_key", req.username, secret)
        return ("token", secret)
    if cert_cn:
        return ("certificate", cert_cn)
    return ("none",)


def escape_sub(sub: str) -> str:
    """A subject with no "/" in it, so ``prefix + sub + "/" + client id`` splits one way only;
    and no "~", so no subject can spell the gateway's own names (``~anonymous``)."""
    return sub.replace("%", "%25").replace("/", "%2F").replace("~", "%7E")


class Binding:
    """The client id as the client knows it and as the broker knows it, or why it is refused."""

    __slots__ = ("client_id", "upstream_client_id", "assigned", "refusal")

    def __init__(self, client_id: str = "", upstream_client_id: str = "", assigned: bool = False,
                 refusal: str = "") -> None:
        self.client_id = client_id
        self.upstream_client_id = upstream_client_id
        self.assigned = assigned   # the gateway chose the client id: tell a v5 client
        self.refusal = refusal     # non-empty: refused (CONNACK 0x85 / 0x02)


def bind_client_id(identity: Identity, requested: str, prefix: str, random_hex: Callable[[int], str]) -> Binding:
    """A device must use its own device id (empty → its id); a user's id goes upstream as
    ``prefix + escaped sub + "/" + id`` (empty → a generated ``kg-<random>``); an anonymous
    client always gets a fresh random id upstream, so no one can resume or wipe another's session."""
    if identity.is_device:
        if not identity.device_id or identity.device_id.startswith(prefix):
            # A device registered as "u/<someone's sub>/..." would own that user's broker session.
            return Binding(refusal="device id inside the user namespace")
        if requested and requested != identity.device_id:
            return Binding(refusal="client id is not the device id")
        return Binding(identity.device_id, identity.device_id, assigned=not requested)
    if identity.is_anonymous:
        return Binding(requested or "kg-" + random_hex(8), f"{prefix}~anonymous/{random_hex(12)}",
                       assigned=not requested)
    client_id = requested or "kg-" + random_hex(8)
    return Binding(client_id, f"{prefix}{escape_sub(identity.sub)}/{client_id}", assigned=not requested)


def without_will_delay(will: Will | None) -> Will | None:
    """The Will as the broker gets it: without a Will Delay Interval. A delayed Will would be
    published after the connection ended, at an instant the gateway no longer sees; without the
    delay it is decided at the instant the connection ends, and published then or never."""
    if will is None or get_prop(will.properties, Prop.WILL_DELAY_INTERVAL) is None:
        return will
    return Will(will.topic, will.payload, will.qos, will.retain,
                without_props(will.properties, Prop.WILL_DELAY_INTERVAL))


def upstream_connect(c: Connect, config: MqttConfig, upstream_password: str, client_id: str,
                     keepalive: int, session_expiry: int) -> Connect:
    """The upstream CONNECT: the gateway's credentials, the bound client id, no auth or alias
    properties, the Session Expiry capped (the broker keeps the session no longer than the
    gateway counts it)."""
    props = without_props(c.properties, Prop.AUTHENTICATION_METHOD, Prop.AUTHENTICATION_DATA,
                          Prop.TOPIC_ALIAS_MAXIMUM, Prop.SESSION_EXPIRY_INTERVAL)
    if session_expiry:
        props.append((Prop.SESSION_EXPIRY_INTERVAL, session_expiry))
    username = config.upstream_username or None
    password = upstream_password.encode() if username and upstream_password else None
    # Twice the enforced keepalive upstream: the gateway, not the broker, is the one that times a
    # silent client out, with its own reason code and audit record.
    return Connect(protocol_name=c.protocol_name, protocol_level=c.protocol_level, clean_start=c.clean_start,
                   keepalive=min(2 * keepalive, 65535), client_id=client_id, username=username,
                   password=password, will=without_will_delay(c.will), properties=props)


def client_connack_props(broker_props: Properties, config: MqttConfig, *, assigned_id: str | None,
                         keepalive: int, asked_keepalive: int, enhanced_auth: bool) -> tuple[Properties, int]:
    """The CONNACK properties the client gets (the broker's, less what is the gateway's to say)
    and the keepalive to enforce (the broker's Server Keep Alive, if lower)."""
    props = without_props(broker_props, Prop.ASSIGNED_CLIENT_IDENTIFIER, Prop.TOPIC_ALIAS_MAXIMUM,
                          Prop.SERVER_KEEP_ALIVE, Prop.MAXIMUM_PACKET_SIZE, Prop.AUTHENTICATION_METHOD,
                          Prop.AUTHENTICATION_DATA)
    if assigned_id is not None:
        props.append((Prop.ASSIGNED_CLIENT_IDENTIFIER, assigned_id))
    broker_ka = get_prop(broker_props, Prop.SERVER_KEEP_ALIVE)
    if isinstance(broker_ka, int) and (not keepalive or broker_ka < keepalive):
        keepalive = broker_ka
    if keepalive != asked_keepalive:
        props.append((Prop.SERVER_KEEP_ALIVE, keepalive))
    if config.topic_alias_maximum:
        props.append((Prop.TOPIC_ALIAS_MAXIMUM, config.topic_alias_maximum))
    broker_max = get_prop(broker_props, Prop.MAXIMUM_PACKET_SIZE)
    limit = config.max_packet_size
    if isinstance(broker_max, int):
        limit = min(limit, broker_max)
    props.append((Prop.MAXIMUM_PACKET_SIZE, limit))
    if enhanced_auth:
        props.append((Prop.AUTHENTICATION_METHOD, AUTH_METHOD))
    return props, keepalive
