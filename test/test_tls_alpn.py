"""Every TLS listener completes handshakes with and without ALPN
(CONVENTIONS.md, "Lessons"): ``http/1.1`` is selected when offered, and a
client that offers only protocols we do not speak (``h2``) gets a handshake
without ALPN rather than a fatal ``internal_error`` alert.

In memory through :class:`ListenerService` (which applies the policy to every
listener of every role), then with real ``curl`` and Python's ``ssl`` against
real ``twistd`` rest and proxy daemons.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
from typing import Any

from twisted.internet import endpoints, protocol
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from test import proxyfixture as pf
from test.daemon import Daemon, run_command, start_daemon
from test.restfixture import RestEnv, start_rest
from ticrypt import tlsutil
from ticrypt.service import ListenerService

#: what each client offers, and what the server must select
CASES: list[tuple[list[bytes] | None, bytes | None]] = [
    (None, None),
    ([b"h2", b"http/1.1"], b"http/1.1"),
    ([b"http/1.1"], b"http/1.1"),
    ([b"h2"], None),
]


@implementer(IHandshakeListener)
class _Handshaken(protocol.Protocol):
    def __init__(self) -> None:
        self.done = False
        self.lost: Any = None

    def handshakeCompleted(self) -> None:
        self.done = True

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        self.lost = reason


class _Built(protocol.Factory):
    """Keeps the protocols it builds (TLS drops its reference on a failure)."""

    def __init__(self) -> None:
        self.built: list[_Handshaken] = []

    def buildProtocol(self, addr: Any) -> _Handshaken:
        proto = _Handshaken()
        proto.factory = self
        self.built.append(proto)
        return proto


class ListenerAlpnTests(SynchronousTestCase):
    """The TLS context of a ListenerService's endpoint, handshaken in memory
    against Twisted's TLS client offering each ALPN list."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca, self.pem = pf.make_tls(self.dir)

    def listener_creator(self) -> Any:
        endpoint = endpoints.serverFromString(MemoryReactor(),
                                              tlsutil.server_endpoint(0, self.pem))
        listener = ListenerService("test", endpoint, protocol.Factory())
        return listener.endpoint._sslContextFactory

    def handshake(self, creator: Any, offered: list[bytes] | None
                  ) -> tuple[_Handshaken, _Handshaken, Any]:
        """(client, server, client TLS protocol) after the exchange settled."""
        with open(self.ca) as f:
            root = tssl.Certificate.loadPEM(f.read())
        client_creator = tssl.optionsForClientTLS("127.0.0.1", trustRoot=root,
                                                  acceptableProtocols=offered)
        server_apps, client_apps = _Built(), _Built()
        servers = TLSMemoryBIOFactory(creator, False, server_apps)
        clients = TLSMemoryBIOFactory(client_creator, True, client_apps)
        client, server, pump = iosim.connectedServerAndClient(
            lambda: servers.buildProtocol(None), lambda: clients.buildProtocol(None))
        pump.flush()
        return client_apps.built[0], server_apps.built[0], client

    def test_every_offer_completes(self) -> None:
        creator = self.listener_creator()
        for offered, selected in CASES:
            client, server, tls = self.handshake(creator, offered)
            self.assertTrue(client.done, f"offer {offered}: handshake failed: {client.lost}")
            self.assertTrue(server.done, f"offer {offered}")
            self.assertIsNone(client.lost, f"offer {offered}")
            self.assertEqual(tls.negotiatedProtocol, selected, f"offer {offered}")

    def test_select_alpn(self) -> None:
        from OpenSSL import SSL

        conn: Any = None
        self.assertEqual(tlsutil.select_alpn(conn, [b"h2", b"http/1.1"]), b"http/1.1")
        self.assertIs(tlsutil.select_alpn(conn, [b"h2"]), SSL.NO_OVERLAPPING_PROTOCOLS)
        self.assertIs(tlsutil.select_alpn(conn, []), SSL.NO_OVERLAPPING_PROTOCOLS)

    def test_plain_endpoint_unchanged(self) -> None:
        endpoint = endpoints.serverFromString(MemoryReactor(), "tcp:0:interface=127.0.0.1")
        self.assertIs(tlsutil.alpn_http11(endpoint), endpoint)
        self.assertIsNone(tlsutil.server_context(endpoint))


def _curl() -> str:
    path = shutil.which("curl")
    if path is None:
        raise SkipTest("curl is not installed")
    return path


class DaemonAlpnTests(TestCase):
    """Real curl and Python ssl against real ticrypt-rest and ticrypt-proxy
    (the proxy with both its wss and its status listener on TLS)."""

    timeout = 120

    async def curl(self, ca: str, url: str, *extra: str) -> tuple[str, str]:
        """Run curl; returns (HTTP status, verbose log).  Fails on a TLS error."""
        code, out, err = await run_command(
            [_curl(), "-sS", "-v", "--max-time", "20", "--cacert", ca, "-o", "/dev/null",
             "-w", "%{http_code}", *extra, url], timeout=60)
        self.assertEqual(code, 0, f"curl {' '.join(extra)} {url} failed ({code}):\n{err}")
        return out.strip(), err

    async def check_curl(self, ca: str, url: str, status: str) -> None:
        got, log = await self.curl(ca, url)
        self.assertIn("ALPN: offers h2,http/1.1", log)  # curl's default offer
        self.assertIn("ALPN: server accepted http/1.1", log)
        self.assertEqual(got, status)
        got, log = await self.curl(ca, url, "--no-alpn")
        self.assertNotIn("ALPN: offers", log)
        self.assertEqual(got, status)

    def check_python_ssl(self, ca: str, port: int) -> None:
        for offered, selected in CASES:
            ctx = ssl.create_default_context(cafile=ca)
            if offered is not None:
                ctx.set_alpn_protocols([p.decode() for p in offered])
            # blocking is fine: the server is another process
            with socket.create_connection(("127.0.0.1", port), timeout=20) as sock, \
                    ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                self.assertEqual(tls.selected_alpn_protocol(),
                                 selected.decode() if selected else None, f"offer {offered}")

    async def start_proxy(self, rest: RestEnv) -> Daemon:
        backend = pf.Backend(rest.dir)
        listen = tlsutil.server_endpoint(0, rest.server_pem)
        config = pf.write_proxy_config(rest.dir, backend, listen=listen, status_listen=listen)
        return await start_daemon(self, "ticrypt-proxy", config)

    async def test_rest(self) -> None:
        rest = await start_rest(self)
        _, port = rest.daemon.address("https")  # type: ignore[union-attr]
        await self.check_curl(rest.ca_file, f"https://127.0.0.1:{port}/v1/backend", "200")
        self.check_python_ssl(rest.ca_file, port)

    async def test_proxy(self) -> None:
        rest = await start_rest(self, start=False)
        proxy = await self.start_proxy(rest)
        _, port = proxy.address("proxy")
        # a plain GET is no websocket upgrade: any HTTP answer means TLS completed
        got, _ = await self.curl(rest.ca_file, f"https://127.0.0.1:{port}/v1/vm")
        self.assertNotEqual(got, "000")
        await self.check_curl(rest.ca_file, f"https://127.0.0.1:{port}/v1/vm", got)
        self.check_python_ssl(rest.ca_file, port)
        # and a websocket over that listener still works
        client = await pf.open_ws(_reactor(), port, "/v1/vm", rest.ca_file)
        challenge = await client.next_json()
        self.assertEqual(challenge["type"], "challenge")
        client.sendClose()
        await client.closed

    async def test_proxy_status_listener(self) -> None:
        rest = await start_rest(self, start=False)
        proxy = await self.start_proxy(rest)
        _, port = proxy.address("status")
        await self.check_curl(rest.ca_file, f"https://127.0.0.1:{port}/v1/status", "200")
        self.check_python_ssl(rest.ca_file, port)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor
