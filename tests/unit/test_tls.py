"""TLS contexts and ``keygate certs``: real handshakes on 127.0.0.1, attacks included."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import stat
import warnings

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from proxy.certs import INIT_FILES, init_dir, issue_device_cert
from proxy.cli import main
from proxy.config import ConfigError, TlsConfig
from proxy.errors import CommandError
from proxy.tls import client_context, peer_common_name, server_context


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    init_dir(d)
    issue_device_cert(d, "sensor-1")
    # A device certificate from a CA the gateway does not trust.
    rogue = tmp_path_factory.mktemp("rogue")
    init_dir(rogue)
    issue_device_cert(rogue, "sensor-1")
    return d, rogue


def tls_config(d, **kw) -> TlsConfig:
    return TlsConfig(cert=str(d / "server.crt"), key=str(d / "server.key"), **kw)


async def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[str | None, bytes]:
    """Connects; returns (CN the server saw or None if it never got a connection, what the client read)."""
    seen: list[str | None] = []

    async def handle(reader, writer):
        cn = peer_common_name(writer.get_extra_info("ssl_object"))
        seen.append(cn)
        writer.write(f"hello:{cn}".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                           server_hostname="localhost")
            data = await asyncio.wait_for(reader.read(100), 5)
            writer.close()
        except (ssl.SSLError, ConnectionError, OSError):
            data = b""
        await asyncio.sleep(0.05)
    finally:
        server.close()
        await server.wait_closed()
    return (seen[0] if seen else "<no connection>"), data


# ----------------------------------------------------------------------------- certs init


def test_init_writes_the_files_with_private_keys_0600(certs):
    d, _ = certs
    for name in INIT_FILES:
        mode = stat.S_IMODE((d / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), name
    assert stat.S_IMODE((d / "devices" / "sensor-1.key").stat().st_mode) == 0o600


def test_server_certificate_names_and_issuer(certs):
    d, _ = certs
    cert = x509.load_pem_x509_certificate((d / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                             ipaddress.ip_address("::1")}
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_device_certificate_carries_the_device_id(certs):
    d, _ = certs
    cert = x509.load_pem_x509_certificate((d / "devices" / "sensor-1.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "sensor-1"
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((d / "devices-ca.crt").read_bytes()))


def test_init_refuses_to_overwrite(certs, capsys):
    d, _ = certs
    assert main(["certs", "init", str(d)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("keygate: ") and "exists (use --force" in err and err.count("\n") == 1


def test_cli_init_and_device(tmp_path, capsys):
    assert main(["certs", "init", str(tmp_path / "c"), "--host", "gw.example.org"]) == 0
    assert main(["certs", "device", str(tmp_path / "c"), "meter-7", "--out", str(tmp_path / "dev")]) == 0
    assert (tmp_path / "dev" / "meter-7.crt").exists() and (tmp_path / "dev" / "meter-7.key").exists()
    cert = x509.load_pem_x509_certificate((tmp_path / "c" / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "gw.example.org" in sans.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("device_id", ["", "../etc/passwd", "a b", "x" * 200, "-leading-dash"])
def test_device_ids_that_are_not_names_are_refused(certs, device_id):
    d, _ = certs
    with pytest.raises(CommandError, match="device id"):
        issue_device_cert(d, device_id)


def test_device_cert_without_a_ca_is_one_line(tmp_path):
    with pytest.raises(CommandError, match=r"devices-ca\.crt: no such file \(run keygate certs init"):
        issue_device_cert(tmp_path, "sensor-1")


# ----------------------------------------------------------------------------- server context


def test_server_context_is_hardened(certs):
    ctx = server_context(tls_config(certs[0]))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.verify_mode == ssl.CERT_NONE  # no client_ca: no client certificates asked for
    names = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert names and all(n.startswith("ECDHE-") and ("GCM" in n or "CHACHA20" in n) for n in names)


def test_missing_certificate_file_is_a_config_error(tmp_path):
    # The key and the path are named (ssl's own error names no file: it said "no such file: None").
    with pytest.raises(ConfigError, match=f"^tls.cert: no such file: {tmp_path / 'x.crt'}$"):
        server_context(TlsConfig(cert=str(tmp_path / "x.crt"), key=str(tmp_path / "x.key")))
    (tmp_path / "x.crt").write_text("")
    with pytest.raises(ConfigError, match=f"^tls.key: no such file: {tmp_path / 'x.key'}$"):
        server_context(TlsConfig(cert=str(tmp_path / "x.crt"), key=str(tmp_path / "x.key")))


def test_key_that_does_not_match_is_a_config_error(certs):
    d, rogue = certs
    with pytest.raises(ConfigError, match=r"^tls.cert/tls.key: cannot load"):
        server_context(TlsConfig(cert=str(d / "server.crt"), key=str(rogue / "server.key")))


def test_relative_paths_resolve_against_the_base_dir(certs):
    d, _ = certs
    assert server_context(TlsConfig(cert="server.crt", key="server.key", client_ca="devices-ca.crt"), d)


async def test_handshake_without_client_certificate(certs):
    d, _ = certs
    cn, data = await handshake(server_context(tls_config(d, client_ca=str(d / "devices-ca.crt"))),
                               client_context(d / "ca.crt"))
    assert cn is None and data == b"hello:None"


async def test_verified_device_certificate_yields_its_cn(certs):
    d, _ = certs
    client = client_context(d / "ca.crt", cert=d / "devices" / "sensor-1.crt", key=d / "devices" / "sensor-1.key")
    cn, data = await handshake(server_context(tls_config(d, client_ca=str(d / "devices-ca.crt"))), client)
    assert cn == "sensor-1" and data == b"hello:sensor-1"


async def test_certificate_from_an_untrusted_ca_is_refused(certs):
    d, rogue = certs
    client = client_context(d / "ca.crt", cert=rogue / "devices" / "sensor-1.crt",
                            key=rogue / "devices" / "sensor-1.key")
    cn, data = await handshake(server_context(tls_config(d, client_ca=str(d / "devices-ca.crt"))), client)
    assert cn == "<no connection>" and data == b""


async def test_client_certificate_is_ignored_without_client_ca(certs):
    # Without tls.client_ca nothing is verified, so nothing may be believed.
    d, _ = certs
    client = client_context(d / "ca.crt", cert=d / "devices" / "sensor-1.crt", key=d / "devices" / "sensor-1.key")
    cn, _ = await handshake(server_context(tls_config(d)), client)
    assert cn is None


async def test_required_client_auth_refuses_clients_without_certificate(certs):
    d, _ = certs
    cn, data = await handshake(server_context(tls_config(d, client_ca=str(d / "devices-ca.crt"),
                                                         client_auth="required")), client_context(d / "ca.crt"))
    assert cn == "<no connection>" and data == b""


async def test_old_protocol_versions_are_refused(certs):
    d, _ = certs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = client_context(d / "ca.crt")
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
        client.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client is willing: only the server can refuse
        lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        lax.load_cert_chain(d / "server.crt", d / "server.key")
        lax.minimum_version = ssl.TLSVersion.TLSv1
        lax.set_ciphers("DEFAULT:@SECLEVEL=0")
    assert (await handshake(lax, client))[1] == b"hello:None"  # control: TLS 1.1 works here
    cn, data = await handshake(server_context(tls_config(d)), client)
    assert cn == "<no connection>" and data == b""


async def test_tls13_only(certs):
    d, _ = certs
    client = client_context(d / "ca.crt")
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    cn, _ = await handshake(server_context(tls_config(d, min_version="1.3")), client)
    assert cn == "<no connection>"
    cn, data = await handshake(server_context(tls_config(d, min_version="1.3")), client_context(d / "ca.crt"))
    assert data == b"hello:None"


def test_peer_common_name_without_tls():
    assert peer_common_name(None) is None


def test_init_never_writes_a_key_through_a_symlink(tmp_path, capsys):
    target = tmp_path / "elsewhere"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ca.key").symlink_to(target)
    assert main(["certs", "init", str(tmp_path / "c"), "--force"]) == 1
    assert not target.exists() and not (tmp_path / "c" / "ca.crt").exists()
    assert "ca.key: is a symbolic link" in capsys.readouterr().err


def test_days_must_be_positive(tmp_path, capsys):
    assert main(["certs", "init", str(tmp_path), "--days", "0"]) == 1
    assert capsys.readouterr().err == "keygate: --days: must be at least 1\n"
