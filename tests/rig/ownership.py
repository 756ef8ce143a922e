"""An OwnershipService on a temporary store, and the ownership API on a real port.

Fixtures:
- ``ownership_service``: an open :class:`OwnershipService` (MemoryAudit) on a fresh store.
- ``ownership_api``: :class:`ApiHarness`, the API mounted under ``/api/v1`` as the
  gateway mounts it, served over real HTTP on 127.0.0.1, validating real
  access tokens from the OIDC rig (users alice, bob, carol as iot-user, admin
  as iot-admin) with the real :class:`TokenValidator`.
- ``ownership_api_table``: the same over :class:`TableTokens`, a validator with
  the real one's interface and a fixed table of identities, for identities a
  real provider never issues (a device kind, an issuer that is down on demand).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ownership.api import create_api_app
from ownership.service import OwnershipService
from proxy.audit import MemoryAudit
from proxy.config import Config, load_config_text
from proxy.identity.model import AuthError, AuthReason, Identity
from proxy.identity.tokens import TokenValidator
from proxy.services import Services

STORE_KEY = "correct horse battery staple"

USERS: dict[str, Identity] = {
    name: Identity(kind="user", sub=f"sub-{name}", username=name, method="token",
                   roles=frozenset({role}), groups=frozenset(groups))
    for name, role, groups in (("alice", "iot-user", ("lab",)), ("bob", "iot-user", ("lab",)),
                               ("carol", "iot-user", ()), ("admin", "iot-admin", ()))
}


GENEROUS_WRITE_RATE = "  write_rate_per_user: 100000\n  write_burst_per_user: 100000\n"


def ownership_config(tmp_path: Path, *, key: str = STORE_KEY, store: str = "data/ownership.db",
                     extra: str = "", dsn: str | None = None) -> Config:
    """A config whose store lives under ``tmp_path``; the key comes in through ${KEYGATE_STORE_KEY}.
    With ``dsn``: the postgres backend on that database (tests/rig/postgres.py) instead."""
    backend = "" if dsn is None else ", backend: postgres, dsn: '${KEYGATE_STORE_DSN}'"
    text = (
        "oidc: {issuer: 'https://issuer.test/realms/iot'}\n"
        "http: {listen: '127.0.0.1:0', tls: false}\n"
        f"store: {{path: '{store}', key: '${{KEYGATE_STORE_KEY}}'{backend}}}\n"
        "ownership:\n"
        "  advertise_mqtt: mqtts://gw.test:8883\n"
        "  advertise_http: https://gw.test:8443\n"
        "  max_devices_per_user: 5\n"
        "  role_quotas: {iot-admin: 50}\n"
        "  orion_lifecycle: false\n"   # no Orion behind this rig's http.upstream
        # Tests that write in bursts (property tests) are not about the write rate; its own test sets it.
        f"{'' if 'write_' in extra else GENEROUS_WRITE_RATE}"
        f"{extra}"
    )
    env = {"KEYGATE_STORE_KEY": key, **({} if dsn is None else {"KEYGATE_STORE_DSN": dsn})}
    return load_config_text(text, "proxy.yaml", env=env, base_dir=str(tmp_path))


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
        assert services.config.http is not None, "the ownership API is mounted under http"
        self.prefix = services.config.http.api_prefix

    async def identity(self, username: str) -> Identity:
        """The identity the API sees for this user's token."""
        return await self.services.tokens.validate(self.token_for(username))

    async def sub(self, username: str) -> str:
        return (await self.identity(username)).sub

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


async def open_service(config: Config, audit: MemoryAudit | None = None, *, signed_in: bool = True,
                       **kw: Any) -> OwnershipService:
    """The service; with ``signed_in`` the :data:`USERS` have each used it once (so a delegation
    can name them by user name)."""
    service = await OwnershipService.open(config, audit=audit or MemoryAudit(), **kw)
    if signed_in:
        await sign_in(service, USERS.values())
    return service


async def set_quota_override(service: OwnershipService, sub: str, max_devices: int | None) -> None:
    """A per-user device limit as the store keeps one. No route sets it (an operator writes the row), but
    the limit, the export and the erasure all honour it, so tests put one in the store directly."""
    await service._run(service._store.set_quota, sub, max_devices)


async def sign_in(service: OwnershipService, identities: Any) -> None:
    """What an API call by each of ``identities`` records: the user name its sub goes by."""
    for identity in identities:
        await service.remember_user(identity)


@pytest.fixture(params=["sqlcipher", "postgres"])
def store_backend(request) -> str | None:
    """Each backend in turn, for the tests that hold for both: None (SQLCipher, in tmp_path) or
    the dsn of a fresh PostgreSQL database (tests/rig/postgres.py)."""
    if request.param == "sqlcipher":
        return None
    return request.getfixturevalue("pg_dsn")


@pytest.fixture
async def ownership_service(tmp_path, store_backend):
    service = await open_service(ownership_config(tmp_path, dsn=store_backend))
    try:
        yield service
    finally:
        await service.close()


class RigTokens:
    """Access tokens from the OIDC rig, fetched once per user and reused while fresh."""

    _cache: ClassVar[dict[tuple[str, str], tuple[float, str]]] = {}  # shared by every instance, on purpose

    def __init__(self, oidc: Any):
        self.oidc = oidc

    def __call__(self, username: str) -> str:
        key = (self.oidc.issuer, username)
        hit = self._cache.get(key)
        if hit is None or time.monotonic() - hit[0] > 60:
            hit = (time.monotonic(), self.oidc.password_token(username))
            self._cache[key] = hit
        return hit[1]


def rig_config(tmp_path: Path, oidc: Any) -> Config:
    config = ownership_config(tmp_path)
    return dataclasses.replace(config, oidc=oidc.oidc_config())


@pytest.fixture
async def ownership_api(tmp_path, oidc):
    config = rig_config(tmp_path, oidc)
    tokens = TokenValidator(config.oidc)
    await tokens.start()
    try:
        token_for = RigTokens(oidc)
        async with _harness(config, tokens, token_for, signed_in=False) as harness:
            # Every rig user has signed in once, with the provider's own subs.
            await sign_in(harness.ownership, [await tokens.validate(token_for(name)) for name in USERS])
            yield harness
    finally:
        await tokens.close()


@pytest.fixture
async def ownership_api_table(tmp_path):
    tokens = TableTokens()
    async with _harness(ownership_config(tmp_path), tokens, tokens.token) as harness:
        yield harness


@contextlib.asynccontextmanager
async def _harness(config: Config, tokens: Any, token_for: Callable[[str], str], *, signed_in: bool = True):
    audit = MemoryAudit()
    service = await open_service(config, audit, signed_in=signed_in)
    services = Services(config=config, tokens=tokens, ownership=service, policies=None, audit=audit)  # type: ignore[arg-type]
    client = TestClient(TestServer(mount(services), host="127.0.0.1"))
    await client.start_server()
    try:
        yield ApiHarness(services, client, token_for)
    finally:
        await client.close()
        await service.close()


class LiveApi:
    """The API on a real port, served from its own thread and event loop, for
    synchronous HTTP clients (schemathesis)."""

    def __init__(self, config: Config, tokens: Callable[[], Any]):
        self.config = config
        self._make_tokens = tokens  # built on the server's loop (its HTTP session lives there)
        self.tokens: Any = None
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="live-api", daemon=True)
        self._runner: web.AppRunner | None = None
        self.service: OwnershipService | None = None

    def __enter__(self) -> LiveApi:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        self.tokens = self._make_tokens()
        await self.tokens.start()
        self.service = await open_service(self.config)
        services = Services(config=self.config, tokens=self.tokens, ownership=self.service, policies=None,  # type: ignore[arg-type]
                            audit=self.service.audit)
        self._runner = web.AppRunner(mount(services))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        assert self.config.http is not None, "the ownership API is mounted under http"
        self.base_url = f"http://127.0.0.1:{port}{self.config.http.api_prefix}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.service is not None:
            await self.service.close()
        if self.tokens is not None:
            await self.tokens.close()
