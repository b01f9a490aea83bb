"""The relay between a paired VM socket and user (PROTOCOL.md §3 "Relay").

A :class:`Pair` forwards whole messages from each end to the other, counts
them, ends an idle pair, and when one end closes closes the other with the
code and reason of the "Closing" table (:func:`peer_closed`,
:func:`peer_failed`, :func:`peer_lost`).  It talks to its ends only through
:class:`IRelayEnd`, and tells whoever made it that it ended through
``on_end``; it knows nothing of autobahn.

Backpressure: each end's own transport holds a :class:`SendBufferWatch`
(a streaming producer) from the end's opening to its close.  When that
transport's send buffer passes its limit the end stops being read (what its
peer sends costs output too: pongs, close replies) and, while it is paired,
so does its partner; both are read again once it has drained.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from ticrypt import closecodes as cc
from ticrypt import signed
from ticrypt.framebudget import PEER_REASON
from ticrypt.timers import cancel_call

# why an end is not being read (bits for IRelayEnd.pause_reading)
PARTNER_FULL = 1   # its partner's send buffer is full
OWN_FULL = 2       # its own send buffer is full


class IRelayEnd(Interface):
    """One end of a :class:`Pair` (:class:`~ticrypt.proxy.ws.Leg`)."""

    pair = Attribute("The Pair relaying this end, once paired (else None).")

    def send(payload: bytes, is_binary: bool) -> None:
        """Send one whole message to this end's peer (dropped if it is closing)."""

    def close_with(code: int, reason: str) -> None:
        """Close this end with ``code`` and ``reason``, after what is queued."""

    def pause_reading(why: int) -> None:
        """Stop reading this end because of ``why`` (:data:`PARTNER_FULL`,
        :data:`OWN_FULL`)."""

    def resume_reading(why: int) -> None:
        """``why`` no longer holds this end (it is read once nothing does)."""

    def send_buffer_full() -> bool:
        """This end's own send buffer is over its limit."""


@implementer(IPushProducer)
class SendBufferWatch:
    """The producer on an end's own transport: told when its send buffer is
    full and when it has drained."""

    __slots__ = ("_end",)

    def __init__(self, end: IRelayEnd):
        self._end = end

    def pauseProducing(self) -> None:
        self._end.pause_reading(OWN_FULL)
        if self._end.pair is not None:
            self._end.pair.backed_up(self._end)

    def resumeProducing(self) -> None:
        self._end.resume_reading(OWN_FULL)
        if self._end.pair is not None:
            self._end.pair.drained(self._end)

    def stopProducing(self) -> None:
        pass


# -- what the partner is told (PROTOCOL.md §3 "Closing") ---------------------------


def peer_closed(code: int | None, reason: str | None,
                protocol_error: bool = False) -> tuple[int, str]:
    """This end's peer sent a close frame with ``code``/``reason``
    (``protocol_error``: a close the websocket layer refused as malformed)."""
    if protocol_error:
        return cc.PEER_LOST.code, cc.reason(cc.PEER_LOST.name,
                                            "the peer broke the websocket protocol")
    if code is None:
        return cc.NORMAL.code, ""
    if code in (cc.NORMAL.code, cc.GOING_AWAY.code) or 4000 <= code <= 4999:
        return code, reason or ""
    return cc.PEER_LOST.code, cc.reason(cc.PEER_LOST.name, f"the peer closed with code {code}")


def peer_failed(code: int | None) -> tuple[int, str]:
    """The websocket layer failed this end with ``code`` (1009 for a message
    over the size limit; 1002, 1007: a protocol error of the peer's)."""
    if code == cc.TOO_BIG.code:
        return cc.TOO_BIG.code, cc.reason(cc.TOO_BIG.name,
                                          "the peer sent a message over the proxy limit")
    return cc.PEER_LOST.code, cc.reason(cc.PEER_LOST.name,
                                        f"the peer broke the websocket protocol ({code})")


def peer_lost(ping_timeout: bool) -> tuple[int, str]:
    """This end's connection ended without a close frame."""
    detail = "no answer to pings" if ping_timeout else "connection lost without a close frame"
    return cc.PEER_LOST.code, cc.reason(cc.PEER_LOST.name, detail)


#: What the partner of an end dropped for its frames is told (code 4009).
PEER_OVER_FRAME_LIMIT = PEER_REASON


class Pair:
    """One VM end joined with one user end: relay, accounting, end.

    ``audit(event, **fields)`` writes the ``pair-end`` line; ``on_end(pair)``
    is called once, after both ends were told."""

    log = Logger()

    def __init__(self, *, vm_id: str, ticket: signed.Ticket, vm: IRelayEnd, user: IRelayEnd,
                 clock: IReactorTime, idle_timeout: float, audit: Callable[..., None],
                 on_end: Callable[[Pair], None]):
        self.vm_id = vm_id
        self.ticket = ticket
        self.vm = vm
        self.user = user
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._audit = audit
        self._on_end = on_end
        self.started = clock.seconds()
        self.last_activity = self.started
        self.bytes_up = 0     # user -> VM
        self.bytes_down = 0   # VM -> user
        self.ended = False
        self._idle: IDelayedCall | None = None

    def start(self) -> None:
        """Both ends know they are paired: an end whose send buffer is
        already full holds its partner; the idle timer runs."""
        for end in (self.vm, self.user):
            if end.send_buffer_full():
                self.backed_up(end)
        self._idle = self._clock.callLater(self._idle_timeout, self._check_idle)

    def partner(self, end: IRelayEnd) -> IRelayEnd:
        return self.user if end is self.vm else self.vm

    def relay(self, src: IRelayEnd, payload: bytes, is_binary: bool) -> None:
        """Forward one whole message from ``src`` to its partner."""
        if self.ended:
            return
        if src is self.user:
            self.bytes_up += len(payload)
        else:
            self.bytes_down += len(payload)
        self.last_activity = self._clock.seconds()
        self.partner(src).send(payload, is_binary)

    def backed_up(self, end: IRelayEnd) -> None:
        """``end``'s send buffer is full: stop reading its partner."""
        if not self.ended:
            self.partner(end).pause_reading(PARTNER_FULL)

    def drained(self, end: IRelayEnd) -> None:
        if not self.ended:
            self.partner(end).resume_reading(PARTNER_FULL)

    def _check_idle(self) -> None:
        try:
            self._check_idle_now()
        except Exception:
            self.log.failure("proxy: idle check failed for {vm}", vm=self.vm_id)

    def _check_idle_now(self) -> None:
        self._idle = None
        if self.ended:
            return
        remaining = self._idle_timeout - (self._clock.seconds() - self.last_activity)
        if remaining > 0:
            self._idle = self._clock.callLater(remaining, self._check_idle)
            return
        self.end(None, cc.TIMEOUT.code, cc.reason(cc.TIMEOUT.name,
                                                  f"idle for {self._idle_timeout:g}s"))

    def end(self, src: IRelayEnd | None, code: int, reason: str) -> None:
        """``src`` ended (None: the proxy ends the pair); close the other
        end(s) with ``code``/``reason`` after everything already relayed."""
        if self.ended:
            return
        self.ended = True
        cancel_call(self._idle)
        self._idle = None
        for end in (self.vm, self.user):  # no longer held for each other
            end.resume_reading(PARTNER_FULL)
        for end in (self.vm, self.user):
            if end is not src:
                end.close_with(code, reason)
        ended_by = "proxy" if src is None else ("vm" if src is self.vm else "user")
        self._audit(
            "pair-end", vm=self.vm_id, user=self.ticket.user, client=self.ticket.client,
            duration=round(self._clock.seconds() - self.started, 3), bytes_up=self.bytes_up,
            bytes_down=self.bytes_down, close_code=code, close_reason=reason,
            ended_by=ended_by)
        self._on_end(self)

