"""The proxy, a VM's controller and users' frontends joined in memory, on
one clock: the real protocol objects of all three (the proxy's
:class:`~ticrypt.proxy.ws.RelayFactory`, vmc's
:class:`~ticrypt.vmc.pool.ProxyPool` and the frontend's
:func:`~ticrypt.frontend.session.open_session`), real TLS (pyOpenSSL over
:class:`~twisted.protocols.tls.TLSMemoryBIOFactory`, the deployment's own
CA), real websockets (autobahn), no socket and no process::

    trio = MemTrio.build(self)                 # self: a SynchronousTestCase
    owner = trio.session("owen")               # pumped until established
    result = trio.wait(owner.info())           # an awaitable, pumped to its end
    trio.advance(3600)                         # time passes for every timer

What a process alone shows (start-up, signals, child reaping, the PTY,
kill -9 durability, memory bounds) stays in the tests that start twistd.

The network is :class:`MemNetReactor`: a :class:`MemoryReactorClock` whose
``listenTCP`` ports are reachable by its ``connectTCP``/``HostnameEndpoint``
clients (IP literals only), each connection an :class:`iosim.IOPump`; with
``tap=True`` the bytes of every connection are recorded (the wire test
reads what the proxy would relay).  autobahn's own timers (opening and
closing handshakes, pings) use txaio's loop, and TLS batches small writes
to a turn of the default clock: both are this clock for the test's
duration.
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable
from typing import Any, TypeVar

import attrs
import txaio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, ssl
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IReactorPluggableNameResolver, IReactorProcess
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import tls
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from test.vmcfixture import read_json_lines
from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.config import load_config
from ticrypt.frontend.session import ChannelSession, open_session
from ticrypt.lab.deploy import Deployment
from ticrypt.proxy.config import ProxyConfig
from ticrypt.proxy.tap import make_factory
from ticrypt.vmc.pool import LinkSettings, PoolSettings, ProxyPool, SessionLimits
from ticrypt.vmc.processes import RunAs
from ticrypt.vmc.state import Enrollment, VmState

_T = TypeVar("_T")

PROXY_PORT = 443
#: A pump that never goes quiet is a bug in the code under test, not a wait.
MAX_ROUNDS = 10000


@implementer(IReactorPluggableNameResolver, IReactorProcess)
class MemNetReactor(MemoryReactorClock):
    """A memory reactor whose clients reach its listeners (see module doc)."""

    def __init__(self, tap: bool = False) -> None:
        super().__init__()
        self.nameResolver = self  # type: ignore[assignment]
        self.pumps: list[iosim.IOPump] = []
        #: with ``tap``: per connection, [client->server bytes, server->client bytes]
        self.taps: list[tuple[bytearray, bytearray]] = []
        self._tap = tap

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("no processes in memory: such tests start twistd")

    def installNameResolver(self, resolver: Any) -> Any:
        raise NotImplementedError("the memory network resolves IP literals only")

    # IHostnameResolver: IP literals resolve to themselves, at once
    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0,
                        addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
        receiver.resolutionBegan(None)
        receiver.addressResolved(IPv4Address("TCP", hostName, portNumber))
        receiver.resolutionComplete()
        return receiver

    def _complete(self) -> bool:
        """Join every pending client to the listener on its port."""
        joined = False
        while self.tcpClients:
            host, port, client_factory, _timeout, _bind = self.tcpClients.pop(0)
            connector = self.connectors.pop(0)
            servers = [s for s in self.tcpServers if s[0] == port]
            if not servers:
                client_factory.clientConnectionFailed(
                    connector, Failure(ConnectionRefusedError()))
                continue
            server_factory = servers[-1][1]
            peer = IPv4Address("TCP", "127.0.0.1", 40000 + len(self.pumps))
            host_addr = IPv4Address("TCP", host, port)
            server = server_factory.buildProtocol(peer)
            client = client_factory.buildProtocol(host_addr)
            server_io = iosim.FakeTransport(server, True, host_addr, peer)
            client_io = iosim.FakeTransport(client, False, peer, host_addr)
            if self._tap:
                up, down = bytearray(), bytearray()
                self.taps.append((up, down))
                _record(client_io, up)
                _record(server_io, down)
            self.pumps.append(iosim.connect(server, server_io, client, client_io,
                                            greet=False, clock=None))
            joined = True
        return joined

    def deliver(self) -> None:
        """Move bytes (and start connections) until nothing moves."""
        for _ in range(MAX_ROUNDS):
            due = [c for c in self.getDelayedCalls() if c.getTime() <= self.seconds()]
            self.advance(0)
            moved = self._complete() or bool(due)
            for p in list(self.pumps):
                if p.pump(advanceClock=False):
                    moved = True
                if p.clientIO.disconnected and p.serverIO.disconnected:
                    self.pumps.remove(p)
            if not moved:
                return
        raise AssertionError("the memory network never went quiet")


def _record(transport: iosim.FakeTransport, into: bytearray) -> None:
    write = transport.write

    def tapped(data: bytes) -> None:
        into.extend(data)
        write(data)
    transport.write = tapped  # type: ignore[method-assign]


@attrs.define
class MemTrio:
    """One deployment's files, a proxy, one enrolled VM's controller
    (``vm1``, owned by ``owen``), and users ``owen`` and ``bob``."""

    test: SynchronousTestCase
    reactor: MemNetReactor
    deployment: Deployment
    proxy: Any
    pool: ProxyPool
    state: VmState
    vm_id: str
    keys: dict[str, Ed25519PrivateKey]
    vmc_audit_path: str
    proxy_url: str

    @classmethod
    def build(cls, test: SynchronousTestCase, *, plain: bool = False, pool_size: int = 2,
              limits: dict[str, str] | None = None, links: dict[str, Any] | None = None,
              sessions: dict[str, Any] | None = None) -> MemTrio:
        """``limits`` go to the proxy's ``[limits]``; ``links`` and
        ``sessions`` are :class:`LinkSettings`/:class:`SessionLimits` fields.
        ``plain``: websockets without TLS, every connection's bytes recorded
        in ``reactor.taps`` (what the proxy reads and writes)."""
        reactor = MemNetReactor(tap=plain)
        test.patch(txaio.config, "loop", reactor)  # type: ignore[attr-defined]
        # TLS batches small writes to the next reactor turn: this clock's
        test.patch(tls, "_get_default_clock", lambda: reactor)
        d = Deployment(test.mktemp())
        ca_file, server_pem = d.ca()
        backend = d.backend()
        backend.clock = reactor.seconds
        cfg = load_config(d.proxy_ini(limits=limits or {}, rest_url="off",
                                      revocation_feed_secret=None, ca_file=None),
                          ProxyConfig)
        proxy = make_factory(cfg, reactor)
        listener: Any = proxy
        if not plain:
            with open(server_pem, "rb") as f:
                server_options = ssl.PrivateCertificate.loadPEM(f.read()).options()
            listener = TLSMemoryBIOFactory(server_options, False, proxy)
        reactor.listenTCP(PROXY_PORT, listener, interface="127.0.0.1")

        keys = {u: d.user_key(u)[0] for u in ("owen", "bob")}
        state_dir = d.path("vmc-state")
        os.makedirs(state_dir, mode=0o700)
        audit_path = d.path("vmc-audit.log")
        audit = AuditLog(audit_path, reactor, role="vmc")
        state = VmState(state_dir, audit)
        vm_id = "vm-mem-1"
        proxy_url = f"{'ws' if plain else 'wss'}://127.0.0.1:{PROXY_PORT}"
        state.accept_enrollment(Enrollment(
            vm_id=vm_id, owner="owen", owner_public_key=identity.public_bytes(keys["owen"]),
            proxy_url=proxy_url, backend_public_key=backend.public,
            vm_credential=backend.vm_credential(vm_id, state.vm_key)))
        settings = PoolSettings(
            proxy_url=proxy_url, ca_file=ca_file,
            links=LinkSettings(**{"pool_size": pool_size, **(links or {})}),
            sessions=SessionLimits(**(sessions or {})))
        pool = ProxyPool(reactor=reactor, clock=reactor, random=random.Random(1).random,
                         settings=settings, state=state, audit=audit,
                         run_as=RunAs.lookup(None, "/bin/sh"))
        trio = cls(test, reactor, d, proxy, pool, state, vm_id, keys, audit_path, proxy_url)
        trio.backend = backend
        pool.startService()
        trio.pump()
        test.assertTrue(pool.ready.called, "vmc's pool never got a socket waiting")
        test.addCleanup(trio.stop)
        return trio

    backend: Any = None

    def pump(self) -> None:
        self.reactor.deliver()

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass in small steps, moving bytes after each."""
        step = min(seconds, 0.25) or seconds
        left = seconds
        while left > 1e-9:
            self.reactor.advance(min(step, left))
            left -= step
            self.pump()

    def wait(self, awaitable: Awaitable[_T] | defer.Deferred[_T]) -> _T:
        """Pump (advancing the clock when idle) until ``awaitable`` is done;
        its result, or the exception it raised."""
        d = awaitable if isinstance(awaitable, defer.Deferred) \
            else defer.ensureDeferred(awaitable)  # type: ignore[arg-type]
        results: list[Any] = []
        d.addBoth(results.append)
        self.pump()
        for _ in range(4000):  # 1000 s of clock at most
            if results:
                break
            self.advance(0.25)
        if not results:
            raise AssertionError("still waiting after 1000 s of the memory clock")
        result = results[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result  # type: ignore[no-any-return]

    def ticket(self, user: str, **kw: Any) -> str:
        return self.backend.ticket(self.vm_id, user=user, user_key=self.keys[user], **kw)

    def connect(self, user: str, vm_key: bytes | None = None, **kw: Any) -> Any:
        """The awaitable of a session of ``user`` (not waited for)."""
        return open_session(self.reactor, self.proxy_url,
                            self.deployment.ca_file, self.ticket(user), self.keys[user],
                            self.vm_id, vm_key or identity.public_bytes(self.state.vm_key), **kw)

    def session(self, user: str, **kw: Any) -> ChannelSession:
        """An established session of ``user`` (pumped until it is)."""
        result: ChannelSession = self.wait(self.connect(user, **kw))
        return result

    def vmc_audit(self) -> list[dict[str, Any]]:
        return read_json_lines(self.vmc_audit_path)

    def proxy_audit(self) -> list[dict[str, Any]]:
        return read_json_lines(self.deployment.path("proxy_audit"))

    def stop(self) -> None:
        d = self.pool.stopService()
        for _ in range(400):
            if d.called:
                break
            self.advance(0.25)
