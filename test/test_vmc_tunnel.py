"""vmc's tunnel server (ticrypt/vmc/tunnel.py) with real TLS on 127.0.0.1.

The pin: only a client certificate pinned by ``tunnel-accept`` gets through;
another certificate, none, one issued by the pinned certificate and a
self-signed one with the same subject are refused (audited), and a resumed
session cannot skip the check.  The handshake is timed out.  Over the mux:
a stream to a port not in ``[tunnel] ports`` is refused, and a failed
connect inside the VM refuses only that stream, while the others carry data.

The TLS clients are Python's ``ssl`` (in a thread: blocking sockets) and,
for the mux, Twisted's TLS with a :class:`~ticrypt.mux.MuxProtocol`.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import ssl
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, endpoints, protocol, reactor, task, threads
from twisted.internet import ssl as tssl
from twisted.trial.unittest import TestCase

from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.mux import MuxProtocol, StreamEndpoint, StreamRefused
from ticrypt.vmc.pins import PinLimits
from ticrypt.vmc.state import VmState
from ticrypt.vmc.tunnel import TunnelServer, TunnelSettings, der_fingerprint

ALICE = identity.public_bytes(identity.generate())


def make_cert(cn: str = "tunnel-client", issuer: tuple[Any, x509.Certificate] | None = None
              ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    sign_key, issuer_name = (issuer[0], issuer[1].subject) if issuer else (key, name)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(sign_key, hashes.SHA256()))
    return key, cert


def fingerprint(cert: x509.Certificate) -> str:
    return der_fingerprint(cert.public_bytes(serialization.Encoding.DER))


class Client:
    """Key and certificate files for Python's ssl."""

    def __init__(self, folder: str, name: str, key: Any, certs: list[x509.Certificate]):
        self.cert = certs[0]
        self.path = os.path.join(folder, name + ".pem")
        with open(self.path, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
            for c in certs:
                f.write(c.public_bytes(serialization.Encoding.PEM))
        self.key, self.certs = key, certs


def client_context(client: Client | None, max_version: ssl.TLSVersion | None = None
                   ) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    if client is not None:
        ctx.load_cert_chain(client.path)
    return ctx


def ssl_talk(port: int, client: Client | None, session: Any = None,
             max_version: ssl.TLSVersion | None = None, context: ssl.SSLContext | None = None
             ) -> dict[str, Any]:
    """Handshake, send ``ping``, read the echo (blocking: run in a thread)."""
    ctx = context or client_context(client, max_version)
    out: dict[str, Any] = {"ok": False}
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as e:
        out["error"] = str(e)
        return out
    with raw:
        try:
            with ctx.wrap_socket(raw, session=session) as s:
                out["version"] = s.version()
                out["reused"] = s.session_reused
                s.sendall(b"ping")
                data = s.recv(100)
                out["data"] = data
                out["ok"] = data == b"ping"
                out["session"] = s.session
        except (ssl.SSLError, OSError) as e:
            out["error"] = str(e)
    return out


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class Fixture:
    def __init__(self, case: TestCase, clock: Any = None, **settings: Any):
        self.dir = tempfile.mkdtemp()
        case.addCleanup(_rmtree, self.dir)
        self.audit_path = os.path.join(self.dir, "audit.log")
        self.audit = AuditLog(self.audit_path, reactor, role="vmc")
        case.addCleanup(self.audit.close)
        os.makedirs(os.path.join(self.dir, "state"), 0o700)
        self.state = VmState(os.path.join(self.dir, "state"), self.audit)
        self.clock = clock or reactor
        echo = settings.pop("echo", True)
        self.server = TunnelServer(
            reactor=reactor, clock=self.clock, audit=self.audit,
            settings=TunnelSettings(**settings), state_dir=self.state.state_dir,
            tls_pem=self.state.tls_pem, tls_fingerprint=self.state.tls_fingerprint,
            mux_factory=(lambda conn: Echo()) if echo else None)
        self.port = reactor.listenTCP(0, self.server.factory,  # type: ignore[arg-type]
                                      interface="127.0.0.1")
        case.addCleanup(self.port.stopListening)
        self.number: int = self.port.getHost().port  # type: ignore[attr-defined]
        case.addCleanup(self.drop_connections)

    def drop_connections(self) -> defer.Deferred[None]:
        for conn in list(self.server.connections | self.server._handshaking):
            if conn.transport is not None:
                conn.transport.abortConnection()  # type: ignore[attr-defined]
        return task.deferLater(reactor, 0, lambda: None)

    def client(self, name: str, *args: Any, **kw: Any) -> Client:
        key, cert = make_cert(*args, **kw)
        return Client(self.dir, name, key, [cert])

    def pin(self, client: Client, user_key: bytes = ALICE) -> dict[str, Any]:
        return self.server.accept(fingerprint(client.cert), "alice", user_key)

    def talk(self, client: Client | None, **kw: Any) -> defer.Deferred[dict[str, Any]]:
        return threads.deferToThread(ssl_talk, self.number, client, **kw)

    def audit_lines(self, event: str) -> list[dict[str, Any]]:
        with open(self.audit_path) as f:
            lines = [json.loads(line) for line in f]
        return [line for line in lines if line["event"] == event]


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class PinnedTLS(TestCase):
    """Real TLS on 127.0.0.1; the 'mux' is an echo protocol here."""

    async def refused(self, f: Fixture, client: Client | None, reason: str,
                      **kw: Any) -> dict[str, Any]:
        out = await f.talk(client, **kw)
        self.assertFalse(out["ok"], out)
        await f.drop_connections()
        lines = f.audit_lines("tunnel-refused")
        self.assertTrue(lines, "no tunnel-refused audit line")
        self.assertEqual(lines[-1]["reason"], reason)
        self.assertTrue(lines[-1]["peer"].startswith("127.0.0.1:"))
        if client is not None:
            self.assertEqual(lines[-1]["cert"], fingerprint(client.cert))
        self.assertEqual(f.server.connections, set())
        return out

    @defer.inlineCallbacks
    def test_pinned_accepted_tls13(self) -> Any:
        f = Fixture(self)
        alice = f.client("alice")
        grant = f.pin(alice)
        self.assertEqual(grant["tls_fingerprint"], f.state.tls_fingerprint)
        out = yield f.talk(alice)
        self.assertTrue(out["ok"], out)
        self.assertEqual(out["version"], "TLSv1.3")
        opened = f.audit_lines("tunnel-open")
        self.assertEqual([(o["user"], o["cert"]) for o in opened],
                         [("alice", fingerprint(alice.cert))])

    @defer.inlineCallbacks
    def test_pinned_accepted_tls12(self) -> Any:
        f = Fixture(self)
        alice = f.client("alice")
        f.pin(alice)
        out = yield f.talk(alice, max_version=ssl.TLSVersion.TLSv1_2)
        self.assertTrue(out["ok"], out)
        self.assertEqual(out["version"], "TLSv1.2")

    @defer.inlineCallbacks
    def test_tls11_refused(self) -> Any:
        f = Fixture(self)
        alice = f.client("alice")
        f.pin(alice)
        ctx_max = ssl.TLSVersion.TLSv1_1
        try:
            out = yield f.talk(alice, max_version=ctx_max)
        except ValueError:  # this Python cannot even offer TLS 1.1
            return
        self.assertFalse(out["ok"])

    async def _another(self) -> None:
        f = Fixture(self)
        f.pin(f.client("alice"))
        await self.refused(f, f.client("mallory"), "certificate-not-pinned")

    def test_another_certificate_refused(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._another())

    async def _none(self) -> None:
        f = Fixture(self)
        f.pin(f.client("alice"))
        await self.refused(f, None, "no-certificate")

    def test_no_certificate_refused(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._none())

    async def _issued(self) -> None:
        f = Fixture(self)
        alice_key, alice_cert = make_cert("alice")
        f.server.accept(fingerprint(alice_cert), "alice", ALICE)
        child_key, child_cert = make_cert("alice", issuer=(alice_key, alice_cert))
        # the chain names the pinned certificate as issuer, and carries it
        child = Client(f.dir, "child", child_key, [child_cert, alice_cert])
        await self.refused(f, child, "certificate-not-pinned")

    def test_issued_by_pinned_refused(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._issued())

    async def _same_subject(self) -> None:
        f = Fixture(self)
        alice = f.client("alice", "alice-laptop")
        f.pin(alice)
        twin = f.client("twin", "alice-laptop")
        self.assertEqual(twin.cert.subject, alice.cert.subject)
        await self.refused(f, twin, "certificate-not-pinned")

    def test_same_subject_self_signed_refused(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._same_subject())

    async def _resumption(self, version: ssl.TLSVersion) -> None:
        f = Fixture(self)
        alice = f.client("alice")
        f.pin(alice)
        ctx = client_context(alice, version)
        first = await f.talk(alice, context=ctx)
        self.assertTrue(first["ok"], first)
        # still pinned: a resumed session is not even offered back
        second = await f.talk(alice, context=ctx, session=first["session"])
        self.assertTrue(second["ok"], second)
        self.assertFalse(second["reused"])
        # unpinned: offering the old session does not get through
        f.server.revoked(ALICE)
        third = await f.talk(alice, context=ctx, session=second["session"])
        self.assertFalse(third["ok"], third)
        self.assertFalse(third.get("reused"))
        await f.drop_connections()
        self.assertEqual(f.audit_lines("tunnel-refused")[-1]["reason"], "certificate-not-pinned")

    def test_resumption_tls13_does_not_skip_pin(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._resumption(ssl.TLSVersion.TLSv1_3))

    def test_resumption_tls12_does_not_skip_pin(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._resumption(ssl.TLSVersion.TLSv1_2))

    async def _expiry(self) -> None:
        clock = task.Clock()
        clock.advance(1_000_000)
        f = Fixture(self, clock=clock, pins=PinLimits(pin_ttl=60.0))
        alice = f.client("alice")
        f.pin(alice)
        clock.advance(59)
        self.assertTrue((await f.talk(alice))["ok"])
        await f.drop_connections()
        clock.advance(59)  # used 59 s ago: still pinned
        self.assertTrue((await f.talk(alice))["ok"])
        await f.drop_connections()
        clock.advance(60)
        await self.refused(f, alice, "certificate-not-pinned")

    def test_pin_expires_when_unused(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._expiry())

    async def _timeout(self) -> None:
        clock = task.Clock()
        f = Fixture(self, clock=clock, handshake_timeout=10.0)
        admitted: defer.Deferred[None] = defer.Deferred()
        admit = f.server.admit

        def watch(conn: Any) -> bool:
            ok = admit(conn)
            admitted.callback(None)
            return ok

        f.server.admit = watch  # type: ignore[method-assign]
        lost: defer.Deferred[None] = defer.Deferred()

        class Silent(protocol.Protocol):
            def connectionLost(self, reason: Any = None) -> None:
                lost.callback(None)

        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", f.number)
        await endpoints.connectProtocol(ep, Silent())
        await admitted
        self.assertEqual(len(f.server._handshaking), 1)
        clock.advance(9.9)
        self.assertFalse(lost.called)
        clock.advance(0.2)
        await lost
        lines = f.audit_lines("tunnel-refused")
        self.assertEqual([line["reason"] for line in lines], ["handshake-timeout"])
        self.assertEqual(f.server._handshaking, set())

    def test_handshake_timeout(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._timeout())

    async def _cap(self) -> None:
        f = Fixture(self, max_connections=1)
        alice = f.client("alice")
        f.pin(alice)
        held = socket.create_connection(("127.0.0.1", f.number))
        self.addCleanup(held.close)
        while not f.server._handshaking:  # the server accepts it
            await task.deferLater(reactor, 0.01, lambda: None)
        out = await f.talk(alice)
        self.assertFalse(out["ok"])
        self.assertEqual(f.audit_lines("tunnel-refused")[-1]["reason"], "over-limit")

    def test_connection_cap(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._cap())

    def test_pins_persist(self) -> None:
        f = Fixture(self)
        alice = f.client("alice")
        f.pin(alice)
        path = os.path.join(f.state.state_dir, "tunnel-pins.json")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        again = TunnelServer(reactor=reactor, clock=reactor, audit=f.audit,
                             settings=TunnelSettings(), state_dir=f.state.state_dir,
                             tls_pem=f.state.tls_pem, tls_fingerprint="x")
        self.assertIsNotNone(again.check_pin(fingerprint(alice.cert)))
        with open(path, "w") as fh:
            fh.write("{not json")
        broken = TunnelServer(reactor=reactor, clock=reactor, audit=f.audit,
                              settings=TunnelSettings(), state_dir=f.state.state_dir,
                              tls_pem=f.state.tls_pem, tls_fingerprint="x")
        self.assertEqual(len(broken.pins), 0)
        self.flushLoggedErrors()


class Streams(TestCase):
    """The real mux over the pinned TLS connection, streams to 127.0.0.1."""

    async def tunnel(self, ports: tuple[int, ...], **kw: Any) -> tuple[Fixture, MuxProtocol]:
        f = Fixture(self, echo=False, ports=ports, **kw)
        key, cert = make_cert("alice")
        f.server.accept(fingerprint(cert), "alice", ALICE)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        options = tssl.PrivateCertificate.loadPEM(
            pem + cert.public_bytes(serialization.Encoding.PEM)).options()
        options.verify = False  # the client pins vmc's fingerprint (not under test here)
        mux = MuxProtocol(side="client", clock=reactor)
        ep = endpoints.wrapClientTLS(options, endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", f.number))
        await endpoints.connectProtocol(ep, mux)
        self.addCleanup(self.drop, mux)
        for _ in range(1000):  # the server's side of the handshake (bounded)
            if f.server.connections:
                break
            await task.deferLater(reactor, 0.005, lambda: None)
        self.assertEqual(len(f.server.connections), 1)
        return f, mux

    def drop(self, mux: MuxProtocol) -> defer.Deferred[str]:
        transport: Any = mux.transport
        if transport is not None and getattr(transport, "_tlsConnection", None) is not None \
                and not transport.disconnecting:
            transport.abortConnection()
        return mux.when_closed()

    def echo_server(self) -> int:
        factory = protocol.ServerFactory.forProtocol(Echo)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)  # type: ignore[attr-defined]

    async def talk(self, mux: MuxProtocol, port: int, data: bytes) -> bytes:
        got: defer.Deferred[bytes] = defer.Deferred()

        class Client(protocol.Protocol):
            buf = b""

            def connectionMade(self) -> None:
                self.transport.write(data)  # type: ignore[union-attr]

            def dataReceived(self, chunk: bytes) -> None:
                self.buf += chunk
                if len(self.buf) >= len(data):
                    self.transport.loseConnection()  # type: ignore[union-attr]
                    got.callback(self.buf)

        await StreamEndpoint(mux, port).connect(protocol.Factory.forProtocol(Client))
        return await got

    async def _refusals(self) -> None:
        echo = self.echo_server()
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        f, mux = await self.tunnel((echo, closed))
        first = self.talk(mux, echo, b"a" * 100000)
        for port, reason in ((echo + 1 if echo + 1 != closed else echo + 2, "port-not-allowed"),
                             (closed, "connect-failed")):
            with self.assertRaises(StreamRefused) as e:
                await StreamEndpoint(mux, port).connect(protocol.Factory.forProtocol(Echo))
            self.assertEqual(e.exception.reason, reason)
        # the other streams, and the tunnel, are unaffected
        self.assertEqual(await first, b"a" * 100000)
        self.assertEqual(await self.talk(mux, echo, b"again"), b"again")
        refused = f.audit_lines("tunnel-stream-refused")
        self.assertEqual([(r["reason"], r["user"]) for r in refused],
                         [("port-not-allowed", "alice"), ("connect-failed", "alice")])
        self.assertEqual(len(f.server.connections), 1)

    def test_refused_streams_end_alone(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._refusals())

    async def _origins(self) -> None:
        seen: list[Any] = []
        f_holder: list[Fixture] = []

        class Who(protocol.Protocol):
            # looked up once a byte arrived (as SFTP does at authentication):
            # the server side may accept before vmc's connect completes
            def dataReceived(self, data: bytes) -> None:
                peer = self.transport.getPeer()  # type: ignore[union-attr]
                pin = f_holder[0].server.origins.user_of(peer)
                seen.append(pin and pin.user)
                self.transport.write(data)  # type: ignore[union-attr]

        port = reactor.listenTCP(0, protocol.ServerFactory.forProtocol(Who), interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        number = port.getHost().port  # type: ignore[attr-defined]
        f, mux = await self.tunnel((number,))
        f_holder.append(f)
        self.assertEqual(await self.talk(mux, number, b"x"), b"x")
        self.assertEqual(seen, ["alice"])
        # a local connection that is no stream has no tunnel user
        with socket.create_connection(("127.0.0.1", number)) as local:
            local.sendall(b"y")
            while len(seen) < 2:
                await task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(seen, ["alice", None])

    def test_origins_name_the_tunnel_user(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._origins())

    async def _revoke(self) -> None:
        f, mux = await self.tunnel((1,))
        self.assertEqual(len(f.server.connections), 1)
        f.server.revoked(ALICE)
        await mux.when_closed()
        self.assertEqual(len(f.server.pins), 0)
        await f.drop_connections()
        self.assertEqual(f.server.connections, set())
        self.assertEqual([c["user"] for c in f.audit_lines("tunnel-closed")], ["alice"])

    def test_revoked_user_loses_tunnels_and_pins(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._revoke())

    async def _sweep(self) -> None:
        clock = task.Clock()
        clock.advance(1000)
        f, mux = await self.tunnel((1,), clock=clock, pins=PinLimits(pin_ttl=60.0))
        for _ in range(3):  # an open tunnel keeps its pin alive
            clock.advance(50)
            f.server.sweep()
        self.assertEqual(len(f.server.pins), 1)
        self.drop(mux)
        await f.drop_connections()
        clock.advance(59)
        f.server.sweep()
        self.assertEqual(len(f.server.pins), 1)
        clock.advance(1)
        f.server.sweep()
        self.assertEqual(len(f.server.pins), 0)
        self.assertEqual([e["user"] for e in f.audit_lines("tunnel-pin-expired")], ["alice"])
        with open(os.path.join(f.state.state_dir, "tunnel-pins.json")) as fh:
            self.assertEqual(json.load(fh), {"pins": []})

    def test_open_tunnels_keep_pins_unused_ones_expire(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._sweep())
