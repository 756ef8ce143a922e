"""``keygate certs``: development certificates (NOT for production).

``keygate certs init DIR`` writes

* ``ca.crt`` / ``ca.key``: a CA that signs the gateway's server certificate (clients trust ``ca.crt``);
* ``server.crt`` / ``server.key``: for localhost, 127.0.0.1 and ::1 (plus ``--host`` names);
* ``devices-ca.crt`` / ``devices-ca.key``: the device-signing CA (``tls.client_ca`` and
  ``tls.client_ca_key``, with which the ownership API signs enrolled device certificates).

``keygate certs device DIR DEVICE_ID`` issues a client certificate with the device
id as subject CN, signed by DIR's device CA, without enrolling it: the gateway
accepts only certificates enrolled through ``POST /api/v1/devices/{id}/certificate``,
so this one shows what an unenrolled certificate gets (refused). Keys are EC P-256,
written 0600; an existing file is never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.errors import CommandError

DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
INIT_FILES = ("ca.crt", "ca.key", "server.crt", "server.key", "devices-ca.crt", "devices-ca.key")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str, org: str = "keygate development") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(**on: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{n: on.get(n, False) for n in names})


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise CommandError(f"{path}: exists (use --force to replace it)")
    # Create private keys 0600 from the first byte: never world-readable, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(cn: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(cn: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *, days: int,
              server_names: list[str] | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate (``server_names`` given) or a client certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names is not None else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(digital_signature=True), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server_names is not None:
        sans: list[x509.GeneralName] = []
        for name in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def init_dir(directory: str | Path, *, hosts: list[str] | None = None, days: int = 365,
             force: bool = False) -> dict[str, Path]:
    """Writes the development CA, server certificate and device CA; returns name -> path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = {name: d / name for name in INIT_FILES}
    if not force:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise CommandError(f"{existing[0]}: exists (use --force to replace the development certificates)")
    linked = [str(p) for p in paths.values() if p.is_symlink()]
    if linked:  # checked up front so that a refusal leaves the folder as it was
        raise CommandError(f"{linked[0]}: is a symbolic link; refusing to write through it")
    names = ["localhost", "127.0.0.1", "::1", *(hosts or [])]
    ca_key, ca_cert = make_ca("keygate development CA", days)
    srv_key, srv_cert = make_leaf(names[0] if not hosts else hosts[0], ca_key, ca_cert, days=days,
                                  server_names=list(dict.fromkeys(names)))
    dev_key, dev_cert = make_ca("keygate development devices CA", days)
    for name, data, private in (("ca.crt", _cert_pem(ca_cert), False), ("ca.key", _key_pem(ca_key), True),
                                ("server.crt", _cert_pem(srv_cert) + _cert_pem(ca_cert), False),
                                ("server.key", _key_pem(srv_key), True),
                                ("devices-ca.crt", _cert_pem(dev_cert), False),
                                ("devices-ca.key", _key_pem(dev_key), True)):
        _write(paths[name], data, private, force=True)
    return paths


def issue_device_cert(ca_dir: str | Path, device_id: str, out_dir: str | Path | None = None, *,
                      days: int = 365, force: bool = False) -> tuple[Path, Path]:
    """A client certificate with CN=device_id signed by ``ca_dir``'s device CA: (cert, key) paths."""
    if not DEVICE_ID.match(device_id):
        raise CommandError(f"{device_id!r}: a device id is 1-128 letters, digits, '.', '_', ':' or '-'")
    ca = Path(ca_dir)
    try:
        ca_cert = x509.load_pem_x509_certificate((ca / "devices-ca.crt").read_bytes())
        ca_key = serialization.load_pem_private_key((ca / "devices-ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise CommandError(f"{exc.filename}: no such file (run keygate certs init {ca} first)") from None
    except ValueError as exc:
        raise CommandError(f"{ca}: cannot read the device CA: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CommandError(f"{ca / 'devices-ca.key'}: expected an EC private key")
    key, cert = make_leaf(device_id, ca_key, ca_cert, days=days)
    out = Path(out_dir) if out_dir is not None else ca / "devices"
    out.mkdir(parents=True, exist_ok=True)
    crt_path, key_path = out / f"{device_id}.crt", out / f"{device_id}.key"
    _write(crt_path, _cert_pem(cert), False, force)
    _write(key_path, _key_pem(key), True, force)
    return crt_path, key_path


# ------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="certs_command", metavar="SUBCOMMAND", required=True)
    init = sub.add_parser("init", help="make a development CA, server certificate and device CA in DIR")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--host", action="append", default=[], metavar="NAME",
                      help="extra server name or IP (repeatable); localhost, 127.0.0.1 and ::1 are always in")
    init.add_argument("--days", type=int, default=365, help="validity (default 365)")
    init.add_argument("--force", action="store_true", help="replace existing files")
    dev = sub.add_parser("device", help="issue a device client certificate (CN = device id) from DIR's device CA, "
                                        "not enrolled: the gateway accepts only enrolled ones")
    dev.add_argument("dir", metavar="DIR")
    dev.add_argument("device_id", metavar="DEVICE_ID")
    dev.add_argument("--out", metavar="OUT_DIR", help="where to write DEVICE_ID.crt/.key (default DIR/devices)")
    dev.add_argument("--days", type=int, default=365)
    dev.add_argument("--force", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.days < 1:
        raise CommandError("--days: must be at least 1")
    try:
        return _run(args)
    except OSError as exc:
        raise CommandError(f"{exc.filename or args.dir}: {exc.strerror}") from None


def _run(args: argparse.Namespace) -> int:
    if args.certs_command == "init":
        paths = init_dir(args.dir, hosts=args.host, days=args.days, force=args.force)
        for name in INIT_FILES:
            print(paths[name])
        print(f"development certificates in {args.dir} (NOT for production): "
              f"tls.cert={paths['server.crt']} tls.key={paths['server.key']} tls.client_ca={paths['devices-ca.crt']} "
              f"tls.client_ca_key={paths['devices-ca.key']}")
        return 0
    crt, key = issue_device_cert(args.dir, args.device_id, args.out, days=args.days, force=args.force)
    print(crt)
    print(key)
    return 0
