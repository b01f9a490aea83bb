"""autobahn's receive path without its per-read and per-message extras.

autobahn's Twisted adapter formats a debug log call's arguments on every
``dataReceived`` (``hltype``, ``hlval``: about 15 us a call, whether debug
logging is on or not), and ``onMessageEnd`` fires its observable ``message``
event (a Deferred per message) for listeners none of our legs has.  On the
data path that is one call per TLS record read and one per message.
:func:`message_end` does what autobahn's ``onMessageEnd`` does without the
event (checked against autobahn 26.10): the frames are joined and handed to
``_onMessage`` unless autobahn failed the connection.  Our protocols
override ``dataReceived`` to call autobahn's ``_dataReceived`` directly:
:class:`LeanClientProtocol` (the frontend's and vmc's legs) and the proxy's
:class:`~ticrypt.proxy.wsmem.LeanWebSocket`.

:class:`FrameCounting` counts a peer's frame headers with a
:class:`~ticrypt.framebudget.FrameBudget` as autobahn parses them (the
proxy's legs, connect's page relay): over a limit, nothing more of that
peer is parsed.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientProtocol

from ticrypt.framebudget import FrameBudget, Violation


def message_end(proto: Any) -> None:
    """autobahn's ``onMessageEnd`` without firing the ``message`` event."""
    if not proto.failedByMe:
        data = proto.message_data
        payload = data[0] if len(data) == 1 else b"".join(data)
        proto._onMessage(payload, proto.message_is_binary)
    proto.message_data = None


def drop_close_timer(proto: Any) -> None:
    """Cancel autobahn's close-handshake timer, which it leaves armed when
    the connection ends before the close handshake does (a leftover
    delayed call on the reactor)."""
    call = getattr(proto, "closeHandshakeTimeoutCall", None)
    if call is not None:  # a txaio timer: cancel() only (no active())
        call.cancel()
        proto.closeHandshakeTimeoutCall = None


class LeanClientProtocol(WebSocketClientProtocol):
    """autobahn's client protocol with the receive path above."""

    def dataReceived(self, data: bytes) -> None:
        self._dataReceived(data)

    def onMessageEnd(self) -> None:
        message_end(self)


class FrameCounting:
    """Mixin for an autobahn protocol (listed before it): each frame header
    the peer sends is counted by :attr:`frame_budget` once that is set
    (at open); over a limit the input is closed (:meth:`close_input`) and
    :meth:`frames_exceeded` is called, which closes the websocket and says
    so.  The protocol's factory must provide ``clock`` (an
    ``IReactorTime``).  A subclass that overrides ``dataReceived`` checks
    :attr:`input_closed` itself."""

    #: counts this peer's frames once set (at open); None: not counted
    frame_budget: FrameBudget | None = None
    # class-level default: an idle socket keeps no instance entry for it
    _input_closed = False

    def frames_exceeded(self, violation: Violation) -> None:
        """The peer went over a frame limit; nothing more of it is parsed."""
        raise NotImplementedError

    @property
    def input_closed(self) -> bool:
        return self._input_closed

    def close_input(self) -> None:
        """Parse nothing more from this peer (what is buffered is dropped)."""
        self._input_closed = True
        me: Any = self
        me.data = b""

    def dataReceived(self, data: bytes) -> None:
        if not self._input_closed:
            super().dataReceived(data)  # type: ignore[misc]

    def onFrameBegin(self) -> None:
        budget = self.frame_budget
        if budget is not None and not self._input_closed:
            me: Any = self
            f = me.current_frame
            violation = budget.frame(f.opcode, f.length, me.factory.clock.seconds())
            if violation is not None:
                self.close_input()
                self.frames_exceeded(violation)
        # autobahn finishes this frame's header bookkeeping; with the input
        # closed no payload follows, and an empty frame is delivered to a
        # websocket that is closing (no pong, no message)
        super().onFrameBegin()  # type: ignore[misc]
