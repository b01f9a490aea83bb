"""vmc's own rules (ticrypt.vmc.firewall): golden text, config refusals,
install/update/remove through MemoryNft, vmc's service wiring, and as root
the rules loaded with ``nft -f`` in network namespaces this test creates
and always removes, where real connections show what they let through."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from test.netprobe import listen_in, probe_from
from ticrypt.audit import AuditLog
from ticrypt.config import ConfigError, load_config
from ticrypt.nft.apply import MemoryNft
from ticrypt.nft.ruleset import render_delete, render_replace
from ticrypt.service import StartupError
from ticrypt.vmc import firewall
from ticrypt.vmc.config import VmcConfig

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)

GOLDEN = """\
table inet ticrypt_vmc
delete table inet ticrypt_vmc
table inet ticrypt_vmc {
\tset backend4 {
\t\ttype ipv4_addr;
\t\tflags interval;
\t\telements = { 10.77.1.2/32, 10.77.1.5/32 }
\t}
\tset backend6 {
\t\ttype ipv6_addr;
\t\tflags interval;
\t}
\tset allow_out4 {
\t\ttype ipv4_addr;
\t\tflags interval;
\t\telements = { 10.77.9.0/24 }
\t}
\tset allow_out6 {
\t\ttype ipv6_addr;
\t\tflags interval;
\t\telements = { fd77:9::/64 }
\t}
\tchain input {
\t\ttype filter hook input priority 0; policy drop;
\t\tiif lo accept
\t\tct state established,related accept
\t\tct state invalid drop
\t\ticmpv6 type nd-neighbor-solicit accept
\t\ticmpv6 type nd-neighbor-advert accept
\t\ticmpv6 type nd-router-advert accept
\t\ticmpv6 type nd-router-solicit accept
\t\ttcp dport 22 accept comment "tunnel"
\t\tcounter drop comment "inbound denied"
\t}
\tchain output {
\t\ttype filter hook output priority 0; policy drop;
\t\toif lo accept
\t\tct state established,related accept
\t\tct state invalid drop
\t\ticmpv6 type nd-neighbor-solicit accept
\t\ticmpv6 type nd-neighbor-advert accept
\t\ticmpv6 type nd-router-advert accept
\t\ticmpv6 type nd-router-solicit accept
\t\tip daddr @backend4 meta l4proto tcp accept comment "rest and proxy"
\t\tip6 daddr @backend6 meta l4proto tcp accept comment "rest and proxy"
\t\tip daddr 10.77.1.2 udp dport 53 accept comment "allowedlist dns"
\t\tip daddr 10.77.1.2 tcp dport 53 accept comment "allowedlist dns"
\t\tip daddr @allow_out4 meta l4proto tcp accept comment "allow-list"
\t\tip daddr @allow_out4 meta l4proto udp accept comment "allow-list"
\t\tip6 daddr @allow_out6 meta l4proto tcp accept comment "allow-list"
\t\tip6 daddr @allow_out6 meta l4proto udp accept comment "allow-list"
\t\tcounter log group 7 drop comment "egress denied"
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy drop;
\t\tcounter drop comment "the VM routes nothing"
\t}
}
"""


def write_config(testcase: SynchronousTestCase, firewall_keys: str = "",
                 vmc_keys: str = "", rest_url: str = "https://10.77.1.2:8443",
                 more: str = "") -> str:
    d = os.path.abspath(testcase.mktemp())
    os.makedirs(d)
    with open(os.path.join(d, "ca.pem"), "w") as f:
        f.write("x")
    with open(os.path.join(d, "vmc.ini"), "w") as f:
        f.write(f"[vmc]\nrest_url = {rest_url}\nca_file = ca.pem\nstate_dir = s\n"
                f"audit_log = a.log\n{vmc_keys}\n[firewall]\nenabled = yes\n{firewall_keys}\n"
                + more)
    return os.path.join(d, "vmc.ini")


FULL = "dns = 10.77.1.2\nallow_out = 10.77.9.0/24, fd77:9::/64\nlog_group = 7\n"


class RenderTests(SynchronousTestCase):
    def test_golden(self) -> None:
        cfg = load_config(write_config(self, FULL), VmcConfig)
        # the enrolled proxy's address joins rest's (a name would not)
        table = firewall.vmc_table(cfg, "wss://10.77.1.5:8444")
        self.assertEqual(render_replace(table), GOLDEN)
        self.assertEqual(render_delete(table),
                         "table inet ticrypt_vmc\ndelete table inet ticrypt_vmc\n")
        self.assertEqual(firewall.vmc_table(cfg, "wss://proxy.example:8444"),
                         firewall.vmc_table(cfg, None))

    def test_config_proxy_url_wins_and_minimal_rules(self) -> None:
        cfg = load_config(write_config(
            self, "backend = 10.77.1.0/28\ndhcp = yes\n", vmc_keys="proxy_url = "
            "wss://[fd77:1::2]:8444\n", more="[tunnel]\nlisten = tcp:port=2222\n"), VmcConfig)
        text = render_replace(firewall.vmc_table(cfg, "wss://10.77.1.9:1"))
        self.assertIn("elements = { 10.77.1.0/28 }", text)   # 10.77.1.2 inside it
        self.assertIn("elements = { fd77:1::2/128 }", text)
        self.assertNotIn("10.77.1.9", text)
        self.assertIn("tcp dport 2222 accept", text)
        self.assertIn("udp sport 68 udp dport 67 accept", text)
        self.assertNotIn("dport 53", text)      # no dns: no DNS at all
        self.assertNotIn("log group", text)     # log_group 0: plain drop
        self.assertTrue(text.rstrip().endswith("}"))

    def test_refusals(self) -> None:
        for keys, rest_url, more, where in [
            ("", "https://rest.example:8443", "", "[firewall] backend"),
            ("dns = resolver.example\n", "https://10.77.1.2:1", "", "[firewall] dns"),
            ("allow_out = 10.77.9.0/33\n", "https://10.77.1.2:1", "", "[firewall] allow_out"),
            ("log_group = 70000\n", "https://10.77.1.2:1", "", "[firewall] log_group"),
            ("", "https://10.77.1.2:1", "[tunnel]\nlisten = tcp:interface=::\n",
             "[tunnel] listen"),
        ]:
            path = write_config(self, keys, rest_url=rest_url, more=more)
            e = self.assertRaises(ConfigError, load_config, path, VmcConfig)
            self.assertIn(where, str(e), keys)
        # off: nothing is checked, nothing changes for existing deployments
        path = write_config(self, rest_url="https://rest.example:1")
        with open(path) as f:
            text = f.read().replace("enabled = yes", "enabled = no")
        with open(path, "w") as f:
            f.write(text)
        self.assertFalse(load_config(path, VmcConfig).firewall.enabled)

    def test_sample_config_leaves_it_off(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        shutil.copy(os.path.join(ROOT, "etc", "vmc.ini"), d)
        with open(os.path.join(d, "ca.pem"), "w") as f:
            f.write("x")
        cfg = load_config(os.path.join(d, "vmc.ini"), VmcConfig)
        self.assertEqual((cfg.firewall.enabled, cfg.firewall.log_group), (False, 0))

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = firewall.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_printed_without_applying(self) -> None:
        path = write_config(self, FULL)
        self.assertEqual(self.run_main("--config", path, "--proxy-url", "wss://10.77.1.5:1"),
                         (0, GOLDEN, ""))
        code, out, _ = self.run_main("--config", path, "--delete")
        self.assertEqual((code, out), (0, "table inet ticrypt_vmc\ndelete table inet "
                                          "ticrypt_vmc\n"))
        code, out, err = self.run_main("--config", write_config(
            self, rest_url="https://rest.example:1"))
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("[firewall] backend", err)


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cfg = load_config(write_config(self, FULL), VmcConfig)
        self.clock = MemoryReactorClock()
        self.audit_path = self.mktemp()
        self.audit = AuditLog(self.audit_path, self.clock, "vmc")
        self.addCleanup(self.audit.close)
        self.nft = MemoryNft()

    def events(self) -> list[str]:
        with open(self.audit_path) as f:
            return [json.loads(line)["event"] for line in f]

    def test_install_update_remove(self) -> None:
        service = firewall.FirewallService(self.cfg, self.nft, self.audit)
        ready = service.when_ready()
        service.startService()
        self.assertIsNone(self.successResultOf(ready))
        self.assertIsNone(self.successResultOf(service.when_ready()))  # later waiters too
        self.assertEqual(list(self.nft.tables), ["table inet ticrypt_vmc"])
        self.assertEqual(len(self.nft.scripts), 1)
        # enrollment names a proxy on rest's address: nothing to apply
        self.successResultOf(defer.ensureDeferred(service.update("wss://10.77.1.2:8444")))
        self.assertEqual(len(self.nft.scripts), 1)
        # a new address: replaced in one transaction
        self.successResultOf(defer.ensureDeferred(service.update("wss://10.77.1.5:8444")))
        self.assertEqual(self.nft.scripts[-1], GOLDEN)
        self.successResultOf(service.stopService())
        self.assertEqual(self.nft.tables, {})
        self.assertEqual(self.nft.scripts[-1], "table inet ticrypt_vmc\n"
                                               "delete table inet ticrypt_vmc\n")
        self.assertEqual(self.events(), ["nft-installed"] * 2 + ["nft-removed"])

    def test_nft_failure_is_a_startup_error(self) -> None:
        self.nft.fail_next = "nft failed (exit 1): Operation not permitted"
        service = firewall.FirewallService(self.cfg, self.nft, self.audit)
        service.startService()
        failure = self.failureResultOf(service.when_ready(), StartupError)
        self.assertIn("Operation not permitted", failure.value.message)
        self.assertEqual((failure.value.section, failure.value.key), ("firewall", "enabled"))
        self.assertEqual(self.nft.tables, {})

    def test_vmc_installs_before_enrolling_and_removes_at_stop(self) -> None:
        from ticrypt.vmc import service as vmc_service

        cfg = load_config(write_config(self, "dns = 10.77.1.2\n", vmc_keys=(
            "enrollment_token_file = token\n")), VmcConfig)
        token = os.path.join(os.path.dirname(cfg.path), "token")
        with open(token, "w") as f:
            f.write("t" * 43)
        os.chmod(token, 0o600)
        seen: list[list[str]] = []

        def fake_enroll(*args: Any, **kwargs: Any) -> defer.Deferred[Any]:
            seen.append(list(self.nft.tables))
            return defer.Deferred()  # rest never answers

        self.patch(vmc_service, "enroll", fake_enroll)
        vmc = vmc_service.VmcService(cfg, self.clock, nft=self.nft)
        self.patch(vmc, "_track_processes", lambda: None)
        vmc.startService()
        self.assertEqual(seen, [["table inet ticrypt_vmc"]])
        self.assertIs(vmc.firewall and vmc.firewall.parent, vmc)
        d = vmc.stopService()
        self.successResultOf(d)
        self.assertEqual(self.nft.tables, {})


# -- as root, in network namespaces -------------------------------------------------

def _run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30)


class NamespaceTests(SynchronousTestCase):
    """Two namespaces joined by a veth pair: ``vm`` (10.77.3.11, the
    rules) and ``out`` (10.77.2.1: it plays rest, on 8443, and any other
    host, on 9999)."""

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root (network namespaces and nft)")
        if shutil.which("ip") is None or shutil.which("nft") is None:
            raise SkipTest("needs the ip and nft commands")
        tag = f"{os.getpid() % 100000}"
        self.vm, self.out = f"tcvfw{tag}v", f"tcvfw{tag}o"
        for ns in (self.vm, self.out):
            if _run("ip", "netns", "add", ns).returncode != 0:
                raise SkipTest("cannot create a network namespace here")
            self.addCleanup(_run, "ip", "netns", "del", ns)
        steps = [
            ("ip", "-n", self.vm, "link", "add", "eth0", "type", "veth", "peer", "name",
             "eth0", "netns", self.out),
            ("ip", "-n", self.vm, "addr", "add", "10.77.3.11/16", "dev", "eth0"),
            ("ip", "-n", self.out, "addr", "add", "10.77.2.1/16", "dev", "eth0"),
        ]
        for ns in (self.vm, self.out):
            steps += [("ip", "-n", ns, "link", "set", "lo", "up"),
                      ("ip", "-n", ns, "link", "set", "eth0", "up")]
        for step in steps:
            r = _run(*step)
            self.assertEqual(r.returncode, 0, (step, r.stderr))
        self.listen(self.vm, 22, 8080)
        self.listen(self.out, 8443, 9999)

    def listen(self, ns: str, *ports: int) -> None:
        listen_in(self, ns, *ports)

    def probe(self, ns: str, *targets: str) -> dict[str, str]:
        return probe_from(self, ns, *targets)

    def nft(self, script: str) -> None:
        r = _run("ip", "netns", "exec", self.vm, "nft", "-f", "-", stdin=script)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_rules_load_and_block(self) -> None:
        targets_in = ("10.77.3.11:22", "10.77.3.11:8080")
        targets_out = ("10.77.2.1:8443", "10.77.2.1:9999")
        # without rules everything is open: the probes can tell
        self.assertEqual(self.probe(self.out, *targets_in), dict.fromkeys(targets_in, "ok"))
        self.assertEqual(self.probe(self.vm, *targets_out), dict.fromkeys(targets_out, "ok"))

        cfg = load_config(write_config(self, "backend = 10.77.2.1\n",
                                       rest_url="https://rest.example:8443"), VmcConfig)
        table = firewall.vmc_table(cfg)
        self.nft(render_replace(table))
        self.nft(render_replace(table))  # idempotent: applying twice is the same state
        listed = _run("ip", "netns", "exec", self.vm, "nft", "list", "tables").stdout
        self.assertEqual(listed.split(), ["table", "inet", "ticrypt_vmc"])
        self.assertEqual(self.probe(self.out, *targets_in),
                         {"10.77.3.11:22": "ok", "10.77.3.11:8080": "TimeoutError"})
        # rest's address (backend) on any TCP port is allowed: both ports are the
        # backend here; another host is dropped (try the outside ns's other address)
        r = _run("ip", "-n", self.out, "addr", "add", "10.77.5.2/16", "dev", "eth0")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.probe(self.vm, "10.77.2.1:8443", "10.77.5.2:9999"),
                         {"10.77.2.1:8443": "ok", "10.77.5.2:9999": "TimeoutError"})
        self.assertEqual(self.probe(self.vm, "127.0.0.1:8080"), {"127.0.0.1:8080": "ok"})

        self.nft(render_delete(table))
        self.nft(render_delete(table))  # absent: not an error
        listed = _run("ip", "netns", "exec", self.vm, "nft", "list", "tables").stdout
        self.assertEqual(listed.strip(), "")
        self.assertEqual(self.probe(self.out, "10.77.3.11:8080"), {"10.77.3.11:8080": "ok"})
