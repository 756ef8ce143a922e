"""Which devices are connected now and when each was last seen (what the portal shows)."""

from proxy.mqtt.presence import DevicePresence


def test_connected_while_any_session_is_up_and_last_seen_at_the_last_change():
    now = [100.0]
    presence = DevicePresence(clock=lambda: now[0])
    assert not presence.connected("d1") and presence.last_seen("d1") is None
    presence.up("d1", 1)
    presence.up("d1", 1)   # the gateway reports every state change: counted once
    presence.up("d1", 2)
    now[0] = 200.0
    presence.down("d1", 1)
    assert presence.connected("d1") and presence.last_seen("d1") == 200.0
    now[0] = 300.0
    presence.down("d1", 2)
    assert not presence.connected("d1") and presence.last_seen("d1") == 300.0
    presence.down("d1", 3)   # a session never reported up changes nothing
    assert presence.last_seen("d1") == 300.0


def test_last_seen_is_bounded_oldest_first():
    presence = DevicePresence(max_devices=2)
    for name in ("a", "b", "c"):
        presence.up(name, 1)
        presence.down(name, 1)
    assert presence.last_seen("a") is None and presence.last_seen("c") is not None
