"""The few NGSI-v2 calls the ownership service makes to Orion itself.

Registration asks whether an id is already an entity in the tenant the device
would live in; deletion removes the device's entity and the subscriptions on
it. Each answer is one of three: yes, no, or "Orion did not say"
(:class:`OrionUnavailable`): a refused connection, a timeout, or a status that
means neither. Callers never guess on the third.

Entity ids are sent percent-encoded, the tenant as ``Fiware-Service`` (none
for the default tenant). Queries send no ``Fiware-ServicePath``, so Orion looks
at every service path (``/#``); a deletion, which without the header would act
on ``/`` only, is sent once per entity under the path Orion reports for it
(the ``servicePath`` builtin attribute).
"""

from __future__ import annotations

import re
import ssl
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

_SAFE = "!$*+,-.:@[]^_`{|}~"   # Orion's id characters that need no escaping in a path segment
_MAX_TYPES = 100                # entities sharing one id (types, service paths), deleted one by one
# Orion's service path grammar: absolute, up to 10 levels of 1-50 alphanumerics or underscores.
_SERVICE_PATH = re.compile(r"/|(/[A-Za-z0-9_]{1,50}){1,10}")


def _service_path_of(entity: dict[str, Any]) -> str | None:
    """The ``servicePath`` builtin of a listed entity (normalised form), None when it is not one."""
    attr = entity.get("servicePath")
    value = attr.get("value") if isinstance(attr, dict) else None
    if not isinstance(value, str):
        return None
    value = value.rstrip("/") or "/"
    return value if _SERVICE_PATH.fullmatch(value) else None


class OrionUnavailable(Exception):
    """Orion could not be asked, or gave an answer that is neither yes nor no."""


class OrionClient:
    def __init__(self, base_url: str, *, timeout_seconds: float, ssl_context: ssl.SSLContext | None = None):
        self.base = base_url.rstrip("/")
        self.timeout_seconds = timeout_seconds
        # An https:// Orion's: proxy.tls.upstream_context (None: aiohttp's default, the system's store).
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on first use, inside the running loop
            self._session = aiohttp.ClientSession(timeout=self._timeout, skip_auto_headers=("User-Agent",),
                                                  connector=aiohttp.TCPConnector(ssl=self._ssl or True))
        return self._session

    async def _call(self, method: str, path: str, tenant: str, query: str = "",
                    service_path: str = "") -> tuple[int, Any]:
        url = URL(self.base + path + (f"?{query}" if query else ""), encoded=True)
        headers = {"Fiware-Service": tenant} if tenant else {}
        if service_path:
            headers["Fiware-ServicePath"] = service_path
        try:
            async with self._client().request(method, url, headers=headers, allow_redirects=False) as r:
                body = await r.json(content_type=None) if method == "GET" and r.status == 200 else None
                return r.status, body
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise OrionUnavailable(f"Orion at {self.base} cannot be reached ({type(exc).__name__})") from None

    @staticmethod
    def _entity_path(entity_id: str) -> str:
        return "/v2/entities/" + quote(entity_id, safe=_SAFE)

    async def entity_exists(self, entity_id: str, tenant: str) -> bool:
        # attrs=dateCreated: a builtin, so the answer stays small whatever the entity holds.
        status, _ = await self._call("GET", self._entity_path(entity_id), tenant, "attrs=dateCreated")
        if status == 200 or status == 409:   # 409: several entities share the id (different types)
            return True
        if status == 404:
            return False
        raise OrionUnavailable(f"Orion answered {status} when asked for entity {entity_id!r}")

    async def delete_entity(self, entity_id: str, tenant: str) -> None:
        """Remove every entity with this id in the tenant, under every type and service path it lives
        in; returns once Orion has none left, else raises (the removal is then owed and retried).

        A deletion without ``Fiware-ServicePath`` acts on ``/`` only, while the existence check (a
        query) looks at ``/#``: so the entities are listed first with the ``servicePath`` builtin
        attribute, each is deleted under its own path and type, and the id is looked up again."""
        pattern = quote("^" + re.escape(entity_id) + "$", safe="")
        status, found = await self._call("GET", "/v2/entities", tenant,
                                         f"idPattern={pattern}&attrs=servicePath&limit={_MAX_TYPES}")
        if status != 200 or not isinstance(found, list):
            raise OrionUnavailable(f"Orion answered {status} when listing the entities with id {entity_id!r}")
        for entity in found:
            if not isinstance(entity, dict) or entity.get("id") != entity_id or \
                    not isinstance(entity.get("type"), str):
                continue
            etype, path = entity["type"], _service_path_of(entity)
            if path is None:
                raise OrionUnavailable(f"Orion gave entity {entity_id!r} no usable servicePath")
            status, _ = await self._call("DELETE", self._entity_path(entity_id), tenant,
                                         "type=" + quote(etype, safe=_SAFE), service_path=path)
            if status not in (200, 204, 404):
                raise OrionUnavailable(f"Orion answered {status} to deleting entity {entity_id!r} ({etype}, {path})")
        # Also what a write still on its way created meanwhile, or what lay past the listing's limit.
        if await self.entity_exists(entity_id, tenant):
            raise OrionUnavailable(f"entity {entity_id!r} is still in Orion after its deletion")

    async def delete_subscription(self, subscription_id: str, tenant: str) -> None:
        status, _ = await self._call("DELETE", "/v2/subscriptions/" + quote(subscription_id, safe=""), tenant)
        if status not in (200, 204, 404):
            raise OrionUnavailable(f"Orion answered {status} to deleting subscription {subscription_id!r}")
