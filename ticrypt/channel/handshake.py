"""Handshake messages, transcript hashes and key schedule (protocol v1).

Pure functions and value objects; the state machines live in
:mod:`ticrypt.channel.channel`. See ``PROTOCOL.md §4``.
"""

from __future__ import annotations

from typing import Any

import attrs

from ticrypt.channel.encoding import canonical, unb64
from ticrypt.channel.errors import ChannelError
from ticrypt.channel.primitives import (
    ED25519_PUBLIC_SIZE,
    ED25519_SIGNATURE_SIZE,
    HMAC_SHA256_SIZE,
    X25519_SIZE,
    hkdf_sha256,
)
from ticrypt.encoding import loads_bounded

VERSION = 1
MAX_HANDSHAKE_CHARS = 4096
NONCE_SIZE = 32
MAX_VM_ID_CHARS = 256

LABEL_USER_HELLO = b"ticrypt-channel-v1\x00user-hello\x00"
LABEL_VM_HELLO = b"ticrypt-channel-v1\x00vm-hello\x00"
LABEL_USER_FINISH = b"ticrypt-channel-v1\x00user-finish\x00"
HKDF_INFO = b"ticrypt-channel-v1 keys"
CONFIRM_VM = b"vm-finished"
CONFIRM_USER = b"user-finished"

# Fields of each message: a byte length for base64url fields, or a type.
_HELLO_FIELDS: dict[str, int | type] = {
    "type": str,
    "v": int,
    "role": str,
    "vm": str,
    "key": ED25519_PUBLIC_SIZE,
    "eph": X25519_SIZE,
    "nonce": NONCE_SIZE,
    "sig": ED25519_SIGNATURE_SIZE,
}
CLIENT_HELLO_FIELDS = _HELLO_FIELDS
VM_HELLO_FIELDS: dict[str, int | type] = {**_HELLO_FIELDS, "confirm": HMAC_SHA256_SIZE}
FINISH_FIELDS: dict[str, int | type] = {
    "type": str,
    "v": int,
    "sig": ED25519_SIGNATURE_SIZE,
    "confirm": HMAC_SHA256_SIZE,
}


@attrs.frozen
class SessionKeys:
    """Output of the key schedule; never printed."""

    k_u2v: bytes = attrs.field(repr=False)
    k_v2u: bytes = attrs.field(repr=False)
    c_user: bytes = attrs.field(repr=False)
    c_vm: bytes = attrs.field(repr=False)


def derive_keys(shared: bytes, th1: bytes) -> SessionKeys:
    """HKDF-SHA256(ikm=shared, salt=th1, info=HKDF_INFO, length=128), split in four."""
    okm = hkdf_sha256(shared, th1, HKDF_INFO, 128)
    return SessionKeys(okm[0:32], okm[32:64], okm[64:96], okm[96:128])


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def decode_handshake(text: str) -> dict[str, Any]:
    """Parse a handshake text message: a JSON object in exactly canonical form.

    Requiring ``text == canonical(obj)`` makes the transcript bytes equal the
    wire bytes and leaves no encoding freedom to an attacker.
    """
    if len(text) > MAX_HANDSHAKE_CHARS:
        raise ChannelError("bad-message")
    try:
        obj = loads_bounded(text, max_size=MAX_HANDSHAKE_CHARS,
                            object_pairs_hook=_no_duplicates)
        if not isinstance(obj, dict) or canonical(obj) != text.encode("ascii"):
            raise ValueError("not a canonical JSON object")
    except (ValueError, RecursionError):
        raise ChannelError("bad-message") from None
    return obj


def check_fields(obj: dict[str, Any], fields: dict[str, int | type]) -> dict[str, Any]:
    """Exact key set, types and decoded lengths; base64url fields come back as bytes.

    Also checks ``v``; ``type`` and ``role`` values are the caller's business.
    """
    if set(obj) != set(fields):
        raise ChannelError("bad-message")
    out: dict[str, Any] = {}
    for name, spec in fields.items():
        value = obj[name]
        if isinstance(spec, int):
            if not isinstance(value, str):
                raise ChannelError("bad-message")
            try:
                out[name] = unb64(value, spec)
            except ValueError:
                raise ChannelError("bad-message") from None
        elif type(value) is not spec:  # bool is not an int here
            raise ChannelError("bad-message")
        else:
            out[name] = value
    if out["v"] != VERSION:
        raise ChannelError("bad-message")
    if "vm" in out and not 0 < len(out["vm"]) <= MAX_VM_ID_CHARS:
        raise ChannelError("bad-message")
    return out


def check_role(obj: dict[str, Any], expected: str) -> None:
    """A hello whose role is another valid role is a reflection: ``wrong-role``."""
    role = obj.get("role")
    if role in ("user", "vm") and role != expected:
        raise ChannelError("wrong-role")
