"""Before the WebSocket upgrade exactly one request is taken: the outside attack (issue 14)
pipelined a non-upgrade request whose "body" the guard read as frames while aiohttp answered
404 and parsed the next request, so a later 1 MB message passed the pre-authentication budget.
A malformed head (LF-only) is answered 400 and closed, with no traceback in the log."""

from __future__ import annotations

import asyncio
import base64
import logging
import os

import pytest

from proxy.config import MqttLimitsConfig

pytestmark = pytest.mark.integration
OPEN = MqttLimitsConfig(unauthenticated_per_address=0, unauthenticated_rate_per_address=0)
SKIP_ALL = b"\x83\xff" + (1 << 62).to_bytes(8, "big") + b"\0\0\0\0"  # a reserved opcode, a huge length


def upgrade(sep: bytes = b"\r\n") -> bytes:
    key = base64.b64encode(os.urandom(16))
    lines = [b"GET /mqtt HTTP/1.1", b"Host: x", b"Upgrade: websocket", b"Connection: Upgrade",
             b"Sec-WebSocket-Key: " + key, b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Protocol: mqtt"]
    return sep.join(lines) + sep + sep


async def _answer(rig, data: bytes) -> bytes:
    """Everything the gateway sends back before it closes (it must close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.ws_port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def _refused(rig, reason: str) -> int:
    """Refusals for ``reason`` in the folded audit lines."""
    return sum(line.get("counts", {}).get(reason, line["count"] if line["reason"] == reason else 0)
               for line in rig.audited(action="connect", decision="deny"))


async def test_a_pipelined_first_request_is_refused_and_closed(mqtt_rig_factory):
    rig = await mqtt_rig_factory(websocket=True, tls=False, limits=OPEN)
    req1 = b"GET /nope HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SKIP_ALL) + SKIP_ALL
    big = b"\x82\xff" + (1_000_000).to_bytes(8, "big") + b"\0\0\0\0" + b"\x10" * 1000
    answer = await _answer(rig, req1 + upgrade() + big)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
    assert b"101" not in answer.split(b"\r\n", 1)[1]  # one answer, no upgrade
    audited = rig.audited(action="connect", reason="upgrade_request_invalid")
    assert audited and audited[-1].get("problem") == "not an MQTT path"
    # an upgrade with frames sent before its 101: closed unanswered
    answer = await _answer(rig, upgrade() + big)
    assert b"HTTP/1.1 101" not in answer
    rig.gateway._report_refusals(everything=True)  # (folded per address into a later line)
    assert _refused(rig, "upgrade_request_pipelined") == 1
    # a valid upgrade that aiohttp refuses (no key): 400, and the connection closes (no second request)
    head = upgrade().replace(b"Sec-WebSocket-Key", b"X-Key")
    answer = await _answer(rig, head)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:80]


async def test_a_malformed_head_is_answered_400_without_a_traceback(mqtt_rig_factory, caplog):
    caplog.set_level(logging.WARNING)
    rig = await mqtt_rig_factory(websocket=True, tls=False, limits=OPEN)
    for head in (upgrade(b"\n"), b"GARBAGE\r\n\r\n", b"GET /mqtt HTTP/1.1\rX: y\r\n\r\n"):
        answer = await _answer(rig, head)
        assert answer.startswith(b"HTTP/1.1 400"), (head, answer[:80])
    rig.gateway._report_refusals(everything=True)  # (folded per address: one line, the counts)
    assert _refused(rig, "upgrade_request_invalid") == 3
    assert len(rig.audited(action="connect", decision="deny")) < 3
    bad = [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
    assert not bad, [rec.getMessage() for rec in bad]


async def test_aiohttp_itself_refuses_a_large_message_before_the_connack(mqtt_rig_factory, monkeypatch):
    """The second layer: with the guard's frame check switched off, aiohttp's own reader (made
    with the pre-authentication limit) still refuses the message at its header (close 1009)."""
    from proxy.mqtt.wsguard import PreauthGuard

    monkeypatch.setattr(PreauthGuard, "_frame_header", lambda self, header: None)
    rig = await mqtt_rig_factory(websocket=True, tls=False, limits=OPEN)
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.ws_port)
    writer.write(upgrade())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    size = rig.config.mqtt.limits.connect_max_bytes + 1
    writer.write(b"\x82\xff" + size.to_bytes(8, "big") + b"\0\0\0\0" + b"\x10" * 100)
    answer = await asyncio.wait_for(reader.read(), 10)  # closed, the payload unread
    writer.close()
    assert answer.startswith(b"\x88\x02\x03\xf1"), answer[:16]  # close 1009 (message too big)
