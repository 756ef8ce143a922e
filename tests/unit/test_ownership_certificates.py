"""Device certificate enrollment in the service and the store: what is signed, what is refused,
what authenticates (only enrolled certificates of the current registration), rollover,
revocation, deletion, erasure, the schema migration and the configuration."""

from __future__ import annotations

import datetime as dt
import hashlib
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ownership import enrollment
from ownership import store as st
from ownership.migrations import LATEST
from ownership.service import EnrollmentUnavailable, InvalidInput, NotFound
from proxy.certs import init_dir
from proxy.config import ConfigError, load_config_text
from proxy.identity.model import AuthError, AuthReason
from tests.rig.ownership import STORE_KEY, USERS, open_service, ownership_config
from tests.rig.pki import make_csr, make_pki

ALICE, BOB = USERS["alice"], USERS["bob"]


def ca_config(tmp_path, extra_tls: str = ""):
    """A config whose device CA is what ``keygate certs init`` makes (ten years, so no cap applies)."""
    init_dir(tmp_path / "pki", days=3650)
    tls = f"tls: {{client_ca: pki/devices-ca.crt, client_ca_key: pki/devices-ca.key{extra_tls}}}\n"
    return ownership_config(tmp_path, extra=tls)


@pytest.fixture
async def service(tmp_path):
    config = ca_config(tmp_path)
    s = await open_service(config)
    await s.register_device(ALICE, {"id": "d1", "type": "T"})
    try:
        yield s
    finally:
        await s.close()


def fingerprint(pem: str) -> str:
    return hashlib.sha256(x509.load_pem_x509_certificate(pem.encode()).public_bytes(
        serialization.Encoding.DER)).hexdigest()


# ---------------------------------------------------------------- what is signed


async def test_the_issued_certificate(service, tmp_path):
    before = time.time()
    issued = await service.enroll_certificate(ALICE, "d1", make_csr("d1")[1])
    cert = x509.load_pem_x509_certificate(issued["certificate"].encode())
    ca = x509.load_pem_x509_certificate((tmp_path / "pki" / "devices-ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=d1" and cert.issuer == ca.subject
    assert 0 < cert.serial_number < 2 ** 159 and issued["serial"] == enrollment.serial_hex(cert.serial_number)
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    # A year by default; the chain is the leaf, then the CA.
    days = (cert.not_valid_after_utc - dt.datetime.fromtimestamp(before, dt.UTC)).days
    assert days in (364, 365) and issued["not_after"] == cert.not_valid_after_utc.timestamp()
    assert issued["chain"] == issued["certificate"] + ca.public_bytes(serialization.Encoding.PEM).decode()
    assert issued["fingerprint"] == fingerprint(issued["certificate"])
    assert [c["fingerprint"] for c in service.certificates_of("d1")] == [issued["fingerprint"]]


async def test_the_enrolled_certificate_authenticates_the_device(service):
    seen = []
    service.facts.subscribe(seen.append)
    issued = await service.enroll_certificate(ALICE, "d1", make_csr("d1")[1])
    assert seen == [{"d1"}]
    ident = service.device_identity("d1", issued["fingerprint"].upper())
    assert (ident.kind, ident.device_id, ident.method, ident.owner_sub) == ("device", "d1", "certificate", "sub-alice")
    assert ident.credential == f"cert:{issued['fingerprint']}"
    assert ident.expires_at == issued["not_after"]  # the connection ends with the certificate
    assert service.credential_problem(ident) is None
    record = [r for r in service.audit.records if r["action"] == "certificate.enroll"][-1]
    assert record["resource"] == "d1" and record["serial"] == issued["serial"]
    assert record["identity"]["username"] == "alice"


async def test_a_ca_signed_certificate_that_was_not_enrolled_authenticates_nothing(service, tmp_path):
    pki_cert = x509.load_pem_x509_certificate(make_pki(tmp_path / "other").device_cert("d1")[0].read_bytes())
    fp = hashlib.sha256(pki_cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    with pytest.raises(AuthError) as err:
        service.device_identity("d1", fp)
    assert err.value.reason is AuthReason.BAD_CERTIFICATE
    with pytest.raises(AuthError) as err:
        service.device_identity("ghost", fp)
    assert err.value.reason is AuthReason.UNKNOWN_DEVICE_OR_KEY


@pytest.mark.parametrize("key", [rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP384R1()),
                                 ed25519.Ed25519PrivateKey.generate()], ids=["rsa2048", "p384", "ed25519"])
async def test_accepted_key_types(service, key):
    issued = await service.enroll_certificate(ALICE, "d1", make_csr("d1", key)[1])
    cert = x509.load_pem_x509_certificate(issued["certificate"].encode())
    assert cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                                          ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


async def test_der_and_base64_der_csrs_are_read_too(service):
    import base64

    der = x509.load_pem_x509_csr(make_csr("d1")[1]).public_bytes(serialization.Encoding.DER)
    assert (await service.enroll_certificate(ALICE, "d1", der))["serial"]
    der = x509.load_pem_x509_csr(make_csr("d1")[1]).public_bytes(serialization.Encoding.DER)
    assert (await service.enroll_certificate(ALICE, "d1", base64.encodebytes(der)))["serial"]


# ---------------------------------------------------------------- what is refused


def _csr(subject: list[x509.NameAttribute], key=None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def _bad_signature() -> bytes:
    der = bytearray(x509.load_pem_x509_csr(make_csr("d1")[1]).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature
    return bytes(der)


@pytest.mark.parametrize("csr, message", [
    (make_csr("d2")[1], "subject CN must be the device id 'd1'"),
    (make_csr("D1")[1], "subject CN must be the device id"),
    (_csr([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "d1")]), "subject CN must be the device id"),
    (_csr([x509.NameAttribute(NameOID.COMMON_NAME, "d1"), x509.NameAttribute(NameOID.COMMON_NAME, "d2")]),
     "subject CN must be the device id"),
    (_bad_signature(), "signature does not verify"),
    (b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n", "PEM certificate"),
    (b"", "PEM certificate signing request"),
    (b"\x30\x03\x02\x01\x00", "PEM certificate signing request"),
    (make_csr("d1", rsa.generate_private_key(65537, 1024))[1], "RSA keys must have 2048 to 8192 bits, not 1024"),
    (make_csr("d1", ec.generate_private_key(ec.SECP521R1()))[1], "EC keys must be on P-256 or P-384"),
    (make_csr("d1", ec.generate_private_key(ec.SECP256K1()))[1], "EC keys must be on P-256 or P-384"),
    (make_csr("d1", ed448.Ed448PrivateKey.generate())[1], "must be RSA"),
    (_csr([x509.NameAttribute(NameOID.COMMON_NAME, "d1")], dsa.generate_private_key(2048)), "must be RSA"),
], ids=["other-cn", "case", "no-cn", "two-cns", "bad-signature", "bad-pem", "empty", "bad-der", "rsa1024", "p521",
        "secp256k1", "ed448", "dsa"])
async def test_refused_csrs(service, csr, message):
    with pytest.raises(InvalidInput) as err:
        await service.enroll_certificate(ALICE, "d1", csr)
    assert err.value.code == "invalid_csr" and err.value.status == 400
    assert message in str(err.value)
    assert service.certificates_of("d1") == []
    assert [r["decision"] for r in service.audit.records if r["action"] == "certificate.enroll"] == ["deny"]


async def test_a_device_id_too_long_for_a_cn(service):
    long_id = "x" * 65
    await service.register_device(ALICE, {"id": long_id, "type": "T"})
    with pytest.raises(InvalidInput, match="at most 64 characters"):
        await service.enroll_certificate(ALICE, long_id, make_csr("x")[1])
    await service.register_device(ALICE, {"id": "y" * 64, "type": "T"})
    assert (await service.enroll_certificate(ALICE, "y" * 64, make_csr("y" * 64)[1]))["serial"]


async def test_without_a_ca_key_enrollment_is_unavailable(ownership_service):
    await ownership_service.register_device(ALICE, {"id": "d1", "type": "T"})
    with pytest.raises(EnrollmentUnavailable) as err:
        await ownership_service.enroll_certificate(ALICE, "d1", make_csr("d1")[1])
    assert (err.value.status, err.value.code) == (501, "enrollment_unavailable")
    assert "tls.client_ca_key" in str(err.value)
    # Listing and revoking need no CA key.
    assert ownership_service.certificates_of("d1") == []
    assert await ownership_service.revoke_certificates(ALICE, "d1") == []


async def test_an_unknown_device_is_not_found(service):
    with pytest.raises(NotFound):
        await service.enroll_certificate(ALICE, "ghost", make_csr("ghost")[1])


async def test_a_device_deleted_and_registered_again_meanwhile_gets_no_certificate(service):
    """The store checks the owner the API checked: a certificate asked for by alice never lands
    on bob's registration of the same id."""
    row = {"serial": "01", "device_id": "d1", "fingerprint": "00" * 32, "not_after": 2e9, "created_at": 1.0}
    await service.delete_device(ALICE, "d1")
    await service.register_device(BOB, {"id": "d1", "type": "T"})
    with pytest.raises(st.NotFound):
        await service._run(service._store.insert_certificate, row, owner_sub=ALICE.sub, keep=2)
    assert await service._run(service._store.delete_certificates, "d1") == []


# ---------------------------------------------------------------- rollover and revocation


async def test_rollover_keeps_the_latest_two(service):
    first, second = [await service.enroll_certificate(ALICE, "d1", make_csr("d1")[1]) for _ in range(2)]
    idents = [service.device_identity("d1", i["fingerprint"]) for i in (first, second)]
    third = await service.enroll_certificate(ALICE, "d1", make_csr("d1")[1])
    third_ident = service.device_identity("d1", third["fingerprint"])
    listed = service.certificates_of("d1")
    assert [c["serial"] for c in listed] == [second["serial"], third["serial"]]
    with pytest.raises(AuthError):
        service.device_identity("d1", first["fingerprint"])
    assert service.credential_problem(idents[0]) == "certificate revoked"
    assert service.credential_problem(idents[1]) is None and service.credential_problem(third_ident) is None
    record = [r for r in service.audit.records if r["action"] == "certificate.enroll"][-1]
    assert record["replaced"] == [first["serial"]]


async def test_revoke_one_then_all(service):
    a, b = [await service.enroll_certificate(ALICE, "d1", make_csr("d1")[1]) for _ in range(2)]
    ia, ib = service.device_identity("d1", a["fingerprint"]), service.device_identity("d1", b["fingerprint"])
    seen = []
    service.facts.subscribe(seen.append)
    # Serials are taken in any case, with colons or leading zeros.
    assert await service.revoke_certificates(ALICE, "d1", "00" + a["serial"].upper()) == [a["serial"]]
    assert seen == [{"d1"}]
    assert service.credential_problem(ia) == "certificate revoked" and service.credential_problem(ib) is None
    with pytest.raises(NotFound):
        await service.revoke_certificates(ALICE, "d1", a["serial"])
    with pytest.raises(NotFound):
        await service.revoke_certificates(ALICE, "d1", "not-hex")
    assert await service.revoke_certificates(ALICE, "d1") == [b["serial"]]
    assert service.credential_problem(ib) == "certificate revoked"
    with pytest.raises(AuthError):
        service.device_identity("d1", b["fingerprint"])
    assert service.certificates_of("d1") == []
    revokes = [r for r in service.audit.records if r["action"] == "certificate.revoke"]
    assert [r["serials"] for r in revokes] == [[a["serial"]], [b["serial"]]]


async def test_the_old_registrations_certificate_does_not_open_the_new_one(service):
    """The hole this closes: a CA-signed certificate for an id outlived its registration."""
    issued = await service.enroll_certificate(ALICE, "d1", make_csr("d1")[1])
    old = service.device_identity("d1", issued["fingerprint"])
    await service.delete_device(ALICE, "d1")
    assert service.credential_problem(old) == "device deleted"
    await service.register_device(BOB, {"id": "d1", "type": "T"})
    with pytest.raises(AuthError):
        service.device_identity("d1", issued["fingerprint"])
    assert service.credential_problem(old) == "device registered again"
    assert service.certificates_of("d1") == [] and (await service.load_device("d1")) is not None
    assert await service._run(lambda: service._store._conn.execute(
        "SELECT count(*) FROM device_certificates").fetchone()[0]) == 0


async def test_erasure_removes_the_owners_certificates_and_export_lists_them(service):
    issued = await service.enroll_certificate(ALICE, "d1", make_csr("d1")[1])
    exported = await service.export_user_data(ALICE)
    assert [c["serial"] for c in exported["devices"][0]["certificates"]] == [issued["serial"]]
    counts = await service.erase_user_data(ALICE)
    assert counts["certificates"] == 1
    assert service.certificates_of("d1") == [] and await service.rows_about(ALICE.sub, ALICE.username) == 0
    with pytest.raises(AuthError):
        service.device_identity("d1", issued["fingerprint"])


# ---------------------------------------------------------------- the store


async def test_certificates_survive_a_restart_encrypted(tmp_path):
    config = ca_config(tmp_path)
    s = await open_service(config)
    await s.register_device(ALICE, {"id": "d1", "type": "T"})
    issued = await s.enroll_certificate(ALICE, "d1", make_csr("d1")[1])
    await s.close()
    for p in (tmp_path / "data").iterdir():
        blob = p.read_bytes()
        assert issued["serial"].encode() not in blob and bytes.fromhex(issued["fingerprint"]) not in blob
    s = await open_service(config)
    try:
        assert service_rows(s) == [(issued["serial"], issued["fingerprint"], issued["not_after"])]
        assert s.device_identity("d1", issued["fingerprint"]).owner_sub == ALICE.sub
    finally:
        await s.close()


def service_rows(s):
    return [(c["serial"], c["fingerprint"], c["not_after"]) for c in s.certificates_of("d1")]


async def test_a_version_2_store_migrates(tmp_path, monkeypatch):
    """A store written before enrollment existed opens, keeps its devices and keys, and enrolls."""
    import hmac

    from ownership import migrations

    config = ca_config(tmp_path)
    monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:2])
    monkeypatch.setattr(migrations, "LATEST", 2)
    old = st.Store.open(config.resolve(config.store.path), STORE_KEY)
    k1 = "k" * 43
    digest = hmac.new(old.pepper(), k1.encode(), hashlib.sha256).digest()
    device = {"id": "d1", "type": "T", "public": False, "service": "", "owner_sub": ALICE.sub,
              "owner_username": ALICE.username, "created_at": 1.0, "updated_at": 1.0}
    with old.transaction() as c:  # rows as that schema holds them (today's insert_device checks later tables)
        old._insert_device_row(c, device)
        old._insert_keys(c, "d1", {"k1": digest, "k2": digest}, 1.0)
    assert old._conn.execute("PRAGMA user_version").fetchone()[0] == 2
    old.close()
    monkeypatch.undo()
    s = await open_service(config)
    try:
        assert await s._run(lambda: s._store._conn.execute("PRAGMA user_version").fetchone()[0]) == LATEST >= 3
        assert (await s.authenticate_device_key("d1", k1)).owner_sub == ALICE.sub
        assert s.certificates_of("d1") == []
        issued = await s.enroll_certificate(ALICE, "d1", make_csr("d1")[1])
        assert s.device_identity("d1", issued["fingerprint"]).device_id == "d1"
    finally:
        await s.close()


def test_serials_in_and_out():
    assert enrollment.serial_hex(0xABC) == "0abc" and enrollment.serial_hex(0xAB) == "ab"
    assert enrollment.normal_serial("0A:BC") == "0abc" == enrollment.normal_serial("000abc")
    assert enrollment.normal_serial("xyz") is None and enrollment.normal_serial("") is None
    assert enrollment.normal_serial("f" * 65) is None


# ---------------------------------------------------------------- configuration


def test_config_keys_and_defaults(tmp_path):
    config = ca_config(tmp_path)
    assert (config.tls.client_ca_key, config.tls.client_cert_days) == ("pki/devices-ca.key", 365)
    assert ownership_config(tmp_path).tls.client_ca_key == ""


@pytest.mark.parametrize("tls, message", [
    ("{client_ca_key: ca.key}", "proxy.yaml: tls.client_ca_key: needs tls.client_ca"),
    ("{client_ca: ca.crt, client_ca_key: ca.key, client_cert_days: 0}",
     "proxy.yaml: tls.client_cert_days: must be between 1 and 3650"),
    ("{client_ca: ca.crt, client_ca_key: ca.key, client_ca_key_password: hunter2}",
     "tls.client_ca_key_password: secrets may not be written in the file"),
])
def test_config_refusals(tls, message):
    with pytest.raises(ConfigError) as err:
        load_config_text(f"oidc: {{issuer: 'https://i.test/r'}}\ntls: {tls}\n", env={})
    assert message in str(err.value)


async def test_open_fails_with_one_line_on_a_bad_ca_key(tmp_path):
    init_dir(tmp_path / "pki")
    init_dir(tmp_path / "other")
    cases = [
        ("pki/missing.key", f"tls.client_ca_key: no such file: {tmp_path / 'pki' / 'missing.key'}"),
        ("other/devices-ca.key", "is the key of no certificate in"),
        ("pki/devices-ca.crt", "not a PEM private key"),
    ]
    for key, message in cases:
        config = ownership_config(tmp_path, extra=f"tls: {{client_ca: pki/devices-ca.crt, client_ca_key: {key}}}\n")
        with pytest.raises(ConfigError) as err:
            await open_service(config)
        assert message in str(err.value) and "\n" not in str(err.value)
    # The server CA's key with the server certificate: a key that matches, but not of a CA.
    config = ownership_config(tmp_path, extra="tls: {client_ca: pki/server.crt, client_ca_key: pki/server.key}\n")
    with pytest.raises(ConfigError, match="is not a CA"):
        await open_service(config)
    assert not (tmp_path / "data").exists()


async def test_an_encrypted_ca_key_with_its_password(tmp_path):
    init_dir(tmp_path / "pki")
    key = serialization.load_pem_private_key((tmp_path / "pki" / "devices-ca.key").read_bytes(), None)
    (tmp_path / "pki" / "enc.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"s3cret")))
    (tmp_path / "ca.pass").write_text("s3cret\n")
    base = "tls: {client_ca: pki/devices-ca.crt, client_ca_key: pki/enc.key"
    with pytest.raises(ConfigError, match=r"is encrypted: set tls\.client_ca_key_password"):
        await open_service(ownership_config(tmp_path, extra=base + "}\n"))
    s = await open_service(ownership_config(tmp_path, extra=base + ", client_ca_key_password_file: ca.pass}\n"))
    try:
        await s.register_device(ALICE, {"id": "d1", "type": "T"})
        assert (await s.enroll_certificate(ALICE, "d1", make_csr("d1")[1]))["serial"]
    finally:
        await s.close()


async def test_validity_from_config_never_past_the_ca(tmp_path):
    config = ca_config(tmp_path, extra_tls=", client_cert_days: 30")
    s = await open_service(config)
    try:
        await s.register_device(ALICE, {"id": "d1", "type": "T"})
        issued = await s.enroll_certificate(ALICE, "d1", make_csr("d1")[1])
        assert 29 * 86400 < issued["not_after"] - time.time() <= 30 * 86400
        # A certificate never outlives the CA that signed it.
        s.device_ca.days = 3650 + 30
        issued = await s.enroll_certificate(ALICE, "d1", make_csr("d1")[1])
        assert issued["not_after"] == s.device_ca.cert.not_valid_after_utc.timestamp()
    finally:
        await s.close()
