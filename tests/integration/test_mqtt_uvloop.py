"""The same gateway on uvloop (what ``keygate serve`` installs): TLS, BufferedProtocol on both
sides, the shared receive buffer, timers and the WebSocket listener all work on either loop."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from tests.integration.mqtt_helpers import raw_connect
from tests.rig.gateway import start_gateway, stop_gateway
from tests.rig.mqtt_clients import V5, V311, Paho, RawClient, mosquitto_pub, mosquitto_sub

pytestmark = pytest.mark.integration


async def _exercise(rig) -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    dev, k1, _ = await rig.register_device("alice")
    sub = await mosquitto_sub(rig, f"devices/{dev}/telemetry", qos=1, username="alice",
                              password=await rig.token("alice"), client_id="alice-uv")
    try:
        for version in (V311, V5):
            status, err = await mosquitto_pub(rig, f"devices/{dev}/telemetry", f"uv-{version}", qos=1,
                                              username=dev, password=k1, client_id=dev, version=version)
            assert status == 0, err
            assert await sub.line() == f"devices/{dev}/telemetry uv-{version}"
    finally:
        await sub.stop()
    ws = Paho(rig, "alice-uv-ws", username="alice", password=await rig.token("alice"), port=rig.ws_port,
              transport="websockets")
    ws.c.ws_set_options(path="/mqtt")
    assert await ws.connect() == 0
    assert await ws.subscribe(f"devices/{dev}/telemetry", 0) == [0]
    await ws.close()
    raw, code = await raw_connect(rig, V5, "bob-uv", "bob", "not-a-token")
    assert code == 0x86
    await raw.close()
    # The CONNECT deadline timer fires on uvloop too.
    silent = await RawClient.open(rig)
    assert await silent.closed_within(3)
    await silent.close()


def test_runs_on_uvloop(mosquitto, oidc, tmp_path):
    async def main() -> None:
        rig = await start_gateway(tmp_path, mosquitto.address, issuer=oidc, websocket=True,
                                  connect_timeout_seconds=1.0)
        try:
            await _exercise(rig)
        finally:
            await stop_gateway(rig)

    uvloop.run(main())
