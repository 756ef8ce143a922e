"""The policy questions the session's pieces ask: what they need of :class:`proxy.policy.Policies`.

A protocol, so the pieces (and the tests' stand-ins) depend on the three questions, not on the
policy engine; ``now`` is the wall clock (unix seconds) the answer is for, always passed.
"""

from __future__ import annotations

from typing import Protocol

from proxy.identity.model import Identity
from proxy.policy.decision import Decision, SubscribeDecision

__all__ = ["Policies"]


class Policies(Protocol):
    def may_publish(self, identity: Identity, topic: str, *, qos: int = 0, retain: bool = False,
                    client_id: str = "", now: float | None = None) -> Decision: ...

    def may_receive(self, identity: Identity, topic: str, *, client_id: str = "",
                    now: float | None = None) -> Decision: ...

    def may_subscribe(self, identity: Identity, topic_filter: str, *, qos: int = 0, client_id: str = "",
                      now: float | None = None) -> SubscribeDecision: ...
