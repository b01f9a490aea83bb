"""Tests for ticrypt.channel: handshake, records, every failure, test vectors."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.trial.unittest import SynchronousTestCase

from ticrypt.channel import (
    MAX_PLAINTEXT,
    MESSAGES,
    ChannelError,
    Delivered,
    Established,
    SendMessage,
    UserChannel,
    VmChannel,
)
from ticrypt.channel.encoding import b64, canonical, unb64
from ticrypt.channel.handshake import decode_handshake

VECTORS = Path(__file__).resolve().parent / "vectors" / "channel-v1.json"

VM_ID = "vm-0001"
USER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(0x00, 0x20)))
VM_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(0x20, 0x40)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x99" * 32)

#: Low-order X25519 public values (from Wycheproof x25519_test.json, flag
#: LowOrderPublic): 0, 1, a point of order 8, and p (non-canonical 0).
LOW_ORDER_POINTS = [
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]
#: Every X25519 public value with an all-zero result (libsodium's blocklist:
#: 0, 1, the two order-8 points, p - 1, p, p + 1), and each with bit 255 set.
LOW_ORDER_POINTS_ALL = [
    bytes.fromhex(h[:62] + f"{int(h[62:], 16) | high:02x}")
    for h in ("00" * 32, "01" + "00" * 31,
              "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
              "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
              "ec" + "ff" * 30 + "7f", "ed" + "ff" * 30 + "7f", "ee" + "ff" * 30 + "7f")
    for high in (0, 0x80)
]


def raw(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    """Raw public key bytes."""
    pub: bytes = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return pub


USER_PUB, VM_PUB, OTHER_PUB = raw(USER_KEY), raw(VM_KEY), raw(OTHER_KEY)


class FixedRng:
    """Hands out a fixed byte string in order (test/vectors/make_channel_vectors.py)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def __call__(self, size: int) -> bytes:
        assert size <= len(self._data), "fixed rng exhausted"
        out, self._data = self._data[:size], self._data[size:]
        return out


def text_of(events: list[Any]) -> str:
    """The single text message in ``events`` (first event)."""
    [message, *_] = events
    assert isinstance(message, SendMessage) and isinstance(message.data, str)
    return message.data


def record_call(calls: list[bytes], key: bytes, answer: bool) -> bool:
    """An authorize() that records its argument."""
    calls.append(key)
    return answer


def make_pair(
    vm_id: str = VM_ID,
    expected_vm_id: str = VM_ID,
    vm_key: Ed25519PrivateKey = VM_KEY,
    expected_vm_pub: bytes = VM_PUB,
    user_key: Ed25519PrivateKey = USER_KEY,
    authorize: Callable[[bytes], bool] | None = None,
    max_records: tuple[int, int] = (2**32, 2**32),
) -> tuple[UserChannel, VmChannel]:
    """A fresh user/VM pair, before any message."""
    if authorize is None:
        authorize = lambda key: key == USER_PUB  # noqa: E731
    user = UserChannel(user_key, expected_vm_id, expected_vm_pub, max_records=max_records[0])
    vm = VmChannel(vm_key, vm_id, authorize, max_records=max_records[1])
    return user, vm


def established_pair(**kw: Any) -> tuple[UserChannel, VmChannel, list[str]]:
    """A pair after the three handshake messages, and those messages."""
    user, vm = make_pair(**kw)
    hello = text_of(user.start())
    reply = text_of(vm.receive(hello))
    finish = text_of(user.receive(reply))
    vm.receive(finish)
    return user, vm, [hello, reply, finish]


def fixed_pair(**kw: Any) -> tuple[UserChannel, VmChannel, list[str]]:
    """Like :func:`established_pair`, but every call builds the same session."""
    user, vm = make_pair(**kw)
    user._rng = FixedRng(bytes(range(0x40, 0x80)))
    vm._rng = FixedRng(bytes(range(0x80, 0xC0)))
    hello = text_of(user.start())
    reply = text_of(vm.receive(hello))
    finish = text_of(user.receive(reply))
    vm.receive(finish)
    return user, vm, [hello, reply, finish]


def mutate(text: str, **changes: Any) -> str:
    """Re-encode a handshake message with fields changed (None deletes)."""
    obj = json.loads(text)
    for name, value in changes.items():
        if value is None:
            del obj[name]
        else:
            obj[name] = value
    return canonical(obj).decode()


def flip_b64(text: str, field: str, index: int = 0) -> str:
    """Flip one bit of a base64url field of a handshake message."""
    data = bytearray(unb64(json.loads(text)[field]))
    data[index] ^= 0x01
    return mutate(text, **{field: b64(bytes(data))})


def forge_client_hello(
    user_key: Ed25519PrivateKey = USER_KEY, eph: bytes = b"\x09" * 32, vm_id: str = VM_ID
) -> str:
    """A correctly signed ClientHello with any ephemeral public value, per the spec."""
    body = {
        "type": "hello",
        "v": 1,
        "role": "user",
        "vm": vm_id,
        "key": b64(raw(user_key)),
        "eph": b64(eph),
        "nonce": b64(b"\x07" * 32),
    }
    sig = user_key.sign(b"ticrypt-channel-v1\x00user-hello\x00" + canonical(body))
    return canonical({**body, "sig": b64(sig)}).decode()


def forge_vm_hello(
    client_hello: str,
    vm_id: str = VM_ID,
    eph: bytes = b"\x09" * 32,
    key: Ed25519PrivateKey = VM_KEY,
) -> str:
    """A VmHello correctly signed over th1 with any fields; confirm is garbage."""
    body = {
        "type": "hello",
        "v": 1,
        "role": "vm",
        "vm": vm_id,
        "key": b64(raw(key)),
        "eph": b64(eph),
        "nonce": b64(b"\x08" * 32),
    }
    th1 = hashlib.sha256(client_hello.encode() + canonical(body)).digest()
    sig = key.sign(b"ticrypt-channel-v1\x00vm-hello\x00" + th1)
    return canonical({**body, "sig": b64(sig), "confirm": b64(bytes(32))}).decode()


class ChannelTestCase(SynchronousTestCase):
    """Assertion helpers shared by the channel tests."""

    def assert_fails(self, code: str, call: Callable[..., Any], *args: Any) -> ChannelError:
        """``call`` raises ChannelError(code) and the channel is dead afterwards.

        ``receive`` raises instead of returning events, so a failing message
        delivers nothing; the dead channel refuses everything after it.
        """
        error: ChannelError = self.assertRaises(ChannelError, call, *args)
        self.assertEqual((error.code, error.message), (code, MESSAGES[code]))
        channel = call.__self__  # type: ignore[attr-defined]
        self.assertTrue(channel.closed)
        self.assertFalse(channel.established)
        closed = self.assertRaises(ChannelError, channel.receive, b"\x01" * 40)
        self.assertEqual(closed.code, "closed")
        closed = self.assertRaises(ChannelError, channel.receive, "{}")
        self.assertEqual(closed.code, "closed")
        closed = self.assertRaises(ChannelError, channel.seal, b"x")
        self.assertEqual(closed.code, "closed")
        return error


class HandshakeTests(ChannelTestCase):
    """The successful path."""

    def test_handshake_and_records_both_ways(self) -> None:
        """Three text messages, then binary records flow both ways in order."""
        seen: list[bytes] = []
        user, vm = make_pair(authorize=lambda key: record_call(seen, key, True))
        self.assertFalse(user.established or vm.established)
        [hello] = user.start()
        assert isinstance(hello.data, str)
        [reply] = vm.receive(hello.data)
        self.assertEqual(seen, [USER_PUB])
        self.assertFalse(vm.established)
        assert isinstance(reply, SendMessage) and isinstance(reply.data, str)
        finish, done = user.receive(reply.data)
        assert isinstance(finish, SendMessage) and isinstance(finish.data, str)
        self.assertEqual(done, Established(VM_PUB))
        self.assertTrue(user.established)
        # The user may send at once: the relay keeps order behind Finish.
        early = user.seal(b"first")
        self.assertEqual(vm.receive(finish.data), [Established(USER_PUB)])
        self.assertTrue(vm.established)
        self.assertEqual((vm.peer_key, user.peer_key), (USER_PUB, VM_PUB))
        self.assertEqual(vm.receive(early), [Delivered(b"first")])
        for i in range(5):
            self.assertEqual(vm.receive(user.seal(b"up %d" % i)), [Delivered(b"up %d" % i)])
            self.assertEqual(user.receive(vm.seal(b"down %d" % i)), [Delivered(b"down %d" % i)])
        self.assertEqual(seen, [USER_PUB])

    def test_handshake_messages_are_text_records_binary(self) -> None:
        """Handshake messages are str, records bytes with the documented overhead."""
        user, vm, texts = established_pair()
        for text in texts:
            self.assertIsInstance(text, str)
            self.assertEqual(canonical(json.loads(text)).decode(), text)
        record = user.seal(b"abc")
        self.assertIsInstance(record, bytes)
        self.assertEqual(len(record), 1 + 8 + 3 + 16)

    def test_empty_and_maximal_plaintext(self) -> None:
        """0 and MAX_PLAINTEXT bytes both go through."""
        user, vm, _ = established_pair()
        big = bytes(range(256)) * (MAX_PLAINTEXT // 256)
        self.assertEqual(vm.receive(user.seal(b"")), [Delivered(b"")])
        self.assertEqual(vm.receive(user.seal(big)), [Delivered(big)])
        self.assertEqual(user.receive(vm.seal(big)), [Delivered(big)])

    def test_bytearray_and_memoryview_are_binary(self) -> None:
        """Websocket libraries may hand over other bytes-like objects."""
        user, vm, _ = established_pair()
        self.assertEqual(vm.receive(bytearray(user.seal(b"a"))), [Delivered(b"a")])
        self.assertEqual(vm.receive(memoryview(user.seal(b"b"))), [Delivered(b"b")])

    def test_other_types_refused(self) -> None:
        """Anything but str/bytes is a programming error: TypeError."""
        user, vm, _ = established_pair()
        self.assertRaises(TypeError, vm.receive, 42)

    def test_sessions_differ(self) -> None:
        """Fresh randomness gives fresh hellos and fresh record keys."""
        user1, vm1, texts1 = established_pair()
        user2, vm2, texts2 = established_pair()
        self.assertNotEqual(texts1, texts2)
        self.assertNotEqual(user1.seal(b"same"), user2.seal(b"same"))


class VectorTests(ChannelTestCase):
    """test/vectors/channel-v1.json: the channel reproduces it and it matches the spec."""

    def setUp(self) -> None:
        self.v: dict[str, Any] = json.loads(VECTORS.read_text())

    def hx(self, name: str) -> bytes:
        return bytes.fromhex(self.v[name])

    def test_channel_reproduces_vectors(self) -> None:
        """Same seeds and rng bytes give the same messages and records, byte for byte."""
        v = self.v
        user_key = Ed25519PrivateKey.from_private_bytes(self.hx("user_ed25519_seed"))
        vm_key = Ed25519PrivateKey.from_private_bytes(self.hx("vm_ed25519_seed"))
        self.assertEqual(raw(user_key), self.hx("user_ed25519_public"))
        self.assertEqual(raw(vm_key), self.hx("vm_ed25519_public"))
        user = UserChannel(user_key, v["vm_id"], raw(vm_key), rng=FixedRng(self.hx("user_rng")))
        vm = VmChannel(
            vm_key, v["vm_id"], lambda k: k == raw(user_key), rng=FixedRng(self.hx("vm_rng"))
        )
        self.assertEqual(text_of(user.start()), v["client_hello"])
        self.assertEqual(text_of(vm.receive(v["client_hello"])), v["vm_hello"])
        self.assertEqual(text_of(user.receive(v["vm_hello"])), v["client_finish"])
        self.assertEqual(vm.receive(v["client_finish"]), [Established(raw(user_key))])
        self.assertEqual(len(v["records"]), 4)
        for entry in v["records"]:
            sender, receiver = (user, vm) if entry["direction"] == "user-to-vm" else (vm, user)
            plaintext = bytes.fromhex(entry["plaintext"])
            record = sender.seal(plaintext)
            self.assertEqual(record.hex(), entry["record"])
            self.assertEqual(receiver.receive(record), [Delivered(plaintext)])

    def test_vectors_follow_the_spec(self) -> None:
        """Recompute transcript, keys, signatures and records with the raw primitives."""
        v = self.v
        hello, reply, finish = (
            json.loads(v[n]) for n in ("client_hello", "vm_hello", "client_finish")
        )
        user_pub = Ed25519PublicKey.from_public_bytes(self.hx("user_ed25519_public"))
        vm_pub = Ed25519PublicKey.from_public_bytes(self.hx("vm_ed25519_public"))
        # rng order: ephemeral secret, then nonce.
        user_rng, vm_rng = self.hx("user_rng"), self.hx("vm_rng")
        e_u = X25519PrivateKey.from_private_bytes(user_rng[:32])
        e_v = X25519PrivateKey.from_private_bytes(vm_rng[:32])
        self.assertEqual(unb64(hello["eph"]), raw(e_u))
        self.assertEqual(unb64(hello["nonce"]), user_rng[32:64])
        self.assertEqual(unb64(reply["eph"]), raw(e_v))
        self.assertEqual(unb64(reply["nonce"]), vm_rng[32:64])
        self.assertEqual(unb64(hello["key"]), self.hx("user_ed25519_public"))
        self.assertEqual(unb64(reply["key"]), self.hx("vm_ed25519_public"))

        body = {k: x for k, x in hello.items() if k != "sig"}
        user_pub.verify(
            unb64(hello["sig"]), b"ticrypt-channel-v1\x00user-hello\x00" + canonical(body)
        )
        partial = {k: x for k, x in reply.items() if k not in ("sig", "confirm")}
        th1 = hashlib.sha256(v["client_hello"].encode() + canonical(partial)).digest()
        self.assertEqual(th1, self.hx("th1"))
        shared = e_u.exchange(X25519PublicKey.from_public_bytes(raw(e_v)))
        self.assertEqual(shared, e_v.exchange(X25519PublicKey.from_public_bytes(raw(e_u))))
        self.assertEqual(shared, self.hx("shared"))
        okm = HKDF(hashes.SHA256(), 128, th1, b"ticrypt-channel-v1 keys").derive(shared)
        for i, name in enumerate(["k_u2v", "k_v2u", "c_user", "c_vm"]):
            self.assertEqual(okm[32 * i : 32 * i + 32], self.hx(name))
        vm_pub.verify(unb64(reply["sig"]), b"ticrypt-channel-v1\x00vm-hello\x00" + th1)
        confirm_v = hmac.new(self.hx("c_vm"), b"vm-finished" + th1, "sha256").digest()
        self.assertEqual(unb64(reply["confirm"]), confirm_v)

        th2 = hashlib.sha256(th1 + v["vm_hello"].encode()).digest()
        self.assertEqual(th2, self.hx("th2"))
        self.assertEqual(set(finish), {"type", "v", "sig", "confirm"})
        user_pub.verify(unb64(finish["sig"]), b"ticrypt-channel-v1\x00user-finish\x00" + th2)
        confirm_u = hmac.new(self.hx("c_user"), b"user-finished" + th2, "sha256").digest()
        self.assertEqual(unb64(finish["confirm"]), confirm_u)

        for entry in v["records"]:
            key = self.hx("k_u2v" if entry["direction"] == "user-to-vm" else "k_v2u")
            seq = entry["seq"].to_bytes(8, "big")
            record = bytes.fromhex(entry["record"])
            self.assertEqual(record[:9], b"\x01" + seq)
            plaintext = AESGCM(key).decrypt(b"\x00" * 4 + seq, record[9:], b"\x01" + seq)
            self.assertEqual(plaintext.hex(), entry["plaintext"])


class NegativeVectorTests(ChannelTestCase):
    """The ``negative`` vectors of test/vectors/channel-v1.json (PROTOCOL.md
    §4 "Test vectors"): each one is refused with exactly its code."""

    def setUp(self) -> None:
        self.v: dict[str, Any] = json.loads(VECTORS.read_text())

    def hx(self, name: str) -> bytes:
        return bytes.fromhex(self.v[name])

    def receiver(self, state: str) -> UserChannel | VmChannel:
        """A channel in ``state``, reached with the positive vectors."""
        v = self.v
        user_key = Ed25519PrivateKey.from_private_bytes(self.hx("user_ed25519_seed"))
        vm_key = Ed25519PrivateKey.from_private_bytes(self.hx("vm_ed25519_seed"))
        user = UserChannel(user_key, v["vm_id"], raw(vm_key), rng=FixedRng(self.hx("user_rng")))
        vm = VmChannel(vm_key, v["vm_id"], lambda k: k == raw(user_key),
                       rng=FixedRng(self.hx("vm_rng")))
        if state == "vm-waiting-hello":
            return vm
        self.assertEqual(text_of(user.start()), v["client_hello"])
        if state == "user-waiting-hello":
            return user
        self.assertEqual(text_of(vm.receive(v["client_hello"])), v["vm_hello"])
        if state == "vm-waiting-finish":
            return vm
        self.assertEqual(text_of(user.receive(v["vm_hello"])), v["client_finish"])
        self.assertEqual(vm.receive(v["client_finish"]), [Established(raw(user_key))])
        return {"vm-established": vm, "user-established": user}[state]

    def test_every_negative_vector_is_refused_with_its_code(self) -> None:
        """All messages but the last are accepted; the last fails with
        ``error`` and the channel is dead after it."""
        negative = self.v["negative"]
        names = [entry["name"] for entry in negative]
        self.assertEqual(len(names), len(set(names)))
        for entry in negative:
            self.assertLessEqual(set(entry), {"name", "state", "messages", "error", "note"})
            channel = self.receiver(entry["state"])
            messages: list[str | bytes] = [
                m["text"] if set(m) == {"text"} else bytes.fromhex(m["binary"])
                for m in entry["messages"]]
            try:
                for message in messages[:-1]:
                    channel.receive(message)
                self.assert_fails(entry["error"], channel.receive, messages[-1])
            except (self.failureException, ChannelError) as e:
                raise self.failureException(f"{entry['name']}: {e!r}") from None

    def test_what_the_negative_vectors_cover(self) -> None:
        """Every code a peer can cause except record-too-large (a 1 MiB
        record) and counter-exhausted (2^32 records); the 14 encodings of
        small-order Ed25519 keys; 14 low-order X25519 values in each hello."""
        negative = self.v["negative"]
        codes = {entry["error"] for entry in negative}
        self.assertEqual(set(MESSAGES) - codes,
                         {"record-too-large", "counter-exhausted", "wrong-state", "closed"})
        self.assertLessEqual(codes, set(MESSAGES))
        keys = {json.loads(e["messages"][0]["text"])["key"] for e in negative
                if e["name"].startswith("client-hello-small-order-key-")}
        self.assertEqual(len(keys), 14)
        self.assertEqual(set(map(len, map(unb64, keys))), {32})
        for prefix in ("client-hello-low-order-eph-", "vm-hello-low-order-eph-"):
            ephs = {json.loads(e["messages"][0]["text"])["eph"] for e in negative
                    if e["name"].startswith(prefix)}
            self.assertEqual(len(ephs), 14)
            for eph in ephs:
                self.assertIn(unb64(eph), LOW_ORDER_POINTS_ALL)

    def test_small_order_keys_are_refused_by_policy(self) -> None:
        """The small-order key vectors carry signatures that OpenSSL's plain
        verification accepts: the refusal is the spec's key check."""
        for entry in self.v["negative"]:
            if entry["name"].startswith("client-hello-small-order-key-"):
                hello = json.loads(entry["messages"][0]["text"])
                body = {k: x for k, x in hello.items() if k != "sig"}
                Ed25519PublicKey.from_public_bytes(unb64(hello["key"])).verify(
                    unb64(hello["sig"]), b"ticrypt-channel-v1\x00user-hello\x00" + canonical(body))

    def test_file_is_the_generator_output(self) -> None:
        """test/vectors/make_channel_vectors.py writes exactly this file."""
        spec = importlib.util.spec_from_file_location(
            "make_channel_vectors", VECTORS.parent / "make_channel_vectors.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.assertEqual(json.dumps(module.make_vectors(), indent=2) + "\n",
                         VECTORS.read_text())


class RecordFailureTests(ChannelTestCase):
    """Every way a record can be wrong is fatal and delivers nothing."""

    def test_tamper_every_byte(self) -> None:
        """Flipping one bit anywhere in a record, either direction, is detected."""
        for direction in ("user-to-vm", "vm-to-user"):
            user, vm, _ = fixed_pair()
            sender, receiver = (user, vm) if direction == "user-to-vm" else (vm, user)
            record = sender.seal(b"a record with some payload")
            self.assertEqual(receiver.receive(record), [Delivered(b"a record with some payload")])
            for position in range(len(record)):
                user, vm, _ = fixed_pair()  # same keys: the record would be valid
                receiver = vm if direction == "user-to-vm" else user
                bad = bytearray(record)
                bad[position] ^= 0x01
                if position == 0:
                    code = "bad-record"
                elif position <= 8:
                    code = "out-of-order"  # the sequence number went up
                else:
                    code = "decrypt-failed"
                self.assert_fails(code, receiver.receive, bytes(bad))

    def test_truncated(self) -> None:
        """Too short for header and tag: bad-record; cut tag: decrypt-failed."""
        user, vm, _ = fixed_pair()
        record = user.seal(b"payload")
        for length in (0, 1, 9, 24):
            _, vm, _ = fixed_pair()
            self.assert_fails("bad-record", vm.receive, record[:length])
        for length in (25, len(record) - 1):
            _, vm, _ = fixed_pair()
            self.assert_fails("decrypt-failed", vm.receive, record[:length])

    def test_wrong_version(self) -> None:
        """Only record version 1 exists."""
        user, vm, _ = established_pair()
        record = user.seal(b"x")
        self.assert_fails("bad-record", vm.receive, b"\x02" + record[1:])

    def test_replay(self) -> None:
        """The same record twice: the second is refused."""
        user, vm, _ = established_pair()
        record = user.seal(b"once")
        self.assertEqual(vm.receive(record), [Delivered(b"once")])
        self.assert_fails("replay", vm.receive, record)

    def test_replay_older(self) -> None:
        """An earlier record after later ones: replay."""
        user, vm, _ = established_pair()
        first = user.seal(b"1")
        vm.receive(first)
        vm.receive(user.seal(b"2"))
        self.assert_fails("replay", vm.receive, first)

    def test_reorder(self) -> None:
        """Record 1 before record 0: out-of-order."""
        user, vm, _ = established_pair()
        user.seal(b"0")
        self.assert_fails("out-of-order", vm.receive, user.seal(b"1"))

    def test_splice_from_other_session(self) -> None:
        """Same long-term keys, other session: the record does not open."""
        user1, _, _ = established_pair()
        _, vm2, _ = established_pair()
        self.assert_fails("decrypt-failed", vm2.receive, user1.seal(b"elsewhere"))

    def test_reflected_record(self) -> None:
        """A VM record sent back to the VM does not open (one key per direction)."""
        _, vm, _ = established_pair()
        self.assert_fails("decrypt-failed", vm.receive, vm.seal(b"mirror"))

    def test_plaintext_after_handshake(self) -> None:
        """A text message once established is fatal, on both ends."""
        user, vm, texts = established_pair()
        self.assert_fails("plaintext-after-handshake", vm.receive, "hello")
        self.assert_fails("plaintext-after-handshake", user.receive, texts[1])

    def test_binary_before_handshake(self) -> None:
        """A binary message in any handshake state is fatal."""
        user, vm, texts = established_pair()
        record = user.seal(b"too early")
        user2, vm2 = make_pair()
        self.assert_fails("unexpected-message", vm2.receive, record)
        self.assert_fails("unexpected-message", user2.receive, record)  # before start()
        user3, vm3 = make_pair()
        vm3.receive(text_of(user3.start()))
        self.assert_fails("unexpected-message", user3.receive, record)  # hello sent
        self.assert_fails("unexpected-message", vm3.receive, record)  # waiting for finish

    def test_oversize_seal(self) -> None:
        """Sealing more than MAX_PLAINTEXT is a ValueError and uses no sequence number."""
        user, vm, _ = established_pair()
        self.assertRaises(ValueError, user.seal, bytes(MAX_PLAINTEXT + 1))
        self.assertTrue(user.established)
        self.assertEqual(vm.receive(user.seal(b"ok")), [Delivered(b"ok")])

    def test_oversize_received(self) -> None:
        """A record longer than MAX_PLAINTEXT + overhead is refused before decryption."""
        _, vm, _ = established_pair()
        huge = b"\x01" + bytes(8) + bytes(MAX_PLAINTEXT + 1 + 16)
        self.assert_fails("record-too-large", vm.receive, huge)

    def test_counter_exhausted_sender(self) -> None:
        """The sender stops after max_records."""
        user, vm, _ = established_pair(max_records=(2, 2))
        vm.receive(user.seal(b"0"))
        vm.receive(user.seal(b"1"))
        self.assert_fails("counter-exhausted", user.seal, b"2")

    def test_counter_exhausted_receiver(self) -> None:
        """The receiver stops after max_records, even if the sender would go on."""
        user, vm, _ = established_pair(max_records=(3, 2))
        self.assertEqual(vm.receive(user.seal(b"0")), [Delivered(b"0")])
        self.assertEqual(vm.receive(user.seal(b"1")), [Delivered(b"1")])
        self.assert_fails("counter-exhausted", vm.receive, user.seal(b"2"))

    def test_max_records_validated(self) -> None:
        """max_records must fit the 8-byte sequence number."""
        self.assertRaises(ValueError, UserChannel, USER_KEY, VM_ID, VM_PUB, max_records=0)
        self.assertRaises(ValueError, VmChannel, VM_KEY, VM_ID, bool, max_records=2**64 + 1)


class HandshakeFailureTests(ChannelTestCase):
    """Every way the handshake can be wrong is fatal, with a precise code."""

    def test_reflected_client_hello(self) -> None:
        """The user's own hello sent back to it."""
        user, _ = make_pair()
        hello = text_of(user.start())
        self.assert_fails("wrong-role", user.receive, hello)

    def test_reflected_vm_hello(self) -> None:
        """A VmHello sent to a VM (e.g. another vmc's) is not a ClientHello."""
        user, vm = make_pair()
        reply = text_of(vm.receive(text_of(user.start())))
        _, vm2 = make_pair()
        self.assert_fails("wrong-role", vm2.receive, reply)

    def test_reflected_finish(self) -> None:
        """The user does not accept a finish."""
        user, vm, texts = established_pair()
        user2, _ = make_pair()
        user2.start()
        self.assert_fails("unexpected-message", user2.receive, texts[2])

    def test_wrong_vm_at_vm(self) -> None:
        """A hello for another VM is refused by this one."""
        user, vm = make_pair(vm_id="vm-0002")
        self.assert_fails("wrong-vm", vm.receive, text_of(user.start()))

    def test_wrong_vm_at_user(self) -> None:
        """A VmHello naming another VM is refused by the user, even if well signed."""
        user, _ = make_pair()
        hello = text_of(user.start())
        self.assert_fails("wrong-vm", user.receive, forge_vm_hello(hello, vm_id="vm-0002"))

    def test_vm_key_mismatch(self) -> None:
        """A VM answering with a key other than the registered one."""
        user, vm = make_pair(vm_key=OTHER_KEY)
        reply = text_of(vm.receive(text_of(user.start())))
        self.assert_fails("vm-key-mismatch", user.receive, reply)

    def test_bad_client_hello_signature(self) -> None:
        """Any change to the signature, or a signature by another key."""
        user, _ = make_pair()
        hello = text_of(user.start())
        _, vm = make_pair()
        self.assert_fails("bad-signature", vm.receive, flip_b64(hello, "sig"))
        _, vm = make_pair()
        self.assert_fails("bad-signature", vm.receive, flip_b64(hello, "nonce", 5))
        _, vm = make_pair()
        forged = mutate(forge_client_hello(OTHER_KEY), key=b64(USER_PUB))
        self.assert_fails("bad-signature", vm.receive, forged)

    def test_bad_signature_not_authorized_first(self) -> None:
        """authorize() is not consulted for a hello that does not verify."""
        calls: list[bytes] = []
        user, vm = make_pair(authorize=lambda key: record_call(calls, key, True))
        self.assert_fails("bad-signature", vm.receive, flip_b64(text_of(user.start()), "sig"))
        self.assertEqual(calls, [])

    def test_bad_vm_hello_signature(self) -> None:
        """A VmHello whose signature does not verify (or whose body was changed)."""
        for field, index in (("sig", 0), ("sig", 63), ("nonce", 0), ("eph", 3)):
            user, vm = make_pair()
            reply = text_of(vm.receive(text_of(user.start())))
            self.assert_fails("bad-signature", user.receive, flip_b64(reply, field, index))

    def test_bad_vm_hello_confirm(self) -> None:
        """A VmHello with a wrong key confirmation."""
        user, vm = make_pair()
        reply = text_of(vm.receive(text_of(user.start())))
        self.assert_fails("bad-confirm", user.receive, flip_b64(reply, "confirm", 31))

    def test_bad_finish_signature(self) -> None:
        """A ClientFinish whose signature does not verify."""
        user, vm = make_pair()
        finish = text_of(user.receive(text_of(vm.receive(text_of(user.start())))))
        self.assert_fails("bad-signature", vm.receive, flip_b64(finish, "sig", 10))

    def test_bad_finish_confirm(self) -> None:
        """A ClientFinish with a wrong key confirmation."""
        user, vm = make_pair()
        finish = text_of(user.receive(text_of(vm.receive(text_of(user.start())))))
        self.assert_fails("bad-confirm", vm.receive, flip_b64(finish, "confirm"))

    def test_finish_from_other_session(self) -> None:
        """A finish made for another session's transcript."""
        _, _, texts = established_pair()
        user, vm = make_pair()
        vm.receive(text_of(user.start()))
        self.assert_fails("bad-signature", vm.receive, texts[2])

    def test_not_authorized(self) -> None:
        """authorize() says no: the VM never answers."""
        seen: list[bytes] = []
        user, vm = make_pair(authorize=lambda key: record_call(seen, key, False))
        self.assert_fails("not-authorized", vm.receive, text_of(user.start()))
        self.assertEqual(seen, [USER_PUB])

    def test_low_order_point_at_vm(self) -> None:
        """A ClientHello with a low-order ephemeral key, properly signed."""
        for point in LOW_ORDER_POINTS:
            _, vm = make_pair()
            self.assert_fails("low-order-point", vm.receive, forge_client_hello(eph=point))

    def test_low_order_point_at_user(self) -> None:
        """A VmHello with a low-order ephemeral key, properly signed."""
        for point in LOW_ORDER_POINTS:
            user, _ = make_pair()
            hello = text_of(user.start())
            self.assert_fails("low-order-point", user.receive, forge_vm_hello(hello, eph=point))

    def test_second_hello(self) -> None:
        """The VM takes one hello per channel."""
        user, vm = make_pair()
        hello = text_of(user.start())
        vm.receive(hello)
        self.assert_fails("unexpected-message", vm.receive, hello)

    def test_finish_before_hello(self) -> None:
        """A finish as first message."""
        _, _, texts = established_pair()
        _, vm = make_pair()
        self.assert_fails("unexpected-message", vm.receive, texts[2])

    def test_text_before_start(self) -> None:
        """The user expects nothing before start()."""
        user, vm = make_pair()
        other, _ = make_pair()
        reply = text_of(vm.receive(text_of(other.start())))
        self.assert_fails("unexpected-message", user.receive, reply)

    def test_api_misuse(self) -> None:
        """start() twice, seal() before the handshake."""
        user, vm = make_pair()
        user.start()
        self.assert_fails("wrong-state", user.start)
        user, vm = make_pair()
        self.assert_fails("wrong-state", vm.seal, b"x")
        self.assert_fails("wrong-state", user.seal, b"x")

    def test_close(self) -> None:
        """close() kills an established channel."""
        user, vm, _ = established_pair()
        record = user.seal(b"late")
        vm.close()
        self.assertEqual(self.assertRaises(ChannelError, vm.receive, record).code, "closed")

    def test_bad_constructor_key(self) -> None:
        """The VM key given to the user must be a raw 32-byte key."""
        self.assertRaises(ValueError, UserChannel, USER_KEY, VM_ID, VM_PUB[:31])


class MalformedMessageTests(ChannelTestCase):
    """Strict parsing: anything but the exact expected shape is bad-message."""

    def setUp(self) -> None:
        user, vm = make_pair()
        self.hello = text_of(user.start())
        self.reply = text_of(vm.receive(self.hello))
        self.finish = text_of(user.receive(self.reply))

    def variants(self, text: str) -> dict[str, str]:
        obj = json.loads(text)
        key = "key" if "key" in obj else "sig"
        return {
            "extra key": mutate(text, extra="x"),
            "missing key": mutate(text, **{key: None}),
            "short b64": mutate(text, **{key: b64(unb64(obj[key])[:-1])}),
            "long b64": mutate(text, **{key: b64(unb64(obj[key]) + b"\x00")}),
            "padded b64": mutate(text, **{key: obj[key] + "="}),
            "standard b64": mutate(text, **{key: "+" + obj[key][1:]}),
            "b64 not a string": mutate(text, **{key: 5}),
            "version 2": mutate(text, v=2),
            "version true": mutate(text, v=True),
            "version string": mutate(text, v="1"),
            "version float": text.replace('"v":1', '"v":1.0'),
            "unknown type": mutate(text, type="goodbye"),
            "type not a string": mutate(text, type=1),
            "non-canonical spacing": json.dumps(obj, sort_keys=True),
            "non-canonical order": json.dumps(dict(reversed(obj.items())), separators=(",", ":")),
            "duplicate key": text[:-1] + ',"v":1}',
            "array": "[" + text + "]",
            "number": "1",
            "string": json.dumps(text),
            "null": "null",
            "empty": "",
            "not JSON": text[:-1],
            "too long": mutate(text, pad="x" * 4096),
            "non-ASCII": mutate(text, type="h\u00e9llo").replace("\\u00e9", "\u00e9"),
            "NaN": text[:-1] + ',"z":NaN}',
        }

    def check(self, make: Callable[[], Any], text: str) -> None:
        for name, bad in self.variants(text).items():
            channel = make()
            try:
                self.assert_fails("bad-message", channel.receive, bad)
            except self.failureException as e:
                raise self.failureException(f"{name}: {e}") from None

    def test_client_hello(self) -> None:
        """Malformed ClientHello at the VM."""
        self.check(lambda: make_pair()[1], self.hello)

    def test_vm_hello(self) -> None:
        """Malformed VmHello at the user."""

        def user() -> UserChannel:
            u = UserChannel(USER_KEY, VM_ID, VM_PUB)
            u.start()
            return u

        self.check(user, self.reply)

    def test_finish(self) -> None:
        """Malformed ClientFinish at the VM."""

        def vm() -> VmChannel:
            user, vm = make_pair()
            user.receive(text_of(vm.receive(text_of(user.start()))))
            return vm

        self.check(vm, self.finish)

    def test_vm_id_empty_or_too_long(self) -> None:
        """VM ids are 1..256 characters."""
        for vm_id in ("", "v" * 257):
            _, vm = make_pair()
            self.assert_fails("bad-message", vm.receive, forge_client_hello(vm_id=vm_id))

    def test_limit_is_4096_characters(self) -> None:
        """A canonical message of exactly 4096 characters parses; 4097 does not."""
        for size in (4096, 4097):
            text = '{"pad":"' + "p" * (size - 10) + '"}'
            self.assertEqual(len(text), size)
            if size == 4096:
                self.assertEqual(decode_handshake(text), json.loads(text))
            else:
                error = self.assertRaises(ChannelError, decode_handshake, text)
                self.assertEqual(error.code, "bad-message")


class ErrorTests(SynchronousTestCase):
    """ChannelError itself."""

    def test_codes_and_messages(self) -> None:
        """Codes are stable kebab-case strings with a fixed one-line message."""
        for code, message in MESSAGES.items():
            error = ChannelError(code)
            self.assertEqual((error.code, error.message), (code, message))
            self.assertEqual(str(error), f"{code}: {message}")
            self.assertRegex(code, r"^[a-z]+(-[a-z]+)*$")
            self.assertNotIn("\n", message)
        self.assertRaises(ValueError, ChannelError, "no-such-code")
