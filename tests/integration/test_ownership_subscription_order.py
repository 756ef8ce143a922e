"""Changes of one subscription are sent to Orion and recorded one at a time (issue 15, final attack).

Two PATCHes of one subscription whose answers came back in the other order than Orion applied
them left the store naming the first subject and Orion watching the second: deleting the second
device then missed the subscription, which followed the id to its next owner."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from tests.integration.test_http_gateway import _subscribe, subscription
from tests.integration.test_ownership_lifecycle import API, BOUND, register, start_rig, stop_rig, wait_until_settled
from tests.rig.ngsi_standin import NgsiStandin

pytestmark = pytest.mark.integration


class SlowFirstAnswer:
    """Orion applies the PATCH naming ``lc-o1`` at once but answers it only when released."""

    def __init__(self) -> None:
        self.applied = asyncio.Event()
        self.release = asyncio.Event()

        @web.middleware
        async def middleware(request: web.Request, handler):
            body = await request.read() if request.method == "PATCH" else b""
            resp = await handler(request)
            if request.method == "PATCH" and b"lc-o1" in body:
                self.applied.set()
                await self.release.wait()
            return resp

        self.middleware = middleware


@pytest.fixture
async def rig(tmp_path, oidc):
    slow = SlowFirstAnswer()
    standin = NgsiStandin()
    standin.app.middlewares.append(slow.middleware)
    await standin.start()
    session = aiohttp.ClientSession()
    r = await start_rig(standin, tmp_path, oidc, session)
    r.slow = slow
    try:
        yield r
    finally:
        await stop_rig(r)
        await session.close()
        await r.standin.stop()


def patch_to(device: str) -> dict:
    return {"subject": {"entities": [{"id": device, "type": "Thermometer"}]}}


async def test_two_patches_of_a_subscription_leave_the_store_naming_what_orion_watches(rig):
    assert (await register(rig, "alice", id="lc-o1")).status == 201
    assert (await register(rig, "alice", id="lc-o2")).status == 201
    sub = await _subscribe(rig, "alice", subscription("lc-o1"))
    first = asyncio.create_task(rig.call("PATCH", f"/v2/subscriptions/{sub}", "alice", json_body=patch_to("lc-o1")))
    await asyncio.wait_for(rig.slow.applied.wait(), BOUND)
    second = asyncio.create_task(rig.call("PATCH", f"/v2/subscriptions/{sub}", "alice", json_body=patch_to("lc-o2")))
    # Without the ordering the second is applied, answered and recorded while the first's answer waits.
    await asyncio.wait({second}, timeout=1.0)
    rig.slow.release.set()
    assert (await first).status == 204 and (await second).status == 204
    assert rig.standin.tenant("").subscriptions[sub]["subject"]["entities"][0]["id"] == "lc-o2"
    # The promise: deleting the device Orion watches takes the subscription with it.
    assert (await rig.call("DELETE", f"{API}/devices/lc-o2", "alice")).status == 204
    await wait_until_settled(rig)
    assert sub not in rig.standin.tenant("").subscriptions
