"""TLS material for deployments and tests: a private CA and server
certificates, client contexts that trust only that CA, and the ALPN policy
of every TLS listener.

``ticrypt-admin`` and ``ticrypt-lab`` use :func:`make_ca` and
:func:`make_server_cert` to produce PEM files; clients pin the CA file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import endpoints, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from ticrypt.fsutil import atomic_write


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(cert_path: str, key_path: str, name: str = "ticrypt private CA",
            days: int = 3650) -> None:
    """Write a self-signed CA certificate (0644) and its key (0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    atomic_write(key_path, _key_pem(key), 0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def make_server_cert(ca_cert_path: str, ca_key_path: str, out_path: str,
                     names: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                     days: int = 825) -> None:
    """Write key + certificate (signed by the CA) + CA chain into one PEM file,
    mode 0600, as Twisted's ``ssl:`` endpoint ``privateKey=`` expects."""
    with open(ca_cert_path, "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(ca_key_path, "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = (_key_pem(key) + cert.public_bytes(serialization.Encoding.PEM)
           + ca_cert.public_bytes(serialization.Encoding.PEM))
    atomic_write(out_path, pem, 0o600)


def server_endpoint(port: int | str, pem_path: str, interface: str = "127.0.0.1") -> str:
    """A Twisted ``ssl:`` server endpoint string for a combined PEM file."""
    iface = interface.replace(":", "\\:")
    return f"ssl:{port}:interface={iface}:privateKey={pem_path}"


#: What every TLS listener of ours speaks once the handshake is done: rest's
#: HTTPS, the proxy's websockets and its status page are all HTTP/1.1.
ALPN_PROTOCOLS: tuple[bytes, ...] = (b"http/1.1",)

_E = TypeVar("_E")


def select_alpn(conn: SSL.Connection, offered: list[bytes]) -> Any:
    """The server's ALPN choice: the first of :data:`ALPN_PROTOCOLS` the client
    offered, else none at all -- the handshake goes on without ALPN (RFC 7301
    allows a server to ignore the extension), it is not aborted."""
    for proto in ALPN_PROTOCOLS:
        if proto in offered:
            return proto
    return SSL.NO_OVERLAPPING_PROTOCOLS


def server_context(endpoint: Any) -> SSL.Context | None:
    """The one ``SSL.Context`` a Twisted ``ssl:`` server endpoint hands to all
    its connections (``CertificateOptions`` caches it), or None for an
    endpoint without TLS.  Changes must be made before the first connection."""
    creator = getattr(endpoint, "_sslContextFactory", None)
    if creator is None:
        if isinstance(endpoint, endpoints.SSL4ServerEndpoint):
            # a Twisted that renamed the attribute: fail loudly rather than
            # serve TLS without the settings below
            raise TypeError(f"cannot find the TLS context of {endpoint!r}")
        return None
    ctx: SSL.Context = creator.getContext()
    return ctx


def alpn_http11(endpoint: _E) -> _E:
    """Make TLS ``endpoint`` select ``http/1.1`` when a client offers it and
    complete the handshake without ALPN otherwise; returns ``endpoint``.

    Twisted's own select callback answers a client whose offer does not
    overlap the server's (empty, for ``ssl:`` endpoint strings) with an empty
    choice, which pyOpenSSL turns into a fatal ``internal_error`` alert: curl
    (``h2,http/1.1``), browsers and Python's ``ssl`` could not connect.
    :class:`ticrypt.service.ListenerService` applies this to every listener.
    Other endpoints are returned unchanged."""
    ctx = server_context(endpoint)
    if ctx is not None:
        ctx.set_alpn_select_callback(select_alpn)
    return endpoint


def client_options(hostname: str, ca_file: str) -> IOpenSSLClientConnectionCreator:
    """Client TLS that trusts only ``ca_file`` and verifies ``hostname`` (or IP)."""
    if not os.path.exists(ca_file):
        raise FileNotFoundError(f"CA file {ca_file} does not exist")
    with open(ca_file, "rb") as f:
        authority = ssl.Certificate.loadPEM(f.read())
    return ssl.optionsForClientTLS(hostname, trustRoot=authority)
