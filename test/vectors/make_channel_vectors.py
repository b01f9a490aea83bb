"""Regenerate ``test/vectors/channel-v1.json``, the secure channel's test vectors.

Run from the project root: ``python test/vectors/make_channel_vectors.py``.
Fixed Ed25519 seeds and fixed "random" bytes go through the real channel
code; the intermediate values (transcript hashes, key schedule) are computed
again here straight from the spec with hashlib/hmac/cryptography, so the file
also checks the implementation against PROTOCOL.md §4.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.kdf.hkdf import HKDF  # noqa: E402

from ticrypt.channel import SendMessage, UserChannel, VmChannel  # noqa: E402

OUTPUT = Path(__file__).resolve().parent / "channel-v1.json"

VM_ID = "vm-0001"
USER_SEED = bytes(range(0x00, 0x20))
VM_SEED = bytes(range(0x20, 0x40))
USER_RNG = bytes(range(0x40, 0x80))  # ephemeral X25519 secret, then hello nonce
VM_RNG = bytes(range(0x80, 0xC0))  # ephemeral X25519 secret, then hello nonce
RECORDS = [
    ("user-to-vm", b"hello vm"),
    ("user-to-vm", b""),
    ("vm-to-user", b"hello user"),
    ("vm-to-user", bytes(range(256))),
]


class FixedRng:
    """An rng that hands out a fixed byte string, in order, and nothing more."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __call__(self, size: int) -> bytes:
        if size > len(self._data):
            raise AssertionError("fixed rng exhausted")
        out, self._data = self._data[:size], self._data[size:]
        return out


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def spec_values(client_hello: str, vm_hello: str) -> dict[str, bytes]:
    """Transcript hashes and keys, computed straight from the spec."""
    vm_obj = json.loads(vm_hello)
    partial = {k: v for k, v in vm_obj.items() if k not in ("sig", "confirm")}
    th1 = hashlib.sha256(client_hello.encode() + _canonical(partial)).digest()
    th2 = hashlib.sha256(th1 + vm_hello.encode()).digest()
    e_u = X25519PrivateKey.from_private_bytes(USER_RNG[:32])
    e_v_pub = X25519PrivateKey.from_private_bytes(VM_RNG[:32]).public_key()
    shared = e_u.exchange(e_v_pub)
    okm = HKDF(
        algorithm=hashes.SHA256(), length=128, salt=th1, info=b"ticrypt-channel-v1 keys"
    ).derive(shared)
    return {
        "th1": th1,
        "th2": th2,
        "shared": shared,
        "k_u2v": okm[0:32],
        "k_v2u": okm[32:64],
        "c_user": okm[64:96],
        "c_vm": okm[96:128],
    }


def _text(events: list[Any]) -> str:
    message = events[0]
    assert isinstance(message, SendMessage) and isinstance(message.data, str)
    return message.data


def make_vectors() -> dict[str, Any]:
    """Run a whole session with the fixed inputs; return the vector document."""
    user_key = Ed25519PrivateKey.from_private_bytes(USER_SEED)
    vm_key = Ed25519PrivateKey.from_private_bytes(VM_SEED)
    user_pub, vm_pub = _raw_public(user_key), _raw_public(vm_key)
    user = UserChannel(user_key, VM_ID, vm_pub, rng=FixedRng(USER_RNG))
    vm = VmChannel(vm_key, VM_ID, lambda key: key == user_pub, rng=FixedRng(VM_RNG))
    client_hello = _text(user.start())
    vm_hello = _text(vm.receive(client_hello))
    client_finish = _text(user.receive(vm_hello))
    vm.receive(client_finish)
    records = []
    seqs = {"user-to-vm": 0, "vm-to-user": 0}
    for direction, plaintext in RECORDS:
        sender, receiver = (user, vm) if direction == "user-to-vm" else (vm, user)
        record = sender.seal(plaintext)
        receiver.receive(record)
        records.append(
            {
                "direction": direction,
                "seq": seqs[direction],
                "plaintext": plaintext.hex(),
                "record": record.hex(),
            }
        )
        seqs[direction] += 1
    doc: dict[str, Any] = {
        "description": (
            "ticrypt secure channel v1 test vectors (PROTOCOL.md §4). "
            "Bytes are hex; messages are the exact websocket text. "
            "Each side's rng output is consumed in order: 32 bytes of ephemeral "
            "X25519 secret, then the 32-byte hello nonce."
        ),
        "generator": "test/vectors/make_channel_vectors.py",
        "vm_id": VM_ID,
        "user_ed25519_seed": USER_SEED.hex(),
        "user_ed25519_public": user_pub.hex(),
        "vm_ed25519_seed": VM_SEED.hex(),
        "vm_ed25519_public": vm_pub.hex(),
        "user_rng": USER_RNG.hex(),
        "vm_rng": VM_RNG.hex(),
        "client_hello": client_hello,
        "vm_hello": vm_hello,
        "client_finish": client_finish,
    }
    doc.update({k: v.hex() for k, v in spec_values(client_hello, vm_hello).items()})
    doc["records"] = records
    return doc


def main() -> None:
    OUTPUT.write_text(json.dumps(make_vectors(), indent=2) + "\n")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
