"""VM isolation and the license-server allow-list, proven with real rules
and real packets in network namespaces this test creates and always removes
(ticrypt.lab.netns: user, backend, router, VM host, two VMs, a license
server and an outside host in 10.77.0.0/16).

The claims share one deployment in one test method (namespaces and
daemons started in the test, stopped and removed in its cleanup: trial has
no per-class fixture that could keep processes across test methods); each
claim is its own ``claim_*`` method whose failure names it, and the claims
run at the same time, as do the probes inside a claim (a drop is proven by
a connect that times out: independent ones wait their timeout together).
A claim whose piece has not landed is skipped with one line naming that
piece, so the test is complete the moment it lands.  Root only; skipped
with one line where ``ip netns``, nft or dig are missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from test.daemon import run_command, script_path
from test.restfixture import run_admin
from ticrypt.lab import daemons, netns
from ticrypt.lab.deploy import Deployment
from ticrypt.lab.netns import (
    APP_PORT,
    BACKEND_IP,
    DNS_PORT,
    FORWARD_POOL,
    LICENSE_IP,
    LICENSE_NAME,
    LICENSE_PORTS,
    OUTSIDE_IP,
    REST_PORT,
    TUNNEL_PORT,
    USER_IP,
    VM_IPS,
    VMHOST_BASE,
    VMHOST_IP,
    VMHOST_VM_IP,
    Namespaces,
    NetnsDeployment,
    together,
)

#: a TCP client for one connection from inside a namespace: "ok LINE" or "fail ERROR"
CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    c.settimeout(float(sys.argv[3]))
    print("ok " + c.recv(100).decode().strip())
except OSError as e:
    print("fail " + type(e).__name__)
"""

#: a probe table: counts packets from given sources as they arrive,
#: before any other rule can drop them (but those to an excepted TCP port)
PROBE = """table inet ticrypt_probe_%s {
    chain pre {
        type filter hook prerouting priority -400; policy accept;
        %s
        ip saddr { %s } counter
    }
}
"""


def missing_tools() -> str | None:
    why = netns.netns_missing()
    if why is None and shutil.which("dig") is None:
        why = "dig is not installed"
    if why is None and shutil.which("curl") is None:
        why = "curl is not installed"
    return why


async def until(check: Any, seconds: float = 20.0) -> Any:
    """Poll the async ``check()`` every 100 ms until it returns a true
    value (returned) or ``seconds`` passed (the last value)."""
    result = None
    for _ in range(int(seconds / 0.1)):
        result = await check()
        if result:
            return result
        await task.deferLater(reactor, 0.1, lambda: None)
    return result


class HelperTests(TestCase):
    """The namespace helpers that need no namespace."""

    def test_parse_ranges(self) -> None:
        self.assertEqual(netns.parse_ranges("1-3, 22,8080-8081"), [1, 2, 3, 22, 8080, 8081])

    def test_sweep_finds_exactly_the_listening_port(self) -> None:
        import socket

        with socket.socket() as open_, socket.socket() as closed:
            open_.bind(("127.0.0.1", 0))
            open_.listen(8)
            closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
            ports = [open_.getsockname()[1], closed.getsockname()[1]]
            self.assertEqual(netns.sweep([("127.0.0.1", p) for p in ports], timeout=5, batch=1),
                             [("127.0.0.1", ports[0])])

    def test_names_carry_the_pid(self) -> None:
        spaces = Namespaces("tci")
        self.assertEqual(spaces.name("vm1"), f"tci{os.getpid() % 100000}-vm1")
        self.assertEqual(spaces.exec("vm1", ["true"])[:4],
                         ["ip", "netns", "exec", spaces.name("vm1")])
        # veth names (tag + 2 characters) fit the kernel's 15
        self.assertLessEqual(len(spaces.tag) + 2, 15)


class IsolationSystemTests(TestCase):
    timeout = 600

    def require(self, *why: str | None) -> None:
        """Skip with the first reason given (a missing piece), if any."""
        for reason in why:
            if reason:
                raise self.skipTest(reason)  # type: ignore[misc]

    def pieces(self) -> dict[str, str | None]:
        return {"vmc": netns.vmc_firewall_missing(), "vmhost": netns.vmhost_isolation_missing(),
                "allowedlist": netns.allowedlist_missing()}

    def network(self) -> Namespaces:
        self.require(missing_tools())
        spaces = Namespaces("tci")
        self.addCleanup(spaces.remove)
        spaces.create()
        return spaces

    async def deploy(self, spaces: Namespaces) -> NetnsDeployment:
        """Every role in the namespaces, with the isolation pieces that have landed."""
        pieces = self.pieces()
        dep = Deployment(self.mktemp(), NetnsDeployment.addresses(),
                         comment="written by test_isolation_system")
        self.logs: dict[str, Any] = {}

        def echo_to(name: str) -> Any:
            log = self.logs[name] = open(dep.path(f"{name}.log"), "a")  # noqa: SIM115
            self.addCleanup(log.close)

            def echo(_name: str, line: str) -> None:
                log.write(line + "\n")
                log.flush()

            return echo

        async def start_in(role: str, plugin: str, config: str) -> daemons.Daemon:
            name = f"{plugin}-{role}"
            proc = netns.spawn_in(reactor, spaces, role, plugin, config, echo=echo_to(name))
            self.addCleanup(proc.stop)
            await proc.ready
            return proc

        async def helper(role: str, args: list[str]) -> daemons.Daemon:
            proc = netns.helper_in(reactor, spaces, role, args, echo=echo_to(f"helper-{role}"))
            self.addCleanup(proc.stop)
            await proc.ready
            return proc

        async def run_in(role: str | None, args: list[str]) -> tuple[int, str, str]:
            if role is None and args[0] == "ticrypt-admin":  # its main, in this process
                return run_admin(args[1:])
            argv = [script_path(args[0]), *args[1:]]
            return await run_command(spaces.exec(role, argv) if role else argv)

        d = NetnsDeployment(reactor, spaces, dep, start_in, run_in, helper,
                            vmc_firewall=pieces["vmc"] is None,
                            vmhost_isolation=pieces["vmhost"] is None,
                            allowedlist=pieces["allowedlist"] is None)
        await d.start()
        return d

    # -- tools inside the namespaces ---------------------------------------------

    async def connect(self, spaces: Namespaces, role: str, host: str, port: int,
                      timeout: float = 2.0) -> str:
        code, out, err = await run_command(spaces.exec(role, [
            sys.executable, "-c", CLIENT, host, str(port), str(timeout)]))
        self.assertEqual(code, 0, err)
        return out.strip()

    async def sweep(self, spaces: Namespaces, role: str, hosts: list[str],
                    ports: str) -> list[str]:
        """The ``host:port`` that accept a TCP connection from ``role``."""
        code, out, err = await run_command(spaces.exec(role, [
            sys.executable, "-m", "ticrypt.lab.netns", "sweep", "--ports", ports,
            "--timeout", "2", *hosts]), env=daemons.daemon_env(), timeout=120)
        self.assertEqual(code, 0, err)
        return list(json.loads(out))

    def probe(self, spaces: Namespaces, role: str, sources: list[str],
              except_port: int | None = None, table: str = "all") -> None:
        """Count every packet from ``sources`` arriving in ``role`` (but
        those to TCP ``except_port``) in probe table ``table``."""
        hosts = ", ".join(sources)
        skip = f"ip saddr {{ {hosts} }} tcp dport {except_port} accept" if except_port else ""
        spaces.nft(role, PROBE % (table, skip, hosts))

    def probed(self, spaces: Namespaces, role: str, table: str = "all") -> int:
        text = spaces.nft_list(role, "table", "inet", f"ticrypt_probe_{table}")
        m = re.search(r"counter packets (\d+)", text)
        assert m is not None, text
        return int(m.group(1))

    async def dig(self, spaces: Namespaces, role: str, name: str) -> tuple[str, list[str]]:
        """(status, A answers) of ``name`` from the allowedlist responder."""
        code, out, err = await run_command(spaces.exec(role, [
            "dig", f"@{BACKEND_IP}", "-p", str(DNS_PORT), "+time=2", "+tries=1", name, "A"]))
        m = re.search(r"status: (\w+)", out)
        if m is None:
            return f"no answer ({code}): {(out + err).strip()[-200:]}", []
        answers = re.findall(r"^\S+\s+\d+\s+IN\s+A\s+(\S+)$", out, re.M)
        return m.group(1), answers

    def audit(self, dep: Deployment) -> list[dict[str, Any]]:
        """Every audit line of the deployment's roles."""
        lines = []
        for name in sorted(os.listdir(dep.dir)):
            if name.endswith("audit.log"):
                with open(dep.path(name)) as f:
                    lines += [dict(json.loads(line), file=name) for line in f if line.strip()]
        return lines

    # -- the proofs ----------------------------------------------------------------

    async def test_network_routes_everything_without_rules(self) -> None:
        """The control experiment: with no rule applied, the network itself
        routes VM -> outside, VM -> license, VM1 -> VM2 and outside -> VM,
        and the probes count those packets.  So where the proofs below see
        nothing arrive, the rules stopped it, not the topology."""
        spaces = self.network()
        self.probe(spaces, "outside", [VM_IPS[1], VM_IPS[2]])
        self.probe(spaces, "vm2", [VM_IPS[1], OUTSIDE_IP])
        # and the sweep sees an open port where there is one
        server = netns.helper_in(reactor, spaces, "vm2", ["serve", f"--tcp={VM_IPS[2]}:23"])
        self.addCleanup(server.stop)
        await server.ready
        found, *refused = await together(
            self.sweep(spaces, "outside", [VM_IPS[2]], "20-30"),
            self.connect(spaces, "vm1", OUTSIDE_IP, 80),
            self.connect(spaces, "vm2", OUTSIDE_IP, 80),
            self.connect(spaces, "vm1", VM_IPS[2], 22),
            self.connect(spaces, "outside", VM_IPS[2], 22))
        self.assertEqual(found, [f"{VM_IPS[2]}:23"])
        self.assertEqual(refused, ["fail ConnectionRefusedError"] * 4)
        self.assertGreaterEqual(self.probed(spaces, "outside"), 2)
        self.assertGreaterEqual(self.probed(spaces, "vm2"), 13)

    async def test_isolation_claims(self) -> None:
        """Every claim of the isolation (the ``claim_*`` methods below, each
        its own check) on one deployment of every role in the namespaces,
        with every rule that has landed: the claims run at the same time
        (none sends what another counts) and a failure names its claim.
        Claims whose piece has not landed are skipped with one line naming
        the piece, after the others ran."""
        pieces = self.pieces()
        claims = {
            "the control channel and a tunnel from the user":
                (self.claim_control_channel_and_tunnel_from_the_user, ()),
            "VM ports closed from the user and the outside":
                (self.claim_vm_ports_closed_from_user_and_outside, ("vmc", "vmhost")),
            "VM to outside dropped and audited":
                (self.claim_vm_to_outside_dropped_and_audited, ("vmc",)),
            "the license server through the allow-list":
                (self.claim_license_server_through_the_allow_list, ("allowedlist", "vmc")),
            "VM 1 cannot reach VM 2":
                (self.claim_vm1_cannot_reach_vm2, ("vmc", "vmhost")),
        }
        missing = {name: why for name, (_, needs) in claims.items()
                   for why in [next((pieces[p] for p in needs if pieces[p]), None)] if why}
        spaces = self.network()
        d = await self.deploy(spaces)
        names = [name for name in claims if name not in missing]
        results = await defer.DeferredList(
            [defer.ensureDeferred(claims[name][0](spaces, d)) for name in names],
            consumeErrors=True)
        failed: list[str] = []
        for name, (ok, result) in zip(names, results, strict=True):
            if not ok:
                assert isinstance(result, Failure)
                why = (result.getErrorMessage() if result.check(self.failureException)
                       else result.getTraceback())
                failed.append(f"claim '{name}' does not hold: {why}")
        if failed:
            self.fail("\n".join(failed))
        if missing:
            raise self.skipTest("; ".join(f"{name}: {why}"  # type: ignore[misc]
                                          for name, why in missing.items()))

    async def claim_control_channel_and_tunnel_from_the_user(
            self, spaces: Namespaces, d: NetnsDeployment) -> None:
        """ticrypt exec (control channel through the proxy) and a tunnel
        (connect -> proxy -> VM host -> port 22 of the VM -> the VM's web
        server) from the user namespace."""
        _, out = await d.cli("exec", "vm1", "--", "cat", "/proc/self/net/route")
        # the command ran in VM 1's namespace: its routes are the VM link's
        self.assertIn(f"{spaces.tag}e1", out, "ticrypt exec did not run in VM 1")
        _, out = await d.cli("tunnel", "open", "vm1", "--port", str(APP_PORT))
        m = re.search(rf"^127\.0\.0\.1:(\d+) -> vm1:{APP_PORT}$", out, re.M)
        assert m is not None, out
        code, body, err = await run_command(spaces.exec("user", [
            "curl", "-sS", "--max-time", "30", f"http://127.0.0.1:{m.group(1)}/vm.txt"]))
        self.assertEqual((code, body), (0, "vm1\n"), f"curl through the tunnel: {err}")
        # the VM host forwards VM N's port in nft mode: its table is in the kernel
        self.assertIn("ticrypt_vmhost", spaces.nft_list("vmhost", "tables"))

    async def claim_vm_ports_closed_from_user_and_outside(
            self, spaces: Namespaces, d: NetnsDeployment) -> None:
        """A connect sweep of the VMs and the VM host from the user and the
        outside namespaces: no port of a VM answers; of the VM host only the
        forwarded range (VM N's port 22 through DNAT) may; and not one
        packet from those hosts reaches a VM but on the tunnel port."""
        for n in VM_IPS:
            self.probe(spaces, f"vm{n}", [USER_IP, OUTSIDE_IP], except_port=TUNNEL_PORT,
                       table="from_user_and_outside")
        forwarded = {f"{VMHOST_IP}:{VMHOST_BASE + n}" for n in VM_IPS}
        ports = f"1-1024,{APP_PORT},{VMHOST_BASE + 1}-{VMHOST_BASE + 9},6000-6009"
        roles = ("user", "outside")
        found = await together(*(self.sweep(spaces, role, [*VM_IPS.values(), VMHOST_IP,
                                                         VMHOST_VM_IP], ports)
                               for role in roles))
        for role, opened in zip(roles, found, strict=True):
            self.assertEqual(set(opened) - forwarded, set(), f"open from {role}")
        for n in VM_IPS:
            self.assertEqual(self.probed(spaces, f"vm{n}", "from_user_and_outside"), 0,
                             f"packets from the user or the outside reached vm{n}")

    async def claim_vm_to_outside_dropped_and_audited(
            self, spaces: Namespaces, d: NetnsDeployment) -> None:
        """VM -> outside host: no packet arrives there, and each attempt is
        an egress-denied audit line (VM address, destination, port, protocol).
        (VM 2 tries: VM 1's denied-egress lines are spent on the VM 1 ->
        VM 2 sweep, past the lines one interval may write.)"""
        vm = VM_IPS[2]
        self.probe(spaces, "outside", [vm], table="from_vm")
        tried = await together(*(self.connect(spaces, "vm2", OUTSIDE_IP, port)
                               for port in (80, 443)))
        self.assertEqual([t.split()[0] for t in tried], ["fail", "fail"], tried)
        self.assertEqual(self.probed(spaces, "outside", "from_vm"), 0,
                         "packets from VM 2 reached the outside host")

        def denied() -> list[dict[str, Any]]:
            return [e for e in self.audit(d.dep) if e["event"] == "egress-denied"
                    and e["destination"] == OUTSIDE_IP and e["vm"] == vm]

        async def both() -> bool:  # one line per flow: they may come in two writes
            return {e["port"] for e in denied()} >= {80, 443}

        await until(both)
        found = denied()
        self.assertEqual({(e["port"], e["protocol"]) for e in found}, {(80, "tcp"), (443, "tcp")},
                         f"egress-denied lines: {found}")

    async def claim_license_server_through_the_allow_list(
            self, spaces: Namespaces, d: NetnsDeployment) -> None:
        """VM -> license server: blocked and NXDOMAIN before the superadmin
        lists it; after ``ticrypt allowlist add`` the name resolves to a
        forwarding address and only the listed port connects; removing the
        entry closes it again."""
        listed, unlisted = LICENSE_PORTS
        blocked, before = await together(self.connect(spaces, "vm1", LICENSE_IP, listed),
                                       self.dig(spaces, "vm1", LICENSE_NAME))
        self.assertEqual(blocked.split()[0], "fail", "the license server before the entry")
        self.assertEqual(before, ("NXDOMAIN", []), "the name before the entry")

        await d.cli("allowlist", "add", LICENSE_NAME, "--port", str(listed),
                    "--comment", "license server")

        async def resolved() -> list[str]:
            return (await self.dig(spaces, "vm1", LICENSE_NAME))[1]

        answers = await until(resolved, 10.0)
        self.assertTrue(answers, "the name did not resolve after allowlist add")
        import ipaddress

        for a in answers:
            self.assertIn(ipaddress.ip_address(a), ipaddress.ip_network(FORWARD_POOL))
        address = answers[0]
        on_listed, on_unlisted, direct, other = await together(
            self.connect(spaces, "vm1", address, listed),
            self.connect(spaces, "vm1", address, unlisted),
            # the license server's own address stays closed to the VM
            self.connect(spaces, "vm1", LICENSE_IP, listed),
            # an unlisted name is still refused
            self.dig(spaces, "vm1", "other.example.org"))
        self.assertEqual(on_listed, f"ok license {listed}", "the listed port")
        self.assertEqual(on_unlisted.split()[0], "fail", "the unlisted port")
        self.assertEqual(direct.split()[0], "fail", "the license server's own address")
        self.assertEqual(other[0], "NXDOMAIN", "an unlisted name")

        # the unlisted port was dropped by allowedlist's table on the backend
        # (vmc lets the forwarding pool through): audited there (the line
        # comes with allowedlist's next write, while the entry is removed)
        async def denied_at_backend() -> list[dict[str, Any]]:
            return [e for e in self.audit(d.dep) if e["event"] == "egress-denied"
                    and e["file"].startswith("allowedlist") and e["destination"] == address
                    and e["port"] == unlisted]

        async def remove() -> None:
            await d.cli("allowlist", "remove", LICENSE_NAME)

            async def gone() -> bool:
                return (await self.dig(spaces, "vm1", LICENSE_NAME))[0] == "NXDOMAIN"

            self.assertTrue(await until(gone, 10.0), "the name still resolves after remove")

            async def closed() -> bool:
                return (await self.connect(spaces, "vm1", address, listed)).startswith("fail")

            self.assertTrue(await until(closed, 10.0),
                            "the license port is still open after remove")

        audited, _ = await together(until(denied_at_backend), remove())
        self.assertTrue(audited, "no egress-denied line at allowedlist for the unlisted port")

    async def claim_vm1_cannot_reach_vm2(self, spaces: Namespaces, d: NetnsDeployment) -> None:
        """VM 1 -> VM 2: no port answers (the tunnel port included) and not
        one packet arrives at VM 2; while VM 1 still reaches the backend it
        needs (rest)."""
        self.probe(spaces, "vm2", [VM_IPS[1]], table="from_vm1")
        to_vm2, to_rest = await together(
            self.sweep(spaces, "vm1", [VM_IPS[2]], f"1-1024,{APP_PORT},{TUNNEL_PORT}"),
            self.sweep(spaces, "vm1", [BACKEND_IP], str(REST_PORT)))
        self.assertEqual(to_vm2, [], "ports of VM 2 open from VM 1")
        self.assertEqual(self.probed(spaces, "vm2", "from_vm1"), 0,
                         "packets from VM 1 reached VM 2")
        self.assertEqual(to_rest, [f"{BACKEND_IP}:{REST_PORT}"], "VM 1 does not reach rest")


class Watcher(ProcessProtocol):
    """``ticrypt-lab --netns``: fires ``running`` on its instructions."""

    def __init__(self) -> None:
        self.output = b""
        self.running: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[int | None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"deployment is running" in self.output and not self.running.called:
            self.running.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.running.called:
            self.running.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(getattr(reason.value, "exitCode", None))


class LabNetnsTests(TestCase):
    timeout = 180

    async def test_lab_netns_runs_and_removes_everything(self) -> None:
        """``ticrypt-lab --netns`` builds the same deployment, says how to
        enter each namespace, and leaves no namespace behind on Ctrl-C."""
        why = missing_tools()
        if why:
            raise self.skipTest(why)  # type: ignore[misc]
        workdir = os.path.abspath(self.mktemp())
        watcher = Watcher()
        proc = reactor.spawnProcess(  # type: ignore[attr-defined]
            watcher, script_path("ticrypt-lab"), [script_path("ticrypt-lab"), "--netns",
                                                  "--dir", workdir], env=daemons.daemon_env())
        tag = f"tcl{proc.pid % 100000}"

        def stop() -> defer.Deferred[int | None]:
            if not watcher.ended.called:
                proc.signalProcess("KILL")
            return watcher.ended

        self.addCleanup(lambda: [subprocess.run(["ip", "netns", "del", f"{tag}-{r}"],
                                                capture_output=True) for r in netns.ROLES])
        self.addCleanup(stop)
        await watcher.running
        out = watcher.output.decode()
        for role in netns.ROLES:
            self.assertIn(f"ip netns exec {tag}-{role} bash", out)
        self.assertIn(f"{tag}-vm1", subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                   text=True).stdout)
        proc.signalProcess("INT")
        code = await watcher.ended
        self.assertEqual(code, 0, watcher.output.decode())
        self.assertNotIn(tag, subprocess.run(["ip", "netns", "list"], capture_output=True,
                                             text=True).stdout)
        self.assertIn("ticrypt-lab: stopping", watcher.output.decode())
