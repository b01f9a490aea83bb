"""ticrypt.mux.tls: the batching TLS under the mux, in memory (iosim)."""

from __future__ import annotations

import os

from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import BufferingTLSTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from ticrypt import tlsutil
from ticrypt.forward import READ_SIZE
from ticrypt.mux.tls import BATCH, MuxTLSFactory, MuxTLSProtocol


class Sink(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost = reason

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class CountingTransport(iosim.FakeTransport):
    """Counts the writes TLS makes to the TCP transport under it."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class MuxTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        ca, ca_key, pem = (os.path.join(d, n) for n in ("ca.pem", "ca.key", "server.pem"))
        tlsutil.make_ca(ca, ca_key)
        tlsutil.make_server_cert(ca, ca_key, pem)
        with open(pem, "rb") as f:
            server_opts = ssl.PrivateCertificate.loadPEM(f.read()).options()
        client_opts = tlsutil.client_options("127.0.0.1", ca)
        self.server, self.client = Sink(), Sink()
        clock = Clock()
        server_f = MuxTLSFactory(server_opts, False, Factory.forProtocol(lambda: self.server),
                                 clock=clock)
        client_f = MuxTLSFactory(client_opts, True, Factory.forProtocol(lambda: self.client),
                                 clock=clock)
        self.stls = server_f.buildProtocol(None)
        self.ctls = client_f.buildProtocol(None)
        self.server_io = CountingTransport(self.stls, True)
        self.client_io = CountingTransport(self.ctls, False)
        self.pump = iosim.connect(self.stls, self.server_io, self.ctls, self.client_io,
                                  greet=True)
        self.pump.flush()

    def test_protocol_class(self) -> None:
        """The plain (not the buffering) TLS transport, reading READ_SIZE at once."""
        self.assertIsInstance(self.ctls, MuxTLSProtocol)
        self.assertNotIsInstance(self.ctls, BufferingTLSTransport)
        self.assertEqual(self.client.transport, self.ctls)

    def test_bulk_write_one_transport_write_and_batched_delivery(self) -> None:
        """A 1 MiB write: 64 TLS records, written to TCP in one write (the
        send BIO is emptied whole), delivered intact to the peer in batches
        (fewer calls than records, none over BATCH)."""
        payload = os.urandom(1024 * 1024)
        before = self.client_io.writes
        self.client.transport.write(payload)  # type: ignore[union-attr]
        self.assertEqual(self.client_io.writes - before, 1)
        self.pump.flush()
        self.assertEqual(self.server.data, payload)
        self.assertLess(len(self.server.chunks), 64)
        self.assertLessEqual(max(len(c) for c in self.server.chunks), BATCH + 2**15)

    def test_small_writes_are_not_delayed(self) -> None:
        """No callLater(0) aggregation: a small write is on the wire at once."""
        before = self.client_io.writes
        self.client.transport.write(b"ping")  # type: ignore[union-attr]
        self.assertEqual(self.client_io.writes - before, 1)
        self.pump.flush()
        self.assertEqual(self.server.data, b"ping")
        self.server.transport.write(b"pong")  # type: ignore[union-attr]
        self.pump.flush()
        self.assertEqual(self.client.data, b"pong")

    def test_both_ways_and_close(self) -> None:
        """Both directions interleaved stay in order; a TLS close reaches the peer."""
        sent = []
        for i in range(50):
            chunk = bytes([i]) * (i * 997)
            sent.append(chunk)
            self.server.transport.write(chunk)  # type: ignore[union-attr]
            self.client.transport.write(chunk)  # type: ignore[union-attr]
            if i % 7 == 0:
                self.pump.flush()
        self.pump.flush()
        self.assertEqual(self.client.data, b"".join(sent))
        self.assertEqual(self.server.data, b"".join(sent))
        self.client.transport.loseConnection()  # type: ignore[union-attr]
        self.pump.flush()
        self.assertIsNotNone(self.server.lost)
        self.assertIsNotNone(self.client.lost)

    def test_read_size(self) -> None:
        """makeConnection raises the TCP transport's read size."""
        tls = MuxTLSFactory(ssl.CertificateOptions(), True, Factory.forProtocol(Sink)).buildProtocol(None)

        class Tcp(iosim.FakeTransport):
            bufferSize = 65536

        tcp = Tcp(tls, False)
        tls.makeConnection(tcp)
        self.assertEqual(tcp.bufferSize, READ_SIZE)
