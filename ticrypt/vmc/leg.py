"""One websocket to the proxy's ``/v1/vm``: the autobahn adapter.

A :class:`VmLeg` goes through::

    CONNECTING -> CONTROL -> HANDSHAKE -> ESTABLISHED -> CLOSED

In CONTROL it feeds the proxy's control exchange, a sans-IO machine
(:class:`~ticrypt.vmc.control.VmControl`), and does what it answers.  Once
paired, every message belongs to the secure channel
(:class:`~ticrypt.channel.VmChannel`, fed by a :class:`~ticrypt.ws.ChannelPump`):
handshake text messages, then sealed binary records carrying the application
protocol, whose plaintext goes to the channel's
:class:`~ticrypt.vmc.session.VmSession`.

A leg knows nothing of the pool: it reports to the :class:`LegCallbacks` it
is built with, and gets its session from its :class:`LegContext`'s
``open_session``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ticrypt import closecodes, identity
from ticrypt.audit import AuditLog
from ticrypt.channel import ChannelError, VmChannel, app
from ticrypt.heap import tune_malloc
from ticrypt.timers import cancel_call
from ticrypt.vmc.control import Action, Close, Paired, Send, VmControl, Waiting
from ticrypt.vmc.processes import Send as SendApp
from ticrypt.vmc.session import Peer, VmSession
from ticrypt.vmc.state import VmState
from ticrypt.ws import ChannelPump, no_delay
from ticrypt.wsfast import LeanClientProtocol

#: Close when vmc stops: 1000 with the reason ``going-away``.  Not 1001
#: (:data:`~ticrypt.closecodes.GOING_AWAY`): autobahn lets an application
#: send only 1000 or 3000-4999 (sendClose raises otherwise).
STOPPING = (closecodes.NORMAL.code, closecodes.reason(closecodes.GOING_AWAY.name,
                                                      "vmc stopping"))

#: ``open_session(peer, send_app, close)``: the session of an established channel.
OpenSession = Callable[[Peer, SendApp, Callable[[int, str], None]], VmSession]


@attrs.frozen
class LegContext:
    """What every leg of a pool shares."""

    clock: Any
    state: VmState
    audit: AuditLog
    #: Largest websocket message read (``[vmc] max_message``).
    max_message: int
    #: For the proxy's control exchange, and again for the channel's handshake.
    handshake_timeout: float
    open_session: OpenSession


@attrs.frozen
class LegCallbacks:
    """What a leg reports to the one that built it."""

    #: Authenticated, waiting at the proxy for a user.
    on_waiting: Callable[[VmLeg], None]
    #: Paired with a user; the answer names the limit a session would be
    #: over (then the leg closes 4009 over-limit), or is None.
    on_paired: Callable[[VmLeg], str | None]
    #: Closed, with the code and reason of the close.
    on_closed: Callable[[VmLeg, int | None, str | None], None]


class Phase(enum.Enum):
    CONNECTING = "connecting"
    CONTROL = "control"  # the proxy's control exchange (VmLeg.control)
    HANDSHAKE = "handshake"  # paired: the secure channel's handshake
    ESTABLISHED = "established"  # a VmSession runs on the channel
    CLOSED = "closed"


class VmLeg(LeanClientProtocol):
    """One websocket to the proxy: the control exchange, then the secure channel."""

    # autobahn owns ``log`` (txaio) and ``state``; ours are plog and phase.
    plog = Logger()

    def __init__(self, context: LegContext, callbacks: LegCallbacks) -> None:
        # autobahn's protocol has an __init__ of its own (so not attrs)
        super().__init__()
        enrollment = context.state.enrollment
        assert enrollment is not None
        self._context = context
        self._callbacks = callbacks
        self._vm_id = enrollment.vm_id
        self.control = VmControl(context.state.vm_key, enrollment.vm_id,
                                 enrollment.vm_credential, context.max_message)
        self.phase = Phase.CONNECTING
        #: The secure channel once paired, and what feeds it.
        self.pump: ChannelPump | None = None
        self.session: VmSession | None = None
        #: Who the proxy paired this socket with, and the key the channel names.
        self.user = ""
        self.client = ""
        self.user_key: bytes | None = None
        self._timer: IDelayedCall | None = None
        self._close_sent = False
        self._incoming = 0
        self._incoming_binary = False

    # -- autobahn callbacks ------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)  # autobahn's own attempt fails on a client

    def onOpen(self) -> None:
        self.phase = Phase.CONTROL
        self._arm(self._context.handshake_timeout, "proxy authentication")

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._incoming, self._incoming_binary = 0, isBinary

    def onMessageFrameBegin(self, length: int) -> None:
        # vmc bounds messages itself, not through autobahn, whose 1009 the
        # user would see as 4010 peer-lost: a message over max_message is
        # refused by its announced length as soon as a frame header says so
        # (PROTOCOL.md §4 Records).
        super().onMessageFrameBegin(length)
        self._incoming += length
        if self._incoming > self._context.max_message and not self._close_sent:
            self._oversized()

    def onMessageFrameData(self, payload: bytes) -> None:
        if self._close_sent:
            return  # closing: read nothing more into memory
        super().onMessageFrameData(payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._close_sent:
            return
        if self.phase is Phase.CONTROL:
            self._act(self.control.message(payload, isBinary))
        elif self.phase in (Phase.HANDSHAKE, Phase.ESTABLISHED):
            assert self.pump is not None
            self.pump.feed(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.phase = Phase.CLOSED
        self._disarm()
        if self.session is not None:
            self.session.closed(code)
        if self.pump is not None:
            self.pump.channel.close()
        self._callbacks.on_closed(self, code, reason)

    # -- for the pool --------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Close with a code and a short reason, ``name: text`` or ``name``
        (PROTOCOL.md §1.2; vmc keeps it under 120 characters).  The
        session's children are signalled at once."""
        if self._close_sent:
            return
        self._close_sent = True
        if self.session is not None:
            self.session.closing()
        if self.state in (self.STATE_CONNECTING, self.STATE_PROXY_CONNECTING):
            # still in the opening handshake: there is no websocket to close
            # cleanly yet, and autobahn's sendClose would raise
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.sendClose(code, reason[:120])

    def stop(self) -> defer.Deferred[None]:
        """vmc stops: close ``going-away``; fires once the children of this
        leg's session are gone."""
        self.close(*STOPPING)
        if self.session is None:
            return defer.succeed(None)
        return self.session.when_empty()

    # -- timers --------------------------------------------------------------

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self._context.clock.callLater(seconds, self._timed_out, what)

    def _disarm(self) -> None:
        cancel_call(self._timer)
        self._timer = None

    def _timed_out(self, what: str) -> None:
        self.plog.info("{what} timed out", what=what)
        if self.phase is Phase.CONTROL:
            self._act(self.control.timed_out())
            return
        self._context.audit.write("session-refused", vm=self._vm_id, user=self.user,
                                  client=self.client, reason="handshake-timeout",
                                  result="refused")
        self.close(closecodes.TIMEOUT.code, closecodes.reason(closecodes.TIMEOUT.name, what))

    # -- the proxy's control exchange ------------------------------------------

    def _act(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sendMessage(action.text.encode(), isBinary=False)
            elif isinstance(action, Close):
                self.close(action.code, action.reason)
            elif isinstance(action, Waiting):
                self._disarm()
                self._callbacks.on_waiting(self)
            elif isinstance(action, Paired):
                self._paired(action)

    def _paired(self, paired: Paired) -> None:
        self.phase = Phase.HANDSHAKE
        self.user, self.client = paired.user, paired.client
        over = self._callbacks.on_paired(self)
        if over:
            self._context.audit.write("session-refused", vm=self._vm_id, user=self.user,
                                      client=self.client, reason="over-limit", limit=over,
                                      result="refused")
            self.close(closecodes.OVER_LIMIT.code, closecodes.reason(
                closecodes.OVER_LIMIT.name, "too many sessions "
                + ("for this user" if over == "max_sessions_per_user" else "on this VM")))
            return
        self.pump = ChannelPump(VmChannel(self._context.state.vm_key, self._vm_id,
                                          self._authorize),
                                send=self.sendMessage, on_established=self._established,
                                on_delivered=self._delivered, on_failed=self._channel_failed,
                                stopped=lambda: self._close_sent)
        self._arm(self._context.handshake_timeout, "secure channel handshake")

    # -- the secure channel ----------------------------------------------------

    def _authorize(self, user_key: bytes) -> bool:
        self.user_key = user_key  # for the audit line, also when refused
        return self._context.state.is_authorized(user_key)

    def _established(self, user_key: bytes) -> None:
        self._disarm()
        self.phase = Phase.ESTABLISHED
        self.user_key = user_key
        self.session = self._context.open_session(
            Peer(self._vm_id, self.user, self.client, user_key), self._send_app, self.close)
        # Children's output stops when the websocket's transport buffer is full.
        self.transport.registerProducer(self.session.group, True)  # type: ignore[union-attr]

    def _delivered(self, plaintext: bytes) -> None:
        if self.session is not None:
            self.session.received(plaintext)

    def _send_app(self, header: dict[str, Any], body: bytes = b"") -> None:
        if self.pump is not None and self.phase is Phase.ESTABLISHED:
            self.pump.send_app(app.encode(header, body))

    def _channel_failed(self, e: ChannelError) -> None:
        key = self.pump.channel.peer_key if self.pump is not None else None
        self.user_key = self.user_key or key
        event = "session-refused" if self.phase is Phase.HANDSHAKE else "session-error"
        fingerprint = identity.fingerprint(self.user_key) if self.user_key else ""
        self._context.audit.write(event, vm=self._vm_id, user=self.user, user_key=fingerprint,
                                  client=self.client, reason=e.code, result="refused")
        if e.code == "not-authorized":
            self.close(closecodes.NOT_AUTHORIZED.code, closecodes.reason(
                closecodes.NOT_AUTHORIZED.name, "this user is not authorized on this VM"))
        else:
            # 4400 carries the channel's own error name (PROTOCOL.md §1.2)
            self.close(closecodes.CHANNEL_ERROR.code, closecodes.reason(e.code))

    def _oversized(self) -> None:
        """A message over ``max_message``: refused as the channel would refuse
        it, judged by its size alone; before pairing, a bad control message."""
        if self.phase is Phase.CONTROL:
            self._act(self.control.oversized())
            return
        established = self.phase is Phase.ESTABLISHED
        if self._incoming_binary:
            code = "record-too-large" if established else "unexpected-message"
        else:
            code = "plaintext-after-handshake" if established else "bad-message"
        self._channel_failed(ChannelError(code))


class LegFactory(WebSocketClientFactory):
    """Builds each leg with ``build()``, which gives it its callbacks."""

    def __init__(self, build: Callable[[], VmLeg], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        tune_malloc()  # a child's output: no page faults per record
        self._build = build

    def buildProtocol(self, addr: Any) -> VmLeg:
        leg = self._build()
        leg.factory = self
        return leg
