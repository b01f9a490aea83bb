"""ticrypt-allowedlist as a real process (mode = off, 127.0.0.1) asked by
real ``dig`` over UDP and TCP: answers once the upstream answered, NXDOMAIN
for other names, no answer at all to a client outside vm_networks, entry
removal picked up from the feed within seconds, and answers from the state
file after a restart while the upstream is down.  Also: etc/allowedlist.ini
sets and documents every key."""

from __future__ import annotations

import configparser
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor, task
from twisted.names import dns, server
from twisted.trial.unittest import SynchronousTestCase, TestCase

from test.daemon import ROOT, run_command, start_daemon
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
        self.dir = tempfile.mkdtemp(dir="/tmp/al" if os.path.isdir("/tmp/al") else None)
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
