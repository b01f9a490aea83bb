"""ticrypt-allowedlist as a real process (mode = off, 127.0.0.1) asked by
real ``dig`` over UDP and TCP: answers once the upstream answered, NXDOMAIN
for other names, no answer at all to a client outside vm_networks, entry
removal picked up from the feed within seconds, and answers from the state
file after a restart while the upstream is down.  Also: etc/allowedlist.ini
sets and documents every key."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

from twisted.internet import reactor, task
from twisted.names import dns, server
from twisted.trial.unittest import SynchronousTestCase, TestCase

from test.daemon import ROOT, Daemon, daemon_env, run_command, start_daemon, twistd_path
from test.test_allowedlist_sync import FakeFeed, Zone
from ticrypt.allowedlist.config import AllowedListConfig
from ticrypt.config import schema_of
from ticrypt.http.server import JsonSite

SECRET = "s3cret" * 8


class SampleConfigTests(SynchronousTestCase):
    def test_every_key_documented(self) -> None:
        schema = schema_of(AllowedListConfig)
        with open(os.path.join(ROOT, "etc", "allowedlist.ini")) as f:
            lines = f.read().splitlines()
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string("\n".join(lines))
        for part, keys in schema.sections.items():
            self.assertEqual(sorted(parser[part]), sorted(keys))
            for key in keys:
                at = next(i for i, line in enumerate(lines) if line.startswith(f"{key} ="))
                self.assertTrue(lines[at - 1].startswith("#"), f"{key} has no comment above it")


class StartupFailureTests(TestCase):
    timeout = 60

    async def test_nft_missing_is_one_line(self) -> None:
        from ticrypt.lab import daemons

        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        config = os.path.join(d, "allowedlist.ini")
        with open(config, "w") as f:
            f.write("[allowedlist]\ndns_listen = 127.0.0.1:0\nvm_networks = 127.0.0.1/32\n"
                    "forward_addresses = 10.77.9.0/24\nupstream = 127.0.0.1:9\n"
                    "rest_url = off\nstate_dir = state\naudit_log = audit.log\nmode = nft\n")
        env = {**daemon_env(), "PATH": os.path.join(d, "no-such-dir")}
        proc = daemons.spawn(reactor, "ticrypt-allowedlist", config, env=env)
        self.addCleanup(proc.stop)
        proc.ready.addErrback(lambda f: None)
        code = await proc.ended
        self.assertEqual(code, 1)
        lines = [line for line in proc.text().splitlines() if "nft" in line]
        self.assertEqual(len(lines), 1, proc.text())
        self.assertIn("[allowedlist] mode: cannot install the nft table: 'nft' not found",
                      lines[0])
        self.assertNotIn("Traceback", proc.text())


class ListenerTests(TestCase):
    async def test_udp_and_tcp_on_one_port(self) -> None:
        from ticrypt.allowedlist.dns import AllowListServer
        from ticrypt.allowedlist.policy import Policy
        from ticrypt.allowedlist.tap import DnsListenerService
        from ticrypt.service import StartupError

        server = AllowListServer(Policy(["127.0.0.1/32"]), reactor)
        service = DnsListenerService(reactor, server, "127.0.0.1", 0)
        service.privilegedStartService()
        udp, tcp = (p.getHost() for p in service.ports)
        self.assertEqual((udp.type, tcp.type), ("UDP", "TCP"))  # type: ignore[attr-defined]
        self.assertEqual(udp.port, tcp.port)  # type: ignore[attr-defined]
        taken = DnsListenerService(reactor, server, "127.0.0.1", udp.port)  # type: ignore
        with self.assertRaises(StartupError) as e:
            taken.privilegedStartService()
        self.assertEqual((e.exception.section, e.exception.key), ("allowedlist", "dns_listen"))
        self.assertEqual(taken.ports, [])
        await service.stopService()


class DeploymentTests(SynchronousTestCase):
    def test_allowedlist_ini_loads(self) -> None:
        from ticrypt.config import load_config
        from ticrypt.lab.deploy import Addresses, Deployment

        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        dep = Deployment(d, Addresses(rest_scheme="http", rest_port=8443))
        cfg = load_config(dep.allowedlist_ini("127.0.0.1:5353", mode="nft"), AllowedListConfig)
        a = cfg.allowedlist
        self.assertEqual((a.upstream, a.mode, a.rest_url, a.allow_plain),
                         ((("127.0.0.1", 5353),), "nft", "http://127.0.0.1:8443", True))
        self.assertTrue(a.state_dir.startswith(d))


class DaemonTests(TestCase):
    skip = None if shutil.which("dig") else "needs dig (bind9-dnsutils)"
    timeout = 120

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ticrypt-al-")
        self.addCleanup(shutil.rmtree, self.dir)
        r: Any = reactor
        self.feed = FakeFeed(SECRET)
        self.feed.body = {"serial": 1, "entries": [
            {"id": "al-1", "name": "license.example.org", "ports": [27000], "protocol": "tcp",
             "comment": "flexlm"}]}
        site = JsonSite(self.feed, reactor=reactor, max_body=1024, idle_timeout=5,
                        request_timeout=5)
        http = r.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(http.stopListening)
        factory = server.DNSServerFactory(authorities=[Zone()])
        factory.noisy = False
        self.upstream = r.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(lambda: self.upstream and self.upstream.stopListening())
        secret = os.path.join(self.dir, "feed.secret")
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(SECRET + "\n")
        self.config = os.path.join(self.dir, "allowedlist.ini")
        with open(self.config, "w") as f:
            f.write(f"""[allowedlist]
dns_listen = 127.0.0.1:0
vm_networks = 127.0.0.1/32
forward_addresses = 10.77.9.0/24
upstream = 127.0.0.1:{self.upstream.getHost().port}
upstream_timeout = 1s
rest_url = http://127.0.0.1:{http.getHost().port}
allow_plain = yes
allowlist_feed_secret = feed.secret
poll_interval = 0.2s
state_dir = state
audit_log = audit.log
mode = off
""")

    async def dig(self, port: int, *args: str) -> tuple[int, str]:
        code, out, err = await run_command(
            ["dig", "@127.0.0.1", "-p", str(port), "+time=2", "+tries=1", *args])
        return code, out + err

    async def until(self, port: int, want: str, *args: str) -> str:
        out = ""
        for _ in range(100):
            _, out = await self.dig(port, *args)
            if want in out:
                return out
            await task.deferLater(reactor, 0.1, lambda: None)
        self.fail(f"never {want!r}: {out}")

    async def test_dig(self) -> None:
        proc = await start_daemon(self, "ticrypt-allowedlist", self.config)
        assert proc.ready_info is not None
        port = int(proc.ready_info["dns"].rpartition(":")[2])
        # the first query waits for the upstream lookup and the (off) install
        code, out = await self.dig(port, "license.example.org", "A", "+short")
        self.assertEqual((code, out.strip()), (0, "10.77.9.2"))
        code, out = await self.dig(port, "LICENSE.example.ORG.", "A", "+tcp")
        self.assertIn("status: NOERROR", out)
        self.assertIn("10.77.9.2", out)
        self.assertIn(" flags: qr aa", out)
        code, out = await self.dig(port, "license.example.org", "AAAA")
        self.assertIn("status: NOERROR", out)
        self.assertIn("ANSWER: 0", out)
        code, out = await self.dig(port, "license.example.org", "ANY", "+tcp")
        self.assertIn("10.77.9.2", out)
        code, out = await self.dig(port, "evil.example.com", "A")
        self.assertIn("status: NXDOMAIN", out)
        # outside vm_networks: no answer at all, over UDP and TCP
        for extra in ((), ("+tcp",)):
            code, out = await self.dig(port, "-b", "127.0.0.2", "license.example.org", *extra)
            self.assertEqual(code, 9, out)  # "no servers could be reached"
            self.assertNotIn("status:", out)
        # removal at rest: NXDOMAIN within seconds
        self.feed.body = {"serial": 2, "entries": []}
        await self.until(port, "status: NXDOMAIN", "license.example.org")
        self.feed.body = {"serial": 3, "entries": [
            {"id": "al-1", "name": "license.example.org", "ports": [27000], "protocol": "tcp",
             "comment": ""}]}
        await self.until(port, "10.77.9.2", "license.example.org", "+short")
        await proc.stop()
        with open(os.path.join(self.dir, "audit.log")) as f:
            events = [line for line in f if "allowlist-entry" in line]
        self.assertEqual(len(events), 3)
        # restart with the upstream and rest gone: the state answers the same
        await self.upstream.stopListening()
        self.upstream = None
        self.feed.body = {"serial": 0, "entries": []}  # a rolled-back feed is refused
        proc = await start_daemon(self, "ticrypt-allowedlist", self.config)
        assert proc.ready_info is not None
        port = int(proc.ready_info["dns"].rpartition(":")[2])
        code, out = await self.dig(port, "license.example.org", "+short")
        with open(os.path.join(self.dir, "state", "allowedlist-state.json")) as f:
            state = f.read()
        self.assertEqual(out.strip(), "10.77.9.2", proc.text() + state)
        await proc.stop()


def _netns_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "nft", "dig"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


class NamespaceDaemonTests(TestCase):
    """mode = nft as root in a network namespace this test makes and
    removes: the table is installed before the readiness line, a restart
    with the upstream unreachable answers and installs the same from the
    state file, and stopping leaves the table in the kernel."""

    skip = _netns_skip()
    timeout = 120

    def setUp(self) -> None:
        self.ns = f"ticrypt-ald-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", self.ns], check=False)
        subprocess.run(["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"],
                       check=True)
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        state = os.path.join(self.dir, "state")
        os.makedirs(state, mode=0o700)
        with open(os.path.join(state, "allowedlist-state.json"), "w") as f:
            json.dump({"serial": 4, "entries": [
                {"id": "al-1", "name": "license.example.org", "ports": [27000],
                 "protocol": "tcp", "comment": ""}],
                "forwarding": {"license.example.org": "10.77.9.7"},
                "upstream": {"license.example.org": {"addresses": ["10.77.4.2"],
                                                     "expires": time.time() + 3600}}}, f)
        self.config = os.path.join(self.dir, "allowedlist.ini")
        with open(self.config, "w") as f:
            f.write("""[allowedlist]
dns_listen = 127.0.0.1:0
vm_networks = 127.0.0.1/32
forward_addresses = 10.77.9.0/24
upstream = 127.0.0.1:9
upstream_timeout = 0.5s
rest_url = off
state_dir = state
audit_log = audit.log
mode = nft
log_group = 4
""")

    def nft_list(self) -> str:
        return subprocess.run(["ip", "netns", "exec", self.ns, "nft", "list", "table", "inet",
                               "ticrypt_allowedlist"], capture_output=True, text=True).stdout

    async def start(self) -> tuple[Daemon, int]:
        proc = Daemon("ticrypt-allowedlist", reactor, 30.0)
        ip = shutil.which("ip")
        assert ip is not None
        args = [ip, "netns", "exec", self.ns, twistd_path(), "-n", "--pidfile=",
                "ticrypt-allowedlist", "--config", self.config]
        r: Any = reactor
        r.spawnProcess(proc, ip, args, env=daemon_env(), path=self.dir)
        self.addCleanup(proc.stop)
        await proc.ready
        assert proc.ready_info is not None
        return proc, int(proc.ready_info["dns"].rpartition(":")[2])

    async def dig(self, port: int) -> str:
        _, out, _ = await run_command(["ip", "netns", "exec", self.ns, "dig", "@127.0.0.1",
                                       "-p", str(port), "+time=2", "+tries=1", "+short",
                                       "license.example.org"])
        return out.strip()

    async def test_restart_keeps_rules_and_answers(self) -> None:
        proc, port = await self.start()
        listing = self.nft_list()
        self.assertIn("ip daddr 10.77.9.7 tcp dport 27000 dnat ip to 10.77.4.2", listing)
        self.assertIn("log group 4", listing)
        self.assertEqual(await self.dig(port), "10.77.9.7")
        await proc.stop()
        self.assertEqual(self.nft_list(), listing)  # left in the kernel while down
        proc, port = await self.start()
        self.assertEqual(await self.dig(port), "10.77.9.7")
        self.assertEqual(self.nft_list(), listing)
        await proc.stop()
