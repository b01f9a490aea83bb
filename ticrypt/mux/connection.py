"""Sans-IO mux connection: stream ids, windows, stream cap and flood budgets.

``MuxConnection`` takes bytes from the peer (:meth:`MuxConnection.receive`)
and returns events; the application's calls (open, accept, send, half-close,
reset, consumed, ping) queue frames, and :meth:`MuxConnection.data_to_send`
hands out the queued bytes to write. Every peer misbehaviour is a
connection-level protocol error: the connection queues GOAWAY(reason), ends
with a :class:`ConnectionEnded` event carrying a stable reason name, and
ignores whatever arrives after. Misuse by the local application raises
:class:`MuxUsageError` and queues nothing.

No transport, no clock, no Twisted: the caller feeds the time (``now``,
seconds) with each receive, and the flood budgets are counted per
``flood_interval`` of those timestamps.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import attrs

from ticrypt.mux.frames import (
    HEADER,
    MAX_PAYLOAD,
    MAX_STREAM_ID,
    MAX_WINDOW,
    RESET_CANCEL,
    RESET_REFUSED,
    T_DATA,
    Accept,
    Data,
    Frame,
    FrameDecoder,
    FrameError,
    GoAway,
    HalfClose,
    Open,
    Ping,
    Pong,
    Reset,
    Window,
    encode,
)

Side = Literal["client", "server"]

#: Every reason a connection can end with, besides the FrameError reasons
#: (which are used as they are) and "peer:<reason>" for a GOAWAY received.
PROTOCOL_ERRORS: dict[str, str] = {
    "unexpected-open": "OPEN received by the client",
    "even-stream-id": "OPEN with an even stream id (client ids are odd)",
    "stream-id-reuse": "OPEN with a stream id not above every earlier one",
    "too-many-streams": "OPEN while max_streams streams are open",
    "unknown-stream": "frame for a stream id that was never opened",
    "stream-closed": "frame for a stream that is closed",
    "unexpected-accept": "ACCEPT received by the server, or twice for a stream",
    "data-before-accept": "DATA or HALF_CLOSE from the server before its ACCEPT",
    "data-after-half-close": "DATA or HALF_CLOSE after the sender's HALF_CLOSE",
    "flow-control-violation": "DATA beyond the window granted",
    "window-overflow": "WINDOW raising the send window past 2^31-1",
    "zero-window-increment": "WINDOW with increment 0",
    "open-flood": "more OPEN frames per interval than allowed",
    "reset-flood": "more RESET frames per interval than allowed",
    "ping-flood": "more PING/PONG frames per interval than allowed",
    "window-flood": "more WINDOW frames per interval than allowed",
    "empty-data-flood": "more empty DATA frames per interval than allowed",
}


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive")


@attrs.frozen
class MuxSettings:
    """Limits of one mux connection (both ends use the same defaults).

    ``window``: initial per-stream window, in bytes, granted to the peer (and
    assumed granted by the peer). ``max_frame``: largest DATA payload this end
    sends (receivers accept up to 65536). Flood budgets count frames the peer
    sends per ``flood_interval`` seconds.  OPEN and RESET are budgeted at
    10,000 a second: far above what applications do (a browser or a
    connection pool opening and aborting streams; OpenSSH forwards about
    3,700 new connections a second on this machine kind) and still a bound
    on what a peer can make the other end do (each OPEN is one local
    connect, bounded in number by ``max_streams``).
    """

    window: int = attrs.field(default=2 * 1024 * 1024, validator=attrs.validators.and_(attrs.validators.ge(1), attrs.validators.le(MAX_WINDOW)))
    max_streams: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    max_frame: int = attrs.field(default=MAX_PAYLOAD, validator=attrs.validators.and_(attrs.validators.ge(1), attrs.validators.le(MAX_PAYLOAD)))
    keepalive_interval: float = attrs.field(default=30.0, validator=_positive)
    keepalive_timeout: float = attrs.field(default=90.0, validator=_positive)
    flood_interval: float = attrs.field(default=10.0, validator=_positive)
    max_opens: int = attrs.field(default=100_000, validator=attrs.validators.ge(1))
    max_resets: int = attrs.field(default=100_000, validator=attrs.validators.ge(1))
    max_pings: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    max_window_updates: int = attrs.field(default=65536, validator=attrs.validators.ge(1))
    max_empty_data: int = attrs.field(default=256, validator=attrs.validators.ge(1))

    def __attrs_post_init__(self) -> None:
        if self.keepalive_timeout <= self.keepalive_interval:
            raise ValueError("keepalive_timeout must be longer than keepalive_interval")


class MuxUsageError(Exception):
    """The local application misused the connection (a bug, not the peer's fault)."""


# -- events -----------------------------------------------------------------


@attrs.frozen
class StreamOpened:
    """Server: the client asked to open ``stream`` to ``port``; answer with
    :meth:`MuxConnection.accept` or :meth:`MuxConnection.refuse`."""

    stream: int
    port: int


@attrs.frozen
class StreamAccepted:
    """Client: the server accepted ``stream``."""

    stream: int


@attrs.frozen
class DataReceived:
    """Payload for ``stream``; call :meth:`MuxConnection.consumed` once the
    application has taken it, to give the peer its window back."""

    stream: int
    data: bytes


@attrs.frozen
class SendWindowOpened:
    """The peer granted more window on ``stream``: :meth:`MuxConnection.send` may take more."""

    stream: int


@attrs.frozen
class StreamHalfClosed:
    """The peer will send no more data on ``stream``."""

    stream: int


@attrs.frozen
class StreamEnded:
    """Both directions of ``stream`` are closed (the peer's HALF_CLOSE completed
    ours); the stream id is forgotten."""

    stream: int


@attrs.frozen
class ResetReceived:
    """The peer reset ``stream`` (``code`` from ``frames.RESET_CODES``); it is forgotten."""

    stream: int
    code: int
    reason: str


@attrs.frozen
class PongReceived:
    opaque: bytes


@attrs.frozen
class ConnectionEnded:
    """The connection is over: a protocol error of the peer (``by_peer`` false,
    GOAWAY queued), or a GOAWAY from the peer (``by_peer`` true, ``reason``
    is ``"peer:" + its reason``)."""

    reason: str
    by_peer: bool


Event = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | SendWindowOpened
    | StreamHalfClosed
    | StreamEnded
    | ResetReceived
    | PongReceived
    | ConnectionEnded
)


@attrs.define
class _Stream:
    id: int
    port: int
    accepted: bool
    send_window: int
    recv_window: int
    unacked: int = 0
    local_closed: bool = False
    remote_closed: bool = False


class _ProtocolError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MuxConnection:
    """One end of a mux connection. Only the client opens streams (odd ids,
    1, 3, 5, ..., never reused)."""

    def __init__(self, side: Side, settings: MuxSettings | None = None) -> None:
        if side not in ("client", "server"):
            raise ValueError(f"side must be 'client' or 'server', not {side!r}")
        self.side: Side = side
        self.settings = settings if settings is not None else MuxSettings()
        self._decoder = FrameDecoder()
        self._out: list[bytes | memoryview] = []
        self._streams: dict[int, _Stream] = {}
        # Highest stream id opened so far (by the client; seen by the server).
        self._last_id = -1
        # Streams this end reset, with the window the peer may still fill with
        # DATA it sent before it saw the RESET. Bounded: oldest forgotten.
        self._reset_by_us: OrderedDict[int, int] = OrderedDict()
        self._budget_start: float | None = None
        self._spent: dict[str, int] = {}
        self.reason: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_in = 0

    # -- queries -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.reason is not None

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    def has_stream(self, stream: int) -> bool:
        return stream in self._streams

    def send_window(self, stream: int) -> int:
        """Bytes :meth:`send` would accept now on ``stream`` (0 if it cannot send)."""
        s = self._streams.get(stream)
        if s is None or s.local_closed or self.closed:
            return 0
        return s.send_window

    @property
    def pending(self) -> int:
        """Frames (pieces) queued and not yet handed out by :meth:`data_to_send`."""
        return len(self._out)

    def data_to_send(self) -> bytes:
        """The bytes queued for the peer since the last call."""
        out = b"".join(self._out)
        self._out.clear()
        self.bytes_out += len(out)
        return out

    # -- local actions -------------------------------------------------------

    def _queue(self, frame: Frame) -> None:
        self._out.append(encode(frame))

    def _live(self, stream: int) -> _Stream:
        if self.closed:
            raise MuxUsageError(f"connection closed ({self.reason})")
        s = self._streams.get(stream)
        if s is None:
            raise MuxUsageError(f"no open stream {stream}")
        return s

    def open_stream(self, port: int) -> int:
        """Client: queue OPEN for ``port``; the new stream id."""
        if self.side != "client":
            raise MuxUsageError("only the client opens streams")
        if self.closed:
            raise MuxUsageError(f"connection closed ({self.reason})")
        if len(self._streams) >= self.settings.max_streams:
            raise MuxUsageError("too many streams")
        stream = self._last_id + 2 if self._last_id > 0 else 1
        if stream > MAX_STREAM_ID:
            raise MuxUsageError("stream ids exhausted")
        self._queue(Open(stream, port))
        self._last_id = stream
        self._streams[stream] = _Stream(stream, port, False, self.settings.window, self.settings.window)
        return stream

    def accept(self, stream: int) -> None:
        """Server: queue ACCEPT for an opened stream."""
        s = self._live(stream)
        if self.side != "server" or s.accepted:
            raise MuxUsageError("accept is for the server, once per stream")
        s.accepted = True
        self._queue(Accept(stream))

    def refuse(self, stream: int, reason: str) -> None:
        """Server: refuse an opened stream (RESET code REFUSED); only that stream ends."""
        s = self._live(stream)
        if self.side != "server" or s.accepted:
            raise MuxUsageError("refuse is for the server, before accept")
        self.reset(stream, reason, RESET_REFUSED)

    def send(self, stream: int, data: bytes | memoryview) -> int:
        """Queue DATA frames for as much of ``data`` as the peer's window
        allows; the number of bytes taken (the caller keeps the rest)."""
        s = self._live(stream)
        if s.local_closed:
            raise MuxUsageError(f"stream {stream} is half-closed")
        if self.side == "server" and not s.accepted:
            raise MuxUsageError(f"stream {stream} not accepted yet")
        take = min(len(data), s.send_window)
        step = self.settings.max_frame
        out = self._out
        # DATA is queued as header + payload, joined once by data_to_send: a
        # payload is copied once on its way out, not once per layer
        pack = HEADER.pack
        if not take:
            return 0
        if type(data) is not bytes and not (type(data) is memoryview and type(data.obj) is bytes):
            data = bytes(data)  # queued by reference below: never a mutable buffer
        if take == len(data) <= step:
            out.append(pack(T_DATA, stream, take))
            out.append(data)  # the common case: one frame, the caller's bytes as they are
        else:
            view = memoryview(data)
            for i in range(0, take, step):
                chunk = view[i : min(i + step, take)]
                out.append(pack(T_DATA, stream, len(chunk)))
                out.append(chunk)  # joined (copied) by data_to_send
        s.send_window -= take
        return take

    def half_close(self, stream: int) -> None:
        """Queue HALF_CLOSE: this end sends no more data on ``stream``."""
        s = self._live(stream)
        if s.local_closed:
            raise MuxUsageError(f"stream {stream} already half-closed")
        if self.side == "server" and not s.accepted:
            raise MuxUsageError(f"stream {stream} not accepted yet")
        s.local_closed = True
        self._queue(HalfClose(stream))
        if s.remote_closed:
            del self._streams[stream]

    def reset(self, stream: int, reason: str, code: int = RESET_CANCEL) -> None:
        """Queue RESET: ``stream`` is over both ways and forgotten. A no-op if
        it is already gone (a reset can cross the peer's)."""
        frame = Reset(stream, code, reason)  # ValueError for a bad reason, before any change
        if self.closed or stream not in self._streams:
            return
        s = self._streams.pop(stream)
        self._queue(frame)
        if not s.remote_closed:
            self._reset_by_us[stream] = s.recv_window
            while len(self._reset_by_us) > 2 * self.settings.max_streams:
                self._reset_by_us.popitem(last=False)

    def consumed(self, stream: int, n: int) -> None:
        """The application took ``n`` bytes of ``stream``: return the credit
        (WINDOW is sent once half the window is owed, to batch updates)."""
        s = self._streams.get(stream)
        if s is None or self.closed or s.remote_closed or n <= 0:
            return
        s.unacked += n
        if s.unacked >= max(1, self.settings.window // 2):
            self._queue(Window(stream, s.unacked))
            s.recv_window += s.unacked
            s.unacked = 0

    def ping(self, opaque: bytes) -> None:
        """Queue PING with 8 opaque bytes."""
        if not self.closed:
            self._queue(Ping(opaque))

    def go_away(self, reason: str) -> None:
        """End the connection: queue GOAWAY(reason); later input is ignored."""
        frame = GoAway(reason)  # ValueError for a bad reason, before any change
        if not self.closed:
            self.reason = reason
            self._queue(frame)
            self._streams.clear()

    # -- peer input ------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from the peer (``now``: the caller's clock, in seconds)."""
        if self.closed:
            return []
        self.bytes_in += len(data)
        events: list[Event] = []
        try:
            frames = self._decoder.feed(data)
            for frame in frames:
                self.frames_in += 1
                self._handle(frame, now, events)
                if self.closed:
                    break
        except FrameError as e:
            self._fail(e.reason, events)
        except _ProtocolError as e:
            self._fail(e.reason, events)
        return events

    def _fail(self, reason: str, events: list[Event]) -> None:
        self.go_away(reason)
        events.append(ConnectionEnded(reason, by_peer=False))

    def _spend(self, budget: str, reason: str, now: float) -> None:
        if self._budget_start is None or now - self._budget_start >= self.settings.flood_interval or now < self._budget_start:
            self._budget_start = now
            self._spent.clear()
        spent = self._spent.get(budget, 0) + 1
        self._spent[budget] = spent
        if spent > getattr(self.settings, budget):
            raise _ProtocolError(reason)

    def _known(self, stream: int) -> _Stream | None:
        """The live stream, or None for one that is closed; _ProtocolError for
        an id never opened."""
        s = self._streams.get(stream)
        if s is None and stream > self._last_id:
            raise _ProtocolError("unknown-stream")
        return s

    def _handle(self, frame: Frame, now: float, events: list[Event]) -> None:
        if isinstance(frame, Data):
            self._on_data(frame, now, events)
        elif isinstance(frame, Window):
            self._spend("max_window_updates", "window-flood", now)
            if frame.increment == 0:
                raise _ProtocolError("zero-window-increment")
            s = self._known(frame.stream)
            if s is None:
                return  # crossed our HALF_CLOSE/RESET: harmless
            if s.send_window + frame.increment > MAX_WINDOW:
                raise _ProtocolError("window-overflow")
            s.send_window += frame.increment
            if not s.local_closed:
                events.append(SendWindowOpened(frame.stream))
        elif isinstance(frame, Open):
            self._spend("max_opens", "open-flood", now)
            if self.side != "server":
                raise _ProtocolError("unexpected-open")
            if frame.stream % 2 == 0:
                raise _ProtocolError("even-stream-id")
            if frame.stream <= self._last_id:
                raise _ProtocolError("stream-id-reuse")
            if len(self._streams) >= self.settings.max_streams:
                raise _ProtocolError("too-many-streams")
            self._last_id = frame.stream
            self._streams[frame.stream] = _Stream(frame.stream, frame.port, False, self.settings.window, self.settings.window)
            events.append(StreamOpened(frame.stream, frame.port))
        elif isinstance(frame, Accept):
            if self.side != "client":
                raise _ProtocolError("unexpected-accept")
            s = self._known(frame.stream)
            if s is None:
                if frame.stream in self._reset_by_us:
                    return  # we cancelled before the accept arrived
                raise _ProtocolError("stream-closed")
            if s.accepted:
                raise _ProtocolError("unexpected-accept")
            s.accepted = True
            events.append(StreamAccepted(frame.stream))
        elif isinstance(frame, HalfClose):
            s = self._known(frame.stream)
            if s is None:
                if frame.stream in self._reset_by_us:
                    del self._reset_by_us[frame.stream]  # nothing more can follow
                    return
                raise _ProtocolError("stream-closed")
            self._check_can_receive(s)
            s.remote_closed = True
            if s.local_closed:
                del self._streams[frame.stream]
                events.append(StreamEnded(frame.stream))
            else:
                events.append(StreamHalfClosed(frame.stream))
        elif isinstance(frame, Reset):
            self._spend("max_resets", "reset-flood", now)
            s = self._known(frame.stream)
            if s is None:
                self._reset_by_us.pop(frame.stream, None)
                return  # crossed ours, or after our full close
            del self._streams[frame.stream]
            events.append(ResetReceived(frame.stream, frame.code, frame.reason))
        elif isinstance(frame, Ping):
            self._spend("max_pings", "ping-flood", now)
            self._queue(Pong(frame.opaque))
        elif isinstance(frame, Pong):
            self._spend("max_pings", "ping-flood", now)
            events.append(PongReceived(frame.opaque))
        elif isinstance(frame, GoAway):
            self.reason = "peer:" + frame.reason
            self._streams.clear()
            events.append(ConnectionEnded(self.reason, by_peer=True))

    def _check_can_receive(self, s: _Stream) -> None:
        if s.remote_closed:
            raise _ProtocolError("data-after-half-close")
        if self.side == "client" and not s.accepted:
            raise _ProtocolError("data-before-accept")

    def _on_data(self, frame: Data, now: float, events: list[Event]) -> None:
        n = len(frame.payload)
        if n == 0:
            self._spend("max_empty_data", "empty-data-flood", now)
        s = self._known(frame.stream)
        if s is None:
            left = self._reset_by_us.get(frame.stream)
            if left is None:
                raise _ProtocolError("stream-closed")
            if n > left:
                raise _ProtocolError("flow-control-violation")
            self._reset_by_us[frame.stream] = left - n
            return  # in flight when we reset it: dropped
        self._check_can_receive(s)
        if n > s.recv_window:
            raise _ProtocolError("flow-control-violation")
        s.recv_window -= n
        if n:
            events.append(DataReceived(frame.stream, frame.payload))
