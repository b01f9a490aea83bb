"""Tests for ticrypt.mux.protocol and ticrypt.mux.stream: producer wiring
(StringTransport), keepalive (task.Clock), data both ways (iosim)."""

from __future__ import annotations

import datetime
from collections.abc import Generator
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import crypto
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPullProducer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from ticrypt.mux import (
    IncomingStream,
    MuxClosed,
    MuxProtocol,
    MuxSettings,
    StreamEndpoint,
    StreamRefused,
    StreamReset,
    StreamTransport,
)
from ticrypt.mux.frames import (
    RESET_CANCEL,
    Accept,
    Data,
    Frame,
    FrameDecoder,
    GoAway,
    HalfClose,
    Open,
    Ping,
    Pong,
    Reset,
    Window,
    encode,
)

SMALL = MuxSettings(window=1000, max_frame=100)


def raw(*frames: Frame) -> bytes:
    return b"".join(encode(f) for f in frames)


@implementer(IPushProducer)
class FakeProducer:
    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.paused = False
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """Records what it gets; optionally pauses its stream at once."""

    def __init__(self, pause: bool = False) -> None:
        self.pause = pause
        self.data = b""
        self.read_lost = False
        self.lost: Failure | None = None
        self.made = False

    @property
    def st(self) -> StreamTransport:
        assert isinstance(self.transport, StreamTransport)
        return self.transport

    def connectionMade(self) -> None:
        self.made = True
        if self.pause:
            assert self.transport is not None
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.read_lost = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost = reason


class Server:
    """A server-side mux on a StringTransport, fed frames by hand."""

    def __init__(self, answer: str | None = "accept", settings: MuxSettings = SMALL) -> None:
        self.clock = task.Clock()
        self.incoming: list[IncomingStream] = []
        self.protocols: dict[int, Recorder] = {}
        self.answer = answer
        self.mux = MuxProtocol("server", self.clock, settings, on_stream=self.on_stream)
        self.transport = StringTransport()
        self.mux.makeConnection(self.transport)

    def on_stream(self, incoming: IncomingStream) -> None:
        self.incoming.append(incoming)
        if self.answer == "accept":
            self.protocols[incoming.stream_id] = p = Recorder()
            incoming.accept(p)
        elif self.answer is not None:
            incoming.refuse(self.answer)

    @property
    def producer(self) -> IPushProducer:
        producer = self.transport.producer
        assert IPushProducer.providedBy(producer)
        return producer  # type: ignore[no-any-return]

    def feed(self, *frames: Frame) -> None:
        self.mux.dataReceived(raw(*frames))

    def written(self) -> list[Frame]:
        out = self.transport.value()
        self.transport.clear()
        return FrameDecoder().feed(out)


class ProducerWiringTests(SynchronousTestCase):
    def test_one_producer_registered(self) -> None:
        s = Server()
        self.assertTrue(s.transport.streaming)
        self.assertTrue(IPushProducer.providedBy(s.transport.producer))

    def test_transport_pause_pauses_every_stream(self) -> None:
        s = Server()
        s.feed(Open(1, 80), Open(3, 80), Open(5, 80))
        producers = {}
        for sid, proto in s.protocols.items():
            producers[sid] = FakeProducer()
            assert proto.st is not None
            proto.st.registerProducer(producers[sid], True)
        s.producer.pauseProducing()
        self.assertEqual([p.paused for p in producers.values()], [True] * 3)
        s.transport.clear()
        s.protocols[1].st.write(b"held")
        self.assertEqual(s.transport.value(), b"")  # nothing while paused
        s.producer.resumeProducing()
        self.assertEqual([p.paused for p in producers.values()], [False] * 3)
        self.assertEqual(s.written(), [Data(1, b"held")])

    def test_control_frames_written_while_paused(self) -> None:
        """PONG and WINDOW are not held back by the output pause (they are flood-bounded)."""
        s = Server()
        s.producer.pauseProducing()
        s.feed(Ping(b"abcdefgh"))
        self.assertEqual(s.written(), [Pong(b"abcdefgh")])

    def test_round_robin(self) -> None:
        """Three streams with a lot to send take turns, one frame each."""
        s = Server()
        s.feed(Open(1, 80), Open(3, 80), Open(5, 80))
        s.written()
        s.producer.pauseProducing()
        for sid in (1, 3, 5):
            s.protocols[sid].st.write(bytes([sid]) * 300)
        s.producer.resumeProducing()
        order = [f.stream for f in s.written() if isinstance(f, Data)]
        self.assertEqual(order, [1, 3, 5] * 3)

    def test_one_write_per_pump_turns(self) -> None:
        """The frames a pump makes go out together, FLUSH_PIECES pieces (a
        DATA frame is two) per transport write: 10 frames of 100 bytes are 3
        writes (4 + 4 + 2 frames), intact and in order."""
        s = Server()
        s.feed(Open(1, 80))
        s.written()
        writes: list[bytes] = []
        real_write = s.transport.write

        def write(data: bytes) -> None:
            writes.append(data)
            real_write(data)

        s.transport.write = write  # type: ignore[method-assign]
        payload = bytes(range(250)) * 4
        s.protocols[1].st.write(payload)
        self.assertEqual(len(writes), 3)
        frames = s.written()
        self.assertEqual([len(f.payload) for f in frames if isinstance(f, Data)], [100] * 10)
        self.assertEqual(b"".join(f.payload for f in frames if isinstance(f, Data)), payload)

    def test_big_write_cut_without_copies(self) -> None:
        """A write larger than a frame is cut into frames with views of its
        bytes, not slices of it; what goes out is exactly what was written."""
        s = Server(settings=MuxSettings(window=10_000, max_frame=1000))
        s.feed(Open(1, 80))
        s.written()
        st = s.protocols[1].st
        s.producer.pauseProducing()
        payload = bytes(range(256)) * 10
        st.write(payload)
        first = st._take(1000)
        self.assertIsInstance(first, memoryview)
        self.assertIs(first.obj, payload)  # type: ignore[union-attr]
        st._untake(first)
        s.producer.resumeProducing()
        frames = [f for f in s.written() if isinstance(f, Data)]
        self.assertEqual([len(f.payload) for f in frames], [1000, 1000, 560])
        self.assertEqual(b"".join(f.payload for f in frames), payload)

    def test_app_producer_paused_at_window(self) -> None:
        """Unsent bytes are bounded by the window: the app's producer is paused, resumed on credit."""
        s = Server()
        s.feed(Open(1, 80))
        proto = s.protocols[1]
        producer = FakeProducer()
        assert proto.st is not None
        proto.st.registerProducer(producer, True)
        proto.st.write(b"x" * 1000)  # the whole peer window goes out
        self.assertFalse(producer.paused)
        proto.st.write(b"y" * 1000)  # stuck: no window left
        self.assertTrue(producer.paused)
        st = proto.st
        assert isinstance(st, StreamTransport)
        self.assertEqual(st.pending_output, 1000)
        s.written()
        s.feed(Window(1, 600))
        self.assertFalse(producer.paused)
        self.assertEqual(st.pending_output, 400)
        self.assertEqual(sum(len(f.payload) for f in s.written() if isinstance(f, Data)), 600)

    def test_pull_producer(self) -> None:
        s = Server()
        s.feed(Open(1, 80))
        st = s.protocols[1].st
        assert st is not None

        @implementer(IPullProducer)
        class Pull:
            n = 0

            def resumeProducing(self) -> None:
                self.n += 1
                if self.n <= 3:
                    st.write(b"p" * 10)

            def stopProducing(self) -> None:
                pass

        pull = Pull()
        st.registerProducer(pull, False)  # type: ignore[arg-type]
        self.assertEqual(b"".join(f.payload for f in s.written() if isinstance(f, Data)), b"p" * 30)

    def test_slow_reader_stalls_only_itself(self) -> None:
        """A paused reader stops returning credit: it holds one window, the others flow."""
        s = Server()
        s.feed(Open(1, 80), Open(3, 80))
        s.protocols[1].st.pauseProducing()
        s.written()
        s.feed(*[Data(1, b"a" * 100)] * 10, *[Data(3, b"b" * 100)] * 10)
        credits = [f for f in s.written() if isinstance(f, Window)]
        self.assertEqual(credits, [Window(3, 500), Window(3, 500)])
        self.assertEqual(s.protocols[1].data, b"")
        self.assertEqual(len(s.protocols[3].data), 1000)
        st1 = s.protocols[1].st
        assert isinstance(st1, StreamTransport)
        self.assertEqual(st1.pending_input, 1000)
        s.feed(Data(1, b"!"))  # beyond its window: a protocol error, not more memory
        self.assertEqual(s.written()[-1], GoAway("flow-control-violation"))
        self.assertEqual(st1.pending_input, 0)
        self.flushLoggedErrors()


class IncomingTests(SynchronousTestCase):
    def test_optimistic_data_held_until_accept(self) -> None:
        s = Server(answer=None)
        s.feed(Open(1, 80), Data(1, b"early "), Data(1, b"bird"), HalfClose(1))
        self.assertEqual(s.written(), [])  # no credit, no answer yet
        proto = Recorder()
        s.incoming[0].accept(proto)
        self.assertEqual(proto.data, b"early bird")
        self.assertTrue(proto.read_lost)
        self.assertEqual(s.written(), [Accept(1)])  # no credit: the client has half-closed
        proto.st.write(b"reply")
        proto.st.loseConnection()
        self.assertEqual(s.written(), [Data(1, b"reply"), HalfClose(1)])
        self.assertTrue(proto.lost is not None and proto.lost.check(ConnectionDone))

    def test_accept_answers_with_accept_frame(self) -> None:
        s = Server(answer=None)
        s.feed(Open(1, 80))
        self.assertEqual(s.incoming[0].port, 80)
        s.incoming[0].accept(Recorder())
        self.assertEqual([type(f).__name__ for f in s.written()], ["Accept"])

    def test_refuse_resets_only_that_stream(self) -> None:
        s = Server(answer=None)
        s.feed(Open(1, 80), Open(3, 22))
        good = Recorder()
        s.incoming[0].accept(good)
        s.incoming[1].refuse("port-not-allowed")
        frames = s.written()
        self.assertEqual(frames[-1], Reset(3, 1, "port-not-allowed"))
        s.feed(Data(1, b"still fine"), Data(3, b"in flight"))
        self.assertEqual(good.data, b"still fine")
        self.assertEqual(s.mux.stats()["streams"], 1)

    def test_refuse_with_bad_reason_changes_nothing(self) -> None:
        s = Server(answer=None)
        s.feed(Open(1, 80))
        self.assertRaises(ValueError, s.incoming[0].refuse, "no spaces allowed")
        s.incoming[0].refuse("connect-failed")
        self.assertEqual(s.written(), [Reset(1, 1, "connect-failed")])
        self.assertRaises(RuntimeError, s.incoming[0].accept, Recorder())

    def test_cancelled_before_answer(self) -> None:
        """The client resets before vmc answered: a later accept connects and at once loses."""
        s = Server(answer=None)
        s.feed(Open(1, 80), Reset(1, RESET_CANCEL, "cancelled"))
        self.assertTrue(s.incoming[0].cancelled)
        proto = Recorder()
        s.incoming[0].accept(proto)
        self.assertTrue(proto.made)
        assert proto.lost is not None
        self.assertTrue(proto.lost.check(StreamReset))
        self.assertEqual(s.written(), [])

    def test_on_stream_error_refuses(self) -> None:
        def boom(incoming: IncomingStream) -> None:
            raise RuntimeError("bug")

        mux = MuxProtocol("server", task.Clock(), SMALL, on_stream=boom)
        t = StringTransport()
        mux.makeConnection(t)
        mux.dataReceived(raw(Open(1, 80)))
        self.assertEqual(FrameDecoder().feed(t.value()), [Reset(1, 1, "internal-error")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_app_error_resets_only_its_stream(self) -> None:
        class Broken(Recorder):
            def dataReceived(self, data: bytes) -> None:
                raise ValueError("app bug")

        s = Server(answer=None)
        s.feed(Open(1, 80), Open(3, 80))
        broken, fine = Broken(), Recorder()
        s.incoming[0].accept(broken)
        s.incoming[1].accept(fine)
        s.written()
        s.feed(Data(1, b"x"), Data(3, b"y"))
        self.assertEqual(s.written(), [Reset(1, 0, "aborted")])
        self.assertEqual(fine.data, b"y")
        assert broken.lost is not None
        self.assertTrue(broken.lost.check(ConnectionAborted))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class LifecycleTests(SynchronousTestCase):
    def test_keepalive_ping_and_timeout(self) -> None:
        s = Server()
        closed: list[str] = []
        s.mux.when_closed().addCallback(closed.append)
        s.clock.advance(30)
        self.assertEqual(s.written(), [Ping((1).to_bytes(8, "big"))])
        s.clock.advance(30)
        s.feed(Pong((1).to_bytes(8, "big")))  # a frame: the deadline moves to t=150
        s.clock.advance(89)
        self.assertFalse(s.transport.disconnecting)
        s.clock.advance(1)
        self.assertTrue(s.transport.disconnected)  # aborted, not a graceful close
        self.assertEqual(s.written()[-1], GoAway("keepalive-timeout"))
        s.mux.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual(closed, ["keepalive-timeout"])
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_ping_now(self) -> None:
        s = Server()
        s.mux.ping()
        self.assertEqual(s.written(), [Ping((1).to_bytes(8, "big"))])
        self.assertEqual(s.mux.frames_received, 0)
        s.feed(Pong((1).to_bytes(8, "big")))
        self.assertEqual(s.mux.frames_received, 1)

    def test_settings_checked(self) -> None:
        self.assertRaises(ValueError, MuxSettings, keepalive_interval=30.0, keepalive_timeout=30.0)
        self.assertRaises(ValueError, MuxSettings, window=2**31)
        self.assertRaises(ValueError, MuxSettings, max_frame=65537)
        self.assertRaises(ValueError, MuxProtocol, "server", task.Clock())  # no on_stream

    def test_partial_frame_does_not_keep_alive(self) -> None:
        s = Server()
        s.clock.advance(89)
        s.mux.dataReceived(encode(Data(1, b"x"))[:3])
        s.clock.advance(1)
        self.assertTrue(s.transport.disconnected)

    def test_protocol_error_goaway_and_streams_lost(self) -> None:
        s = Server()
        s.feed(Open(1, 80))
        proto = s.protocols[1]
        s.written()
        s.feed(Window(1, 0))
        self.assertEqual(s.written(), [GoAway("zero-window-increment")])
        self.assertTrue(s.transport.disconnecting)
        assert proto.lost is not None
        self.assertTrue(proto.lost.check(MuxClosed))
        self.assertEqual(proto.lost.value.reason, "zero-window-increment")  # type: ignore[union-attr]
        # a peer that never reads: aborted after the grace period
        s.clock.advance(10)
        self.assertTrue(s.transport.disconnected)
        s.mux.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(s.mux.when_closed()), "zero-window-increment")

    def test_close_normal(self) -> None:
        s = Server()
        s.mux.close()
        self.assertEqual(s.written(), [GoAway("normal")])
        s.mux.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(s.mux.when_closed()), "normal")

    def test_connection_lost_without_goaway(self) -> None:
        s = Server()
        d = s.mux.when_closed()
        s.mux.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.successResultOf(d), "connection-lost")

    def test_connect_on_closed_mux(self) -> None:
        mux = MuxProtocol("client", task.Clock(), SMALL)
        self.failureResultOf(StreamEndpoint(mux, 80).connect(Factory.forProtocol(Recorder)), MuxClosed)

    def test_pending_connect_fails_when_mux_lost(self) -> None:
        mux = MuxProtocol("client", task.Clock(), SMALL)
        mux.makeConnection(StringTransport())
        d = StreamEndpoint(mux, 80).connect(Factory.forProtocol(Recorder))
        mux.connectionLost(Failure(ConnectionDone()))
        f = self.failureResultOf(d, MuxClosed)
        self.assertEqual(f.value.reason, "connection-lost")

    def test_cancel_pending_connect_resets(self) -> None:
        mux = MuxProtocol("client", task.Clock(), SMALL)
        t = StringTransport()
        mux.makeConnection(t)
        d = StreamEndpoint(mux, 80).connect(Factory.forProtocol(Recorder))
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(FrameDecoder().feed(t.value()), [Open(1, 80), Reset(1, 0, "cancelled")])
        mux.dataReceived(raw(Accept(1)))  # crossed: ignored
        self.assertEqual(mux.stats()["streams"], 0)
        self.assertIsNone(mux.stats()["closed"])


class PairTests(SynchronousTestCase):
    """A client and a server mux joined by iosim."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.accepted: list[Recorder] = []
        self.pause_port = 0

        def on_stream(incoming: IncomingStream) -> None:
            if incoming.port == 22:
                incoming.refuse("port-not-allowed")
                return
            proto = Recorder(pause=incoming.port == self.pause_port)
            self.accepted.append(proto)
            incoming.accept(proto)

        self.server = MuxProtocol("server", self.clock, SMALL, on_stream=on_stream)
        self.client = MuxProtocol("client", self.clock, SMALL)
        self.pump: IOPump = connect(
            self.server, FakeTransport(self.server, isServer=True), self.client, FakeTransport(self.client, isServer=False), clock=self.clock
        )

    def open(self, port: int) -> Any:
        d = StreamEndpoint(self.client, port).connect(Factory.forProtocol(Recorder))
        self.pump.flush()
        return d

    def test_refused(self) -> None:
        f = self.failureResultOf(self.open(22), StreamRefused)
        self.assertEqual(f.value.reason, "port-not-allowed")
        self.assertEqual(str(f.value), "stream refused: port-not-allowed")
        ok = self.successResultOf(self.open(80))
        self.assertTrue(ok.made)

    def test_data_both_ways_with_half_close(self) -> None:
        client_proto = self.successResultOf(self.open(80))
        server_proto = self.accepted[0]
        payload = bytes(range(256)) * 40  # 10 KiB through a 1000-byte window
        client_proto.st.write(payload)
        client_proto.st.loseWriteConnection()
        self.pump.flush()
        self.assertEqual(server_proto.data, payload)
        self.assertTrue(server_proto.read_lost)
        self.assertIsNone(server_proto.lost)
        server_proto.st.write(payload[::-1])  # the other half still flows
        server_proto.st.loseWriteConnection()
        self.pump.flush()
        self.assertEqual(client_proto.data, payload[::-1])
        self.assertTrue(client_proto.read_lost)
        for proto in (client_proto, server_proto):
            assert proto.lost is not None
            self.assertTrue(proto.lost.check(ConnectionDone))
        self.assertEqual(self.client.stats()["streams"], 0)
        self.assertEqual(self.server.stats()["streams"], 0)

    def test_fifty_streams_one_paused_reader(self) -> None:
        """50 streams each sending 3 windows; one server reader is paused:
        the other 49 finish, the paused one holds exactly one window."""
        self.pause_port = 1007
        ports = list(range(1000, 1050))
        clients = [self.successResultOf(self.open(p)) for p in ports]
        blob = b"z" * 3000
        for proto in clients:
            proto.st.write(blob)
            proto.st.loseWriteConnection()
        self.pump.flush()
        by_port = {p.st.port: p for p in self.accepted}
        for port in ports:
            if port == 1007:
                self.assertEqual(by_port[port].data, b"")
                self.assertEqual(by_port[port].st.pending_input, 1000)
            else:
                self.assertEqual(by_port[port].data, blob, port)
                self.assertTrue(by_port[port].read_lost)
        stuck = clients[ports.index(1007)].transport
        self.assertEqual(stuck.pending_output, 2000)
        by_port[1007].st.resumeProducing()
        self.pump.flush()
        self.assertEqual(by_port[1007].data, blob)
        self.assertTrue(by_port[1007].read_lost)

    def test_paused_reader_keeps_input_after_both_half_closes(self) -> None:
        """Both HALF_CLOSEs done while the client's reader is paused: its input
        is still delivered, then readConnectionLost, then connectionLost."""
        client_proto = self.successResultOf(self.open(80))
        client_proto.st.pauseProducing()
        client_proto.st.loseWriteConnection()
        self.pump.flush()
        self.accepted[0].st.write(b"late answer")
        self.accepted[0].st.loseWriteConnection()
        self.pump.flush()
        self.assertEqual((client_proto.data, client_proto.lost), (b"", None))
        self.assertEqual(self.client.stats()["streams"], 1)
        client_proto.st.resumeProducing()
        self.assertEqual(client_proto.data, b"late answer")
        self.assertTrue(client_proto.read_lost)
        assert client_proto.lost is not None
        self.assertTrue(client_proto.lost.check(ConnectionDone))
        self.assertEqual(self.client.stats()["streams"], 0)

    def test_abort_resets_peer(self) -> None:
        client_proto = self.successResultOf(self.open(80))
        client_proto.st.abortConnection()
        self.pump.flush()
        lost = self.accepted[0].lost
        assert lost is not None
        self.assertTrue(lost.check(StreamReset))
        self.assertEqual(lost.value.reason, "aborted")

    def test_non_half_closeable_app_closes_on_peer_half_close(self) -> None:
        """An app without IHalfCloseableProtocol sees the peer's HALF_CLOSE as the end (like TCP)."""

        class Plain(Protocol):
            lost: Failure | None = None

            def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
                self.lost = reason

        d = StreamEndpoint(self.client, 80).connect(Factory.forProtocol(Plain))
        self.pump.flush()
        plain = self.successResultOf(d)
        assert isinstance(plain, Plain)
        self.accepted[0].st.loseConnection()
        self.pump.flush()
        assert plain.lost is not None
        self.assertTrue(plain.lost.check(ConnectionDone))

    def test_mux_close_reaches_both_ends(self) -> None:
        client_proto = self.successResultOf(self.open(80))
        self.client.close("normal")
        self.pump.flush()
        self.assertEqual(self.successResultOf(self.server.when_closed()), "peer:normal")
        self.assertEqual(self.successResultOf(self.client.when_closed()), "normal")
        assert client_proto.lost is not None
        self.assertTrue(client_proto.lost.check(MuxClosed))

    def test_keepalive_between_live_ends(self) -> None:
        """Pings are answered: nothing times out over hours of idle."""
        for _ in range(400):
            self.clock.advance(30)
            self.pump.flush(advanceClock=False)
        self.assertNoResult(self.client.when_closed())
        self.assertNoResult(self.server.when_closed())


class RealSocketTests(TestCase):
    """Over a real TCP connection on 127.0.0.1: the memory bound of a stalled
    stream (what iosim cannot show), with another stream still flowing."""

    WINDOW = 256 * 1024
    CHUNK = 16 * 1024

    def test_stalled_stream_bounded_other_flows(self) -> Deferred[None]:
        settings = MuxSettings(window=self.WINDOW)
        stalled_ready: Deferred[None] = Deferred()
        server_protos: dict[int, Notify] = {}
        servers: list[MuxProtocol] = []
        source = Source(self.CHUNK)

        def on_stream(incoming: IncomingStream) -> None:
            proto = Notify(pause=incoming.port == 1)
            server_protos[incoming.port] = proto
            incoming.accept(proto)

        def check() -> None:
            held = server_protos[1].st.pending_input if 1 in server_protos else 0
            if held == self.WINDOW and source.paused and not stalled_ready.called:
                stalled_ready.callback(None)

        class Watched(MuxProtocol):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                check()

        def build() -> MuxProtocol:
            mux = Watched("server", reactor, settings, on_stream=on_stream)  # type: ignore[arg-type]
            servers.append(mux)
            return mux

        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(port.stopListening)
        client = MuxProtocol("client", reactor, settings)  # type: ignore[arg-type]
        source.on_pause = check

        @inlineCallbacks
        def run() -> Generator[Deferred[Any], Any, None]:
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)  # type: ignore[attr-defined]
            stalled = yield StreamEndpoint(client, 1).connect(Factory.forProtocol(Recorder))
            source.consumer = stalled.st
            stalled.st.registerProducer(source, True)
            source.resumeProducing()
            other = yield StreamEndpoint(client, 2).connect(Factory.forProtocol(Recorder))
            other.st.write(b"o" * 1_000_000)
            other.st.loseWriteConnection()
            yield server_protos[2].finished
            self.assertEqual(len(server_protos[2].data), 1_000_000)
            yield stalled_ready
            # The stalled stream holds one window at the server and at most a
            # window plus one chunk at the client: the source was paused.
            pending = stalled.st.pending_output
            self.assertLessEqual(pending, self.WINDOW + self.CHUNK)
            self.assertEqual(source.produced, self.WINDOW + pending)
            source.limit = source.produced
            stalled.st.unregisterProducer()
            stalled.st.loseWriteConnection()
            server_protos[1].st.resumeProducing()
            yield server_protos[1].finished
            self.assertEqual(len(server_protos[1].data), source.produced)
            closed = client.when_closed()
            server_closed = servers[0].when_closed()
            client.close("normal")
            self.assertEqual((yield closed), "normal")
            self.assertEqual((yield server_closed), "peer:normal")

        return run()


class Notify(Recorder):
    def __init__(self, pause: bool = False) -> None:
        super().__init__(pause)
        self.finished: Deferred[None] = Deferred()

    def readConnectionLost(self) -> None:
        super().readConnectionLost()
        self.finished.callback(None)


@implementer(IPushProducer)
class Source:
    """A fast local sender: writes chunks until paused (or its limit)."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.produced = 0
        self.paused = True
        self.limit = 64 * 1024 * 1024
        self.consumer: StreamTransport | None = None
        self.on_pause: Any = None

    def pauseProducing(self) -> None:
        self.paused = True
        if self.on_pause is not None:
            self.on_pause()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.produced < self.limit and self.consumer is not None:
            self.produced += self.chunk
            self.consumer.write(b"s" * self.chunk)

    def stopProducing(self) -> None:
        self.paused = True


def _self_signed() -> CertificateOptions:
    """Server TLS options with a throwaway self-signed P-256 certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mux-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return CertificateOptions(privateKey=crypto.PKey.from_cryptography_key(key),
                              certificate=crypto.X509.from_cryptography(cert))


class TLSTests(SynchronousTestCase):
    """The mux on TLSMemoryBIOProtocol (what vmc and connect run it on), in memory."""

    def test_streams_over_tls(self) -> None:
        clock = task.Clock()
        accepted: list[Recorder] = []

        def on_stream(incoming: IncomingStream) -> None:
            accepted.append(Recorder())
            incoming.accept(accepted[-1])

        server_mux = MuxProtocol("server", clock, SMALL, on_stream=on_stream)
        client_mux = MuxProtocol("client", clock, SMALL)
        server = TLSMemoryBIOFactory(_self_signed(), False, Factory.forProtocol(lambda: server_mux), clock)
        client = TLSMemoryBIOFactory(CertificateOptions(verify=False), True, Factory.forProtocol(lambda: client_mux), clock)
        _, _, pump = connectedServerAndClient(
            lambda: server.buildProtocol(None), lambda: client.buildProtocol(None), clock=clock)
        d = StreamEndpoint(client_mux, 80).connect(Factory.forProtocol(Recorder))
        for _ in range(5):
            pump.flush()
        proto = self.successResultOf(d)
        assert isinstance(proto, Recorder)
        proto.st.write(b"x" * 5000)
        proto.st.loseWriteConnection()
        pump.flush()
        self.assertEqual(accepted[0].data, b"x" * 5000)
        self.assertTrue(accepted[0].read_lost)
        accepted[0].st.write(b"back")
        accepted[0].st.loseConnection()
        pump.flush()
        self.assertEqual(proto.data, b"back")
        assert proto.lost is not None
        self.assertTrue(proto.lost.check(ConnectionDone))
        # The outbound producer went through TLS to the memory transport.
        self.assertIsNotNone(client_mux.transport.producer)  # type: ignore[union-attr]
        client_mux.close()
        for _ in range(5):
            pump.flush()
        self.assertEqual(self.successResultOf(server_mux.when_closed()), "peer:normal")
        self.assertEqual(self.successResultOf(client_mux.when_closed()), "normal")


_ids = st.integers(1, 9)
_frames = st.one_of(
    st.builds(Open, _ids, st.integers(1, 65535)),
    st.builds(Accept, _ids),
    st.builds(Data, _ids, st.binary(max_size=12)),
    st.builds(Window, _ids, st.sampled_from([0, 1, 600, 2**31 - 1])),
    st.builds(HalfClose, _ids),
    st.builds(Reset, _ids, st.sampled_from([0, 1, 2]), st.sampled_from(["", "port-not-allowed"])),
    st.builds(Ping, st.just(b"12345678")),
    st.builds(Pong, st.just(b"12345678")),
    st.builds(GoAway, st.just("normal")),
)


class ProtocolPropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(["client", "server"]), st.lists(_frames, max_size=25))
    def test_hostile_peer(self, side: str, frames: list[Frame]) -> None:
        """No frame sequence makes an exception escape to the transport or logs an error."""
        clock = task.Clock()
        n = [0]

        def on_stream(incoming: IncomingStream) -> None:
            n[0] += 1
            if n[0] % 3 == 0:
                incoming.refuse("port-not-allowed")
            elif n[0] % 3 == 1:
                proto = Recorder(pause=n[0] % 2 == 0)
                incoming.accept(proto)
                proto.st.write(b"hello")

        mux = MuxProtocol(side, clock, SMALL, on_stream=on_stream)  # type: ignore[arg-type]
        transport = StringTransport()
        mux.makeConnection(transport)
        if side == "client":
            for port in (1, 2, 3):
                StreamEndpoint(mux, port).connect(Factory.forProtocol(Recorder)).addErrback(lambda f: None)
        for frame in frames:
            mux.dataReceived(encode(frame))
            clock.advance(1)
        mux.connectionLost(Failure(ConnectionDone()))
        self.assertIsInstance(self.successResultOf(mux.when_closed()), str)
        self.assertEqual(self.flushLoggedErrors(), [])
