"""The CONNECT handshake: which credential a CONNECT carries, the client id the broker gets,
the upstream CONNECT, the CONNACK properties the client gets, and :class:`Handshake`, the
flow itself (CONNECT → authentication → upstream CONNECT → CONNACK; re-authentication).

Rules (every length in bytes of the UTF-8 encoding, checked before the string is decoded and
before any credential is asked about: ``Authenticate`` is never returned for a refused CONNECT):

* Before the broker's CONNACK, a packet (the CONNECT first) larger than ``connect_max_bytes``
  (at most ``max_packet_size``) is refused at its fixed header: nothing of its body is read. A
  CONNECT so refused is answered in its client's version once its level byte is in (the first
  14 bytes at most are held for that): v5 CONNACK 0x95; 3.1.1 and 3.1 a plain close. Packets
  sent meanwhile are held, at most ``connect_max_bytes`` with their bookkeeping
  (:data:`HELD_PACKET_OVERHEAD` each) and the partial packet behind them; beyond → v5 CONNACK
  0x97, 3.1.1 0x03.
* CONNECT fields: client id over ``client_id_max_bytes`` → CONNACK 0x85 / 0x02; user name over
  ``username_max_bytes`` → 0x86 / 0x04; Will topic over ``topic_max_bytes`` → v5 0x90, 3.1.1 a
  plain close. Audited as ``connect`` denials. 3.1.1: an empty client id needs a clean session
  [MQTT-3.1.3-8] (0x02).
* Keepalive 0 (and, for v5, anything above ``max_keepalive_seconds``) is capped at
  ``max_keepalive_seconds`` and v5 clients are told so (Server Keep Alive); 3.1.1 clients
  cannot be told, so a larger keepalive is kept as asked.
* Client id (:func:`bind_client_id`): a device must use its own device id (empty → its id;
  another id → CONNACK 0x85 / 0x02). A user's id is forwarded as ``user_client_id_prefix + sub
  + "/" + client_id`` (``%`` and ``/`` in the sub percent-encoded, so two identities can never
  spell the same id; a device id starting with the prefix is refused, 0x85 / 0x02); an empty
  one is replaced by a generated ``kg-<random>`` (v5: returned as Assigned Client Identifier).
  An anonymous client always gets a fresh random id, so no one can resume or wipe another's
  session. The broker's Assigned Client Identifier never reaches the client.
* The upstream CONNECT (:func:`upstream_connect`) carries no client user name, password,
  Authentication Method/Data or Topic Alias Maximum (absent = 0: the broker never sends
  aliases); ``upstream_username`` / password go in their place if configured.
* Authentication failures: CONNACK 0x86 / 0x04 (bad credentials), 0x87 / 0x05 (none given),
  0x88 / 0x03 (issuer unreachable), 0x8C (unknown method, v5). A token already expired, a
  credential gone since it was checked, or the shell's ``admit_connect`` refusing (v5 0x97,
  3.1.1 0x03) refuse it too.
* Re-authentication (v5): AUTH 0x19 with ``keygate-token`` and a fresh token; the same subject
  → AUTH 0x00 (identity and expiry replaced); another subject or a failure → DISCONNECT 0x87.
* The client's DISCONNECT: a Session Expiry Interval on it reaches the broker capped at
  ``persistent_session_expiry_seconds``; one set after 0 at CONNECT [MQTT-3.14.2-2] is a
  protocol error here, never forwarded (the broker would publish the Will on its own).

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
from proxy.identity.model import AuthReason, Identity
from proxy.mqtt import codec
from proxy.mqtt.codec import Frame, ProtocolError
from proxy.mqtt.commands import AuthRequest, Metric
from proxy.mqtt.context import Context
from proxy.mqtt.output import End, Output
from proxy.mqtt.packets import (
    MQTT_5,
    Connect,
    Disconnect,
    PacketType,
    Prop,
    Properties,
    Reason,
    Will,
    get_prop,
    without_props,
)
from proxy.mqtt.will import WillGuard

__all__ = ["AUTH_METHOD", "HELD_PACKET_OVERHEAD", "Binding", "Handshake", "bind_client_id", "classify_credentials",
           "escape_sub", "upstream_connect"]

#: The v5 enhanced-authentication method the gateway answers itself.
AUTH_METHOD = "keygate-token"

# What holding one packet until CONNACK costs beside its bytes (measured on CPython 3.11: the Frame
# 80, its memoryview 184, the bytes header 33, the list slot 8): counted in the pre-auth budget.
HELD_PACKET_OVERHEAD = 320

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


class Handshake:
    """The CONNECT / AUTH flow of one connection, from the client's CONNECT to the broker's
    CONNACK, and re-authentication after it (sans-IO, one per session).

    It owns what the flow learns: the CONNECT, the enforced keepalive, the Session Expiry
    (capped, as the broker keeps it), the client id the broker knows, and the packets the
    client sends before the CONNACK (held, at most ``preauth_max_bytes`` with their overhead,
    :data:`HELD_PACKET_OVERHEAD` each). The session moves the phase; what refuses the
    connection is returned as an :class:`~proxy.mqtt.output.End` (``connack``: the CONNACK
    code) for the session to carry out.
    """

    __slots__ = ("_assigned_id", "_config", "_credential_problem", "_cx", "_enhanced_auth", "_head",
                 "_oversized", "_pending", "_pending_bytes", "_random_hex", "_token_leeway", "_upstream_password",
                 "_wallclock", "_will", "admit_connect", "connect", "keepalive", "preauth_max", "reauthenticating",
                 "session_expiry", "upstream_client_id")

    def __init__(self, *, config: MqttConfig, context: Context, will: WillGuard, wallclock: Callable[[], float],
                 random_hex: Callable[[int], str], token_leeway: float, upstream_password: str,
                 credential_problem: Callable[[Identity], str | None] | None,
                 admit_connect: Callable[[Identity, str, bool, float], str | None] | None) -> None:
        self._config = config
        self._cx = context
        self._will = will
        self._wallclock = wallclock
        self._random_hex = random_hex
        self._token_leeway = token_leeway
        self._upstream_password = upstream_password
        self._credential_problem = credential_problem
        # Asked once the credentials and client id are settled: (identity, broker client id, clean
        # start, session expiry) -> the reason to refuse (a shell quota: persistent sessions), or None.
        self.admit_connect = admit_connect
        # Before CONNACK nothing is known of the client: its packets (the CONNECT first) are
        # refused at their fixed header beyond this size, and held up to this many bytes.
        self.preauth_max = config.preauth_max_bytes
        self.connect: Connect | None = None
        self.keepalive = 0             # enforced keepalive (seconds, 0 = none)
        self.session_expiry = 0        # seconds the broker keeps the session after the close (capped)
        self.upstream_client_id = ""   # as the broker knows it
        self.reauthenticating = False  # an AUTH 0x19 asked of the shell, not answered yet
        self._assigned_id = False      # the gateway chose the client id: tell a v5 client
        self._enhanced_auth = False    # the client used AUTH_METHOD in CONNECT
        self._pending: list[Frame] = []
        self._pending_bytes = 0
        self._head = bytearray()       # the stream's first bytes, until CONNECT: its protocol level
        self._oversized = ""           # a CONNECT refused at its header, waiting for its level byte

    # ------------------------------------------------------------ CONNECT

    def head(self, acts: Output, view: memoryview) -> End | None:
        """The stream's first bytes, until the CONNECT is decoded. A CONNECT refused at its
        header waits only for its level byte: then it is answered (an End), nothing more read."""
        head = self._head
        if len(head) < codec.CONNECT_HEAD_BYTES:
            head += view[:codec.CONNECT_HEAD_BYTES - len(head)]
        return self._refuse_oversized(acts) if self._oversized else None

    @property
    def oversized(self) -> bool:
        """A CONNECT refused at its header is waiting for its level byte."""
        return bool(self._oversized)

    def oversized_connect(self, acts: Output, message: str) -> End | None:
        """The Framer refused the CONNECT at its fixed header (over the pre-authentication limit)."""
        self._cx.audit("connect", "deny", reason=f"CONNECT over the pre-authentication limit: {message}",
                       reason_code=Reason.PACKET_TOO_LARGE)
        self._oversized = message
        return self._refuse_oversized(acts)

    def _refuse_oversized(self, acts: Output) -> End | None:
        """Answered in its client's version: v5 CONNACK 0x95; 3.1.1 (no code for it) and anything
        else a close. Only the few bytes up to the level byte are ever held for it."""
        level = codec.peek_connect_level(self._head)
        if level is None:
            return None  # the level byte has not arrived yet (the connect deadline still runs)
        detail, self._oversized = self._oversized, ""
        self._head = bytearray()
        if level == MQTT_5:
            self._cx.level = MQTT_5
            acts.to_client.append(codec.encode_connack(False, Reason.PACKET_TOO_LARGE, MQTT_5))
            return End("protocol_error", detail, code=Reason.PACKET_TOO_LARGE)
        return End("protocol_error", detail)

    def connected(self, acts: Output, frame: Frame) -> End | None:
        """The client's CONNECT: None when it is to be authenticated (``acts.auth``)."""
        # Field lengths are checked before anything is decoded or any credential looked at.
        limits = self._config.limits
        c = codec.decode_connect(frame.body, max_client_id=limits.client_id_max_bytes,
                                 max_username=limits.username_max_bytes, max_will_topic=limits.topic_max_bytes)
        self._head = bytearray()
        self.connect = c
        self._cx.level = level = c.protocol_level
        if level == 4 and not c.client_id and not c.clean_start:
            # [MQTT-3.1.3-8]: an empty client id needs a clean session in 3.1.1.
            self._cx.audit("connect", "deny", reason="empty client id without clean session")
            return End("client_id_rejected", "empty client id without clean session",
                       connack=Reason.CLIENT_IDENTIFIER_NOT_VALID)
        cap = self._config.max_keepalive_seconds
        self.keepalive = min(c.keepalive or cap, cap) if level == MQTT_5 else c.keepalive or cap
        method = get_prop(c.properties, Prop.AUTHENTICATION_METHOD)
        data = get_prop(c.properties, Prop.AUTHENTICATION_DATA)
        if method is not None and method != AUTH_METHOD:
            self._cx.audit("connect", "deny", resource=c.client_id, reason=f"authentication method {method!r}")
            self._cx.count(Metric("authentications", ("unknown", "fail")))
            return End("auth_failed", "bad method", connack=Reason.BAD_AUTHENTICATION_METHOD)
        if data is not None and method is None:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "Authentication Data without a method")
        self._enhanced_auth = method is not None
        acts.auth = AuthRequest(kind="connect", username=c.username, password=c.password,
                                auth_method=method, auth_data=data, client_id=c.client_id)  # type: ignore[arg-type]
        return None

    def authenticated(self, acts: Output, identity: Identity) -> End | None:
        """The CONNECT's credentials are ``identity``: None when the upstream CONNECT goes out
        (``acts``: OpenUpstream and the CONNECT), else why the CONNECT is refused."""
        c = self.connect
        if c is None:
            raise RuntimeError("authenticated before CONNECT")
        cx = self._cx
        cx.count(Metric("authentications", (identity.method, "ok")))
        level = c.protocol_level
        if identity.expires_at is not None and self._wallclock() >= identity.expires_at + self._token_leeway:
            return self._refused(identity, Reason.NOT_AUTHORIZED, "token_expired", "expired")
        # The credential was checked before an await: a deletion or rotation since then wins.
        problem = self._credential_problem(identity) if self._credential_problem is not None else None
        if problem:
            return self._refused(identity, Reason.BAD_USER_NAME_OR_PASSWORD, "auth_failed", problem)
        bound = bind_client_id(identity, c.client_id, self._config.user_client_id_prefix, self._random_hex)
        if bound.refusal:
            cx.audit("connect", "deny", identity=identity, resource=identity.device_id or c.client_id,
                     reason=bound.refusal)
            return End("client_id_rejected", bound.refusal, connack=Reason.CLIENT_IDENTIFIER_NOT_VALID)
        cx.client_id, self.upstream_client_id = bound.client_id, bound.upstream_client_id
        self._assigned_id = bound.assigned
        # The Will is a publish that happens later: authorize it now.
        if not self._will.authorize(identity, c.will):
            return End("not_authorized", "Will topic not allowed", connack=Reason.NOT_AUTHORIZED)
        expiry_cap = self._config.limits.persistent_session_expiry_seconds
        if level == MQTT_5:
            asked = get_prop(c.properties, Prop.SESSION_EXPIRY_INTERVAL)
            self.session_expiry = min(asked if isinstance(asked, int) else 0, expiry_cap)
        else:
            self.session_expiry = 0 if c.clean_start else expiry_cap
        if self.admit_connect is not None:
            refusal = self.admit_connect(identity, self.upstream_client_id, c.clean_start, self.session_expiry)
            if refusal:
                return self._refused(identity, Reason.QUOTA_EXCEEDED if level == MQTT_5 else
                                     Reason.SERVER_UNAVAILABLE, refusal, refusal)
        cx.identity = identity
        cx.audit("connect", "allow", identity=identity, resource=cx.client_id, protocol_level=level)
        upstream = upstream_connect(c, self._config, self._upstream_password, self.upstream_client_id,
                                    self.keepalive, self.session_expiry)
        acts.open_upstream = True
        acts.to_broker.append(codec.encode_connect(upstream))
        return None

    def _refused(self, identity: Identity, code: int, reason: str, detail: str) -> End:
        self._cx.audit("connect", "deny", identity=identity, reason=detail)
        return End(reason, detail, connack=code)

    def failed(self, reason: AuthReason, method: str, authenticating: bool) -> End | None:
        """The shell's verifier refused the credentials (of the CONNECT while ``authenticating``,
        or of a re-authentication)."""
        cx = self._cx
        cx.count(Metric("authentications", (method or "unknown", "fail")))
        reason_name = getattr(reason, "value", str(reason))
        if self.reauthenticating:
            self.reauthenticating = False
            cx.audit("reauth", "deny", identity=cx.identity, reason=reason_name)
            return End("reauth_failed", reason_name, disconnect=Reason.NOT_AUTHORIZED)
        if not authenticating:
            return None
        if reason == AuthReason.NO_CREDENTIALS:
            code = Reason.NOT_AUTHORIZED
        elif reason == AuthReason.ISSUER_UNREACHABLE:
            code = Reason.SERVER_UNAVAILABLE
        else:
            code = Reason.BAD_USER_NAME_OR_PASSWORD
        cx.audit("connect", "deny", resource=self.connect.client_id if self.connect else "",
                 reason=reason_name, method=method or None)
        return End("auth_failed", reason_name, connack=code)

    # ------------------------------------------------------------ before the CONNACK

    def hold(self, frames: list[Frame], buffered: int) -> End | None:
        """Packets that arrive while authentication runs wait (copied: the buffer is reused), at
        most the pre-authentication limit of bytes, counting everything held for them: each held
        packet's bookkeeping and the partial packet in the framer (``buffered``)."""
        for frame in frames:
            end = self.over_preauth(len(frame.raw) + HELD_PACKET_OVERHEAD, buffered)
            if end is not None:
                return end
            self._pending_bytes += len(frame.raw) + HELD_PACKET_OVERHEAD
            self._pending.append(Frame(frame.type, frame.flags, memoryview(bytes(frame.raw)),
                                       frame.body_start, -1, -1))
        return self.over_preauth(0, buffered)

    def over_preauth(self, more: int, buffered: int) -> End | None:
        """Would holding ``more`` bytes take what waits for authentication (held packets with
        their overhead, plus the framer's partial packet, ``buffered``) past the limit?"""
        held = self._pending_bytes + buffered
        if held + more <= self.preauth_max:
            return None
        self._cx.audit("connect", "deny", reason="too much data before CONNACK", held=held, more=more,
                       limit=self.preauth_max)
        return End("buffer_full", "", connack=Reason.QUOTA_EXCEEDED if self._cx.level == MQTT_5 else
                   Reason.SERVER_UNAVAILABLE)

    def take_pending(self) -> list[Frame]:
        """The packets held until the CONNACK (now no longer held)."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        return pending

    def asked_to_discard_will(self) -> bool:
        """A normal DISCONNECT the client sent before the broker's CONNACK, still held here."""
        for f in self._pending:
            if f.type == PacketType.DISCONNECT:
                body = f.body
                return not (len(body) and body[0] == Reason.DISCONNECT_WITH_WILL)
        return False

    def connack(self, acts: Output, frame: Frame) -> End | None:
        """The broker's CONNACK: None when it accepted (the client's CONNACK in ``acts``, the
        keepalive perhaps lowered), else the End of a connection the broker refused."""
        cx = self._cx
        level = cx.level
        ca = codec.decode_connack(frame.body, level)
        if ca.reason != 0:
            cx.audit("connect", "deny", identity=cx.identity, reason=f"broker refused 0x{ca.reason:02X}")
            acts.to_client.append(bytes(frame.raw) if level != MQTT_5 else
                                  codec.encode_connack(False, ca.reason, level, without_props(
                                      ca.properties, Prop.ASSIGNED_CLIENT_IDENTIFIER)))
            self._will.disarm()  # refused: the broker holds no Will
            return End("broker_refused", f"0x{ca.reason:02X}", code=ca.reason)
        # A resumed session (session_present) holds filters the gateway never saw: nothing in
        # the table proves their deliveries, so each is asked of the policy.
        if level == MQTT_5:
            c = self.connect
            if c is None:
                raise RuntimeError("CONNACK before CONNECT")
            props, self.keepalive = client_connack_props(
                ca.properties, self._config, assigned_id=cx.client_id if self._assigned_id else None,
                keepalive=self.keepalive, asked_keepalive=c.keepalive, enhanced_auth=self._enhanced_auth)
            acts.to_client.append(codec.encode_connack(ca.session_present, 0, level, props))
        else:
            acts.to_client.append(bytes(frame.raw))
        return None

    # ------------------------------------------------------------ after the CONNACK

    def reauth(self, acts: Output, frame: Frame) -> None:
        """A v5 client's AUTH: only a re-authentication (0x19) with AUTH_METHOD and a fresh token."""
        a = codec.decode_auth(frame.body)
        method = get_prop(a.properties, Prop.AUTHENTICATION_METHOD)
        if a.reason != Reason.REAUTHENTICATE:
            raise ProtocolError(Reason.PROTOCOL_ERROR, f"AUTH reason 0x{a.reason:02X} from the client")
        if method != AUTH_METHOD:
            raise ProtocolError(Reason.BAD_AUTHENTICATION_METHOD, f"authentication method {method!r}")
        if self.reauthenticating:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "re-authentication already in progress")
        data = get_prop(a.properties, Prop.AUTHENTICATION_DATA)
        self.reauthenticating = True
        acts.end_run()
        acts.auth = AuthRequest(kind="reauth", username=None, password=None, auth_method=AUTH_METHOD,
                                auth_data=data, client_id=self._cx.client_id)  # type: ignore[arg-type]

    def reauthenticated(self, acts: Output, identity: Identity) -> End | None:
        """The fresh token is ``identity``: the same subject → AUTH 0x00 and None (the session
        then decides everything again); another → DISCONNECT 0x87."""
        self.reauthenticating = False
        cx = self._cx
        old = cx.identity
        if old is None or identity.sub != old.sub:
            cx.count(Metric("authentications", (identity.method, "fail")))
            cx.audit("reauth", "deny", identity=old, reason="subject changed", new_sub=identity.sub)
            return End("reauth_failed", "subject changed", disconnect=Reason.NOT_AUTHORIZED)
        cx.count(Metric("authentications", (identity.method, "ok")))
        cx.identity = identity
        cx.audit("reauth", "allow", identity=identity)
        acts.to_client.append(codec.encode_auth(Reason.SUCCESS, [(Prop.AUTHENTICATION_METHOD, AUTH_METHOD)]))
        return None

    def disconnected(self, acts: Output, frame: Frame, data: memoryview | None) -> End:
        """The client's DISCONNECT, as the broker gets it: a Session Expiry set on it capped (and
        followed by ``session_expiry``), the Will published only if it is allowed now."""
        level = self._cx.level
        d = codec.decode_disconnect(frame.body, level)
        c = self.connect
        asked = get_prop(d.properties, Prop.SESSION_EXPIRY_INTERVAL)
        if level == MQTT_5 and c is not None and not get_prop(c.properties, Prop.SESSION_EXPIRY_INTERVAL) \
                and asked:
            # [MQTT-3.14.2-2]. Forwarded, the broker would take it for a protocol error and
            # publish the Will on its own; refused here, the Will is decided at the close.
            raise ProtocolError(Reason.PROTOCOL_ERROR, "Session Expiry Interval on DISCONNECT after 0 at CONNECT")
        new_expiry = level == MQTT_5 and isinstance(asked, int)
        over = False
        if new_expiry and isinstance(asked, int):
            cap = self._config.limits.persistent_session_expiry_seconds
            self.session_expiry = min(asked, cap)
            over = asked > cap  # the DISCONNECT must go upstream with the capped value
        will = self._will
        if d.reason == Reason.DISCONNECT_WITH_WILL and will.armed:
            will.disarm()
            if not will.still_allowed():  # no longer allowed: a plain DISCONNECT discards it
                acts.end_run()
                acts.to_broker.append(codec.encode_disconnect(level, 0, [
                    (Prop.SESSION_EXPIRY_INTERVAL, self.session_expiry)] if new_expiry else []))
            elif over:  # published as the client asks, the session kept no longer than the cap
                self._capped(acts, level, d)
            else:
                acts.forward(acts.to_broker, frame, data)
        else:
            will.disarm()  # a normal DISCONNECT (or one re-encoded): the broker discards the Will
            if over:
                self._capped(acts, level, d)
            else:
                acts.forward(acts.to_broker, frame, data)
        return End("client_disconnect", f"reason 0x{d.reason:02X}" if d.reason else "")

    def _capped(self, acts: Output, level: int, d: Disconnect) -> None:
        """The client's DISCONNECT upstream, its Session Expiry replaced by the capped one."""
        acts.end_run()
        acts.to_broker.append(codec.encode_disconnect(level, d.reason, [
            *without_props(d.properties, Prop.SESSION_EXPIRY_INTERVAL),
            (Prop.SESSION_EXPIRY_INTERVAL, self.session_expiry)]))
