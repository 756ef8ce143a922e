"""The running parts every listener shares, built once from the configuration.

The MQTT gateway, the HTTP gateway and the ownership API all take one
:class:`Services`; tests build it from real or in-memory parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.audit import AuditLog
from proxy.config import Config

if TYPE_CHECKING:  # the concrete classes live in their own layers
    from ownership.service import OwnershipService
    from proxy.identity.tokens import TokenValidator
    from proxy.policy import Policies


@dataclass
class Services:
    config: Config
    tokens: TokenValidator
    ownership: OwnershipService
    policies: Policies
    audit: AuditLog
    extra: dict[str, Any] | None = None
