"""ticrypt.forward: the shared TCP forwarder."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from ticrypt.forward import (
    READ_SIZE,
    ForwardFactory,
    Pipe,
    allow_hosts,
    connect_protocol,
    host_of,
    normalize_host,
    splice,
)

PEER = IPv4Address("TCP", "192.0.2.7", 40000)


class HalfCloseTransport(StringTransport):
    """A StringTransport that can shut its write side like TCP."""

    write_shut = False

    def loseWriteConnection(self) -> None:
        self.write_shut = True


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str, **fields: Any) -> None:
        self.seen.append((name, fields))

    def names(self) -> list[str]:
        return [name for name, _ in self.seen]

    def last(self, name: str) -> dict[str, Any]:
        return [f for n, f in self.seen if n == name][-1]


class NormalizeTests(SynchronousTestCase):
    def test_mapped_ipv4(self) -> None:
        self.assertEqual(normalize_host("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(normalize_host("::FFFF:c000:0201"), "192.0.2.1")

    def test_ipv6_forms(self) -> None:
        self.assertEqual(normalize_host("[2001:DB8:0::1]"), "2001:db8::1")
        self.assertEqual(normalize_host("fe80::1%eth0"), "fe80::1")

    def test_not_an_address(self) -> None:
        self.assertEqual(normalize_host(" Example.ORG "), "example.org")

    def test_host_of_and_allow_hosts(self) -> None:
        mapped = IPv6Address("TCP", "::ffff:192.0.2.7", 1)
        self.assertEqual(host_of(mapped), "192.0.2.7")
        admit = allow_hosts(["::ffff:192.0.2.7"])
        self.assertIsNone(admit(PEER))
        self.assertIsNone(admit(mapped))
        self.assertEqual(admit(IPv4Address("TCP", "192.0.2.8", 1)), "source address not allowed")


class ForwardUnitTests(SynchronousTestCase):
    """Producer wiring and the state machine, with a MemoryReactorClock."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.events = Events()

    def factory(self, **kw: Any) -> ForwardFactory:
        return ForwardFactory(lambda: TCP4ClientEndpoint(self.reactor, "198.51.100.1", 22),
                              clock=self.reactor, on_event=self.events, **kw)

    def accept(self, f: ForwardFactory, transport: StringTransport | None = None
               ) -> tuple[Pipe, StringTransport]:
        proto = f.buildProtocol(PEER)
        assert proto is not None
        st = transport if transport is not None else StringTransport(peerAddress=PEER)
        proto.makeConnection(st)
        return proto, st

    def connect_outbound(self, transport: StringTransport | None = None) -> tuple[Pipe, StringTransport]:
        client_factory = self.reactor.tcpClients[-1][2]
        proto: Any = client_factory.buildProtocol(None)
        ct = transport if transport is not None else StringTransport(
            peerAddress=IPv4Address("TCP", "198.51.100.1", 22))
        proto.makeConnection(ct)
        return proto._wrappedProtocol, ct

    def test_paused_until_connected_then_producers_both_ways(self) -> None:
        f = self.factory()
        inbound, st = self.accept(f)
        self.assertEqual(st.producerState, "paused")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.reactor.tcpClients[0][:2], ("198.51.100.1", 22))
        outbound, ct = self.connect_outbound()
        self.assertIs(st.producer, ct)
        self.assertIs(ct.producer, st)
        self.assertTrue(st.streaming and ct.streaming)
        self.assertEqual(st.producerState, "producing")
        self.assertEqual(ct.producerState, "producing")
        self.assertEqual(self.events.last("connected"),
                         {"peer": "192.0.2.7", "target": "198.51.100.1:22"})
        inbound.dataReceived(b"hello")
        outbound.dataReceived(b"world!")
        self.assertEqual(ct.value(), b"hello")
        self.assertEqual(st.value(), b"world!")
        self.assertEqual(f.counts()["bytes_in"], 5)
        self.assertEqual(f.counts()["bytes_out"], 6)
        self.assertEqual(f.active()[0].peer, "192.0.2.7")

    def test_bytes_before_connect_are_held_then_relayed(self) -> None:
        f = self.factory()
        inbound, st = self.accept(f)
        inbound.dataReceived(b"early")  # a transport that ignored the pause
        _, ct = self.connect_outbound()
        self.assertEqual(ct.value(), b"early")

    def test_bytes_before_connect_are_bounded(self) -> None:
        f = self.factory()
        inbound, st = self.accept(f)
        inbound.dataReceived(b"x" * (256 * 1024 + 1))
        self.assertTrue(st.disconnecting)
        self.flushLoggedErrors()

    def test_admit_refuses_before_anything(self) -> None:
        f = self.factory(admit=allow_hosts(["192.0.2.99"]))
        self.assertIsNone(f.buildProtocol(PEER))
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.events.seen,
                         [("refused", {"peer": "192.0.2.7", "reason": "source address not allowed"})])
        self.assertEqual(f.counts()["refused"], 1)
        self.assertEqual(f.counts()["accepted"], 0)

    def test_max_connections(self) -> None:
        f = self.factory(max_connections=1)
        self.accept(f)
        self.assertIsNone(f.buildProtocol(PEER))
        self.assertEqual(self.events.last("refused")["reason"], "too many connections")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_connect_timeout(self) -> None:
        f = self.factory(connect_timeout=5)
        inbound, st = self.accept(f)
        self.reactor.advance(4.9)
        self.assertFalse(st.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(st.disconnecting)
        self.assertEqual(self.events.last("failed"),
                         {"peer": "192.0.2.7", "reason": "connect timed out after 5s"})
        inbound.connectionLost(Failure(Exception("gone")))
        closed = self.events.last("closed")
        self.assertEqual(closed["reason"], "connect failed: connect timed out after 5s")
        self.assertEqual(f.active(), ())

    def test_connect_refused(self) -> None:
        from twisted.internet.error import ConnectionRefusedError
        f = self.factory()
        inbound, st = self.accept(f)
        connector = self.reactor.connectors[-1]
        self.reactor.tcpClients[-1][2].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        self.assertTrue(st.disconnecting)
        self.assertEqual(self.events.last("failed")["peer"], "192.0.2.7")
        self.assertIn("refused", self.events.last("failed")["reason"])

    def test_client_leaves_while_connecting(self) -> None:
        f = self.factory()
        inbound, st = self.accept(f)
        inbound.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.events.names(), ["closed"])
        self.assertEqual(self.events.last("closed")["reason"], "client closed")
        self.assertEqual(f.active(), ())

    def test_idle_timeout(self) -> None:
        f = self.factory(idle_timeout=60)
        inbound, st = self.accept(f)
        outbound, ct = self.connect_outbound()
        self.reactor.advance(50)
        outbound.dataReceived(b"x")
        self.reactor.advance(50)
        self.assertFalse(st.disconnecting or ct.disconnecting)
        self.reactor.advance(10.5)
        self.assertTrue(st.disconnecting and ct.disconnecting)
        inbound.connectionLost(Failure(Exception("aborted")))
        outbound.connectionLost(Failure(Exception("aborted")))
        closed = self.events.last("closed")
        self.assertEqual(closed["reason"], "idle for 60s")
        self.assertEqual((closed["bytes_in"], closed["bytes_out"]), (0, 1))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_half_close_both_ways(self) -> None:
        f = self.factory()
        st = HalfCloseTransport(peerAddress=PEER)
        inbound, _ = self.accept(f, st)
        ct = HalfCloseTransport(peerAddress=IPv4Address("TCP", "198.51.100.1", 22))
        outbound, _ = self.connect_outbound(ct)
        inbound.readConnectionLost()
        self.assertTrue(ct.write_shut)
        self.assertIsNone(ct.producer)  # else the shutdown waits for it forever
        self.assertFalse(ct.disconnecting)
        outbound.dataReceived(b"reply")  # the other direction still flows
        self.assertEqual(st.value(), b"reply")
        outbound.writeConnectionLost()
        outbound.readConnectionLost()
        self.assertTrue(st.write_shut)
        self.assertTrue(ct.disconnecting)  # both directions done on this side
        inbound.readConnectionLost()  # a second EOF (transport resumed after EOF) is ignored
        inbound.writeConnectionLost()
        self.assertTrue(st.disconnecting)

    def test_half_close_without_support_closes(self) -> None:
        f = self.factory()
        inbound, st = self.accept(f)
        outbound, ct = self.connect_outbound()
        inbound.readConnectionLost()
        self.assertTrue(ct.disconnecting)
        self.assertIsNone(ct.producer)

    def test_close_of_one_side_closes_the_other_then_drain_timeout(self) -> None:
        f = self.factory(drain_timeout=30)
        inbound, st = self.accept(f)
        outbound, ct = self.connect_outbound()
        outbound.connectionLost(Failure(Exception("target went")))
        self.assertTrue(st.disconnecting)
        self.assertFalse(st.disconnected)
        self.reactor.advance(30)
        self.assertTrue(st.disconnected)
        inbound.connectionLost(Failure(Exception("aborted")))
        self.assertEqual(self.events.last("closed")["reason"], "target closed")
        self.assertEqual(f.active(), ())

    def test_close_all(self) -> None:
        f = self.factory()
        first, st1 = self.accept(f)
        _, ct1 = self.connect_outbound()
        second, st2 = self.accept(f)  # still connecting
        self.assertEqual(len(f.active()), 2)
        self.assertEqual(f.close_all("lease ended"), 2)
        self.assertTrue(st1.disconnected and ct1.disconnected and st2.disconnected)
        self.assertNotIn("failed", self.events.names())
        for proto in (first, second):
            proto.connectionLost(Failure(Exception("aborted")))
        self.assertEqual(len(f.active()), 1)  # first's outbound not yet reported lost
        f.active()[0].outbound.connectionLost(Failure(Exception("aborted")))  # type: ignore[union-attr]
        self.assertEqual(f.active(), ())
        reasons = [fields["reason"] for name, fields in self.events.seen if name == "closed"]
        self.assertEqual(reasons, ["lease ended", "lease ended"])


class ConnectProtocolTests(SynchronousTestCase):
    def test_quiet_one_shot_factory(self) -> None:
        """connect_protocol connects the given protocol through a factory that
        logs nothing per connection (no "Starting factory" line)."""
        reactor = MemoryReactorClock()
        pipe = Pipe()
        d = connect_protocol(TCP4ClientEndpoint(reactor, "127.0.0.1", 9), pipe)
        host, port, factory, _timeout, _bind = reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 9))
        self.assertNoResult(d)
        inner = factory._wrappedFactory  # type: ignore[attr-defined]
        self.assertFalse(inner.noisy)
        self.assertIs(inner.buildProtocol(None), pipe)


class SpliceTests(SynchronousTestCase):
    def pipe(self) -> tuple[Pipe, StringTransport]:
        p, t = Pipe(), StringTransport()
        p.makeConnection(t)
        return p, t

    def test_splice(self) -> None:
        (a, ta), (b, tb) = self.pipe(), self.pipe()
        self.assertEqual(ta.producerState, "paused")
        a.dataReceived(b"pre")
        splice(a, b)
        self.assertEqual(tb.value(), b"pre")
        self.assertIs(ta.producer, tb)
        self.assertIs(tb.producer, ta)
        self.assertEqual(ta.producerState, "producing")
        b.dataReceived(b"back")
        self.assertEqual(ta.value(), b"back")
        self.assertRaises(ValueError, splice, a, b)

    def test_splice_with_a_closed_side(self) -> None:
        a, _ = self.pipe()
        b, tb = self.pipe()
        a.dataReceived(b"last words")
        a.connectionLost(Failure(Exception("gone")))
        splice(a, b)
        self.assertEqual(tb.value(), b"last words")
        self.assertTrue(tb.disconnecting)

    def test_unconnected_refused(self) -> None:
        self.assertRaises(ValueError, splice, Pipe(), Pipe())


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class Collect(Protocol):
    """A client that records what comes back and the EOF."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.done: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(None)


class RealSocketTests(TestCase):
    """Real 127.0.0.1 sockets through the forwarder."""

    timeout = 30

    async def listen(self, factory: Factory) -> int:  # type: ignore[type-arg]
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[no-any-return]

    async def forwarder(self, target_port: int, events: Events) -> tuple[ForwardFactory, int]:
        f = ForwardFactory(lambda: TCP4ClientEndpoint(reactor, "127.0.0.1", target_port),
                           clock=reactor, on_event=events, idle_timeout=60)
        return f, await self.listen(f)

    async def test_data_both_ways_and_half_close(self) -> None:
        from twisted.internet.interfaces import IHalfCloseableProtocol
        from zope.interface import directlyProvides

        class EchoThenBye(Echo):
            def connectionMade(self) -> None:
                directlyProvides(self, IHalfCloseableProtocol)

            def readConnectionLost(self) -> None:
                self.transport.write(b"|bye")  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]

            def writeConnectionLost(self) -> None:
                pass

        events = Events()
        target = await self.listen(Factory.forProtocol(EchoThenBye))
        f, port = await self.forwarder(target, events)
        client = Collect()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        payload = bytes(range(256)) * 4096  # 1 MiB
        client.transport.write(payload)  # type: ignore[union-attr]
        client.transport.loseWriteConnection()  # type: ignore[union-attr]
        await client.done
        self.assertEqual(bytes(client.received), payload + b"|bye")
        while f.active():  # the target side reports its close in a later turn
            await task.deferLater(reactor, 0.01, lambda: None)
        closed = events.last("closed")
        self.assertEqual((closed["bytes_in"], closed["bytes_out"]),
                         (len(payload), len(payload) + 4))

    async def test_slow_reader_pauses_the_writer(self) -> None:
        """A target that reads nothing: the forwarder stops reading from the
        client (its outbound buffer stays small) and the client's own
        transport pauses the client; then everything arrives intact."""

        class Stalled(Protocol):
            instances: list[Stalled] = []

            def connectionMade(self) -> None:
                self.received = 0
                self.transport.pauseProducing()  # type: ignore[union-attr]
                Stalled.instances.append(self)

            def dataReceived(self, data: bytes) -> None:
                self.received += len(data)

        @implementer(IPushProducer)
        class Writer(Protocol):
            chunk = b"z" * 65536
            limit = 256 * 1024 * 1024

            def __init__(self) -> None:
                self.sent = 0
                self.paused: defer.Deferred[None] = defer.Deferred()
                self.producing = True

            def connectionMade(self) -> None:
                self.transport.registerProducer(self, True)  # type: ignore[union-attr]
                self.pump()

            def pump(self) -> None:
                while self.producing and self.sent < self.limit:
                    self.sent += len(self.chunk)
                    self.transport.write(self.chunk)  # type: ignore[union-attr]

            def pauseProducing(self) -> None:
                self.producing = False
                if not self.paused.called:
                    self.paused.callback(None)

            def resumeProducing(self) -> None:
                self.producing = True
                reactor.callLater(0, self.pump)  # type: ignore[attr-defined]

            def stopProducing(self) -> None:
                self.producing = False

        events = Events()
        target = await self.listen(Factory.forProtocol(Stalled))
        f, port = await self.forwarder(target, events)
        writer = Writer()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), writer)
        # Wait until the forwarder's outbound transport has paused the inbound
        # one: never happens without producer registration (test times out).
        def outbound_paused() -> bool:
            pipe = f.active()[0].outbound if f.active() else None
            return pipe is not None and getattr(pipe.transport, "producerPaused", False)

        while not outbound_paused():
            await task.deferLater(reactor, 0.01, lambda: None)
        forward = f.active()[0]
        assert forward.outbound is not None
        out_t: Any = forward.outbound.transport
        buffered = len(out_t.dataBuffer) - out_t.offset + out_t._tempDataLen
        # bufferSize (READ_SIZE, set by Pipe) plus at most one read of the inbound side
        self.assertEqual(out_t.bufferSize, READ_SIZE)
        self.assertLess(buffered, out_t.bufferSize + 2 * READ_SIZE)
        await writer.paused
        self.assertLess(writer.sent, Writer.limit)
        # Let the target read: everything the client wrote arrives.
        writer.stopProducing()
        writer.transport.unregisterProducer()  # type: ignore[union-attr]
        writer.transport.loseConnection()  # type: ignore[union-attr]
        stalled = Stalled.instances[0]
        stalled.transport.resumeProducing()  # type: ignore[union-attr]
        while f.active():
            await task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(stalled.received, writer.sent)
        self.assertEqual(events.last("closed")["bytes_in"], writer.sent)
