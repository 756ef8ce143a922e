"""The per-connection MQTT gateway state machine (sans-IO).

One :class:`Session` per client connection, with one entry point:
``session.handle(event) -> list[Command]`` (and, for the event of every read,
``session.client_data(data)`` / ``session.broker_data(data)``: the same as
``handle(ClientData(data))`` / ``handle(BrokerData(data))``, without making the event).
The asyncio shell feeds it the events of
:mod:`proxy.mqtt.events` and carries out the commands of :mod:`proxy.mqtt.commands`
(in the order of the list, :data:`~proxy.mqtt.commands.ORDER`); the session never
touches a socket, the audit log, a metric, a clock it was not given, or the event loop.
Every policy question is asked with ``now=`` the session's wall clock, so a test that
sets the clock controls every decision.

Contract for the shell (``proxy/mqtt/connection.py``, the per-connection pump)
------------------------------------------------------------------------------

Create the session when the TCP connection is accepted (before the TLS
handshake, so the CONNECT deadline covers it)::

    session = Session(config=services.config.mqtt, policies=services.policies,
                      rate_limiter=shared_limiter,
                      token_leeway=services.config.oidc.leeway_seconds,
                      upstream_password=read_secret(...),
                      credential_problem=services.ownership.credential_problem,
                      subscription_quota=shared_quota)

``shared_limiter`` (:class:`~proxy.ratelimit.RateLimiter`) and ``shared_quota``
(:class:`~proxy.mqtt.subscriptions.SubscriptionQuota`, made with
``mqtt.limits.subscriptions_per_identity``) are made once per gateway and shared
by all its sessions: both count per identity ``sub``, across connections.

The events (:mod:`proxy.mqtt.events`) and what the shell owes for each:

* ``ClientData`` / ``BrokerData`` — bytes read (any split, down to one byte at a time).
* ``Authenticated`` / ``AuthenticationFailed`` — the answer to an ``Authenticate``
  (which verifier to ask: :func:`proxy.mqtt.handshake.classify_credentials`). An
  ``Authenticate`` can come out of any event, ``BrokerData`` included (a re-authentication
  the client sent before the CONNACK): every command of every list is carried out.
* ``Tick(now)`` — when ``next_deadline()`` (a value of the session's ``clock``,
  ``time.monotonic`` unless injected, never a unix time) has come. Re-read it after every
  call (or when ``deadline_inputs`` changes): it moves with traffic, CONNACK and
  re-authentication.
* ``ClientClosed`` — the client connection ended, however it ended, unless the session
  already closed it with ``Close``: write its ``SendToBroker`` (a DISCONNECT that discards a
  Will no longer allowed) before closing the upstream. ``BrokerClosed`` — the upstream
  failed to open or was lost. ``Shutdown`` — graceful shutdown (v5: DISCONNECT 0x8B).
* ``Invalidated(devices)`` — policies reloaded or ownership facts changed.
* ``ConnectRefused`` — the shell's own quota refuses a CONNECT whose credentials were good.

While ``session.reading_paused`` is true (authentication or the upstream CONNECT in
progress) the shell should pause reading from the client; the session holds at most
``mqtt.limits.connect_max_bytes`` meanwhile and refuses the connection beyond that.

Rules the session enforces, and where each is kept
--------------------------------------------------

The session is the coordinator: it moves the phase (:mod:`proxy.mqtt.phase`), keeps the
timers, runs the fast paths and ends the connection; every rule of a packet lives in the piece
that handles it, with its module docstring saying it in full:

* :mod:`proxy.mqtt.handshake` — the CONNECT (field limits, keepalive, authentication
  method), the client id bound to the identity, the upstream CONNECT, authentication
  failures (CONNACK 0x86 / 0x04, 0x87 / 0x05, 0x88 / 0x03, 0x8C), the packets held before
  CONNACK (at most ``connect_max_bytes``), the client's CONNACK, re-authentication, the
  client's DISCONNECT (a Session Expiry set on it capped; one after 0 at CONNECT
  [MQTT-3.14.2-2] refused here, never forwarded).
* :mod:`proxy.mqtt.will` — the Will, decided at CONNECT and again at every instant the
  broker could publish it; its Will Delay Interval is not passed on.
* :mod:`proxy.mqtt.publish_gate` — client PUBLISH and PUBREL: topic limit, aliases,
  decision cache, rate limit, denials, QoS 2 held until PUBREL (:mod:`proxy.mqtt.qos2`).
* :mod:`proxy.mqtt.subscribe_gate` — SUBSCRIBE / UNSUBSCRIBE / SUBACK: filter limit, caps
  (:mod:`proxy.mqtt.subscriptions`), shared groups made the identity's own, rate limit,
  the grants re-decided.
* :mod:`proxy.mqtt.delivery_gate` — broker PUBLISH and acknowledgements: every delivery
  checked, a dropped one completed by the gateway.
* :mod:`proxy.mqtt.decisions` — the decision caches and their bounds;
  :mod:`proxy.mqtt.context` — audit lines, refusals folded to one line per second, counts.

What the session itself enforces:

* CONNECT deadline (``connect_timeout_seconds``) from creation until the broker's CONNACK;
  keepalive enforced at 1.5x (v5: DISCONNECT 0x8D).
* Grants end on time: a decision that rests on something with an end (a delegation's
  ``expires_at``: ``Decision.until``) is kept only until then; the subscription grants are
  re-decided at their earliest end (``next_deadline()`` includes it, and every chunk checks it
  too, so a late timer lets nothing through), the Will likewise. Publish and delivery
  decisions are also cached for at most one second and dropped on ``Invalidated``.
* Token expiry: closed at ``expires_at + token_leeway`` (v5: DISCONNECT 0xA0 first).
* ``Invalidated``: a credential that no longer stands closes the connection (v5 DISCONNECT
  0x98), a Will no longer allowed too (0x87), the grants resting on the devices re-decided.
* Protocol violations (see :mod:`proxy.mqtt.codec`) → v5 CONNACK or DISCONNECT with the
  codec's reason code, 3.1.1 a plain close; audited. A limit exceeded
  (:class:`~proxy.mqtt.codec.LimitExceeded`) is audited as a denial of its action.
* Every close comes through the session: the Will decided, the subscription slots and the
  held QoS 2 bytes given back to the identity, the folded refusals written, one summary
  record per connection past authentication (:mod:`proxy.mqtt.audit_summary`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from proxy.config import MqttConfig
from proxy.identity.model import Identity
from proxy.mqtt import codec, fastpath
from proxy.mqtt.codec import Frame, Framer, LimitExceeded, ProtocolError
from proxy.mqtt.commands import Close, Command, CountMetrics, Metric, SendToBroker, SendToClient
from proxy.mqtt.context import ALLOWED_PUBLISH, ALLOWED_RECEIVE, TO_BROKER, TO_CLIENT, Context
from proxy.mqtt.decisions import DecisionCaches
from proxy.mqtt.delivery_gate import DeliveryGate
from proxy.mqtt.events import (
    Authenticated,
    AuthenticationFailed,
    BrokerClosed,
    BrokerData,
    Buffer,
    ClientClosed,
    ClientData,
    ConnectRefused,
    Event,
    Invalidated,
    Shutdown,
    Tick,
)
from proxy.mqtt.handshake import HELD_PACKET_OVERHEAD, Handshake
from proxy.mqtt.output import End, Output, Run
from proxy.mqtt.packets import (
    MQTT_5,
    V3_CONNACK_FOR,
    PacketType,
    Reason,
    V3ConnackCode,
)
from proxy.mqtt.phase import AUTH, CLOSED, CONNECT, OPEN, UPSTREAM, Phase, advance
from proxy.mqtt.policies import Policies
from proxy.mqtt.publish_gate import PublishGate
from proxy.mqtt.qos2 import Qos2Flows
from proxy.mqtt.subscribe_gate import SubscribeGate
from proxy.mqtt.subscriptions import SubscriptionQuota, SubscriptionTable
from proxy.mqtt.timers import NEVER, Timers
from proxy.mqtt.will import WillGuard
from proxy.ratelimit import RateLimiter

__all__ = ["HELD_PACKET_OVERHEAD", "Policies", "Session"]


# The arguments of fastpath.client_publishes after the chunk (cache, max size, v5, answered, limiter, sub).
ClientLane = tuple[fastpath.PublishCache, int, bool, set[int], RateLimiter | None, str]
# The common call's commands, made as the dataclass __init__ would, less its frame (see client_data).
_NEW = object.__new__
_SET_CLIENT_ITEMS = SendToClient.__dict__["items"].__set__
_SET_BROKER_ITEMS = SendToBroker.__dict__["items"].__set__
_SET_COUNTS = CountMetrics.__dict__["counts"].__set__
# The fast paths' counts by packets per chunk: (allowed, forwarded) n times is the same frozen
# record every time, so each n's is made once (most chunks hold one packet, or a few).
_PUBLISH_COUNTS: dict[int, CountMetrics] = {}
_DELIVERY_COUNTS: dict[int, CountMetrics] = {}
_FAST_COUNTS_KEPT = 256  # the n's remembered per direction; a larger n makes its record each time


def _fast_counts(kept: dict[int, CountMetrics], allowed: Metric, moved: Metric, n: int) -> CountMetrics:
    counts = _NEW(CountMetrics)
    _SET_COUNTS(counts, ((allowed, n), (moved, n)))
    if n <= _FAST_COUNTS_KEPT:
        kept[n] = counts
    return counts

T = PacketType

# --------------------------------------------------------------------------- the session


class Session:
    def __init__(self, *, config: MqttConfig, policies: Policies,
                 clock: Callable[[], float] = time.monotonic, wallclock: Callable[[], float] = time.time,
                 random_hex: Callable[[int], str] = secrets.token_hex, fast_paths: bool = True,
                 rate_limiter: RateLimiter | None = None, token_leeway: float = 0.0,
                 upstream_password: str | None = None, peer: str = "",
                 credential_problem: Callable[[Identity], str | None] | None = None,
                 subscription_quota: SubscriptionQuota | None = None,
                 qos2_budget: SubscriptionQuota | None = None,
                 admit_connect: Callable[[Identity, str, bool, float], str | None] | None = None):
        self.config = config
        # Why the identity's credential no longer stands (device deleted, key rotated), or None:
        # asked at authentication and on every invalidate().
        self.credential_problem = credential_problem
        self.policies = policies
        self.clock = clock              # monotonic: deadlines, caches, audit folding (timers.py)
        self.wallclock = wallclock      # unix time: token expiry, and the `now` of every policy question
        self.random_hex = random_hex    # generated client ids
        self.rate_limiter = rate_limiter
        self.token_leeway = token_leeway

        # Who the connection is, and what each call says besides its writes (context.py).
        self._cx = Context(clock, peer)
        self.closed = False

        self._phase = CONNECT          # see proxy.mqtt.phase: moved only by _enter()
        self._timers = Timers(clock, wallclock, token_leeway, config.connect_timeout_seconds)
        self._client_framer = Framer(config.preauth_max_bytes)  # raised to max_packet_size at CONNACK
        self._broker_framer = Framer(codec.MAX_REMAINING_LENGTH + 5)
        self._subs = SubscriptionTable()  # written by the subscribe gate alone, read by the rest
        self._decisions = DecisionCaches()  # publish and delivery decisions (decisions.py)
        # SUBSCRIBE / UNSUBSCRIBE (subscribe_gate.py); the quota is shared by all of an
        # identity's connections (the shell makes one per gateway); None: no cap.
        self._subscribing = SubscribeGate(config=config, policies=policies, context=self._cx, subscriptions=self._subs,
                                          decisions=self._decisions, quota=subscription_quota,
                                          rate_limiter=rate_limiter, wallclock=wallclock, mono=self._timers.mono)
        # The QoS 2 flows the gateway is part of, and the client publishes it holds until their
        # PUBREL (qos2.py); the bytes held are shared with the identity's connections (qos2_budget).
        self._qos2 = Qos2Flows(qos2_budget, config.max_packet_size)
        # Broker -> client PUBLISH and the broker's acknowledgements (delivery_gate.py).
        self._delivery = DeliveryGate(policies=policies, context=self._cx, subscriptions=self._subs,
                                      decisions=self._decisions, qos2=self._qos2, wallclock=wallclock,
                                      mono=self._timers.mono)
        # Client -> broker PUBLISH and PUBREL (publish_gate.py).
        self._publishing = PublishGate(config=config, policies=policies, context=self._cx, decisions=self._decisions,
                                       qos2=self._qos2, rate_limiter=rate_limiter, clock=clock, wallclock=wallclock,
                                       mono=self._timers.mono, standing_problem=self._standing_problem)
        self._will = WillGuard(policies=policies, context=self._cx, wallclock=wallclock, mono=self._timers.mono,
                               standing_problem=self._standing_problem)  # will.py
        # CONNECT, authentication, the upstream CONNECT and the CONNACK; re-authentication (handshake.py).
        self._handshake = Handshake(
            config=config, context=self._cx, will=self._will, wallclock=wallclock, random_hex=random_hex,
            token_leeway=token_leeway, credential_problem=credential_problem, admit_connect=admit_connect,
            upstream_password=config.upstream_password if upstream_password is None else upstream_password)
        #: What :meth:`next_deadline` and :attr:`reading_paused` depend on besides activity (which
        #: only moves the keepalive deadline later): a shell that keeps a timer at the last deadline
        #: needs to look again only when this changes, or when the timer fires. A plain attribute,
        #: read by the shell once per chunk: set again by every call but the fast paths' (which
        #: change none of it) on its way out (_commands).
        self.deadline_inputs: tuple[object, ...] = self._inputs()
        # Off only to compare the fast paths with the full path (tests/unit/test_mqtt_fastpath.py).
        self._fast_paths = fast_paths
        self._fast_chunks = 0  # chunks the fast paths passed packets of (fast_path_chunks)
        # Set once OPEN with the fast paths on (see client_data): the publish fast path's
        # arguments, fixed for the connection's life; whether the delivery one runs, and for v5.
        self._client_lane: ClientLane | None = None
        self._broker_lane = False
        self._v5 = False

    # ----------------------------------------------------------------- shell API

    @property
    def identity(self) -> Identity | None:
        """Who is connected (None until authenticated)."""
        return self._cx.identity

    @property
    def client_id(self) -> str:
        """The client id as the client knows it."""
        return self._cx.client_id

    @property
    def protocol_level(self) -> int:
        """The protocol level of the client's CONNECT (MQTT_5, 4 or 3; 0 before it)."""
        return self._cx.level

    @property
    def peer(self) -> str:
        """The client's address, as the audit lines name it (the shell sets it once known)."""
        return self._cx.peer

    @peer.setter
    def peer(self, peer: str) -> None:
        self._cx.peer = peer

    @property
    def admit_connect(self) -> Callable[[Identity, str, bool, float], str | None] | None:
        """Asked once the credentials and client id are settled: (identity, broker client id, clean
        start, session expiry) -> the reason to refuse (a shell quota: persistent sessions), or None."""
        return self._handshake.admit_connect

    @admit_connect.setter
    def admit_connect(self, admit: Callable[[Identity, str, bool, float], str | None] | None) -> None:
        self._handshake.admit_connect = admit

    @property
    def keepalive(self) -> int:
        """The enforced keepalive (seconds, 0 = none)."""
        return self._handshake.keepalive

    @property
    def session_expiry(self) -> int:
        """Seconds the broker keeps the session after the close (capped)."""
        return self._handshake.session_expiry

    @property
    def upstream_client_id(self) -> str:
        """The client id as the broker knows it."""
        return self._handshake.upstream_client_id

    @property
    def partial_packet_bytes(self) -> int:
        """Bytes of a client packet not yet whole, held until the rest arrives."""
        return self._client_framer.buffered

    @property
    def dropped_qos2_awaiting_pubrel(self) -> int:
        """Broker QoS 2 deliveries the gateway dropped (answered PUBREC), awaiting the broker's PUBREL."""
        return len(self._qos2.dropped)

    @property
    def fast_path_chunks(self) -> int:
        """Chunks the fast paths passed at least one packet of (for the tests that say they reach them)."""
        return self._fast_chunks

    @property
    def reading_paused(self) -> bool:
        return self._phase in (AUTH, UPSTREAM)

    @property
    def established(self) -> bool:
        """True once the broker's CONNACK has been passed to the client (authenticated, open)."""
        return self._phase is OPEN

    def _inputs(self) -> tuple[object, ...]:
        return (self._phase, self._cx.identity, self._handshake.keepalive, self._timers.horizon)

    def next_deadline(self) -> float | None:
        if self.closed:
            return None
        deadline = self._timers.next_deadline(self._phase is OPEN, self.keepalive, self.identity)
        return None if deadline == NEVER else deadline

    def timeout(self) -> float | None:
        """Seconds from now until a :class:`Tick` is due (``loop.call_later``), or None."""
        deadline = self.next_deadline()
        return None if deadline is None else max(0.0, deadline - self.clock())

    def _enter(self, phase: Phase) -> None:
        self._phase = advance(self._phase, phase)

    def handle(self, event: Event) -> list[Command]:
        """The entry point: what happened → what the shell must do, in order
        (:data:`proxy.mqtt.commands.ORDER`). After the session has closed, nothing."""
        if type(event) is ClientData:
            return self.client_data(event.data)
        if type(event) is BrokerData:
            return self.broker_data(event.data)
        acts = Output()
        if not self.closed:
            _HANDLERS[type(event)](self, acts, event)
        return self._commands(acts)

    def _commands(self, acts: Output) -> list[Command]:
        """The call's commands, in ORDER."""
        self.deadline_inputs = self._inputs()  # (what this call changed is done by now)
        counts = None
        if self._cx.published or self._cx.forwarded or self._cx.delivered or self._cx.handed or self._cx.counts:
            counts = self._cx.take_counts()
        if self._cx.records or acts.auth is not None or acts.close is not None or acts.open_upstream:
            return acts.commands(self._cx.records, counts)
        # A chunk passed on (one call per read, so built here, in ORDER): at most a write each
        # way and the counts.
        out: list[Command] = [SendToClient(acts.to_client)] if acts.to_client else []
        if acts.to_broker:
            out.append(SendToBroker(acts.to_broker))
        if counts:
            out.append(CountMetrics(counts))
        return out

    # ----------------------------------------------------------------- an open connection's chunks

    # The common call, a chunk read on an open connection, on its own: no event, no Output, no
    # handler lookup, its commands built without the dataclass __init__ (a Python frame and an
    # object.__setattr__ per field), the counts of a whole chunk of fast-path packets one shared
    # record per count (_fast_counts). The checks are the full path's, in the same order: the
    # deadlines first (a decision or a grant that ended sends the chunk to the full path, which
    # expires them), then the fast path's walk (fastpath.py), then the full path from where it
    # stopped. At a call's start no record or count is pending (every call takes them).

    def client_data(self, data: Buffer) -> list[Command]:
        """``handle(ClientData(data))`` without the event object (the shell's call per read)."""
        lane = self._client_lane
        if lane is None:
            acts = Output()
            if not self.closed:
                self._client_data(acts, data)
            return self._commands(acts)
        now = self.clock()
        if now >= self._decisions.until or now >= self._timers.horizon or self._client_framer.pending:
            return self._commands(self._client_data(Output(), data))
        view = data if type(data) is memoryview and data.format == "B" and data.ndim == 1 else codec.byte_view(data)
        cache, max_size, v5, answered, limiter, sub = lane
        pos, n = fastpath.client_publishes(view, cache, max_size, v5, answered, limiter, sub)
        if n:
            self._fast_chunks += 1
            self._timers.last_rx = now
            if pos == len(view):
                self._cx.summary.published += n
                send = _NEW(SendToBroker)
                _SET_BROKER_ITEMS(send, [view])
                return [send, _PUBLISH_COUNTS.get(n) or _fast_counts(_PUBLISH_COUNTS, ALLOWED_PUBLISH, TO_BROKER, n)]
            self._cx.published += n
            self._cx.forwarded += n
        acts = Output()
        if n:
            acts.to_broker.append(view[:pos])
            acts.run = Run(acts.to_broker, 0, pos, view)  # a pass-through packet after may join it
        self._client_chunk(acts, view, pos, now)
        return self._commands(acts)

    def broker_data(self, data: Buffer) -> list[Command]:
        """``handle(BrokerData(data))`` without the event object (the shell's call per read)."""
        if not self._broker_lane:
            acts = Output()
            if not self.closed:
                self._broker_data(acts, data)
            return self._commands(acts)
        now = self.clock()
        if now >= self._decisions.until or now >= self._timers.horizon or self._broker_framer.pending:
            return self._commands(self._broker_data(Output(), data))
        view = data if type(data) is memoryview and data.format == "B" and data.ndim == 1 else codec.byte_view(data)
        pos, n = fastpath.broker_deliveries(view, self._subs.exact, self._decisions.receive, self._v5)
        if n:
            self._fast_chunks += 1
            if pos == len(view):
                self._cx.summary.delivered += n
                send = _NEW(SendToClient)
                _SET_CLIENT_ITEMS(send, [view])
                return [send, _DELIVERY_COUNTS.get(n) or _fast_counts(_DELIVERY_COUNTS, ALLOWED_RECEIVE, TO_CLIENT, n)]
            self._cx.delivered += n
            self._cx.handed += n
        acts = Output()
        if n:
            acts.to_client.append(view[:pos])
            acts.run = Run(acts.to_client, 0, pos, view)
        self._broker_chunk(acts, view, pos)
        return self._commands(acts)

    def _on_client_data(self, acts: Output, event: ClientData) -> Output:
        return self._client_data(acts, event.data)

    def _client_data(self, acts: Output, data: Buffer) -> Output:
        now = self.clock()
        if now >= self._decisions.until or now >= self._timers.horizon:
            self._expire(acts, now)
            if self.closed:
                return acts
        view = codec.byte_view(data)
        if self._phase is CONNECT:
            end = self._handshake.head(acts, view)
            if end is not None or self._handshake.oversized:  # nothing more is read
                return self._end(acts, end)
        return self._client_chunk(acts, view, 0, now)

    def _client_chunk(self, acts: Output, view: memoryview, start: int, now: float) -> Output:
        """The full path: the packets of ``view`` from ``start`` (the fast path took those before)."""
        framer = self._client_framer
        error: ProtocolError | None = None
        frames: list[Frame] = []
        if start < len(view):
            try:
                frames = framer.feed(view, start)
            except ProtocolError as exc:
                frames, error = exc.frames, exc
        if frames:
            self._timers.last_rx = now = self.clock()
            if now >= self._decisions.until:
                self._decisions.drop(now)
        try:
            for i, frame in enumerate(frames):
                if self.closed:
                    break
                if self._phase is not OPEN and self._phase is not CONNECT:
                    self._end(acts, self._handshake.hold(frames[i:], framer.buffered))
                    break
                self._client_frame(acts, frame, view)
            if error is not None and not self.closed:
                raise error
            if (self._phase is AUTH or self._phase is UPSTREAM) and framer.buffered:
                # A partial packet behind what is held counts too.
                self._end(acts, self._handshake.over_preauth(0, framer.buffered))
        except ProtocolError as exc:
            self._client_violation(acts, exc)
        finally:
            acts.end_run()
        return acts

    def _on_broker_data(self, acts: Output, event: BrokerData) -> Output:
        return self._broker_data(acts, event.data)

    def _broker_data(self, acts: Output, data: Buffer) -> Output:
        now = self.clock()
        if now >= self._decisions.until or now >= self._timers.horizon:
            self._expire(acts, now)
            if self.closed:
                return acts
        return self._broker_chunk(acts, codec.byte_view(data), 0)

    def _broker_chunk(self, acts: Output, view: memoryview, start: int) -> Output:
        """The full path: the packets of ``view`` from ``start`` (the fast path took those before)."""
        framer = self._broker_framer
        try:
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
        except ProtocolError as exc:
            self._cx.count(Metric("protocol_errors", ("broker",)))
            self._cx.audit("broker", "protocol_error", reason=exc.message)
            if self._phase is UPSTREAM:
                self._refuse_connect(acts, Reason.SERVER_UNAVAILABLE, "broker_refused", exc.message)
            else:
                if self.protocol_level == MQTT_5:
                    acts.to_client.append(codec.encode_disconnect(MQTT_5, Reason.UNSPECIFIED_ERROR))
                self._close(acts, "protocol_error", f"broker: {exc.message}")
        finally:
            acts.end_run()
        return acts

    def _on_authenticated(self, acts: Output, event: Authenticated) -> Output:
        hs = self._handshake
        if hs.reauthenticating:
            end = hs.reauthenticated(acts, event.identity)
            if end is not None:
                return self._end(acts, end)
            # Roles may have changed with the new token, and the expiry has.
            self._decisions.clear()
            self._redecide()
            return acts
        if self._phase is not AUTH or hs.connect is None:
            return acts
        end = hs.authenticated(acts, event.identity)
        if end is not None:
            return self._end(acts, end)
        self._enter(UPSTREAM)
        self._will.arm()  # from now on the broker may hold it
        self._update_horizon()
        return acts

    def _on_authentication_failed(self, acts: Output, event: AuthenticationFailed) -> Output:
        return self._end(acts, self._handshake.failed(event.reason, event.method, self._phase is AUTH))

    def subscribed_filters(self) -> list[str]:
        """The filters this connection holds at the broker (for the persistent-session count)."""
        return [f for f, _ in self._subs]

    def _on_connect_refused(self, acts: Output, event: ConnectRefused) -> Output:
        """The shell refuses a CONNECT whose credentials were good, for a quota of its own (a
        reconnect back-off, persistent sessions): v5 CONNACK 0x97, 3.1.1 CONNACK 3. The shell
        audits (folded): this is what a flooding client meets on every retry."""
        if self._phase is not AUTH or self._handshake.reauthenticating:
            return acts
        return self._refuse_connect(acts, Reason.QUOTA_EXCEEDED if self.protocol_level == MQTT_5 else
                                    Reason.SERVER_UNAVAILABLE, event.reason, event.detail)

    def _on_tick(self, acts: Output, event: Tick) -> Output:
        now = event.now
        if self._phase is not OPEN:
            if self._timers.connect_overdue(now):
                self._cx.audit("connect", "deny", reason="connect timeout", state=self._phase.value)
                if self._phase is CONNECT:
                    return self._close(acts, "connect_timeout", self._phase.value)
                return self._refuse_connect(acts, Reason.SERVER_UNAVAILABLE, "connect_timeout", self._phase.value)
            return acts
        if self._timers.keepalive_overdue(now, self.keepalive):
            self._cx.audit("keepalive", "close", identity=self.identity, reason="keepalive timeout")
            return self._disconnect(acts, Reason.KEEP_ALIVE_TIMEOUT, "keepalive_timeout", "")
        if self._timers.token_expired(self.identity):
            return self._token_ended(acts)
        self._expire(acts, now)
        return acts

    def _on_invalidated(self, acts: Output, event: Invalidated) -> Output:
        """Policies or ownership facts changed (``devices``: the ids an ownership write touched;
        None: anything may have changed): drop cached decisions, close the connection if its
        credential no longer stands (a deleted device, a rotated key) or its Will is no longer
        allowed, re-decide the subscription grants that rest on those devices. Carry out the
        returned commands like any other."""
        devices = event.devices
        self._decisions.clear()
        ident = self.identity
        if ident is None:
            return acts
        if devices is None or ident.device_id in devices:
            problem = self.credential_problem(ident) if self.credential_problem is not None else None
            if problem:
                self._cx.audit("session", "close", identity=ident, reason=problem)
                if self._phase is OPEN:
                    return self._disconnect(acts, Reason.ADMINISTRATIVE_ACTION, "credential_revoked", problem)
                return self._refuse_connect(acts, Reason.NOT_AUTHORIZED, "credential_revoked", problem)
        if self._will.armed and self._will.rests_on(devices) and not self._will.still_allowed("revoked"):
            return self._will_revoked(acts)
        self._redecide(devices)
        return acts

    def _will_revoked(self, acts: Output) -> Output:
        """The Will the broker holds is no longer allowed. It may not stay there a moment longer:
        the broker publishes it whenever it ends the connection itself (a session takeover, a
        protocol error it sees), so end the connection now, with a DISCONNECT that discards it."""
        self._will.disarm()
        acts.end_run()
        acts.to_broker.append(codec.encode_disconnect(self.protocol_level))
        self._cx.audit("session", "close", reason="Will no longer allowed")
        if self._phase is OPEN:
            return self._disconnect(acts, Reason.NOT_AUTHORIZED, "will_revoked", "")
        return self._refuse_connect(acts, Reason.NOT_AUTHORIZED, "will_revoked", "")

    def _on_broker_closed(self, acts: Output, event: BrokerClosed) -> Output:
        if self._phase in (UPSTREAM, AUTH):
            return self._refuse_connect(acts, Reason.SERVER_UNAVAILABLE, "broker_closed", "")
        if self.protocol_level == MQTT_5 and self._phase is OPEN:
            acts.to_client.append(codec.encode_disconnect(MQTT_5, Reason.UNSPECIFIED_ERROR))
        return self._close(acts, "broker_closed", "")

    def _on_client_closed(self, acts: Output, event: ClientClosed) -> Output:
        """The client's connection is gone (whoever closed it). Before the shell closes the
        upstream, the Will is checked again: if it is no longer allowed (a grant revoked since
        CONNECT), a normal DISCONNECT goes to the broker first, which discards the Will."""
        return self._close(acts, "client_closed", "")

    def _standing_problem(self, ident: Identity) -> str | None:
        """Why the identity no longer stands at this instant (its token expired, its credential
        gone), or None: asked before anything is published on its behalf."""
        if self._timers.token_expired(self.identity):
            return "token expired"
        return self.credential_problem(ident) if self.credential_problem is not None else None

    def _token_ended(self, acts: Output) -> Output:
        self._cx.audit("session", "close", identity=self.identity, reason="token expired")
        return self._disconnect(acts, Reason.MAXIMUM_CONNECT_TIME, "token_expired", "")

    def _on_shutdown(self, acts: Output, event: Shutdown) -> Output:
        if self._phase is OPEN:
            return self._disconnect(acts, Reason.SERVER_SHUTTING_DOWN, "shutdown", "")
        if self._phase in (AUTH, UPSTREAM):
            return self._refuse_connect(acts, Reason.SERVER_UNAVAILABLE, "shutdown", "")
        return self._close(acts, "shutdown", "")

    # ----------------------------------------------------------------- client side

    def _client_frame(self, acts: Output, frame: Frame, data: memoryview | None) -> None:
        t = frame.type
        if self._phase is CONNECT:
            if t != T.CONNECT:
                raise ProtocolError(Reason.PROTOCOL_ERROR, f"{T(t).name} before CONNECT")
            end = self._handshake.connected(acts, frame)
            if end is None:
                self._enter(AUTH)
            self._end(acts, end)
            return
        level = self.protocol_level
        if t == T.PUBLISH:
            self._end(acts, self._publishing.publish(acts, frame, data))
        elif t in (T.PUBACK, T.PUBREC, T.PUBCOMP):
            codec.packet_id_of(frame, level)
            acts.forward(acts.to_broker, frame, data)
        elif t == T.PUBREL:
            self._publishing.release(acts, frame, data)
        elif t == T.SUBSCRIBE:
            self._end(acts, self._subscribing.subscribe(acts, frame, data))
            self._update_horizon()
        elif t == T.UNSUBSCRIBE:
            self._end(acts, self._subscribing.unsubscribe(acts, frame, data))
            self._update_horizon()
        elif t == T.PINGREQ:
            if len(frame.body):
                raise ProtocolError(Reason.MALFORMED_PACKET, "PINGREQ with a body")
            acts.forward(acts.to_broker, frame, data)
        elif t == T.DISCONNECT:
            self._end(acts, self._handshake.disconnected(acts, frame, data))
        elif t == T.AUTH and level == MQTT_5:
            self._handshake.reauth(acts, frame)
        elif t == T.CONNECT:
            raise ProtocolError(Reason.PROTOCOL_ERROR, "second CONNECT")
        else:
            raise ProtocolError(Reason.PROTOCOL_ERROR, f"{T(t).name} is not sent by clients")

    @property
    def subscription_quota(self) -> SubscriptionQuota | None:
        """The identity's shared subscription quota (the shell makes one per gateway)."""
        return self._subscribing.quota

    # ----------------------------------------------------------------- broker side

    def _broker_frame(self, acts: Output, frame: Frame, data: memoryview | None) -> None:
        t = frame.type
        level = self.protocol_level
        if self._phase is UPSTREAM:
            if t != T.CONNACK:
                raise ProtocolError(Reason.PROTOCOL_ERROR, f"{T(t).name} before CONNACK")
            self._broker_connack(acts, frame)
            return
        if self._phase is not OPEN:
            raise ProtocolError(Reason.PROTOCOL_ERROR, f"{T(t).name} from the broker before CONNECT")
        if t == T.PUBLISH:
            self._delivery.publish(acts, frame, data)
        elif t == T.PUBACK or t == T.PUBREC or t == T.PUBREL or t == T.PUBCOMP:
            self._delivery.ack(acts, frame, data)
        elif t == T.UNSUBACK:
            codec.packet_id_of(frame, level)  # the table changed when the UNSUBSCRIBE went by
            acts.forward(acts.to_client, frame, data)
        elif t == T.SUBACK:
            self._subscribing.suback(acts, frame, data)
        elif t == T.PINGRESP:
            acts.forward(acts.to_client, frame, data)
        elif t == T.DISCONNECT:
            d = codec.decode_disconnect(frame.body, level)
            acts.forward(acts.to_client, frame, data)
            self._close(acts, "broker_disconnect", f"reason 0x{d.reason:02X}", d.reason)
        else:
            raise ProtocolError(Reason.PROTOCOL_ERROR, f"{T(t).name} is not sent by brokers")

    def _broker_connack(self, acts: Output, frame: Frame) -> None:
        end = self._handshake.connack(acts, frame)
        if end is not None:
            self._end(acts, end)
            return
        self._enter(OPEN)
        self._client_framer.max_packet_size = self.config.max_packet_size  # authenticated now
        self._v5 = self.protocol_level == MQTT_5
        if self._fast_paths:
            ident = self.identity
            self._client_lane = (self._decisions.publish, self.config.max_packet_size, self._v5,
                                 self._qos2.answered, self.rate_limiter, ident.sub if ident is not None else "")
            self._broker_lane = True
        self._timers.last_rx = self.clock()
        for f in self._handshake.take_pending():  # packets the client sent meanwhile
            if self.closed:
                break
            try:
                self._client_frame(acts, f, None)
            except ProtocolError as exc:
                self._client_violation(acts, exc)
                break

    def _redecide(self, devices: frozenset[str] | None = None) -> None:
        self._subscribing.redecide(devices)
        self._update_horizon()

    def _update_horizon(self) -> None:
        will = self._will
        self._timers.set_horizon(self._subs.horizon, will.until if will.armed else None, self.identity)

    def _expire(self, acts: Output, now: float) -> None:
        """Whatever ended by ``now``: cached decisions, the token, subscription grants."""
        if now >= self._decisions.until:
            self._decisions.drop(now)
        if now < self._timers.horizon or self._phase is not OPEN:
            return
        if self._timers.token_expired(self.identity):
            self._token_ended(acts)
            return
        if self._will.armed and self._will.until is not None and now >= self._will.until \
                and not self._will.still_allowed("expired"):
            self._will_revoked(acts)
            return
        self._redecide()

    def _close(self, acts: Output, reason: str, detail: str, code: int | None = None) -> Output:
        """Every way a connection ends comes here. A Will the broker holds is decided now: if it
        is no longer allowed, a plain DISCONNECT upstream makes the broker discard it."""
        if self._will.armed:
            self._will.disarm()
            if self._handshake.asked_to_discard_will() or not self._will.still_allowed():
                acts.end_run()
                acts.to_broker.append(codec.encode_disconnect(self.protocol_level))
        self.closed = True
        self._enter(CLOSED)
        self._client_lane, self._broker_lane = None, False
        self._handshake.take_pending()
        self._subscribing.close()  # the identity's other connections may use them
        self._qos2.drop_all(self._cx.sub)  # the held publishes go with the connection
        self._cx.flush_folds()
        if self.identity is not None:  # one summary per connection past authentication (_enter refuses a 2nd close)
            # The counts of this call go to the metrics at its end: move them into the record now.
            self._cx.counts.update(self._cx.take_counts())
            self._cx.audit("session", "summary", reason=reason, **self._cx.summary.fields())
        if acts.close is None:
            acts.close = Close(reason, detail, code)
        return acts

    def _end(self, acts: Output, end: End | None) -> Output:
        """A piece of the session ends the connection (None: it does not)."""
        if end is None:
            return acts
        if end.connack is not None:
            return self._refuse_connect(acts, end.connack, end.reason, end.detail)
        if end.disconnect is not None:
            return self._disconnect(acts, end.disconnect, end.reason, end.detail)
        return self._close(acts, end.reason, end.detail, end.code)

    def _disconnect(self, acts: Output, code: int, reason: str, detail: str) -> Output:
        """Close an open connection, telling a v5 client why."""
        if self.protocol_level == MQTT_5:
            acts.to_client.append(codec.encode_disconnect(MQTT_5, code))
            return self._close(acts, reason, detail, code)
        return self._close(acts, reason, detail)

    def _refuse_connect(self, acts: Output, code: int, reason: str, detail: str) -> Output:
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

    def _client_violation(self, acts: Output, exc: ProtocolError) -> Output:
        self._cx.count(Metric("protocol_errors", ("client",)))
        state = self._phase
        if state is CONNECT and exc.reason_code == Reason.PACKET_TOO_LARGE:
            # Only the Framer says this, at the CONNECT's fixed header: nothing of its body is held.
            return self._end(acts, self._handshake.oversized_connect(acts, exc.message))
        if isinstance(exc, LimitExceeded):  # a configured limit, not a broken protocol
            self._cx.audit(exc.action, "deny", reason=exc.message, reason_code=exc.reason_code)
        else:
            self._cx.audit("protocol_error", "deny", reason=exc.message, reason_code=exc.reason_code)
        if state is CONNECT:
            level = exc.protocol_level
            if level is not None:
                self._cx.level = level
                if exc.reason_code == Reason.UNSUPPORTED_PROTOCOL_VERSION and level != MQTT_5:
                    acts.to_client.append(codec.encode_connack(False, V3ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION, 4))
                    return self._close(acts, "protocol_error", exc.message, V3ConnackCode.UNACCEPTABLE_PROTOCOL_VERSION)
                return self._refuse_connect(acts, exc.reason_code, "protocol_error", exc.message)
            return self._close(acts, "protocol_error", exc.message)
        if state is AUTH or state is UPSTREAM:
            return self._refuse_connect(acts, exc.reason_code, "protocol_error", exc.message)
        return self._disconnect(acts, exc.reason_code, "protocol_error", exc.message)


_HANDLERS: dict[type[Event], Callable[[Session, Output, Any], object]] = {
    ClientData: Session._on_client_data,
    BrokerData: Session._on_broker_data,
    Authenticated: Session._on_authenticated,
    AuthenticationFailed: Session._on_authentication_failed,
    Tick: Session._on_tick,
    ClientClosed: Session._on_client_closed,
    BrokerClosed: Session._on_broker_closed,
    Invalidated: Session._on_invalidated,
    Shutdown: Session._on_shutdown,
    ConnectRefused: Session._on_connect_refused,
}
