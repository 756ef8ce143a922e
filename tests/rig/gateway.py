"""An MQTT gateway in front of the real Mosquitto, with real services, for tests and benchmarks.

Fixtures:

* ``mqtt_rig`` — a started :class:`~proxy.mqtt.server.MqttGateway` (TLS on a
  free port, device certificates accepted) in front of the session's
  ``mosquitto``, users from the real OIDC provider (``oidc``), the test's own
  SQLCipher store (``OwnershipService``), the shipped ``policies/`` and a
  :class:`MemoryAudit`.
* ``mqtt_rig_factory`` — the same with choices:
  ``await mqtt_rig_factory(issuer="factory")`` validates tokens of the
  ``token_factory`` instead (forged, expired, alg none ...); keyword
  arguments override ``mqtt`` config keys (``tls=False``, ``max_packet_size=``,
  ``rate_limit=RateLimitConfig(...)``, ``connect_timeout_seconds=``), plus
  ``websocket=True``, ``policies_dir=`` and ``broker="host:port" | "unix:/path"``.

What a test uses: ``rig.port`` / ``rig.ws_port``, ``await rig.token("alice", ttl=2)``,
``await rig.register_device("alice")`` -> (id, K1, K2), ``await rig.enroll("alice", id)`` -> (cert, key)
of an enrolled device certificate (``rig.pki.device_cert(id)``: CA-signed, not enrolled),
``rig.client_ssl()``, ``rig.audited(action=..., decision=...)``.

Benchmarks use :func:`start_gateway` / :func:`stop_gateway` without pytest:
``issuer=None`` gives stand-in tokens (no token provider needed; every other
part stays real) and ``tls=False`` a plain listener::

    rig = await start_gateway(Path(tmp), "127.0.0.1:1883", tls=False)
    token = await rig.token("alice"); dev, k1, k2 = await rig.register_device("alice")
    ...
    await stop_gateway(rig)
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import MemoryAudit
from proxy.config import Config, MqttConfig, OidcConfig, PoliciesConfig, StoreConfig, TlsConfig
from proxy.identity.model import Identity
from proxy.services import Services
from tests.rig.mqtt_standins import StandinTokens
from tests.rig.pki import Pki, enroll, make_pki

REPO = Path(__file__).resolve().parents[2]
POLICY_DIR = REPO / "policies"

USERS = {"alice": (), "bob": (), "carol": (), "admin": ("iot-admin",)}


@dataclass
class GatewayRig:
    gateway: Any
    services: Services
    pki: Pki
    broker_address: str
    audit: MemoryAudit
    config: Config
    oidc: Any = None                 # the OIDC provider or token factory when real tokens are used
    issuer: str = "standin"          # "oidc", "factory" or "standin"
    host: str = "127.0.0.1"

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def ws_port(self) -> int | None:
        return self.gateway.ws_port

    @property
    def tls(self) -> bool:
        assert self.config.mqtt is not None
        return self.config.mqtt.tls

    # -- who connects
    async def token(self, username: str, *, ttl: int | None = None) -> str:
        """A valid access token for a test user (alice, bob, carol: iot-user; admin: iot-admin),
        from the real OIDC provider, the token factory, or the stand-in, whichever the rig uses."""
        if self.issuer == "oidc":
            return await asyncio.to_thread(self.oidc.password_token, username, ttl=ttl)
        if self.issuer == "factory":
            now = int(time.time())
            return self.oidc.valid(preferred_username=username, sub=f"sub-{username}",
                                   realm_access={"roles": list(USERS[username]) or ["iot-user"]},
                                   resource_access=None, iat=now, exp=now + (ttl or 300))
        assert isinstance(self.services.tokens, StandinTokens)  # neither the OIDC provider nor the factory
        return self.services.tokens.issue(username, roles=USERS[username], ttl=ttl or 300)

    async def identity(self, username: str) -> Identity:
        """The user's identity; they have now signed in (a delegation can name them by user name)."""
        identity = await self.services.tokens.validate(await self.token(username))
        await self.services.ownership.remember_user(identity)
        return identity

    async def register_device(self, owner: str, device_id: str | None = None, **fields: Any
                              ) -> tuple[str, str, str]:
        """Registers a device for ``owner``; returns (device id, K1, K2)."""
        device_id = device_id or f"dev-{secrets.token_hex(4)}"
        _, k1, k2 = await self.services.ownership.register_device(
            await self.identity(owner), {"id": device_id, "type": "Sensor", **fields})
        return device_id, k1, k2

    async def enroll(self, owner: str, device_id: str) -> tuple[Path, Path]:
        """An enrolled certificate for the device (through the ownership service): (cert, key) paths."""
        return await enroll(self.services.ownership, await self.identity(owner), device_id, self.pki.dir)

    def client_ssl(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext | None:
        """A client TLS context trusting the gateway (and presenting ``cert`` if given)."""
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        return ctx

    def audited(self, **match: Any) -> list[dict]:
        self.gateway.audit_writer.drain()  # the MQTT shell writes audit lines off the loop
        return [r for r in self.audit.records if all(r.get(k) == v for k, v in match.items())]


def gateway_config(tmp: Path, broker_address: str, pki: Pki, *, oidc: OidcConfig | None = None,
                   websocket: bool = False, policies_dir: Path = POLICY_DIR, **mqtt: Any) -> Config:
    tls = mqtt.get("tls", True)
    return Config(
        oidc=oidc or OidcConfig(issuer="https://issuer.invalid/realms/iot", leeway_seconds=1.0),
        tls=TlsConfig(cert=str(pki.server_cert), key=str(pki.server_key), client_ca=str(pki.devices_ca),
                      client_ca_key=str(pki.devices_ca_key)),
        mqtt=MqttConfig(**{"listen": "127.0.0.1:0", "upstream": broker_address, "connect_timeout_seconds": 3.0,
                           "websocket_listen": "127.0.0.1:0" if websocket else "", "tls": tls,
                           **{k: v for k, v in mqtt.items() if k != "tls"}}),
        store=StoreConfig(path=str(tmp / "ownership.db"), key=secrets.token_hex(32)),
        policies=PoliciesConfig(dir=str(policies_dir), watch=False),
        base_dir=str(tmp),
    )


async def build_services(config: Config, audit: MemoryAudit, real_tokens: bool) -> Services:
    """The real ownership service and policies; real token validation or the stand-in."""
    from ownership.service import OwnershipService
    from proxy.identity.tokens import TokenValidator
    from proxy.policy import Policies

    tokens: TokenValidator | StandinTokens
    if real_tokens:
        tokens = TokenValidator(config.oidc)
        await tokens.start()
    else:
        tokens = StandinTokens()
    ownership = await OwnershipService.open(config, audit=audit)
    if isinstance(tokens, TokenValidator):
        tokens.observers.append(ownership.saw_identity)  # as proxy/app.py wires them
    policies = Policies.from_dir(config.resolve(config.policies.dir), ownership.facts,
                                 admin_role=config.ownership.admin_role)
    return Services(config=config, tokens=tokens, ownership=ownership, policies=policies, audit=audit)


async def start_gateway(tmp: Path, broker_address: str, *, issuer: Any = None, pki: Pki | None = None,
                        **options: Any) -> GatewayRig:
    """Build services and start a gateway; stop it with :func:`stop_gateway`.

    ``issuer`` is the ``oidc`` provider or the ``token_factory`` (tokens are then validated
    for real, with 1 s leeway so expiry tests stay short), or None for stand-in tokens."""
    from proxy.mqtt.server import MqttGateway

    pki = pki or make_pki(tmp / "pki")
    kind = "standin"
    if issuer is not None:
        kind = "factory" if hasattr(issuer, "alg_none") else "oidc"
        options.setdefault("oidc", issuer.oidc_config(leeway_seconds=1.0))
    config = gateway_config(tmp, broker_address, pki, **options)
    audit = MemoryAudit()
    services = await build_services(config, audit, kind != "standin")
    gateway = MqttGateway(services)
    try:
        await gateway.start()
    except BaseException:
        await services.ownership.close()
        await services.tokens.close()
        raise
    return GatewayRig(gateway, services, pki, broker_address, audit, config, issuer, kind)


async def stop_gateway(rig: GatewayRig) -> None:
    await rig.gateway.stop()
    await rig.services.ownership.close()
    await rig.services.tokens.close()


@pytest.fixture
async def mqtt_rig_factory(tmp_path, mosquitto, request):
    """``await mqtt_rig_factory(issuer="oidc" | "factory", **config overrides)``."""
    rigs: list[GatewayRig] = []

    async def start(issuer: str = "oidc", **options: Any) -> GatewayRig:
        source = request.getfixturevalue("oidc" if issuer == "oidc" else "token_factory")
        rig = await start_gateway(tmp_path / f"gw{len(rigs)}", options.pop("broker", mosquitto.address),
                                  issuer=source, **options)
        rigs.append(rig)
        return rig

    yield start
    for rig in rigs:
        await stop_gateway(rig)


@pytest.fixture
async def mqtt_rig(mqtt_rig_factory):
    """A TLS gateway over the session's Mosquitto, users from the real OIDC provider."""
    return await mqtt_rig_factory()
