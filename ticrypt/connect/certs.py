"""Tunnel client certificates, and the TLS client that pins vmc's certificate.

connect makes one self-signed ECDSA P-256 certificate per tunnel
(:meth:`CertStore.create`); the frontend hands its PEM to vmc over the
encrypted control channel (``tunnel-accept``), vmc pins it, and answers
its own certificate's fingerprint, which connect pins in turn
(:func:`pinned_client`).  There is no CA on either side: each end trusts
exactly one certificate.

The private key never leaves connect: it is written 0600 in
``<state_dir>/certs/<id>.key`` and only ever read back into an
``SSL.Context``.  Fingerprints are ``sha256:<hex of the DER>``, as vmc and
rest write them.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import re
import secrets
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from ticrypt.fsutil import atomic_write

FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
CERT_ID_RE = re.compile(r"c[0-9a-f]{16}")


def fingerprint_der(der: bytes) -> str:
    """``sha256:<hex>`` of a DER certificate."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def fingerprint_pem(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


class CertError(Exception):
    """No such certificate, or too many; ``str()`` is one line."""


@attrs.frozen
class TunnelCert:
    """One client certificate: ``id``, its PEM and fingerprint, and where
    its key and certificate are kept."""

    id: str
    cert_pem: bytes
    fingerprint: str
    key_path: str
    cert_path: str
    expires: float

    def public(self) -> dict[str, Any]:
        """What the API shows (never the key)."""
        return {"id": self.id, "cert": self.cert_pem.decode("ascii"),
                "fingerprint": self.fingerprint, "expires": int(self.expires)}


class CertStore:
    """Client certificates in ``directory`` (created 0700): at most
    ``max_certs``; the oldest unused one is removed to make room for a new."""

    log = Logger()

    def __init__(self, directory: str, clock: Any, *, lifetime: float, max_certs: int):
        self.dir = directory
        self._clock = clock
        self._lifetime = lifetime
        self._max = max_certs
        self._certs: dict[str, TunnelCert] = {}
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        self._load()

    def _load(self) -> None:
        """The certificates kept from an earlier run (expired ones removed)."""
        for name in sorted(os.listdir(self.dir)):
            cid, ext = os.path.splitext(name)
            if ext != ".pem" or not CERT_ID_RE.fullmatch(cid):
                continue
            key_path = os.path.join(self.dir, cid + ".key")
            cert_path = os.path.join(self.dir, name)
            try:
                with open(cert_path, "rb") as f:
                    pem = f.read()
                cert = x509.load_pem_x509_certificate(pem)
            except (OSError, ValueError):
                continue
            expires = cert.not_valid_after_utc.timestamp()
            if expires <= self._clock.seconds() or not os.path.exists(key_path):
                self._remove_files(cid)
                continue
            self._certs[cid] = TunnelCert(cid, pem, fingerprint_der(
                cert.public_bytes(serialization.Encoding.DER)), key_path, cert_path, expires)

    def __len__(self) -> int:
        return len(self._certs)

    def create(self, in_use: frozenset[str] = frozenset()) -> TunnelCert:
        """A new key and self-signed certificate; CertError when ``max_certs``
        are kept and all are ``in_use``."""
        self._prune(in_use)
        if len(self._certs) >= self._max:
            raise CertError(f"{self._max} certificates are in use; close a tunnel first")
        cid = "c" + secrets.token_hex(8)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.fromtimestamp(self._clock.seconds(), datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"ticrypt-connect {cid}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(seconds=self._lifetime))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        key_path = os.path.join(self.dir, cid + ".key")
        cert_path = os.path.join(self.dir, cid + ".pem")
        atomic_write(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), 0o600)
        atomic_write(cert_path, pem, 0o600)
        tc = TunnelCert(cid, pem, fingerprint_der(cert.public_bytes(serialization.Encoding.DER)),
                        key_path, cert_path, cert.not_valid_after_utc.timestamp())
        self._certs[cid] = tc
        return tc

    def get(self, cid: str) -> TunnelCert:
        """The certificate ``cid``; CertError if unknown or expired."""
        tc = self._certs.get(cid)
        if tc is None:
            raise CertError(f"no certificate {cid!r}; create one with POST /v1/certs")
        if tc.expires <= self._clock.seconds():
            raise CertError(f"certificate {cid} has expired; create a new one")
        return tc

    def _prune(self, in_use: frozenset[str]) -> None:
        now = self._clock.seconds()
        for cid, tc in list(self._certs.items()):
            if tc.expires <= now and cid not in in_use:
                self.remove(cid)
        while len(self._certs) >= self._max:
            idle = [c for c in self._certs.values() if c.id not in in_use]
            if not idle:
                return
            self.remove(min(idle, key=lambda c: c.expires).id)

    def remove(self, cid: str) -> None:
        self._certs.pop(cid, None)
        self._remove_files(cid)

    def _remove_files(self, cid: str) -> None:
        for ext in (".key", ".pem"):
            try:
                os.unlink(os.path.join(self.dir, cid + ext))
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------- pinned TLS client

@implementer(IOpenSSLClientConnectionCreator)
class PinnedClient:
    """Client TLS (1.2 or later, no renegotiation) that presents one client
    certificate and accepts only the server certificate whose DER hashes to
    ``fingerprint``; any other, CA-signed or not, fails the handshake.

    The context is built once (the key is read once) and shared by every
    reconnection of one tunnel."""

    def __init__(self, cert: TunnelCert, fingerprint: str):
        if not FINGERPRINT_RE.fullmatch(fingerprint):
            raise ValueError("the fingerprint must be sha256:<64 lowercase hex>")
        self.fingerprint = fingerprint
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION
                        | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
        ctx.use_certificate_file(cert.cert_path)
        ctx.use_privatekey_file(cert.key_path)
        ctx.check_privatekey()
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        self._ctx = ctx

    def _verify(self, conn: SSL.Connection, x509cert: crypto.X509, errno: int, depth: int,
                ok: int) -> bool:
        # OpenSSL calls this for each certificate of the chain; only the
        # leaf (depth 0) matters, and it must be exactly the pinned one.
        if depth != 0:
            return True
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, x509cert)
        return hmac.compare_digest(fingerprint_der(der), self.fingerprint)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        conn.set_connect_state()
        return conn


def pinned_client(cert: TunnelCert, fingerprint: str) -> PinnedClient:
    """The TLS client options of one tunnel (ValueError on a malformed pin)."""
    return PinnedClient(cert, fingerprint)
