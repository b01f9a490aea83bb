"""What an application sees of one mux stream: a plain Twisted transport.

``StreamTransport`` is the transport of the application protocol on a stream
(ITransport, IPushProducer for the application to pause its reading,
IConsumer for the application to register its producer, half-close through
``loseWriteConnection``/``readConnectionLost``). ``StreamEndpoint`` opens
streams on the client side; ``IncomingStream`` is the server's view of an
OPEN awaiting an answer.

Memory per stream is bounded by its window both ways: inbound, the peer can
only send what we credited, and credit is returned only as the application
takes the data (a paused stream stops crediting, so it stalls only itself);
outbound, the application's producer is paused while the stream holds a
window's worth of unsent bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IProducer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from ticrypt.flow import BufferedProducer
from ticrypt.mux.frames import RESET_CANCEL, RESET_REFUSED

if TYPE_CHECKING:
    from ticrypt.mux.protocol import MuxProtocol


class StreamRefused(ConnectError):
    """The server refused the stream (or reset it before accepting);
    ``reason`` is the server's stable reason name, e.g. "port-not-allowed"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"stream refused: {self.reason}"


class StreamReset(ConnectionLost):
    """The peer reset an established stream (``code`` from frames.RESET_CODES)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"stream reset by peer: {self.reason}"


@implementer(IAddress)
@attrs.frozen
class StreamAddress:
    """Address of one end of a stream: the stream id, the tunnelled port and
    the address of the underlying (TLS) connection at that end."""

    stream: int
    port: int
    connection: Any = None


@implementer(ITransport, IPushProducer, IConsumer)
class StreamTransport(BufferedProducer):
    """One stream as a transport. Created by :class:`MuxProtocol`; the
    application gets it through ``makeConnection``.

    The input it holds for the application is its :class:`BufferedProducer`
    buffer, which the application pauses and resumes."""

    def __init__(self, mux: MuxProtocol, stream_id: int, port: int) -> None:
        super().__init__()
        self._mux = mux
        self.stream_id = stream_id
        self.port = port
        self.protocol: IProtocol | None = None
        self.disconnecting = False
        self._outbuf: deque[bytes | memoryview] = deque()  # views of bytes, never of a mutable buffer
        self._outlen = 0
        self._write_closing = False  # HALF_CLOSE once the outbuf is empty
        self._write_closed = False
        self._discard_input = False  # after loseConnection
        self._remote_closed = False
        self._read_lost_delivered = False
        self._ended = False
        self._delivering = False
        # IPushProducer (streaming) or IPullProducer: both have resumeProducing.
        self._producer: Any = None
        self._streaming = False
        self._producer_paused = False

    def __repr__(self) -> str:
        return f"<StreamTransport {self.stream_id} port={self.port}>"

    # -- ITransport -------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._ended or self._write_closing or not data:
            return
        self._outbuf.append(bytes(data))
        self._outlen += len(data)
        self._mux._stream_ready(self)
        self._update_producer()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Send what is buffered, then HALF_CLOSE; input is discarded (but
        credited) until the peer's HALF_CLOSE ends the stream."""
        if self._ended or self.disconnecting:
            return
        self.disconnecting = True
        self._discard_input = True
        dropped = self._drop()
        if dropped:
            self._mux._consumed(self, dropped)
        self.loseWriteConnection()

    def loseWriteConnection(self) -> None:
        """Send what is buffered, then HALF_CLOSE (IHalfCloseableDescriptor)."""
        if self._ended or self._write_closing:
            return
        self._write_closing = True
        self._mux._stream_ready(self)

    def abortConnection(self) -> None:
        """RESET the stream now, dropping buffered data both ways."""
        if self._ended:
            return
        self._mux._reset_stream(self, RESET_CANCEL, "aborted")
        self._finish(Failure(ConnectionAborted()))

    def getPeer(self) -> StreamAddress:
        return StreamAddress(self.stream_id, self.port, self._mux._peer_address())

    def getHost(self) -> StreamAddress:
        return StreamAddress(self.stream_id, self.port, self._mux._host_address())

    # -- IPushProducer: the application pauses its reading --------------------
    # (pauseProducing and resumeProducing: BufferedProducer's)

    def stopProducing(self) -> None:
        self.abortConnection()

    # -- IConsumer: the application's producer feeds this stream ---------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"producer {self._producer!r} already registered")
        self._producer = producer
        self._streaming = streaming
        self._producer_paused = False
        if self._ended:
            producer.stopProducing()
            return
        if not streaming:
            self._producer.resumeProducing()
        self._update_producer()

    def unregisterProducer(self) -> None:
        self._producer = None

    # -- called by MuxProtocol ---------------------------------------------------

    @property
    def pending_output(self) -> int:
        """Bytes written by the application and not yet framed."""
        return self._outlen

    @property
    def pending_input(self) -> int:
        """Bytes received and not yet taken by the application."""
        return self.buffered

    def _wants_send(self, window: int) -> bool:
        return (self._outlen > 0 and window > 0) or (self._write_closing and not self._write_closed and self._outlen == 0)

    def _take(self, limit: int) -> bytes | memoryview:
        """Up to ``limit`` bytes off the front of the output buffer.

        A write larger than a frame is cut with memoryview slices of its
        (immutable) bytes: no copy here; the frame's bytes are copied once,
        when the mux joins its output."""
        parts: list[bytes | memoryview] = []
        got = 0
        while self._outbuf and got < limit:
            head = self._outbuf[0]
            room = limit - got
            if len(head) <= room:
                parts.append(self._outbuf.popleft())
                got += len(head)
            else:
                view = head if isinstance(head, memoryview) else memoryview(head)
                parts.append(view[:room])
                self._outbuf[0] = view[room:]
                got = limit
        self._outlen -= got
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _untake(self, data: bytes | memoryview) -> None:
        if data:
            self._outbuf.appendleft(data)
            self._outlen += len(data)

    def _after_send(self) -> None:
        """Output was framed: maybe resume the application's producer."""
        self._update_producer()
        if self._producer is not None and not self._streaming and self._outlen == 0 and not self._mux._output_paused:
            self._producer.resumeProducing()

    def _update_producer(self) -> None:
        if self._producer is None or not self._streaming or self._ended:
            return
        want_paused = self._mux._output_paused or self._outlen >= self._mux.settings.window
        if want_paused and not self._producer_paused:
            self._producer_paused = True
            self._producer.pauseProducing()
        elif not want_paused and self._producer_paused:
            self._producer_paused = False
            self._producer.resumeProducing()

    def _attach(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        if self._call_app(protocol.makeConnection, self):
            self._deliver()

    def _data(self, data: bytes) -> None:
        if self._discard_input:
            self._mux._consumed(self, len(data))
            return
        self._hold(data)
        self._deliver()

    def _peer_half_closed(self) -> None:
        self._remote_closed = True
        self._deliver()

    def _deliver(self) -> None:
        """Hand buffered input to the application while it reads; credit it."""
        if self.protocol is None or self._delivering:
            return
        self._delivering = True
        try:
            self._drain(self._to_app)  # an ended stream holds nothing (_finish)
            if self._remote_closed and not self._chunks and not self._read_lost_delivered and not self._ended:
                self._read_lost_delivered = True
                half = IHalfCloseableProtocol(self.protocol, None)
                if self._discard_input:
                    pass  # the application closed: it expects only connectionLost
                elif half is not None:
                    self._call_app(half.readConnectionLost)
                elif not self._write_closing:
                    self.loseConnection()  # like TCP without half-close: EOF ends it
        finally:
            self._delivering = False
        self._maybe_done()

    def _to_app(self, chunk: bytes) -> None:
        """One chunk to the application, credited once it took it."""
        assert self.protocol is not None
        if self._call_app(self.protocol.dataReceived, chunk):
            self._mux._consumed(self, len(chunk))

    def _maybe_done(self) -> None:
        """Both directions closed and all input delivered: connectionLost(ConnectionDone)."""
        if self._write_closed and self._read_lost_delivered and not self._ended:
            self._finish(Failure(ConnectionDone()))

    def _call_app(self, method: Callable[..., object], *args: object) -> bool:
        """Call into the application; an exception aborts this stream only
        (never the mux connection under the other streams)."""
        try:
            method(*args)
        except Exception:
            self._mux.log.failure("tunnel stream {stream} (port {port}): application error", stream=self.stream_id, port=self.port)
            self.abortConnection()
            return False
        return True

    def _finish(self, reason: Failure) -> None:
        """The stream is over: tell the application once."""
        if self._ended:
            return
        self._ended = True
        self._outbuf.clear()
        self._outlen = 0
        self._drop()
        self._mux._forget(self)
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        if self.protocol is not None:
            try:
                self.protocol.connectionLost(reason)
            except Exception:
                self._mux.log.failure("tunnel stream {stream}: connectionLost failed", stream=self.stream_id)


def _done() -> Failure:
    return Failure(ConnectionDone())


class IncomingStream:
    """Server: a stream the client opened, awaiting :meth:`accept` or :meth:`refuse`.

    Data the client sends before the answer is held (at most one window) and
    delivered after ``accept``. ``cancelled`` becomes true if the client
    resets the stream or the mux closes first; ``accept`` then connects the
    protocol and at once delivers ``connectionLost``, and ``refuse`` does nothing.
    """

    def __init__(self, mux: MuxProtocol, transport: StreamTransport) -> None:
        self._mux = mux
        self.transport = transport
        self.stream_id = transport.stream_id
        self.port = transport.port
        self.answered = False
        self.cancelled = False
        self._cancel_reason: Failure | None = None

    def __repr__(self) -> str:
        return f"<IncomingStream {self.stream_id} port={self.port}>"

    def _cancel(self, reason: Failure) -> None:
        self.cancelled = True
        self._cancel_reason = reason

    def accept(self, protocol: IProtocol) -> StreamTransport:
        """Accept: ``protocol.makeConnection(stream)``, then held data."""
        if self.answered:
            raise RuntimeError("stream already answered")
        self.answered = True
        if self.cancelled:
            self.transport.protocol = protocol
            protocol.makeConnection(self.transport)
            protocol.connectionLost(self._cancel_reason or Failure(ConnectionLost("stream cancelled")))
            return self.transport
        self._mux._accept_stream(self.transport)
        self.transport._attach(protocol)
        return self.transport

    def refuse(self, reason: str) -> None:
        """Refuse: RESET(REFUSED, reason); the client's connect() fails with
        StreamRefused(reason). ``reason``: 1-64 printable ASCII characters."""
        if self.answered:
            raise RuntimeError("stream already answered")
        if not self.cancelled:
            self._mux._reset_stream(self.transport, RESET_REFUSED, reason)  # ValueError: bad reason
        self.answered = True
        self.transport._ended = True
        self._mux._forget(self.transport)


@implementer(IStreamClientEndpoint)
class StreamEndpoint:
    """Client endpoint opening a stream to ``port`` over ``mux``.

    ``connect(factory)`` fires with the protocol once the server accepted
    (the protocol is built and connected then); it fails with
    :class:`StreamRefused` when the server refuses, and with
    :class:`ticrypt.mux.protocol.MuxClosed` if the mux is or becomes closed.
    Cancelling the Deferred before the answer resets the stream.
    """

    def __init__(self, mux: MuxProtocol, port: int) -> None:
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        self._mux = mux
        self._port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._mux._connect_stream(self._port, protocolFactory)
