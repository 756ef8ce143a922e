"""A refusal sent to a client that is still sending reaches it: the gateway closes its side
after the answer (FIN) and drops what the client still sends for a short while, instead of
closing with unread input, which answers with a TCP reset and makes the client's system
drop the refusal."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from proxy.config import MqttLimitsConfig
from proxy.mqtt import codec
from tests.integration.mqtt_helpers import connack_reason
from tests.rig.mqtt_clients import RawClient

pytestmark = pytest.mark.integration

OPEN = MqttLimitsConfig(unauthenticated_per_address=0, unauthenticated_rate_per_address=0)
# A v5 CONNECT announcing 1 MiB: refused at its header (CONNACK 0x95) while its body still comes.
HEAD = b"\x10" + codec.encode_varint(1 << 20) + b"\x00\x04MQTT\x05\x02\x00\x1e"


async def _refusal_while_sending(rig) -> int | None:
    c = await RawClient.open(rig)

    async def keep_sending() -> None:
        try:
            for _ in range(64):
                c.writer.write(b"\x00" * 16384)
                await c.writer.drain()
        except (OSError, ssl.SSLError):
            pass

    c.writer.write(HEAD + b"\x00" * 65536)
    sender = asyncio.ensure_future(keep_sending())
    try:
        pkt = await c.read_packet()
    except (OSError, ssl.SSLError):
        pkt = None
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    await c.close()
    return None if pkt is None else connack_reason(pkt)


@pytest.mark.parametrize("tls", [False, True])
async def test_a_refusal_reaches_a_client_that_keeps_sending(mqtt_rig_factory, tls):
    rig = await mqtt_rig_factory(tls=tls, limits=OPEN)
    answers = [await _refusal_while_sending(rig) for _ in range(10)]
    print(f"\nMEASURED refusals received while sending ({'TLS' if tls else 'plain'}): "
          f"{answers.count(0x95)} of {len(answers)}")
    assert answers == [0x95] * 10
