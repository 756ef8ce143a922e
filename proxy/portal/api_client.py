"""The portal's calls to the ownership API, in process: no rule is written twice.

The portal answers people, the API answers programs; every decision (who may
see a device, what a valid id is, quotas, delegations, erasure) is the API's.
So the portal calls the API itself, with the signed-in person's access token,
over a private Unix socket (a folder only this process may enter) served by a
second instance of :func:`ownership.api.create_api_app`: the same handlers,
the same token check, the same audit lines as a call from outside. Nothing of
it is reachable from the network.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.services import Services


@dataclass(frozen=True)
class ApiAnswer:
    status: int
    body: Any               # the decoded JSON, or None
    raw: bytes
    headers: dict[str, str]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def error_code(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("code", ""))
        return ""

    @property
    def error_message(self) -> str:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("message", ""))
        return ""


class ApiClient:
    """``await start()``, ``await call(token, method, path, json=...)``, ``await stop()``."""

    def __init__(self, services: Services):
        self._services = services
        self._dir: Path | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        from ownership.api import create_api_app

        self._dir = Path(tempfile.mkdtemp(prefix="keygate-portal-"))   # mode 0700: ours alone
        socket_path = str(self._dir / "api.sock")
        self._runner = web.AppRunner(create_api_app(self._services), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.UnixSite(self._runner, socket_path).start()
        self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path),
                                              timeout=aiohttp.ClientTimeout(total=60))

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._dir)
            self._dir = None

    async def call(self, token: str, method: str, path: str, *, body: Any = None, raw: bytes | None = None,
                   content_type: str | None = None, query: dict[str, str] | None = None) -> ApiAnswer:
        if self._session is None:
            raise RuntimeError("the portal's API client is not started")
        headers = {"Authorization": f"Bearer {token}"}
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif raw is not None:
            data = raw
            headers["Content-Type"] = content_type or "application/octet-stream"
        # The host part is ignored on a Unix socket; the path (already quoted) is the API's own (mounted at /).
        async with self._session.request(method, URL(f"http://keygate{path}", encoded=True), data=data,
                                         headers=headers, params=query) as answer:
            content = await answer.read()
            decoded: Any = None
            if answer.content_type == "application/json" and content:
                with contextlib.suppress(ValueError):
                    decoded = json.loads(content)
            return ApiAnswer(answer.status, decoded, content, dict(answer.headers))
