"""The isolated deployment in network namespaces, shared by the system test
(test/test_isolation_system.py) and ``ticrypt-lab --netns``.

:class:`Namespaces` builds the network (10.77.0.0/16 only; namespace and
veth names carry a tag with the process id; :meth:`Namespaces.remove`
deletes every namespace made, and with them their veth pairs)::

    user 10.77.0.2 ---+
    backend 10.77.1.2 +-- router (10.77.{0,1,4,5}.1, 10.77.2.254)
    license 10.77.4.2 +       |
    outside 10.77.5.2 +   vmhost 10.77.2.1 / 10.77.3.1 (one routed veth per VM)
                              +-- vm1 10.77.3.11
                              +-- vm2 10.77.3.12

The VMs sit on point-to-point links (a /32 each, their gateway the VM
host), so every packet between two VMs is routed by the VM host, where its
firewall sees it (a bridge would carry it past the VM host's IP rules).
The router sends 10.77.3.0/24 to the VM host and the allow-list
forwarding pool 10.77.9.0/24 to the backend, where it is local.

:class:`NetnsDeployment` starts the roles there through
:class:`ticrypt.lab.deploy.Deployment` (configs written with the
namespaces' addresses): proxy and rest (and ticrypt-allowedlist, once that
role exists) in ``backend``, ticrypt-vmhost in ``vmhost``, one vmc per VM,
ticrypt-connect and the ``ticrypt`` CLI in ``user``, a license server
(TCP ports and an upstream DNS authority for :data:`LICENSE_NAME`) in
``license``.  ``start``/``run`` are injected: the test stops what it
started in cleanup, the lab prints each step.

``python -m ticrypt.lab.netns serve ...`` is the small helper process the
license server and the VMs' web servers run in their namespaces, and
``python -m ticrypt.lab.netns sweep ...`` the TCP connect sweep used to
check that ports are closed.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import ipaddress
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from importlib.util import find_spec
from typing import Any

import attrs
from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as names_error
from twisted.names.common import ResolverBase

from ticrypt.lab import daemons
from ticrypt.lab.deploy import Addresses, Deployment, render_ini

NET = "10.77"
ROUTER = "router"
USER_IP = "10.77.0.2"
BACKEND_IP = "10.77.1.2"
VMHOST_IP = "10.77.2.1"  # the VM host's outside address
VMHOST_VM_IP = "10.77.3.1"  # its address towards the VMs (every VM link)
VM_IPS = {1: "10.77.3.11", 2: "10.77.3.12"}
LICENSE_IP = "10.77.4.2"
OUTSIDE_IP = "10.77.5.2"
VM_NETWORK = "10.77.3.0/24"
FORWARD_POOL = "10.77.9.0/24"
#: the router's address on each link to it
ROUTER_IPS = {"user": "10.77.0.1", "backend": "10.77.1.1", "vmhost": "10.77.2.254",
              "license": "10.77.4.1", "outside": "10.77.5.1"}
HOST_IPS = {"user": USER_IP, "backend": BACKEND_IP, "vmhost": VMHOST_IP,
            "license": LICENSE_IP, "outside": OUTSIDE_IP}
ROLES = (ROUTER, "user", "backend", "vmhost", "vm1", "vm2", "license", "outside")

REST_PORT = 8443
VMHOST_BASE = 2200  # VM N on the VM host's port 2200 + N
TUNNEL_PORT = 22  # vmc's tunnel server in each VM
APP_PORT = 8080  # a web server on 127.0.0.1 inside each VM, tunnelled
LICENSE_NAME = "license.example.org"
LICENSE_PORTS = (27000, 27001)  # the license server listens on both
DNS_PORT = 53
LOG_GROUP = 77  # the NFLOG group of the drop rules
USER = "alice"


class NetnsError(Exception):
    """A namespace step failed; ``str()`` is the line to show."""


def netns_missing() -> str | None:
    """Why namespaces cannot be built here (one line), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, nft)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "ip netns is not usable here"
    return None


def _sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise NetnsError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _batch(netns: str | None, commands: list[str]) -> None:
    """``ip [-n NETNS] -batch -`` of ``commands`` (it stops at the first
    that fails, which it names)."""
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    proc = subprocess.run(argv, input="".join(c + "\n" for c in commands), capture_output=True,
                          text=True)
    if proc.returncode:
        raise NetnsError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")


@attrs.define
class Namespaces:
    """The namespaces of :data:`ROLES`, named ``TAG-ROLE`` where ``TAG`` is
    ``prefix`` and this process's id."""

    prefix: str = "tcn"
    tag: str = attrs.field(default=attrs.Factory(
        lambda self: f"{self.prefix}{os.getpid() % 100000}", takes_self=True))
    made: list[str] = attrs.field(factory=list)

    def name(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def exec(self, role: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``role``'s namespace."""
        return ["ip", "netns", "exec", self.name(role), *argv]

    def create(self) -> None:
        """Build the network; on failure what was made stays listed in
        :attr:`made` for :meth:`remove` (call it in every case).  One ``ip
        -batch`` for the namespaces, one for the veth pairs, one per
        namespace for its links, addresses and routes."""
        names = [self.name(role) for role in ROLES]
        self.made.extend(names)  # deleting one never made is harmless
        _batch(None, [f"netns add {ns}" for ns in names])
        veths: list[str] = []
        inside: dict[str, list[str]] = {role: ["link set lo up"] for role in ROLES}
        routes: dict[str, list[str]] = {role: [] for role in ROLES}

        def veth(role_a: str, a: str, role_b: str, b: str) -> None:
            veths.append(f"link add {a} netns {self.name(role_a)} type veth peer name {b} "
                         f"netns {self.name(role_b)}")
            inside[role_a].append(f"link set {a} up")
            inside[role_b].append(f"link set {b} up")

        # the router's links (veth names at most 15 characters)
        for n, role in enumerate(("user", "backend", "vmhost", "license", "outside")):
            a, b = f"{self.tag}r{n}", f"{self.tag}h{n}"
            veth(ROUTER, a, role, b)
            inside[ROUTER].append(f"addr add {ROUTER_IPS[role]}/24 dev {a}")
            inside[role].append(f"addr add {HOST_IPS[role]}/24 dev {b}")
            routes[role].append(f"route add default via {ROUTER_IPS[role]}")
        # one routed point-to-point link per VM
        for n, vm_ip in VM_IPS.items():
            a, b = f"{self.tag}v{n}", f"{self.tag}e{n}"
            veth("vmhost", a, f"vm{n}", b)
            inside["vmhost"].append(f"addr add {VMHOST_VM_IP}/32 dev {a}")
            routes["vmhost"].append(f"route add {vm_ip}/32 dev {a}")
            inside[f"vm{n}"].append(f"addr add {vm_ip}/32 dev {b}")
            routes[f"vm{n}"] += [f"route add {VMHOST_VM_IP}/32 dev {b}",
                                 f"route add default via {VMHOST_VM_IP} dev {b}"]
        routes[ROUTER] += [f"route add {VM_NETWORK} via {VMHOST_IP}",
                           f"route add {FORWARD_POOL} via {BACKEND_IP}"]
        routes["backend"].append(f"route add local {FORWARD_POOL} dev lo")
        _batch(None, veths)
        for role in ROLES:
            _batch(self.name(role), inside[role] + routes[role])
        for role in (ROUTER, "backend", "vmhost"):
            _sh("ip", "netns", "exec", self.name(role), "sysctl", "-q", "-w",
                "net.ipv4.ip_forward=1")

    def remove(self) -> None:
        """Delete every namespace made (their veth pairs go with them)."""
        while self.made:
            subprocess.run(["ip", "netns", "del", self.made.pop()], capture_output=True)

    def nft(self, role: str, script: str) -> None:
        """Apply an ``nft -f`` script inside ``role``'s namespace."""
        proc = subprocess.run(self.exec(role, ["nft", "-f", "-"]), input=script,
                              capture_output=True, text=True)
        if proc.returncode:
            raise NetnsError(f"nft in {role}: {proc.stderr.strip()}")

    def nft_list(self, role: str, *what: str) -> str:
        return _sh(*self.exec(role, ["nft", "list", *what]))


# -- which parts of the isolation have landed ------------------------------------

def allowedlist_missing() -> str | None:
    """Why ticrypt-allowedlist cannot be deployed yet, or None."""
    if find_spec("ticrypt.allowedlist.tap") is None:
        return "ticrypt-allowedlist (ticrypt/allowedlist/tap.py) is not there yet"
    if not hasattr(Deployment, "allowedlist_ini"):
        return "Deployment.allowedlist_ini (the allowedlist config writer) is not there yet"
    if find_spec("ticrypt.frontend.cmd_allowlist") is None:
        return "the ticrypt allowlist CLI is not there yet"
    return None


def vmc_firewall_missing() -> str | None:
    """Why vmc cannot apply its firewall yet, or None."""
    if find_spec("ticrypt.vmc.firewall") is None:
        return "the vmc firewall (ticrypt/vmc/firewall.py) is not there yet"
    from ticrypt.vmc import config as vmc_config

    if "firewall" not in {f.name for f in attrs.fields(vmc_config.VmcConfig)}:
        return "vmc.ini has no [firewall] section yet"
    return None


def vmhost_isolation_missing() -> str | None:
    """Why the VM host would still route anything to and from its VMs, or
    None: its table must filter forwarded traffic (a ``hook forward`` chain)."""
    import tempfile

    from ticrypt.config import load_config
    from ticrypt.nft.ruleset import render_replace
    from ticrypt.vmhost import firewall
    from ticrypt.vmhost.config import VmhostConfig, VmhostSection

    known = _known_keys(VmhostSection)
    settings = {k: v for k, v in vmhost_isolation_settings().items() if k in known}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vmhost.ini")
        with open(path, "w") as f:
            f.write(render_ini({"vmhost": {"vms": f"1={VM_IPS[1]}", "mode": "nft",
                                           "listen_host": VMHOST_IP,
                                           "audit_log": "audit.log", **settings}}))
        try:
            text = render_replace(firewall.vmhost_table(load_config(path, VmhostConfig).vmhost))
        except Exception as e:  # an interface that moved: say so, do not guess
            return f"the VM host's isolation rules cannot be rendered here ({e})"
    if "hook forward" not in text:
        return ("the VM host's isolation rules (a forward chain in ticrypt_vmhost) "
                "are not there yet")
    return None


def vmhost_isolation_settings() -> dict[str, str]:
    """[vmhost] keys for isolation as issue 10's brief names them; keys the
    role does not know are left out when the config is written."""
    return {"isolation": "yes", "vm_networks": VM_NETWORK,
            "backend": f"{BACKEND_IP}/32, {FORWARD_POOL}", "log_group": str(LOG_GROUP)}


def _known_keys(section_cls: Any) -> set[str]:
    return {f.name for f in attrs.fields(section_cls)}


# -- the roles -------------------------------------------------------------------

#: starts twistd plugin ``plugin`` with ``config`` in namespace ``role``, waits until ready
StartIn = Callable[[str, str, str], Awaitable[daemons.Daemon]]
#: runs argv (a console script of ours first) in namespace ``role`` (None: here)
RunIn = Callable[[str | None, list[str]], Awaitable[tuple[int, str, str]]]


def spawn_in(reactor: Any, spaces: Namespaces, role: str, plugin: str, config: str, *,
             timeout: float = 60.0, echo: Any = None) -> daemons.Daemon:
    """``twistd -n PLUGIN --config CONFIG`` in ``role``'s namespace."""
    proc = daemons.Daemon(plugin, reactor, timeout, echo)
    argv = spaces.exec(role, [daemons.twistd_path(), "-n", "--pidfile=", plugin,
                              "--config", config])
    reactor.spawnProcess(proc, shutil.which("ip") or "ip", argv, env=daemons.daemon_env(),
                         path=os.path.dirname(os.path.abspath(config)))
    return proc


def helper_in(reactor: Any, spaces: Namespaces, role: str, args: list[str], *,
              timeout: float = 30.0, echo: Any = None) -> daemons.Daemon:
    """``python -m ticrypt.lab.netns ARGS`` in ``role``'s namespace (it
    prints a readiness line like the daemons)."""
    proc = daemons.Daemon(f"{role}-{args[0]}", reactor, timeout, echo)
    argv = spaces.exec(role, [sys.executable, "-m", "ticrypt.lab.netns", *args])
    reactor.spawnProcess(proc, shutil.which("ip") or "ip", argv, env=daemons.daemon_env(),
                         path=daemons.ROOT)
    return proc


@attrs.define
class NetnsDeployment:
    """Every role of the isolated deployment, started in :class:`Namespaces`.

    ``vmc_firewall``, ``vmhost_isolation``: configure vmc's and the VM
    host's rules (only once those have landed); ``allowedlist``: start
    ticrypt-allowedlist."""

    reactor: Any
    spaces: Namespaces
    dep: Deployment
    start_in: StartIn
    run_in: RunIn
    helper: Callable[[str, list[str]], Awaitable[daemons.Daemon]]
    vmc_firewall: bool = False
    vmhost_isolation: bool = False
    allowedlist: bool = False
    daemons: dict[str, daemons.Daemon] = attrs.field(factory=dict)
    vm_ids: dict[int, str] = attrs.field(factory=dict)
    client_ini: str = ""

    @staticmethod
    def addresses() -> Addresses:
        return Addresses(rest_host=BACKEND_IP, rest_port=REST_PORT, proxy_host=BACKEND_IP,
                         vm_host=f"{VMHOST_IP}:{VMHOST_BASE + 1}", lease_ports="6000-6009")

    async def run(self, role: str | None, *args: str) -> str:
        code, out, err = await self.run_in(role, list(args))
        if code:
            raise NetnsError(f"{args[0]} {' '.join(args[1:3])} exited {code}: "
                             f"{(err or out).strip()}")
        return out

    async def cli(self, *args: str, expect: int | None = 0) -> tuple[int, str]:
        """``ticrypt --config client.ini ARGS`` in the user namespace."""
        code, out, err = await self.run_in("user", ["ticrypt", "--config", self.client_ini,
                                                    *args])
        if expect is not None and code != expect:
            raise NetnsError(f"ticrypt {' '.join(args)} exited {code}: {(out + err).strip()}")
        return code, out + err

    async def start(self) -> None:
        """Start every role; independent ones at the same time.

        The VM host's rules are in the kernel before any vmc starts, as on a
        real VM host: a table installed under live VM connections would see
        their packets mid-stream (conntrack had not tracked them) and drop
        the backend's side until the VM sends again."""
        dep = self.dep

        async def run_here(args: list[str]) -> tuple[int, str, str]:
            return await self.run_in(None, args)

        dep.ca()
        dep.feed_secret()
        dep.user_key(USER)
        dep.rest_ini()

        async def license_server() -> None:
            # its TCP ports and the upstream DNS authority that knows its
            # real address
            self.daemons["license"] = await self.helper("license", [
                "serve", *(f"--tcp={LICENSE_IP}:{p}" for p in LICENSE_PORTS),
                f"--dns={LICENSE_IP}:{DNS_PORT}:{LICENSE_NAME}={LICENSE_IP}"])

        async def web_server(n: int) -> None:
            www = os.path.join(dep.dir, f"www{n}")
            from ticrypt.lab import apps

            apps.web_folder(www)
            with open(os.path.join(www, "vm.txt"), "w") as f:
                f.write(f"vm{n}\n")
            self.daemons[f"web{n}"] = await self.helper(
                f"vm{n}", ["serve", f"--web=127.0.0.1:{APP_PORT}:{www}"])

        async def vm_host() -> None:
            from ticrypt.vmhost.config import VmhostSection

            extra = {}
            if self.vmhost_isolation:
                known = _known_keys(VmhostSection)
                extra = {k: v for k, v in vmhost_isolation_settings().items() if k in known}
            self.daemons["vmhost"] = await self.start_in("vmhost", "ticrypt-vmhost",
                                                         dep.vmhost_ini(
                {n: f"{VM_IPS[n]}:{TUNNEL_PORT}" for n in VM_IPS},
                base=str(VMHOST_BASE), mode="nft", listen_host=VMHOST_IP, **extra))

        async def backend() -> dict[int, str]:
            """rest's database, the backend roles and the VMs' enrollment tokens."""
            await dep.init(run_here, USER)

            async def roles() -> None:
                async def start_backend_role(plugin: str, config: str) -> daemons.Daemon:
                    return await self.start_in("backend", plugin, config)

                proxy, rest = await dep.start_backend(start_backend_role)
                self.daemons.update(proxy=proxy, rest=rest)
                if self.allowedlist:
                    settings = self.allowedlist_settings()
                    config = dep.allowedlist_ini(settings.pop("upstream"), **settings)
                    self.daemons["allowedlist"] = await self.start_in(
                        "backend", "ticrypt-allowedlist", config)

            async def vms() -> dict[int, str]:
                tokens = {}
                for n in VM_IPS:  # one ticrypt-admin at a time on rest's database
                    self.vm_ids[n], tokens[n] = await dep.add_vm(
                        run_here, USER, f"vm{n}", host=f"{VMHOST_IP}:{VMHOST_BASE + n}")
                return tokens

            _, tokens = await together(roles(), vms())
            return tokens  # type: ignore[no-any-return]

        results = await together(backend(), vm_host(), license_server(),
                                  *(web_server(n) for n in VM_IPS))
        tokens: dict[int, str] = results[0]

        async def vmc(n: int) -> None:
            tunnel = {"enabled": "yes", "listen": f"tcp:{TUNNEL_PORT}:interface={VM_IPS[n]}",
                      "ports": str(APP_PORT)}
            path = dep.vmc_ini(tokens[n], name=f"vmc{n}", tunnel_settings=tunnel,
                               backoff_max="5s")
            if self.vmc_firewall:
                self._vmc_firewall(path)
            proc = self.daemons[f"vmc{n}"] = await self.start_in(f"vm{n}", "ticrypt-vmc", path)
            if proc.address("tunnel")[1] != TUNNEL_PORT:
                raise NetnsError(f"vmc{n}'s tunnel listens on {proc.address('tunnel')}, "
                                 f"the VM host forwards to port {TUNNEL_PORT}")

        async def user() -> None:
            async def start_user_role(plugin: str, config: str) -> daemons.Daemon:
                return await self.start_in("user", plugin, config)

            dep.connect_ini()
            self.daemons["connect"] = await dep.start_connect(start_user_role)
            self.client_ini = dep.client_ini(USER)
            await self.cli("login")

        await together(*(vmc(n) for n in VM_IPS), user())

    def allowedlist_settings(self) -> dict[str, str]:
        """[allowedlist] keys of issue 10's brief for this network."""
        return {"dns_listen": f"{BACKEND_IP}:{DNS_PORT}", "vm_networks": VM_NETWORK,
                "forward_addresses": FORWARD_POOL, "upstream": f"{LICENSE_IP}:{DNS_PORT}",
                "poll_interval": "1s", "mode": "nft", "log_group": str(LOG_GROUP)}

    def _vmc_firewall(self, path: str) -> None:
        """[firewall] of vmc.ini as issue 10's brief names its keys."""
        from ticrypt.vmc import config as vmc_config

        section = {"enabled": "yes", "dns": BACKEND_IP, "allow_out": FORWARD_POOL,
                   "log_group": str(LOG_GROUP)}
        cls = next((f.type for f in attrs.fields(vmc_config.VmcConfig) if f.name == "firewall"),
                   None)
        if inspect.isclass(cls) and attrs.has(cls):
            known = _known_keys(cls)
            section = {k: v for k, v in section.items() if k in known}
        with open(path) as f:
            text = f.read()
        if "[firewall]" in text:
            return  # the writer has its own [firewall] now
        with open(path, "a") as f:
            f.write("\n" + render_ini({"firewall": section}))

    async def stop(self) -> None:
        """Stop every daemon and helper, the last started first."""
        for proc in reversed(list(self.daemons.values())):
            await proc.stop()
        self.daemons.clear()


async def together(*steps: Coroutine[Any, Any, Any]) -> list[Any]:
    """Await ``steps`` at the same time; their results in order.  Every step
    runs to its end (so what it started is recorded, e.g. for
    :meth:`NetnsDeployment.stop`) before the first failure is raised."""
    results = await defer.DeferredList([defer.ensureDeferred(s) for s in steps],
                                       consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]


# -- helper processes ------------------------------------------------------------

def sweep(targets: Iterable[tuple[str, int]], timeout: float = 2.0,
          batch: int | None = None) -> list[tuple[str, int]]:
    """The (host, port) pairs that accept a TCP connection; a refusal, a
    drop (no answer within ``timeout``) and an unreachable host all count
    as closed.  Non-blocking connects, ``batch`` at a time (by default as
    many as this process may open files: every drop waits ``timeout``
    once per batch)."""
    targets = list(targets)
    if batch is None:
        batch = max(1, _open_files_limit(len(targets) + 64) - 64)
    opened: list[tuple[str, int]] = []
    for start in range(0, len(targets), batch):
        sel = selectors.DefaultSelector()
        for host, port in targets[start:start + batch]:
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.setblocking(False)
            code = s.connect_ex((host, port))
            if code in (0, errno.EINPROGRESS):
                sel.register(s, selectors.EVENT_WRITE, (host, port))
            else:
                s.close()
        deadline = time.monotonic() + timeout
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                s = key.fileobj  # type: ignore[assignment]
                assert isinstance(s, socket.socket)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    opened.append(key.data)
                sel.unregister(s)
                s.close()
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
    return sorted(opened)


def _open_files_limit(wanted: int) -> int:
    """Raise this process's soft limit of open files towards ``wanted``
    (at most the hard limit); the soft limit now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def parse_ranges(text: str) -> list[int]:
    """``1-1024,2201,8080`` -> ports."""
    ports: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        ports.extend(range(int(lo), int(hi or lo) + 1))
    return ports


class StaticZone(ResolverBase):
    """A records for a few names (the license server's upstream DNS),
    NXDOMAIN for every other name."""

    def __init__(self, records: dict[bytes, list[str]]) -> None:
        super().__init__()
        self._records = records

    def _lookup(self, name: bytes, cls: int, type: int,  # noqa: A002 (ResolverBase's name)
                timeout: Any = None) -> defer.Deferred[Any]:
        addresses = self._records.get(name.lower().rstrip(b"."))
        if addresses is None:
            return defer.fail(names_error.AuthoritativeDomainError(name))
        answers = [dns.RRHeader(name, dns.A, dns.IN, 30, dns.Record_A(a, 30), auth=True)
                   for a in addresses] if type in (dns.A, dns.ALL_RECORDS) else []
        return defer.succeed((answers, [], []))


def _serve(args: argparse.Namespace) -> int:
    """TCP listeners that answer ``NAME PORT`` and close, static web
    folders, and an authoritative DNS zone of A records; prints the
    readiness line once all listen, then serves until killed."""
    from twisted.internet import reactor as the_reactor
    from twisted.internet.protocol import Factory, Protocol
    from twisted.names import server
    from twisted.web import server as web_server
    from twisted.web import static

    from ticrypt.service import READY_MARKER

    reactor: Any = the_reactor
    listening: dict[str, str] = {}

    class Hello(Protocol):
        def connectionMade(self) -> None:
            here = self.transport.getHost()  # type: ignore[union-attr]
            self.transport.write(f"{args.name} {here.port}\n".encode())  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]

    for spec in args.tcp:
        host, _, port = spec.rpartition(":")
        reactor.listenTCP(int(port), Factory.forProtocol(Hello),
                          interface=host)
        listening[f"tcp{port}"] = spec
    for spec in args.web:
        host, port, folder = spec.split(":", 2)
        site = web_server.Site(static.File(folder))
        site.noisy = False
        reactor.listenTCP(int(port), site, interface=host)
        listening[f"web{port}"] = f"{host}:{port}"
    if args.dns:
        records: dict[bytes, list[str]] = {}
        host, port = "", "53"
        for spec in args.dns:
            host, port, pair = spec.split(":", 2)
            name, _, address = pair.partition("=")
            ipaddress.IPv4Address(address)
            records.setdefault(name.lower().encode(), []).append(address)
        factory = server.DNSServerFactory(authorities=[StaticZone(records)])
        factory.noisy = False
        reactor.listenUDP(int(port), dns.DNSDatagramProtocol(factory),
                          interface=host)
        reactor.listenTCP(int(port), factory, interface=host)
        listening["dns"] = f"{host}:{port}"
    print(f"{READY_MARKER} {json.dumps({'listening': listening})}", flush=True)
    reactor.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ticrypt.lab.netns",
                                     description="Helpers of the namespace deployment.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="TCP, web and DNS servers for a namespace")
    serve.add_argument("--tcp", action="append", default=[], metavar="HOST:PORT")
    serve.add_argument("--web", action="append", default=[], metavar="HOST:PORT:FOLDER")
    serve.add_argument("--dns", action="append", default=[], metavar="HOST:PORT:NAME=IPV4")
    serve.add_argument("--name", default="license", help="what TCP listeners answer")
    scan = sub.add_parser("sweep", help="print the open TCP ports of hosts as JSON")
    scan.add_argument("--ports", required=True, help="e.g. 1-1024,2201,8080")
    scan.add_argument("--timeout", type=float, default=2.0)
    scan.add_argument("hosts", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    ports = parse_ranges(args.ports)
    found = sweep([(h, p) for h in args.hosts for p in ports], timeout=args.timeout)
    print(json.dumps([f"{h}:{p}" for h, p in found]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
