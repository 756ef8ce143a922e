"""Authorization holes in the MQTT gateway, each shown against the real Mosquitto.

Real broker behind, the real OIDC provider's tokens, the real store, the shipped
policies, and the ownership API mounted on the gateway's own services (what it
changes is what the gateway sees). Each test makes the attacker's (or the
owner's) move and asserts what must happen instead of what the broker alone
would do:

1. ``UNSUBSCRIBE #`` and ``SUBSCRIBE #`` in one write: the broker's UNSUBACK
   must not make the gateway forget the checks of the new ``#``.
2. A Will whose write delegation was revoked is not published when the
   connection drops.
3. A delegation that simply expires stops deliveries on an exact, already
   granted subscription.
4. Deleting a device closes its connections and clears its retained messages;
   rotating a key closes the connections that used the old key; only an
   enrolled certificate authenticates its device.
5. Topic Alias 0 is "Topic Alias invalid" (MQTT 5.0 §3.3.2.3.4), not a
   protocol error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import ssl
import struct
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.mqtt.codec import encode_subscribe, encode_unsubscribe
from proxy.mqtt.packets import MQTT_5, MQTT_311, Prop, Subscribe, Subscription, Unsubscribe, Will
from tests.integration.mqtt_helpers import (
    Sentinel,
    connack_reason,
    connect_packet,
    eventually,
    publish_packet,
    raw_connect,
)
from tests.rig.mqtt_clients import V5, V311, Paho, RawClient
from tests.rig.ownership import mount

pytestmark = pytest.mark.integration

DISCONNECT = 0xE0
ADMINISTRATIVE_ACTION = 0x98
TOPIC_ALIAS_INVALID = 0x94
LEVELS = {V311: MQTT_311, V5: MQTT_5}
TIMEOUT = object()  # read_or_timeout: nothing arrived in time, the connection is still open


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def api(mqtt_rig):
    """The ownership API over the gateway's own services, on a real local port."""
    client = TestClient(TestServer(mount(mqtt_rig.services), host="127.0.0.1"))
    client.registered = []  # (owner, device id): deleted at the end, which clears them at the broker
    await client.start_server()
    try:
        yield client
    finally:
        # The broker is shared by the whole run: leave no retained message behind for other tests.
        for owner, device_id in client.registered:
            await call(client, mqtt_rig, "DELETE", f"/devices/{device_id}", owner)
        await client.close()


async def call(api, rig, method: str, path: str, user: str, json_body=None, **kw):
    headers = {"Authorization": f"Bearer {await rig.token(user)}", **kw.pop("headers", {})}
    return await api.request(method, f"/api/v1{path}", json=json_body, headers=headers, **kw)


async def register(api, rig, owner: str, device_id: str | None = None) -> tuple[str, str, str]:
    device_id = device_id or f"hole-{secrets.token_hex(4)}"
    r = await call(api, rig, "POST", "/devices", owner, {"id": device_id, "type": "Sensor"})
    assert r.status == 201, await r.text()
    api.registered.append((owner, device_id))
    body = await r.json()
    return device_id, body["k1"], body["k2"]


async def delegate(api, rig, owner: str, dev: str, to: str, permission: str, expires_at: float | None = None):
    if to != "anonymous" and not to.startswith("group:"):
        await rig.identity(to)  # the delegate has signed in once: a user name resolves to their sub
    body = {"to": to, "permission": permission}
    if expires_at is not None:
        body["expires_at"] = dt.datetime.fromtimestamp(expires_at, dt.UTC).isoformat().replace(
            "+00:00", "Z")
    r = await call(api, rig, "POST", f"/devices/{dev}/delegations", owner, body)
    assert r.status == 201, await r.text()
    return await r.json()


async def read_or_timeout(c: RawClient, timeout: float):
    """The next whole packet, None when the gateway closed the connection, TIMEOUT otherwise."""
    try:
        return await c.read_packet(timeout)
    except TimeoutError:
        return TIMEOUT


def publish_fields(pkt: bytes, level: int) -> tuple[str, bytes, bool]:
    """(topic, payload, retain) of a whole PUBLISH packet as read by RawClient."""
    i = 1
    while pkt[i] & 0x80:
        i += 1
    i += 1
    (tlen,) = struct.unpack_from(">H", pkt, i)
    topic = pkt[i + 2:i + 2 + tlen].decode()
    i += 2 + tlen
    if (pkt[0] >> 1) & 3:
        i += 2
    if level == MQTT_5:
        plen, shift = 0, 0
        while True:
            b = pkt[i]
            i += 1
            plen |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        i += plen
    return topic, pkt[i:], bool(pkt[0] & 1)


async def collect_publishes(c: RawClient, level: int, seconds: float) -> list[tuple[str, bytes, bool]]:
    """Every PUBLISH the raw client receives within ``seconds`` (other packets skipped)."""
    out = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        pkt = await read_or_timeout(c, left)
        if pkt is TIMEOUT or pkt is None:
            break
        if pkt[0] >> 4 == 3:
            out.append(publish_fields(pkt, level))
    return out


async def publishes_until(c: RawClient, level: int, *, suback: int | None = None, sentinel: bytes | None = None,
                          timeout: float = 5.0) -> list[tuple[str, bytes, bool]]:
    """Every PUBLISH the raw client receives before the SUBACK with id ``suback`` or the PUBLISH
    whose payload is ``sentinel`` (no wait on the clock: ``timeout`` only bounds a failure)."""
    out: list[tuple[str, bytes, bool]] = []
    while True:
        pkt = await read_or_timeout(c, timeout)
        assert pkt is not TIMEOUT and pkt is not None, f"no {suback=} / {sentinel=} ({pkt}); before it: {out}"
        if pkt[0] >> 4 == 9 and suback is not None and int.from_bytes(pkt[2:4], "big") == suback:
            return out
        if pkt[0] >> 4 == 3:
            fields = publish_fields(pkt, level)
            if fields[1] == sentinel:
                return out
            out.append(fields)


async def device_publishes(rig, dev: str, key: str, topic: str, payload: bytes, *, retain: bool = False) -> None:
    d = Paho(rig, dev, username=dev, password=key)
    assert await d.connect() == 0
    assert await d.publish(topic, payload, qos=1, retain=retain) in (0, 0x10)  # 0x10: no subscribers
    await d.close()


def abort(c: RawClient) -> None:
    """Drop the TCP connection at once: no DISCONNECT, no TLS close_notify."""
    c.writer.transport.abort()


async def retained_under(rig, username: str, topic_filter: str, sentinel_topic: str = "telemetry") -> list:
    """The retained messages a fresh subscription of ``username`` to ``topic_filter`` (a filter
    ending in ``#``) receives: those the broker queued at the SUBSCRIBE, ahead of a sentinel an
    admin publishes (not retained) on ``sentinel_topic`` under the filter, one ``username`` may
    read, once the SUBACK is in."""
    w = Paho(rig, f"{username}-ret-{secrets.token_hex(3)}", username=username, password=await rig.token(username))
    assert await w.connect() == 0
    codes = await w.subscribe(topic_filter, 1)
    assert codes and codes[0] < 0x80, codes
    sentinel = f"sentinel-{secrets.token_hex(3)}".encode()
    admin = Paho(rig, f"admin-sentinel-{secrets.token_hex(3)}", username="admin", password=await rig.token("admin"))
    assert await admin.connect() == 0
    assert await admin.publish(topic_filter.removesuffix("#") + sentinel_topic, sentinel, qos=1) == 0
    await admin.close()
    got = [m for m in await w.received_before(sentinel) if m.retain]
    await w.close()
    return got


# --------------------------------------------------------------------------- 1. UNSUBSCRIBE/SUBSCRIBE race


@pytest.mark.parametrize("version", [V311, V5])
async def test_unsubscribe_then_subscribe_in_one_write_keeps_checking_deliveries(mqtt_rig, api, version):
    """carol owns one device, nothing of alice's. ``UNSUBSCRIBE #`` (id 1) and ``SUBSCRIBE #``
    (id 2) in one write: the UNSUBACK for id 1 must not erase the per-delivery checks of the
    ``#`` granted by id 2. alice's device data, retained and live, never reaches carol; her own
    device's data does."""
    rig = mqtt_rig
    level = LEVELS[version]
    victim, vk1, _ = await register(api, rig, "alice")
    mine, mk1, _ = await register(api, rig, "carol")
    await device_publishes(rig, victim, vk1, f"devices/{victim}/telemetry", b"victim-retained", retain=True)
    await device_publishes(rig, mine, mk1, f"devices/{mine}/telemetry", b"mine-retained", retain=True)

    raw, code = await raw_connect(rig, version, f"carol-race-{version}", "carol", await rig.token("carol"))
    assert code == 0
    unsub = encode_unsubscribe(Unsubscribe(1, ["#"]), level)
    sub = encode_subscribe(Subscribe(2, [Subscription("#", 0)]), level)
    await raw.send(unsub + sub)  # one write
    got = await publishes_until(raw, level, suback=2)  # the SUBACK: the "#" is in place
    await device_publishes(rig, victim, vk1, f"devices/{victim}/telemetry", b"victim-live")
    # carol's own device's message, published after alice's, is the sentinel: once it is here the
    # retained messages and alice's live one would be too. Its arrival is the liveness check.
    await device_publishes(rig, mine, mk1, f"devices/{mine}/telemetry", b"mine-live")
    got += await publishes_until(raw, level, sentinel=b"mine-live")
    await raw.close()

    leaked = [(t, p) for t, p, _ in got if t.startswith(f"devices/{victim}/")]
    assert leaked == [], f"carol received alice's device data through '#': {leaked}"
    assert (f"devices/{mine}/telemetry", b"mine-retained", True) in got, got


# --------------------------------------------------------------------------- 2. revoked Will


@pytest.mark.parametrize("version", [V5, V311])
@pytest.mark.parametrize("revoke", [True, False], ids=["revoked", "control"])
async def test_will_of_a_revoked_write_delegate_is_not_published(mqtt_rig, api, version, revoke):
    """bob (write delegate) connects with a retained Will on ``devices/D/cmd/x``; alice revokes
    the delegation through the API; bob's TCP connection drops without DISCONNECT. The Will must
    not be published (nothing live, nothing retained). Control: without revocation it is."""
    rig = mqtt_rig
    dev, _, _ = await register(api, rig, "alice")
    grant = await delegate(api, rig, "alice", dev, "bob", "write")
    watcher = Paho(rig, f"admin-will-{secrets.token_hex(3)}", username="admin", password=await rig.token("admin"))
    assert await watcher.connect() == 0
    assert await watcher.subscribe(f"devices/{dev}/cmd/#", 1) == [1]

    will = Will(f"devices/{dev}/cmd/x", b"bob-will", 1, True)
    bob, code = await raw_connect(rig, version, f"bob-will-{version}", "bob", await rig.token("bob"), will=will)
    assert code == 0
    if revoke:
        r = await call(api, rig, "DELETE", f"/devices/{dev}/delegations/{grant['id']}", "alice")
        assert r.status == 204, await r.text()
        # The revocation reached bob's session (its Will decided again), not a pause.
        assert await eventually(lambda: rig.audited(action="will", decision="deny", resource=f"devices/{dev}/cmd/x"))
    abort(bob)

    live = [m for m in await watcher.received_within(1.5) if m.topic == f"devices/{dev}/cmd/x"]
    await watcher.close()
    retained = await retained_under(rig, "admin", f"devices/{dev}/cmd/#", "sentinel")
    if revoke:
        assert live == [], f"the revoked delegate's Will was published: {live}"
        assert retained == [], f"the revoked delegate's Will was left retained: {retained}"
    else:
        assert [m.payload for m in live] == [b"bob-will"]
        assert [m.payload for m in retained] == [b"bob-will"]
        # Leave no retained command behind.
        admin = Paho(rig, "admin-will-clean", username="admin", password=await rig.token("admin"))
        assert await admin.connect() == 0
        await admin.publish(f"devices/{dev}/cmd/x", b"", qos=1, retain=True)
        await admin.close()


# --------------------------------------------------------------------------- 3. expiring delegation


async def test_expired_delegation_stops_deliveries_on_an_exact_subscription(mqtt_rig, api):
    """A read delegation expiring a few seconds ahead, an exact subscription granted while it
    held, a device publishing every 0.2 s and no other ownership or policy change: nothing
    published later than expires_at + 1 s reaches bob."""
    rig = mqtt_rig
    dev, k1, _ = await register(api, rig, "alice")
    bob = Paho(rig, "bob-expiring", username="bob", password=await rig.token("bob"))
    assert await bob.connect() == 0
    device = Paho(rig, dev, username=dev, password=k1)
    assert await device.connect() == 0
    expires_at = time.time() + 2.5
    await delegate(api, rig, "alice", dev, "bob", "read", expires_at=expires_at)
    assert await bob.subscribe(f"devices/{dev}/telemetry", 0) == [0]
    sentinel = await Sentinel.of(rig, bob, "bob")
    while time.time() < expires_at + 3.0:  # about time: publishing across the expiry
        await device.publish(f"devices/{dev}/telemetry", repr(time.time()).encode(), qos=0)
        await asyncio.sleep(0.2)
    # QoS 0 has no acknowledgement: a last QoS 1 publish, acknowledged, puts every one before it
    # at the broker ahead of the sentinel.
    assert await device.publish(f"devices/{dev}/telemetry", repr(time.time()).encode(), qos=1) in (0, 0x10)
    await device.close()
    got = [float(m.payload) for m in await sentinel.received()]
    await bob.close()
    assert any(t < expires_at - 0.5 for t in got), f"the delegation never worked: {got}"
    late = [round(t - expires_at, 2) for t in got if t > expires_at + 1.0]
    assert late == [], f"bob still received messages published this long after expires_at: {late}"


# --------------------------------------------------------------------------- 4a. deleted device


@pytest.mark.parametrize("version", [V5, V311])
async def test_deleting_a_device_closes_its_connection(mqtt_rig, api, version):
    """The device is connected with K1; its owner deletes it through the API: v5 gets
    DISCONNECT 0x98 (Administrative action) and the connection closes; 3.1.1 is closed."""
    rig = mqtt_rig
    dev, k1, _ = await register(api, rig, "alice")
    conn, code = await raw_connect(rig, version, dev, dev, k1)
    assert code == 0
    r = await call(api, rig, "DELETE", f"/devices/{dev}", "alice")
    assert r.status == 204, await r.text()
    if version == V5:
        pkt = await read_or_timeout(conn, 3.0)
        assert pkt is not TIMEOUT, "the deleted device's v5 connection is still open"
        assert pkt is not None, "closed without a DISCONNECT"
        assert pkt[0] == DISCONNECT and pkt[2] == ADMINISTRATIVE_ACTION, pkt
    assert await conn.closed_within(3.0), "the deleted device's connection is still open"
    await conn.close()
    # Audited as the closing of a session, naming the device (loosely: the reason's wording is free).
    closes = [r for r in rig.audited(action="session", decision="close") if dev in json.dumps(r, default=str)]
    assert closes, f"no session close audited for {dev}: {rig.audited(action='session')}"


# --------------------------------------------------------------------------- 4b. retained messages


async def test_deleting_a_device_clears_its_retained_messages(mqtt_rig, api):
    """The device's retained telemetry and attribute are cleared at the broker by the deletion:
    whoever registers the same id next does not inherit them."""
    rig = mqtt_rig
    dev, k1, _ = await register(api, rig, "alice")
    await device_publishes(rig, dev, k1, f"devices/{dev}/telemetry", b"old-telemetry", retain=True)
    await device_publishes(rig, dev, k1, f"devices/{dev}/attrs/x", b"old-attr", retain=True)
    assert len(await retained_under(rig, "alice", f"devices/{dev}/#")) == 2  # there before

    r = await call(api, rig, "DELETE", f"/devices/{dev}", "alice")
    assert r.status == 204, await r.text()
    deadline = time.monotonic() + 2.5
    await register(api, rig, "bob", dev)
    while True:
        left = await retained_under(rig, "bob", f"devices/{dev}/#")
        if not left or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert [(m.topic, m.payload) for m in left] == [], "the new owner inherits the deleted device's retained data"


# --------------------------------------------------------------------------- 4c. rotated key


async def test_rotating_k1_closes_connections_that_used_it_not_those_on_k2(mqtt_rig, api):
    rig = mqtt_rig
    dev, k1, k2 = await register(api, rig, "alice")
    watcher = Paho(rig, "alice-rot", username="alice", password=await rig.token("alice"))
    assert await watcher.connect() == 0
    assert await watcher.subscribe(f"devices/{dev}/telemetry", 1) == [1]

    # On K1, then K1 rotated: closed (v5: after a DISCONNECT).
    on_k1, code = await raw_connect(rig, V5, dev, dev, k1)
    assert code == 0
    r = await call(api, rig, "POST", f"/devices/{dev}/keys/k1", "alice")
    assert r.status == 200, await r.text()
    assert await on_k1.closed_within(3.0), "a connection on the rotated K1 stays open"
    await on_k1.close()

    # On K2, then K1 rotated again: stays open and keeps publishing. (A pause, not a sentinel:
    # the only connection the rotation would close is another of this device, which would take
    # this one over at the broker.)
    on_k2 = Paho(rig, dev, username=dev, password=k2)
    assert await on_k2.connect() == 0
    r = await call(api, rig, "POST", f"/devices/{dev}/keys/k1", "alice")
    assert r.status == 200, await r.text()
    await asyncio.sleep(1.5)
    assert on_k2.is_connected()
    assert await on_k2.publish(f"devices/{dev}/telemetry", b"on-k2", qos=1) in (0, 0x10)
    assert (await watcher.receive()).payload == b"on-k2"
    await on_k2.close()
    await watcher.close()


# --------------------------------------------------------------------------- 4d. certificates


def _csr(cn: str, directory: Path) -> tuple[str, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = directory / f"{cn}-enrolled.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key_path


async def cert_connect(rig, version: int, dev: str, cert: tuple[Path, Path]):
    """A raw TLS connection presenting ``cert`` and a CONNECT with no password: the CONNACK reason
    (None when closed without one, or refused during the TLS handshake)."""
    try:
        c = await RawClient.open(rig, cert=cert)
    except (ssl.SSLError, ConnectionError):
        return None
    await c.send(connect_packet(LEVELS[version], dev, None, None))
    pkt = await c.read_packet()
    await c.close()
    if pkt is None:
        return None
    assert pkt[0] == 0x20, pkt
    return connack_reason(pkt)


REFUSED = {V5: (0x86, 0x87), V311: (4, 5)}


async def test_only_an_enrolled_certificate_authenticates_its_device(mqtt_rig, api, tmp_path):
    """``POST /devices/D/certificate`` with a CSR returns the signed chain; that certificate
    connects; another certificate with CN=D from the same device CA is refused."""
    rig = mqtt_rig
    dev, _, _ = await register(api, rig, "alice")
    csr_pem, key_path = _csr(dev, tmp_path)
    r = await call(api, rig, "POST", f"/devices/{dev}/certificate", "alice", {"csr": csr_pem})
    assert r.status == 201, f"enrollment: {r.status} {await r.text()}"
    body = await r.json()
    assert body["fingerprint"].startswith("sha256:") and body["serial"]
    cert_path = tmp_path / f"{dev}-enrolled.crt"
    cert_path.write_text(body["certificate"].rstrip("\n") + "\n" + (body.get("chain") or ""))
    for version in (V5, V311):
        assert await cert_connect(rig, version, dev, (cert_path, key_path)) == 0
    other = rig.pki.device_cert(dev)  # same CN, same device CA, never enrolled
    for version in (V5, V311):
        code = await cert_connect(rig, version, dev, other)
        assert code in REFUSED[version], f"an unenrolled certificate got CONNACK {code}"


@pytest.mark.parametrize("version", [V5, V311])
async def test_an_unenrolled_certificate_is_refused(mqtt_rig, api, version):
    """The same hole without the enrollment route: a certificate with CN=D signed by the
    configured device CA, never enrolled for D, does not authenticate D."""
    rig = mqtt_rig
    dev, _, _ = await register(api, rig, "alice")
    code = await cert_connect(rig, version, dev, rig.pki.device_cert(dev))
    assert code in REFUSED[version], f"an unenrolled certificate for {dev} got CONNACK {code}"


# --------------------------------------------------------------------------- 5. Topic Alias 0


async def test_topic_alias_zero_is_topic_alias_invalid(mqtt_rig):
    rig = mqtt_rig
    raw, code = await raw_connect(rig, V5, "carol-alias0", "carol", await rig.token("carol"))
    assert code == 0
    await raw.send(publish_packet("lobby/x", b"a", qos=0, properties=[(Prop.TOPIC_ALIAS, 0)]))
    pkt = await read_or_timeout(raw, 3.0)
    assert pkt is not TIMEOUT and pkt is not None, pkt
    assert pkt[0] == DISCONNECT and pkt[2] == TOPIC_ALIAS_INVALID, f"DISCONNECT 0x{pkt[2]:02X}"
    assert await raw.closed_within(2)
    await raw.close()


# --------------------------------------------------------------------------- shared subscription groups


async def test_a_stranger_cannot_join_anothers_shared_subscription_group(mqtt_rig, api):
    """alice reads her device through ``$share/g/devices/+/telemetry``. carol, who may read none
    of it, subscribes to the same filter: at the broker she must not join alice's group (the
    broker would hand her half of the messages, which the gateway drops as not hers)."""
    rig = mqtt_rig
    dev, k1, _ = await register(api, rig, "alice")
    share = "$share/g/devices/+/telemetry"
    subscribers = {}
    for who in ("alice", "carol"):
        raw, code = await raw_connect(rig, V5, f"{who}-share", who, await rig.token(who))
        assert code == 0
        await raw.send(encode_subscribe(Subscribe(1, [Subscription(share, 0)]), MQTT_5))
        suback = await raw.read_packet()
        assert suback is not None and suback[0] == 0x90 and suback[-1] < 0x80, suback
        subscribers[who] = raw
    sent = [f"m{i}".encode() for i in range(20)]
    for payload in sent:
        await device_publishes(rig, dev, k1, f"devices/{dev}/telemetry", payload)
    got = {who: [p for t, p, _ in await collect_publishes(raw, MQTT_5, 1.5)] for who, raw in subscribers.items()}
    for raw in subscribers.values():
        await raw.close()
    assert got["carol"] == []
    assert sorted(got["alice"]) == sorted(sent), f"alice lost {len(sent) - len(got['alice'])} of {len(sent)}"
