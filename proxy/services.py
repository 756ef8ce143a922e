"""The running parts every listener shares, built once from the configuration.

The MQTT gateway, the HTTP gateway and the ownership API all take one
:class:`Services`; tests build it from real or in-memory parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from proxy.audit import AuditLog
from proxy.config import Config

if TYPE_CHECKING:  # the concrete classes live in their own layers
    from ownership.policy_store import StorePolicies
    from ownership.service import OwnershipService
    from proxy.identity.model import Identity
    from proxy.policy import Policies


class Tokens(Protocol):
    """What the listeners ask of the access-token validator (:class:`proxy.identity.tokens.TokenValidator`;
    tests stand in for it with tokens of their own)."""

    async def validate(self, token: str) -> Identity:
        """The token's identity, or :class:`proxy.identity.model.AuthError`."""
        ...

    async def close(self) -> None: ...


@dataclass
class Services:
    config: Config
    tokens: Tokens
    ownership: OwnershipService
    policies: Policies
    audit: AuditLog
    extra: dict[str, Any] | None = None
    # policies.source: store: what keeps ``policies`` on the store's newest set (else None).
    policy_store: StorePolicies | None = None
