"""Ed25519 identities: key files, public-key text form, fingerprints.

Public keys travel as ``ed25519:<base64url of the raw 32 bytes>``; the raw
base64url alone is accepted too.  Private keys are PKCS#8 PEM files, mode
0600, optionally encrypted with a passphrase.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ticrypt.config import check_file_mode
from ticrypt.encoding import b64, unb64
from ticrypt.fsutil import atomic_write

PREFIX = "ed25519:"


class KeyFileError(Exception):
    """A key file is missing, unsafe or not a key; ``str()`` says which."""


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_text(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """``ed25519:<b64url>`` for a key or raw 32 public bytes."""
    raw = key if isinstance(key, bytes) else public_bytes(key)
    return PREFIX + b64(raw)


def parse_public(text: str) -> bytes:
    """Raw 32 bytes from ``ed25519:<b64url>`` (or bare b64url); ValueError otherwise."""
    text = text.strip().split()[0] if text.strip() else ""
    if text.startswith(PREFIX):
        text = text[len(PREFIX):]
    raw = unb64(text, 32)
    Ed25519PublicKey.from_public_bytes(raw)
    return raw


def load_public(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(raw_public: bytes) -> str:
    """``SHA256:<b64url>`` of the raw public key, for humans and logs."""
    return "SHA256:" + b64(hashlib.sha256(raw_public).digest())


def verify(raw_public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(raw_public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def save_private(path: str, key: Ed25519PrivateKey, passphrase: bytes | None = None) -> None:
    """Write ``key`` as PKCS#8 PEM, mode 0600, atomically; refuse to overwrite."""
    if os.path.exists(path):
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key")
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    atomic_write(path, pem, 0o600)


def save_public(path: str, key: Ed25519PrivateKey | Ed25519PublicKey, comment: str = "") -> None:
    line = public_text(key) + (f" {comment}" if comment else "") + "\n"
    atomic_write(path, line.encode(), 0o644)


def load_private(path: str, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key; refuse files readable or writable by others."""
    try:
        check_file_mode(path, secret=True)
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file does not exist") from None
    except ValueError as e:
        raise KeyFileError(str(e)) from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read key file: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        if passphrase is None:
            raise KeyFileError(f"{path}: key is encrypted; a passphrase is needed") from None
        raise KeyFileError(f"{path}: key is not encrypted but a passphrase was given") from None
    except ValueError:
        raise KeyFileError(
            f"{path}: not a PEM private key, or wrong passphrase"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return key


def load_public_file(path: str) -> bytes:
    """Raw public key bytes from a file holding ``ed25519:<b64url>`` (or PEM)."""
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read public key: {e.strerror}") from None
    if data.startswith(b"-----BEGIN"):
        try:
            pub = serialization.load_pem_public_key(data)
        except ValueError:
            raise KeyFileError(f"{path}: not a PEM public key") from None
        if not isinstance(pub, Ed25519PublicKey):
            raise KeyFileError(f"{path}: not an Ed25519 public key")
        return public_bytes(pub)
    try:
        return parse_public(data.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise KeyFileError(f"{path}: expected 'ed25519:<base64url>'") from None
