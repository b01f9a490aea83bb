"""The one exception of the secure channel, with stable machine-readable codes."""

from __future__ import annotations

#: Every code a :class:`ChannelError` can carry, with its fixed human message.
#: Messages are fixed per code so that no key material or payload can leak
#: into logs through an error.  This is the table's one home: the page's
#: ChannelError (connect/web/js/channelerror.js) reads it as JSON, served by
#: ticrypt-connect (:data:`ticrypt.connect.page.APP_DATA`).
MESSAGES: dict[str, str] = {
    "bad-message": "malformed handshake message",
    "wrong-role": "handshake message from the wrong role (reflected?)",
    "wrong-vm": "handshake is for a different VM",
    "vm-key-mismatch": "the VM presented a key other than the one registered for it",
    "bad-signature": "handshake signature does not verify",
    "bad-confirm": "handshake key confirmation does not match",
    "not-authorized": "this user is not authorized on this VM",
    "low-order-point": "peer ephemeral key is a low-order point",
    "unexpected-message": "message not expected in this state of the channel",
    "plaintext-after-handshake": "text message received after the handshake",
    "bad-record": "malformed record",
    "record-too-large": "record exceeds the maximum plaintext size",
    "replay": "record sequence number already used (replay)",
    "out-of-order": "record sequence number skips ahead (reordered or dropped record)",
    "decrypt-failed": "record failed authentication",
    "counter-exhausted": "record counter exhausted; open a new channel",
    "wrong-state": "operation not allowed in this state of the channel",
    "closed": "channel is closed after an earlier error",
}


class ChannelError(Exception):
    """A handshake or record failure; the channel that raised it is dead.

    ``code`` is a stable kebab-case string (a key of :data:`MESSAGES`);
    ``message`` is one human-readable line: by default the fixed text for
    the code (the channel never passes its own, so nothing secret leaks).
    """

    code: str
    message: str

    def __init__(self, code: str, message: str | None = None) -> None:
        if code not in MESSAGES:
            raise ValueError(f"unknown channel error code {code!r}")
        self.code = code
        self.message = MESSAGES[code] if message is None else message
        super().__init__(code, self.message)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
