"""A running rest + proxy + vmc trio on 127.0.0.1 for integration tests (and
the lab): real twistd daemons, real TLS, a private CA.

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
import struct
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from test.daemon import Daemon, run_command, start_daemon
from test.restfixture import RestEnv, script, start_rest
from ticrypt import identity, tlsutil
from ticrypt.frontend import clientconfig
from ticrypt.frontend.session import ChannelSession, open_session
from ticrypt.lab.cli import free_port


@attrs.define
class Trio:
    rest: RestEnv
    dir: str
    proxy: Daemon
    proxy_port: int
    keys: dict[str, Ed25519PrivateKey] = attrs.field(factory=dict)
    vm_id: str = ""
    token: str = ""
    vmc: Daemon | None = None
    vmc_config: str = ""
    vmc_state: str = ""
    vmc_audit: str = ""

    @property
    def proxy_url(self) -> str:
        return f"wss://127.0.0.1:{self.proxy_port}"

    # -- users and VMs ----------------------------------------------------

    async def add_user(self, name: str, role: str = "user") -> Ed25519PrivateKey:
        key, pub = self.rest.new_user_key(name)
        code, out, err = await self.rest.admin("user", "add", name, "--public-key", pub,
                                               "--role", role)
        if code != 0:
            raise RuntimeError(f"user add {name} failed: {err}{out}")
        self.keys[name] = key
        key_file = os.path.join(self.dir, f"{name}.key")
        if not os.path.exists(key_file):
            identity.save_private(key_file, key)
        return key

    async def add_vm(self, owner: str, name: str = "vm1") -> tuple[str, str]:
        """Create a VM in rest; returns (vm_id, enrollment token)."""
        code, out, err = await self.rest.admin("--json", "vm", "add", name, "--owner", owner,
                                               "--host", "127.0.0.1:2201")
        if code != 0:
            raise RuntimeError(f"vm add failed: {err}{out}")
        result = json.loads(out)
        return result["vm"]["id"], result["enrollment_token"]

    # -- vmc ---------------------------------------------------------------

    def write_vmc_config(self, token: str, name: str = "vmc", **overrides: str) -> str:
        d = os.path.join(self.dir, name)
        os.makedirs(d, mode=0o700, exist_ok=True)
        token_file = os.path.join(d, "enroll.token")
        with open(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(token + "\n")
        settings = {
            "rest_url": self.rest.url, "ca_file": self.rest.ca_file,
            "state_dir": os.path.join(d, "state"), "enrollment_token_file": token_file,
            "audit_log": os.path.join(d, "audit.log"), "backoff_initial": "100ms",
            "backoff_max": "1s", "handshake_timeout": "20s",
        }
        exec_settings = {"shell": "/bin/sh"}
        for k, v in overrides.items():
            if k.startswith("exec_"):
                exec_settings[k[5:]] = v
            else:
                settings[k] = v
        lines = ["[vmc]"] + [f"{k} = {v}" for k, v in settings.items()]
        lines += ["", "[exec]"] + [f"{k} = {v}" for k, v in exec_settings.items()]
        path = os.path.join(d, "vmc.ini")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.vmc_config, self.vmc_state = path, settings["state_dir"]
        self.vmc_audit = settings["audit_log"]
        return path

    async def start_vmc(self, testcase: TestCase, config: str | None = None) -> Daemon:
        self.vmc = await start_daemon(testcase, "ticrypt-vmc", config or self.vmc_config)
        return self.vmc

    def vmc_audit_lines(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.vmc_audit):
            return []
        with open(self.vmc_audit) as f:
            return [json.loads(line) for line in f if line.strip()]

    # -- proxy ---------------------------------------------------------------

    async def kill_proxy(self) -> None:
        """SIGKILL the proxy (no close frames, like a crash)."""
        await self.proxy.kill()

    async def restart_proxy(self, testcase: TestCase) -> Daemon:
        """Start a new proxy on the same port (after :meth:`kill_proxy`)."""
        self.proxy = await start_daemon(testcase, "ticrypt-proxy",
                                        _proxy_config(self.dir, self.rest, self.proxy_port,
                                                      self.rest.url))
        return self.proxy

    def proxy_audit_lines(self) -> list[dict[str, Any]]:
        path = os.path.join(self.dir, "proxy", "audit.log")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

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
        """A client.ini for ``user`` with a stored session (as after ``ticrypt login``)."""
        d = os.path.join(self.dir, f"client-{user}")
        os.makedirs(d, mode=0o700, exist_ok=True)
        path = os.path.join(d, "client.ini")
        with open(path, "w") as f:
            f.write(f"[client]\nrest_url = {self.rest.url}\nca_file = {self.rest.ca_file}\n"
                    f"key_file = {os.path.join(self.dir, user + '.key')}\nuser = {user}\n"
                    f"state_dir = {os.path.join(d, 'state')}\n")
        cfg = clientconfig.load(path)
        client = self.rest.client()
        result = await client.login(user, self.keys[user])
        clientconfig.save_session(cfg, result["token"], user, int(result["expires"]))
        return path

    async def cli(self, user: str, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
        """Run ``ticrypt --config <user's client.ini> ARGS``."""
        path = os.path.join(self.dir, f"client-{user}", "client.ini")
        if not os.path.exists(path):
            path = await self.client_config(user)
        return await run_command([script("ticrypt"), "--config", path, *args], stdin=stdin)


def _proxy_config(directory: str, rest: RestEnv, port: int, rest_url: str,
                  **limits: str) -> str:
    d = os.path.join(directory, "proxy")
    os.makedirs(d, mode=0o700, exist_ok=True)
    lines = ["[proxy]", f"listen = {tlsutil.server_endpoint(port, rest.server_pem)}",
             f"backend_public_key = {os.path.join(rest.dir, 'backend.pub')}",
             f"audit_log = {os.path.join(d, 'audit.log')}",
             f"rest_url = {rest_url}", f"ca_file = {rest.ca_file}",
             f"revocation_feed_secret = {rest.feed_secret_file}", "", "[limits]"]
    lines += [f"{k} = {v}" for k, v in limits.items()]
    path = os.path.join(d, "proxy.ini")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


async def start_trio(testcase: TestCase, *, enroll: bool = True,
                     proxy_limits: dict[str, str] | None = None,
                     **vmc_overrides: str) -> Trio:
    """rest + proxy + users owen and bob + a VM owned by owen + its vmc.

    With ``enroll=False`` the VM exists in rest but no vmc is started
    (``trio.token`` holds the enrollment token).
    """
    rest = await start_rest(testcase, start=False)
    directory = rest.dir
    # rest needs the proxy's URL and the proxy rest's (for the revocation
    # feed): rest gets a port free now, the proxy polls it until it is up
    rest_port = free_port()
    rest.write_config(listen=tlsutil.server_endpoint(rest_port, rest.server_pem))
    proxy = await start_daemon(testcase, "ticrypt-proxy",
                               _proxy_config(directory, rest, 0,
                                             f"https://127.0.0.1:{rest_port}",
                                             **(proxy_limits or {})))
    _, port = proxy.address("proxy")
    rest.write_config(proxy_url=f"wss://127.0.0.1:{port}")
    await rest.start(testcase)
    trio = Trio(rest=rest, dir=directory, proxy=proxy, proxy_port=port)
    trio.keys["alice"] = rest.admin_key
    await trio.add_user("owen")
    await trio.add_user("bob")
    trio.vm_id, token = await trio.add_vm("owen")
    trio.token = token
    trio.write_vmc_config(token, **vmc_overrides)
    if enroll:
        await trio.start_vmc(testcase)
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
