"""POST / GET / DELETE /api/v1/devices/{id}/certificate over real HTTP: the answer's exact
shape, both body forms, every refusal, rollover, revocation, and a CSR from ``openssl req``."""

from __future__ import annotations

import asyncio
import hashlib
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.certs import init_dir
from tests.rig.ownership import TableTokens, _harness, ownership_config
from tests.rig.pki import make_csr

pytestmark = pytest.mark.integration

PKCS10 = {"Content-Type": "application/pkcs10"}


@pytest.fixture
async def api(tmp_path):
    """The API with a device CA (what ``keygate certs init`` makes), users from a fixed table."""
    init_dir(tmp_path / "certs")
    config = ownership_config(tmp_path, extra="tls: {client_ca: certs/devices-ca.crt, "
                                              "client_ca_key: certs/devices-ca.key}\n")
    tokens = TableTokens()
    async with _harness(config, tokens, tokens.token) as harness:
        await harness.register("alice", "dev-a")
        yield harness


async def error_of(r) -> tuple[int, str]:
    body = await r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return r.status, body["error"]["code"]


async def enroll(api, csr: bytes | None = None, *, as_: str = "alice", device: str = "dev-a"):
    return await api.call("POST", f"/devices/{device}/certificate", as_=as_, data=csr or make_csr(device)[1],
                          headers=PKCS10)


async def test_enroll_answers_the_signed_chain(api, tmp_path):
    r = await enroll(api)
    assert r.status == 201, await r.text()
    body = await r.json()
    assert set(body) == {"certificate", "chain", "serial", "fingerprint", "not_after"}
    cert = x509.load_pem_x509_certificate(body["certificate"].encode())
    der = cert.public_bytes(serialization.Encoding.DER)
    assert body["fingerprint"] == "sha256:" + hashlib.sha256(der).hexdigest()
    assert int(body["serial"], 16) == cert.serial_number and re.fullmatch(r"[0-9a-f]+", body["serial"])
    assert body["not_after"] == cert.not_valid_after_utc.isoformat().replace("+00:00", "Z")
    ca = (tmp_path / "certs" / "devices-ca.crt").read_text()
    assert body["chain"] == body["certificate"] + ca
    assert r.headers["Location"] == f"/api/v1/devices/dev-a/certificate/{body['serial']}"
    ident = api.ownership.device_identity("dev-a", body["fingerprint"].removeprefix("sha256:"))
    assert ident.owner_username == "alice"


async def test_enroll_takes_json_too(api):
    r = await api.call("POST", "/devices/dev-a/certificate", as_="alice", json={"csr": make_csr("dev-a")[1].decode()})
    assert r.status == 201
    assert (await r.json())["fingerprint"].startswith("sha256:")


@pytest.mark.parametrize("csr, code", [
    (make_csr("dev-b")[1], "invalid_csr"),
    (b"hello", "invalid_csr"),
    (make_csr("dev-a", rsa.generate_private_key(65537, 1024))[1], "invalid_csr"),
], ids=["wrong-cn", "garbage", "weak-key"])
async def test_refused_csrs_are_400(api, csr, code):
    r = await enroll(api, csr)
    assert await error_of(r) == (400, code)
    assert (await (await api.call("GET", "/devices/dev-a/certificate", as_="alice")).json()) == {"certificates": []}


async def test_bad_bodies(api):
    r = await api.call("POST", "/devices/dev-a/certificate", as_="alice", data=b"x",
                       headers={"Content-Type": "text/plain"})
    assert await error_of(r) == (415, "unsupported_media_type")
    for body in ({}, {"csr": 5}, {"csr": "x", "more": 1}):
        r = await api.call("POST", "/devices/dev-a/certificate", as_="alice", json=body)
        assert r.status == 400, body
    r = await api.call("POST", "/devices/dev-a/certificate", as_="alice", json={"csr": "é"})
    assert await error_of(r) == (400, "invalid_csr")
    r = await enroll(api, b"-" * 20000)
    assert await error_of(r) == (413, "body_too_large")


async def test_only_the_owner_or_an_admin(api):
    for method in ("POST", "GET", "DELETE"):
        r = await api.call(method, "/devices/dev-a/certificate", as_="bob", data=make_csr("dev-a")[1],
                           headers=PKCS10)
        assert await error_of(r) == (404, "not_found"), method
    r = await api.call("DELETE", "/devices/dev-a/certificate/01", as_="bob")
    assert await error_of(r) == (404, "not_found")
    assert (await enroll(api, as_="admin")).status == 201
    r = await api.call("GET", "/devices/dev-a/certificate", as_="admin")
    assert len((await r.json())["certificates"]) == 1
    r = await api.call("GET", "/devices/dev-a/certificate")
    assert r.status == 401
    assert (await enroll(api, device="ghost")).status == 404


async def test_without_a_ca_key_it_is_501(ownership_api_table):
    await ownership_api_table.register("alice", "dev-a")
    r = await enroll(ownership_api_table)
    assert await error_of(r) == (501, "enrollment_unavailable")
    r = await ownership_api_table.call("GET", "/devices/dev-a/certificate", as_="alice")
    assert (r.status, await r.json()) == (200, {"certificates": []})
    r = await ownership_api_table.call("DELETE", "/devices/dev-a/certificate", as_="alice")
    assert r.status == 204


async def test_rollover_list_and_revoke(api):
    issued = [await (await enroll(api)).json() for _ in range(3)]
    r = await api.call("GET", "/devices/dev-a/certificate", as_="alice")
    listed = (await r.json())["certificates"]
    assert [c["serial"] for c in listed] == [issued[1]["serial"], issued[2]["serial"]]
    assert set(listed[0]) == {"serial", "fingerprint", "not_after", "created_at"}
    assert listed[0]["fingerprint"] == issued[1]["fingerprint"] and listed[0]["not_after"] == issued[1]["not_after"]
    r = await api.call("DELETE", f"/devices/dev-a/certificate/{issued[1]['serial'].upper()}", as_="alice")
    assert r.status == 204
    r = await api.call("DELETE", f"/devices/dev-a/certificate/{issued[1]['serial']}", as_="alice")
    assert await error_of(r) == (404, "not_found")
    r = await api.call("GET", "/devices/dev-a/certificate", as_="alice")
    assert [c["serial"] for c in (await r.json())["certificates"]] == [issued[2]["serial"]]
    assert (await api.call("DELETE", "/devices/dev-a/certificate", as_="alice")).status == 204
    r = await api.call("GET", "/devices/dev-a/certificate", as_="alice")
    assert (await r.json())["certificates"] == []
    actions = [(r["action"], r["decision"]) for r in api.audit.records if r["action"].startswith("certificate.")]
    assert actions == [("certificate.enroll", "allow")] * 3 + [("certificate.revoke", "allow")] * 2


async def test_export_lists_them_and_erasure_counts_them(api):
    issued = await (await enroll(api)).json()
    r = await api.call("GET", "/me/data", as_="alice")
    device = (await r.json())["devices"][0]
    assert [c["fingerprint"] for c in device["certificates"]] == [issued["fingerprint"]]
    r = await api.call("DELETE", "/me/data", as_="alice")
    assert (await r.json())["erased"]["certificates"] == 1


async def test_a_csr_from_openssl_req(api, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        "openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(tmp_path / "dev.key"), "-out", str(tmp_path / "dev.csr"), "-subj", "/CN=dev-a",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err
    r = await enroll(api, (tmp_path / "dev.csr").read_bytes())
    assert r.status == 201, await r.text()
    cert = x509.load_pem_x509_certificate((await r.json())["certificate"].encode())
    key = serialization.load_pem_private_key((tmp_path / "dev.key").read_bytes(), None)
    assert cert.public_key() == key.public_key()
