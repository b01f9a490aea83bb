"""``MuxProtocol``: the mux connection as a Twisted protocol on a (TLS) transport.

It feeds :class:`MuxConnection` with the bytes it receives, dispatches the
events to the streams, and writes what the core queues. Output follows the
design of magic-wormhole Dilation's ``outbound.py``: ONE push producer is
registered on the underlying transport; it round-robins over the streams
with something to send (one frame per stream per turn, so a busy stream
cannot starve the others), and when the transport pauses it, every stream's
application producer is paused. Control frames (PONG, WINDOW, GOAWAY) are
written at once: they are few and bounded by the core's flood budgets.

Keepalive: a PING every ``keepalive_interval``; the connection is dropped
("keepalive-timeout") when no frame arrived for ``keepalive_timeout``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ticrypt.mux.connection import (
    ConnectionEnded,
    DataReceived,
    Event,
    MuxConnection,
    MuxSettings,
    MuxUsageError,
    PongReceived,
    ResetReceived,
    SendWindowOpened,
    Side,
    StreamAccepted,
    StreamEnded,
    StreamHalfClosed,
    StreamOpened,
)
from ticrypt.mux.stream import (
    IncomingStream,
    StreamAddress,
    StreamRefused,
    StreamReset,
    StreamTransport,
)
from ticrypt.tcp import no_delay
from ticrypt.timers import cancel_call

#: Seconds a closing connection may take to flush its GOAWAY before it is aborted.
CLOSE_GRACE = 10.0
#: Queued pieces (a DATA frame is two: header and payload) after which a
#: pump writes what it has framed: 8 is four 64 KiB frames, one write of 256 KiB.
FLUSH_PIECES = 8


class MuxClosed(ConnectionLost):
    """The mux connection under a stream ended; ``reason`` is its stable name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"tunnel connection closed: {self.reason}"


@implementer(IPushProducer)
class _Outbound:
    """The one producer registered on the underlying transport."""

    def __init__(self, mux: MuxProtocol) -> None:
        self._mux = mux

    def pauseProducing(self) -> None:
        self._mux._pause_output()

    def resumeProducing(self) -> None:
        self._mux._resume_output()

    def stopProducing(self) -> None:
        pass  # connectionLost follows


class MuxProtocol(Protocol):
    """One end of the tunnel mux over a stream transport (TLS in production).

    ``side``: "client" (opens streams, see :class:`StreamEndpoint`) or
    "server" (``on_stream(IncomingStream)`` is called for each OPEN).
    ``clock``: the reactor or a ``task.Clock``.
    """

    log = Logger()

    def __init__(
        self,
        side: Side,
        clock: IReactorTime,
        settings: MuxSettings | None = None,
        on_stream: Callable[[IncomingStream], object] | None = None,
    ) -> None:
        if side == "server" and on_stream is None:
            raise ValueError("a server-side mux needs on_stream")
        self.settings = settings if settings is not None else MuxSettings()
        self.side = side
        self._conn = MuxConnection(side, self.settings)
        self._clock = clock
        self._on_stream = on_stream
        self._streams: dict[int, StreamTransport] = {}
        self._connecting: dict[int, tuple[Deferred[IProtocol], IProtocolFactory]] = {}
        self._incoming: dict[int, IncomingStream] = {}
        self._ready: OrderedDict[int, StreamTransport] = OrderedDict()
        self._outbound = _Outbound(self)
        self._output_paused = False
        self._pumping = False
        self._waiters: list[Deferred[str]] = []
        self._reason: str | None = None
        self._ping_call: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._pings_sent = 0
        self._frames_seen = 0
        self.streams_opened = 0

    # -- public ------------------------------------------------------------------

    def when_closed(self) -> Deferred[str]:
        """Fires with the stable reason name once the connection is gone."""
        if self._reason is not None:
            return succeed(self._reason)
        d: Deferred[str] = Deferred()
        self._waiters.append(d)
        return d

    def stats(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "streams": len(self._streams),
            "streams_opened": self.streams_opened,
            "bytes_in": self._conn.bytes_in,
            "bytes_out": self._conn.bytes_out,
            "closed": self._reason,
        }

    def ping(self) -> None:
        """Send a PING now (besides the keepalive's). Any frame from the peer
        (its PONG at the latest) then shows in :attr:`frames_received`."""
        if self._conn.closed or self.transport is None:
            return
        self._pings_sent += 1
        self._conn.ping(self._pings_sent.to_bytes(8, "big"))
        self._flush()

    @property
    def frames_received(self) -> int:
        """Complete frames received from the peer so far."""
        return self._conn.frames_in

    def close(self, reason: str = "normal") -> None:
        """Send GOAWAY(reason) and close the transport (streams see MuxClosed)."""
        if self._conn.closed:
            return
        self._conn.go_away(reason)
        self._shutdown()

    # -- Protocol -------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        no_delay(self.transport)  # a stream's small write must not wait for an ACK
        self.transport.registerProducer(self._outbound, True)  # type: ignore[attr-defined]
        self._ping_call = self._clock.callLater(self.settings.keepalive_interval, self._keepalive)
        self._deadline = self._clock.callLater(self.settings.keepalive_timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._conn.closed:
            return
        try:
            events = self._conn.receive(data, self._clock.seconds())
            if self._conn.frames_in != self._frames_seen:
                self._frames_seen = self._conn.frames_in
                if self._deadline is not None and self._deadline.active():
                    self._deadline.reset(self.settings.keepalive_timeout)
            for event in events:
                self._dispatch(event)
        finally:
            self._flush()
        self._pump()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in (self._ping_call, self._deadline, self._abort_call):
            cancel_call(call)
        if not self._conn.closed:
            self._conn.go_away("connection-lost")
        self._end_streams()
        self._reason = self._conn.reason or "connection-lost"
        self.log.info("tunnel mux ({side}) closed: {reason}", side=self.side, reason=self._reason, **self._conn_stats())
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self._reason)

    def _conn_stats(self) -> dict[str, int]:
        return {"bytes_in": self._conn.bytes_in, "bytes_out": self._conn.bytes_out, "streams_opened": self.streams_opened}

    # -- events -----------------------------------------------------------------

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            st = self._streams.get(event.stream)
            if st is not None:
                st._data(event.data)
        elif isinstance(event, SendWindowOpened):
            st = self._streams.get(event.stream)
            if st is not None:
                self._stream_ready(st)
        elif isinstance(event, StreamOpened):
            self._on_open(event.stream, event.port)
        elif isinstance(event, StreamAccepted):
            self._on_accepted(event.stream)
        elif isinstance(event, StreamHalfClosed):
            st = self._streams.get(event.stream)
            if st is not None:
                st._peer_half_closed()
        elif isinstance(event, StreamEnded):
            # Our HALF_CLOSE was sent before: the stream ends once the
            # application has taken the input it still holds.
            st = self._streams.get(event.stream)
            if st is not None:
                st._peer_half_closed()
        elif isinstance(event, ResetReceived):
            self._on_reset(event.stream, event.code, event.reason)
        elif isinstance(event, PongReceived):
            pass
        elif isinstance(event, ConnectionEnded):
            if event.by_peer:
                self.log.info("tunnel mux ({side}): peer sent GOAWAY: {reason}", side=self.side, reason=event.reason)
            else:
                self.log.warn("tunnel mux ({side}): protocol error from peer: {reason}", side=self.side, reason=event.reason)
            self._shutdown()

    def _on_open(self, stream: int, port: int) -> None:
        st = StreamTransport(self, stream, port)
        self._streams[stream] = st
        incoming = IncomingStream(self, st)
        self._incoming[stream] = incoming
        self.streams_opened += 1
        assert self._on_stream is not None
        try:
            self._on_stream(incoming)
        except Exception:
            self.log.failure("on_stream failed for port {port}", port=port)
            if not incoming.answered:
                incoming.refuse("internal-error")

    def _on_accepted(self, stream: int) -> None:
        st = self._streams.get(stream)
        pending = self._connecting.pop(stream, None)
        if st is None or pending is None:
            return
        d, factory = pending
        try:
            protocol = factory.buildProtocol(st.getPeer())
        except Exception:
            self.log.failure("buildProtocol failed for a tunnel stream")
            protocol = None
        if protocol is None:
            self._reset_stream(st, 0, "no-protocol")
            self._forget(st)
            d.errback(StreamRefused("no-protocol"))
            return
        st._attach(protocol)
        d.callback(protocol)

    def _on_reset(self, stream: int, code: int, reason: str) -> None:
        st = self._streams.get(stream)
        if st is None:
            return
        pending = self._connecting.pop(stream, None)
        incoming = self._incoming.pop(stream, None)
        if pending is not None:
            self._forget(st)
            st._ended = True
            pending[0].errback(StreamRefused(reason))
        elif incoming is not None and not incoming.answered:
            self._forget(st)
            st._ended = True
            incoming._cancel(Failure(StreamReset(code, reason)))
        else:
            st._finish(Failure(StreamReset(code, reason)))

    # -- called by streams and endpoints ---------------------------------------

    def _connect_stream(self, port: int, factory: IProtocolFactory) -> Deferred[IProtocol]:
        if self._conn.closed or self.transport is None:
            return fail(MuxClosed(self._conn.reason or "not-connected"))
        try:
            stream = self._conn.open_stream(port)
        except MuxUsageError:
            return fail(StreamRefused("too-many-streams"))
        st = StreamTransport(self, stream, port)
        self._streams[stream] = st

        def cancel(d: Deferred[IProtocol]) -> None:
            if self._connecting.pop(stream, None) is not None:
                self._reset_stream(st, 0, "cancelled")
                st._ended = True
                self._forget(st)

        d: Deferred[IProtocol] = Deferred(cancel)
        self._connecting[stream] = (d, factory)
        self.streams_opened += 1
        self._flush()
        return d

    def _accept_stream(self, st: StreamTransport) -> None:
        self._incoming.pop(st.stream_id, None)
        self._conn.accept(st.stream_id)
        self._flush()

    def _reset_stream(self, st: StreamTransport, code: int, reason: str) -> None:
        self._conn.reset(st.stream_id, reason, code)
        self._flush()

    def _consumed(self, st: StreamTransport, n: int) -> None:
        self._conn.consumed(st.stream_id, n)
        self._flush()

    def _forget(self, st: StreamTransport) -> None:
        if self._streams.get(st.stream_id) is st:
            del self._streams[st.stream_id]
        self._ready.pop(st.stream_id, None)
        self._incoming.pop(st.stream_id, None)

    def _stream_ready(self, st: StreamTransport) -> None:
        if st.stream_id in self._streams and st.stream_id not in self._ready:
            self._ready[st.stream_id] = st
        self._pump()

    def _peer_address(self) -> object:
        return self.transport.getPeer() if self.transport is not None else None

    def _host_address(self) -> object:
        return self.transport.getHost() if self.transport is not None else None

    # -- output -------------------------------------------------------------------

    def _flush(self) -> None:
        if not self._conn.pending:
            return  # called after every event: most have queued nothing
        out = self._conn.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def _pause_output(self) -> None:
        self._output_paused = True
        for st in list(self._streams.values()):
            st._update_producer()

    def _resume_output(self) -> None:
        self._output_paused = False
        for st in list(self._streams.values()):
            st._update_producer()
        self._pump()

    def _pump(self) -> None:
        """Round-robin: one frame per ready stream per turn until the
        transport pauses us or nothing is ready.

        The frames of a turn are written together, in one write of at most
        :data:`FLUSH_PIECES` frames (one TLS write instead of one per frame;
        the transport can still pause us between two such writes)."""
        if self._pumping or self.transport is None:
            return
        self._pumping = True
        conn = self._conn
        ready = self._ready
        try:
            while ready and not self._output_paused and not conn.closed:
                stream, st = ready.popitem(last=False)
                if stream in self._connecting and self.side == "server":
                    continue  # pragma: no cover (only clients connect)
                if self.side == "server" and stream in self._incoming:
                    continue  # not accepted yet: it is readied again on accept
                self._send_some(st)
                if conn.pending >= FLUSH_PIECES:
                    self._flush()
                if not st._ended and st._wants_send(conn.send_window(stream)):
                    ready[stream] = st
        finally:
            self._pumping = False
            self._flush()

    def _send_some(self, st: StreamTransport) -> None:
        stream = st.stream_id
        window = self._conn.send_window(stream)
        if st.pending_output and window:
            chunk = st._take(min(window, self.settings.max_frame))
            taken = self._conn.send(stream, chunk)
            st._untake(chunk[taken:])
        elif st.pending_output == 0 and st._write_closing and not st._write_closed:
            st._write_closed = True
            self._conn.half_close(stream)
        st._after_send()
        st._maybe_done()

    # -- lifecycle ---------------------------------------------------------------

    def _end_streams(self) -> None:
        reason = self._conn.reason or "connection-lost"
        for stream, (d, _) in list(self._connecting.items()):
            del self._connecting[stream]
            d.errback(MuxClosed(reason))
        for incoming in list(self._incoming.values()):
            if not incoming.answered:
                incoming._cancel(Failure(MuxClosed(reason)))
        self._incoming.clear()
        for st in list(self._streams.values()):
            st._finish(Failure(MuxClosed(reason)))
        self._streams.clear()
        self._ready.clear()

    def _shutdown(self) -> None:
        """The core has ended: write the GOAWAY, end streams, close the transport."""
        self._flush()
        self._end_streams()
        if self.transport is not None:
            # TLS closes only once no producer is registered.
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseConnection()
            if self._abort_call is None:
                self._abort_call = self._clock.callLater(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _keepalive(self) -> None:
        self._ping_call = None
        if self._conn.closed:
            return
        self.ping()
        self._ping_call = self._clock.callLater(self.settings.keepalive_interval, self._keepalive)

    def _timed_out(self) -> None:
        self._deadline = None
        if self._conn.closed:
            return
        self.log.warn("tunnel mux ({side}): no frame for {timeout} s, dropping", side=self.side, timeout=self.settings.keepalive_timeout)
        self._conn.go_away("keepalive-timeout")
        self._flush()
        self._end_streams()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


__all__ = ["MuxClosed", "MuxProtocol", "StreamAddress"]
