"""The sans-IO MQTT gateway layer (3.1, 3.1.1, 5.0).

* :mod:`proxy.mqtt.packets` — packet types, reason codes, property ids, decoded records.
* :mod:`proxy.mqtt.codec` — framing (:class:`Framer`), decoding, encoding, :class:`ProtocolError`.
* :mod:`proxy.mqtt.session` — :class:`Session`, the per-connection state machine the
  asyncio shell (:mod:`proxy.mqtt.server`) drives: bytes in, :class:`Actions` out.

See :mod:`proxy.mqtt.session` for the contract the shell codes against.
"""

from proxy.mqtt.codec import ProtocolError
from proxy.mqtt.session import (
    AUTH_METHOD,
    Actions,
    AuthRequest,
    CloseInfo,
    RateLimiter,
    Session,
    classify_credentials,
)

__all__ = [
    "AUTH_METHOD",
    "Actions",
    "AuthRequest",
    "CloseInfo",
    "ProtocolError",
    "RateLimiter",
    "Session",
    "classify_credentials",
]
