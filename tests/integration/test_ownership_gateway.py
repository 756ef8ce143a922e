"""End to end: what the ownership API changes is in force on the MQTT gateway at
once, for connections already open (real Mosquitto, real tokens, real store)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ownership.service import OwnershipService
from tests.integration.mqtt_helpers import Sentinel, raw_connect
from tests.rig.mqtt_clients import V5, Paho
from tests.rig.ownership import mount

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(mqtt_rig):
    assert isinstance(mqtt_rig.services.ownership, OwnershipService)  # the real store, not a stand-in
    client = TestClient(TestServer(mount(mqtt_rig.services), host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def call(api, rig, method: str, path: str, user: str, json=None):
    headers = {"Authorization": f"Bearer {await rig.token(user)}"}
    return await api.request(method, f"/api/v1{path}", json=json, headers=headers)


async def flows(rig, sentinel: Sentinel, dev: str, key: str, payload: bytes) -> bool:
    """Whether the device's QoS 1 message reaches the subscriber (before the sentinel after it)."""
    device = Paho(rig, dev, username=dev, password=key)
    assert await device.connect() == 0
    await device.publish(f"devices/{dev}/telemetry", payload, qos=1)
    await device.close()
    return any(m.payload == payload for m in await sentinel.received())


async def test_api_registration_delegation_and_revocation_on_a_live_connection(mqtt_rig, api):
    rig = mqtt_rig
    r = await call(api, rig, "POST", "/devices", "alice", {"id": "api-dev-1", "type": "Sensor"})
    assert r.status == 201
    k1 = (await r.json())["k1"]
    await rig.identity("bob")  # bob has signed in once: "bob" resolves to his sub
    r = await call(api, rig, "POST", "/devices/api-dev-1/delegations", "alice", {"to": "bob", "permission": "read"})
    assert r.status == 201
    grant = await r.json()
    bob = Paho(rig, "bob-api-live", username="bob", password=await rig.token("bob"))
    assert await bob.connect() == 0
    assert await bob.subscribe("devices/api-dev-1/telemetry", 1) == [1]
    sentinel = await Sentinel.of(rig, bob, "bob")
    assert await flows(rig, sentinel, "api-dev-1", k1, b"granted")
    r = await call(api, rig, "DELETE", f"/devices/api-dev-1/delegations/{grant['id']}", "alice")
    assert r.status == 204
    assert not await flows(rig, sentinel, "api-dev-1", k1, b"revoked")
    assert bob.is_connected()
    await bob.close()


async def test_api_key_rotation_reaches_the_gateway(mqtt_rig, api):
    rig = mqtt_rig
    r = await call(api, rig, "POST", "/devices", "alice", {"id": "api-dev-2", "type": "Sensor"})
    body = await r.json()
    r = await call(api, rig, "POST", "/devices/api-dev-2/keys/k1", "alice")
    new_k1 = (await r.json())["key"]
    for key, expected in ((body["k1"], 0x86), (body["k2"], 0), (new_k1, 0)):
        raw, code = await raw_connect(rig, V5, "api-dev-2", "api-dev-2", key)
        assert code == expected
        await raw.close()
