"""End-to-end secure channel between a user (frontend) and a VM (vmc).

Sans-IO: messages in, events out; no reactor, clock or transport. The proxy
between the two relays websocket messages blindly and sees only the
handshake. Wire format: ``PROTOCOL.md §4``.

API::

    user = UserChannel(user_key, vm_id, vm_public_key)   # rng=, max_records=
    vm = VmChannel(vm_key, vm_id, authorize)              # authorize(user_pub) -> bool

    user.start() -> [SendMessage(client_hello_text)]
    vm.receive(text) -> [SendMessage(vm_hello_text)]
    user.receive(text) -> [SendMessage(finish_text), Established(vm_pub)]
    vm.receive(text) -> [Established(user_pub)]
    ch.seal(plaintext) -> bytes                       # a binary message
    ch.receive(binary) -> [Delivered(plaintext)]
    ch.established, ch.closed, ch.peer_key, ch.close()

Every failure raises :class:`ChannelError` with a stable ``code`` (see
:data:`~ticrypt.channel.errors.MESSAGES`); the channel is then dead and any
later call raises ``ChannelError("closed")``. ``seal`` of more than
``MAX_PLAINTEXT`` bytes raises ``ValueError`` and leaves the channel usable.
``str`` messages are websocket text messages, ``bytes`` are binary ones.
"""

from ticrypt.channel.channel import (
    Delivered,
    Established,
    Event,
    SendMessage,
    UserChannel,
    VmChannel,
)
from ticrypt.channel.errors import MESSAGES, ChannelError
from ticrypt.channel.records import MAX_PLAINTEXT, MAX_RECORDS

__all__ = [
    "MAX_PLAINTEXT",
    "MAX_RECORDS",
    "MESSAGES",
    "ChannelError",
    "Delivered",
    "Established",
    "Event",
    "SendMessage",
    "UserChannel",
    "VmChannel",
]
