"""Sans-IO state machines for the two ends of the secure channel.

:class:`UserChannel` (frontend) and :class:`VmChannel` (vmc) take websocket
messages in (``str`` = text message, ``bytes`` = binary message) and return
events out; they never touch a transport, the reactor or a clock. The caller
writes every :class:`SendMessage` to the websocket in order, treats
:class:`Established` as "handshake done, peer is ``peer_key``", hands
:class:`Delivered` plaintext to the application, and closes the connection
on any :class:`~ticrypt.channel.errors.ChannelError` (after which the channel
object raises ``ChannelError("closed")`` forever).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import Any, NoReturn, TypeAlias

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticrypt.channel.encoding import b64, canonical
from ticrypt.channel.errors import ChannelError
from ticrypt.channel.handshake import (
    CLIENT_HELLO_FIELDS,
    CONFIRM_USER,
    CONFIRM_VM,
    FINISH_FIELDS,
    LABEL_USER_FINISH,
    LABEL_USER_HELLO,
    LABEL_VM_HELLO,
    NONCE_SIZE,
    VERSION,
    VM_HELLO_FIELDS,
    SessionKeys,
    check_fields,
    check_role,
    decode_handshake,
    derive_keys,
)
from ticrypt.channel.primitives import (
    ED25519_PUBLIC_SIZE,
    X25519_SIZE,
    ed25519_public_bytes,
    ed25519_sign,
    ed25519_verify,
    hmac_sha256,
    hmac_sha256_verify,
    sha256,
    x25519_public,
    x25519_shared,
)
from ticrypt.channel.records import MAX_RECORDS, RecordOpener, RecordSealer

Rng: TypeAlias = Callable[[int], bytes]


@attrs.frozen
class SendMessage:
    """Write ``data`` to the websocket: ``str`` as a text message, ``bytes`` as binary."""

    data: bytes | str


@attrs.frozen
class Established:
    """The handshake completed; ``peer_key`` is the peer's raw Ed25519 public key."""

    peer_key: bytes


@attrs.frozen
class Delivered:
    """One record's plaintext, authenticated and in order."""

    plaintext: bytes = attrs.field(repr=False)


Event: TypeAlias = SendMessage | Established | Delivered


class _State(enum.Enum):
    START = "start"  # user: before start()
    HELLO_SENT = "hello-sent"  # user: waiting for VmHello
    WAIT_HELLO = "wait-hello"  # vm: waiting for ClientHello
    WAIT_FINISH = "wait-finish"  # vm: waiting for ClientFinish
    ESTABLISHED = "established"
    DEAD = "dead"


def _random(rng: Rng, size: int) -> bytes:
    data = rng(size)
    if len(data) != size:
        raise ValueError("rng returned the wrong number of bytes")
    return data


class _Channel:
    """What both ends share: the dead-on-error rule and the record layer."""

    _state: _State
    _sealer: RecordSealer | None = None
    _opener: RecordOpener | None = None
    peer_key: bytes | None = None

    def __init__(self, vm_id: str, rng: Rng, max_records: int) -> None:
        if not 1 <= max_records <= 2**64:
            raise ValueError("max_records must be between 1 and 2**64")
        self._vm_id = vm_id
        self._rng = rng
        self._max_records = max_records

    @property
    def established(self) -> bool:
        """True once records can be sealed and opened."""
        return self._state is _State.ESTABLISHED

    @property
    def closed(self) -> bool:
        """True after an error or :meth:`close`."""
        return self._state is _State.DEAD

    def close(self) -> None:
        """Forget the keys; every later call raises ChannelError("closed")."""
        self._state = _State.DEAD
        self._sealer = self._opener = None

    def _fail(self, code: str) -> NoReturn:
        raise ChannelError(code)

    def receive(self, message: bytes | bytearray | memoryview | str) -> list[Event]:
        """Feed one websocket message (``str`` text, ``bytes`` binary); return events."""
        if isinstance(message, (bytearray, memoryview)):
            message = bytes(message)
        if not isinstance(message, (bytes, str)):
            raise TypeError("a websocket message is str (text) or bytes (binary)")
        self._check_alive()
        try:
            if isinstance(message, str):
                if self._state is _State.ESTABLISHED:
                    self._fail("plaintext-after-handshake")
                return self._receive_text(message)
            if self._state is not _State.ESTABLISHED:
                self._fail("unexpected-message")
            assert self._opener is not None
            return [Delivered(self._opener.open(message))]
        except BaseException:
            self.close()
            raise

    def seal(self, plaintext: bytes) -> bytes:
        """The binary message carrying ``plaintext``; only once established.

        ValueError for plaintext over MAX_PLAINTEXT (channel stays usable).
        """
        self._check_alive()
        if self._sealer is None:
            self.close()
            self._fail("wrong-state")
        try:
            return self._sealer.seal(plaintext)
        except ChannelError:
            self.close()
            raise

    def _check_alive(self) -> None:
        if self._state is _State.DEAD:
            self._fail("closed")

    def _establish(self, send_key: bytes, receive_key: bytes) -> None:
        self._sealer = RecordSealer(send_key, self._max_records)
        self._opener = RecordOpener(receive_key, self._max_records)
        self._state = _State.ESTABLISHED

    def _check_hello(self, obj: dict[str, Any], role: str,
                     fields: dict[str, int | type]) -> dict[str, Any]:
        """The peer's hello ``obj`` with its ``fields`` checked: it comes from
        ``role`` and names this channel's VM."""
        check_role(obj, role)
        hello = check_fields(obj, fields)
        if hello["role"] != role:
            self._fail("bad-message")
        if hello["vm"] != self._vm_id:
            self._fail("wrong-vm")
        return hello

    def _receive_text(self, text: str) -> list[Event]:
        raise NotImplementedError


def _hello_body(role: str, vm_id: str, key: bytes, eph: bytes, nonce: bytes) -> dict[str, Any]:
    return {
        "type": "hello",
        "v": VERSION,
        "role": role,
        "vm": vm_id,
        "key": b64(key),
        "eph": b64(eph),
        "nonce": b64(nonce),
    }


def _strip(obj: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in names}


class UserChannel(_Channel):
    """The user (frontend) end: sends ClientHello, checks VmHello, sends ClientFinish.

    ``vm_public_key`` is the VM's raw Ed25519 key as registered in rest; the
    channel refuses any other.
    """

    def __init__(
        self,
        user_key: Ed25519PrivateKey,
        vm_id: str,
        vm_public_key: bytes,
        rng: Rng = os.urandom,
        max_records: int = MAX_RECORDS,
    ) -> None:
        super().__init__(vm_id, rng, max_records)
        if len(vm_public_key) != ED25519_PUBLIC_SIZE:
            raise ValueError("vm_public_key must be a raw 32-byte Ed25519 key")
        self._user_key = user_key
        self._vm_public_key = bytes(vm_public_key)
        self._state = _State.START
        self._eph = b""
        self._hello_text = b""

    def start(self) -> list[SendMessage]:
        """The ClientHello to send first."""
        self._check_alive()
        if self._state is not _State.START:
            self.close()
            self._fail("wrong-state")
        self._eph = _random(self._rng, X25519_SIZE)
        body = _hello_body(
            "user",
            self._vm_id,
            ed25519_public_bytes(self._user_key),
            x25519_public(self._eph),
            _random(self._rng, NONCE_SIZE),
        )
        sig = ed25519_sign(self._user_key, LABEL_USER_HELLO + canonical(body))
        self._hello_text = canonical({**body, "sig": b64(sig)})
        self._state = _State.HELLO_SENT
        return [SendMessage(self._hello_text.decode("ascii"))]

    def _receive_text(self, text: str) -> list[Event]:
        obj = decode_handshake(text)
        kind = obj.get("type")
        if kind not in ("hello", "finish"):
            self._fail("bad-message")
        if self._state is not _State.HELLO_SENT or kind != "hello":
            self._fail("unexpected-message")
        hello = self._check_hello(obj, "vm", VM_HELLO_FIELDS)
        if hello["key"] != self._vm_public_key:
            self._fail("vm-key-mismatch")
        th1 = sha256(self._hello_text + canonical(_strip(obj, "sig", "confirm")))
        if not ed25519_verify(self._vm_public_key, hello["sig"], LABEL_VM_HELLO + th1):
            self._fail("bad-signature")
        keys = derive_keys(x25519_shared(self._eph, hello["eph"]), th1)
        self._eph = b""
        if not hmac_sha256_verify(keys.c_vm, CONFIRM_VM + th1, hello["confirm"]):
            self._fail("bad-confirm")
        th2 = sha256(th1 + text.encode("ascii"))
        finish = {
            "type": "finish",
            "v": VERSION,
            "sig": b64(ed25519_sign(self._user_key, LABEL_USER_FINISH + th2)),
            "confirm": b64(hmac_sha256(keys.c_user, CONFIRM_USER + th2)),
        }
        self.peer_key = self._vm_public_key
        self._establish(keys.k_u2v, keys.k_v2u)
        return [SendMessage(canonical(finish).decode("ascii")), Established(self.peer_key)]


class VmChannel(_Channel):
    """The VM (vmc) end: checks ClientHello, answers VmHello, checks ClientFinish.

    ``authorize(user_public_key)`` decides whether that user may use this VM
    (and is where vmc pins its owner); it is called once per channel, only for
    a ClientHello that is otherwise valid (signature and ephemeral key checked).
    """

    def __init__(
        self,
        vm_key: Ed25519PrivateKey,
        vm_id: str,
        authorize: Callable[[bytes], bool],
        rng: Rng = os.urandom,
        max_records: int = MAX_RECORDS,
    ) -> None:
        super().__init__(vm_id, rng, max_records)
        self._vm_key = vm_key
        self._authorize = authorize
        self._state = _State.WAIT_HELLO
        self._th2 = b""
        self._keys: SessionKeys | None = None

    def _receive_text(self, text: str) -> list[Event]:
        obj = decode_handshake(text)
        kind = obj.get("type")
        if self._state is _State.WAIT_HELLO and kind == "hello":
            return self._on_hello(text, obj)
        if self._state is _State.WAIT_FINISH and kind == "finish":
            return self._on_finish(obj)
        if kind in ("hello", "finish"):
            self._fail("unexpected-message")
        self._fail("bad-message")

    def _on_hello(self, text: str, obj: dict[str, Any]) -> list[Event]:
        hello = self._check_hello(obj, "user", CLIENT_HELLO_FIELDS)
        user_key: bytes = hello["key"]
        if not ed25519_verify(
            user_key, hello["sig"], LABEL_USER_HELLO + canonical(_strip(obj, "sig"))
        ):
            self._fail("bad-signature")
        eph = _random(self._rng, X25519_SIZE)
        shared = x25519_shared(eph, hello["eph"])  # before authorize: fail cheap first
        if not self._authorize(user_key):
            self._fail("not-authorized")
        body = _hello_body(
            "vm",
            self._vm_id,
            ed25519_public_bytes(self._vm_key),
            x25519_public(eph),
            _random(self._rng, NONCE_SIZE),
        )
        th1 = sha256(text.encode("ascii") + canonical(body))
        keys = derive_keys(shared, th1)
        reply = canonical(
            {
                **body,
                "sig": b64(ed25519_sign(self._vm_key, LABEL_VM_HELLO + th1)),
                "confirm": b64(hmac_sha256(keys.c_vm, CONFIRM_VM + th1)),
            }
        )
        self.peer_key = user_key
        self._th2 = sha256(th1 + reply)
        self._keys = keys
        self._state = _State.WAIT_FINISH
        return [SendMessage(reply.decode("ascii"))]

    def _on_finish(self, obj: dict[str, Any]) -> list[Event]:
        finish = check_fields(obj, FINISH_FIELDS)
        keys, th2, user_key = self._keys, self._th2, self.peer_key
        assert keys is not None and user_key is not None
        if not ed25519_verify(user_key, finish["sig"], LABEL_USER_FINISH + th2):
            self._fail("bad-signature")
        if not hmac_sha256_verify(keys.c_user, CONFIRM_USER + th2, finish["confirm"]):
            self._fail("bad-confirm")
        self._keys = None
        self._establish(keys.k_v2u, keys.k_u2v)
        return [Established(user_key)]

    def close(self) -> None:
        """Forget the keys; every later call raises ChannelError("closed")."""
        super().close()
        self._keys = None
