"""Regenerate ``test/vectors/channel-v1.json``, the secure channel's test vectors.

Run from the project root: ``python test/vectors/make_channel_vectors.py``.
Fixed Ed25519 seeds and fixed "random" bytes go through the real channel
code; the intermediate values (transcript hashes, key schedule) are computed
again here straight from the spec with hashlib/hmac/cryptography, so the file
also checks the implementation against PROTOCOL.md §4.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import (  # noqa: E402
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
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
    doc["negative"] = negative_vectors(doc)
    return doc


# -- negative vectors -----------------------------------------------------------
#
# Messages every implementation must refuse, each with the one error code the
# spec gives it.  They are built from the positive session above with the raw
# primitives; edwards25519 and X25519 are computed here in plain Python (RFC
# 8032 §5.1, RFC 7748 §5) to find and check the low-order points.

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_IDENTITY = (0, 1)
LABEL_USER_HELLO = b"ticrypt-channel-v1\x00user-hello\x00"
LABEL_VM_HELLO = b"ticrypt-channel-v1\x00vm-hello\x00"
#: A point of order 8 of edwards25519 (canonical encoding); checked below.
_ORDER_8 = bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _inv(x: int) -> int:
    return pow(x, _P - 2, _P)


def _ed_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """Addition on edwards25519 (a = -1), affine coordinates."""
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    return ((x1 * y2 + y1 * x2) * _inv(1 + t) % _P, (y1 * y2 + x1 * x2) * _inv(1 - t) % _P)


def _ed_mul(n: int, point: tuple[int, int]) -> tuple[int, int]:
    """[n]point for a small n."""
    out = _IDENTITY
    for _ in range(n):
        out = _ed_add(out, point)
    return out


def _ed_decode(enc: bytes) -> tuple[int, int]:
    """RFC 8032 §5.1.3 decoding, but lenient: y >= p and "-0" are allowed
    (reduced), so that non-canonical encodings decode to the point they alias."""
    raw = int.from_bytes(enc, "little")
    y, sign = (raw & ((1 << 255) - 1)) % _P, raw >> 255
    x2 = (y * y - 1) * _inv(_D * y * y + 1) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    assert (x * x - x2) % _P == 0, "not on the curve"
    if x & 1 != sign:
        x = (_P - x) % _P
    return x, y


def _ed_encode(point: tuple[int, int]) -> bytes:
    x, y = point
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _order(point: tuple[int, int]) -> int:
    return next(n for n in (1, 2, 4, 8) if _ed_mul(n, point) == _IDENTITY)


def small_order_ed25519_keys() -> list[tuple[str, bytes]]:
    """Every 32-byte encoding of the 8 torsion points: 8 canonical ones and
    the 6 non-canonical ones (y + p < 2^255, or x = 0 with the sign bit set)."""
    t8 = _ed_decode(_ORDER_8)
    assert _order(t8) == 8 and _ed_encode(t8) == _ORDER_8
    out = []
    for point in (_ed_mul(i, t8) for i in range(8)):
        x, y = point
        canonical = _ed_encode(point)
        out.append((f"order {_order(point)}", canonical))
        for y_enc in [y] + ([y + _P] if y + _P < 2**255 else []):
            for sign in sorted({x & 1} | ({1} if x == 0 else set())):
                enc = (y_enc | (sign << 255)).to_bytes(32, "little")
                if enc != canonical:
                    assert _ed_decode(enc) == point
                    out.append((f"order {_order(point)}, non-canonical", enc))
    assert len(out) == 14 and len({enc for _, enc in out}) == 14
    return out


def _x25519(scalar: bytes, u_enc: bytes) -> bytes:
    """RFC 7748 §5 X25519, as written there."""
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    n = int.from_bytes(k, "little")
    x1 = int.from_bytes(u_enc, "little") & ((1 << 255) - 1)
    x2, z2, x3, z3, swap = 1, 0, x1, 1, 0
    for t in reversed(range(255)):
        bit = (n >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % _P, (x2 - z2) % _P
        aa, bb = a * a % _P, b * b % _P
        e = (aa - bb) % _P
        c, d = (x3 + z3) % _P, (x3 - z3) % _P
        da, cb = d * a % _P, c * b % _P
        x3, z3 = (da + cb) ** 2 % _P, x1 * (da - cb) ** 2 % _P
        x2, z2 = aa * bb % _P, e * (aa + 121665 * e) % _P
    if swap:
        x2, z2 = x3, z3
    return (x2 * _inv(z2) % _P).to_bytes(32, "little")


#: X25519 public values whose result is all zero with any secret: the
#: u-coordinates of the points of order 1, 2, 4 and 8 of Curve25519 and its
#: twist, their non-canonical forms (u + p), and the same with bit 255 set
#: (which X25519 ignores).
_LOW_ORDER_U = [
    ("u = 0 (order 2; also the point at infinity's encoding)", 0),
    ("u = 1 (order 4)", 1),
    ("order 8", 325606250916557431795983626356110631294008115727848805560023387167927233504),
    ("order 8", 39382357235489614581723060781553021112529911719440698176882885853963445705823),
    ("u = p - 1 (order 4, on the twist)", _P - 1),
    ("u = p (non-canonical 0)", _P),
    ("u = p + 1 (non-canonical 1)", _P + 1),
]


def low_order_x25519() -> list[tuple[str, bytes]]:
    out = []
    for high in (0, 1):
        for name, u in _LOW_ORDER_U:
            enc = (u | (high << 255)).to_bytes(32, "little")
            out.append((name + (", bit 255 set" if high else ""), enc))
    for _, enc in out:
        for secret in (USER_RNG[:32], VM_RNG[:32]):
            assert _x25519(secret, enc) == bytes(32)
    return out


def negative_vectors(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The refusals, in the form of PROTOCOL.md §4 "Test vectors"."""
    user_key = Ed25519PrivateKey.from_private_bytes(USER_SEED)
    vm_key = Ed25519PrivateKey.from_private_bytes(VM_SEED)
    other_key = Ed25519PrivateKey.from_private_bytes(bytes(range(0xC0, 0xE0)))
    client_hello, vm_hello, finish = doc["client_hello"], doc["vm_hello"], doc["client_finish"]
    hello_obj = json.loads(client_hello)
    records = [bytes.fromhex(r["record"]) for r in doc["records"]]
    up0, up1, down0 = records[0], records[1], records[2]
    out: list[dict[str, Any]] = []

    def add(name: str, state: str, messages: list[str | bytes], error: str,
            note: str = "") -> None:
        entry: dict[str, Any] = {"name": name, "state": state, "messages": [
            {"text": m} if isinstance(m, str) else {"binary": m.hex()} for m in messages],
            "error": error}
        if note:
            entry["note"] = note
        out.append(entry)

    def flip(data: bytes, index: int) -> bytes:
        b = bytearray(data)
        b[index] ^= 0x01
        return bytes(b)

    def client_hello_with(signer: Ed25519PrivateKey, **fields: Any) -> str:
        body = {k: v for k, v in hello_obj.items() if k != "sig"}
        body.update(fields)
        sig = signer.sign(LABEL_USER_HELLO + _canonical(body))
        return _canonical({**body, "sig": _b64(sig)}).decode()

    def vm_hello_with(signer: Ed25519PrivateKey, **fields: Any) -> str:
        body = {k: v for k, v in json.loads(vm_hello).items() if k not in ("sig", "confirm")}
        body.update(fields)
        th1 = hashlib.sha256(client_hello.encode() + _canonical(body)).digest()
        sig = signer.sign(LABEL_VM_HELLO + th1)
        return _canonical({**body, "sig": _b64(sig), "confirm": _b64(bytes(32))}).decode()

    def with_field(text: str, **fields: Any) -> str:
        return _canonical({**json.loads(text), **fields}).decode()

    # Records (state: after the handshake, no record received yet).
    add("record-tag-tampered", "vm-established", [flip(up0, len(up0) - 1)], "decrypt-failed")
    add("record-ciphertext-tampered", "vm-established", [flip(up0, 9)], "decrypt-failed")
    add("record-tag-tampered-to-user", "user-established", [flip(down0, len(down0) - 1)],
        "decrypt-failed")
    add("record-reflected", "vm-established", [down0], "decrypt-failed",
        "a VM-to-user record sent back to the VM: other key")
    add("record-replayed", "vm-established", [up0, up0], "replay")
    add("record-replayed-older", "vm-established", [up0, up1, up0], "replay")
    add("record-out-of-order", "vm-established", [up1], "out-of-order",
        "seq 1 before seq 0")
    add("record-seq-tampered", "vm-established", [flip(up0, 8)], "out-of-order",
        "seq 0 changed to 1 (checked before the tag)")
    add("record-truncated-to-24", "vm-established", [up0[:24]], "bad-record")
    add("record-empty", "vm-established", [b""], "bad-record")
    add("record-tag-truncated", "vm-established", [up0[:-1]], "decrypt-failed")
    add("record-version-0", "vm-established", [b"\x00" + up0[1:]], "bad-record")
    add("record-version-2", "vm-established", [b"\x02" + up0[1:]], "bad-record")
    add("text-after-handshake", "vm-established", [finish], "plaintext-after-handshake")
    add("record-during-handshake", "vm-waiting-hello", [up0], "unexpected-message")
    add("record-before-finish", "vm-waiting-finish", [up0], "unexpected-message")

    # Handshake messages.
    add("client-hello-twice", "vm-waiting-finish", [client_hello], "unexpected-message")
    add("client-hello-reflected", "user-waiting-hello", [client_hello], "wrong-role")
    add("vm-hello-reflected", "vm-waiting-hello", [vm_hello], "wrong-role")
    add("client-hello-wrong-vm", "vm-waiting-hello",
        [client_hello_with(user_key, vm="vm-0002")], "wrong-vm")
    add("client-hello-bad-signature", "vm-waiting-hello",
        [with_field(client_hello, nonce=_b64(bytes(32)))], "bad-signature",
        "nonce changed after signing")
    add("client-hello-not-authorized", "vm-waiting-hello",
        [client_hello_with(other_key, key=_b64(_raw_public(other_key)))], "not-authorized",
        "well signed by a key the VM does not authorize")
    add("vm-hello-wrong-vm", "user-waiting-hello", [vm_hello_with(vm_key, vm="vm-0002")],
        "wrong-vm")
    add("vm-hello-other-key", "user-waiting-hello",
        [vm_hello_with(other_key, key=_b64(_raw_public(other_key)))], "vm-key-mismatch")
    add("vm-hello-bad-signature", "user-waiting-hello",
        [with_field(vm_hello, nonce=_b64(bytes(32)))], "bad-signature")
    add("vm-hello-bad-confirm", "user-waiting-hello",
        [with_field(vm_hello, confirm=_b64(bytes(32)))], "bad-confirm")
    add("client-finish-bad-signature", "vm-waiting-finish",
        [with_field(finish, sig=_b64(flip(base64.urlsafe_b64decode(
            json.loads(finish)["sig"] + "=="), 0)))], "bad-signature")
    add("client-finish-bad-confirm", "vm-waiting-finish",
        [with_field(finish, confirm=_b64(bytes(32)))], "bad-confirm")

    # Non-canonical JSON: the same ClientHello, signature valid over its fields.
    obj = json.loads(client_hello)
    for name, text in [
        ("spaces", json.dumps(obj, sort_keys=True)),
        ("key-order", json.dumps(dict(reversed(list(obj.items()))), separators=(",", ":"))),
        ("escaped-ascii", client_hello.replace('"hello"', '"h\\u0065llo"')),
        ("trailing-newline", client_hello + "\n"),
        ("duplicate-key", client_hello[:-1] + ',"v":1}'),
        ("v-as-float", client_hello.replace('"v":1', '"v":1.0')),
    ]:
        assert json.loads(text) == obj and text != client_hello
        add(f"client-hello-non-canonical-{name}", "vm-waiting-hello", [text], "bad-message")

    # Low-order X25519 public values, in well-signed hellos.
    for i, (what, u) in enumerate(low_order_x25519()):
        add(f"client-hello-low-order-eph-{i}", "vm-waiting-hello",
            [client_hello_with(user_key, eph=_b64(u))], "low-order-point", what)
        add(f"vm-hello-low-order-eph-{i}", "user-waiting-hello",
            [vm_hello_with(vm_key, eph=_b64(u))], "low-order-point", what)

    # Small-order Ed25519 keys: a ClientHello "signed" by one.  S = 0 and R a
    # torsion point with R + [k]A = 0 (the nonce is varied until one fits),
    # so plain cofactorless verification ([S]B == R + [k]A) accepts it; the
    # spec refuses small-order keys, so it is bad-signature all the same.
    for i, (what, enc_a) in enumerate(small_order_ed25519_keys()):
        hello, plain_ok = _forge_small_order_hello(hello_obj, enc_a)
        note = what + ("; passes plain Ed25519 verification" if plain_ok else "")
        add(f"client-hello-small-order-key-{i}", "vm-waiting-hello", [hello],
            "bad-signature", note)
    return out


def _forge_small_order_hello(hello_obj: dict[str, Any], enc_a: bytes) -> tuple[str, bool]:
    """A ClientHello under small-order key ``enc_a`` with a signature that
    cofactorless verification accepts; and whether OpenSSL accepts it too."""
    a = _ed_decode(enc_a)
    t8 = _ed_decode(_ORDER_8)
    torsion = [_ed_mul(i, t8) for i in range(8)]
    for attempt in range(1000):
        body = {k: v for k, v in hello_obj.items() if k != "sig"}
        body.update(key=_b64(enc_a),
                    nonce=_b64(hashlib.sha256(b"small-order %d" % attempt).digest()))
        message = LABEL_USER_HELLO + _canonical(body)
        for r in torsion:
            enc_r = _ed_encode(r)
            k = int.from_bytes(hashlib.sha512(enc_r + enc_a + message).digest(), "little") % _L
            if _ed_add(r, _ed_mul(k % 8, a)) == _IDENTITY:
                sig = enc_r + bytes(32)
                try:
                    Ed25519PublicKey.from_public_bytes(enc_a).verify(sig, message)
                    openssl = True
                except (InvalidSignature, ValueError):
                    openssl = False
                return _canonical({**body, "sig": _b64(sig)}).decode(), openssl
    raise AssertionError("no forgery found")


def main() -> None:
    OUTPUT.write_text(json.dumps(make_vectors(), indent=2) + "\n")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
