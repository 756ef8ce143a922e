"""A flood of denied requests through the real MQTT gateway cannot fill the disk with audit lines.

The rigs keep audit records in memory; here the gateway writes a real audit log (``AuditLog`` on a
file, as ``keygate serve`` does) and the test measures what 10,000 refusals cost on disk.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest

from proxy.audit import AuditLog
from proxy.config import RateLimitConfig
from proxy.mqtt.packets import MQTT_5
from tests.integration.mqtt_helpers import raw_connect, suback_reasons, subscribe_packet
from tests.rig.gateway import GatewayRig, build_services, gateway_config
from tests.rig.mqtt_clients import V5
from tests.rig.pki import make_pki

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87
FLOOD = 10_000
FOLD_SECONDS = 0.25  # short, so the flood spans several windows
MAX_FIELD_BYTES = 256


@pytest.fixture
async def filed_rig(tmp_path, mosquitto):
    """The MQTT gateway over the session's Mosquitto, auditing to a file; stand-in tokens."""
    from proxy.mqtt.server import MqttGateway

    pki = make_pki(tmp_path / "pki")
    # A rate limit above the flood: what is measured here is the audit log, not the rate limiter
    # (which would refuse most of these SUBSCRIBEs first, and audit them folded too).
    config = gateway_config(tmp_path, mosquitto.address, pki,
                            rate_limit=RateLimitConfig(messages_per_second=1e6, burst=2 * FLOOD))
    path = tmp_path / "audit.log"
    audit = AuditLog.open(str(path), max_field_bytes=MAX_FIELD_BYTES, fold_seconds=FOLD_SECONDS)
    services = await build_services(config, audit, False)
    gateway = MqttGateway(services)
    await gateway.start()
    rig = GatewayRig(gateway, services, pki, mosquitto.address, audit, config)
    try:
        yield rig, path
    finally:
        await gateway.stop()
        await services.ownership.close()
        await services.tokens.close()
        audit.close()


async def test_ten_thousand_identical_denied_subscribes_fold_into_a_few_bounded_lines(filed_rig):
    rig, path = filed_rig
    # A filter bob may not have, longer than a field may be in the log.
    topic_filter = "devices/not-bobs/" + "x" * 900
    raw, code = await raw_connect(rig, V5, "bob-flood", "bob", await rig.token("bob"))
    assert code == 0
    before = path.stat().st_size

    async def read_subacks() -> list[int]:
        codes: list[int] = []
        while len(codes) < FLOOD:
            pkt = await raw.read_packet(timeout=20)
            assert pkt is not None and pkt[0] == 0x90, pkt
            codes.extend(suback_reasons(pkt, MQTT_5))
        return codes

    started = time.monotonic()
    reader = asyncio.create_task(read_subacks())
    for start in range(0, FLOOD, 500):
        await raw.send(b"".join(subscribe_packet(MQTT_5, 1 + (i % 65535), (topic_filter, 1))
                                for i in range(start, start + 500)))
    codes = await asyncio.wait_for(reader, 60)
    seconds = time.monotonic() - started
    assert codes == [NOT_AUTHORIZED] * FLOOD
    await raw.close()
    await rig.gateway.stop()
    rig.audit.close()  # what is still being counted is written now

    lines = path.read_bytes()[before:].splitlines()
    records = [json.loads(line) for line in lines]
    flood = [r for r in records if r["action"] == "subscribe" and r["decision"] == "deny"]
    refused = sum(r.get("repeated", 1) for r in flood)
    written = sum(len(line) + 1 for line in lines)
    longest = max(len(line) + 1 for line in lines)
    # Each window writes the first denial at once and one line with the count when it ends.
    windows = math.ceil(seconds / FOLD_SECONDS) + 1
    bound = 2 * windows * rig.audit.max_record_bytes + 4 * rig.audit.max_record_bytes  # + connect/close lines
    first = flood[0]
    unbounded = FLOOD * (len(lines[0]) + len(topic_filter) - len(first["resource"]))  # one whole line each
    print(f"\n{FLOOD} denied SUBSCRIBEs of a {len(topic_filter)}-byte filter in {seconds:.2f} s: "
          f"{len(flood)} audit lines, {written} bytes on disk (bound {bound}; a line each, uncut: {unbounded}); "
          f"longest line {longest} bytes (bound {rig.audit.max_record_bytes})")
    assert refused == FLOOD
    assert len(flood) <= 2 * windows
    assert written <= bound
    assert longest <= rig.audit.max_record_bytes
    assert first["resource_bytes"] == len(topic_filter) and first["identity"]["username"] == "bob"
    assert first["client_id"].endswith("bob-flood") and first["peer"]
    assert all(r["peer"] == first["peer"] and r["resource"] == first["resource"] for r in flood)
