"""A real deployment for the page's end-to-end tests and its screenshots:
ticrypt-proxy, ticrypt-rest, a ticrypt-vmc with its tunnel and SFTP
servers, ticrypt-vmhost and the user's ticrypt-connect serving the page
([page] rest_url), all ``twistd -n`` processes on 127.0.0.1 built by
:class:`ticrypt.lab.deploy.Deployment`; a web server "inside the VM" on this
process's reactor.

Between the websockets (connect's relay and vmc) and the proxy sits a
:class:`Tap`: it ends TLS with the deployment's own certificate (rest
announces the tap's URL as ``proxy_url``) and records every byte each way
in the clear, i.e. exactly what the proxy reads and relays, so a test can
check that no plaintext of a browser session ever reached it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import attrs
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.internet.interfaces import IListeningPort

from ticrypt.http.client import JsonClient
from ticrypt.lab import apps
from ticrypt.lab.daemons import Daemon
from ticrypt.lab.deploy import Addresses, Deployment, Run, Start, free_port

A = TypeVar("A")
B = TypeVar("B")

OWNER = "alice"
VM = "labvm"
#: the passphrase of the owner's encrypted copy of her key (``alice-enc.key``)
PASSPHRASE = "correct horse battery staple"


# ---------------------------------------------------------------- the tap

class _ToProxy(protocol.Protocol):
    def __init__(self, inbound: _FromClient):
        self.inbound = inbound

    def connectionMade(self) -> None:
        self.inbound.attached(self)

    def dataReceived(self, data: bytes) -> None:
        self.inbound.record.down += data
        assert self.inbound.transport is not None
        self.inbound.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.inbound.transport is not None:
            self.inbound.transport.loseConnection()


class _FromClient(protocol.Protocol):
    def __init__(self, tap: Tap):
        self.tap = tap
        self.record = Recording()
        self.out: _ToProxy | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        self.tap.recordings.append(self.record)
        d = endpoints.connectProtocol(self.tap.upstream(), _ToProxy(self))
        d.addErrback(self._unreachable)

    def _unreachable(self, failure: Any) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def attached(self, out: _ToProxy) -> None:
        self.out = out
        assert out.transport is not None
        for data in self.pending:
            out.transport.write(data)
        self.pending.clear()

    def dataReceived(self, data: bytes) -> None:
        self.record.up += data
        if self.out is None:
            self.pending.append(data)
        else:
            assert self.out.transport is not None
            self.out.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.out is not None and self.out.transport is not None:
            self.out.transport.loseConnection()


@attrs.define
class Recording:
    """One connection through the tap: ``up`` toward the proxy, ``down`` from it."""

    up: bytearray = attrs.field(factory=bytearray)
    down: bytearray = attrs.field(factory=bytearray)


class Tap(protocol.Factory):
    """A TLS-terminating TCP relay in front of the proxy that records what
    passes (test traffic only: a few MiB, no backpressure needed)."""

    def __init__(self, reactor: Any, dep: Deployment, proxy_port: int):
        self.reactor = reactor
        self.recordings: list[Recording] = []
        with open(dep.ca_file, "rb") as f:
            ca = ssl.Certificate.loadPEM(f.read())
        self._client = ssl.optionsForClientTLS("127.0.0.1", trustRoot=ca)
        self._proxy_port = proxy_port
        with open(dep.server_pem, "rb") as f:
            self.server_options = ssl.PrivateCertificate.loadPEM(f.read()).options()
        self.port: IListeningPort | None = None

    def upstream(self) -> Any:
        return endpoints.wrapClientTLS(self._client, endpoints.TCP4ClientEndpoint(
            self.reactor, "127.0.0.1", self._proxy_port, timeout=10))

    def buildProtocol(self, addr: Any) -> _FromClient:
        return _FromClient(self)

    async def listen(self) -> int:
        ep = endpoints.SSL4ServerEndpoint(self.reactor, 0, self.server_options,
                                          interface="127.0.0.1")
        self.port = await ep.listen(self)
        return int(self.port.getHost().port)  # type: ignore[union-attr]

    def raw(self) -> bytes:
        return b"".join(bytes(r.up) + bytes(r.down) for r in self.recordings)


# ---------------------------------------------------------------- the chain

@attrs.define
class WebChain:
    """The running deployment (see the module's doc)."""

    reactor: Any
    dep: Deployment
    tap: Tap
    vm_id: str = ""
    web_port: int = 0
    sftp_port: int = 0
    www: str = ""
    daemons: dict[str, Daemon] = attrs.field(factory=dict)
    client_inis: dict[str, str] = attrs.field(factory=dict)
    start: Start | None = None

    async def restart_rest(self) -> None:
        """Stop rest and start it again on its port (its database kept)."""
        assert self.start is not None
        await self.daemons["rest"].stop()
        self.daemons["rest"] = await self.dep.start_rest(self.start)

    @property
    def connect_url(self) -> str:
        return f"http://127.0.0.1:{self.dep.addresses.connect_port}"

    async def connect_api(self, method: str, path: str, body: Any = None) -> Any:
        """connect's API with its token file's token, as the CLI calls it."""
        with open(self.dep.path("connect-state/api.token")) as f:
            token = f.read().strip()
        status, answer = await JsonClient(self.reactor, None, timeout=30).request(
            method, self.connect_url + path, body,
            headers={"Authorization": "Bearer " + token})
        if not 200 <= status < 300:
            raise AssertionError(f"{method} {path}: {status} {answer}")
        return answer

    async def page_link(self) -> str:
        """A fresh one-time URL of the page (``POST /v1/page/link``)."""
        return str((await self.connect_api("POST", "/v1/page/link", {}))["url"])

    def key_file(self, user: str) -> str:
        return self.dep.path(f"{user}.key")


async def start_web_chain(reactor: Any, directory: str, run: Run, start: Start,
                          on_cleanup: Callable[[Callable[[], Any]], None],
                          users: tuple[str, ...] = (),
                          proxy_limits: dict[str, str | None] | None = None,
                          rest_settings: dict[str, str | None] | None = None,
                          tunnel_server: bool = True) -> WebChain:
    """Every role, the owner ``alice`` (superadmin) with the VM ``labvm``,
    and ``users`` as plain users; their keys are ``USER.key`` (alice's also
    encrypted with :data:`PASSPHRASE` in ``alice-enc.key``).  ``rest_settings``
    go to rest.ini's ``[rest]``; without ``tunnel_server`` the VM's vmc has its
    tunnel server off (``[tunnel] enabled = no``), and there is no vmhost
    nor web server "inside the VM"."""
    from ticrypt import identity

    vmhost_port, lease_base = free_port(), free_port()
    dep = Deployment(directory, Addresses(
        rest_port=free_port(), vm_host=f"127.0.0.1:{vmhost_port}",
        lease_ports=f"{lease_base}-{lease_base + 9}"))
    dep.ca()
    dep.feed_secret()
    key, _ = dep.user_key(OWNER)
    identity.save_private(dep.path(f"{OWNER}-enc.key"), key, PASSPHRASE.encode())
    dep.rest_ini()
    dep.proxy_ini(limits=proxy_limits)

    async def accounts() -> None:
        await dep.init(run, OWNER)
        for user in users:
            await dep.add_user(run, user)
    # the proxy boots while ticrypt-admin fills rest's database
    proxy, _ = await _both(dep.start_proxy(start), accounts())
    # rest tells vmc and the page's relay to dial the tap, which dials the proxy
    tap = Tap(reactor, dep, dep.addresses.proxy_port)
    tap_port = await tap.listen()
    on_cleanup(lambda: tap.port.stopListening() if tap.port else None)
    dep.rest_ini(proxy_url=f"wss://127.0.0.1:{tap_port}", **(rest_settings or {}))
    rest = await dep.start_rest(start)
    c = WebChain(reactor, dep, tap, start=start)

    async def vm() -> dict[str, Daemon]:
        c.vm_id, token = await dep.add_vm(run, OWNER, VM)
        if not tunnel_server:
            return {"vmc": await start("ticrypt-vmc",
                                       dep.vmc_ini(token, tunnel_settings={"enabled": "no"}))}
        c.web_port = free_port()
        tunnel, sftp = dep.vm_tunnel(ports=(c.web_port,))
        c.sftp_port = int(str(sftp["port"]))
        vmc = await start("ticrypt-vmc", dep.vmc_ini(token, tunnel_settings=tunnel,
                                                     sftp_settings=sftp))
        vmhost = await start("ticrypt-vmhost", dep.vmhost_ini(
            {1: f"127.0.0.1:{vmc.address('tunnel')[1]}"}, base=str(vmhost_port - 1)))
        return {"vmc": vmc, "vmhost": vmhost}
    # connect (the page on: rest's URL, the CA) needs nothing of the VM's
    connect, vm_daemons = await _both(dep.start_connect(start), vm())
    c.daemons = {"proxy": proxy, "rest": rest, **vm_daemons, "connect": connect}
    for user in (OWNER, *users):
        c.client_inis[user] = dep.client_ini(user, name=f"client-{user}")
    if tunnel_server:
        c.www = apps.web_folder(dep.path("www"))
        web = await apps.start_web(reactor, c.www, c.web_port)
        on_cleanup(web.stopListening)
    return c


async def _both(first: Coroutine[Any, Any, A], second: Coroutine[Any, Any, B]) -> tuple[A, B]:
    """Both results of two coroutines run at the same time; both have ended
    when this returns or raises (the first one's failure, else the second's)."""
    one, two = defer.Deferred.fromCoroutine(first), defer.Deferred.fromCoroutine(second)
    try:
        a = await one
    except BaseException:
        try:
            await two
        except BaseException:
            pass
        raise
    return a, await two


__all__ = ["OWNER", "PASSPHRASE", "VM", "Recording", "Tap", "WebChain", "start_web_chain"]
