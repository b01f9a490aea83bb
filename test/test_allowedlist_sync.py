"""The allow-list's upstream addresses, nft table and feed: AddressBook and
ForwardingPool (sans-IO), the table text (golden), Sync with MemoryNft,
dnspython against a local twisted.names authority, the feed poller against
a fake feed, and (as root) the table in a real nft inside a namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.names import common, dns, error, server
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Request

from ticrypt.allowedlist.entries import EntriesPoller, parse_feed
from ticrypt.allowedlist.policy import Entry, Policy
from ticrypt.allowedlist.sync import ForwardingPool, Route, StateFile, Sync, build_table
from ticrypt.allowedlist.upstream import AddressBook, DnsPythonResolver, Lookup, UpstreamError
from ticrypt.http.client import JsonClient
from ticrypt.http.server import ApiError, JsonResource, JsonSite, bearer_token
from ticrypt.http.server import Route as HttpRoute
from ticrypt.nft.apply import MemoryNft, NftError, OwnedTable, SpawnNft
from ticrypt.nft.ruleset import render_replace

LICENSE = Entry("al-1", "license.example.org", (27000, 27001))
FLEX = Entry("al-2", "*.flex.example.net", (5053,), "udp")


class AddressBookTests(SynchronousTestCase):
    def test_ttl_clamped_and_due(self) -> None:
        b = AddressBook(min_ttl=30, max_ttl=100)
        self.assertTrue(b.good("n", Lookup(("10.77.4.2",), 5), 0))
        self.assertEqual(b.known["n"].expires, 30)
        self.assertEqual(b.due(["n", "m"], 0), ["m"])
        self.assertEqual(b.due(["n"], 22.5), ["n"])
        b.good("n", Lookup(("10.77.4.2",), 10_000), 0)
        self.assertEqual(b.known["n"].expires, 100)

    def test_cap_and_stable_order(self) -> None:
        b = AddressBook(max_addresses=2)
        b.good("n", Lookup(("10.0.0.9", "10.0.0.3", "10.0.0.5", "bogus", "127.0.0.1",
                            "0.0.0.0", "224.0.0.1"), 60), 0)
        self.assertEqual(b.current("n", 0), ("10.0.0.3", "10.0.0.5"))
        self.assertFalse(b.good("n", Lookup(("10.0.0.5", "10.0.0.1", "10.0.0.3"), 60), 1))
        self.assertEqual(b.current("n", 1), ("10.0.0.3", "10.0.0.5"))
        self.assertTrue(b.good("n", Lookup(("10.0.0.5", "10.0.0.1"), 60), 2))
        self.assertEqual(b.current("n", 2), ("10.0.0.5", "10.0.0.1"))

    def test_failure_keeps_until_expiry_then_narrows(self) -> None:
        b = AddressBook(min_ttl=30, retry=5)
        b.good("n", Lookup(("10.77.4.2",), 60), 0)
        b.failed("n", 45)
        self.assertEqual(b.current("n", 59), ("10.77.4.2",))
        self.assertEqual(b.due(["n"], 49), [])
        self.assertEqual(b.due(["n"], 50), ["n"])
        self.assertEqual(b.expire(59), [])
        self.assertEqual(b.expire(60), ["n"])
        self.assertEqual(b.current("n", 60), ())

    def test_no_such_name_narrows_at_once(self) -> None:
        b = AddressBook()
        b.good("n", Lookup(("10.77.4.2",), 60), 0)
        self.assertTrue(b.good("n", Lookup((), 0), 1))
        self.assertEqual(b.current("n", 1), ())

    def test_save_load(self) -> None:
        b = AddressBook()
        b.good("n", Lookup(("10.77.4.2",), 60), 0)
        b.good("old", Lookup(("10.77.4.3",), 30), -100)
        again = AddressBook()
        again.load(json.loads(json.dumps({**b.to_json(), "bad": {"addresses": ["x"]}})), 10)
        self.assertEqual(list(again.known), ["n"])
        self.assertEqual(again.current("n", 10), ("10.77.4.2",))


class PoolTests(SynchronousTestCase):
    def test_stable_skips_first(self) -> None:
        p = ForwardingPool(["10.77.9.0/29"])
        self.assertEqual([p.assign(n) for n in "abcdef"],
                         ["10.77.9.2", "10.77.9.3", "10.77.9.4", "10.77.9.5", "10.77.9.6", None])
        self.assertEqual(p.assign("a"), "10.77.9.2")
        p.keep_only(["b"])
        self.assertEqual(p.assign("z"), "10.77.9.2")
        q = ForwardingPool(["10.77.9.0/29"])
        q.load({"b": "10.77.9.3", "c": "10.77.9.3", "d": "10.1.1.1", "e": "junk"})
        self.assertEqual(q.assigned, {"b": "10.77.9.3"})


GOLDEN = """\
table inet ticrypt_allowedlist
delete table inet ticrypt_allowedlist
table inet ticrypt_allowedlist {
\tset vm4 {
\t\ttype ipv4_addr;
\t\tflags interval;
\t\telements = { 10.77.3.0/24 }
\t}
\tset vm6 {
\t\ttype ipv6_addr;
\t\tflags interval;
\t}
\tset pool4 {
\t\ttype ipv4_addr;
\t\tflags interval;
\t\telements = { 10.77.9.0/24 }
\t}
\tset pool6 {
\t\ttype ipv6_addr;
\t\tflags interval;
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tip saddr @vm4 ip daddr 10.77.9.2 tcp dport 27000 dnat ip to 10.77.4.2 \
comment "license.example.org"
\t\tip saddr @vm4 ip daddr 10.77.9.2 tcp dport 27001 dnat ip to 10.77.4.2 \
comment "license.example.org"
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\tct state established,related accept
\t\tip saddr @vm4 ip daddr 10.77.4.2 tcp dport 27000 ct status dnat ct original ip daddr \
10.77.9.2 accept comment "license.example.org"
\t\tip saddr @vm4 ip daddr 10.77.4.2 tcp dport 27001 ct status dnat ct original ip daddr \
10.77.9.2 accept comment "license.example.org"
\t\tip saddr @vm4 log group 7
\t\tip saddr @vm4 drop
\t\tip6 saddr @vm6 log group 7
\t\tip6 saddr @vm6 drop
\t}
\tchain input {
\t\ttype filter hook input priority 0; policy accept;
\t\tip saddr @vm4 ip daddr @pool4 log group 7
\t\tip saddr @vm4 ip daddr @pool4 drop
\t\tip6 saddr @vm6 ip6 daddr @pool6 log group 7
\t\tip6 saddr @vm6 ip6 daddr @pool6 drop
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority 100; policy accept;
\t\tip saddr @vm4 ct status dnat masquerade
\t\tip6 saddr @vm6 ct status dnat masquerade
\t}
}
"""


class FakeResolver:
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.pending: dict[str, defer.Deferred[Lookup]] = {}

    def resolve(self, name: str) -> defer.Deferred[Lookup]:
        self.asked.append(name)
        d: defer.Deferred[Lookup] = defer.Deferred()
        self.pending[name] = d
        return d

    def answer(self, name: str, *addresses: str, ttl: float = 60) -> None:
        self.pending.pop(name).callback(Lookup(addresses, ttl))

    def fail(self, name: str) -> None:
        self.pending.pop(name).errback(UpstreamError(name + " A: Timeout"))


class SyncFixture:
    def __init__(self, state_dir: str | None = None) -> None:
        self.clock = task.Clock()
        self.policy = Policy(["10.77.3.0/24"])
        self.nft = MemoryNft()
        self.resolver = FakeResolver()
        self.audit: list[tuple[str, dict[str, Any]]] = []
        self.sync = Sync(policy=self.policy, pool=ForwardingPool(["10.77.9.0/24"]),
                         book=AddressBook(min_ttl=30), resolver=self.resolver,
                         table=OwnedTable(self.nft), clock=self.clock,
                         table_name="ticrypt_allowedlist", log_group=7,
                         state=StateFile(state_dir) if state_dir else None,
                         audit=lambda event, **kw: self.audit.append((event, kw)))

    def table(self) -> str:
        return self.nft.scripts[-1]


class SyncTests(SynchronousTestCase):
    def test_golden(self) -> None:
        table = build_table("ticrypt_allowedlist", ["10.77.3.0/24"], [
            Route("license.example.org", "10.77.9.2", "10.77.4.2", (27000, 27001), "tcp"),
            Route("v6.example.org", "10.77.9.3", "2001:db8::1", (1,), "tcp")], log_group=7,
            pool=["10.77.9.0/24"])
        self.assertEqual(render_replace(table), GOLDEN)

    def test_answer_after_install(self) -> None:
        f = SyncFixture()
        f.sync.startService()
        self.assertTrue(f.sync.first.called)
        f.sync.set_entries(1, [LICENSE])
        self.assertEqual(f.audit, [("allowlist-entry-added",
                                    {"id": "al-1", "name": "license.example.org"})])
        self.assertEqual(f.resolver.asked, ["license.example.org"])
        waited = f.sync.wait("license.example.org", LICENSE)
        self.assertEqual(f.policy.admitted, {})
        self.assertNoResult(waited)
        f.resolver.answer("license.example.org", "10.77.4.2", "10.77.3.50", "10.77.9.9")
        self.successResultOf(waited)
        self.assertEqual(f.policy.admitted, {"license.example.org": "10.77.9.2"})
        self.assertIn("dnat ip to 10.77.4.2", f.table())
        # VM and pool addresses are never targets
        self.assertNotIn("10.77.3.50", f.table())
        self.assertNotIn("to 10.77.9.9", f.table())
        f.sync.stopService()

    def test_not_admitted_when_nft_fails(self) -> None:
        f = SyncFixture()
        f.sync.startService()
        f.sync.set_entries(1, [LICENSE])
        f.nft.fail_next = "nft failed (exit 1): Operation not permitted"
        f.resolver.answer("license.example.org", "10.77.4.2")
        self.assertEqual(f.policy.admitted, {})
        self.assertEqual(f.sync.failure, "nft failed (exit 1): Operation not permitted")
        self.flushLoggedErrors()
        f.clock.advance(1)
        f.sync.kick()
        self.assertEqual(f.policy.admitted, {"license.example.org": "10.77.9.2"})
        f.sync.stopService()

    def test_first_install_failure_fails_first(self) -> None:
        f = SyncFixture()
        f.nft.fail_next = "nft failed (exit 1): Operation not permitted"
        f.sync.startService()
        self.failureResultOf(f.sync.first, NftError)
        f.sync.stopService()

    def test_removal_narrows_answers_before_table(self) -> None:
        f = SyncFixture()
        f.sync.startService()
        f.sync.set_entries(1, [LICENSE])
        f.resolver.answer("license.example.org", "10.77.4.2")
        seen: list[dict[str, str]] = []
        apply = f.nft.apply

        def spy(script: str) -> defer.Deferred[None]:
            seen.append(dict(f.policy.admitted))
            return apply(script)

        f.nft.apply = spy  # type: ignore[method-assign]
        f.sync.set_entries(2, [])
        self.assertEqual(seen, [{}])
        self.assertNotIn("dnat ip to", f.table())
        self.assertEqual(f.audit[-1][0], "allowlist-entry-removed")
        f.sync.stopService()

    def test_upstream_failure_keeps_then_narrows(self) -> None:
        f = SyncFixture()
        f.sync.startService()
        f.sync.set_entries(1, [LICENSE])
        f.resolver.answer("license.example.org", "10.77.4.2", ttl=40)
        f.clock.advance(30)  # due at 3/4 of 40 s
        f.resolver.fail("license.example.org")
        self.assertIn("dnat ip to 10.77.4.2", f.table())
        self.assertEqual(f.policy.admitted, {"license.example.org": "10.77.9.2"})
        f.clock.advance(5)
        f.resolver.fail("license.example.org")
        f.clock.advance(5)  # 40 s: expired
        self.assertNotIn("dnat ip to", f.table())
        self.assertEqual(f.policy.admitted, {})
        f.sync.stopService()

    def test_one_name_several_entries(self) -> None:
        f = SyncFixture()
        f.sync.startService()
        udp = Entry("al-9", "license.example.org", (27009,), "udp")
        f.sync.set_entries(1, [LICENSE, udp])
        f.resolver.answer("license.example.org", "10.77.4.2")
        self.assertIn("ip daddr 10.77.9.2 tcp dport 27001 dnat ip to 10.77.4.2", f.table())
        self.assertIn("ip daddr 10.77.9.2 udp dport 27009 dnat ip to 10.77.4.2", f.table())
        f.sync.stopService()

    def test_wildcard_names_on_demand(self) -> None:
        f = SyncFixture()
        f.sync.max_names_per_wildcard = 1
        f.sync.startService()
        f.sync.set_entries(1, [FLEX])
        self.assertEqual(f.resolver.asked, [])
        d = f.sync.wait("a.flex.example.net", FLEX)
        f.resolver.answer("a.flex.example.net", "10.77.4.3")
        self.successResultOf(d)
        self.assertIn("udp dport 5053 dnat ip to 10.77.4.3", f.table())
        self.failureResultOf(f.sync.wait("b.flex.example.net", FLEX), RuntimeError)
        # not asked for a day: its rules and its place go
        f.clock.advance(86400)
        self.assertNotIn("5053", f.table())
        self.assertEqual(f.sync.wanted, {"al-2": set()})
        d = f.sync.wait("b.flex.example.net", FLEX)
        f.resolver.answer("b.flex.example.net", "10.77.4.4")
        self.successResultOf(d)
        f.sync.stopService()

    def test_wildcard_name_answered_stays(self) -> None:
        f = SyncFixture()
        f.sync.startService()
        f.sync.set_entries(1, [FLEX])
        f.sync.wait("a.flex.example.net", FLEX)
        f.resolver.answer("a.flex.example.net", "10.77.4.3")
        for _ in range(3):
            f.clock.advance(43200)
            f.policy.seen["a.flex.example.net"] = f.clock.seconds()  # the DNS side's stamp
        self.assertEqual(f.sync.wanted, {"al-2": {"a.flex.example.net"}})
        self.assertEqual(f.sync.pool.assigned, {"a.flex.example.net": "10.77.9.2"})
        f.sync.stopService()

    def test_state_survives_restart(self) -> None:
        d = tempfile.mkdtemp(prefix="ticrypt-al-")
        self.addCleanup(shutil.rmtree, d)
        f = SyncFixture(d)
        f.sync.startService()
        f.sync.set_entries(5, [LICENSE, FLEX])
        f.sync.wait("a.flex.example.net", FLEX)
        f.resolver.answer("license.example.org", "10.77.4.2")
        f.resolver.answer("a.flex.example.net", "10.77.4.3")
        before = dict(f.policy.admitted)
        table = f.table()
        f.sync.stopService()
        self.assertEqual(f.nft.tables.keys(), {"table inet ticrypt_allowedlist"})  # left in place
        again = SyncFixture(d)
        again.clock.advance(10)
        again.sync.restore()
        again.sync.startService()
        # the first install has every route, before any lookup answered
        self.assertEqual(again.nft.scripts, [table])
        self.assertEqual(again.policy.admitted, before)
        self.assertEqual(again.sync.serial, 5)
        again.sync.stopService()


class PrintTests(SynchronousTestCase):
    """``python -m ticrypt.allowedlist.firewall`` prints what the daemon
    installs for its saved state, and applies nothing."""

    def test_prints_the_table_of_the_saved_state(self) -> None:
        import io
        from contextlib import redirect_stdout

        from ticrypt.allowedlist import firewall
        from ticrypt.allowedlist.config import AllowedListConfig
        from ticrypt.allowedlist.tap import make_sync
        from ticrypt.audit import AuditLog
        from ticrypt.config import load_config
        from ticrypt.lab.deploy import Deployment

        dep = Deployment(self.mktemp())
        dep.ca()
        path = dep.allowedlist_ini("127.0.0.1:53", vm_networks="10.77.3.0/24", log_group="7")
        cfg = load_config(path, AllowedListConfig)
        clock = task.Clock()
        clock.advance(time.time())  # the saved addresses expire on the wall clock
        policy = Policy(cfg.allowedlist.vm_networks)
        nft = MemoryNft()
        sync = make_sync(cfg, clock, policy, AuditLog(None, clock), nft=nft)
        fake = FakeResolver()
        sync.resolver = fake
        sync.startService()
        sync.set_entries(3, [LICENSE])
        fake.answer("license.example.org", "10.77.4.2")
        installed = nft.scripts[-1]
        sync.stopService()

        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(firewall.main(["--config", path]), 0)
        self.assertEqual(out.getvalue(), installed)  # what the daemon installed
        self.assertIn("dnat ip to 10.77.4.2", out.getvalue())
        # once the license server's addresses expired, no DNAT is printed
        later = firewall.current_table_text(cfg, now=clock.seconds() + 86400)
        self.assertNotIn("dnat ip to", later)
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(firewall.main(["--config", path, "--delete"]), 0)
        self.assertEqual(out.getvalue().strip(), "table inet ticrypt_allowedlist\n"
                         "delete table inet ticrypt_allowedlist")


# -- dnspython against a local authority ----------------------------------

class Zone(common.ResolverBase):
    """license.example.org CNAME lic.cdn.example.net (TTL 40) A 10.77.4.2 (TTL 120)."""

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        if name == b"license.example.org":
            rrs = [dns.RRHeader(name, dns.CNAME, dns.IN, 40,
                                dns.Record_CNAME(b"lic.cdn.example.net", 40))]
            if type == dns.A:
                rrs.append(dns.RRHeader(b"lic.cdn.example.net", dns.A, dns.IN, 120,
                                        dns.Record_A("10.77.4.2", 120)))
            return defer.succeed((rrs, [], []))
        return defer.fail(error.DomainError(name))


def upstream(testcase: TestCase) -> int:
    factory = server.DNSServerFactory(authorities=[Zone()])
    factory.noisy = False
    r: Any = reactor
    port = r.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port  # type: ignore[no-any-return]


class DnsPythonTests(TestCase):
    async def test_cname_chain_min_ttl(self) -> None:
        r = DnsPythonResolver(reactor, [("127.0.0.1", upstream(self))], timeout=5,
                              families=("A",))
        lookup = await r.resolve("license.example.org")
        self.assertEqual(lookup, Lookup(("10.77.4.2",), 40.0))

    async def test_aaaa_none_and_nxdomain(self) -> None:
        r = DnsPythonResolver(reactor, [("127.0.0.1", upstream(self))], timeout=5)
        self.assertEqual((await r.resolve("license.example.org")).addresses, ("10.77.4.2",))
        self.assertEqual(await r.resolve("other.example.org"), Lookup((), 0.0))

    async def test_unreachable(self) -> None:
        port = upstream(self)
        r = DnsPythonResolver(reactor, [("127.0.0.1", port + 1 if port < 65535 else 1)],
                              timeout=0.5)
        with self.assertRaises(UpstreamError):
            await r.resolve("license.example.org")


# -- the feed ---------------------------------------------------------------

class FakeFeed(JsonResource):
    def __init__(self, secret: str = "s3cret") -> None:
        super().__init__([HttpRoute("GET", "/v1/allowlist/feed", "feed")])
        self.secret = secret
        self.body: Any = {"serial": 1, "entries": [
            {"id": "al-1", "name": "license.example.org", "ports": [27000], "protocol": "tcp",
             "comment": ""}]}

    async def handle(self, request: Request, route: HttpRoute,
                     params: tuple[str, ...]) -> tuple[int, Any]:
        if bearer_token(request) != self.secret:
            raise ApiError(401, "unauthorized", "bad feed secret")
        return 200, self.body


class FeedTests(TestCase):
    def setUp(self) -> None:
        self.feed = FakeFeed()
        site = JsonSite(self.feed, reactor=reactor, max_body=1024, idle_timeout=5,
                        request_timeout=5)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        self.applied: list[tuple[int, list[Entry]]] = []

    def poller(self, secret: str = "s3cret") -> EntriesPoller:
        p = EntriesPoller(clock=reactor, client=JsonClient(reactor, None, timeout=5,
                                                           persistent=True),
                          rest_url=self.url, secret=secret,
                          apply=lambda s, e: self.applied.append((s, e)), interval=60)
        p.running = True
        self.addCleanup(p.stopService)
        return p

    async def test_applied_once_per_serial(self) -> None:
        p = self.poller()
        await p.poll()
        await p.poll()
        self.assertEqual(self.applied, [(1, [Entry("al-1", "license.example.org", (27000,))])])
        self.feed.body = {"serial": 2, "entries": [
            {"id": "al-2", "name": "Bad.example.org", "ports": [1]},
            {"id": "al-3", "name": "ok.example.org", "ports": [1]}]}
        await p.poll()
        self.assertEqual(self.applied[-1], (2, [Entry("al-3", "ok.example.org", (1,))]))

    async def test_outage_and_rollback_keep_entries(self) -> None:
        p = self.poller("wrong")
        await p.poll()
        self.assertEqual(self.applied, [])
        assert p.outage is not None
        self.assertIn("401", p.outage)
        p = self.poller()
        p.serial = 5
        await p.poll()
        assert p.outage is not None
        self.assertTrue(p.outage.startswith("rolled-back"))
        self.assertEqual(self.applied, [])

    def test_parse_feed(self) -> None:
        bads: list[object] = [None, [], {"serial": "1", "entries": []},
                              {"serial": -1, "entries": []}, {"serial": 1, "entries": {}},
                              {"serial": True, "entries": []}]
        for bad in bads:
            self.assertRaises(ValueError, parse_feed, bad)
        dup = {"id": "al-1", "name": "a.example.org", "ports": [1]}
        self.assertEqual(len(parse_feed({"serial": 1, "entries": [dup, dup]})[1]), 1)


# -- real nft in a namespace --------------------------------------------------

def _root_nft_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("nft") is None or shutil.which("ip") is None:
        return "needs nft and ip"
    return None


class RealNftTests(TestCase):
    skip = _root_nft_skip()

    async def test_table_in_namespace(self) -> None:
        ns = f"ticrypt-al-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], check=False)
        d = tempfile.mkdtemp(prefix="ticrypt-al-")
        self.addCleanup(shutil.rmtree, d)
        wrapper = os.path.join(d, "nft")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec ip netns exec {ns} nft "$@"\n')
        os.chmod(wrapper, 0o700)
        policy = Policy(["10.77.3.0/24"])
        resolver = FakeResolver()
        sync = Sync(policy=policy, pool=ForwardingPool(["10.77.9.0/24"]), book=AddressBook(),
                    resolver=resolver, table=OwnedTable(SpawnNft(reactor, reactor, nft=wrapper)),
                    clock=reactor, table_name="ticrypt_allowedlist", log_group=3)
        sync.set_entries(1, [LICENSE, FLEX])
        waited = sync.wait("license.example.org", LICENSE)
        resolver.answer("license.example.org", "10.77.4.2")
        await waited
        listing = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet",
                                  "ticrypt_allowedlist"], capture_output=True, text=True,
                                 check=True).stdout
        self.assertIn("ip daddr 10.77.9.2 tcp dport 27001 dnat ip to 10.77.4.2", listing)
        self.assertIn("ct original ip daddr 10.77.9.2 accept", listing)
        self.assertIn("ip saddr @vm4 log group 3", listing)
        sync.set_entries(2, [])
        while sync._running_sync is not None:
            await task.deferLater(reactor, 0.02, lambda: None)
        listing = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet",
                                  "ticrypt_allowedlist"], capture_output=True, text=True,
                                 check=True).stdout
        self.assertNotIn("dnat ip to", listing)
