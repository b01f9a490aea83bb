"""Sans-IO: the frontend's side of the proxy's user leg (PROTOCOL.md §3 User
leg), and what the end of that websocket means for the session.

::

    connecting -> connect-sent -> handshake -> established -> closed

:class:`UserControl` takes events in (:meth:`~UserControl.opened`,
:meth:`~UserControl.message`, :meth:`~UserControl.timed_out`, ...) and
returns actions out (:class:`SendText`, :class:`StartChannel`,
:class:`Feed`, :class:`Close`); it never touches a websocket, the reactor or
a clock.  :class:`ticrypt.frontend.leg.UserLeg` performs the actions.  Once
``paired`` every message belongs to the secure channel (:class:`Feed`).
"""

from __future__ import annotations

import enum
import json
from typing import TypeAlias

import attrs

from ticrypt import closecodes
from ticrypt.encoding import loads_bounded
from ticrypt.frontend.errors import SessionError, channel_error, close_error

#: Largest control message from the proxy (``paired``) we parse.
MAX_CONTROL = 8192


class Phase(enum.Enum):
    CONNECTING = "connecting"  # the websocket is opening
    CONNECT_SENT = "connect-sent"  # the ticket is presented; waiting for paired
    HANDSHAKE = "handshake"  # paired: the secure channel's handshake runs
    ESTABLISHED = "established"
    CLOSED = "closed"


@attrs.frozen
class SendText:
    """Send ``text`` as a websocket text message (a control message)."""

    text: str


@attrs.frozen
class StartChannel:
    """Paired: start the user end of the secure channel."""


@attrs.frozen
class Feed:
    """A websocket message for the secure channel."""

    payload: bytes
    is_binary: bool


@attrs.frozen
class Close:
    """Send a close frame with ``code`` and ``reason``."""

    code: int
    reason: str


Action: TypeAlias = SendText | StartChannel | Feed | Close


@attrs.define
class UserControl:
    """One user leg's state; ``ended`` is the failure that ends it (None
    while it runs, and after a clean close of an established session)."""

    phase: Phase = Phase.CONNECTING
    ended: SessionError | None = None
    #: Our close frame is out: read nothing more, send nothing more.
    closing: bool = False

    def opened(self, ticket: str) -> list[Action]:
        """The websocket is open: present the ticket."""
        if self.phase is not Phase.CONNECTING or self.closing:
            return []
        self.phase = Phase.CONNECT_SENT
        return [SendText(json.dumps({"type": "connect", "ticket": ticket},
                                    separators=(",", ":")))]

    def message(self, payload: bytes, is_binary: bool) -> list[Action]:
        """A websocket message from the proxy (before paired) or the VM."""
        if self.closing:
            return []
        if self.phase in (Phase.HANDSHAKE, Phase.ESTABLISHED):
            return [Feed(payload, is_binary)]
        if self.phase is Phase.CONNECT_SENT:
            try:
                msg = loads_bounded(payload, max_size=MAX_CONTROL) if not is_binary else None
            except ValueError:
                msg = None
            if isinstance(msg, dict) and msg.get("type") == "paired":
                self.phase = Phase.HANDSHAKE
                return [StartChannel()]
        return self.fail(SessionError("bad-message", "bad-message: unexpected message from "
                                      "the proxy"),
                         closecodes.BAD_MESSAGE, "expected paired")

    def established(self) -> None:
        """The secure channel's handshake completed."""
        if self.phase is Phase.HANDSHAKE:
            self.phase = Phase.ESTABLISHED

    def channel_failed(self, code: str, message: str) -> list[Action]:
        """The secure channel failed here with ChannelError ``code``."""
        return self.fail(channel_error(code, message), closecodes.CHANNEL_ERROR, "", code)

    def timed_out(self, seconds: float) -> list[Action]:
        """The set-up deadline passed: without a secure channel, give up."""
        if self.phase in (Phase.ESTABLISHED, Phase.CLOSED):
            return []
        text = f"no secure channel within {seconds:g}s"
        return self.fail(SessionError("timeout", f"timeout: {text}"), closecodes.TIMEOUT, text)

    def fail(self, err: SessionError, code: closecodes.CloseCode, text: str,
             name: str | None = None) -> list[Action]:
        """End the leg with ``err`` (what the session reports), closing with
        ``code`` and the reason ``name: text`` (``name`` defaults to the code's)."""
        if self.closing or self.phase is Phase.CLOSED:
            return []
        self.ended = err
        return self.close(code.code, closecodes.reason(name or code.name, text))

    def close(self, code: int, reason: str) -> list[Action]:
        """Close the websocket (once); ``reason`` is cut to what a close
        frame can carry."""
        if self.closing or self.phase is Phase.CLOSED:
            return []
        self.closing = True
        return [Close(code, closecodes.reason(reason))]

    def closed(self, code: int | None, reason: str | None) -> SessionError | None:
        """The websocket is closed: the error the session ends with (None:
        an established session closed cleanly).  A failure detected here
        wins over the far end's code."""
        established = self.phase is Phase.ESTABLISHED
        self.phase = Phase.CLOSED
        err = self.ended
        if err is None and not (code == closecodes.NORMAL.code and established):
            if code in (None, 1006):
                err = SessionError("connection-lost", "connection-lost: the connection to "
                                   "the proxy was lost")
            else:
                err = close_error(code, reason)
        self.ended = err or SessionError("closed", "closed: the session is closed")
        return err
