"""The Orion stand-in answers like Orion where the gateway's tests rely on it."""

from __future__ import annotations

import re

import pytest

from tests.rig.ngsi_standin import NgsiStandin


@pytest.fixture
async def orion():
    s = NgsiStandin()
    await s.start()
    import aiohttp

    async with aiohttp.ClientSession(base_url=s.url) as session:
        yield session, s
    await s.stop()


async def test_entity_lifecycle_and_error_shapes(orion):
    c, _ = orion
    r = await c.post("/v2/entities", json={"id": "t1", "type": "Thermo", "temp": {"value": 20}})
    assert r.status == 201 and r.headers["Location"] == "/v2/entities/t1?type=Thermo"
    r = await c.post("/v2/entities", json={"id": "t1", "type": "Thermo"})
    assert r.status == 422 and await r.json() == {"error": "Unprocessable", "description": "Already Exists"}
    assert (await c.post("/v2/entities?options=upsert", json={"id": "t1", "temp": {"value": 21}})).status == 204
    assert (await (await c.get("/v2/entities/t1?options=keyValues")).json()) == {"id": "t1", "type": "Thermo",
                                                                                  "temp": 21}
    assert (await (await c.get("/v2/entities/t1/attrs/temp")).json())["type"] == "Number"
    r = await c.get("/v2/entities/nope")
    assert r.status == 404 and (await r.json())["error"] == "NotFound"
    assert (await c.patch("/v2/entities/t1/attrs", json={"other": {"value": 1}})).status == 422
    assert (await c.put("/v2/entities/t1/attrs/temp/value", data="25",
                        headers={"Content-Type": "text/plain"})).status == 204
    assert await (await c.get("/v2/entities/t1/attrs/temp/value")).text() == "25"
    assert (await c.delete("/v2/entities/t1")).status == 204
    assert (await c.post("/v2/entities", json={"type": "T"})).status == 400


async def test_listing_parameters(orion):
    c, _ = orion
    for i in range(5):
        await c.post("/v2/entities", json={"id": f"room-{i}", "type": "Room" if i % 2 else "Hall"})
    r = await c.get("/v2/entities?options=count&limit=2&offset=1")
    assert r.headers["Fiware-Total-Count"] == "5" and [e["id"] for e in await r.json()] == ["room-1", "room-2"]
    assert [e["id"] for e in await (await c.get("/v2/entities?id=room-0,room-3")).json()] == ["room-0", "room-3"]
    assert len(await (await c.get("/v2/entities?idPattern=[13]$")).json()) == 2
    assert len(await (await c.get("/v2/entities?type=Hall")).json()) == 3
    assert (await c.get("/v2/entities?id=a&idPattern=b")).status == 400
    assert (await c.get("/v2/entities?limit=0")).status == 400


async def test_batch_and_query(orion):
    c, _ = orion
    body = {"actionType": "append", "entities": [{"id": "a", "type": "T", "x": {"value": 1}}, {"id": "b", "type": "T"}]}
    assert (await c.post("/v2/op/update", json=body)).status == 204
    assert (await c.post("/v2/op/update", json={"actionType": "update", "entities": [{"id": "zz"}]})).status == 404
    assert (await c.post("/v2/op/update", json={"actionType": "delete", "entities": [{"id": "b"}]})).status == 204
    r = await c.post("/v2/op/query?options=count", json={"entities": [{"idPattern": ".*"}]})
    assert [e["id"] for e in await r.json()] == ["a"] and r.headers["Fiware-Total-Count"] == "1"


async def test_subscriptions_and_tenants(orion):
    c, s = orion
    sub = {"subject": {"entities": [{"id": "a"}]}, "notification": {"http": {"url": "http://x/"}}}
    r = await c.post("/v2/subscriptions", json=sub, headers={"Fiware-Service": "City"})
    assert r.status == 201 and re.fullmatch(r"/v2/subscriptions/[0-9a-f]{24}", r.headers["Location"])
    sid = r.headers["Location"].rsplit("/", 1)[1]
    assert (await c.get(f"/v2/subscriptions/{sid}")).status == 404          # default tenant: not there
    assert (await c.get(f"/v2/subscriptions/{sid}", headers={"Fiware-Service": "city"})).status == 200
    assert s.recorded[-1].headers["Fiware-Service"] == "city"
    assert (await (await c.get("/version")).json())["orion"]["version"]
