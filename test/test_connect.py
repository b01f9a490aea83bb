"""ticrypt-connect in memory: the local API's admission (Host, Origin, token)
and operations, tunnel client certificates and the pinned TLS client, and a
tunnel's listeners and link (fake links on a task.Clock)."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer, protocol, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from ticrypt import tlsutil
from ticrypt.audit import AuditLog
from ticrypt.config import ConfigError, load_config
from ticrypt.connect.api import ConnectResource, connect_site
from ticrypt.connect.certs import CertStore, fingerprint_der, pinned_client
from ticrypt.connect.config import ConnectConfig, TunnelSettings
from ticrypt.connect.tunnels import Forward, Tunnel, TunnelError, TunnelSpec, TunnelTable

TOKEN = "t0ken-" + "x" * 40
PORT = 7480
OWN = f"127.0.0.1:{PORT}"
FP = "sha256:" + "ab" * 32


# ---------------------------------------------------------------- fakes

class FakePort:
    def __init__(self, port: int):
        self.port = port
        self.listening = True

    def getHost(self) -> IPv4Address:
        if not self.listening:  # as tcp.Port: its socket is gone
            raise AttributeError("'Port' object has no attribute 'socket'")
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self) -> None:
        self.listening = False


class FakeListen:
    """Listens on 127.0.0.1 in memory; ``busy`` ports fail."""

    def __init__(self) -> None:
        self.ports: list[tuple[FakePort, Any]] = []
        self.busy: set[int] = set()
        self.next = 41000

    def __call__(self, port: int, factory: Any) -> defer.Deferred[Any]:
        if port in self.busy:
            from twisted.internet.error import CannotListenError

            return defer.fail(CannotListenError("127.0.0.1", port,
                                                OSError(98, "Address already in use")))
        if port == 0:
            self.next += 1
            port = self.next
        p = FakePort(port)
        self.ports.append((p, factory))
        return defer.succeed(p)


@implementer(IStreamClientEndpoint)
class FakeStreamEndpoint:
    def __init__(self, link: FakeLink, port: int):
        self.link = link
        self.port = port

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.link.opens.append((self.port, factory, d))
        return d


class FakeLink:
    def __init__(self) -> None:
        self.opens: list[tuple[int, Any, defer.Deferred[Any]]] = []
        self.closed_with: str | None = None
        self._closed: defer.Deferred[str] = defer.Deferred()

    def stream_endpoint(self, port: int) -> IStreamClientEndpoint:
        return FakeStreamEndpoint(self, port)

    def when_closed(self) -> defer.Deferred[str]:
        return self._closed

    def close(self, reason: str) -> None:
        self.closed_with = reason
        self.drop(reason)

    def drop(self, reason: str) -> None:
        if not self._closed.called:
            self._closed.callback(reason)

    def stats(self) -> dict[str, int]:
        return {"streams": 0, "bytes_in": 0, "bytes_out": 0}

    def accept(self, i: int = 0) -> tuple[Any, StringTransport]:
        """vmc accepts open number ``i``: the stream's protocol is connected."""
        _, factory, d = self.opens[i]
        proto = factory.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        d.callback(proto)
        return proto, t


class FakeDial:
    def __init__(self) -> None:
        self.attempts: list[defer.Deferred[Any]] = []

    def __call__(self) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.attempts.append(d)
        return d

    def up(self) -> FakeLink:
        link = FakeLink()
        self.attempts[-1].callback(link)
        return link


def settings(**kw: Any) -> TunnelSettings:
    defaults: dict[str, Any] = {"connect_timeout": 5.0, "reconnect_initial": 1.0,
                                "reconnect_max": 8.0, "max_waiting": 2, "max_tunnels": 2}
    defaults.update(kw)
    return TunnelSettings(**defaults)


def local_connection(factory: Any, port: int = 50000) -> tuple[Any, StringTransport]:
    addr = IPv4Address("TCP", "127.0.0.1", port)
    proto = factory.buildProtocol(addr)
    t = StringTransport(peerAddress=addr)
    proto.makeConnection(t)
    return proto, t


class Env:
    """A tunnel table, cert store, audit log and fakes on one clock."""

    def __init__(self, tc: SynchronousTestCase, **kw: Any):
        self.dir = tc.mktemp()
        os.makedirs(self.dir)
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.audit_path = os.path.join(self.dir, "audit.log")
        self.audit = AuditLog(self.audit_path, self.clock, role="connect")
        tc.addCleanup(self.audit.close)
        self.settings = settings(**kw)
        self.certs = CertStore(os.path.join(self.dir, "certs"), self.clock,
                               lifetime=3600, max_certs=3)
        self.table = TunnelTable(self.settings)
        self.listen = FakeListen()
        self.dials: list[FakeDial] = []

    def tunnel(self, tid: str, spec: TunnelSpec) -> Tunnel:
        dial = FakeDial()
        self.dials.append(dial)
        return Tunnel(tid, spec, clock=self.clock, dial=dial, listen=self.listen,
                      settings=self.settings, audit=self.audit, rand=lambda: 0.0)

    def audit_lines(self) -> list[dict[str, Any]]:
        with open(self.audit_path) as f:
            return [json.loads(line) for line in f]


# ---------------------------------------------------------------- the API

def http(method: str, path: str, *, host: str | None = OWN, token: str | None = TOKEN,
         origin: str | None = None, body: Any = None,
         headers: dict[str, str] | None = None) -> bytes:
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\n"
    if host is not None:
        head += f"Host: {host}\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    if origin is not None:
        head += f"Origin: {origin}\r\n"
    for name, value in (headers or {}).items():
        head += f"{name}: {value}\r\n"
    if raw:
        head += f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
    return head.encode() + b"\r\n" + raw


def answer(t: StringTransport) -> tuple[int, Any]:
    head, _, rest = t.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {n.lower(): v for n, v in (line.split(b": ", 1) for line in lines[1:])}
    body = rest[:int(headers.get(b"content-length", b"0"))]
    return int(lines[0].split()[1]), json.loads(body) if body else None


class ApiTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.env = Env(self)
        self.resource = ConnectResource(
            token=lambda: TOKEN, address=lambda: ("127.0.0.1", PORT), certs=self.env.certs,
            table=self.env.table, make_tunnel=self.env.tunnel, audit=self.env.audit)
        self.site = connect_site(self.resource, reactor=self.env.clock, max_body=65536,
                                 idle_timeout=60, request_timeout=30)

    def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        addr = IPv4Address("TCP", "127.0.0.1", 50123)
        proto = self.site.buildProtocol(addr)
        t = StringTransport(peerAddress=addr)
        proto.makeConnection(t)
        proto.dataReceived(http(method, path, **kw))
        return answer(t)

    def code(self, method: str, path: str, **kw: Any) -> tuple[int, str]:
        status, body = self.call(method, path, **kw)
        return status, body["error"]["code"]


class AdmissionTests(ApiTestCase):
    """Only a request for 127.0.0.1:PORT, from no web page but connect's own,
    with the token, is served; each refusal is audited without the token."""

    def test_token_required(self) -> None:
        self.assertEqual(self.call("GET", "/v1/tunnels"), (200, {"tunnels": []}))
        self.assertEqual(self.code("GET", "/v1/tunnels", token=None), (401, "unauthorized"))
        self.assertEqual(self.code("GET", "/v1/tunnels", token=TOKEN + "x"),
                         (401, "unauthorized"))
        self.assertEqual(self.code("POST", "/v1/certs", token="é"), (401, "unauthorized"))
        self.assertEqual(len(self.env.certs), 0)

    def test_host_must_be_the_loopback_listener(self) -> None:
        for host in ("evil.example", f"evil.example:{PORT}", f"localhost:{PORT}",
                     "127.0.0.1", f"127.0.0.1:{PORT + 1}", f"[::1]:{PORT}", ""):
            self.assertEqual(self.code("GET", "/v1/tunnels", host=host), (403, "bad-host"),
                             host)
        self.assertEqual(self.code("GET", "/v1/tunnels", host=None), (403, "bad-host"))

    def test_origin_of_another_page_refused(self) -> None:
        for origin in ("http://evil.example", "null", f"https://{OWN}",
                       f"http://localhost:{PORT}", f"http://{OWN}.evil"):
            self.assertEqual(self.code("POST", "/v1/certs", origin=origin),
                             (403, "bad-origin"), origin)
        self.assertEqual(len(self.env.certs), 0)
        status, _ = self.call("POST", "/v1/certs", origin=f"http://{OWN}")
        self.assertEqual(status, 201)

    def test_refusals_audited_without_token(self) -> None:
        self.code("GET", "/v1/tunnels", token="wrong-token-value")
        self.code("GET", "/v1/tunnels", host="evil.example")
        lines = self.env.audit_lines()
        self.assertEqual([(r["event"], r["reason"]) for r in lines],
                         [("api-refused", "unauthorized"), ("api-refused", "bad-host")])
        with open(self.env.audit_path) as f:
            text = f.read()
        self.assertNotIn("wrong-token-value", text)
        self.assertNotIn(TOKEN, text)

    def test_not_listening_yet(self) -> None:
        self.resource.admission._address = lambda: None
        self.assertEqual(self.code("GET", "/v1/tunnels"), (503, "not-ready"))


class CertApiTests(ApiTestCase):
    def test_create_cert(self) -> None:
        status, body = self.call("POST", "/v1/certs")
        self.assertEqual(status, 201)
        self.assertEqual(set(body), {"id", "cert", "fingerprint", "expires"})
        cert = x509.load_pem_x509_certificate(body["cert"].encode())
        self.assertEqual(body["fingerprint"],
                         fingerprint_der(cert.public_bytes(serialization.Encoding.DER)))
        key_path = os.path.join(self.env.certs.dir, body["id"] + ".key")
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.env.certs.dir).st_mode), 0o700)
        self.assertNotIn("PRIVATE", json.dumps(body))
        with open(self.env.audit_path) as f:
            self.assertNotIn("PRIVATE", f.read())

    def test_oldest_unused_cert_makes_room(self) -> None:
        ids = [self.call("POST", "/v1/certs")[1]["id"] for _ in range(3)]
        self.env.clock.advance(1)
        self.call("POST", "/v1/certs")
        self.assertEqual(len(self.env.certs), 3)
        # the three oldest share an expiry; one of them made room
        self.assertEqual(sum(1 for i in ids if i in self.env.certs._certs), 2)

    def test_certs_survive_a_restart(self) -> None:
        _, body = self.call("POST", "/v1/certs")
        again = CertStore(self.env.certs.dir, self.env.clock, lifetime=3600, max_certs=3)
        self.assertEqual(again.get(body["id"]).fingerprint, body["fingerprint"])
        self.env.clock.advance(3601)
        again = CertStore(self.env.certs.dir, self.env.clock, lifetime=3600, max_certs=3)
        self.assertEqual(len(again), 0)
        self.assertFalse(os.path.exists(os.path.join(again.dir, body["id"] + ".key")))


class TunnelApiTests(ApiTestCase):
    def open_body(self, **kw: Any) -> dict[str, Any]:
        cert = self.call("POST", "/v1/certs")[1]["id"]
        body = {"vm": "vm-0123456789abcdef", "name": "labvm", "proxy_host": "127.0.0.1",
                "proxy_port": 6001, "cert": cert, "fingerprint": FP,
                "forwards": [{"remote": 8080, "local": 0}, {"remote": 2022, "local": 4022}]}
        body.update(kw)
        return body

    def test_open_list_close(self) -> None:
        status, body = self.call("POST", "/v1/tunnels", body=self.open_body())
        self.assertEqual(status, 201)
        t = body["tunnel"]
        self.assertEqual(t["forwards"], [{"remote": 8080, "local": 41001},
                                         {"remote": 2022, "local": 4022}])
        self.assertEqual((t["state"], t["name"], t["proxy"]),
                         ("connecting", "labvm", "127.0.0.1:6001"))
        self.assertEqual(len(self.env.dials[0].attempts), 1)
        link = self.env.dials[0].up()

        # one local connection becomes one stream; bytes are counted
        factory = self.env.listen.ports[0][1]
        local, lt = local_connection(factory)
        self.assertEqual([p for p, _, _ in link.opens], [8080])
        stream, st = link.accept()
        local.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        stream.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nhello")
        self.assertEqual(st.value(), b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(lt.value(), b"HTTP/1.0 200 OK\r\n\r\nhello")
        status, listed = self.call("GET", "/v1/tunnels")
        [t] = listed["tunnels"]
        self.assertEqual((t["state"], t["streams"], t["bytes_out"], t["bytes_in"]),
                         ("up", 1, 18, 24))

        status, closed = self.call("DELETE", f"/v1/tunnels/{t['id']}")
        self.assertEqual((status, closed["tunnel"]["state"]), (200, "closed"))
        self.assertEqual([p.listening for p, _ in self.env.listen.ports], [False, False])
        self.assertEqual(link.closed_with, "normal")
        self.assertTrue(lt.disconnecting or lt.disconnected)
        self.assertEqual(self.call("GET", "/v1/tunnels"), (200, {"tunnels": []}))
        self.assertEqual(self.code("DELETE", f"/v1/tunnels/{t['id']}"), (404, "not-found"))
        events = [r["event"] for r in self.env.audit_lines()]
        self.assertEqual(events, ["cert-created", "tunnel-opened", "tunnel-up",
                                  "tunnel-closed"])

    def test_bad_requests(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"forwards": []}, "invalid-field"),
            ({"forwards": [{"remote": 0}]}, "invalid-field"),
            ({"forwards": [{"remote": 80, "local": 70000}]}, "invalid-field"),
            ({"forwards": [{"remote": 80}, {"remote": 80}]}, "invalid-field"),
            ({"forwards": [{"remote": True}]}, "invalid-field"),
            ({"forwards": [{"remote": 80, "extra": 1}]}, "invalid-field"),
            ({"forwards": ["80"]}, "invalid-field"),
            ({"fingerprint": "sha256:XY"}, "invalid-field"),
            ({"proxy_port": 0}, "invalid-field"),
            ({"vm": "a b"}, "invalid-field"),
            ({"extra": 1}, "unknown-field"),
        ]
        for change, code in cases:
            self.assertEqual(self.code("POST", "/v1/tunnels", body=self.open_body(**change)),
                             (400, code), change)
        self.assertEqual(self.code("POST", "/v1/tunnels", body=self.open_body(cert="cnope")),
                         (404, "no-such-cert"))
        self.assertEqual(self.env.table.tunnels, {})

    def test_tunnel_cap(self) -> None:
        for _ in range(2):
            self.assertEqual(self.call("POST", "/v1/tunnels", body=self.open_body())[0], 201)
        self.assertEqual(self.code("POST", "/v1/tunnels", body=self.open_body()),
                         (409, "too-many-tunnels"))

    def test_busy_local_port_opens_nothing(self) -> None:
        self.env.listen.busy.add(4022)
        status, body = self.call("POST", "/v1/tunnels", body=self.open_body())
        self.assertEqual((status, body["error"]["code"]), (409, "cannot-listen"))
        self.assertIn("127.0.0.1:4022", body["error"]["message"])
        self.assertEqual([p.listening for p, _ in self.env.listen.ports], [False])
        self.assertEqual(self.env.table.tunnels, {})
        self.assertEqual(self.env.dials[0].attempts, [])

    def test_wait_reports_first_failure_and_closes(self) -> None:
        addr = IPv4Address("TCP", "127.0.0.1", 50123)
        proto = self.site.buildProtocol(addr)
        t = StringTransport(peerAddress=addr)
        proto.makeConnection(t)
        proto.dataReceived(http("POST", "/v1/tunnels", body=self.open_body(wait=True)))
        self.assertEqual(t.value(), b"")  # waiting for the first attempt
        self.env.dials[0].attempts[0].errback(TunnelError("tls-failed", "pin mismatch"))
        status, body = answer(t)
        self.assertEqual((status, body["error"]["code"]), (502, "tunnel-failed"))
        self.assertIn("pin mismatch", body["error"]["message"])
        self.assertEqual(self.env.table.tunnels, {})
        self.assertFalse(any(p.listening for p, _ in self.env.listen.ports))
        self.env.clock.advance(60)  # no reconnection of a closed tunnel
        self.assertEqual(len(self.env.dials[0].attempts), 1)


# ---------------------------------------------------------------- a tunnel

class TunnelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.env = Env(self)
        cert = self.env.certs.create()
        self.spec = TunnelSpec("vm-1", "127.0.0.1", 6001, cert.id, FP, (Forward(8080, 0),))
        self.tunnel = self.env.tunnel("t1", self.spec)
        self.successResultOf(defer.ensureDeferred(self.tunnel.start()))
        self.dial = self.env.dials[0]
        self.factory = self.env.listen.ports[0][1]

    def test_connection_while_down_waits_for_the_link(self) -> None:
        _, lt = local_connection(self.factory)
        self.assertEqual(lt.producerState, "paused")
        link = self.dial.up()
        self.assertEqual([p for p, _, _ in link.opens], [8080])
        link.accept()
        self.assertEqual(lt.producerState, "producing")

    def test_waiting_connection_closed_after_connect_timeout(self) -> None:
        _, lt = local_connection(self.factory)
        self.env.clock.advance(5)
        self.assertTrue(lt.disconnecting or lt.disconnected)
        self.assertEqual(self.tunnel._waiting, [])
        link = self.dial.up()
        self.assertEqual(link.opens, [])

    def test_waiting_is_bounded(self) -> None:
        waiting = [local_connection(self.factory)[1] for _ in range(2)]
        _, third = local_connection(self.factory)
        self.assertTrue(third.disconnecting or third.disconnected)
        self.assertFalse(any(t.disconnecting for t in waiting))

    def test_reconnects_with_backoff_and_keeps_listening(self) -> None:
        link = self.dial.up()
        self.assertEqual(self.tunnel.state, "up")
        link.drop("connection lost")
        self.assertEqual(self.tunnel.state, "down")
        self.assertTrue(self.env.listen.ports[0][0].listening)
        self.env.clock.advance(0.49)  # rand 0: half the initial delay
        self.assertEqual(len(self.dial.attempts), 1)
        self.env.clock.advance(0.01)
        self.assertEqual(len(self.dial.attempts), 2)
        self.dial.attempts[-1].errback(TunnelError("unreachable", "refused"))
        self.assertEqual(self.tunnel.last_error, "refused")
        self.env.clock.advance(0.99)
        self.assertEqual(len(self.dial.attempts), 2)
        self.env.clock.advance(0.01)  # doubled
        self.assertEqual(len(self.dial.attempts), 3)
        self.dial.up()
        self.assertEqual((self.tunnel.state, self.tunnel.connects), ("up", 2))
        events = [r["event"] for r in self.env.audit_lines()]
        self.assertEqual(events, ["tunnel-up", "tunnel-down", "tunnel-up"])

    def test_streams_of_a_dropped_link_are_not_reopened(self) -> None:
        link = self.dial.up()
        _, lt = local_connection(self.factory)
        stream, st = link.accept()
        link.drop("gone")
        stream.connectionLost(protocol.connectionDone)  # the mux ends its streams
        self.assertTrue(lt.disconnecting or lt.disconnected)

    def test_close_stops_everything(self) -> None:
        _, lt = local_connection(self.factory)
        self.successResultOf(defer.ensureDeferred(self.tunnel.close()))
        self.assertFalse(self.env.listen.ports[0][0].listening)
        self.assertTrue(lt.disconnecting or lt.disconnected)
        self.assertTrue(self.dial.attempts[0].called)  # the attempt was cancelled
        self.env.clock.advance(100)
        self.assertEqual(len(self.dial.attempts), 1)

    def test_close_while_up_closes_link(self) -> None:
        link = self.dial.up()
        self.successResultOf(defer.ensureDeferred(self.tunnel.close()))
        self.assertEqual(link.closed_with, "normal")
        self.env.clock.advance(100)
        self.assertEqual(len(self.dial.attempts), 1)


# ---------------------------------------------------------------- pinned TLS

class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class _Client(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


class PinnedTlsTests(SynchronousTestCase):
    """The client presents its certificate and accepts only the pinned one."""

    def setUp(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        self.store = CertStore(os.path.join(d, "certs"), task.Clock(), lifetime=3600,
                               max_certs=4)
        self.client_cert = self.store.create()
        # vmc's self-signed server certificate (a second store's, for a key + cert)
        other = CertStore(os.path.join(d, "server"), task.Clock(), lifetime=3600, max_certs=4)
        self.server_cert = other.create()
        self.ca = (os.path.join(d, "ca.pem"), os.path.join(d, "ca.key"))
        tlsutil.make_ca(*self.ca)

    def server_options(self, cert: Any) -> CertificateOptions:
        from OpenSSL import crypto

        with open(cert.key_path, "rb") as f:
            key = crypto.load_privatekey(crypto.FILETYPE_PEM, f.read())
        x = crypto.load_certificate(crypto.FILETYPE_PEM, cert.cert_pem)
        options = CertificateOptions(privateKey=key, certificate=x)
        # like vmc: a client certificate is required (any, here: the test
        # looks at which one came)
        options.getContext().set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *_: True)
        return options

    def handshake(self, server_cert: Any, pin: str) -> tuple[_Client, Any]:
        server_proto: list[Any] = []

        def build_server() -> _Echo:
            p = _Echo()
            server_proto.append(p)
            return p

        clock = task.Clock()
        server = TLSMemoryBIOFactory(self.server_options(server_cert), False,
                                     protocol.Factory.forProtocol(build_server), clock)
        client_proto = _Client()
        client = TLSMemoryBIOFactory(pinned_client(self.client_cert, pin), True,
                                     protocol.Factory.forProtocol(lambda: client_proto),
                                     clock)
        c, s, pump = iosim.connectedServerAndClient(
            lambda: server.buildProtocol(None), lambda: client.buildProtocol(None),
            clock=clock)
        assert client_proto.transport is not None
        client_proto.transport.write(b"ping")
        for _ in range(5):
            pump.flush()
            clock.advance(0)
        return client_proto, s

    def test_pinned_server_accepted_and_client_cert_presented(self) -> None:
        client, server = self.handshake(self.server_cert, self.server_cert.fingerprint)
        self.assertEqual(client.data, b"ping")
        peer = server.getPeerCertificate()
        from OpenSSL import crypto

        self.assertEqual(fingerprint_der(crypto.dump_certificate(crypto.FILETYPE_ASN1, peer)),
                         self.client_cert.fingerprint)

    def test_other_certificate_refused(self) -> None:
        client, _ = self.handshake(self.server_cert, "sha256:" + "00" * 32)
        self.assertEqual(client.data, b"")
        self.assertIsNotNone(client.lost)

    def test_ca_signed_certificate_refused(self) -> None:
        d = os.path.dirname(self.ca[0])
        pem = os.path.join(d, "server.pem")
        tlsutil.make_server_cert(*self.ca, pem)
        with open(pem, "rb") as f:
            raw = f.read()

        class Cert:
            key_path = pem
            cert_pem = raw

        client, _ = self.handshake(Cert(), self.server_cert.fingerprint)
        self.assertEqual(client.data, b"")

    def test_malformed_pin(self) -> None:
        self.assertRaises(ValueError, pinned_client, self.client_cert, "sha1:abc")


# ---------------------------------------------------------------- config

class ConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "connect.ini")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_defaults(self) -> None:
        cfg = load_config(self.write("[connect]\n"), ConnectConfig)
        self.assertEqual(cfg.connect.listen, "tcp:7480:interface=127.0.0.1")
        self.assertTrue(cfg.connect.token_file.endswith("connect-state/api.token"))
        self.assertEqual(cfg.tunnels.max_tunnels, 32)

    def test_api_only_on_loopback(self) -> None:
        for listen in ("tcp:7480", "tcp:7480:interface=0.0.0.0", "ssl:7480:interface=127.0.0.1",
                       "tcp:7480:interface=10.0.0.1"):
            path = self.write(f"[connect]\nlisten = {listen}\n")
            e = self.assertRaises(ConfigError, load_config, path, ConnectConfig)
            self.assertEqual((e.section, e.key), ("connect", "listen"), listen)
