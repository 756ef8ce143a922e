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
* the shell (asyncio), from the socket up:

  * :mod:`~proxy.mqtt.transport` — what a connection needs of its client's socket, and what
    a client socket hands its bytes to;
  * :mod:`~proxy.mqtt.sockets` — the sockets' protocols (plain, TLS on ``ssl.MemoryBIO``,
    broker), the shared receive buffers, closing without losing the last bytes;
  * :mod:`~proxy.mqtt.websocket` — MQTT over WebSocket (aiohttp speaks HTTP and frames);
  * :mod:`~proxy.mqtt.wsguard` — what a WebSocket stranger may make it hold before CONNECT;
  * :mod:`~proxy.mqtt.connection` — one client's pump: events to its session, the commands
    carried out in order; its timer, authentication task and broker dial;
  * :mod:`~proxy.mqtt.shell_metrics` — the counters the commands and the shell count into;
  * :mod:`~proxy.mqtt.audit_writer` — the audit records, written off the event loop in batches;
  * :mod:`~proxy.mqtt.server` — :class:`~proxy.mqtt.server.MqttGateway`: listeners, accept
    and admission, the open connections, invalidation fan-out, shutdown;
  * :mod:`~proxy.mqtt.admission` — per-address and per-identity limits, refusals folded;
  * :mod:`~proxy.mqtt.persistent` — persistent broker sessions per identity, and their filters;
  * :mod:`~proxy.mqtt.presence` — which devices are connected now (the portal reads it);
  * :mod:`~proxy.mqtt.cleaner` — a deleted device's retained messages and session, cleared.
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
