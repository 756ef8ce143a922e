"""An OwnershipService on a temporary store, and the ownership API on a real port.

Fixtures:
- ``ownership_service``: an open :class:`OwnershipService` (MemoryAudit) on a fresh store.
- ``ownership_api``: :class:`ApiHarness`, the API mounted under ``/api/v1`` as the
  gateway mounts it, served over real HTTP on 127.0.0.1, with bearer tokens
  for alice, bob, carol (iot-user) and admin (iot-admin).

Tokens come from :class:`TableTokens`, a validator with the real one's
interface that knows a fixed set of tokens; the integration tests can hand
the harness the real validator and tokens from the OIDC rig instead.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ownership.api import create_api_app
from ownership.service import OwnershipService
from proxy.audit import MemoryAudit
from proxy.config import Config, load_config_text
from proxy.identity.model import AuthError, AuthReason, Identity
from proxy.services import Services

STORE_KEY = "correct horse battery staple"

USERS: dict[str, Identity] = {
    name: Identity(kind="user", sub=f"sub-{name}", username=name, method="token",
                   roles=frozenset({role}), groups=frozenset(groups))
    for name, role, groups in (("alice", "iot-user", ("lab",)), ("bob", "iot-user", ("lab",)),
                               ("carol", "iot-user", ()), ("admin", "iot-admin", ()))
}


def ownership_config(tmp_path: Path, *, key: str = STORE_KEY, store: str = "data/ownership.db",
                     extra: str = "") -> Config:
    """A config whose store lives under ``tmp_path``; the key comes in through ${KEYGATE_STORE_KEY}."""
    text = (
        "oidc: {issuer: 'https://issuer.test/realms/iot'}\n"
        "http: {listen: '127.0.0.1:0', tls: false}\n"
        f"store: {{path: '{store}', key: '${{KEYGATE_STORE_KEY}}'}}\n"
        "ownership:\n"
        "  advertise_mqtt: mqtts://gw.test:8883\n"
        "  advertise_http: https://gw.test:8443\n"
        "  max_devices_per_user: 5\n"
        "  role_quotas: {iot-admin: 50}\n"
        f"{extra}"
    )
    return load_config_text(text, "proxy.yaml", env={"KEYGATE_STORE_KEY": key}, base_dir=str(tmp_path))


class TableTokens:
    """The TokenValidator interface over a fixed table of opaque tokens."""

    ready = True

    def __init__(self, identities: dict[str, Identity] | None = None):
        self.tokens = {secrets.token_urlsafe(16): ident for ident in (identities or USERS).values()}
        self.by_name = {ident.username: tok for tok, ident in self.tokens.items()}
        self.unreachable = False

    def token(self, username: str) -> str:
        return self.by_name[username]

    async def start(self) -> None:
        pass

    async def validate(self, token: str) -> Identity:
        if self.unreachable:
            raise AuthError(AuthReason.ISSUER_UNREACHABLE)
        try:
            return self.tokens[token]
        except KeyError:
            raise AuthError(AuthReason.BAD_SIGNATURE) from None

    async def close(self) -> None:
        pass


def mount(services: Services) -> web.Application:
    """The API as the gateway mounts it."""
    root = web.Application()
    prefix = services.config.http.api_prefix if services.config.http else "/api/v1"
    root.add_subapp(prefix, create_api_app(services))
    return root


class ApiHarness:
    def __init__(self, services: Services, client: TestClient, token_for: Callable[[str], str]):
        self.services = services
        self.client = client
        self.token_for = token_for
        self.prefix = services.config.http.api_prefix

    @property
    def ownership(self) -> OwnershipService:
        return self.services.ownership

    @property
    def audit(self) -> MemoryAudit:
        return self.services.audit  # type: ignore[return-value]

    def url(self, path: str) -> str:
        return f"{self.prefix}{path}"

    async def call(self, method: str, path: str, *, as_: str | None = None, json: Any = None,
                   headers: dict[str, str] | None = None, data: Any = None) -> aiohttp.ClientResponse:
        h = dict(headers or {})
        if as_ is not None:
            h["Authorization"] = f"Bearer {self.token_for(as_)}"
        return await self.client.request(method, self.url(path), json=json, data=data, headers=h)

    async def register(self, as_: str, device_id: str, **fields: Any) -> dict[str, Any]:
        r = await self.call("POST", "/devices", as_=as_, json={"id": device_id, "type": "Sensor", **fields})
        assert r.status == 201, await r.text()
        return await r.json()


async def open_service(config: Config, audit: MemoryAudit | None = None, **kw: Any) -> OwnershipService:
    return await OwnershipService.open(config, audit=audit or MemoryAudit(), **kw)


@pytest.fixture
async def ownership_service(tmp_path):
    service = await open_service(ownership_config(tmp_path))
    try:
        yield service
    finally:
        await service.close()


@pytest.fixture
async def ownership_api(tmp_path):
    config = ownership_config(tmp_path)
    audit = MemoryAudit()
    tokens = TableTokens()
    service = await open_service(config, audit)
    services = Services(config=config, tokens=tokens, ownership=service, policies=None, audit=audit)  # type: ignore[arg-type]
    client = TestClient(TestServer(mount(services), host="127.0.0.1"))
    await client.start_server()
    try:
        yield ApiHarness(services, client, tokens.token)
    finally:
        await client.close()
        await service.close()


class LiveApi:
    """The API on a real port, served from its own thread and event loop, for
    synchronous HTTP clients (schemathesis)."""

    def __init__(self, config: Config, tokens: Any):
        self.config = config
        self.tokens = tokens
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="live-api", daemon=True)
        self._runner: web.AppRunner | None = None
        self.service: OwnershipService | None = None

    def __enter__(self) -> "LiveApi":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        self.service = await open_service(self.config)
        services = Services(config=self.config, tokens=self.tokens, ownership=self.service, policies=None,  # type: ignore[arg-type]
                            audit=self.service.audit)
        self._runner = web.AppRunner(mount(services))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}{self.config.http.api_prefix}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.service is not None:
            await self.service.close()
