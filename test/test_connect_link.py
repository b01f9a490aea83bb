"""A connect tunnel over real sockets on 127.0.0.1: local listener -> pinned
TLS client -> mux, against an in-process stand-in for vmc's tunnel server
(TLS demanding the pinned client certificate, server mux whose streams
echo).  Pin mismatch, and the link redialled after the server restarts."""

from __future__ import annotations

import os
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.ssl import CertificateOptions
from twisted.trial.unittest import TestCase

from ticrypt.audit import AuditLog
from ticrypt.connect.certs import CertStore, TunnelCert, fingerprint_der, pinned_client
from ticrypt.connect.config import TunnelSettings
from ticrypt.connect.tap import local_listen
from ticrypt.connect.tunnels import Forward, Tunnel, TunnelSpec, mux_dialer
from ticrypt.mux import IncomingStream, MuxProtocol


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Reader(protocol.Protocol):
    def __init__(self, want: int):
        self.want = want
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.want and not self.done.called:
            self.done.callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self.data)
        self.lost.callback(None)


class FakeVmc:
    """TLS with vmc's certificate; only the pinned client certificate gets in."""

    def __init__(self, tc: TestCase, cert: TunnelCert, pinned: str):
        self.tc = tc
        self.cert = cert
        self.pinned = pinned
        self.port: Any = None
        self.muxes: list[MuxProtocol] = []
        self.refused = 0

    def options(self) -> CertificateOptions:
        with open(self.cert.key_path, "rb") as f:
            key = crypto.load_privatekey(crypto.FILETYPE_PEM, f.read())
        options = CertificateOptions(
            privateKey=key, certificate=crypto.load_certificate(crypto.FILETYPE_PEM,
                                                                self.cert.cert_pem))

        def verify(conn: Any, x509: Any, errno: int, depth: int, ok: int) -> bool:
            good = depth > 0 or fingerprint_der(
                crypto.dump_certificate(crypto.FILETYPE_ASN1, x509)) == self.pinned
            if not good:
                self.refused += 1
            return good

        options.getContext().set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                                        verify)
        return options

    def build(self) -> MuxProtocol:
        def on_stream(incoming: IncomingStream) -> None:
            if incoming.port == 7:
                incoming.accept(Echo())
            else:
                incoming.refuse("port-not-allowed")

        mux = MuxProtocol(side="server", clock=reactor, on_stream=on_stream)
        self.muxes.append(mux)
        return mux

    async def listen(self, port: int = 0) -> int:
        ep = endpoints.SSL4ServerEndpoint(reactor, port, self.options(), interface="127.0.0.1")
        self.port = await ep.listen(protocol.Factory.forProtocol(self.build))
        return int(self.port.getHost().port)

    async def stop(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()
        for mux in self.muxes:
            if mux.transport is not None and mux.stats()["closed"] is None:
                mux.transport.abortConnection()  # type: ignore[attr-defined]
        await defer.gatherResults([m.when_closed() for m in self.muxes])


async def until(check: Any, seconds: float = 10.0) -> bool:
    for _ in range(int(seconds / 0.02)):
        if check():
            return True
        await task.deferLater(reactor, 0.02, lambda: None)
    return bool(check())


class LinkTests(TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        d = self.mktemp()
        os.makedirs(d)
        self.client = CertStore(os.path.join(d, "connect"), reactor, lifetime=3600,
                                max_certs=4)
        self.cert = self.client.create()
        self.vmc_cert = CertStore(os.path.join(d, "vmc"), reactor, lifetime=3600,
                                  max_certs=4).create()
        self.vmc = FakeVmc(self, self.vmc_cert, self.cert.fingerprint)
        self.addCleanup(self.vmc.stop)
        self.port = await self.vmc.listen()
        self.audit = AuditLog(os.path.join(d, "audit.log"), reactor, role="connect")
        self.addCleanup(self.audit.close)

    def tunnel(self, pin: str) -> Tunnel:
        settings = TunnelSettings(connect_timeout=5.0, reconnect_initial=0.05,
                                  reconnect_max=0.2)
        spec = TunnelSpec("vm-1", "127.0.0.1", self.port, self.cert.id, pin,
                          (Forward(7, 0), Forward(9, 0)))
        dial = mux_dialer(reactor, "127.0.0.1", self.port, pinned_client(self.cert, pin),
                          timeout=5.0)
        t = Tunnel("t1", spec, clock=reactor, dial=dial, listen=local_listen(reactor),
                   settings=settings, audit=self.audit)
        self.addCleanup(lambda: defer.ensureDeferred(t.close()))
        return t

    async def echo(self, port: int, payload: bytes) -> bytes:
        reader = Reader(len(payload))
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        proto = await endpoints.connectProtocol(ep, reader)
        assert proto.transport is not None
        proto.transport.write(payload)
        data = await reader.done
        proto.transport.loseConnection()
        await reader.lost
        return data

    async def test_stream_through_pinned_tls_and_mux(self) -> None:
        t = self.tunnel(self.vmc_cert.fingerprint)
        (_, echo_port), (_, refused_port) = await t.start()
        self.assertIsNone(await t.first_attempt())
        payload = os.urandom(3 * 1024 * 1024)  # more than one window
        self.assertEqual(await self.echo(echo_port, payload), payload)
        # a port vmc refuses: the local connection is closed, nothing read
        self.assertEqual(await self.echo(refused_port, b"x"), b"")
        d = t.describe()
        self.assertEqual((d["state"], d["bytes_in"]), ("up", len(payload)))
        self.assertGreaterEqual(d["bytes_out"], len(payload))

    async def test_wrong_pin_never_comes_up(self) -> None:
        t = self.tunnel("sha256:" + "00" * 32)
        await t.start()
        why = await t.first_attempt()
        self.assertIsNotNone(why)
        self.assertIn("TLS with 127.0.0.1", str(why))
        self.assertEqual(t.state, "connecting")
        self.assertEqual(self.vmc.muxes[0].stats()["streams_opened"], 0)

    async def test_unpinned_client_refused_by_vmc(self) -> None:
        self.vmc.pinned = "sha256:" + "11" * 32
        t = self.tunnel(self.vmc_cert.fingerprint)
        await t.start()
        self.assertIsNotNone(await t.first_attempt())
        self.assertGreater(self.vmc.refused, 0)

    async def test_redials_after_the_server_restarts(self) -> None:
        t = self.tunnel(self.vmc_cert.fingerprint)
        [(_, echo_port), _] = await t.start()
        self.assertIsNone(await t.first_attempt())
        await self.vmc.stop()
        self.assertTrue(await until(lambda: t.state == "down"))
        # listeners stay while the link is down
        self.assertEqual(t.local_ports()[0][1], echo_port)
        await self.vmc.listen(self.port)
        self.assertTrue(await until(lambda: t.state == "up"))
        self.assertEqual(t.connects, 2)
        self.assertEqual(await self.echo(echo_port, b"again"), b"again")

    async def test_close_frees_the_local_ports(self) -> None:
        t = self.tunnel(self.vmc_cert.fingerprint)
        [(_, echo_port), _] = await t.start()
        await t.close()
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", echo_port)
        with self.assertRaises(ConnectionRefusedError):
            await endpoints.connectProtocol(ep, Reader(1))
