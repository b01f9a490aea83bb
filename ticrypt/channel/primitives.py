"""The channel's cryptographic primitives, as small functions on raw bytes.

Every cryptographic call the channel makes goes through this module, so the
Wycheproof tests (``test/test_channel_wycheproof.py``) exercise exactly the
code the channel runs. All primitives are available in WebCrypto.

Policy decisions (Wycheproof "acceptable" cases):

* Ed25519: verification is OpenSSL's (cofactorless, strict ``S < L``, no
  malleability). In addition, public keys of small order (the 8 torsion
  points, in any encoding) are refused: a signature under such a key proves
  nothing, since anyone can produce one. Mixed-order keys are left to OpenSSL.
* X25519: any 32-byte public value is accepted (twist points, non-canonical
  u-coordinates), as RFC 7748 requires, except when the shared secret is all
  zero (low-order input), which raises ``ChannelError("low-order-point")``.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ticrypt.channel.errors import ChannelError

ED25519_PUBLIC_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
X25519_SIZE = 32
HMAC_SHA256_SIZE = 32
AES256_KEY_SIZE = 32
GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw

# Curve constants of edwards25519 (RFC 8032, section 5.1), used only to spot
# small-order public keys.
_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def ed25519_public_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(_RAW, _RAW_PUB)


def ed25519_sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """A 64-byte Ed25519 signature (deterministic)."""
    return key.sign(message)


def _ed25519_small_order(public: bytes) -> bool:
    """True when ``public`` decodes to a point P with [8]P = identity."""
    y = int.from_bytes(public, "little") & ((1 << 255) - 1)
    y %= _P  # treat non-canonical encodings like the point they alias
    sign = public[31] >> 7
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return False  # not on the curve: OpenSSL refuses it anyway
    if x & 1 != sign:
        x = (_P - x) % _P
    for _ in range(3):  # complete twisted Edwards doubling, a = -1
        xx, yy = x * x % _P, y * y % _P
        t = _D * xx * yy % _P
        x, y = (
            2 * x * y * pow(1 + t, _P - 2, _P) % _P,
            (yy + xx) * pow(1 - t, _P - 2, _P) % _P,
        )
    return x == 0 and y == 1


def ed25519_verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message``.

    Never raises for bad input: wrong lengths, undecodable or small-order keys
    and invalid signatures all return False.
    """
    if len(public) != ED25519_PUBLIC_SIZE or len(signature) != ED25519_SIGNATURE_SIZE:
        return False
    if _ed25519_small_order(public):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def x25519_public(private: bytes) -> bytes:
    """The X25519 public value of the 32-byte secret ``private`` (clamped per RFC 7748)."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(_RAW, _RAW_PUB)


def x25519_shared(private: bytes, public: bytes) -> bytes:
    """X25519(private, public); ChannelError("low-order-point") on an all-zero result."""
    if len(private) != X25519_SIZE or len(public) != X25519_SIZE:
        raise ValueError("X25519 keys are 32 bytes")
    key = X25519PrivateKey.from_private_bytes(private)
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        # OpenSSL refuses the all-zero output itself.
        raise ChannelError("low-order-point") from None
    if not any(shared):
        raise ChannelError("low-order-point")
    return shared


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869); ValueError if ``length`` > 255 * 32."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def sha256(data: bytes) -> bytes:
    """SHA-256 digest."""
    return hashlib.sha256(data).digest()


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256 tag."""
    return hmac.new(key, message, hashlib.sha256).digest()


def hmac_sha256_verify(key: bytes, message: bytes, tag: bytes) -> bool:
    """Constant-time check of an HMAC-SHA256 tag."""
    return hmac.compare_digest(hmac_sha256(key, message), tag)


def _check_gcm(key: bytes, nonce: bytes) -> None:
    if len(key) != AES256_KEY_SIZE:
        raise ValueError("AES-256-GCM key must be 32 bytes")
    if len(nonce) != GCM_NONCE_SIZE:
        raise ValueError("GCM nonce must be 12 bytes")


def aesgcm_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM encryption; returns ciphertext || 16-byte tag."""
    _check_gcm(key, nonce)
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aesgcm_open(key: bytes, nonce: bytes, ciphertext: bytes | memoryview, aad: bytes) -> bytes:
    """AES-256-GCM decryption of ciphertext || tag; ChannelError("decrypt-failed") on failure."""
    _check_gcm(key, nonce)
    if len(ciphertext) < GCM_TAG_SIZE:
        raise ChannelError("decrypt-failed")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise ChannelError("decrypt-failed") from None
