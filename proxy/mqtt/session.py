"""The per-connection MQTT gateway state machine (sans-IO).

One :class:`Session` per client connection. The asyncio shell feeds it bytes
and timer ticks and carries out the :class:`Actions` it returns; the session
never touches a socket, a clock it was not given, or the event loop.

Contract for the shell (``proxy/mqtt/server.py``)
-------------------------------------------------

Create the session when the TCP connection is accepted (before the TLS
handshake, so the CONNECT deadline covers it)::

    session = Session(config=services.config.mqtt, policies=services.policies,
                      audit=services.audit, rate_limiter=shared_limiter,
                      token_leeway=services.config.oidc.leeway_seconds,
                      upstream_password=read_secret(...),
                      credential_problem=services.ownership.credential_problem,
                      subscription_quota=shared_quota)

``shared_limiter`` (:class:`RateLimiter`) and ``shared_quota``
(:class:`~proxy.mqtt.subscriptions.SubscriptionQuota`, made with
``mqtt.limits.subscriptions_per_identity``) are made once per gateway and shared
by all its sessions: both count per identity ``sub``, across connections.

Then, for every event, call one method and carry out the returned Actions:

* ``client_data(data)`` — bytes read from the client (``bytes``, ``bytearray``
  or ``memoryview``; any split, down to one byte at a time).
* ``broker_data(data)`` — bytes read from the broker.
* ``authenticated(identity)`` / ``authentication_failed(reason, method=...)``
  — the answer to ``Actions.auth`` (see below).
* ``tick()`` — when ``timeout()`` seconds have passed (``loop.call_later``;
  ``next_deadline()`` gives the same moment as a ``clock()`` value, i.e.
  ``time.monotonic`` unless injected, never a unix time). Re-read it after
  every call: it moves with traffic, CONNACK and re-authentication.
* ``broker_closed()`` (alias ``upstream_failed()``) — the upstream connection
  failed to open or was lost.
* ``client_closed()`` — the client connection ended, however it ended (TCP
  drop, or the shell closing it for a reason of its own), unless the session
  already closed it through ``Actions.close``: write its ``to_broker`` (a
  DISCONNECT that discards a Will no longer allowed) before closing the upstream.
* ``shutdown()`` — graceful server shutdown (v5: DISCONNECT 0x8B).
* ``invalidate()`` — policies were reloaded or ownership facts changed: drop
  cached decisions, close the connection if ``credential_problem(identity)``
  now names a reason (device deleted, key rotated: v5 DISCONNECT 0x98), and
  re-decide every subscription grant (a revoked grant stops deliveries at
  once). Carry out the Actions it returns.

Carrying out :class:`Actions` — every field of every Actions, whichever call
returned it (an ``auth`` can come out of ``broker_data``: a re-authentication
the client sent before the CONNACK), in this order:

1. ``to_client`` — write each item to the client (``transport.writelines``).
2. ``open_upstream`` — connect to the broker now; write ``to_broker`` once connected
   (if the connection fails, call ``broker_closed()``).
3. ``to_broker`` — write each item to the broker.
4. ``auth`` — an :class:`AuthRequest` to verify asynchronously; answer with
   ``authenticated()`` or ``authentication_failed()``.
5. ``close`` — flush both writes, then close the client and the upstream. The
   :class:`CloseInfo` says why (for logs and metrics; it is already audited).

Items in ``to_client`` / ``to_broker`` may be ``memoryview`` slices of the
buffer passed to that ``client_data`` / ``broker_data`` call. Consecutive
pass-through packets of one chunk come out as a single slice. The buffer must
not be overwritten while a transport still holds unsent data from it: uvloop's
``write()`` keeps the memoryview itself (no copy) when the socket does not take
it all at once, so a shell that reuses one receive buffer must switch to a
fresh buffer whenever ``transport.get_write_buffer_size()`` is non-zero after
its writes (or write ``bytes(item)`` copies).

While ``session.reading_paused`` is true (authentication or the upstream
CONNECT in progress) the shell should pause reading from the client; the
session holds at most ``mqtt.limits.connect_max_bytes`` of packets meanwhile
(and a partial packet of at most that size) and refuses the connection beyond
that (v5 CONNACK 0x97, 3.1.1 0x03).

Which credential a CONNECT carries (:func:`classify_credentials`)
------------------------------------------------------------------

1. v5 enhanced authentication, method ``keygate-token`` (:data:`AUTH_METHOD`),
   the access token as Authentication Data → token. Any other method is refused
   at once with CONNACK 0x8C and never asked about.
2. a password, and the user name is a registered device id → device key
   (user name = device id, password = K1 or K2).
3. any other password → access token (user name ignored).
4. no password → the verified TLS client certificate's CN (device certificate),
   if the shell has one.
5. nothing → ``("none",)``: the shell decides whether anonymous access is
   allowed (``authenticated(ANONYMOUS)``) or calls
   ``authentication_failed(AuthReason.NO_CREDENTIALS)``.

A v5 client re-authenticates with AUTH, reason 0x19 (Re-authenticate),
Authentication Method ``keygate-token`` and the fresh access token as
Authentication Data, whether it first connected with enhanced authentication
or with the token as password. The session asks the shell with
``AuthRequest(kind="reauth")``; a new identity for the same subject resets
identity and expiry and is answered AUTH 0x00; another subject or a failure
ends the connection with DISCONNECT 0x87.

Rules the session enforces
--------------------------

* CONNECT deadline (``connect_timeout_seconds``) from creation until the
  broker's CONNACK; keepalive enforced at 1.5x; keepalive 0 (and, for v5,
  anything above ``max_keepalive_seconds``) is capped at
  ``max_keepalive_seconds`` and v5 clients are told so (Server Keep Alive).
  3.1.1 clients cannot be told, so a larger keepalive is kept as asked.
* Client id: a device must use its own device id (empty → its id; another id →
  CONNACK 0x85 / 0x02). A user's id is forwarded as
  ``user_client_id_prefix + sub + "/" + client_id`` (``%`` and ``/`` in the sub
  percent-encoded, so two identities can never spell the same id; a device id
  starting with the prefix is refused, 0x85 / 0x02); an empty one is replaced by
  a generated ``kg-<random>`` (v5: returned as Assigned Client Identifier). An
  anonymous client always gets a fresh random id, so no one can resume or wipe
  another's session. The broker's Assigned Client Identifier never reaches the client.
* The upstream CONNECT carries no client user name, password, Authentication
  Method/Data or Topic Alias Maximum (absent = 0: the broker never sends
  aliases); ``upstream_username`` / password go in their place if configured.
* The Will is authorized as a publish (its topic, QoS and retain flag);
  refused → CONNACK 0x87 / 0x05. It is a publish the broker makes later, so it
  is decided again at the instant the connection ends, on every way it ends
  (TCP drop, keepalive or token expiry, rate limit, protocol error, shutdown,
  revoked credential, v5 DISCONNECT 0x04): if it is no longer allowed (a grant
  revoked, the token expired, the credential gone) a plain DISCONNECT goes
  upstream so the broker discards it; if it is, it goes out as the client asked.
  While the broker holds it, it is re-decided on every ``invalidate()`` and at
  the end of its grant: the broker publishes a Will it holds whenever it ends
  the connection itself (a session takeover, a protocol error it sees), so one
  no longer allowed ends the connection at once (plain DISCONNECT upstream; v5
  DISCONNECT 0x87 to the client). Its Will Delay Interval is not passed on: a
  delayed Will would be published at an instant the gateway no longer sees. A
  v5 DISCONNECT that sets a Session Expiry Interval after 0 at CONNECT
  [MQTT-3.14.2-2] is refused here (a protocol error), never forwarded.
* Authentication failures: CONNACK 0x86 / 0x04 (bad credentials), 0x87 / 0x05
  (none given), 0x88 / 0x03 (issuer unreachable), 0x8C (unknown method, v5).
* Topic aliases (client → gateway, v5): tracked by the gateway itself up to
  ``topic_alias_maximum`` (advertised in CONNACK, replacing the broker's value;
  0 = aliases refused with DISCONNECT 0x94). Every PUBLISH is checked on its
  resolved topic and forwarded with the full topic and no alias, so a denied
  alias-setting PUBLISH cannot leave the broker with a stale mapping.
* Denied PUBLISH: v5 QoS 1/2 → PUBACK/PUBREC 0x87, QoS 0 dropped. 3.1.1:
  ``denied_publish_v3: drop`` acknowledges and drops (PUBACK, or PUBREC and
  PUBCOMP on the client's PUBREL), ``disconnect`` closes. Always audited. A
  PUBREL for a QoS 2 id the gateway answered is completed by the gateway (also
  in v5, where paho 2.x sends one after a refused PUBREC), never forwarded.
* QoS 2 from the client: the broker publishes a QoS 2 message when it gets the
  PUBREL, so an allowed QoS 2 PUBLISH is held by the gateway (answered PUBREC;
  at most 256 KiB or one packet per connection, more → v5 PUBREC 0x97 / close)
  and decided again at the client's PUBREL: still allowed → the PUBLISH and a
  PUBREL go upstream in one write (the broker's PUBREC needs no answer, its
  PUBCOMP answers the client); not → PUBCOMP 0x92 (v5) / PUBCOMP, audited. A
  PUBREL for an id the gateway holds nothing for (e.g. sent on a later
  connection) is answered the same way and never forwarded.
* SUBSCRIBE: each filter checked (``$share/<group>/`` stripped first); denied
  filters answered 0x80 (3.1.1) / 0x87 (v5); the rest go upstream under the
  original packet id and the broker's SUBACK is merged back in order; all
  denied → the gateway answers alone. Subscriptions are capped (see Limits). A
  shared subscription's group goes upstream as ``<escaped sub>~<group>``: the
  identity's own, so no stranger can join it and take a share of its messages.
* Subscriptions: :class:`~proxy.mqtt.subscriptions.SubscriptionTable` is the one
  record of what the client holds at the broker; it changes when a SUBSCRIBE
  or UNSUBSCRIBE is forwarded (the broker's order), never on the acks.
* Deliveries: every delivery is checked. A topic an ALLOW grant proves (an
  exact filter by a set lookup, a wildcard one by matching) passes; otherwise
  ``policies.may_receive`` decides. Dropped QoS 1 → PUBACK to the broker; QoS 2
  → PUBREC, then PUBCOMP on the broker's PUBREL; the client sees none of it.
  A dropped delivery is audited once per topic per cache lifetime.
* Grants end on time: a decision that rests on something with an end (a
  delegation's ``expires_at``: ``Decision.until``) is kept only until then; the
  subscription grants are re-decided at their earliest end (``next_deadline()``
  includes it, and every chunk checks it too, so a late timer lets nothing
  through), and the token's expiry closes the connection. Publish and delivery
  decisions are also cached for at most one second and dropped on ``invalidate()``.
* Token expiry: closed at ``expires_at + token_leeway`` (v5: DISCONNECT 0xA0 first).
* Rate limit (:class:`RateLimiter`, per identity ``sub``, shared across
  connections): each PUBLISH costs one token, each filter of a SUBSCRIBE or
  UNSUBSCRIBE one (the packet is refused whole, before the policy is asked).
  ``disconnect`` → v5 DISCONNECT 0x96 / close; ``drop`` → the message is
  dropped (v5 QoS 1/2 answered 0x97, 3.1.1 acknowledged), a SUBSCRIBE answered
  0x97 / 0x80 for every filter, an UNSUBSCRIBE answered v5 UNSUBACK 0x80 for
  every filter (UNSUBACK has no quota code) or, in 3.1.1 (whose UNSUBACK cannot
  refuse), the connection closed. Audited one line per second per connection at
  most, with the number refused (publishes: ``dropped``; filters: ``count``).
* Protocol violations (see :mod:`proxy.mqtt.codec`) → v5 CONNACK or DISCONNECT
  with the codec's reason code, 3.1.1 a plain close; audited.
* Decision caches per connection (publish decisions, deliveries): at most 4096
  entries and 64 KiB of topic bytes each (the values hold the topic once more),
  dropped whole when either is reached.

Limits (``mqtt.limits``): what one connection can make the gateway hold
-----------------------------------------------------------------------

Every length is in bytes of the UTF-8 encoding and is checked before the string
is decoded, and, before CONNACK, before any credential is asked about
(``Actions.auth`` is never returned for a refused CONNECT).

* Before the broker's CONNACK, a packet (the CONNECT first) larger than
  ``connect_max_bytes`` (at most ``max_packet_size``) is refused at its fixed
  header: nothing of its body is read. A CONNECT so refused is answered in its
  client's version once its level byte is in (the first 14 bytes at most are
  held for that): v5 CONNACK 0x95; 3.1.1 and 3.1, which have no code for it, a
  plain close. After CONNACK the limit is ``max_packet_size``.
* CONNECT fields: client id over ``client_id_max_bytes`` → CONNACK 0x85 / 0x02;
  user name over ``username_max_bytes`` → 0x86 / 0x04; Will topic over
  ``topic_max_bytes`` → v5 0x90, 3.1.1 a plain close (as for any invalid Will
  topic: no 3.1.1 code names a topic). Audited as ``connect`` denials.
* PUBLISH topic over ``topic_max_bytes`` → v5 DISCONNECT 0x90 (Topic Name
  invalid), 3.1.1 a plain close, before the decision cache or the policy sees it.
* SUBSCRIBE filter over ``topic_max_bytes`` → that filter alone answered 0x8F
  (v5, Topic Filter invalid) / 0x80, never decoded nor asked of the policy; so
  the shared decision cache only holds filters within the limit. UNSUBSCRIBE
  filter over it → v5 DISCONNECT 0x8F, 3.1.1 a plain close.
* Subscriptions: at most ``subscriptions_per_connection`` filters per connection
  and ``subscriptions_per_identity`` per identity ``sub`` across its connections
  (the shared ``subscription_quota``; none without one); more → 0x97 / 0x80. A
  filter takes a slot when it is forwarded (a denied one takes none; a held one
  re-subscribed takes no second); its slot is given back when an UNSUBSCRIBE of
  it is forwarded and, for all of them, when the connection closes (every close
  comes through the session, ``client_closed()`` included).
* Refusals a client can repeat at will (an over-long filter, a subscription over
  a cap, filters over the rate) are audited one line per second per kind at
  most, with ``count``, the number refused since the previous line; what is left
  is written when the connection closes, so no refusal goes unrecorded.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

from prometheus_client import Counter

from proxy.config import MqttConfig, RateLimitConfig
from proxy.identity.model import AuthReason, Identity
from proxy.metrics import REGISTRY, Tally
from proxy.mqtt.audit_summary import ConnectionSummary
from proxy.mqtt import codec
from proxy.mqtt.codec import Frame, Framer, LimitExceeded, ProtocolError
from proxy.mqtt.packets import (
    MQTT_5, V3_CONNACK_FOR, V3_SUBACK_FAILURE, Connect, PacketType, Prop, Reason, Suback,
    Subscribe, Subscription, Unsubscribe, V3ConnackCode, Will, get_prop, without_props,
)
from proxy.mqtt.subscriptions import SubscriptionQuota, SubscriptionTable
from proxy.mqtt.subscriptions import filter_matches as topic_matches
from proxy.policy.decision import Verdict

__all__ = ["AUTH_METHOD", "Actions", "AuthRequest", "CloseInfo", "RateLimiter", "Session",
           "SubscriptionQuota", "classify_credentials", "topic_matches"]

#: The v5 enhanced-authentication method the gateway answers itself.
AUTH_METHOD = "keygate-token"

# Per-connection decision caches: at most this many entries and this many bytes of topics
# (keys; each value holds the topic once more). Topics from clients are at most topic_max_bytes.
_CACHE_MAX = 4096
_CACHE_MAX_BYTES = 64 * 1024
# Rate-limit tokens the publish fast path takes per call (the rest is given back at the chunk's end).
_RATE_BATCH = 256
# Cached decisions expire after this long at the latest; a decision that rests on something
# with an end (a delegation's expiry) is dropped at that end (Decision.until).
_DECISION_TTL = 1.0
_NEVER = float("inf")
# Bytes of QoS 2 publishes a connection may have awaiting their PUBREL (at least one packet).
_QOS2_HOLD_BYTES = 256 * 1024
# What holding one packet until CONNACK costs beside its bytes (measured on CPython 3.11: the Frame
# 80, its memoryview 184, the bytes header 33, the list slot 8): counted in the pre-auth budget.
HELD_PACKET_OVERHEAD = 320

T = PacketType

# Counted per message: tallies (plain integers read at scrape time), not locked counters.
DECISIONS = Tally("keygate_mqtt_decisions", "MQTT authorization decisions", ["action", "result"])
AUTHENTICATIONS = Counter("keygate_mqtt_authentications", "MQTT authentications",
                          ["method", "result"], registry=REGISTRY)
RATE_LIMITED = Counter("keygate_mqtt_rate_limited", "MQTT messages over the per-identity rate limit",
                       registry=REGISTRY)
PROTOCOL_ERRORS = Counter("keygate_mqtt_protocol_errors", "MQTT protocol violations refused",
                          ["side"], registry=REGISTRY)
MESSAGES = Tally("keygate_mqtt_messages", "PUBLISH packets forwarded, by direction", ["direction"])
_TO_BROKER = MESSAGES.labels("client_to_broker")
_TO_CLIENT = MESSAGES.labels("broker_to_client")
_ALLOWED = {a: DECISIONS.labels(a, "allow") for a in ("publish", "subscribe", "receive", "will")}
_DENIED = {a: DECISIONS.labels(a, "deny") for a in ("publish", "subscribe", "receive", "will")}
_ALLOWED_PUBLISH = _ALLOWED["publish"]
_ALLOWED_RECEIVE = _ALLOWED["receive"]


# --------------------------------------------------------------------------- public records


@dataclass
class AuthRequest:
    """Credentials for the shell to verify; it answers ``authenticated`` / ``authentication_failed``."""
    kind: Literal["connect", "reauth"]
    username: str | None
    password: bytes | None
    auth_method: str | None
    auth_data: bytes | None
    client_id: str

    def __repr__(self) -> str:  # never show a secret in a log line or a traceback
        return (f"AuthRequest(kind={self.kind!r}, username={self.username!r}, "
                f"password={'<set>' if self.password is not None else None}, "
                f"auth_method={self.auth_method!r}, "
                f"auth_data={'<set>' if self.auth_data is not None else None}, client_id={self.client_id!r})")


@dataclass
class CloseInfo:
    # One word: protocol_error, connect_timeout, keepalive_timeout, auth_failed, not_authorized,
    # client_id_rejected, token_expired, reauth_failed, rate_limited, denied_publish,
    # client_disconnect, broker_disconnect, broker_refused, broker_closed, buffer_full, shutdown.
    reason: str
    detail: str = ""
    reason_code: int | None = None  # the MQTT code sent to the client, if any


class Actions:
    """What the shell must do after one call, in this order: write ``to_client``, open the
    broker connection, write ``to_broker``, run ``auth``, close.

    A plain class, not a dataclass: one is made per chunk read, on the hot path."""

    __slots__ = ("to_client", "to_broker", "auth", "open_upstream", "close")

    def __init__(self) -> None:
        self.to_client: list[Any] = []   # bytes | memoryview
        self.to_broker: list[Any] = []
        self.auth: AuthRequest | None = None
        self.open_upstream = False
        self.close: CloseInfo | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Actions):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return (f"Actions(to_client={self.to_client!r}, to_broker={self.to_broker!r}, auth={self.auth!r}, "
                f"open_upstream={self.open_upstream}, close={self.close!r})")


def classify_credentials(req: AuthRequest, cert_cn: str | None,
                         is_device: Callable[[str], bool]) -> tuple:
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


class RateLimiter:
    """Token buckets keyed by identity ``sub``, shared by all of that identity's connections."""

    def __init__(self, messages_per_second: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000):
        self.rate = float(messages_per_second)
        self.burst = float(max(burst, 1))
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}

    @classmethod
    def from_config(cls, cfg: RateLimitConfig, *, clock: Callable[[], float] = time.monotonic) -> "RateLimiter":
        return cls(cfg.messages_per_second, cfg.burst, clock=clock)

    def allow(self, key: str, cost: float = 1.0) -> bool:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now)
            bucket = self._buckets[key] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < cost:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - cost
        return True

    def take(self, key: str, want: int) -> int:
        """Up to ``want`` whole tokens at once (how many were granted): the fast path asks
        for a batch per chunk instead of one call per message, and gives back the rest."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now)
            bucket = self._buckets[key] = [self.burst, now]
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        granted = int(tokens)
        if granted > want:
            granted = want
        bucket[0] = tokens - granted
        return granted

    def give_back(self, key: str, n: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None and n > 0:
            bucket[0] = min(self.burst, bucket[0] + n)

    def _prune(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket.
        full = [k for k, (tok, last) in self._buckets.items() if tok + (now - last) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()


# --------------------------------------------------------------------------- helpers


def _escape_sub(sub: str) -> str:
    """A subject with no "/" in it, so ``prefix + sub + "/" + client id`` splits one way only;
    and no "~", so no subject can spell the gateway's own names (``~anonymous``)."""
    return sub.replace("%", "%25").replace("/", "%2F").replace("~", "%7E")


def _without_will_delay(will: Will | None) -> Will | None:
    """The Will as the broker gets it: without a Will Delay Interval. A delayed Will would be
    published after the connection ended, at an instant the gateway no longer sees; without the
    delay it is decided at the instant the connection ends, and published then or never."""
    if will is None or get_prop(will.properties, Prop.WILL_DELAY_INTERVAL) is None:
        return will
    return Will(will.topic, will.payload, will.qos, will.retain,
                without_props(will.properties, Prop.WILL_DELAY_INTERVAL))


def _verdict(decision: Any) -> Verdict:
    v = getattr(decision, "verdict", None)
    if v is None:
        return Verdict.ALLOW if getattr(decision, "allowed", False) else Verdict.DENY
    return v if isinstance(v, Verdict) else Verdict[str(getattr(v, "name", v)).upper()]


# --------------------------------------------------------------------------- the session


class Session:
    def __init__(self, *, config: MqttConfig, policies: Any, audit: Any,
                 clock: Callable[[], float] = time.monotonic, wallclock: Callable[[], float] = time.time,
                 rate_limiter: RateLimiter | None = None, token_leeway: float = 0.0,
                 upstream_password: str | None = None, peer: str = "",
                 credential_problem: Callable[[Identity], str | None] | None = None,
                 subscription_quota: SubscriptionQuota | None = None,
                 admit_connect: Callable[[Identity, str, bool, float], str | None] | None = None):
        self.config = config
        # Asked once the credentials and client id are settled: (identity, broker client id, clean
        # start, session expiry) -> the reason to refuse (a shell quota: persistent sessions), or None.
        self.admit_connect = admit_connect
        self.session_expiry = 0  # seconds the broker keeps the session after the close (capped)
        limits = config.limits
        # Before CONNACK nothing is known of the client: its packets (the CONNECT first) are
        # refused at their fixed header beyond this size, and held up to this many bytes.
        self._preauth_max = min(limits.connect_max_bytes, config.max_packet_size)
        self._topic_max = limits.topic_max_bytes
        # Shared by all of an identity's connections (the shell makes one per gateway); None: no cap.
        self.subscription_quota = subscription_quota
        self._quota_key: str | None = None  # the identity sub the held slots are counted under
        self._quota_held = 0
        # Why the identity's credential no longer stands (device deleted, key rotated), or None:
        # asked at authentication and on every invalidate().
        self.credential_problem = credential_problem
        self.policies = policies
        self.audit = audit
        self.clock = clock
        self.wallclock = wallclock
        self.rate_limiter = rate_limiter
        self.token_leeway = token_leeway
        self.peer = peer
        self._upstream_password = config.upstream_password if upstream_password is None else upstream_password

        self.identity: Identity | None = None
        self.protocol_level = 0
        self.closed = False
        self.client_id = ""            # as the client knows it
        self.upstream_client_id = ""   # as the broker knows it
        self.keepalive = 0             # enforced keepalive (seconds, 0 = none)

        self._state = "connect"        # connect -> auth -> upstream -> open -> closed
        self._created = clock()
        self._last_rx = self._created
        self._client_framer = Framer(self._preauth_max)  # raised to max_packet_size at CONNACK
        self._head = bytearray()       # the stream's first bytes, until CONNECT: its protocol level
        self._oversized = ""           # a CONNECT refused at its header, waiting for its level byte
        self._broker_framer = Framer(codec.MAX_REMAINING_LENGTH + 5)
        self._connect: Connect | None = None
        self._assigned_id = False      # the gateway chose the client id: tell a v5 client
        self._enhanced_auth = False    # the client used AUTH_METHOD in CONNECT
        self._pending: list[Frame] = []
        self._pending_bytes = 0
        self._reauth = False
        self._will_armed = False       # the broker holds this connection's Will
        self._aliases: dict[int, str] = {}
        self._subs = SubscriptionTable()
        self._recv_cache: dict[bytes, bool] = {}
        self._pub_cache: dict[tuple, tuple[str, Any]] = {}
        self._recv_cache_bytes = 0     # topic bytes in each cache since it was last empty
        self._pub_cache_bytes = 0
        self._caches_until = 0.0       # clock() after which both caches are dropped (time-bound grants)
        # clock() at which the subscription grants or the token end: checked on every chunk as
        # well as by the timer, so a late timer lets nothing through after the end.
        self._grants_until = _NEVER
        self._published = 0            # allowed publishes / deliveries not yet added to the metrics
        self._delivered = 0
        self._rate_limited = 0         # publishes over the rate limit since the last audit line
        self._rate_audit_at = 0.0
        # Refusals audited one line per second at most: kind -> [refused since the last line,
        # clock() of the next line allowed, the fields of the last refusal].
        self._folds: dict[str, list] = {}
        self._summary = ConnectionSummary()  # the close record's counts (audit_summary.py)
        self._forwarded = 0            # PUBLISH packets passed on, per direction, not yet counted
        self._handed = 0
        self._suback_slots: dict[int, list[int | None]] = {}
        self._client_qos2_answered: set[int] = set()
        self._broker_qos2_dropped: set[int] = set()
        # QoS 2 publishes from the client, held here until their PUBREL and decided again then: the
        # broker releases a QoS 2 message at PUBREL, so it must not hold one that is no longer allowed.
        self._qos2_held: dict[int, tuple[bytes, str, bool]] = {}  # packet id -> (packet, topic, retain)
        self._qos2_held_bytes = 0
        self._qos2_releasing: set[int] = set()  # released to the broker: its PUBREC is answered here
        self._will_until: float | None = None   # when the Will's grant ends (session clock)
        self._will_devices: frozenset[str] = frozenset()
        # Pass-through run (see _pass): the output list, index of its last slice, start/end offsets.
        self._run: list | None = None
        self.fast_paths = True         # off only in tests that compare the fast paths with the full path

    # ----------------------------------------------------------------- shell API

    @property
    def reading_paused(self) -> bool:
        return self._state in ("auth", "upstream")

    @property
    def established(self) -> bool:
        """True once the broker's CONNACK has been passed to the client (authenticated, open)."""
        return self._state == "open"

    @property
    def deadline_inputs(self) -> tuple:
        """What :meth:`next_deadline` and :attr:`reading_paused` depend on besides activity
        (which only moves the keepalive deadline later): a shell that keeps a timer at the
        last deadline needs to look again only when this changes, or when the timer fires."""
        return (self._state, self.identity, self.keepalive, self._grants_until)

    def next_deadline(self) -> float | None:
        if self.closed:
            return None
        if self._state != "open":
            return self._created + self.config.connect_timeout_seconds
        deadlines = []
        if self.keepalive:
            deadlines.append(self._last_rx + 1.5 * self.keepalive)
        if self.identity is not None and self.identity.expires_at is not None:
            left = self.identity.expires_at + self.token_leeway - self.wallclock()
            deadlines.append(self.clock() + max(left, 0.0))
        if self._grants_until != _NEVER:
            deadlines.append(self._grants_until)
        return min(deadlines) if deadlines else None

    def timeout(self) -> float | None:
        """Seconds from now until ``tick()`` is due (``loop.call_later``), or None."""
        deadline = self.next_deadline()
        return None if deadline is None else max(0.0, deadline - self.clock())

    def client_data(self, data) -> Actions:
        acts = Actions()
        if self.closed:
            return acts
        if self._run is not None:
            self._end_run()
        now = self.clock()
        if now >= self._caches_until or now >= self._grants_until:
            self._expire(acts, now)
            if self.closed:
                return acts
        framer = self._client_framer
        view = codec.byte_view(data)
        start = 0
        if self._state == "connect":
            head = self._head
            if len(head) < codec.CONNECT_HEAD_BYTES:
                head += view[:codec.CONNECT_HEAD_BYTES - len(head)]
            if self._oversized:  # nothing more is read: only the level byte was missing
                self._refuse_oversized(acts)
                return acts
        if self._state == "open" and self.fast_paths and not framer.buffered:
            start = self._client_fast(acts, view)
            if start:
                self._last_rx = now
                if start == len(view):  # the whole chunk: nothing left for the full path
                    self._flush_counts()
                    return acts
                # The full path goes on where the fast one stopped; a pass-through
                # packet right after may still join the fast path's slice.
                out = acts.to_broker
                self._run = [out, len(out) - 1, 0, start, view, False]
        error: ProtocolError | None = None
        frames: list[Frame] = []
        if start < len(view):
            try:
                frames = framer.feed(view, start)
            except ProtocolError as exc:
                frames, error = exc.frames, exc
        if frames:
            self._last_rx = now = self.clock()
            if now >= self._caches_until:
                self._drop_caches(now)
        try:
            for i, frame in enumerate(frames):
                if self.closed:
                    break
                if self._state != "open" and self._state != "connect":
                    self._hold(acts, frames[i:])
                    break
                self._client_frame(acts, frame, view)
            if error is not None and not self.closed:
                raise error
            if (self._state == "auth" or self._state == "upstream") and framer.buffered:
                self._preauth_refused(acts, 0)  # a partial packet behind what is held counts too
        except ProtocolError as exc:
            self._client_violation(acts, exc)
        finally:
            self._end_run()
            self._flush_counts()
        return acts

    def broker_data(self, data) -> Actions:
        acts = Actions()
        if self.closed:
            return acts
        self._end_run()
        now = self.clock()
        if now >= self._caches_until or now >= self._grants_until:
            self._expire(acts, now)
            if self.closed:
                return acts
        try:
            framer = self._broker_framer
            view = codec.byte_view(data)
            start = 0
            if self._state == "open" and self.fast_paths and not framer.buffered:
                start = self._broker_fast(acts, view)
                if start:
                    out = acts.to_client
                    self._run = [out, len(out) - 1, 0, start, view, False]
            error: ProtocolError | None = None
            frames: list[Frame] = []
            if start < len(view):
                try:
                    frames = framer.feed(view, start)
                except ProtocolError as exc:
                    frames, error = exc.frames, exc
            for frame in frames:
                if self.closed:
                    break
                self._broker_frame(acts, frame, view)
            if error is not None and not self.closed:
                raise error
            if (self._state == "auth" or self._state == "upstream") and framer.buffered:
                self._preauth_refused(acts, 0)  # a partial packet behind what is held counts too
        except ProtocolError as exc:
            PROTOCOL_ERRORS.labels("broker").inc()
            self._audit("broker", "protocol_error", reason=exc.message)
            if self._state == "upstream":
                self._refuse_connect(acts, Reason.SERVER_UNAVAILABLE, "broker_refused", exc.message)
            else:
                if self.protocol_level == MQTT_5:
                    acts.to_client.append(codec.encode_disconnect(MQTT_5, Reason.UNSPECIFIED_ERROR))
                self._close(acts, "protocol_error", f"broker: {exc.message}")
        finally:
            self._end_run()
            self._flush_counts()
        return acts

    def authenticated(self, identity: Identity) -> Actions:
        acts = Actions()
        if self.closed:
            return acts
        if self._reauth:
            return self._reauthenticated(acts, identity)
        if self._state != "auth" or self._connect is None:
            return acts
        AUTHENTICATIONS.labels(identity.method, "ok").inc()
        c = self._connect
        level = c.protocol_level
        if identity.expires_at is not None and self.wallclock() >= identity.expires_at + self.token_leeway:
            return self._auth_refused(acts, identity, Reason.NOT_AUTHORIZED, "token_expired", "expired")
        # The credential was checked before an await: a deletion or rotation since then wins.
        problem = self.credential_problem(identity) if self.credential_problem is not None else None
        if problem:
            return self._auth_refused(acts, identity, Reason.BAD_USER_NAME_OR_PASSWORD, "auth_failed", problem)
        # Bind the client id to the identity.
        requested = c.client_id
        if identity.is_device:
            if not identity.device_id or identity.device_id.startswith(self.config.user_client_id_prefix):
                # A device registered as "u/<someone's sub>/..." would own that user's broker session.
                self._audit("connect", "deny", identity=identity, resource=identity.device_id,
                            reason="device id inside the user client id namespace")
                return self._refuse_connect(acts, Reason.CLIENT_IDENTIFIER_NOT_VALID, "client_id_rejected",
                                            "device id inside the user namespace")
            if requested and requested != identity.device_id:
                self._audit("connect", "deny", identity=identity, resource=requested,
                            reason="client id is not the device id")
                return self._refuse_connect(acts, Reason.CLIENT_IDENTIFIER_NOT_VALID, "client_id_rejected",
                                            "client id is not the device id")
            if not requested:
                self._assigned_id = True
            self.client_id = identity.device_id
            self.upstream_client_id = identity.device_id
        elif identity.is_anonymous:
            self.client_id = requested if requested else "kg-" + secrets.token_hex(8)
            self._assigned_id = not requested
            self.upstream_client_id = f"{self.config.user_client_id_prefix}~anonymous/{secrets.token_hex(12)}"
        else:
            if not requested:
                requested = "kg-" + secrets.token_hex(8)
                self._assigned_id = True
            self.client_id = requested
            self.upstream_client_id = f"{self.config.user_client_id_prefix}{_escape_sub(identity.sub)}/{requested}"
        # The Will is a publish that happens later: authorize it now.
        if c.will is not None:
            d = self.policies.may_publish(identity, c.will.topic, qos=c.will.qos, retain=c.will.retain,
                                          client_id=self.client_id)
            self._will_until = self._mono(getattr(d, "until", None))
            self._will_devices = getattr(d, "devices", frozenset())
            if not d.allowed:
                _DENIED["will"].inc()
                self._audit("will", "deny", identity=identity, resource=c.will.topic, rule=d.rule,
                            reason=d.reason, qos=c.will.qos, retain=c.will.retain)
                return self._refuse_connect(acts, Reason.NOT_AUTHORIZED, "not_authorized",
                                            "Will topic not allowed")
            _ALLOWED["will"].inc()
        expiry_cap = self.config.limits.persistent_session_expiry_seconds
        if level == MQTT_5:
            self.session_expiry = min(get_prop(c.properties, Prop.SESSION_EXPIRY_INTERVAL) or 0, expiry_cap)
        else:
            self.session_expiry = 0 if c.clean_start else expiry_cap
        if self.admit_connect is not None:
            refusal = self.admit_connect(identity, self.upstream_client_id, c.clean_start, self.session_expiry)
            if refusal:
                return self._auth_refused(acts, identity, Reason.QUOTA_EXCEEDED if level == MQTT_5 else
                                          Reason.SERVER_UNAVAILABLE, refusal, refusal)
        self.identity = identity
        self._audit("connect", "allow", identity=identity, resource=self.client_id,
                    protocol_level=level)
        # The upstream CONNECT: our credentials, the bound client id, no auth or alias properties,
        # the Session Expiry capped (the broker keeps the session no longer than the gateway counts it).
        props = without_props(c.properties, Prop.AUTHENTICATION_METHOD, Prop.AUTHENTICATION_DATA,
                              Prop.TOPIC_ALIAS_MAXIMUM, Prop.SESSION_EXPIRY_INTERVAL)
        if self.session_expiry:
            props.append((Prop.SESSION_EXPIRY_INTERVAL, self.session_expiry))
        username = self.config.upstream_username or None
        password = self._upstream_password.encode() if username and self._upstream_password else None
        upstream = Connect(protocol_name=c.protocol_name, protocol_level=level, clean_start=c.clean_start,
                           # Twice the enforced keepalive upstream: the gateway, not the broker, is the one
                           # that times a silent client out, with its own reason code and audit record.
                           keepalive=min(2 * self.keepalive, 65535), client_id=self.upstream_client_id,
                           username=username,
                           password=password, will=_without_will_delay(c.will), properties=props)
        self._state = "upstream"
        self._will_armed = c.will is not None  # from now on the broker may hold it
        self._update_horizon()
        acts.open_upstream = True
        acts.to_broker.append(codec.encode_connect(upstream))
        return acts

    def authentication_failed(self, reason: AuthReason, method: str = "") -> Actions:
        acts = Actions()
        if self.closed:
            return acts
        AUTHENTICATIONS.labels(method or "unknown", "fail").inc()
        reason_name = getattr(reason, "value", str(reason))
        if self._reauth:
            self._reauth = False
            self._audit("reauth", "deny", identity=self.identity, reason=reason_name)
            acts.to_client.append(codec.encode_disconnect(MQTT_5, Reason.NOT_AUTHORIZED))
            return self._close(acts, "reauth_failed", reason_name, Reason.NOT_AUTHORIZED)
        if self._state != "auth":
            return acts
        if reason == AuthReason.NO_CREDENTIALS:
            code = Reason.NOT_AUTHORIZED
        elif reason == AuthReason.ISSUER_UNREACHABLE:
            code = Reason.SERVER_UNAVAILABLE
        else:
            code = Reason.BAD_USER_NAME_OR_PASSWORD
        self._audit("connect", "deny", resource=self._connect.client_id if self._connect else "",
                    reason=reason_name, method=method or None)
        return self._refuse_connect(acts, code, "auth_failed", reason_name)

    def subscribed_filters(self) -> list[str]:
        """The filters this connection holds at the broker (for the persistent-session count)."""
        return [f for f, _ in self._subs]

    def refuse_authenticated(self, reason: str, detail: str) -> Actions:
        """The shell refuses a CONNECT whose credentials were good, for a quota of its own (a
        reconnect back-off, persistent sessions): v5 CONNACK 0x97, 3.1.1 CONNACK 3. The shell
        audits (folded): this is what a flooding client meets on every retry."""
        acts = Actions()
        if self.closed or self._state != "auth" or self._reauth:
            return acts
        return self._refuse_connect(acts, Reason.QUOTA_EXCEEDED if self.protocol_level == MQTT_5 else
                                    Reason.SERVER_UNAVAILABLE, reason, detail)

    def tick(self) -> Actions:
        acts = Actions()
        if self.closed:
            return acts
        now = self.clock()
        if self._state != "open":
            if now >= self._created + self.config.connect_timeout_seconds:
                self._audit("connect", "deny", reason="connect timeout", state=self._state)
                if self._state == "connect":
                    return self._close(acts, "connect_timeout", self._state)
                return self._refuse_connect(acts, Reason.SERVER_UNAVAILABLE, "connect_timeout", self._state)
            return acts
        if self.keepalive and now - self._last_rx > 1.5 * self.keepalive:
            self._audit("keepalive", "close", identity=self.identity, reason="keepalive timeout")
            return self._disconnect(acts, Reason.KEEP_ALIVE_TIMEOUT, "keepalive_timeout", "")
        if self._token_expired():
            return self._token_ended(acts)
        self._expire(acts, now)
        return acts

    def invalidate(self, devices: set[str] | None = None) -> Actions:
        """Policies or ownership facts changed (``devices``: the ids an ownership write touched;
        None: anything may have changed): drop cached decisions, close the connection if its
        credential no longer stands (a deleted device, a rotated key) or its Will is no longer
        allowed, re-decide the subscription grants that rest on those devices. Carry out the
        returned Actions like any other."""
        acts = Actions()
        if self.closed:
            return acts
        self._recv_cache.clear()
        self._pub_cache.clear()
        ident = self.identity
        if ident is None:
            return acts
        if devices is None or ident.device_id in devices:
            problem = self.credential_problem(ident) if self.credential_problem is not None else None
            if problem:
                self._audit("session", "close", identity=ident, reason=problem)
                if self._state == "open":
                    return self._disconnect(acts, Reason.ADMINISTRATIVE_ACTION, "credential_revoked", problem)
                return self._refuse_connect(acts, Reason.NOT_AUTHORIZED, "credential_revoked", problem)
        if self._will_armed and (devices is None or not devices.isdisjoint(self._will_devices)) \
                and not self._will_still_allowed("revoked"):
            return self._will_revoked(acts)
        self._redecide(devices)
        return acts

    def _will_revoked(self, acts: Actions) -> Actions:
        """The Will the broker holds is no longer allowed. It may not stay there a moment longer:
        the broker publishes it whenever it ends the connection itself (a session takeover, a
        protocol error it sees), so end the connection now, with a DISCONNECT that discards it."""
        self._will_armed = False
        self._end_run()
        acts.to_broker.append(codec.encode_disconnect(self.protocol_level))
        self._audit("session", "close", reason="Will no longer allowed")
        if self._state == "open":
            return self._disconnect(acts, Reason.NOT_AUTHORIZED, "will_revoked", "")
        return self._refuse_connect(acts, Reason.NOT_AUTHORIZED, "will_revoked", "")

    def broker_closed(self) -> Actions:
        acts = Actions()
        if self.closed:
            return acts
        if self._state in ("upstream", "auth"):
            return self._refuse_connect(acts, Reason.SERVER_UNAVAILABLE, "broker_closed", "")
        if self.protocol_level == MQTT_5 and self._state == "open":
            acts.to_client.append(codec.encode_disconnect(MQTT_5, Reason.UNSPECIFIED_ERROR))
        return self._close(acts, "broker_closed", "")

    upstream_failed = broker_closed

    def client_closed(self) -> Actions:
        """The client's connection is gone (whoever closed it). Before the shell closes the
        upstream, the Will is checked again: if it is no longer allowed (a grant revoked since
        CONNECT), a normal DISCONNECT goes to the broker first, which discards the Will."""
        acts = Actions()
        if not self.closed:
            self._close(acts, "client_closed", "")
        return acts

    def _will_still_allowed(self, when: str = "close") -> bool:
        """The Will is a publish the broker makes when the connection ends: it must be allowed at
        that instant, on a credential that still stands (and, while the broker holds it, at every
        instant: see invalidate())."""
        c = self._connect
        ident = self.identity
        if c is None or c.will is None or ident is None:
            return True
        rule = None
        reason = self._standing_problem(ident)
        if reason is None:
            d = self.policies.may_publish(ident, c.will.topic, qos=c.will.qos, retain=c.will.retain,
                                          client_id=self.client_id)
            if d.allowed:
                _ALLOWED["will"].inc()
                self._will_until = self._mono(getattr(d, "until", None))
                self._will_devices = getattr(d, "devices", frozenset())
                return True
            rule, reason = d.rule, d.reason
        _DENIED["will"].inc()
        self._audit("will", "deny", resource=c.will.topic, rule=rule, reason=reason,
                    qos=c.will.qos, retain=c.will.retain, when=when)
        return False

    def _asked_to_discard_will(self) -> bool:
        """A normal DISCONNECT the client sent before the broker's CONNACK, still held here."""
        for f in self._pending:
            if f.type == T.DISCONNECT:
                body = f.body
                return not (len(body) and body[0] == Reason.DISCONNECT_WITH_WILL)
        return False

    def _standing_problem(self, ident: Identity) -> str | None:
        """Why the identity no longer stands at this instant (its token expired, its credential
        gone), or None: asked before anything is published on its behalf."""
        if self._token_expired():
            return "token expired"
        return self.credential_problem(ident) if self.credential_problem is not None else None

    def _token_ended(self, acts: Actions) -> Actions:
        self._audit("session", "close", identity=self.identity, reason="token expired")
        return self._disconnect(acts, Reason.MAXIMUM_CONNECT_TIME, "token_expired", "")

    def _token_expired(self) -> bool:
        ident = self.identity
        return ident is not None and ident.expires_at is not None and \
            self.wallclock() >= ident.expires_at + self.token_leeway

    def shutdown(self) -> Actions:
        acts = Actions()
        if self.closed:
            return acts
        if self._state == "open":
            return self._disconnect(acts, Reason.SERVER_SHUTTING_DOWN, "shutdown", "")
        if self._state in ("auth", "upstream"):
            return self._refuse_connect(acts, Reason.SERVER_UNAVAILABLE, "shutdown", "")
        return self._close(acts, "shutdown", "")

    # ----------------------------------------------------------------- client side

    # ----------------------------------------------------------------- fast paths
    # The common case of a busy connection, a chunk full of PUBLISH packets whose
    # decisions are cached, walked in one loop: no Frame, no PublishInfo, one
    # rate-limiter call per batch, one slice for the whole run. Each stops at the
    # first packet that needs anything more (another type, properties, a topic not
    # cached or denied, a split packet, an empty bucket) and leaves the rest of the
    # chunk to the full path, which decides exactly as if the fast path did not exist.
    # The two loops share their header walk line for line on purpose: a helper called
    # per packet would cost a sixth of the loop (tests/unit/test_mqtt_fastpath.py holds
    # both to the full path).

    def _client_fast(self, acts: Actions, mv: memoryview) -> int:
        """Allowed publishes from the start of ``mv``; the offset where it stopped."""
        end = len(mv)
        if end < 4:
            return 0
        cache = self._pub_cache
        valid = codec.VALID_BYTE1
        max_size = self._client_framer.max_packet_size
        v5 = self.protocol_level == MQTT_5
        answered = self._client_qos2_answered
        limiter = self.rate_limiter
        sub = self.identity.sub if self.identity is not None else ""
        budget = 0
        first = 0  # the first packet's size: tokens are asked for as if all were that size
        pos = n = 0
        while pos + 2 < end:
            b1 = mv[pos]
            if b1 & 0xF0 != 0x30 or not valid[b1]:
                break
            b = mv[pos + 1]
            if b < 0x80:
                body, total = pos + 2, 2 + b
            else:
                b2 = mv[pos + 2]
                if b2 >= 0x80 or not b2:
                    break
                body, total = pos + 3, 3 + ((b & 0x7F) | (b2 << 7))
            nxt = pos + total
            if total > max_size or nxt > end or body + 2 > nxt:
                break
            tend = body + 2 + ((mv[body] << 8) | mv[body + 1])
            qos = (b1 >> 1) & 3
            if qos == 2:
                break  # held until its PUBREL: the full path
            after = tend + (2 if qos else 0) + (1 if v5 else 0)
            if after > nxt:
                break
            if qos and not ((mv[tend] << 8) | mv[tend + 1]):
                break  # packet id 0: the full path says what is wrong
            if v5 and mv[after - 1]:
                break  # properties (a Topic Alias, maybe): the full path reads them
            entry = cache.get((mv[body + 2:tend].tobytes(), qos, b1 & 1))
            if entry is None or not entry[1].allowed:
                break
            if limiter is not None:
                if not budget:
                    # As many as the rest of the chunk seems to hold (usually exact: nothing to give back).
                    first = first or total
                    want = 1 + (end - nxt) // first
                    budget = limiter.take(sub, want if want < _RATE_BATCH else _RATE_BATCH)
                    if not budget:
                        break
                budget -= 1
            if qos and answered:
                answered.discard((mv[tend] << 8) | mv[tend + 1])  # forwarded: the broker's to finish
            n += 1
            pos = nxt
        if budget:
            limiter.give_back(sub, budget)  # type: ignore[union-attr]
        if n:
            self._published += n
            self._forwarded += n
            acts.to_broker.append(mv[:pos])  # one slice; the caller makes it a pass-through run
        return pos

    def _broker_fast(self, acts: Actions, mv: memoryview) -> int:
        """Deliveries from the start of ``mv`` whose topic an exact ALLOW grant proves or whose
        decision is cached as allowed; the offset where it stopped."""
        end = len(mv)
        if end < 4:
            return 0
        exact = self._subs.exact
        cache = self._recv_cache
        valid = codec.VALID_BYTE1
        v5 = self.protocol_level == MQTT_5
        pos = n = 0
        while pos + 2 < end:
            b1 = mv[pos]
            if b1 & 0xF0 != 0x30 or not valid[b1]:
                break
            b = mv[pos + 1]
            if b < 0x80:
                body, total = pos + 2, 2 + b
            else:
                b2 = mv[pos + 2]
                if b2 >= 0x80 or not b2:
                    break
                body, total = pos + 3, 3 + ((b & 0x7F) | (b2 << 7))
            nxt = pos + total
            if nxt > end or body + 2 > nxt:
                break
            tend = body + 2 + ((mv[body] << 8) | mv[body + 1])
            after = tend + (2 if b1 & 0x06 else 0) + (1 if v5 else 0)
            if after > nxt or (v5 and mv[after - 1]):
                break  # properties (maybe a Topic Alias the broker must not send): the full path
            topic = mv[body + 2:tend].tobytes()
            if cache.get(topic) is not True and topic not in exact:
                break
            n += 1
            pos = nxt
        if n:
            self._handed += n
            self._delivered += n
            acts.to_client.append(mv[:pos])  # one slice; the caller makes it a pass-through run
        return pos

    def _hold(self, acts: Actions, frames: list[Frame]) -> None:
        """Packets that arrive while authentication runs wait (copied: the buffer is reused),
        at most the pre-authentication limit of bytes, counting everything held for them: each
        held packet's bookkeeping and the partial packet in the framer (see _preauth_held)."""
        for frame in frames:
            if self._preauth_refused(acts, len(frame.raw) + HELD_PACKET_OVERHEAD):
                return
            self._pending_bytes += len(frame.raw) + HELD_PACKET_OVERHEAD
            self._pending.append(Frame(frame.type, frame.flags, memoryview(bytes(frame.raw)),
                                       frame.body_start, -1, -1))
        self._preauth_refused(acts, 0)

    def _preauth_refused(self, acts: Actions, more: int) -> bool:
        """Would holding ``more`` bytes take what waits for authentication (held packets with
        their overhead, plus the framer's partial packet) past the limit? Then refuse now."""
        held = self._pending_bytes + self._client_framer.buffered
        if held + more <= self._preauth_max:
            return False
        self._audit("connect", "deny", reason="too much data before CONNACK", held=held, more=more,
                    limit=self._preauth_max)
        self._refuse_connect(acts, Reason.QUOTA_EXCEEDED if self.protocol_level == MQTT_5 else
                             Reason.SERVER_UNAVAILABLE, "buffer_full", "")
        return True

    def _client_frame(self, acts: Actions, frame: Frame, data) -> None:
        t = frame.type
        if self._state == "connect":
            if t != T.CONNECT:
                raise ProtocolError(Reason.PROTOCOL_ERROR, f"{T(t).name} before CONNECT")
            self._on_connect(acts, frame)
            return
        level = self.protocol_level
        if t == T.PUBLISH:
            self._client_publish(acts, frame, data)
        elif t in (T.PUBACK, T.PUBREC, T.PUBCOMP):
            codec.packet_id_of(frame, level)
            self._pass(acts.to_broker, frame, data)
        elif t == T.PUBREL:
            pid = codec.packet_id_of(frame, level)
            if pid in self._client_qos2_answered:
                # The gateway acknowledged (and dropped) this QoS 2 publish: finish it here.
                self._client_qos2_answered.discard(pid)
                # 3.1.1: the faked flow ends. v5: the flow already ended with PUBREC 0x87.
                acts.to_client.append(codec.encode_ack(
                    T.PUBCOMP, pid, level, Reason.PACKET_IDENTIFIER_NOT_FOUND if level == MQTT_5 else 0))
                self._end_run()
            elif pid not in self._qos2_releasing:  # (a repeated PUBREL: the broker's PUBCOMP answers it)
                self._release_qos2(acts, pid)
        elif t == T.SUBSCRIBE:
            self._client_subscribe(acts, frame, data)
        elif t == T.UNSUBSCRIBE:
            self._client_unsubscribe(acts, frame, data)
        elif t == T.PINGREQ:
            if len(frame.body):
                raise ProtocolError(Reason.MALFORMED_PACKET, "PINGREQ with a body")
            self._pass(acts.to_broker, frame, data)
        elif t == T.DISCONNECT:
            d = codec.decode_disconnect(frame.body, level)
            c = self._connect
            if level == MQTT_5 and c is not None and not get_prop(c.properties, Prop.SESSION_EXPIRY_INTERVAL) \
                    and get_prop(d.properties, Prop.SESSION_EXPIRY_INTERVAL):
                # [MQTT-3.14.2-2]. Forwarded, the broker would take it for a protocol error and
                # publish the Will on its own; refused here, the Will is decided by _close().
                raise ProtocolError(Reason.PROTOCOL_ERROR, "Session Expiry Interval on DISCONNECT after 0 at CONNECT")
            if d.reason == Reason.DISCONNECT_WITH_WILL and self._will_armed:
                self._will_armed = False
                if self._will_still_allowed():  # published as the client asks
                    self._pass(acts.to_broker, frame, data)
                else:  # no longer allowed: a plain DISCONNECT discards it
                    self._end_run()
                    acts.to_broker.append(codec.encode_disconnect(level))
            elif level == MQTT_5 and self._longer_expiry_at_disconnect(d):
                self._will_armed = False  # (the DISCONNECT re-encoded: the Will is discarded as asked)
                self._end_run()
                acts.to_broker.append(codec.encode_disconnect(level, d.reason, [
                    *without_props(d.properties, Prop.SESSION_EXPIRY_INTERVAL),
                    (Prop.SESSION_EXPIRY_INTERVAL, self.session_expiry)]))
            else:
                self._will_armed = False  # a normal DISCONNECT: the broker discards the Will
                self._pass(acts.to_broker, frame, data)
            self._close(acts, "client_disconnect", f"reason 0x{d.reason:02X}" if d.reason else "")
        elif t == T.AUTH and level == MQTT_5:
            self._client_auth(acts, frame)
        elif t == T.CONNECT:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "second CONNECT")
        else:
            raise ProtocolError(Reason.PROTOCOL_ERROR, f"{T(t).name} is not sent by clients")

    def _longer_expiry_at_disconnect(self, d) -> bool:
        """A v5 DISCONNECT may set a new Session Expiry: kept within the cap (True: over it, so
        the DISCONNECT must go upstream with the capped value, in ``session_expiry``)."""
        asked = get_prop(d.properties, Prop.SESSION_EXPIRY_INTERVAL)
        if asked is None:
            return False
        cap = self.config.limits.persistent_session_expiry_seconds
        self.session_expiry = min(asked, cap)
        return asked > cap

    def _on_connect(self, acts: Actions, frame: Frame) -> None:
        # Field lengths are checked before anything is decoded or any credential looked at.
        limits = self.config.limits
        c = codec.decode_connect(frame.body, max_client_id=limits.client_id_max_bytes,
                                 max_username=limits.username_max_bytes, max_will_topic=self._topic_max)
        self._head = bytearray()
        self._connect = c
        self.protocol_level = level = c.protocol_level
        v5 = level == MQTT_5
        if level == 4 and not c.client_id and not c.clean_start:
            # [MQTT-3.1.3-8]: an empty client id needs a clean session in 3.1.1.
            self._audit("connect", "deny", reason="empty client id without clean session")
            self._refuse_connect(acts, Reason.CLIENT_IDENTIFIER_NOT_VALID, "client_id_rejected",
                                 "empty client id without clean session")
            return
        cap = self.config.max_keepalive_seconds
        if v5:
            self.keepalive = min(c.keepalive or cap, cap)
        else:
            self.keepalive = c.keepalive or cap
        method = get_prop(c.properties, Prop.AUTHENTICATION_METHOD)
        data = get_prop(c.properties, Prop.AUTHENTICATION_DATA)
        if method is not None and method != AUTH_METHOD:
            self._audit("connect", "deny", resource=c.client_id, reason=f"authentication method {method!r}")
            AUTHENTICATIONS.labels("unknown", "fail").inc()
            self._refuse_connect(acts, Reason.BAD_AUTHENTICATION_METHOD, "auth_failed", "bad method")
            return
        if data is not None and method is None:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "Authentication Data without a method")
        self._enhanced_auth = method is not None
        self._state = "auth"
        acts.auth = AuthRequest(kind="connect", username=c.username, password=c.password,
                                auth_method=method, auth_data=data, client_id=c.client_id)  # type: ignore[arg-type]

    def _client_publish(self, acts: Actions, frame: Frame, data) -> None:
        level = self.protocol_level
        info = codec.decode_publish(frame, level, check_topic=False)  # checked below, once per topic
        topic_b = info.topic
        if len(topic_b) > self._topic_max:
            # Before the cache or the policy: neither ever holds a longer topic.
            raise LimitExceeded(Reason.TOPIC_NAME_INVALID, f"topic of {len(topic_b)} bytes exceeds the limit of "
                                f"{self._topic_max}", action="publish")
        qos = info.qos
        rewrite = False
        if info.topic_alias is not None:
            alias = info.topic_alias
            if not 0 < alias <= self.config.topic_alias_maximum:
                raise ProtocolError(Reason.TOPIC_ALIAS_INVALID, f"topic alias {alias} out of range")
            if topic_b:
                topic = self._aliases[alias] = codec.topic_from_bytes(topic_b)
            else:
                topic = self._aliases.get(alias, "")
                if not topic:
                    raise ProtocolError(Reason.PROTOCOL_ERROR, f"unknown topic alias {alias}")
            rewrite = True
            key: tuple = (topic, qos, info.retain)
        else:
            if not topic_b:
                raise ProtocolError(Reason.PROTOCOL_ERROR, "empty topic without a topic alias")
            key = (topic_b, qos, info.retain)
        ident = self.identity
        assert ident is not None
        # Decisions are cached per (topic, QoS, retain) until invalidate() or the cache's TTL;
        # only topics that passed the checks get an entry.
        entry = self._pub_cache.get(key)
        if entry is None:
            if not rewrite:
                topic = codec.topic_from_bytes(topic_b)
            d = self.policies.may_publish(ident, topic, qos=qos, retain=info.retain, client_id=self.client_id)
            self._summary.decided("publish", topic, d)
            cache = self._pub_cache
            if not cache:
                self._pub_cache_bytes = 0  # emptied elsewhere since the last entry
            size = len(key[0])
            if len(cache) >= _CACHE_MAX or self._pub_cache_bytes + size > _CACHE_MAX_BYTES:
                cache.clear()
                self._pub_cache_bytes = 0
            cache[key] = entry = (topic, d)
            self._pub_cache_bytes += size
            self._cached_until(getattr(d, "until", None))
        topic, d = entry
        if self.rate_limiter is not None and not self.rate_limiter.allow(ident.sub):
            RATE_LIMITED.inc()
            # One audit line per second at most, with the count: a flood must not flood the log.
            now = self.clock()
            self._rate_limited += 1
            if now >= self._rate_audit_at:
                self._rate_audit_at = now + 1.0
                self._audit("publish", "deny", identity=ident, resource=topic, reason="rate limit", qos=qos,
                            dropped=self._rate_limited)
                self._rate_limited = 0
            if self.config.rate_limit.action == "disconnect":
                self._disconnect(acts, Reason.MESSAGE_RATE_TOO_HIGH, "rate_limited", topic)
                return
            self._refuse_publish(acts, info, Reason.QUOTA_EXCEEDED)
            return
        if not d.allowed:
            _DENIED["publish"].inc()
            self._audit("publish", "deny", identity=ident, resource=topic, rule=d.rule, reason=d.reason,
                        qos=qos, retain=info.retain)
            if level != MQTT_5 and self.config.denied_publish_v3 == "disconnect":
                self._close(acts, "denied_publish", topic)
                return
            self._refuse_publish(acts, info, Reason.NOT_AUTHORIZED)
            return
        self._published += 1
        if info.packet_id is not None:
            # An allowed id is no longer one the gateway refused.
            self._client_qos2_answered.discard(info.packet_id)
        if qos == 2:
            self._hold_qos2(acts, frame, data, info, topic, rewrite)
            return
        self._forwarded += 1
        if not rewrite:
            self._pass(acts.to_broker, frame, data)
            return
        self._end_run()
        acts.to_broker.extend(self._resolved(frame, data, info, topic))

    def _resolved(self, frame: Frame, data, info, topic: str) -> list:
        """The PUBLISH with its alias resolved: the broker gets the full topic and no alias, so it
        holds no alias state."""
        props = without_props(codec.read_publish_properties(frame, info), Prop.TOPIC_ALIAS)
        payload = frame.raw[info.payload_start:]
        head = codec.publish_head(topic, qos=info.qos, retain=info.retain, dup=info.dup, packet_id=info.packet_id,
                                  level=self.protocol_level, properties=props, payload_len=len(payload))
        if not len(payload):
            return [head]
        return [head, payload if frame.start < 0 else data[frame.start + info.payload_start:frame.end]]

    def _hold_qos2(self, acts: Actions, frame: Frame, data, info, topic: str, rewrite: bool) -> None:
        """An allowed QoS 2 publish: the gateway answers PUBREC and keeps it until the PUBREL, when
        it is decided again (a grant revoked in between must not be released by the broker)."""
        self._end_run()
        pid = info.packet_id
        level = self.protocol_level
        packet = b"".join(bytes(b) for b in self._resolved(frame, data, info, topic)) if rewrite else bytes(frame.raw)
        earlier = self._qos2_held.pop(pid, None)  # a retransmission (DUP) replaces it
        if earlier is not None:
            self._qos2_held_bytes -= len(earlier[0])
        if self._qos2_held_bytes + len(packet) > max(_QOS2_HOLD_BYTES, self.config.max_packet_size):
            self._audit("publish", "deny", resource=topic, reason="too many QoS 2 publishes awaiting PUBREL",
                        qos=2)
            if level == MQTT_5:
                acts.to_client.append(codec.encode_ack(T.PUBREC, pid, level, Reason.QUOTA_EXCEEDED))
            else:
                self._close(acts, "quota_exceeded", "QoS 2 publishes awaiting PUBREL")
            return
        self._qos2_held[pid] = (packet, topic, info.retain)
        self._qos2_held_bytes += len(packet)
        acts.to_client.append(codec.encode_ack(T.PUBREC, pid, level))

    def _release_qos2(self, acts: Actions, pid: int) -> None:
        """The client's PUBREL: forward the held publish if it is still allowed now."""
        self._end_run()
        level = self.protocol_level
        held = self._qos2_held.pop(pid, None)
        rule = None
        if held is None:
            topic, reason = "", "PUBREL for a QoS 2 publish not held on this connection"
        else:
            packet, topic, retain = held
            self._qos2_held_bytes -= len(packet)
            ident = self.identity
            assert ident is not None
            problem = self._standing_problem(ident)
            d = None if problem else self.policies.may_publish(ident, topic, qos=2, retain=retain,
                                                               client_id=self.client_id)
            if d is not None and d.allowed:
                # Released at this instant, in one write: the PUBLISH and its PUBREL, so the broker
                # never holds it awaiting a release the gateway would have to decide again. (The
                # broker handles them in order; its PUBREC then needs no answer, its PUBCOMP answers
                # the client's PUBREL.)
                self._qos2_releasing.add(pid)
                self._forwarded += 1
                acts.to_broker.append(packet)
                acts.to_broker.append(codec.encode_ack(T.PUBREL, pid, level))
                return
            rule, reason = (d.rule, d.reason) if d is not None else (None, problem)
        _DENIED["publish"].inc()
        self._audit("publish", "deny", resource=topic, rule=rule, reason=reason, qos=2, when="release")
        acts.to_client.append(codec.encode_ack(
            T.PUBCOMP, pid, level, Reason.PACKET_IDENTIFIER_NOT_FOUND if level == MQTT_5 else 0))

    def _refuse_publish(self, acts: Actions, info, code: int) -> None:
        """Answer a publish the broker will never see, so the client's flow completes."""
        self._end_run()
        level = self.protocol_level
        pid = info.packet_id
        if info.qos == 0 or pid is None:
            return
        held = self._qos2_held.pop(pid, None)  # a retransmission now refused: nothing to release
        if held is not None:
            self._qos2_held_bytes -= len(held[0])
        if level == MQTT_5:
            acts.to_client.append(codec.encode_ack(T.PUBACK if info.qos == 1 else T.PUBREC, pid, level, code))
            if info.qos == 2:
                # A refused PUBREC ends the flow, but some clients (paho 2.x) send PUBREL anyway:
                # the gateway answers it, so the broker never sees an id it does not know.
                self._client_qos2_answered.add(pid)
        elif info.qos == 1:
            acts.to_client.append(codec.encode_ack(T.PUBACK, pid, level))
        else:
            acts.to_client.append(codec.encode_ack(T.PUBREC, pid, level))
            self._client_qos2_answered.add(pid)

    def _rate_refused(self, acts: Actions, action: str, ident: Identity, n: int, resource: str) -> bool:
        """Charge ``n`` filters of a SUBSCRIBE / UNSUBSCRIBE to the identity's rate limit, as
        publishes are: True (and audited, one line per second at most) when over it."""
        if self.rate_limiter is None or self.rate_limiter.allow(ident.sub, cost=n):
            return False
        RATE_LIMITED.inc()
        self._audit_folded(f"{action}:rate", action, identity=ident, resource=resource, reason="rate limit",
                           filters=n)
        if self.config.rate_limit.action == "disconnect":
            self._disconnect(acts, Reason.MESSAGE_RATE_TOO_HIGH, "rate_limited", action)
        return True

    def _client_subscribe(self, acts: Actions, frame: Frame, data) -> None:
        level = self.protocol_level
        sub = codec.decode_subscribe(frame.body, level, self._topic_max)
        ident = self.identity
        assert ident is not None
        v5 = level == MQTT_5
        if self._rate_refused(acts, "subscribe", ident, len(sub.subscriptions), sub.subscriptions[0].topic_filter):
            if not self.closed:  # drop: every filter refused, nothing reaches the broker
                self._end_run()
                code = Reason.QUOTA_EXCEEDED if v5 else V3_SUBACK_FAILURE
                acts.to_client.append(codec.encode_suback(Suback(sub.packet_id, [code] * len(sub.subscriptions)),
                                                          level))
            return
        slots: list[int | None] = []
        keep = []
        deny_code = Reason.NOT_AUTHORIZED if v5 else V3_SUBACK_FAILURE
        quota_code = Reason.QUOTA_EXCEEDED if v5 else V3_SUBACK_FAILURE
        per_connection = self.config.limits.subscriptions_per_connection
        quota = self.subscription_quota
        for s in sub.subscriptions:
            if s.too_long:
                # Never decoded, never asked of the policy: the shared decision cache only ever
                # holds filters of at most topic_max_bytes (its keys are bounded by that).
                _DENIED["subscribe"].inc()
                self._audit_folded("subscribe:too_long", "subscribe", identity=ident, resource=s.topic_filter,
                                   reason=f"topic filter of {s.too_long} bytes exceeds the limit of "
                                          f"{self._topic_max}", qos=s.qos)
                slots.append(Reason.TOPIC_FILTER_INVALID if v5 else V3_SUBACK_FAILURE)
                continue
            _, inner = codec.split_shared(s.topic_filter)
            new = s.topic_filter not in self._subs
            if new and len(self._subs) >= per_connection:
                # Bounded state per connection: each filter costs memory here and at the broker.
                _DENIED["subscribe"].inc()
                self._audit_folded("subscribe:connection", "subscribe", identity=ident, resource=s.topic_filter,
                                   reason="too many subscriptions for the connection", qos=s.qos)
                slots.append(quota_code)
                continue
            d = self.policies.may_subscribe(ident, inner, qos=s.qos, client_id=self.client_id)
            self._summary.decided("subscribe", s.topic_filter, d)
            verdict = _verdict(d)
            if verdict is not Verdict.DENY:
                if new and quota is not None and not self._take_quota(quota, ident):
                    _DENIED["subscribe"].inc()
                    self._audit_folded("subscribe:identity", "subscribe", identity=ident, resource=s.topic_filter,
                                       reason="too many subscriptions for the identity", qos=s.qos)
                    slots.append(quota_code)
                    continue
                _ALLOWED["subscribe"].inc()
                self._subs.subscribed(s.topic_filter, inner, s.qos, verdict,
                                      self._mono(getattr(d, "until", None)), getattr(d, "devices", frozenset()))
                keep.append(Subscription(self._upstream_filter(s.topic_filter), s.options))
                slots.append(None)
            else:
                _DENIED["subscribe"].inc()
                self._subs.refused(s.topic_filter)
                self._audit("subscribe", "deny", identity=ident, resource=s.topic_filter,
                            rule=getattr(d, "rule", None), reason=getattr(d, "reason", None), qos=s.qos)
                slots.append(deny_code)
        self._table_changed()
        if len(keep) == len(slots) and all(k.topic_filter == s.topic_filter
                                           for k, s in zip(keep, sub.subscriptions)):
            self._pass(acts.to_broker, frame, data)
            return
        self._end_run()
        if not keep:
            acts.to_client.append(codec.encode_suback(Suback(sub.packet_id, slots), level))  # type: ignore[arg-type]
            return
        self._suback_slots[sub.packet_id] = slots
        acts.to_broker.append(codec.encode_subscribe(Subscribe(sub.packet_id, keep, sub.properties), level))

    def _upstream_filter(self, topic_filter: str) -> str:
        """The filter as the broker gets it. A shared subscription's group is made the identity's
        own: otherwise anyone could join another's ``$share/<group>/...`` and take a share of its
        deliveries (the broker hands each message to one member; the gateway would drop the
        stranger's copies, and the rightful member would never see them)."""
        group, inner = codec.split_shared(topic_filter)
        if group is None:
            return topic_filter
        ident = self.identity
        owner = _escape_sub(ident.sub if ident is not None else "").replace("+", "%2B").replace("#", "%23")
        return f"$share/{owner}~{group}/{inner}"

    def _take_quota(self, quota: SubscriptionQuota, ident: Identity) -> bool:
        if self._quota_key is None:
            self._quota_key = ident.sub  # re-authentication keeps the subject: one key per session
        if not quota.acquire(self._quota_key):
            return False
        self._quota_held += 1
        return True

    def _release_quota(self, n: int) -> None:
        n = min(n, self._quota_held)
        if n and self.subscription_quota is not None and self._quota_key is not None:
            self.subscription_quota.release(self._quota_key, n)
            self._quota_held -= n

    def _client_unsubscribe(self, acts: Actions, frame: Frame, data) -> None:
        level = self.protocol_level
        unsub = codec.decode_unsubscribe(frame.body, level, self._topic_max)
        ident = self.identity
        assert ident is not None
        if self._rate_refused(acts, "unsubscribe", ident, len(unsub.topic_filters), unsub.topic_filters[0]):
            if not self.closed:
                if level == MQTT_5:  # drop: UNSUBACK has no quota code; the filters stay subscribed
                    self._end_run()
                    acts.to_client.append(codec.encode_unsuback(
                        unsub.packet_id, [Reason.UNSPECIFIED_ERROR] * len(unsub.topic_filters), level))
                else:  # a 3.1.1 UNSUBACK can only say yes
                    self._close(acts, "rate_limited", "unsubscribe")
            return
        # The table changes now, in stream order, as the broker's will; what it still
        # delivers under these filters is checked like anything the table cannot prove.
        self._release_quota(self._subs.unsubscribed(unsub.topic_filters))
        self._table_changed()
        upstream = [self._upstream_filter(f) for f in unsub.topic_filters]
        if upstream == unsub.topic_filters:
            self._pass(acts.to_broker, frame, data)
        else:
            self._end_run()
            acts.to_broker.append(codec.encode_unsubscribe(
                Unsubscribe(unsub.packet_id, upstream, unsub.properties), level))

    def _client_auth(self, acts: Actions, frame: Frame) -> None:
        a = codec.decode_auth(frame.body)
        method = get_prop(a.properties, Prop.AUTHENTICATION_METHOD)
        if a.reason != Reason.REAUTHENTICATE:
            raise ProtocolError(Reason.PROTOCOL_ERROR, f"AUTH reason 0x{a.reason:02X} from the client")
        if method != AUTH_METHOD:
            raise ProtocolError(Reason.BAD_AUTHENTICATION_METHOD, f"authentication method {method!r}")
        if self._reauth:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "re-authentication already in progress")
        data = get_prop(a.properties, Prop.AUTHENTICATION_DATA)
        self._reauth = True
        self._end_run()
        acts.auth = AuthRequest(kind="reauth", username=None, password=None, auth_method=AUTH_METHOD,
                                auth_data=data, client_id=self.client_id)  # type: ignore[arg-type]

    def _reauthenticated(self, acts: Actions, identity: Identity) -> Actions:
        self._reauth = False
        old = self.identity
        if old is None or identity.sub != old.sub:
            AUTHENTICATIONS.labels(identity.method, "fail").inc()
            self._audit("reauth", "deny", identity=old, reason="subject changed", new_sub=identity.sub)
            acts.to_client.append(codec.encode_disconnect(MQTT_5, Reason.NOT_AUTHORIZED))
            return self._close(acts, "reauth_failed", "subject changed", Reason.NOT_AUTHORIZED)
        AUTHENTICATIONS.labels(identity.method, "ok").inc()
        self.identity = identity
        self._audit("reauth", "allow", identity=identity)
        # Roles may have changed with the new token, and the expiry has.
        self._recv_cache.clear()
        self._pub_cache.clear()
        self._redecide()
        acts.to_client.append(codec.encode_auth(Reason.SUCCESS, [(Prop.AUTHENTICATION_METHOD, AUTH_METHOD)]))
        return acts

    # ----------------------------------------------------------------- broker side

    def _broker_frame(self, acts: Actions, frame: Frame, data) -> None:
        t = frame.type
        level = self.protocol_level
        if self._state == "upstream":
            if t != T.CONNACK:
                raise ProtocolError(Reason.PROTOCOL_ERROR, f"{T(t).name} before CONNACK")
            self._broker_connack(acts, frame)
            return
        if self._state != "open":
            raise ProtocolError(Reason.PROTOCOL_ERROR, f"{T(t).name} from the broker before CONNECT")
        if t == T.PUBLISH:
            self._broker_publish(acts, frame, data)
        elif t == T.PUBREL:
            pid = codec.packet_id_of(frame, level)
            if pid in self._broker_qos2_dropped:
                self._broker_qos2_dropped.discard(pid)
                self._end_run()
                acts.to_broker.append(codec.encode_ack(T.PUBCOMP, pid, level))
            else:
                self._pass(acts.to_client, frame, data)
        elif t == T.PUBREC and self._qos2_releasing:
            pid = codec.packet_id_of(frame, level)
            if pid in self._qos2_releasing:
                self._end_run()  # released already (PUBREL went with the PUBLISH); the client had its PUBREC
            else:
                self._pass(acts.to_client, frame, data)
        elif t in (T.PUBACK, T.PUBREC, T.PUBCOMP):
            pid = codec.packet_id_of(frame, level)
            if t == T.PUBCOMP:
                self._qos2_releasing.discard(pid)  # the answer to the client's PUBREL
            self._pass(acts.to_client, frame, data)
        elif t == T.UNSUBACK:
            codec.packet_id_of(frame, level)  # the table changed when the UNSUBSCRIBE went by
            self._pass(acts.to_client, frame, data)
        elif t == T.SUBACK:
            self._broker_suback(acts, frame, data)
        elif t == T.PINGRESP:
            self._pass(acts.to_client, frame, data)
        elif t == T.DISCONNECT:
            d = codec.decode_disconnect(frame.body, level)
            self._pass(acts.to_client, frame, data)
            self._close(acts, "broker_disconnect", f"reason 0x{d.reason:02X}", d.reason)
        else:
            raise ProtocolError(Reason.PROTOCOL_ERROR, f"{T(t).name} is not sent by brokers")

    def _broker_connack(self, acts: Actions, frame: Frame) -> None:
        level = self.protocol_level
        ca = codec.decode_connack(frame.body, level)
        if ca.reason != 0:
            self._audit("connect", "deny", identity=self.identity, reason=f"broker refused 0x{ca.reason:02X}")
            acts.to_client.append(bytes(frame.raw) if level != MQTT_5 else
                                  codec.encode_connack(False, ca.reason, level, without_props(
                                      ca.properties, Prop.ASSIGNED_CLIENT_IDENTIFIER)))
            self._will_armed = False  # refused: the broker holds no Will
            self._close(acts, "broker_refused", f"0x{ca.reason:02X}", ca.reason)
            return
        self._state = "open"
        self._client_framer.max_packet_size = self.config.max_packet_size  # authenticated now
        self._last_rx = self.clock()
        # A resumed session (session_present) holds filters the gateway never saw: nothing in
        # the table proves their deliveries, so each is asked of the policy.
        if level == MQTT_5:
            acts.to_client.append(codec.encode_connack(ca.session_present, 0, level,
                                                       self._client_connack_props(ca.properties)))
        else:
            acts.to_client.append(bytes(frame.raw))
        # Packets the client sent meanwhile.
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for f in pending:
            if self.closed:
                break
            try:
                self._client_frame(acts, f, None)
            except ProtocolError as exc:
                self._client_violation(acts, exc)
                break

    def _client_connack_props(self, broker_props: list) -> list:
        c = self._connect
        assert c is not None
        props = without_props(broker_props, Prop.ASSIGNED_CLIENT_IDENTIFIER, Prop.TOPIC_ALIAS_MAXIMUM,
                              Prop.SERVER_KEEP_ALIVE, Prop.MAXIMUM_PACKET_SIZE, Prop.AUTHENTICATION_METHOD,
                              Prop.AUTHENTICATION_DATA)
        if self._assigned_id:
            props.append((Prop.ASSIGNED_CLIENT_IDENTIFIER, self.client_id))
        broker_ka = get_prop(broker_props, Prop.SERVER_KEEP_ALIVE)
        if broker_ka is not None and (not self.keepalive or broker_ka < self.keepalive):
            self.keepalive = int(broker_ka)  # type: ignore[arg-type]
        if self.keepalive != c.keepalive:
            props.append((Prop.SERVER_KEEP_ALIVE, self.keepalive))
        if self.config.topic_alias_maximum:
            props.append((Prop.TOPIC_ALIAS_MAXIMUM, self.config.topic_alias_maximum))
        broker_max = get_prop(broker_props, Prop.MAXIMUM_PACKET_SIZE)
        limit = self.config.max_packet_size
        if broker_max is not None:
            limit = min(limit, int(broker_max))  # type: ignore[arg-type]
        props.append((Prop.MAXIMUM_PACKET_SIZE, limit))
        if self._enhanced_auth:
            props.append((Prop.AUTHENTICATION_METHOD, AUTH_METHOD))
        return props

    def _broker_publish(self, acts: Actions, frame: Frame, data) -> None:
        level = self.protocol_level
        info = codec.decode_publish(frame, level, check_topic=False)  # checked on a cache miss
        if info.topic_alias is not None or not info.topic:
            # We told the broker Topic Alias Maximum 0.
            raise ProtocolError(Reason.TOPIC_ALIAS_INVALID, "topic alias from the broker")
        if self._may_receive(info.topic):
            self._handed += 1
            self._pass(acts.to_client, frame, data)
            return
        self._end_run()
        pid = info.packet_id
        if info.qos == 1 and pid is not None:
            acts.to_broker.append(codec.encode_ack(T.PUBACK, pid, level))
        elif info.qos == 2 and pid is not None:
            acts.to_broker.append(codec.encode_ack(T.PUBREC, pid, level))
            self._broker_qos2_dropped.add(pid)

    def _may_receive(self, topic_b: bytes) -> bool:
        cached = self._recv_cache.get(topic_b)
        if cached is not None:
            if cached:
                self._delivered += 1
            else:
                _DENIED["receive"].inc()
            return cached
        topic = codec.topic_from_bytes(topic_b)
        decision = None
        ok = self._subs.covers(topic)  # an ALLOW grant proves it
        if not ok:
            decision = self.policies.may_receive(self.identity, topic, client_id=self.client_id)
            ok = bool(decision.allowed)
            self._cached_until(getattr(decision, "until", None))
        self._summary.decided("receive", topic, decision)
        cache = self._recv_cache
        if not cache:
            self._recv_cache_bytes = 0  # emptied elsewhere since the last entry
        size = len(topic_b)
        if len(cache) >= _CACHE_MAX or self._recv_cache_bytes + size > _CACHE_MAX_BYTES:
            cache.clear()
            self._recv_cache_bytes = 0
        cache[topic_b] = ok  # a topic is at most 65,535 bytes: always fits the budget
        self._recv_cache_bytes += size
        if ok:
            self._delivered += 1
        else:
            _DENIED["receive"].inc()
            self._audit("receive", "deny", identity=self.identity, resource=topic,
                        rule=getattr(decision, "rule", None), reason=getattr(decision, "reason", None))
        return ok

    def _broker_suback(self, acts: Actions, frame: Frame, data) -> None:
        level = self.protocol_level
        sa = codec.decode_suback(frame.body, level)
        slots = self._suback_slots.pop(sa.packet_id, None)
        if slots is None:
            self._pass(acts.to_client, frame, data)
            return
        codes = iter(sa.reasons)
        merged = [s if s is not None else next(codes, Reason.UNSPECIFIED_ERROR) for s in slots]
        self._end_run()
        acts.to_client.append(codec.encode_suback(Suback(sa.packet_id, merged, sa.properties), level))  # type: ignore[arg-type]

    # ----------------------------------------------------------------- plumbing

    def _drop_caches(self, now: float) -> None:
        self._recv_cache.clear()
        self._pub_cache.clear()
        self._caches_until = now + _DECISION_TTL

    def _flush_counts(self) -> None:
        # Allowed messages are counted in bulk, once per chunk.
        self._summary.add_messages(self._published, self._delivered)
        if self._published:
            _ALLOWED_PUBLISH.value += self._published
            self._published = 0
        if self._delivered:
            _ALLOWED_RECEIVE.value += self._delivered
            self._delivered = 0
        if self._forwarded:
            _TO_BROKER.value += self._forwarded
            self._forwarded = 0
        if self._handed:
            _TO_CLIENT.value += self._handed
            self._handed = 0

    def _table_changed(self) -> None:
        # Cached deliveries may rest on a grant that just went: ask again.
        self._recv_cache.clear()
        self._update_horizon()

    def _redecide(self, devices: set[str] | None = None) -> None:
        """Ask the policy again for the subscription grants (those resting on ``devices``, or all),
        for the identity in force now."""
        ident = self.identity
        assert ident is not None

        def decide(match: str, qos: int) -> tuple[Verdict, float | None, frozenset[str]]:
            d = self.policies.may_subscribe(ident, match, qos=qos, client_id=self.client_id)
            return _verdict(d), self._mono(getattr(d, "until", None)), getattr(d, "devices", frozenset())

        self._subs.redecide(decide, devices)
        self._table_changed()

    def _update_horizon(self) -> None:
        """The next instant something the session relies on ends: a grant or the token."""
        until = self._subs.horizon if self._subs.horizon is not None else _NEVER
        if self._will_armed and self._will_until is not None:
            until = min(until, self._will_until)
        ident = self.identity
        if ident is not None and ident.expires_at is not None:
            left = ident.expires_at + self.token_leeway - self.wallclock()
            until = min(until, self.clock() + max(left, 0.0))
        self._grants_until = until

    def _expire(self, acts: Actions, now: float) -> None:
        """Whatever ended by ``now``: cached decisions, the token, subscription grants."""
        if now >= self._caches_until:
            self._drop_caches(now)
        if now < self._grants_until or self._state != "open":
            return
        if self._token_expired():
            self._token_ended(acts)
            return
        if self._will_armed and self._will_until is not None and now >= self._will_until \
                and not self._will_still_allowed("expired"):
            self._will_revoked(acts)
            return
        self._redecide()

    def _mono(self, until: float | None) -> float | None:
        """A unix time (a delegation's expiry) on the session's clock."""
        return None if until is None else self.clock() + (until - self.wallclock())

    def _cached_until(self, until: float | None) -> None:
        """A cached decision rests on something that ends at ``until``: drop the caches then."""
        if until is not None:
            at = self._mono(until)
            if at is not None and at < self._caches_until:
                self._caches_until = at

    def _pass(self, out: list, frame: Frame, view) -> None:
        """Forward a packet unchanged; neighbours from the same chunk join into one slice
        (made once the run ends, in _end_run)."""
        if frame.start < 0 or view is None:
            self._end_run()
            out.append(frame.raw)
            return
        run = self._run
        if run is not None and run[0] is out and run[1] == len(out) - 1 and run[3] == frame.start:
            run[3] = frame.end
            run[5] = True
            return
        self._end_run()
        out.append(frame.raw)
        self._run = [out, len(out) - 1, frame.start, frame.end, view, False]

    def _end_run(self) -> None:
        run = self._run
        if run is not None:
            self._run = None
            if run[5]:
                run[0][run[1]] = run[4][run[2]:run[3]]

    def _audit(self, action: str, decision: str, *, identity: Identity | None = None, resource: str = "",
               rule: str | None = None, reason: str | None = None, **extra: Any) -> None:
        extra = {k: v for k, v in extra.items() if v is not None}
        if self.peer:
            extra["peer"] = self.peer
        if self.client_id and "client_id" not in extra:
            extra["client_id"] = self.client_id
        self.audit.record(protocol="mqtt", action=action, decision=decision, resource=resource,
                          identity=identity if identity is not None else self.identity, rule=rule,
                          reason=reason, **extra)

    def _audit_folded(self, kind: str, action: str, **fields: Any) -> None:
        """A refusal a client can repeat at will: one line per second at most per kind, with the
        number refused since the last line (``count``); what is left is written at close."""
        now = self.clock()
        fold = self._folds.get(kind)
        if fold is None:
            fold = self._folds[kind] = [0, 0.0, None]
        fold[0] += 1
        if now >= fold[1]:
            fold[1] = now + 1.0
            self._audit(action, "deny", count=fold[0], **fields)
            fold[0] = 0
        else:
            fold[2] = (action, fields)

    def _flush_folds(self) -> None:
        for fold in self._folds.values():
            if fold[0] and fold[2] is not None:
                action, fields = fold[2]
                self._audit(action, "deny", count=fold[0], **fields)
                fold[0] = 0
        self._folds.clear()

    def _close(self, acts: Actions, reason: str, detail: str, code: int | None = None) -> Actions:
        """Every way a connection ends comes here. A Will the broker holds is decided now: if it
        is no longer allowed, a plain DISCONNECT upstream makes the broker discard it."""
        if self._will_armed:
            self._will_armed = False
            if self._asked_to_discard_will() or not self._will_still_allowed():
                self._end_run()
                acts.to_broker.append(codec.encode_disconnect(self.protocol_level))
        first = self._state != "closed"
        self.closed = True
        self._state = "closed"
        self._pending = []
        self._release_quota(self._quota_held)  # the identity's other connections may use them
        self._flush_folds()
        if first and self.identity is not None:  # one summary per connection past authentication
            self._flush_counts()
            self._audit("session", "summary", reason=reason, **self._summary.fields())
        if acts.close is None:
            acts.close = CloseInfo(reason, detail, code)
        return acts

    def _disconnect(self, acts: Actions, code: int, reason: str, detail: str) -> Actions:
        """Close an open connection, telling a v5 client why."""
        if self.protocol_level == MQTT_5:
            acts.to_client.append(codec.encode_disconnect(MQTT_5, code))
            return self._close(acts, reason, detail, code)
        return self._close(acts, reason, detail)

    def _refuse_connect(self, acts: Actions, code: int, reason: str, detail: str) -> Actions:
        """CONNACK with a failure code in the client's protocol version, then close."""
        level = self.protocol_level
        if level == MQTT_5:
            acts.to_client.append(codec.encode_connack(False, code, level))
            return self._close(acts, reason, detail, code)
        v3 = V3_CONNACK_FOR.get(code)  # type: ignore[call-overload]
        if v3 is not None and level:
            acts.to_client.append(codec.encode_connack(False, v3, level))
            return self._close(acts, reason, detail, int(v3))
        return self._close(acts, reason, detail)

    def _auth_refused(self, acts: Actions, identity: Identity, code: int, reason: str, detail: str) -> Actions:
        self._audit("connect", "deny", identity=identity, reason=detail)
        return self._refuse_connect(acts, code, reason, detail)

    def _refuse_oversized(self, acts: Actions) -> Actions:
        """A CONNECT over the pre-authentication size, refused at its fixed header, answered in
        its client's version: v5 CONNACK 0x95; 3.1.1 (no code for it) and anything else: a close.
        Only the few bytes up to the level byte are ever held for it."""
        level = codec.peek_connect_level(self._head)
        if level is None:
            return acts  # the level byte has not arrived yet (the connect deadline still runs)
        detail, self._oversized = self._oversized, ""
        self._head = bytearray()
        if level == MQTT_5:
            self.protocol_level = MQTT_5
            acts.to_client.append(codec.encode_connack(False, Reason.PACKET_TOO_LARGE, MQTT_5))
            return self._close(acts, "protocol_error", detail, Reason.PACKET_TOO_LARGE)
        return self._close(acts, "protocol_error", detail)

    def _client_violation(self, acts: Actions, exc: ProtocolError) -> Actions:
        PROTOCOL_ERRORS.labels("client").inc()
        state = self._state
        if state == "connect" and exc.reason_code == Reason.PACKET_TOO_LARGE:
            # Only the Framer says this, at the CONNECT's fixed header: nothing of its body is held.
            self._audit("connect", "deny", reason=f"CONNECT over the pre-authentication limit: {exc.message}",
                        reason_code=exc.reason_code)
            self._oversized = exc.message
            return self._refuse_oversized(acts)
        if isinstance(exc, LimitExceeded):  # a configured limit, not a broken protocol
            self._audit(exc.action, "deny", reason=exc.message, reason_code=exc.reason_code)
        else:
            self._audit("protocol_error", "deny", reason=exc.message, reason_code=exc.reason_code)
        if state == "connect":
            level = exc.protocol_level
            if level is not None:
                self.protocol_level = level
                if exc.reason_code == Reason.UNSUPPORTED_PROTOCOL_VERSION and level != MQTT_5:
                    acts.to_client.append(codec.encode_connack(False, V3ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION, 4))
                    return self._close(acts, "protocol_error", exc.message, V3ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION)
                return self._refuse_connect(acts, exc.reason_code, "protocol_error", exc.message)
            return self._close(acts, "protocol_error", exc.message)
        if state in ("auth", "upstream"):
            return self._refuse_connect(acts, exc.reason_code, "protocol_error", exc.message)
        return self._disconnect(acts, exc.reason_code, "protocol_error", exc.message)
