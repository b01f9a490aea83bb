"""Everything the proxy does to autobahn's internals, in one place.

autobahn's server protocol is written for a few long-lived, well-behaved
peers; the proxy holds tens of thousands of mostly idle ones, some hostile.
:class:`LeanWebSocket` is autobahn's ``WebSocketServerProtocol`` with what
that takes, all of it reading or overriding autobahn attributes and hooks
that are not public API (checked against autobahn 26.10), so that an
autobahn upgrade touches this file only:

* **memory of idle sockets**: at open, the opening handshake's state and the
  per-connection copies of the factory's protocol options are dropped
  (:meth:`~LeanWebSocket.release_handshake_state`; the options are then read
  from the factory through ``__getattr__``);
* **input**: autobahn's per-read and per-message extras are skipped
  (:mod:`ticrypt.wsfast`); the HTTP upgrade request is bounded (autobahn
  buffers it without a limit); large reads are fed to autobahn in slices (its frame
  parser copies the whole receive buffer once per frame); every frame header
  is counted by a :class:`~ticrypt.framebudget.FrameBudget`
  (:class:`~ticrypt.wsfast.FrameCounting`), and a peer over a frame limit is
  not parsed any further;
* **output**: every write made while one peer's read is parsed (relayed
  messages, pongs, close frames) is joined into one transport write per leg
  at the end of that read (:class:`OutputBatch`), so that Twisted's
  byte-counted send buffer also bounds memory for tiny frames; a leg's own
  transport holds a producer for the leg's whole open life
  (:meth:`~LeanWebSocket.watch_output`), so a leg whose own send buffer is
  full (its pongs and everything else) can stop being read
  (:meth:`~LeanWebSocket.pause_reading`);
* **closing**: a close frame may carry any code (:meth:`~LeanWebSocket.send_close`:
  the proxy passes 1009 on, which autobahn's ``sendClose`` refuses); the
  subclass hears of every close frame sent and received
  (:meth:`~LeanWebSocket.close_sent`, :meth:`~LeanWebSocket.close_received`),
  autobahn failing the websocket included; a graceful close that cannot
  finish because the peer does not read is aborted after
  ``closeHandshakeTimeout``; autobahn arms no timer for it (its close reply
  to a peer's close, or our own drop);
* **pings**: autobahn's auto-ping timers are suspended while a leg is not
  read only for its partner's sake (its pongs could not be read), and
  rescheduled when it is read again;
* **TLS**: a socket that waits frees what the TLS handshake left in its
  memory BIOs (:meth:`~LeanWebSocket.release_tls_buffers`, through
  :mod:`ticrypt.proxy.tlsmem`).

The protocol's factory must provide ``clock`` (an ``IReactorTime``) and
``output_batch`` (an :class:`OutputBatch`).
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from ticrypt import closecodes
from ticrypt.proxy.relay import PARTNER_FULL
from ticrypt.proxy.tlsmem import release_bio_buffers
from ticrypt.timers import cancel_call
from ticrypt.wsfast import FrameCounting, drop_close_timer, message_end

#: autobahn is fed at most this much at a time (see LeanWebSocket.dataReceived).
FEED_SLICE = 16384
#: Largest HTTP upgrade request we buffer before giving up on a peer.
MAX_HTTP_REQUEST = 16384

_OPEN = WebSocketProtocol.STATE_OPEN
_CLOSED = WebSocketProtocol.STATE_CLOSED
_CONNECTING = WebSocketProtocol.STATE_CONNECTING
_MISSING = object()

#: autobahn attributes that only serve the opening handshake; released at
#: open (idle sockets are the proxy's main memory cost).
_HANDSHAKE_ONLY = {
    "http_headers": None, "http_request_data": None, "http_response_data": None,
    "http_status_line": None, "http_request_params": None, "http_request_uri": None,
    "http_request_host": None, "websocket_protocols": (), "websocket_extensions": (),
    "websocket_origin": None, "_wskey": None, "_transport_details": None,
}
#: autobahn copies every protocol option of the factory onto each protocol at
#: connect; after open the unchanged ones are read from the factory instead.
_CONFIG_ATTRS = frozenset(WebSocketServerProtocol.CONFIG_ATTRS)


def with_factory_options(protocol: type[Any], factory: Any) -> type[Any]:
    """A subclass of ``protocol`` holding ``factory``'s protocol options as
    class attributes.

    Once :meth:`LeanWebSocket.release_handshake_state` has dropped a
    socket's copies, autobahn reads each option (a dozen reads per message)
    through ``__getattr__``, a Python call each; from the class they are
    read like instance attributes, and still cost nothing per socket.  The
    factory's options must be final (set in its ``__init__``)."""
    options = {}
    for name in _CONFIG_ATTRS:
        value = getattr(factory, name, _MISSING)
        if value is not _MISSING:
            options[name] = staticmethod(value) if callable(value) else value
    return type(protocol.__name__, (protocol,), options)


class OutputBatch:
    """Joins the writes made while input is parsed: one per leg per read.

    autobahn writes every frame with its own ``transport.write``; a read of
    tiny frames relayed to a partner (or pinged at us) would queue tens of
    thousands of few-byte strings, each costing ~50 bytes of Python objects
    that Twisted's ``bufferSize`` does not count.  One batch per factory."""

    def __init__(self) -> None:
        self._depth = 0
        self._legs: list[LeanWebSocket] = []

    @property
    def open(self) -> bool:
        return self._depth > 0

    def begin(self) -> None:
        self._depth += 1

    def end(self) -> None:
        self._depth -= 1
        if self._depth:
            return
        while self._legs:
            legs, self._legs = self._legs, []
            for leg in legs:
                leg.flush_output()

    def add(self, leg: LeanWebSocket) -> None:
        self._legs.append(leg)


class LeanWebSocket(FrameCounting, WebSocketServerProtocol):  # type: ignore[misc]
    """autobahn's server protocol, bounded.  Subclasses implement
    :meth:`frames_exceeded` (close the leg, say so, then call
    :meth:`drop_after_close`), :meth:`close_sent` and :meth:`close_received`."""

    wlog = Logger()
    factory: Any
    # class-level defaults: an idle socket keeps no instance entry for them
    _out: list[bytes] | None = None
    _abort_call: IDelayedCall | None = None
    _held = 0  # why this leg is not read (bits: ticrypt.proxy.relay OWN_FULL, PARTNER_FULL)

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes missing from the instance: the protocol
        # options released by release_handshake_state live on the factory
        if name in _CONFIG_ATTRS and "factory" in self.__dict__:
            return getattr(self.factory, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- hooks for the subclass -------------------------------------------------

    def close_sent(self, code: int | None) -> None:
        """A close frame with ``code`` went out that the peer did not ask
        for: ours, or autobahn failing the websocket (1009 message too big,
        1002 protocol error, 1007 bad UTF-8)."""
        raise NotImplementedError

    def close_received(self, code: int | None, reason: str | None,
                       protocol_error: bool) -> None:
        """The peer's close frame arrived on the open websocket
        (``protocol_error``: a malformed one, which autobahn failed)."""
        raise NotImplementedError

    # -- state ------------------------------------------------------------------

    def ws_open(self) -> bool:
        """The websocket is open (autobahn's ``state``)."""
        return bool(self.state == _OPEN)

    def ws_closed(self) -> bool:
        return bool(self.state == _CLOSED)

    def protocol_failed(self) -> bool:
        """autobahn failed this websocket for a protocol error of the peer."""
        return bool(self.failedByMe)

    def lost_to_ping_timeout(self) -> bool:
        """The connection was dropped because the peer did not answer a ping."""
        return "ping timeout" in (self.wasNotCleanReason or "")

    def release_tls_buffers(self) -> bool:
        """Give an idle TLS connection fresh, empty memory BIOs (freeing the
        handshake flights' buffers); returns whether it did (a plain
        connection has none)."""
        get_handle = getattr(self.transport, "getHandle", None)
        return get_handle is not None and release_bio_buffers(get_handle())

    def release_handshake_state(self) -> None:
        """Drop what only the opening handshake needed (HTTP request and
        response, headers) and the per-connection copies of the factory's
        protocol options, then compact the instance dict."""
        d = self.__dict__
        for name, empty in _HANDSHAKE_ONLY.items():
            if name in d:
                d[name] = empty
        factory = self.factory
        for name in _CONFIG_ATTRS:
            if name in d and d[name] is getattr(factory, name, _MISSING):
                del d[name]
        self.__dict__ = dict(d)  # a dict never shrinks in place

    # -- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._input_closed:
            return
        # autobahn buffers the HTTP upgrade request without a bound
        if self.state == _CONNECTING and len(self.data) + len(data) > MAX_HTTP_REQUEST:
            self.wlog.info("proxy: upgrade request from {peer} too long", peer=self.peer)
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        batch: OutputBatch = self.factory.output_batch
        batch.begin()
        try:
            if len(data) <= FEED_SLICE:
                self._dataReceived(data)
                return
            # autobahn copies its whole receive buffer once per frame it
            # parses: feed a large read (up to bufferSize) in slices so that
            # stays linear
            for i in range(0, len(data), FEED_SLICE):
                if self._input_closed:
                    return
                self._dataReceived(data[i:i + FEED_SLICE])
        finally:
            batch.end()

    def onMessageEnd(self) -> None:
        message_end(self)

    # -- output -----------------------------------------------------------------

    def watch_output(self, buffer_size: int, producer: IPushProducer) -> None:
        """From now on ``producer`` is paused when this leg's send buffer
        passes ``buffer_size`` bytes (also Twisted's read size) and resumed
        when it has drained.

        Over TLS the buffer that fills is the TCP connection's under the TLS
        layer (which passes each write on at once): the size is set there
        too, else a TLS leg was paused at Twisted's default of 64 KiB, once
        per 64 KiB message, and read 64 KiB at a time."""
        transport: Any = self.transport
        transport.bufferSize = buffer_size
        if isinstance(transport, TLSMemoryBIOProtocol) and transport.transport is not None:
            transport.transport.bufferSize = buffer_size  # type: ignore[attr-defined]
        transport.registerProducer(producer, True)

    def pause_reading(self, why: int) -> None:
        """Stop reading this leg, because its partner's send buffer is full
        (``PARTNER_FULL``) or its own (``OWN_FULL``: it does not read its
        pongs or what is relayed to it)."""
        if not self.ws_open():
            return
        was = self._held
        self._held |= why
        if not was:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._pings_follow_reading()

    def resume_reading(self, why: int) -> None:
        """``why`` no longer holds this leg; it is read once nothing does."""
        if not self._held & why:
            return
        self._held &= ~why
        if not self._held and not self.ws_closed():
            self.transport.resumeProducing()  # type: ignore[union-attr]
        self._pings_follow_reading()

    def reading_held(self, why: int) -> bool:
        return bool(self._held & why)

    def _pings_follow_reading(self) -> None:
        """Held only for a slow partner, this leg cannot have its pongs read:
        its pings are suspended (the slow partner's own pings detect a dead
        reader).  A leg whose own buffer is full keeps its pings: a peer that
        reads nothing is dropped within ping_interval + ping_timeout."""
        if self._held == PARTNER_FULL:
            self._suspend_pings()
        else:
            self._resume_pings()

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        batch: OutputBatch = self.factory.output_batch
        if not sync and not chopsize:
            if self._out is not None:
                self._out.append(data)
                return
            if batch.open:
                self._out = [data]
                batch.add(self)
                return
        self.flush_output()
        super().sendData(data, sync, chopsize)

    def flush_output(self) -> None:
        out = self._out
        if out is not None:
            del self._out  # back to the class default: no instance entry
            super().sendData(out[0] if len(out) == 1 else b"".join(out))

    def _closeConnection(self, abort: bool = False) -> None:
        # (only called from dropConnection, which has unregistered our
        # producer: a registered one would keep a graceful close from finishing)
        self.flush_output()
        super()._closeConnection(abort)
        if not abort and self._abort_call is None:
            # what is queued (our close frame, our close reply) goes out
            # first; a peer that does not read gets no longer than this
            self._abort_call = self.factory.clock.callLater(
                self.closeHandshakeTimeout or 1.0, self._abort_now)

    def _abort_now(self) -> None:
        self._abort_call = None
        self.wlog.info("proxy: {peer} did not read its close: connection aborted",
                       peer=self.peer)
        self.transport.abortConnection()  # type: ignore[union-attr]

    def send_close(self, code: int, reason: str) -> None:
        """Send a close frame with ``code`` (any: 1009 too) and ``reason``
        (cut to 123 bytes of UTF-8) if the websocket is open."""
        if self.ws_open():
            self.sendCloseFrame(code=code, reasonUtf8=closecodes.reason(reason).encode("utf-8"),
                                isReply=False)

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None,
                       isReply: bool = False) -> None:
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)
        if not isReply:
            self.close_sent(code)

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> bool | None:  # type: ignore[override]
        was_open = self.ws_open()
        result = super().onCloseFrame(code, reasonRaw)
        if was_open:
            self.close_received(self.remoteCloseCode, self.remoteCloseReason,
                                self.protocol_failed())
        return result

    def drop_after_close(self) -> None:
        """Close the TCP connection once what is queued (our close frame) is
        sent, without waiting for the peer's close reply; abort it if the
        peer does not read that within ``closeHandshakeTimeout``."""
        self.close_input()
        self.dropConnection(abort=False)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        cancel_call(self._abort_call)
        self._abort_call = None
        try:
            super().connectionLost(reason)
        finally:
            drop_close_timer(self)

    # -- pings ------------------------------------------------------------------

    def _suspend_pings(self) -> None:
        """Stop autobahn's pings (and the pong timeout) of this leg."""
        for name in ("autoPingPendingCall", "autoPingTimeoutCall"):
            call = getattr(self, name, None)
            if call is not None:
                call.cancel()
                setattr(self, name, None)
        self.autoPingPending = None

    def _resume_pings(self) -> None:
        """Ping again after ``autoPingInterval`` unless a ping is scheduled
        or awaits its pong."""
        interval = self.autoPingInterval
        if (interval and self.state == _OPEN
                and self.autoPingPendingCall is None and self.autoPingTimeoutCall is None):
            self.autoPingPendingCall = self.factory._batched_timer.call_later(
                interval, self._sendAutoPing)
