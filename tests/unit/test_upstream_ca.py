"""``http.upstream_ca``: the CA file is checked where the context is made (as ``tls.cert`` is), the
setting itself at load; each problem is one line naming the key, never a traceback."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from proxy.check import check_orion, check_tls
from proxy.config import Config, ConfigError, load_config, load_config_text
from proxy.tls import upstream_context
from tests.rig.pki import make_pki


def config(upstream: str = "https://orion.internal:1026", base_dir: str = ".", **http: str) -> Config:
    text = json.dumps({"oidc": {"issuer": "https://kc.example.org/realms/iot"},
                       "http": {"tls": False, "upstream": upstream, **http}})
    return load_config_text(text, "proxy.yaml", env={}, base_dir=base_dir)


def problem(cfg: Config) -> str:
    with pytest.raises(ConfigError) as info:
        upstream_context(cfg)
    return str(info.value)


def test_a_plain_http_upstream_with_a_ca_is_refused_at_load():
    with pytest.raises(ConfigError) as info:
        config("http://orion:1026", upstream_ca="orion-ca.pem")
    assert str(info.value) == ("proxy.yaml: http.upstream_ca: needs an https:// http.upstream (it is "
                               "http://orion:1026): nothing would be verified with it")


def test_the_ca_alone_is_trusted_and_verification_is_on(tmp_path):
    pki = make_pki(tmp_path)
    ctx = upstream_context(config(upstream_ca=str(pki.ca)))
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.cert_store_stats()["x509"] == 1   # that CA, not the system's store besides


def test_a_relative_path_is_the_config_files_folder(tmp_path):
    make_pki(tmp_path / "pki")
    (tmp_path / "proxy.yaml").write_text(json.dumps({
        "oidc": {"issuer": "https://kc.example.org/realms/iot"},
        "http": {"tls": False, "upstream": "https://orion:1026", "upstream_ca": "pki/ca.crt"}}))
    assert upstream_context(load_config(tmp_path / "proxy.yaml")) is not None


def test_without_the_setting_the_system_store_verifies_and_plain_http_needs_none():
    ctx = upstream_context(config())
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert upstream_context(config("http://orion:1026")) is None


def test_a_missing_file(tmp_path):
    assert problem(config(upstream_ca=str(tmp_path / "nope.pem"))) == \
        f"http.upstream_ca: no such file: {tmp_path / 'nope.pem'}"


def test_a_folder(tmp_path):
    assert problem(config(upstream_ca=str(tmp_path))) == f"http.upstream_ca: not a file: {tmp_path}"


@pytest.mark.parametrize("content", [b"", b"not a certificate\n", b"key"], ids=["empty", "text", "a private key"])
def test_a_file_with_no_certificate(tmp_path, content):
    path = tmp_path / "ca.pem"
    path.write_bytes(Path(make_pki(tmp_path / "pki").server_key).read_bytes() if content == b"key" else content)
    assert problem(config(upstream_ca=str(path))) == f"http.upstream_ca: no PEM certificate in {path}"


def test_a_der_certificate_is_not_a_pem_bundle(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    pki = make_pki(tmp_path / "pki")
    der = tmp_path / "ca.der"
    der.write_bytes(x509.load_pem_x509_certificate(pki.ca.read_bytes()).public_bytes(Encoding.DER))
    assert problem(config(upstream_ca=str(der))) == f"http.upstream_ca: no PEM certificate in {der}"


def test_keygate_check_and_serve_refuse_it_locally(tmp_path):
    """The tls check (local: it refuses serve's start, unlike the orion check, a warning there)."""
    [result] = check_tls(config(upstream_ca=str(tmp_path / "nope.pem")))
    assert (result.status, result.detail) == ("fail", f"http.upstream_ca: no such file: {tmp_path / 'nope.pem'}")


async def test_keygate_check_names_a_bad_ca_file_once(tmp_path):
    """The tls check says what is wrong with the file; the orion check, which cannot try without
    it, says so and points there, instead of the same line twice."""
    cfg = config(upstream_ca=str(tmp_path / "nope.pem"))
    [tls] = check_tls(cfg)
    orion = await check_orion(cfg)
    assert tls.status == "fail" and tls.detail == f"http.upstream_ca: no such file: {tmp_path / 'nope.pem'}"
    assert orion is not None and orion.status == "fail", orion
    assert "no such file" not in orion.detail and "not tried" in orion.detail and "tls check" in orion.detail
