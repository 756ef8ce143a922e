"""What a policy question answers: the verdict, the rule that made it, and why.

The rule id (or ``None`` with the reason "no rule matched") goes to the audit
log; ``device`` is the device the topic or path named through ``{device}``
in the deciding rule, so the gateways can audit and scope requests by it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

NO_RULE = "no rule matched"


class PolicyError(Exception):
    """A broken policy set, phrased as one line naming ``file:line:column``."""


class Verdict(str, enum.Enum):
    ALLOW = "allow"            # the whole filter is covered outright
    DENY = "deny"              # nothing under the filter may ever be delivered
    CHECK_EACH = "check-each"  # allowed; each delivery is checked with may_receive


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str | None
    reason: str
    device: str | None = None
    until: float | None = None  # unix time the answer stops holding (a delegation's expiry); None: no end
    devices: frozenset[str] = frozenset()  # devices whose facts the answer rests on

    def __bool__(self) -> bool:  # guards against `if decision:`, which would always be true
        raise TypeError("use decision.allowed, not the decision itself")


@dataclass(frozen=True, slots=True)
class SubscribeDecision:
    verdict: Verdict
    rule: str | None
    reason: str
    device: str | None = None
    until: float | None = None  # as for Decision
    devices: frozenset[str] = frozenset()  # as for Decision

    @property
    def allowed(self) -> bool:
        """True for ALLOW and CHECK_EACH: the subscription goes to the broker."""
        return self.verdict is not Verdict.DENY

    def __bool__(self) -> bool:
        raise TypeError("use decision.verdict or decision.allowed")
