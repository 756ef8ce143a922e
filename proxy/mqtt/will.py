"""The Will: a publish the broker makes later, decided at every instant it could happen.

One :class:`WillGuard` per session. The Will is authorized as a publish (its topic, QoS and
retain flag) when the client authenticates (refused → CONNACK 0x87 / 0x05). From the upstream
CONNECT on, the broker holds it (:attr:`~WillGuard.armed`) and may publish it whenever the
connection ends, so it is decided again:

* at the instant the connection ends, on every way it ends: no longer allowed (a grant
  revoked, the token expired, the credential gone) → the session sends a plain DISCONNECT
  upstream so the broker discards it;
* on every invalidation touching the devices its decision rests on, and at the end of its
  grant (:attr:`~WillGuard.until`): the broker publishes a Will it holds when it ends the
  connection itself (a session takeover, a protocol error it sees), so one no longer allowed
  ends the connection at once (the session's ``_will_revoked``).

This module decides and keeps the books (counted and audited in the connection's
:class:`~proxy.mqtt.context.Context`); the session writes the DISCONNECTs.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.identity.model import Identity
from proxy.mqtt.context import ALLOW_COUNT, DENY_COUNT, Context
from proxy.mqtt.packets import Will
from proxy.mqtt.policies import Policies

__all__ = ["WillGuard"]


class WillGuard:
    __slots__ = ("_cx", "_devices", "_mono", "_policies", "_standing_problem", "_wallclock", "_will", "armed",
                 "until")

    def __init__(self, *, policies: Policies, context: Context, wallclock: Callable[[], float],
                 mono: Callable[[float | None], float | None],
                 standing_problem: Callable[[Identity], str | None]) -> None:
        self._policies = policies
        self._cx = context
        self._wallclock = wallclock
        self._mono = mono
        self._standing_problem = standing_problem
        self._will: Will | None = None
        self._devices: frozenset[str] = frozenset()  # the devices its last decision rests on
        self.armed = False                 # the broker holds this connection's Will
        self.until: float | None = None    # when the Will's grant ends (session clock)

    def authorize(self, identity: Identity, will: Will | None) -> bool:
        """At authentication: may ``identity`` leave this Will? (None: nothing to decide.)
        A refusal is counted and audited."""
        self._will = will
        if will is None:
            return True
        d = self._policies.may_publish(identity, will.topic, qos=will.qos, retain=will.retain,
                                       client_id=self._cx.client_id, now=self._wallclock())
        self.until = self._mono(d.until)
        self._devices = d.devices
        if not d.allowed:
            self._cx.count(DENY_COUNT["will"])
            self._cx.audit("will", "deny", identity=identity, resource=will.topic, rule=d.rule, reason=d.reason,
                           qos=will.qos, retain=will.retain)
            return False
        self._cx.count(ALLOW_COUNT["will"])
        return True

    def arm(self) -> None:
        """The upstream CONNECT goes out: from now on the broker may hold the Will."""
        self.armed = self._will is not None

    def disarm(self) -> None:
        """The broker no longer holds it (discarded, refused, or decided at the close)."""
        self.armed = False

    def rests_on(self, devices: frozenset[str] | None) -> bool:
        """Whether the Will's decision may change with an invalidation of ``devices`` (None: any)."""
        return devices is None or not devices.isdisjoint(self._devices)

    def still_allowed(self, when: str = "close") -> bool:
        """The Will must be allowed at the instant the broker would publish it, on a credential
        that still stands. Allowed again: its grant's end moves; refused: counted and audited."""
        will = self._will
        ident = self._cx.identity
        if will is None or ident is None:
            return True
        rule = None
        reason = self._standing_problem(ident)
        if reason is None:
            d = self._policies.may_publish(ident, will.topic, qos=will.qos, retain=will.retain,
                                           client_id=self._cx.client_id, now=self._wallclock())
            if d.allowed:
                self._cx.count(ALLOW_COUNT["will"])
                self.until = self._mono(d.until)
                self._devices = d.devices
                return True
            rule, reason = d.rule, d.reason
        self._cx.count(DENY_COUNT["will"])
        self._cx.audit("will", "deny", resource=will.topic, rule=rule, reason=reason,
                       qos=will.qos, retain=will.retain, when=when)
        return False
