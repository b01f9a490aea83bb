"""ticrypt.nft: golden ruleset text, validation, and applying through nft."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

from twisted.internet import reactor, task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ticrypt.nft.apply import MemoryNft, NftError, OwnedTable, SpawnNft
from ticrypt.nft.ruleset import (
    Chain,
    Dnat,
    NamedSet,
    Rule,
    Table,
    dnat,
    dnat_table,
    render_delete,
    render_replace,
)

GOLDEN_VMHOST = """\
table inet ticrypt_vmhost
delete table inet ticrypt_vmhost
table inet ticrypt_vmhost {
\tchain prerouting {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tmeta nfproto ipv4 fib daddr type local tcp dport 2201 dnat ip to 10.9.0.2:22 comment "vm 1"
\t\tip daddr 10.8.0.1 tcp dport 2202 dnat ip to 10.9.0.3:2222
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta nfproto ipv4 fib daddr type local tcp dport 2201 dnat ip to 10.9.0.2:22 comment "vm 1"
\t\tip daddr 10.8.0.1 tcp dport 2202 dnat ip to 10.9.0.3:2222
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority 100; policy accept;
\t\tip daddr 10.9.0.2 tcp dport 22 ct status dnat masquerade
\t\tip daddr 10.9.0.3 tcp dport 2222 ct status dnat masquerade
\t}
}
"""

VMHOST_RULES = (Dnat(2201, "10.9.0.2", 22, comment="vm 1"),
                Dnat(2202, "10.9.0.3", 2222, daddr="10.8.0.1"))


class RenderTests(SynchronousTestCase):
    def test_golden_vmhost(self) -> None:
        table = dnat_table("ticrypt_vmhost", VMHOST_RULES, masquerade=True)
        self.assertEqual(render_replace(table), GOLDEN_VMHOST)

    def test_delete(self) -> None:
        self.assertEqual(render_delete(Table("ticrypt_vmhost")),
                         "table inet ticrypt_vmhost\ndelete table inet ticrypt_vmhost\n")

    def test_no_masquerade_no_local(self) -> None:
        text = render_replace(dnat_table("t", VMHOST_RULES[:1], local=False))
        self.assertNotIn("postrouting", text)
        self.assertNotIn("output", text)
        self.assertIn("chain prerouting", text)

    def test_ipv6_and_pinned_source(self) -> None:
        self.assertEqual(dnat(Dnat(6001, "fd00::2", 22)).render(),
                         "meta nfproto ipv6 fib daddr type local tcp dport 6001 dnat ip6 to [fd00::2]:22")
        # a proxy lease: pinned (normalised) source address
        self.assertEqual(dnat(Dnat(6001, "10.0.0.9", 2201, saddr="::ffff:192.0.2.7")).render(),
                         "ip saddr 192.0.2.7 fib daddr type local tcp dport 6001 dnat ip to 10.0.0.9:2201")

    def test_sets_and_filter_chain(self) -> None:
        table = Table("ticrypt_x", "inet",
                      chains=(Chain("fwd", (Rule("ip daddr @allowed accept"),),
                                    type="filter", hook="forward", policy="drop"),),
                      sets=(NamedSet("allowed", "ipv4_addr", ("10.0.0.1", "10.0.0.2"),
                                     ("interval",)),))
        self.assertIn("\tset allowed {\n\t\ttype ipv4_addr;\n\t\tflags interval;\n"
                      "\t\telements = { 10.0.0.1, 10.0.0.2 }\n\t}\n", render_replace(table))
        self.assertIn("type filter hook forward priority 0; policy drop;", render_replace(table))

    def test_refusals(self) -> None:
        bad = [
            lambda: render_replace(Table("bad name")),
            lambda: render_replace(Table("t", "bridge")),
            lambda: dnat(Dnat(0, "10.0.0.1", 22)),
            lambda: dnat(Dnat(22, "10.0.0.1", 65536)),
            lambda: dnat(Dnat(22, "vm1.example", 22)),
            lambda: dnat(Dnat(22, "10.0.0.1", 22, daddr="fd00::1")),
            lambda: Rule("accept; flush ruleset").render(),
            lambda: Rule("accept }\ntable ip x {").render(),
            lambda: Rule("accept", comment='x" ; drop').render(),
            lambda: NamedSet("s", "ipv4_addr", ("1.1.1.1 }",)).render(),
            lambda: Chain("c", type="nat", hook="sideways").render(),
        ]
        for make in bad:
            self.assertRaises(ValueError, make)


class OwnedTableTests(SynchronousTestCase):
    def test_install_idempotent_and_remove(self) -> None:
        nft = MemoryNft()
        owned = OwnedTable(nft)
        table = dnat_table("ticrypt_vmhost", VMHOST_RULES)
        self.successResultOf(task.ensureDeferred(owned.install(table)))
        self.successResultOf(task.ensureDeferred(owned.install(table)))
        self.assertEqual(len(nft.scripts), 1)
        self.assertEqual(list(nft.tables), ["table inet ticrypt_vmhost"])
        self.successResultOf(task.ensureDeferred(owned.remove()))
        self.assertEqual(nft.tables, {})
        self.successResultOf(task.ensureDeferred(owned.remove()))
        self.assertEqual(len(nft.scripts), 2)

    def test_failed_apply_keeps_state(self) -> None:
        nft = MemoryNft()
        owned = OwnedTable(nft)
        nft.fail_next = "nft failed (exit 1): Error: Could not process rule"
        f = self.failureResultOf(task.ensureDeferred(owned.install(dnat_table("t", VMHOST_RULES))),
                                 NftError)
        self.assertIn("Could not process rule", str(f.value))
        self.assertIsNone(owned.installed)
        self.assertEqual(nft.tables, {})


def fake_nft(testcase: TestCase, body: str) -> str:
    """A stand-in nft: a shell script with ``body``."""
    d = testcase.mktemp()
    os.makedirs(d)
    path = os.path.join(d, "nft")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, stat.S_IRWXU)
    return path


class SpawnNftTests(TestCase):
    timeout = 30

    async def test_success_passes_script_on_stdin(self) -> None:
        out = self.mktemp()
        nft = fake_nft(self, f'[ "$1" = -f ] && [ "$2" = - ] && cat > {out}')
        await SpawnNft(reactor, reactor, nft=nft).apply("table inet t\n")
        with open(out) as f:
            self.assertEqual(f.read(), "table inet t\n")

    async def test_failure_carries_stderr(self) -> None:
        nft = fake_nft(self, 'cat >/dev/null; echo "Error: Operation not permitted" >&2; exit 1')
        with self.assertRaises(NftError) as cm:
            await SpawnNft(reactor, reactor, nft=nft).apply("table inet t\n")
        self.assertEqual(str(cm.exception), "nft failed (exit 1): Error: Operation not permitted")

    async def test_missing_binary(self) -> None:
        with self.assertRaises(NftError) as cm:
            await SpawnNft(reactor, reactor, nft="/nonexistent/nft").apply("")
        self.assertIn("not found: install nftables", str(cm.exception))

    async def test_timeout_kills(self) -> None:
        clock = task.Clock()
        nft = fake_nft(self, "exec sleep 60")
        d = SpawnNft(reactor, clock, nft=nft, timeout=5).apply("")
        clock.advance(5)
        with self.assertRaises(NftError) as cm:
            await d
        self.assertEqual(str(cm.exception), "nft did not finish in time")

    async def test_real_nft_in_a_namespace(self) -> None:
        """Install, re-install and remove a real table inside a netns."""
        if os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("ip"):
            raise self.skipTest("needs root, nft and ip")  # type: ignore[misc]
        ns = f"ticrypt-nft-{os.getpid()}"
        if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode:
            raise self.skipTest("ip netns add failed")  # type: ignore[misc]
        self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], capture_output=True)
        nft = fake_nft(self, f'exec ip netns exec {ns} nft "$@"')
        owned = OwnedTable(SpawnNft(reactor, reactor, nft=nft))
        table = dnat_table("ticrypt_vmhost", VMHOST_RULES, masquerade=True)

        def listing() -> str:
            return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
                                  capture_output=True, text=True, check=True).stdout

        await owned.install(table)
        first = listing()
        self.assertIn("dnat ip to 10.9.0.2:22", first)
        owned2 = OwnedTable(SpawnNft(reactor, reactor, nft=nft))  # a restarted daemon
        await owned2.install(table)
        self.assertEqual(listing(), first)
        await owned2.remove()
        self.assertEqual(listing().strip(), "")
        with self.assertRaises(NftError) as cm:
            await SpawnNft(reactor, reactor, nft=nft).apply("table inet t { chain c { bogus; } }\n")
        self.assertIn("nft failed (exit 1): ", str(cm.exception))
        self.assertIn("Error", str(cm.exception))
