"""A throwaway PKI for tests: a CA, a server certificate for 127.0.0.1, and a
device-signing CA (its key too: ``tls.client_ca_key``, so that enrollment works).

Device certificates authenticate only once enrolled: :func:`enroll` makes a key
and CSR, has the ownership service sign it, and writes the pair.
:meth:`Pki.device_cert` signs one directly with the device CA, *not* enrolled:
what an old or stolen CA-signed certificate looks like to the gateway.

Made with ``cryptography`` on EC P-256 keys (fast to generate), written as PEM
files so that every client (Python ssl, paho, gmqtt, mosquitto_pub) reads them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(cn: str, ca_key, ca_cert: x509.Certificate, *, server: bool,
          names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass
class Pki:
    dir: Path
    ca: Path              # trust anchor for clients (verifies the gateway)
    server_cert: Path
    server_key: Path
    devices_ca: Path      # tls.client_ca: signs device certificates
    devices_ca_key: Path  # tls.client_ca_key: what enrollment signs with
    _dev_key: ec.EllipticCurvePrivateKey
    _dev_cert: x509.Certificate
    _ca_key: ec.EllipticCurvePrivateKey
    _ca_cert: x509.Certificate

    def server_cert_for(self, *names: str) -> tuple[Path, Path]:
        """Another server certificate from the same CA, for ``names`` only (a host it must not stand for)."""
        key, cert = _leaf(names[0], self._ca_key, self._ca_cert, server=True, names=names)
        crt_path, key_path = self.dir / f"server-{names[0]}.crt", self.dir / f"server-{names[0]}.key"
        _write_cert(crt_path, cert)
        _write_key(key_path, key)
        return crt_path, key_path

    def device_cert(self, device_id: str, *, signed_by_rogue: bool = False) -> tuple[Path, Path]:
        """A client certificate with CN=device_id (or one from a CA the gateway does not trust)."""
        if signed_by_rogue:
            ca_key, ca_cert = _ca("rogue devices CA")
        else:
            ca_key, ca_cert = self._dev_key, self._dev_cert
        key, cert = _leaf(device_id, ca_key, ca_cert, server=False)
        tag = "rogue-" if signed_by_rogue else ""
        crt_path, key_path = self.dir / f"{tag}{device_id}.crt", self.dir / f"{tag}{device_id}.key"
        _write_cert(crt_path, cert)
        _write_key(key_path, key)
        return crt_path, key_path


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("keygate test CA")
    srv_key, srv_cert = _leaf("localhost", ca_key, ca_cert, server=True)
    dev_key, dev_cert = _ca("keygate test devices CA")
    paths = {n: directory / n for n in ("ca.crt", "server.crt", "server.key", "devices-ca.crt", "devices-ca.key")}
    _write_cert(paths["ca.crt"], ca_cert)
    _write_cert(paths["server.crt"], srv_cert)
    _write_key(paths["server.key"], srv_key)
    _write_cert(paths["devices-ca.crt"], dev_cert)
    _write_key(paths["devices-ca.key"], dev_key)
    return Pki(directory, paths["ca.crt"], paths["server.crt"], paths["server.key"], paths["devices-ca.crt"],
               paths["devices-ca.key"], dev_key, dev_cert, ca_key, ca_cert)


def make_csr(cn: str, key: Any = None) -> tuple[Any, bytes]:
    """A private key (EC P-256 unless given) and a PEM CSR for it with subject CN=``cn``."""
    key = key or _key()
    csr = (x509.CertificateSigningRequestBuilder().subject_name(_name(cn))
           .sign(key, None if _is_ed(key) else hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM)


def _is_ed(key: Any) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

    return isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey))


async def enroll(ownership: Any, actor: Any, device_id: str, directory: Path) -> tuple[Path, Path]:
    """Enroll a fresh certificate for ``device_id`` through the service; returns its (cert, key) paths."""
    key, csr = make_csr(device_id)
    issued = await ownership.enroll_certificate(actor, device_id, csr)
    directory.mkdir(parents=True, exist_ok=True)
    crt_path = directory / f"enrolled-{device_id}-{issued['serial'][:8]}.crt"
    key_path = crt_path.with_suffix(".key")
    crt_path.write_text(issued["certificate"])
    _write_key(key_path, key)
    return crt_path, key_path
