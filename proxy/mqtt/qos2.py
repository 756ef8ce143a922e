"""The QoS 2 flows the gateway takes part in on one connection, and what they hold.

The broker publishes a QoS 2 message when it gets the PUBREL, so the session holds an allowed
QoS 2 PUBLISH from the client until its PUBREL and decides it again then (``proxy.mqtt.session``
makes every decision; this module only keeps the books). One :class:`Qos2Flows` per session
owns:

* ``held``: packet id -> (the PUBLISH as it goes upstream, topic, retain), at most ``cap`` bytes
  per connection (at least one packet) and the identity's share of the gateway-wide byte
  ``budget`` (``mqtt.limits.qos2_hold_bytes_per_identity``, shared by its connections);
* ``answered``: ids of client publishes the gateway answered itself (refused, or dropped in
  3.1.1): their PUBREL is completed here, never forwarded;
* ``releasing``: ids released upstream (PUBLISH and PUBREL in one write): the broker's PUBREC
  needs no answer, its PUBCOMP answers the client;
* ``dropped``: ids of broker deliveries the gateway refused and answered PUBREC itself: the
  broker's PUBREL is completed here.
"""

from __future__ import annotations

from proxy.mqtt.subscriptions import SubscriptionQuota

__all__ = ["QOS2_HOLD_BYTES", "Qos2Flows"]

# Bytes of QoS 2 publishes a connection may have awaiting their PUBREL (at least one packet).
QOS2_HOLD_BYTES = 256 * 1024


class Qos2Flows:
    __slots__ = ("_budget", "_cap", "_held", "answered", "dropped", "held_bytes", "releasing")

    def __init__(self, budget: SubscriptionQuota | None, max_packet_size: int):
        self._budget = budget
        self._cap = max(QOS2_HOLD_BYTES, max_packet_size)
        self._held: dict[int, tuple[bytes, str, bool]] = {}
        self.held_bytes = 0
        self.answered: set[int] = set()  # changed in place, never rebound (the session's lane holds it)
        self.releasing: set[int] = set()
        self.dropped: set[int] = set()

    def hold(self, sub: str | None, pid: int, packet: bytes, topic: str, retain: bool) -> bool:
        """Keep ``packet`` until its PUBREL (a retransmission replaces the earlier one); False,
        holding nothing for ``pid``, when the connection's cap or the identity's budget is spent."""
        self.take(sub, pid)
        n = len(packet)
        if self.held_bytes + n > self._cap or not self._charge(sub, n):
            return False
        self._held[pid] = (packet, topic, retain)
        self.held_bytes += n
        return True

    def take(self, sub: str | None, pid: int) -> tuple[bytes, str, bool] | None:
        """The publish held for ``pid`` (now no longer held), or None."""
        held = self._held.pop(pid, None)
        if held is not None:
            self._give_back(sub, len(held[0]))
        return held

    def drop_all(self, sub: str | None) -> None:
        """The connection ends: what it held is dropped and its bytes go back to the identity."""
        self._held.clear()
        if self.held_bytes:
            self._give_back(sub, self.held_bytes)

    def _charge(self, sub: str | None, n: int) -> bool:
        return self._budget is None or sub is None or self._budget.take(sub, n)

    def _give_back(self, sub: str | None, n: int) -> None:
        self.held_bytes -= n
        if self._budget is not None and sub is not None:
            self._budget.release(sub, n)
