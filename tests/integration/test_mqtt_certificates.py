"""Devices on MQTT with certificates: only a certificate enrolled for the device's current
registration connects; the CA's signature alone does not. The CSR comes from the ``openssl``
command as a device maker would make it; mosquitto_pub presents the certificate."""

from __future__ import annotations

import asyncio

import pytest

from tests.rig.mqtt_clients import V5, V311, Paho, mosquitto_pub, mosquitto_sub

pytestmark = pytest.mark.integration


async def openssl_csr(folder, device_id: str) -> tuple[bytes, object]:
    """``openssl req -new -newkey ec``: a P-256 key and a PEM CSR with CN = the device id."""
    folder.mkdir(parents=True, exist_ok=True)
    key, csr = folder / f"{device_id}.key", folder / f"{device_id}.csr"
    proc = await asyncio.create_subprocess_exec(
        "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={device_id}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return csr.read_bytes(), key


async def publishes(rig, dev: str, cert, version: int = V5) -> tuple[int, str]:
    return await mosquitto_pub(rig, f"devices/{dev}/telemetry", "x", cert=cert, client_id=dev, version=version)


@pytest.mark.parametrize("version", [V311, V5])
async def test_an_openssl_csr_enrolled_connects_with_mosquitto_pub(mqtt_rig, tmp_path, version):
    rig = mqtt_rig
    dev, _, _ = await rig.register_device("alice")
    csr, key = await openssl_csr(tmp_path / "device", dev)
    issued = await rig.services.ownership.enroll_certificate(await rig.identity("alice"), dev, csr)
    crt = tmp_path / "device" / f"{dev}.crt"
    crt.write_text(issued["chain"])  # the chain, as a device would keep it; the leaf alone works too
    sub = await mosquitto_sub(rig, f"devices/{dev}/telemetry", qos=1, username="alice",
                              password=await rig.token("alice"), client_id="alice-cli", version=version)
    try:
        status, err = await mosquitto_pub(rig, f"devices/{dev}/telemetry", "enrolled", cert=(crt, key),
                                          client_id=dev, version=version)
        assert status == 0, err
        assert await sub.line() == f"devices/{dev}/telemetry enrolled"
    finally:
        await sub.stop()
    connect = rig.audited(action="connect", decision="allow", resource=dev)[-1]["identity"]
    assert (connect["method"], connect["username"]) == ("certificate", dev)


async def test_a_ca_signed_certificate_that_was_not_enrolled_is_refused(mqtt_rig):
    rig = mqtt_rig
    dev, _, _ = await rig.register_device("alice")
    status, _ = await publishes(rig, dev, rig.pki.device_cert(dev))
    assert status != 0
    assert not rig.audited(action="connect", decision="allow", resource=dev)
    assert rig.audited(action="connect", decision="deny")[-1]["reason"] == "bad_certificate"


async def test_revoked_and_replaced_certificates_are_refused(mqtt_rig):
    rig = mqtt_rig
    ownership, alice = rig.services.ownership, await rig.identity("alice")
    dev, _, _ = await rig.register_device("alice")
    first = await rig.enroll("alice", dev)
    second = await rig.enroll("alice", dev)
    assert (await publishes(rig, dev, first))[0] == 0 and (await publishes(rig, dev, second))[0] == 0
    third = await rig.enroll("alice", dev)  # rollover: the first one is dropped
    assert (await publishes(rig, dev, first))[0] != 0
    assert (await publishes(rig, dev, second))[0] == 0 and (await publishes(rig, dev, third))[0] == 0
    await ownership.revoke_certificates(alice, dev)
    for cert in (second, third):
        assert (await publishes(rig, dev, cert))[0] != 0


async def test_a_certificate_does_not_outlive_its_registration(mqtt_rig):
    """The hole: alice deletes her device, bob registers the same id; alice's certificate,
    signed by the same CA with the same CN, must not connect as bob's device."""
    rig = mqtt_rig
    dev, _, _ = await rig.register_device("alice")
    cert = await rig.enroll("alice", dev)
    assert (await publishes(rig, dev, cert))[0] == 0
    await rig.services.ownership.delete_device(await rig.identity("alice"), dev)
    await rig.register_device("bob", dev)
    assert (await publishes(rig, dev, cert))[0] != 0
    assert len(rig.audited(action="connect", decision="allow", resource=dev)) == 1


async def test_revoking_closes_the_open_connection_and_rollover_keeps_the_other(mqtt_rig):
    """A connection stands on its certificate: revoking it ends the connection at once (v5
    DISCONNECT 0x98); the device's other enrolled certificate keeps working."""
    rig = mqtt_rig
    dev, _, _ = await rig.register_device("alice")
    old, new = await rig.enroll("alice", dev), await rig.enroll("alice", dev)
    on_old = Paho(rig, dev, cert=old)
    try:
        assert await on_old.connect() == 0
        serial = rig.services.ownership.certificates_of(dev)[0]["serial"]
        await rig.services.ownership.revoke_certificates(await rig.identity("alice"), dev, serial)
        assert await asyncio.to_thread(on_old.disconnected.wait, 5)
        assert int(on_old.disconnect_rc.value) == 0x98
    finally:
        await on_old.close()
    on_new = Paho(rig, dev, cert=new)
    try:
        assert await on_new.connect() == 0
        assert await on_new.publish(f"devices/{dev}/telemetry", b"still here", qos=1) in (0, 0x10)
    finally:
        await on_new.close()
