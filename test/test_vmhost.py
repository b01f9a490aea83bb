"""ticrypt-vmhost: config refusals, the nft service in memory, a real twistd
vmhost forwarding on 127.0.0.1, and nft mode inside network namespaces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from test.daemon import ROOT, daemon_env, run_command, start_daemon, twistd_path
from test.netprobe import listen_in, probes_from
from ticrypt.audit import AuditLog
from ticrypt.config import ConfigError, load_config
from ticrypt.lab import daemons
from ticrypt.lab.deploy import Deployment, free_port
from ticrypt.nft.apply import MemoryNft
from ticrypt.nft.ruleset import render_delete, render_replace
from ticrypt.service import StartupError
from ticrypt.vmhost import firewall
from ticrypt.vmhost.config import VmhostConfig, VmTarget
from ticrypt.vmhost.firewall import FirewallService, vmhost_table


def write_ini(testcase: SynchronousTestCase, **keys: str) -> str:
    values = {"vms": "1=10.0.0.11", "audit_log": "audit.log", **keys}
    d = os.path.abspath(testcase.mktemp())
    os.makedirs(d)
    path = os.path.join(d, "vmhost.ini")
    with open(path, "w") as f:
        f.write("[vmhost]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
    return path


class ConfigTests(SynchronousTestCase):
    def load(self, **keys: str) -> VmhostConfig:
        return load_config(write_ini(self, **keys), VmhostConfig)

    def refused(self, key: str, text: str, **keys: str) -> None:
        e = self.assertRaises(ConfigError, self.load, **keys)
        self.assertEqual((e.section, e.key), ("vmhost", key), str(e))
        self.assertIn(text, str(e))

    def test_vms_forms(self) -> None:
        cfg = self.load(vms="2=10.0.0.12:2222,\n  1=[::ffff:10.0.0.11], 3=[fd00::3]:22 4=fd00::4")
        self.assertEqual(cfg.vmhost.vms, (VmTarget(1, "10.0.0.11", 22),
                                          VmTarget(2, "10.0.0.12", 2222),
                                          VmTarget(3, "fd00::3", 22),
                                          VmTarget(4, "fd00::4", 22)))
        self.assertEqual(sorted(cfg.ports()), [2201, 2202, 2203, 2204])
        self.assertEqual(cfg.vmhost.mode, "userspace")

    def test_refusals(self) -> None:
        self.refused("vms", "expected N=ADDRESS[:PORT]", vms="1=vm1.example")
        self.refused("vms", "VM 1 appears twice", vms="1=10.0.0.1, 1=10.0.0.2")
        self.refused("vms", "port 70000 is not in 1..65535", vms="1=10.0.0.1:70000")
        self.refused("vms", "no VM to forward", vms="")
        self.refused("base", "is past port 65535", base="65530", vms="9=10.0.0.1")
        self.refused("listen_host", "expected an IP address", listen_host="localhost")
        self.refused("mode", "one of userspace, nft", mode="iptables")
        self.refused("vms", "nft cannot translate between versions",
                     mode="nft", vms="1=fd00::1")

    def test_sample_loads(self) -> None:
        cfg = load_config(os.path.join(ROOT, "etc", "vmhost.ini"), VmhostConfig)
        self.assertEqual(cfg.vmhost.base, 2200)

    def test_nft_any_address(self) -> None:
        cfg = self.load(mode="nft", listen_host="0.0.0.0", vms="1=10.0.0.11, 2=fd00::2")
        text = render_replace(vmhost_table(cfg.vmhost))
        self.assertIn("meta nfproto ipv4 fib daddr type local tcp dport 2201 "
                      'dnat ip to 10.0.0.11:22 comment "vm 1"', text)
        self.assertIn("dnat ip6 to [fd00::2]:22", text)

    def test_rules_printer(self) -> None:
        path = write_ini(self, mode="nft", listen_host="192.0.2.1")
        out = subprocess.run([sys.executable, "-m", "ticrypt.vmhost.firewall", "--config", path],
                             capture_output=True, text=True, cwd=ROOT, env=daemon_env())
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("ip daddr 192.0.2.1 tcp dport 2201 dnat ip to 10.0.0.11:22", out.stdout)
        bad = subprocess.run([sys.executable, "-m", "ticrypt.vmhost.firewall", "--config",
                              write_ini(self, base="x")],
                             capture_output=True, text=True, cwd=ROOT, env=daemon_env())
        self.assertEqual(bad.returncode, 1)
        self.assertIn("[vmhost] base: expected a TCP port", bad.stderr)
        self.assertEqual(len(bad.stderr.splitlines()), 1, bad.stderr)


class FirewallServiceTests(SynchronousTestCase):
    def service(self, nft: MemoryNft) -> FirewallService:
        cfg = load_config(write_ini(self, mode="nft"), VmhostConfig)
        return FirewallService(cfg.vmhost, nft, AuditLog(None, task.Clock(), "vmhost"))

    def test_installs_and_removes(self) -> None:
        nft = MemoryNft()
        svc = self.service(nft)
        self.patch(firewall, "_read", lambda path: "1")
        svc.startService()
        self.successResultOf(svc.ready)
        self.assertEqual(list(nft.tables), ["table inet ticrypt_vmhost"])
        self.assertIn("dnat ip to 10.0.0.11:22", nft.scripts[0])
        self.successResultOf(svc.stopService())
        self.assertEqual(nft.tables, {})

    def test_nft_failure_is_a_startup_error(self) -> None:
        nft = MemoryNft()
        nft.fail_next = "nft failed (exit 1): Error: Operation not permitted"
        svc = self.service(nft)
        self.patch(firewall, "_read", lambda path: "1")
        svc.startService()
        f = self.failureResultOf(svc.ready, StartupError)
        self.assertEqual(f.value.message, "cannot install the nftables rules: nft failed "
                                          "(exit 1): Error: Operation not permitted")
        self.successResultOf(svc.stopService())
        self.assertEqual(len(nft.scripts), 0)

    def test_forwarding_off_refused(self) -> None:
        nft = MemoryNft()
        svc = self.service(nft)
        self.patch(firewall, "_read", lambda path: "0")
        e = self.assertRaises(StartupError, svc.startService)
        self.assertIn("needs net.ipv4.ip_forward = 1", e.message)
        self.assertEqual(nft.scripts, [])


class MakeServiceTests(SynchronousTestCase):
    def test_userspace_one_listener_per_vm(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from ticrypt.vmhost.tap import makeService

        cfg = load_config(write_ini(self, listen_host="::1", vms="1=fd00::1, 4=[fd00::4]:2222"),
                          VmhostConfig)
        mem = MemoryReactorClock()
        top = makeService({"cfg": cfg}, reactor=mem)
        top.privilegedStartService()
        self.assertEqual([(port, interface) for port, _, _, interface in mem.tcpServers],
                         [(2201, "::1"), (2204, "::1")])
        self.assertEqual(top.ready_info["forwarding"],
                         {"2201": "[fd00::1]:22", "2204": "[fd00::4]:2222"})
        # a connection to VM 4's port goes to VM 4
        factory = mem.tcpServers[1][1]
        from twisted.internet.address import IPv6Address
        from twisted.internet.testing import StringTransport
        proto = factory.buildProtocol(IPv6Address("TCP", "::1", 50000))
        assert proto is not None
        proto.makeConnection(StringTransport())
        self.assertEqual(mem.tcpClients[0][:2], ("fd00::4", 2222))

    def test_nft_mode_installs_and_removes(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from ticrypt.vmhost.tap import makeService

        cfg = load_config(write_ini(self, mode="nft"), VmhostConfig)
        nft = MemoryNft()
        top = makeService({"cfg": cfg}, reactor=MemoryReactorClock(), nft=nft,
                          check_forwarding=False)
        top.privilegedStartService()
        top.startService()
        self.assertEqual(list(nft.tables), ["table inet ticrypt_vmhost"])
        self.assertEqual(top.listeners(), [])
        self.successResultOf(defer.ensureDeferred(_stop(top)))
        self.assertEqual(nft.tables, {})


async def _stop(service: Any) -> None:
    await service.stopService()


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"echo:" + data)  # type: ignore[union-attr]


class Client(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.got: defer.Deferred[bytes] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.got.called:
            self.got.callback(self.received)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


async def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` each 20 ms until true (a condition, not a sleep)."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await task.deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


class UserspaceDaemonTests(TestCase):
    timeout = 60

    async def test_forwards_to_the_vm(self) -> None:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(Echo))
        self.addCleanup(port.stopListening)
        vm_port = port.getHost().port
        base = free_port() - 1
        deploy = Deployment(self.mktemp())
        path = deploy.vmhost_ini({1: f"127.0.0.1:{vm_port}"}, base=str(base))
        proc = await start_daemon(self, "ticrypt-vmhost", path)
        self.assertEqual(proc.address("vm1"), ("127.0.0.1", base + 1))

        client = Client()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", base + 1), client)
        client.transport.write(b"hello")  # type: ignore[union-attr]
        self.assertEqual(await client.got, b"echo:hello")
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.lost

        audit_path = deploy.path("vmhost-audit.log")

        def events() -> list[dict[str, Any]]:
            with open(audit_path) as f:
                return [json.loads(line) for line in f]

        await wait_for(lambda: any(e["event"] == "forward-closed" for e in events()),
                       "the closed audit line")
        closed = next(e for e in events() if e["event"] == "forward-closed")
        self.assertEqual((closed["vm"], closed["port"], closed["peer"]),
                         (1, base + 1, "127.0.0.1"))
        self.assertEqual((closed["bytes_in"], closed["bytes_out"]), (5, 10))
        self.assertEqual(closed["target"], f"127.0.0.1:{vm_port}")
        # a port outside the forwarded set: nothing listens there
        with self.assertRaises(ConnectionRefusedError):
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", base + 2), Client())

    async def test_bad_config_one_line(self) -> None:
        path = write_ini(self, vms="1=vm1.example")
        code, out, err = await run_command([twistd_path(), "-n", "--pidfile=", "ticrypt-vmhost",
                                            "--config", path])
        self.assertEqual(code, 1)
        self.assertEqual(err.strip().splitlines(),
                         [f"ticrypt-vmhost: {path}: [vmhost] vms: expected N=ADDRESS[:PORT] "
                          "entries separated by commas or new lines (IPv6 as [ADDRESS]:PORT "
                          "or a bare ADDRESS); '1=vm1.example'"])


class LineWaiter(ProcessProtocol):
    """A helper process that prints ``ready`` once listening."""

    def __init__(self) -> None:
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(None)


VM_SERVER = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 22))
s.listen(8)
print("ready", flush=True)
while True:
    c, a = s.accept()
    data = c.recv(100)
    c.sendall(b"vm:" + data + b" from " + a[0].encode())
    c.close()
"""

CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    c.sendall(b"hi")
    print("ok " + c.recv(100).decode())
except OSError as e:
    print("fail " + type(e).__name__)
"""


class NftNamespaceTests(TestCase):
    """client ns --veth-- vmhost ns --veth-- VM ns; vmhost in mode = nft."""

    timeout = 90

    def sh(self, *argv: str) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode:
            raise AssertionError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        return proc.stdout

    def make_namespaces(self) -> tuple[str, str, str]:
        pid = os.getpid()
        client, host, vm = (f"tc-{pid}-client", f"tc-{pid}-vmhost", f"tc-{pid}-vm")
        for ns in (client, host, vm):
            self.sh("ip", "netns", "add", ns)
            self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], capture_output=True)
            self.sh("ip", "-n", ns, "link", "set", "lo", "up")
        # veth names are at most 15 characters
        for a, b, ns_a, ns_b, net in ((f"tc{pid}c", f"tc{pid}h", client, host, "10.231.1"),
                                      (f"tc{pid}v", f"tc{pid}w", vm, host, "10.231.2")):
            self.sh("ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b,
                    "netns", ns_b)
            self.sh("ip", "-n", ns_a, "addr", "add", f"{net}.2/24", "dev", a)
            self.sh("ip", "-n", ns_b, "addr", "add", f"{net}.1/24", "dev", b)
            self.sh("ip", "-n", ns_a, "link", "set", a, "up")
            self.sh("ip", "-n", ns_b, "link", "set", b, "up")
        # the VM's gateway is the vmhost (no masquerade needed)
        self.sh("ip", "-n", vm, "route", "add", "default", "via", "10.231.2.1")
        self.sh("ip", "netns", "exec", host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        return client, host, vm

    async def connect_from(self, ns: str, host: str, port: int) -> str:
        code, out, err = await run_command(["ip", "netns", "exec", ns, sys.executable, "-c",
                                            CLIENT, host, str(port)], timeout=20)
        self.assertEqual(code, 0, err)
        return out.strip()

    async def start_vmhost(self, ip: str, ns: str, path: str) -> daemons.Daemon:
        proc = daemons.Daemon("ticrypt-vmhost", reactor, 30.0)
        argv = ["ip", "netns", "exec", ns, twistd_path(), "-n", "--pidfile=",
                "ticrypt-vmhost", "--config", path]
        reactor.spawnProcess(proc, ip, argv,  # type: ignore[attr-defined]
                             env=daemon_env(), path=os.path.dirname(path))
        self.addCleanup(proc.stop)
        await proc.ready
        return proc

    async def test_dnat_in_namespaces(self) -> None:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
            raise self.skipTest("needs root, ip and nft")  # type: ignore[misc]
        probe = subprocess.run(["ip", "netns", "list"], capture_output=True)
        if probe.returncode:
            raise self.skipTest("ip netns is not usable here")  # type: ignore[misc]
        client, host, vm = self.make_namespaces()

        server = LineWaiter()
        ip = shutil.which("ip")
        assert ip is not None
        server_proc = reactor.spawnProcess(  # type: ignore[attr-defined]
            server, ip, ["ip", "netns", "exec", vm, sys.executable, "-c", VM_SERVER],
            env=daemon_env())

        def stop_server() -> defer.Deferred[None]:
            if not server.ended.called:
                server_proc.signalProcess("KILL")
            return server.ended

        self.addCleanup(stop_server)
        await server.ready

        path = write_ini(self, mode="nft", listen_host="0.0.0.0", base="2200",
                         vms="1=10.231.2.2, 3=10.231.2.2:2222")
        proc = await self.start_vmhost(ip, host, path)
        self.assertIn('"mode": "nft"', proc.text())

        # through the DNAT rule, and the VM sees the client's own address
        self.assertEqual(await self.connect_from(client, "10.231.1.1", 2201),
                         "ok vm:hi from 10.231.1.2")
        # not forwarded: a port of no VM, and the VM's port 22 on the vmhost
        self.assertEqual(await self.connect_from(client, "10.231.1.1", 2202),
                         "fail ConnectionRefusedError")
        self.assertEqual(await self.connect_from(client, "10.231.1.1", 22),
                         "fail ConnectionRefusedError")
        self.assertIn("ticrypt_vmhost", self.sh("ip", "netns", "exec", host, "nft", "list",
                                                "tables"))

        # stopping the daemon removes its table
        await proc.stop()
        self.assertEqual(self.sh("ip", "netns", "exec", host, "nft", "list", "tables"), "")
        audit = [json.loads(line)["event"]
                 for line in open(os.path.join(os.path.dirname(path), "audit.log"))]
        self.assertEqual(audit, ["nft-installed", "nft-removed"])

        # masquerade = yes: the VM sees the vmhost's address instead
        path = write_ini(self, mode="nft", listen_host="10.231.1.1", masquerade="yes",
                         vms="1=10.231.2.2")
        proc = await self.start_vmhost(ip, host, path)
        self.assertEqual(await self.connect_from(client, "10.231.1.1", 2201),
                         "ok vm:hi from 10.231.2.1")
        await proc.stop()
        self.assertEqual(self.sh("ip", "netns", "exec", host, "nft", "list", "tables"), "")


# -- isolation ------------------------------------------------------------------------

ISOLATION = """\
\tchain isolate_forward {
\t\ttype filter hook forward priority -10; policy accept;
\t\tct state established,related accept
\t\tip daddr 10.77.3.11 tcp dport 22 ct status dnat accept comment "vm 1"
\t\tip6 daddr fd77:3::12 tcp dport 2222 ct status dnat accept comment "vm 2"
\t\tip daddr @vms4 counter drop comment "to VMs"
\t\tip6 daddr @vms6 counter drop comment "to VMs"
\t\tip saddr @vms4 ip daddr @backend4 accept comment "VMs to the backend"
\t\tip6 saddr @vms6 ip6 daddr @backend6 accept comment "VMs to the backend"
\t\tip saddr @vms4 counter log group 9 drop comment "from VMs"
\t\tip6 saddr @vms6 counter log group 9 drop comment "from VMs"
\t}
\tchain isolate_input {
\t\ttype filter hook input priority -10; policy accept;
\t\tct state established,related accept
\t\tip6 saddr @vms6 icmpv6 type nd-neighbor-solicit accept
\t\tip6 saddr @vms6 icmpv6 type nd-neighbor-advert accept
\t\tip6 saddr @vms6 icmpv6 type nd-router-solicit accept
\t\tip saddr @vms4 counter drop comment "VMs to this host"
\t\tip6 saddr @vms6 counter drop comment "VMs to this host"
\t}
}
"""

ISOLATION_SETS = """\
table inet ticrypt_vmhost {
\tset vms4 {
\t\ttype ipv4_addr;
\t\tflags interval;
\t\telements = { 10.77.3.0/24 }
\t}
\tset vms6 {
\t\ttype ipv6_addr;
\t\tflags interval;
\t\telements = { fd77:3::/64 }
\t}
\tset backend4 {
\t\ttype ipv4_addr;
\t\tflags interval;
\t\telements = { 10.77.1.2/31, 10.77.9.0/24 }
\t}
\tset backend6 {
\t\ttype ipv6_addr;
\t\tflags interval;
\t}
"""

ISOLATED = {"isolation": "yes", "vm_networks": "10.77.3.0/24, fd77:3::/64",
            "backend": "10.77.9.0/24, 10.77.1.2, 10.77.1.3", "log_group": "9",
            "listen_host": "0.0.0.0", "vms": "1=10.77.3.11, 2=[fd77:3::12]:2222"}


class IsolationConfigTests(SynchronousTestCase):
    def load(self, **keys: str) -> VmhostConfig:
        return load_config(write_ini(self, **keys), VmhostConfig)

    def test_golden(self) -> None:
        cfg = self.load(mode="nft", **ISOLATED)
        text = render_replace(vmhost_table(cfg.vmhost))
        head = "table inet ticrypt_vmhost\ndelete table inet ticrypt_vmhost\n"
        self.assertTrue(text.startswith(head + ISOLATION_SETS), text)
        self.assertTrue(text.endswith(ISOLATION), text)
        self.assertIn("dnat ip to 10.77.3.11:22", text)   # the DNAT in the same transaction

    def test_userspace_mode_has_no_dnat_and_no_forwarded_range(self) -> None:
        cfg = self.load(**ISOLATED)
        text = render_replace(vmhost_table(cfg.vmhost))
        self.assertNotIn("dnat", text)
        self.assertIn("ip daddr @vms4 counter drop", text)

    def test_off_changes_nothing(self) -> None:
        cfg = self.load(mode="nft", vms="1=10.0.0.11")
        self.assertFalse(cfg.vmhost.isolation)
        self.assertNotIn("isolate", render_replace(vmhost_table(cfg.vmhost)))
        sample = load_config(os.path.join(ROOT, "etc", "vmhost.ini"), VmhostConfig)
        self.assertEqual((sample.vmhost.isolation, sample.vmhost.vm_networks), (False, ()))

    def test_refusals(self) -> None:
        for keys, key, text in [
            ({"isolation": "yes"}, "vm_networks", "needs the VMs' networks"),
            ({"isolation": "yes", "vm_networks": "10.77.4.0/24"}, "vm_networks",
             "VM 1 (10.0.0.11) is in none of them"),
            ({"isolation": "yes", "vm_networks": "10.0.0.0/24", "backend": "10.0.0.0/16"},
             "backend", "overlaps vm_networks"),
            ({"vm_networks": "10.0.0.0/33"}, "vm_networks", "not an IP network"),
            ({"log_group": "-1"}, "log_group", ""),
        ]:
            e = self.assertRaises(ConfigError, self.load, **keys)
            self.assertEqual((e.section, e.key), ("vmhost", key), str(e))
            self.assertIn(text, str(e))

    def test_userspace_with_isolation_installs_and_listens(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from ticrypt.vmhost.tap import makeService

        cfg = self.load(**{**ISOLATED, "listen_host": "127.0.0.1", "vms": "1=10.77.3.11"})
        nft = MemoryNft()
        mem = MemoryReactorClock()
        top = makeService({"cfg": cfg}, reactor=mem, nft=nft)  # no forwarding check
        top.privilegedStartService()
        top.startService()
        self.assertEqual([port for port, *_ in mem.tcpServers], [2201])
        self.assertEqual(list(nft.tables), ["table inet ticrypt_vmhost"])
        self.assertIn("isolate_forward", nft.scripts[0])
        self.successResultOf(defer.ensureDeferred(_stop(top)))
        self.assertEqual(nft.tables, {})


class IsolationNamespaceTests(SynchronousTestCase):
    """client ns (10.231.1.2 plays the backend, 10.231.1.3 any other host)
    --veth-- vmhost ns (10.231.1.1 / 10.231.2.1, mode = nft, isolation)
    --veth-- VM ns (10.231.2.2, listening on 22 and 8080)."""

    def sh(self, *argv: str, input: str | None = None) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, input=input)
        if proc.returncode:
            raise AssertionError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        return proc.stdout

    def setUp(self) -> None:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
            raise SkipTest("needs root, ip and nft")
        pid = os.getpid() % 100000
        self.client, self.host, self.vm = (f"ti-{pid}-c", f"ti-{pid}-h", f"ti-{pid}-v")
        for ns in (self.client, self.host, self.vm):
            if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode:
                raise SkipTest("ip netns is not usable here")
            self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], capture_output=True)
            self.sh("ip", "-n", ns, "link", "set", "lo", "up")
        for ns_a, ns_b, net in ((self.client, self.host, "10.231.1"),
                                (self.vm, self.host, "10.231.2")):
            self.sh("ip", "-n", ns_a, "link", "add", "eth0", "type", "veth", "peer", "name",
                    "eth" + net[-1], "netns", ns_b)
            self.sh("ip", "-n", ns_a, "addr", "add", f"{net}.2/24", "dev", "eth0")
            self.sh("ip", "-n", ns_b, "addr", "add", f"{net}.1/24", "dev", "eth" + net[-1])
            self.sh("ip", "-n", ns_a, "link", "set", "eth0", "up")
            self.sh("ip", "-n", ns_b, "link", "set", "eth" + net[-1], "up")
            self.sh("ip", "-n", ns_a, "route", "add", "default", "via", f"{net}.1")
        self.sh("ip", "-n", self.client, "addr", "add", "10.231.1.3/24", "dev", "eth0")
        self.sh("ip", "netns", "exec", self.host, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        self.listen(self.vm, 22, 8080)
        self.listen(self.client, 9999)
        self.listen(self.host, 7777)

    def listen(self, ns: str, *ports: int) -> None:
        listen_in(self, ns, *ports)

    def probe(self, *probes: tuple[str, tuple[str, ...]]) -> list[dict[str, str]]:
        """Connect attempts from each ``(ns, targets)``, all at the same time."""
        return probes_from(self, *probes)

    def test_isolation_in_namespaces(self) -> None:
        from_client = ("10.231.1.1:2201", "10.231.2.2:22", "10.231.2.2:8080")
        from_vm = ("10.231.1.2:9999", "10.231.1.3:9999", "10.231.2.1:7777")
        keys = {"mode": "nft", "listen_host": "10.231.1.1", "vms": "1=10.231.2.2"}
        dnat_only = vmhost_table(load_config(write_ini(self, **keys), VmhostConfig).vmhost)
        table = vmhost_table(load_config(write_ini(
            self, **keys, isolation="yes", vm_networks="10.231.2.0/24", backend="10.231.1.2"),
            VmhostConfig).vmhost)
        # DNAT alone: everything routed, the test can tell the difference
        self.sh("ip", "netns", "exec", self.host, "nft", "-f", "-",
                input=render_replace(dnat_only))
        self.assertEqual(self.probe((self.client, from_client), (self.vm, from_vm)),
                         [dict.fromkeys(from_client, "ok"), dict.fromkeys(from_vm, "ok")])
        # with isolation (replacing the table in one transaction, twice: idempotent)
        for _ in range(2):
            self.sh("ip", "netns", "exec", self.host, "nft", "-f", "-",
                    input=render_replace(table))
        client_sees, vm_sees = self.probe((self.client, from_client), (self.vm, from_vm))
        self.assertEqual(client_sees, {"10.231.1.1:2201": "ok", "10.231.2.2:22": "TimeoutError",
                                       "10.231.2.2:8080": "TimeoutError"}, "from the client")
        self.assertEqual(vm_sees, {"10.231.1.2:9999": "ok", "10.231.1.3:9999": "TimeoutError",
                                   "10.231.2.1:7777": "TimeoutError"}, "from the VM")
        self.sh("ip", "netns", "exec", self.host, "nft", "-f", "-",
                input=render_delete(table))
        self.assertEqual(self.sh("ip", "netns", "exec", self.host, "nft", "list", "tables"), "")
