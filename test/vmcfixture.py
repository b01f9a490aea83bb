"""A running rest + proxy + vmc trio on 127.0.0.1 for integration tests:
real TLS, a private CA; the proxy and vmc are twistd daemons, rest runs in
the test's process (:class:`~test.restfixture.RestHere`: the daemon's own
service from the same rest.ini, HTTPS on 127.0.0.1) unless the test asks
for its daemon (``start_trio(self, rest_daemon=True)``).  A trial wrapper
over :class:`ticrypt.lab.deploy.Deployment` (which also builds ``ticrypt-lab``).

    trio = await start_trio(self)                 # self: a trial TestCase
    session = await trio.session("owen")          # the VM owner
    cmd = session.exec(["echo", "hi"], stdin=b"")
    status = await cmd.done

Users: ``alice`` (superadmin, from restfixture), ``owen`` (owns the VM) and
``bob`` (a plain user, not authorized on the VM).  Also here:
:class:`CapturingRelay`, a TLS-terminating TCP relay that records every byte
between vmc and the proxy, and :func:`ws_payloads`, which unmasks websocket
frames so a test can search the relayed messages for plaintext.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from test.daemon import Daemon, run_command, script_path, start_daemon, starter
from test.restfixture import RestEnv, RestHere, admin_runner, make_rest_dir, run_ticrypt
from ticrypt import tlsutil
from ticrypt.frontend import clientconfig
from ticrypt.frontend.session import ChannelSession, open_session
from ticrypt.lab.deploy import Addresses, Deployment

#: vmc settings of every test trio: quick reconnects, a shell every box has
VMC_TEST_SETTINGS = {"backoff_initial": "100ms", "backoff_max": "1s",
                     "handshake_timeout": "20s"}


def write_vmc_config(deployment: Deployment, token: str, name: str = "vmc",
                     **overrides: str) -> str:
    """``NAME.ini`` with :data:`VMC_TEST_SETTINGS`; ``exec_KEY`` overrides go
    to ``[exec]``, the others to ``[vmc]``."""
    exec_settings = {"shell": "/bin/sh"}
    settings = dict(VMC_TEST_SETTINGS)
    for k, v in overrides.items():
        if k.startswith("exec_"):
            exec_settings[k[5:]] = v
        else:
            settings[k] = v
    return deployment.vmc_ini(token, name, exec_settings, tunnel_settings=None,
                              sftp_settings=None, **settings)


#: ``ticrypt`` commands :meth:`Trio.cli` runs as the console script
PROCESS_COMMANDS = ("exec", "shell")


def read_json_lines(path: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines audit log ([] before it exists)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@attrs.define
class Trio:
    rest: RestEnv
    proxy: Daemon
    keys: dict[str, Ed25519PrivateKey] = attrs.field(factory=dict)
    vm_id: str = ""
    token: str = ""
    vmc: Daemon | None = None
    vmc_config: str = ""
    vmc_state: str = ""
    vmc_audit: str = ""
    vmc_token_file: str = ""
    deployment: Deployment = attrs.field(init=False)
    dir: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.deployment = self.rest.deployment
        self.dir = self.deployment.dir

    @property
    def proxy_port(self) -> int:
        return self.deployment.addresses.proxy_port

    @property
    def proxy_url(self) -> str:
        return self.deployment.addresses.proxy_url

    # -- users and VMs ----------------------------------------------------

    async def add_user(self, name: str, role: str = "user") -> Ed25519PrivateKey:
        self.keys[name] = await self.deployment.add_user(admin_runner(), name, role)
        return self.keys[name]

    async def add_vm(self, owner: str, name: str = "vm1") -> tuple[str, str]:
        """Create a VM in rest; returns (vm_id, enrollment token)."""
        return await self.deployment.add_vm(admin_runner(), owner, name)

    # -- vmc ---------------------------------------------------------------

    def write_vmc_config(self, token: str, name: str = "vmc", **overrides: str) -> str:
        self.vmc_config = write_vmc_config(self.deployment, token, name, **overrides)
        self.vmc_state = self.deployment.path(f"{name}-state")
        self.vmc_audit = self.deployment.path(f"{name}-audit.log")
        self.vmc_token_file = self.deployment.path(f"{name}-enroll.token")
        return self.vmc_config

    async def start_vmc(self, testcase: TestCase, config: str | None = None) -> Daemon:
        self.vmc = await start_daemon(testcase, "ticrypt-vmc", config or self.vmc_config)
        return self.vmc

    def vmc_audit_lines(self) -> list[dict[str, Any]]:
        return read_json_lines(self.vmc_audit)

    # -- rest (run in this process) ------------------------------------------

    async def stop_rest(self) -> None:
        """Stop rest (not with ``rest_daemon``): its port refuses connections
        until :meth:`start_rest`."""
        assert self.rest.here is not None, "rest is not running in this process"
        await self.rest.here.stop()

    async def start_rest(self, testcase: TestCase) -> RestHere:
        """rest in this process again, on the port it had (the proxy's and
        vmc's configs name it), stopped in ``testcase``'s cleanup."""
        return await self.rest.start_here(testcase)

    # -- proxy ---------------------------------------------------------------

    async def kill_proxy(self) -> None:
        """SIGKILL the proxy (no close frames, like a crash)."""
        await self.proxy.kill()

    async def restart_proxy(self, testcase: TestCase) -> Daemon:
        """Start a new proxy on the same port (after :meth:`kill_proxy`)."""
        self.proxy = await self.deployment.start_proxy(starter(testcase))
        return self.proxy

    def proxy_audit_lines(self) -> list[dict[str, Any]]:
        return read_json_lines(self.deployment.path("proxy_audit"))

    # -- users' side -----------------------------------------------------------

    async def session(self, user: str, vm_id: str | None = None, **kw: Any) -> ChannelSession:
        """Log ``user`` in, get a ticket, open a secure session to the VM."""
        vm_id = vm_id or self.vm_id
        client = self.rest.client()
        await client.login(user, self.keys[user])
        t = await client.ticket(vm_id)
        return await open_session(reactor, t["proxy_url"], self.rest.ca_file, t["ticket"],
                                  self.keys[user], vm_id, t["vm_public_key"], **kw)

    async def client_config(self, user: str) -> str:
        """``user``'s client.ini with a stored session (as after ``ticrypt
        login``), made on the first call."""
        name = f"client-{user}"
        path = self.deployment.path(f"{name}.ini")
        if os.path.exists(path):
            return path
        self.deployment.client_ini(user, name)
        cfg = clientconfig.load(path)
        result = await self.rest.client().login(user, self.keys[user])
        clientconfig.save_session(cfg, result["token"], user, int(result["expires"]))
        return path

    async def cli(self, user: str, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        """Run ``ticrypt --config <user's client.ini> ARGS``: ``exec`` and
        ``shell`` (and anything fed ``stdin``) as the console script, a
        process, which is what they show (stdin piped through, the remote
        exit status as the process's own); the other commands (authorize,
        revoke, users, info...) in this process
        (:func:`~test.restfixture.run_ticrypt`)."""
        path = await self.client_config(user)
        if args[0] in PROCESS_COMMANDS or stdin:
            return await run_command([script_path("ticrypt"), "--config", path, *args],
                                     stdin=stdin)
        return await run_ticrypt(["--config", path, *args])


def _free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports the kernel considers free right now (each
    daemon binds its own next)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


async def start_trio(testcase: TestCase, *, enroll: bool = True,
                     proxy_limits: dict[str, str] | None = None,
                     rest_daemon: bool = False, **vmc_overrides: str) -> Trio:
    """rest + proxy + users owen and bob + a VM owned by owen + its vmc.

    With ``enroll=False`` the VM exists in rest but no vmc is started
    (``trio.token`` holds the enrollment token).

    The database, users and VM are written first, in this process
    (``ticrypt-admin``'s code, :func:`~test.restfixture.admin_runner`).
    rest then runs in this process (``trio.rest.here``, stopped in cleanup
    after the daemons): the tests of a trio are about vmc, the proxy and
    the channel, and both reach rest as they reach the daemon (vmc enrolls
    over HTTPS, the proxy polls the revocation feed with its secret).
    Then the proxy and vmc start at once.  With ``rest_daemon`` rest is a
    twistd daemon too (``trio.rest.daemon``, for a test that stops or kills
    it), and the three start at once on ports chosen beforehand: the proxy
    retries rest's revocation feed and vmc its enrollment until rest
    answers, as after a reboot (:data:`ticrypt.lab.deploy.START_ORDER` is
    the order a deployment needs no retry in).
    """
    rest = make_rest_dir(os.path.abspath(testcase.mktemp()), addresses=Addresses())
    deployment = rest.deployment
    rest.backend_public = await deployment.init(admin_runner(), rest.admin_name)
    trio = Trio(rest=rest, proxy=None)  # type: ignore[arg-type]  # set below
    trio.keys["alice"] = rest.admin_key
    await trio.add_user("owen")
    await trio.add_user("bob")
    trio.vm_id, trio.token = await trio.add_vm("owen")
    a = deployment.addresses
    ports = _free_ports(3 if rest_daemon else 2, a.proxy_host)
    a.proxy_port, a.control_port = ports[:2]
    if rest_daemon:
        a.rest_port = ports[2]  # rest_host is proxy_host: 127.0.0.1
    else:
        await rest.start_here(testcase)  # on a port of its own, which rest_url names
    deployment.proxy_ini(proxy_limits)
    trio.write_vmc_config(trio.token, **vmc_overrides)
    start = starter(testcase)
    started = [defer.ensureDeferred(deployment.start_proxy(start))]
    if rest_daemon:
        started.append(defer.ensureDeferred(deployment.start_rest(start)))
    if enroll:
        started.append(defer.ensureDeferred(trio.start_vmc(testcase)))
    daemons = await defer.gatherResults(started, consumeErrors=True).addErrback(
        lambda f: f.value.subFailure)  # the first daemon that failed, as itself
    trio.proxy = daemons[0]
    if rest_daemon:
        rest.daemon = daemons[1]
    return trio


# -- capture of what crosses the wire -----------------------------------------

class _RelayServer(protocol.Protocol):
    """One vmc connection: TLS terminated here, re-encrypted to the proxy.

    A test tool: it copies without flow control, which is fine for the few
    kilobytes a test sends.
    """

    relay: CapturingRelay

    def connectionMade(self) -> None:
        self.up, self.down = bytearray(), bytearray()
        self.relay.connections.append((self.up, self.down))
        self.peer: _RelayClient | None = None
        self.pending: list[bytes] = []
        self.transport.pauseProducing()  # type: ignore[union-attr]
        client = protocol.ClientFactory()
        client.protocol = _RelayClient  # type: ignore[assignment]
        ep = endpoints.wrapClientTLS(
            tlsutil.client_options("127.0.0.1", self.relay.ca_file),
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.target_port))
        d = ep.connect(client)
        d.addCallbacks(self._connected, lambda f: self.transport.loseConnection())  # type: ignore[union-attr]

    def _connected(self, peer: _RelayClient) -> None:
        self.peer = peer
        peer.server = self
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.up += data
        assert self.peer is not None
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.peer is not None:
            self.peer.transport.loseConnection()  # type: ignore[union-attr]


class _RelayClient(protocol.Protocol):
    server: _RelayServer

    def dataReceived(self, data: bytes) -> None:
        self.server.down += data
        self.server.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.server.transport.loseConnection()  # type: ignore[union-attr]


@attrs.define
class CapturingRelay:
    """Listens with TLS on 127.0.0.1 (the test CA's server certificate) and
    relays to the proxy; ``connections`` holds, per connection, the decrypted
    bytes that went each way (to the proxy, from the proxy): exactly what the
    proxy received and sent."""

    server_pem: str
    ca_file: str
    target_port: int
    connections: list[tuple[bytearray, bytearray]] = attrs.field(factory=list)
    port: int = 0
    _listener: Any = None

    async def start(self, testcase: TestCase) -> CapturingRelay:
        factory = protocol.ServerFactory()
        relay = self

        class Server(_RelayServer):
            pass

        Server.relay = relay
        factory.protocol = Server  # type: ignore[assignment]
        ep = endpoints.serverFromString(reactor, tlsutil.server_endpoint(0, self.server_pem))
        self._listener = await ep.listen(factory)
        self.port = self._listener.getHost().port
        testcase.addCleanup(self._listener.stopListening)
        return self


def ws_payloads(stream: bytes) -> list[bytes]:
    """The (unmasked) payloads of the websocket frames in one direction of a
    captured connection, after its HTTP upgrade exchange."""
    head, sep, rest = bytes(stream).partition(b"\r\n\r\n")
    if not sep:
        return []
    out: list[bytes] = []
    data = rest
    while len(data) >= 2:
        b1 = data[1]
        masked, length, pos = b1 & 0x80, b1 & 0x7F, 2
        if length == 126:
            if len(data) < 4:
                break
            length = struct.unpack(">H", data[2:4])[0]
            pos = 4
        elif length == 127:
            if len(data) < 10:
                break
            length = struct.unpack(">Q", data[2:10])[0]
            pos = 10
        mask = b""
        if masked:
            mask = data[pos:pos + 4]
            pos += 4
        if len(data) < pos + length:
            break
        payload = data[pos:pos + length]
        if masked:
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        out.append(payload)
        data = data[pos + length:]
    return out


def deferred_later(seconds: float) -> defer.Deferred[None]:
    """A Deferred that fires after ``seconds`` (for polling loops with a bound)."""
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d
