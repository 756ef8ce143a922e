"""The sans-IO MQTT gateway layer (3.1, 3.1.1, 5.0), in the order the data goes through it.

* :mod:`proxy.mqtt.packets` — packet types, reason codes, property ids, decoded records.
* :mod:`proxy.mqtt.codec` — framing (:class:`Framer`), decoding, encoding, :class:`ProtocolError`.
* :mod:`proxy.mqtt.events` / :mod:`proxy.mqtt.commands` — what the shell tells the session
  and what the session asks of the shell.
* the session's pieces: :mod:`~proxy.mqtt.phase` (the connection phase and its transitions),
  :mod:`~proxy.mqtt.handshake` (credentials, client id, upstream CONNECT),
  :mod:`~proxy.mqtt.ratelimit`, :mod:`~proxy.mqtt.subscriptions` (the table and the quota),
  :mod:`~proxy.mqtt.fastpath`, :mod:`~proxy.mqtt.output` (the command list, pass-through runs),
  :mod:`~proxy.mqtt.decisions` (the decision caches), :mod:`~proxy.mqtt.qos2` (QoS 2 books),
  :mod:`~proxy.mqtt.subscribe_gate` (SUBSCRIBE / UNSUBSCRIBE: the one writer of the table),
  :mod:`~proxy.mqtt.delivery_gate` (broker → client PUBLISH checks).
* :mod:`proxy.mqtt.session` — :class:`Session`, ``handle(event) -> list[Command]``.
* the shell: :mod:`proxy.mqtt.server` (asyncio), :mod:`proxy.mqtt.websocket`,
  :mod:`proxy.mqtt.admission`, :mod:`proxy.mqtt.cleaner`.
"""

from proxy.mqtt.codec import ProtocolError
from proxy.mqtt.commands import AuthRequest, Close
from proxy.mqtt.handshake import AUTH_METHOD, classify_credentials
from proxy.mqtt.ratelimit import RateLimiter
from proxy.mqtt.session import Session

__all__ = [
    "AUTH_METHOD",
    "AuthRequest",
    "Close",
    "ProtocolError",
    "RateLimiter",
    "Session",
    "classify_credentials",
]
