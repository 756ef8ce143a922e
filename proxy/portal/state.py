"""What the portal's handlers share: one :class:`Portal` per application."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from proxy.portal.api_client import ApiClient
from proxy.portal.live import LiveFeeds
from proxy.portal.oidc import OidcClient
from proxy.portal.sessions import SessionStore
from proxy.portal.signin import SignInSealer
from proxy.services import Services


class DevicePresence(Protocol):
    def connected(self, device_id: str) -> bool: ...

    def last_seen(self, device_id: str) -> float | None: ...


#: The MQTT listener's presence, once it runs (it starts after the HTTP listener), else None.
Presence = Callable[[], DevicePresence | None]


@dataclass
class Portal:
    services: Services
    base: str                # portal.path, e.g. /portal/
    public_url: str          # how people reach it, ending in /
    oidc: OidcClient
    api: ApiClient
    sessions: SessionStore
    headers: dict[str, str]
    presence: Presence | None = None
    signins: SignInSealer = field(default_factory=SignInSealer)
    live: LiveFeeds = field(init=False)

    def __post_init__(self) -> None:
        self.live = LiveFeeds(self.services.config)


PORTAL = web.AppKey("portal", Portal)
