"""The clocks and deadlines of one MQTT connection (sans-IO: both clocks are injected).

One :class:`Timers` per session. Two clocks: ``clock`` (monotonic: deadlines, caches, audit
folding; the value ``Tick(now)`` and ``next_deadline()`` speak in) and ``wallclock`` (unix time:
token expiry, and the ``now`` of every policy question). The deadlines:

* the CONNECT deadline, ``connect_timeout_seconds`` from creation until the broker's CONNACK;
* the keepalive, enforced at 1.5x from the client's last packet (:attr:`Timers.last_rx`);
* the :attr:`~Timers.horizon`: the earliest instant something the session relies on ends (a
  subscription grant, the Will's grant, the token at ``expires_at + token_leeway``), checked on
  every chunk as well as by the timer, so a late timer lets nothing through after the end.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.identity.model import Identity

__all__ = ["NEVER", "Timers"]

NEVER = float("inf")


class Timers:
    __slots__ = ("clock", "connect_timeout", "created", "horizon", "last_rx", "token_leeway", "wallclock")

    def __init__(self, clock: Callable[[], float], wallclock: Callable[[], float], token_leeway: float,
                 connect_timeout: float) -> None:
        self.clock = clock
        self.wallclock = wallclock
        self.token_leeway = token_leeway
        self.connect_timeout = connect_timeout
        self.created = clock()
        self.last_rx = self.created     # the client's last packet (keepalive)
        self.horizon = NEVER            # clock() at which a grant, the Will's grant or the token ends

    def mono(self, until: float | None) -> float | None:
        """A unix time (a delegation's expiry) on the session's clock."""
        return None if until is None else self.clock() + (until - self.wallclock())

    def token_expired(self, identity: Identity | None) -> bool:
        return identity is not None and identity.expires_at is not None and \
            self.wallclock() >= identity.expires_at + self.token_leeway

    def _token_end(self, identity: Identity | None) -> float | None:
        if identity is None or identity.expires_at is None:
            return None
        return self.clock() + max(identity.expires_at + self.token_leeway - self.wallclock(), 0.0)

    def connect_overdue(self, now: float) -> bool:
        return now >= self.created + self.connect_timeout

    def keepalive_overdue(self, now: float, keepalive: int) -> bool:
        return bool(keepalive) and now - self.last_rx >= 1.5 * keepalive  # (>=: as next_deadline says)

    def set_horizon(self, grants: float | None, will: float | None, identity: Identity | None) -> None:
        """The next instant something the session relies on ends: a grant, the Will's, the token."""
        until = grants if grants is not None else NEVER
        if will is not None:
            until = min(until, will)
        token = self._token_end(identity)
        if token is not None:
            until = min(until, token)
        self.horizon = until

    def next_deadline(self, established: bool, keepalive: int, identity: Identity | None) -> float:
        """When a Tick is due (NEVER: none): the CONNECT deadline until ``established``, then the
        earliest of the keepalive, the token's end and the horizon."""
        if not established:
            return self.created + self.connect_timeout
        deadline = self.horizon
        if keepalive:
            deadline = min(deadline, self.last_rx + 1.5 * keepalive)
        token = self._token_end(identity)
        return deadline if token is None else min(deadline, token)
