"""The phase of one MQTT connection, and the only moves between phases (h11's ``_state.py``).

::

    CONNECT ──CONNECT decoded──▶ AUTH ──identity bound──▶ UPSTREAM ──broker's CONNACK 0──▶ OPEN
       │                          │                          │                              │
       └──────────────────────────┴──────────── any end ─────┴──────────────────────────────┴──▶ CLOSED

The session moves only through :func:`advance`, which refuses any other move with
:class:`PhaseError`: a bug in the session (a client's bytes never raise it; they end in a
protocol refusal and CLOSED).
"""

from __future__ import annotations

import enum

__all__ = ["AUTH", "CLOSED", "CONNECT", "OPEN", "Phase", "PhaseError", "TRANSITIONS", "UPSTREAM", "advance"]


class Phase(enum.Enum):
    CONNECT = "connect"    # nothing decoded yet: waiting for the client's CONNECT
    AUTH = "auth"          # the credentials are being verified (the client's reading paused)
    UPSTREAM = "upstream"  # authenticated; the upstream CONNECT sent, waiting for the broker's CONNACK
    OPEN = "open"          # the CONNACK passed on: traffic flows both ways
    CLOSED = "closed"      # ended; every later event is ignored


CONNECT, AUTH, UPSTREAM, OPEN, CLOSED = Phase.CONNECT, Phase.AUTH, Phase.UPSTREAM, Phase.OPEN, Phase.CLOSED

#: Every legal move. A connection can end in any phase; nothing leaves CLOSED.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    CONNECT: frozenset({AUTH, CLOSED}),
    AUTH: frozenset({UPSTREAM, CLOSED}),
    UPSTREAM: frozenset({OPEN, CLOSED}),
    OPEN: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


class PhaseError(RuntimeError):
    """A move the transition table does not allow."""


def advance(now: Phase, to: Phase) -> Phase:
    """``to``, if the table allows the move from ``now``; PhaseError otherwise."""
    if to not in TRANSITIONS[now]:
        raise PhaseError(f"illegal move {now.name} -> {to.name}")
    return to
