"""The proxy's kernel lease mode (ticrypt.proxy.nftleases): the rules it
renders (in memory), and real nftables DNAT rules inside network namespaces
this test creates and always removes (root only): user -- proxy -- VM host,
the user with two addresses, of which only the lease's gets through."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from typing import Any

from twisted.internet import defer, task
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

from ticrypt.audit import AuditLog
from ticrypt.nft.apply import INft, MemoryNft, NftError
from ticrypt.proxy.leases import LeaseService
from ticrypt.proxy.nftleases import NftOpener
from ticrypt.proxy.ports import Lease, LeaseLimits, LeaseTable


def make_service(nft: INft, table: str, clock: task.Clock) -> LeaseService:
    opener = NftOpener(nft, table)
    service = LeaseService(table=LeaseTable((6000, 6003), LeaseLimits(idle_timeout=60)),
                           opener=opener, clock=clock, audit=AuditLog(None, clock),
                           journal=None, public_host="proxy")
    opener.service = service
    return service


def open_lease(t: SynchronousTestCase, s: LeaseService, address: str, target: str,
               vm: str = "vm-1") -> Lease:
    d = defer.ensureDeferred(s.open(user="alice", session="s1", vm=vm, target=target,
                                    address=address, expires=10_000.0))
    lease, _ = t.successResultOf(d)
    return lease


class RenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.nft = MemoryNft()
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.service = make_service(self.nft, "ticrypt_proxy", self.clock)
        self.service.startService()
        self.successResultOf(self.service.ready)

    def test_rule_per_lease_pinned_to_source(self) -> None:
        lease = open_lease(self, self.service, "::ffff:192.0.2.7", "10.0.0.5:2201")
        script = self.nft.scripts[-1]
        self.assertIn(f"ip saddr 192.0.2.7 fib daddr type local tcp dport {lease.port} "
                      "dnat ip to 10.0.0.5:2201", script)
        self.assertIn("ip daddr 10.0.0.5 tcp dport 2201 ct status dnat masquerade", script)
        self.assertEqual(list(self.nft.tables), ["table inet ticrypt_proxy"])

    def test_close_removes_rule_and_stop_removes_table(self) -> None:
        a = open_lease(self, self.service, "192.0.2.7", "10.0.0.5:2201")
        open_lease(self, self.service, "192.0.2.8", "10.0.0.6:2201", vm="vm-2")
        self.assertTrue(self.service.close(a.id, "closed"))
        script = self.nft.scripts[-1]
        self.assertNotIn("192.0.2.7", script)
        self.assertIn("192.0.2.8", script)
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.nft.tables, {})
        # the lease stays in the table (journaled) for the next start
        self.assertEqual(len(self.service.leases()), 1)

    def test_name_target_or_mixed_versions_refused(self) -> None:
        for address, target in (("192.0.2.7", "vmhost.example:22"),
                                ("2001:db8::7", "10.0.0.5:22")):
            d = defer.ensureDeferred(self.service.open(
                user="alice", session="s1", vm="vm-1", target=target, address=address,
                expires=10_000.0))
            self.assertEqual(self.failureResultOf(d).value.code,  # type: ignore[attr-defined]
                             "bad-target")
        self.assertEqual(self.service.leases(), [])
        # no port was set aside: all four ports still serve good leases
        ports = {open_lease(self, self.service, "192.0.2.7", "10.0.0.5:22", vm=f"vm-{i}").port
                 for i in range(4)}
        self.assertEqual(ports, {6000, 6001, 6002, 6003})

    def test_nft_failure_at_start_is_a_startup_error(self) -> None:
        nft = MemoryNft()
        nft.fail_next = "Operation not permitted"
        service = make_service(nft, "ticrypt_proxy", self.clock)
        service.startService()
        failure = self.failureResultOf(service.ready)
        self.assertIn("Operation not permitted", str(failure.value))
        self.assertEqual((failure.value.section, failure.value.key),  # type: ignore
                         ("leases", "mode"))

    def test_never_idle(self) -> None:
        open_lease(self, self.service, "192.0.2.7", "10.0.0.5:2201")
        self.clock.advance(3600)
        self.assertEqual(len(self.service.leases()), 1)
        self.clock.advance(10_000)
        self.assertEqual(self.service.leases(), [])


# ---------------------------------------------------------------- namespaces

PY = sys.executable
ECHO = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    print("accept", peer[0], flush=True)
    c.settimeout(10)
    data = c.recv(1024)
    c.sendall(data)
    c.close()
"""
CLIENT = """
import json, socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(); s.settimeout(5); s.bind((src, 0))
try:
    s.connect((dst, port)); s.sendall(b"ping"); got = s.recv(1024)
    print(json.dumps({"ok": True, "got": got.decode()}))
except OSError as e:
    print(json.dumps({"ok": False, "error": type(e).__name__}))
"""


@implementer(INft)
class NetnsNft:
    """``nft -f -`` inside network namespace ``ns`` (blocking: a test helper)."""

    def __init__(self, ns: str):
        self.ns = ns

    def apply(self, script: str) -> defer.Deferred[None]:
        proc = subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"],
                              input=script.encode(), capture_output=True, timeout=30)
        if proc.returncode != 0:
            return defer.fail(NftError(proc.stderr.decode(errors="replace").strip()))
        return defer.succeed(None)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


class NamespaceTests(SynchronousTestCase):
    """user (10.231.1.1 and .3) -- proxy (10.231.1.2 | 10.231.2.2) -- vmhost (10.231.2.1)."""

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root for network namespaces and nftables")
        if shutil.which("ip") is None or shutil.which("nft") is None:
            raise SkipTest("needs the ip and nft commands")
        tag = f"tcl{os.getpid() % 100000}"
        self.user, self.proxy, self.vm = f"{tag}u", f"{tag}p", f"{tag}v"
        for ns in (self.user, self.proxy, self.vm):
            try:
                sh("ip", "netns", "add", ns)
            except subprocess.CalledProcessError as e:
                raise SkipTest(f"cannot create a network namespace: {e.stderr!r}") from None
            self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], capture_output=True,
                            timeout=30)
        x = ["ip", "netns", "exec"]
        sh("ip", "link", "add", f"{tag}a", "netns", self.user, "type", "veth", "peer", "name",
           f"{tag}b", "netns", self.proxy)
        sh("ip", "link", "add", f"{tag}c", "netns", self.proxy, "type", "veth", "peer", "name",
           f"{tag}d", "netns", self.vm)
        for ns, dev, addrs in ((self.user, f"{tag}a", ["10.231.1.1/24", "10.231.1.3/24"]),
                               (self.proxy, f"{tag}b", ["10.231.1.2/24"]),
                               (self.proxy, f"{tag}c", ["10.231.2.2/24"]),
                               (self.vm, f"{tag}d", ["10.231.2.1/24"])):
            for addr in addrs:
                sh(*x, ns, "ip", "addr", "add", addr, "dev", dev)
            sh(*x, ns, "ip", "link", "set", dev, "up")
            sh(*x, ns, "ip", "link", "set", "lo", "up")
        sh(*x, self.proxy, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.echo = subprocess.Popen([*x, self.vm, PY, "-c", ECHO, "10.231.2.1", "7000"],
                                     stdout=subprocess.PIPE, text=True)
        self.addCleanup(self._stop_echo)
        self.assertEqual(self._echo_line(), "ready")

    def _stop_echo(self) -> None:
        self.echo.kill()
        self.echo.wait(timeout=30)
        assert self.echo.stdout is not None
        self.echo.stdout.close()

    def _echo_line(self, timeout: float = 10.0) -> str | None:
        assert self.echo.stdout is not None
        ready, _, _ = select.select([self.echo.stdout], [], [], timeout)
        return self.echo.stdout.readline().strip() if ready else None

    def connect(self, source: str, port: int) -> dict[str, Any]:
        out = subprocess.run(["ip", "netns", "exec", self.user, PY, "-c", CLIENT, source,
                              "10.231.1.2", str(port)], capture_output=True, text=True,
                             timeout=30)
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def test_only_the_pinned_address_gets_through(self) -> None:
        clock = task.Clock()
        clock.advance(1000)
        nft = NetnsNft(self.proxy)
        service = make_service(nft, "ticrypt_proxy_test", clock)
        service.startService()
        self.successResultOf(service.ready)
        self.addCleanup(nft.apply, "table inet ticrypt_proxy_test\n"
                        "delete table inet ticrypt_proxy_test\n")
        lease = open_lease(self, service, "10.231.1.1", "10.231.2.1:7000")
        self.assertEqual(self.connect("10.231.1.1", lease.port), {"ok": True, "got": "ping"})
        self.assertEqual(self._echo_line(), "accept 10.231.2.2")  # masqueraded
        refused = self.connect("10.231.1.3", lease.port)
        self.assertFalse(refused["ok"], refused)
        self.assertIsNone(self._echo_line(timeout=0.5))  # nothing reached the VM host
        self.assertTrue(service.close(lease.id, "closed"))
        self.assertFalse(self.connect("10.231.1.1", lease.port)["ok"])
        self.successResultOf(service.stopService())
        tables = subprocess.run(["ip", "netns", "exec", self.proxy, "nft", "list", "tables"],
                                capture_output=True, text=True, timeout=30).stdout
        self.assertNotIn("ticrypt_proxy_test", tables)
