"""vmc's side of the proxy's control exchange (PROTOCOL.md §3), sans-IO.

On a fresh websocket to the proxy's ``/v1/vm``::

    CHALLENGE --challenge/vm-auth--> AUTH_SENT --waiting--> WAITING --paired--> PAIRED
        |                               |                      |
        +-------------------------------+----------------------+--> CLOSED (refused)

:class:`VmControl` takes the proxy's messages (and the size of one too large
to read, and the end of the authentication deadline) and returns what to do:
:class:`Send` a text message, :class:`Close` the socket, report
:class:`Waiting` or :class:`Paired`.  It never touches a transport, the
reactor or the clock (txtorcon's ``_SocksMachine`` has the same shape); the
websocket adapter, :class:`~ticrypt.vmc.leg.VmLeg`, does what it says.

After :class:`Paired` every message on the socket belongs to the secure
channel, and the machine is done.  Any other message, a binary one or one that
is not a JSON object is refused: close 4000 ``bad-message``.
"""

from __future__ import annotations

import enum
import json
from typing import Any, TypeAlias

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticrypt import closecodes, signed
from ticrypt.encoding import b64, loads_bounded, unb64

#: Largest control message read (JSON text, bytes).
MAX_CONTROL = 16384
#: Longest user name and client address taken from ``paired``.
MAX_USER = 128
MAX_CLIENT = 64


class State(enum.Enum):
    CHALLENGE = "challenge"  # open; the proxy's challenge is due
    AUTH_SENT = "auth-sent"  # vm-auth sent; ``waiting`` is due
    WAITING = "waiting"  # authenticated, waiting for a user
    PAIRED = "paired"  # done: the socket belongs to the secure channel
    CLOSED = "closed"  # refused or timed out: nothing more is read


@attrs.frozen
class Send:
    """Send ``text`` to the proxy as a text message."""

    text: str


@attrs.frozen
class Close:
    """Close the socket with ``code`` and ``reason`` (``name: text``)."""

    code: int
    reason: str


@attrs.frozen
class Waiting:
    """Authenticated: the socket waits at the proxy for a user (the
    authentication deadline no longer applies)."""


@attrs.frozen
class Paired:
    """The proxy paired this socket with ``user`` from ``client``; the
    secure channel's handshake comes next."""

    user: str
    client: str


Action: TypeAlias = Send | Close | Waiting | Paired


def _refuse(text: str) -> Close:
    return Close(closecodes.BAD_MESSAGE.code, closecodes.reason(closecodes.BAD_MESSAGE.name,
                                                                text))


@attrs.define
class VmControl:
    """The control exchange of one socket, from the VM's side.

    ``vm_key`` signs the proxy's challenge; ``credential`` is the VM
    credential from enrollment; ``max_message`` is the largest websocket
    message the socket reads (named when one is larger)."""

    vm_key: Ed25519PrivateKey
    vm_id: str
    credential: str
    max_message: int
    state: State = State.CHALLENGE

    def message(self, payload: bytes, is_binary: bool) -> list[Action]:
        """A whole message from the proxy."""
        if self.state is State.CLOSED:
            return []  # closing: read nothing more
        if self.state is State.PAIRED:
            raise RuntimeError("the control exchange is over: the socket is the channel's")
        try:
            if is_binary:
                raise ValueError
            msg = loads_bounded(payload, max_size=MAX_CONTROL)
            if not isinstance(msg, dict):
                raise ValueError
        except ValueError:
            return self._close(_refuse("control message is not a JSON object"))
        kind = msg.get("type")
        if kind == "challenge" and self.state is State.CHALLENGE:
            return self._challenge(msg.get("nonce"))
        if kind == "waiting" and self.state is State.AUTH_SENT:
            self.state = State.WAITING
            return [Waiting()]
        if kind == "paired" and self.state is State.WAITING:
            self.state = State.PAIRED
            return [Paired(user=str(msg.get("user", ""))[:MAX_USER],
                           client=str(msg.get("client", ""))[:MAX_CLIENT])]
        return self._close(_refuse("unexpected control message"))

    def oversized(self) -> list[Action]:
        """A message over ``max_message`` is on its way (refused by its size,
        before it is read)."""
        if self.state in (State.CLOSED, State.PAIRED):
            return []
        return self._close(_refuse(f"message over {self.max_message} bytes"))

    def timed_out(self) -> list[Action]:
        """The authentication deadline passed (it runs from the socket's
        opening until :class:`Waiting`)."""
        if self.state not in (State.CHALLENGE, State.AUTH_SENT):
            return []
        return self._close(Close(closecodes.TIMEOUT.code, closecodes.reason(
            closecodes.TIMEOUT.name, "proxy authentication")))

    def _challenge(self, nonce: Any) -> list[Action]:
        try:
            if not isinstance(nonce, str):
                raise ValueError
            unb64(nonce, 32)
        except ValueError:
            return self._close(_refuse("challenge nonce is not b64 of 32 bytes"))
        signature = signed.sign(self.vm_key, signed.PROXY_VM_AUTH,
                                {"nonce": nonce, "vm": self.vm_id})
        self.state = State.AUTH_SENT
        return [Send(json.dumps({"type": "vm-auth", "credential": self.credential,
                                 "signature": b64(signature)}, separators=(",", ":")))]

    def _close(self, close: Close) -> list[Action]:
        self.state = State.CLOSED
        return [close]
