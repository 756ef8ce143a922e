"""Device certificate enrollment: checking a CSR and signing it with the device CA.

A certificate signed by ``tls.client_ca`` proves nothing on its own: the CA
may have signed it for an earlier registration of the same id, or for a
device since deleted. A device authenticates by certificate only once its
owner has enrolled it (``POST /devices/{id}/certificate`` with the device's
CSR): keygate signs it with ``tls.client_ca_key`` and records the
certificate's SHA-256 fingerprint with the registration, and the gateways
accept a client certificate only when its fingerprint is recorded there.

Nothing here touches the store or the event loop; the service calls it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.config import Config, ConfigError, read_secret

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192  # beyond this a key costs the gateway more than it protects
CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
#: notBefore is back-dated a little, for devices whose clocks run behind.
BACKDATE = dt.timedelta(minutes=5)
#: How many enrolled certificates a device keeps: the new one and the one it replaces (rollover).
KEEP = 2
PEM_CSR = b"-----BEGIN CERTIFICATE REQUEST-----"
MAX_CN = 64  # X.509's upper bound for a common name (device ids may be longer)


class CsrProblem(ValueError):
    """Why a CSR is refused, phrased for the client."""


@dataclass(frozen=True)
class Issued:
    certificate: str   # the leaf, PEM
    chain: str         # the leaf and the CA, PEM
    serial: str        # hex, as serial_hex()
    fingerprint: str   # hex SHA-256 of the leaf's DER
    not_after: float   # unix time


def serial_hex(serial: int) -> str:
    """Lower-case hex, an even number of digits (what ``openssl x509 -serial`` shows, lower-cased)."""
    text = f"{serial:x}"
    return text if len(text) % 2 == 0 else "0" + text


def normal_serial(text: str) -> str | None:
    """``text`` as :func:`serial_hex` writes it (any case, colons or leading zeros), or None."""
    digits = text.replace(":", "")
    if not 1 <= len(digits) <= 64 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        return None
    return serial_hex(int(digits, 16))


def fingerprint_of(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def key_problem(key: PublicKeyTypes) -> str | None:
    """Why a public key is too weak or of a kind keygate does not accept, or None."""
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            return f"RSA keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, not {key.key_size}"
        return None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in CURVES:
            return f"EC keys must be on P-256 or P-384, not {key.curve.name}"
        return None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return "the key must be RSA (2048 bits or more), EC P-256 or P-384, or Ed25519"


def check_csr(data: bytes, device_id: str) -> x509.CertificateSigningRequest:
    """The parsed CSR when it may be signed for ``device_id``; CsrProblem otherwise.

    PEM, or DER (what ``application/pkcs10`` means strictly), or base64 DER (as EST clients
    send it). Its signature must verify
    (the requester holds the key), its key must be strong, and its subject must be
    exactly one CN: the device id."""
    if len(device_id) > MAX_CN:
        raise CsrProblem(f"a certificate's CN holds at most {MAX_CN} characters: this device id is too long "
                         "for a certificate (use its keys)")
    try:
        if data.lstrip().startswith(PEM_CSR):
            csr = x509.load_pem_x509_csr(data.strip())
        elif data[:1] == b"\x30":  # a DER SEQUENCE
            csr = x509.load_der_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(base64.b64decode(data, validate=False))
        public_key = csr.public_key()
    except (ValueError, binascii.Error, UnsupportedAlgorithm):
        raise CsrProblem("csr must be a PEM certificate signing request (openssl req -new)") from None
    problem = key_problem(public_key)
    if problem:
        raise CsrProblem(problem)
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CsrProblem("the CSR's signature does not verify")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != device_id:
        raise CsrProblem(f"the CSR's subject CN must be the device id {device_id!r}")
    return csr


#: The kinds of key a device CA may have (from_config refuses any other).
CAKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class DeviceCA:
    """The device CA's certificate and key: signs enrolled device certificates."""

    def __init__(self, cert: x509.Certificate, key: CAKey, *, days: int):
        self.cert = cert
        self.key = key
        self.days = days
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        if isinstance(key, ed25519.Ed25519PrivateKey):
            self._hash: hashes.SHA256 | hashes.SHA384 | None = None  # Ed25519 signs without a separate hash
        elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
            self._hash = hashes.SHA384()
        else:
            self._hash = hashes.SHA256()

    @classmethod
    def from_config(cls, config: Config) -> DeviceCA | None:
        """The CA of ``tls.client_ca`` with ``tls.client_ca_key``; None when no key is configured.
        ConfigError (one line, naming the key) when the files do not make a usable CA."""
        tls = config.tls
        if not tls.client_ca_key:
            return None
        key_path, ca_path = config.resolve(tls.client_ca_key), config.resolve(tls.client_ca)
        password = read_secret(tls.client_ca_key_password, tls.client_ca_key_password_file, config)
        try:
            key_pem = key_path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"tls.client_ca_key: no such file: {key_path}") from None
        except OSError as exc:
            raise ConfigError(f"tls.client_ca_key: cannot read {key_path}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password.encode() if password else None)
        except TypeError:  # encrypted without a password, or a password for a plain key
            hint = ("is encrypted: set tls.client_ca_key_password or tls.client_ca_key_password_file"
                    if not password else "is not encrypted: remove tls.client_ca_key_password")
            raise ConfigError(f"tls.client_ca_key: {key_path} {hint}") from None
        except (ValueError, UnsupportedAlgorithm):
            raise ConfigError(f"tls.client_ca_key: cannot load {key_path}: "
                              "not a PEM private key, or the wrong password") from None
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
            raise ConfigError(f"tls.client_ca_key: {key_path}: expected an RSA, EC or Ed25519 key")
        try:
            certs = x509.load_pem_x509_certificates(ca_path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"tls.client_ca: no such file: {ca_path}") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tls.client_ca: cannot load {ca_path}: {getattr(exc, 'strerror', None) or exc}"
                              ) from None
        spki = _spki(key.public_key())
        cert = next((c for c in certs if _spki(c.public_key()) == spki), None)
        if cert is None:
            raise ConfigError(f"tls.client_ca_key: {key_path} is the key of no certificate in {ca_path}")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise ConfigError(f"tls.client_ca: the certificate of tls.client_ca_key in {ca_path} is not a CA")
        if cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
            raise ConfigError(f"tls.client_ca: the device CA in {ca_path} expired on "
                              f"{cert.not_valid_after_utc:%Y-%m-%d}")
        return cls(cert, key, days=tls.client_cert_days)

    def issue(self, csr: x509.CertificateSigningRequest, device_id: str, now: float) -> Issued:
        """A client certificate for ``device_id`` on the CSR's key (the CSR checked by :func:`check_csr`)."""
        start = dt.datetime.fromtimestamp(int(now), dt.UTC)
        # Never past the CA's own expiry: a chain that cannot verify is of no use to the device.
        end = min(start + dt.timedelta(days=self.days), self.cert.not_valid_after_utc)
        public_key = csr.public_key()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
                .issuer_name(self.cert.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())  # 159 random bits
                .not_valid_before(start - BACKDATE).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(self._aki, critical=False)
                .sign(self.key, self._hash))
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        return Issued(certificate=pem, chain=pem + self.cert_pem, serial=serial_hex(cert.serial_number),
                      fingerprint=fingerprint_of(cert.public_bytes(serialization.Encoding.DER)),
                      not_after=cert.not_valid_after_utc.timestamp())


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
