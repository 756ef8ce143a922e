"""TLS contexts for the listeners and reading a verified client certificate.

Server side: TLS 1.2 minimum (or 1.3 only), forward-secret AEAD ciphers for
1.2, no compression, no renegotiation, server cipher preference. With
``tls.client_ca`` set, a client certificate is verified against it:
``optional`` asks for one and verifies it when offered, ``required`` refuses
the handshake without one. Only a certificate that passed verification ever
yields a common name (a device id), and with it the certificate's SHA-256
fingerprint, which the ownership store must know for the device
(``OwnershipService.device_identity``): the CA's signature alone proves nothing.

Client side, towards Orion: :func:`upstream_context` is the one context every
client of an ``https://`` ``http.upstream`` uses (the gateway, the ownership
service's Orion client, ``keygate check``). It always verifies the chain and the
host name, against ``http.upstream_ca`` alone when set, else the system's store.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from proxy.config import Config, ConfigError, TlsConfig

# TLS 1.2 suites: ECDHE only (forward secrecy), AEAD only. TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])


def _hardened(ctx: ssl.SSLContext, min_version: str) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def server_context(tls: TlsConfig, base_dir: str | Path = ".", *, alpn: list[str] | None = None) -> ssl.SSLContext:
    """The listeners' SSLContext; ConfigError (one line naming the key) on a bad file."""
    base = Path(base_dir)

    def path(p: str) -> str:
        return str(Path(p) if Path(p).is_absolute() else base / p)

    if not tls.cert or not tls.key:
        raise ConfigError("tls.cert: required when a listener uses TLS")
    # ssl names no file when one is missing: say which key and which path.
    for key, value in (("tls.cert", tls.cert), ("tls.key", tls.key)):
        if not Path(path(value)).is_file():
            raise ConfigError(f"{key}: no such file: {path(value)}")
    ctx = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls.min_version)
    try:
        ctx.load_cert_chain(path(tls.cert), path(tls.key))
    except FileNotFoundError as exc:
        raise ConfigError(f"tls.cert/tls.key: no such file: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls.cert/tls.key: cannot load {path(tls.cert)} with {path(tls.key)}: "
                          f"{getattr(exc, 'reason', None) or exc}") from None
    if tls.client_ca:
        try:
            ctx.load_verify_locations(cafile=path(tls.client_ca))
        except FileNotFoundError:
            raise ConfigError(f"tls.client_ca: no such file: {path(tls.client_ca)}") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls.client_ca: cannot load {path(tls.client_ca)}: "
                              f"{getattr(exc, 'reason', None) or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.client_auth == "required" else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def client_context(cafile: str | Path | None = None, *, cert: str | Path | None = None,
                   key: str | Path | None = None, min_version: str = "1.2") -> ssl.SSLContext:
    """A verifying client context (tests, tools): trusts ``cafile``, presents ``cert``/``key`` if given."""
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def upstream_context(config: Config) -> ssl.SSLContext | None:
    """The verifying context for Orion at ``http.upstream``; None for a plain ``http://`` one.

    Trusts the certificates of ``http.upstream_ca`` (a PEM bundle) and nothing else, or, with it
    empty, the system's store. ConfigError (one line naming the key) on a file that gives none."""
    http = config.http
    if http is None or not http.upstream.lower().startswith("https://"):
        return None
    cafile = config.resolve(http.upstream_ca) if http.upstream_ca else None
    if cafile is not None and not cafile.is_file():
        problem = "not a file" if cafile.exists() else "no such file"
        raise ConfigError(f"http.upstream_ca: {problem}: {cafile}")
    try:
        ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except ssl.SSLError as exc:
        if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            raise ConfigError(f"http.upstream_ca: no PEM certificate in {cafile}") from None
        raise ConfigError(f"http.upstream_ca: cannot load {cafile}: {exc.reason or exc}") from None
    except OSError as exc:
        raise ConfigError(f"http.upstream_ca: cannot read {cafile}: {(exc.strerror or str(exc)).lower()}") from None
    if cafile is not None and not ctx.cert_store_stats()["x509"]:   # a bundle of CRLs only
        raise ConfigError(f"http.upstream_ca: no PEM certificate in {cafile}")
    # What create_default_context sets already, said here because it is the point: no setting turns it off.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])   # as aiohttp's own contexts
    return ctx


def peer_common_name(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The subject CN of the client certificate, only when the handshake verified it."""
    if ssl_object is None:
        return None
    # getpeercert() returns {} (not None) for an unverified certificate under CERT_NONE,
    # and the decoded dict only for a verified one: an empty dict must not count.
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    # "subject" holds the relative distinguished names, each a tuple of (attribute, value) pairs.
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    names = [value for rdn in subject for (attr, value) in rdn if attr == "commonName"]
    if len(names) != 1 or not names[0]:
        return None  # no CN, or several: ambiguous, refuse
    return names[0]


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    common_name: str
    fingerprint: str  # hex SHA-256 of the certificate's DER


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> PeerCertificate | None:
    """The verified client certificate's CN and fingerprint, or None (see :func:`peer_common_name`)."""
    cn = peer_common_name(ssl_object)
    if cn is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return PeerCertificate(cn, hashlib.sha256(der).hexdigest())
