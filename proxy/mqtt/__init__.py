"""The sans-IO MQTT gateway layer (3.1, 3.1.1, 5.0), in the order the data goes through it.

* :mod:`proxy.mqtt.packets` — packet types, reason codes, property ids, decoded records.
* :mod:`proxy.mqtt.codec` — framing (:class:`Framer`), decoding, encoding, :class:`ProtocolError`.
* :mod:`proxy.mqtt.events` / :mod:`proxy.mqtt.commands` — what the shell tells the session
  and what the session asks of the shell.
* the session's pieces:

  * :mod:`~proxy.mqtt.phase` — the connection phase and its transition table;
  * :mod:`~proxy.mqtt.timers` — the two clocks and the deadlines (CONNECT, keepalive, horizon);
  * :mod:`~proxy.mqtt.context` — who the connection is; its audit records, folds and counts;
  * :mod:`~proxy.mqtt.output` — one call's writes, the pass-through run, ``End``;
  * :mod:`~proxy.mqtt.policies` — the policy questions the pieces ask (a protocol);
  * :mod:`~proxy.mqtt.handshake` — credentials, client id, CONNECT → CONNACK, re-authentication;
  * :mod:`~proxy.mqtt.will` — the Will, decided whenever the broker could publish it;
  * :mod:`~proxy.ratelimit` (outside the package: the ownership API uses it too) — the token buckets per identity;
  * :mod:`~proxy.mqtt.decisions` — the publish and delivery decision caches;
  * :mod:`~proxy.mqtt.qos2` — the QoS 2 books (held publishes, answered, releasing, dropped);
  * :mod:`~proxy.mqtt.publish_gate` — client → broker PUBLISH and PUBREL;
  * :mod:`~proxy.mqtt.subscriptions` — the subscription table and the identity quota;
  * :mod:`~proxy.mqtt.subscribe_gate` — SUBSCRIBE / UNSUBSCRIBE / SUBACK (the one writer of the table);
  * :mod:`~proxy.mqtt.delivery_gate` — broker → client PUBLISH and the broker's acks;
  * :mod:`~proxy.mqtt.fastpath` — the two loops over chunks of PUBLISH whose decisions are known;
  * :mod:`~proxy.mqtt.audit_summary` — the per-connection summary record;
  * the coordinator, below: the phase, the timers, the open-connection lane, the close.
* :mod:`proxy.mqtt.session` — :class:`Session`, ``handle(event) -> list[Command]``.
* the shell: :mod:`proxy.mqtt.server` (asyncio), :mod:`proxy.mqtt.websocket`,
  :mod:`proxy.mqtt.admission`, :mod:`proxy.mqtt.cleaner`.
"""

from proxy.mqtt.codec import ProtocolError
from proxy.mqtt.commands import AuthRequest, Close
from proxy.mqtt.handshake import AUTH_METHOD, classify_credentials
from proxy.mqtt.session import Session
from proxy.ratelimit import RateLimiter

__all__ = [
    "AUTH_METHOD",
    "AuthRequest",
    "Close",
    "ProtocolError",
    "RateLimiter",
    "Session",
    "classify_credentials",
]
