"""The HTTP gateway's test rig: the NGSI stand-in, the gateway in front of it, and callers.

Each caller is a real credential: an access token from the test OIDC provider for
alice, bob, carol (iot-user), admin (iot-admin) and the iot-backend service account,
a device key from the ownership service, or nothing.
Requests go over real sockets; ``raw()`` writes the request line by hand so
path tricks reach the gateway exactly as an attacker would spell them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.audit import MemoryAudit
from proxy.config import load_config_text
from proxy.http.gateway import HttpGateway
from proxy.services import Services
from tests.rig.ngsi_standin import NgsiStandin

ROOT = Path(__file__).resolve().parents[2]
USERS = ("alice", "bob", "carol", "admin")   # iot-user, iot-user, iot-user, iot-admin


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HttpRig:
    standin: NgsiStandin
    gateway: HttpGateway
    services: Services
    tokens: dict[str, str]
    session: aiohttp.ClientSession
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    @property
    def audit(self) -> MemoryAudit:
        return self.services.audit  # type: ignore[return-value]

    def auth(self, who: str | None) -> dict[str, str]:
        if who is None:
            return {}
        if who in self.tokens:
            return {"Authorization": f"Bearer {self.tokens[who]}"}
        k1, _ = self.keys[who]
        return {"Authorization": "Basic " + base64.b64encode(f"{who}:{k1}".encode()).decode()}

    async def call(self, method: str, path: str, who: str | None = None, *, json_body: Any = None,
                   data: Any = None, headers: dict[str, str] | None = None) -> Reply:
        h = {**self.auth(who), **(headers or {})}
        async with self.session.request(method, self.url + path, json=json_body, data=data, headers=h,
                                        allow_redirects=False) as r:
            return Reply(r.status, dict(r.headers), await r.read())

    async def raw(self, request_head: str, body: bytes = b"") -> Reply:
        """Send bytes as written (request line and headers, CRLF added), read the reply."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.gateway.port)
        try:
            writer.write(request_head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        return Reply(int(lines[0].split()[1]), headers, rest)

    def upstream_saw(self, method: str | None = None, path: str | None = None) -> list:
        return [r for r in self.standin.recorded
                if (method is None or r.method == method) and (path is None or r.path == path)]

    def seed(self, entity_id: str, etype: str = "Thermometer", service: str = "", **attrs: Any) -> None:
        ent: dict[str, Any] = {"id": entity_id, "type": etype}
        for k, v in (attrs or {"temperature": 21.5}).items():
            ent[k] = {"type": "Number" if isinstance(v, (int, float)) else "Text", "value": v, "metadata": {}}
        self.standin.tenant(service).entities[entity_id] = ent


def gateway_config(upstream: str, tmp: Path, *, tls: dict[str, str] | None = None, **http: Any) -> Any:
    http_yaml = {"listen": "127.0.0.1:0", "tls": tls is not None, "upstream": upstream, "max_body_bytes": 4096,
                 "upstream_timeout_seconds": 2, **http}
    text = json.dumps({
        "oidc": {"issuer": "http://127.0.0.1:1/realms/iot"},
        "http": http_yaml,
        "tls": tls or {},
        "store": {"path": str(tmp / "ownership.db"), "key": "${KEYGATE_TEST_STORE_KEY}"},
    })
    return load_config_text(text, env={"KEYGATE_TEST_STORE_KEY": "http-gateway-test-key"})


async def build_services(config: Any, oidc: Any) -> tuple[Services, dict[str, str]]:
    """The real parts: token validator against the test OIDC provider, the SQLCipher ownership
    service, the shipped policies. Returns the services and a fresh access token per caller."""
    from ownership.service import OwnershipService
    from proxy.identity.tokens import TokenValidator
    from proxy.policy import Policies

    audit = MemoryAudit()
    tokens = TokenValidator(oidc.oidc_config())
    await tokens.start()
    ownership = None
    try:
        ownership = await OwnershipService.open(config, audit=audit)
        policies = Policies.from_dir(ROOT / "policies", ownership.facts, admin_role=config.ownership.admin_role)
    except BaseException:
        if ownership is not None:
            await ownership.close()
        await tokens.close()
        raise
    tokens.observers.append(ownership.saw_identity)  # as proxy/app.py wires them
    issued = access_tokens(oidc)
    for token in issued.values():  # every caller has signed in once
        await ownership.remember_user(await tokens.validate(token))
    return Services(config=config, tokens=tokens, ownership=ownership, policies=policies, audit=audit), issued


_issued: dict[int, tuple[float, dict[str, str]]] = {}
TOKEN_REUSE_SECONDS = 120.0   # the provider's tokens live 300 s


def access_tokens(oidc: Any) -> dict[str, str]:
    """One token per caller, reused for a while: the password grant is the slow part of a test."""
    at, issued = _issued.get(id(oidc), (0.0, {}))
    if time.monotonic() - at > TOKEN_REUSE_SECONDS:
        issued = {name: oidc.password_token(name) for name in USERS}
        issued["backend"] = oidc.client_token("iot-backend")   # a service account that owns nothing
        _issued[id(oidc)] = (time.monotonic(), issued)
    return dict(issued)


async def close_services(services: Services) -> None:
    await services.ownership.close()
    await services.tokens.close()


@contextlib.asynccontextmanager
async def gateway_with(tmp: Path, oidc: Any, upstream: str | None = None, **http: Any):
    """A stand-in (unless ``upstream`` is given) and a gateway with these ``http`` settings;
    yields (stand-in or None, gateway, services, tokens)."""
    standin = None
    if upstream is None:
        standin = NgsiStandin()
        await standin.start()
        upstream = standin.url
    services, tokens = await build_services(gateway_config(upstream, tmp, **http), oidc)
    gateway = HttpGateway(services)
    try:
        await gateway.start()
        yield standin, gateway, services, tokens
    finally:
        await gateway.stop()
        await close_services(services)
        if standin is not None:
            await standin.stop()
