"""The proxy's control API (ticrypt.proxy.ctlapi) driven by rest's client
(ticrypt.rest.proxyctl) on 127.0.0.1, over a LeaseService whose opener
only records (no lease listeners); and the LeaseService's journal and
retries."""

from __future__ import annotations

import json
import os
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ticrypt import identity, signed
from ticrypt.audit import AuditLog
from ticrypt.encoding import b64
from ticrypt.http.client import JsonClient
from ticrypt.http.server import LimitedFactory
from ticrypt.proxy.ctlapi import ControlResource, NonceCache, control_site
from ticrypt.proxy.leases import LeaseJournal, LeaseService, OpenFailed
from ticrypt.proxy.ports import Lease, LeaseLimits, LeaseTable
from ticrypt.rest.proxyctl import SCHEME, ProxyControl, ProxyControlError


@attrs.define
class RecordingOpener:
    """An opener that opens nothing; ``fail`` ports raise OpenFailed."""

    service: LeaseService | None = None
    opened: list[int] = attrs.Factory(list)
    closed: list[tuple[int, str]] = attrs.Factory(list)
    fail: set[int] = attrs.Factory(set)
    stopped: int = 0
    connections: dict[str, int] = attrs.Factory(dict)

    async def start(self) -> None:
        pass

    async def open(self, lease: Lease) -> None:
        if lease.port in self.fail:
            raise OpenFailed(f"port {lease.port} is taken")
        self.opened.append(lease.port)

    async def close(self, lease: Lease) -> None:
        self.closed.append((lease.port, lease.id))

    async def stop(self) -> None:
        self.stopped += 1

    def active(self, lease: Lease) -> int:
        return self.connections.get(lease.id, 0)


reactor: Any = _reactor


def read_audit(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@attrs.define
class Skewed:
    offset: float = 0.0

    def seconds(self) -> float:
        return float(reactor.seconds()) + self.offset


class ControlApiTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.key = identity.generate()
        self.audit_path = os.path.join(self.dir, "audit.log")
        self.audit = AuditLog(self.audit_path, reactor, role="proxy")
        self.addCleanup(self.audit.close)
        self.opener = RecordingOpener()
        self.leases = LeaseService(
            table=LeaseTable((6000, 6001), LeaseLimits(max_per_user=2)), opener=self.opener,
            clock=reactor, audit=self.audit,
            journal=LeaseJournal(os.path.join(self.dir, "leases.json")),
            public_host="proxy.test")
        self.opener.service = self.leases
        self.leases.startService()
        self.addCleanup(self.leases.stopService)
        self.resource = ControlResource(self.leases,
                                        backend_public=identity.public_bytes(self.key),
                                        clock=reactor, audit=self.audit,
                                        window=30)
        site = control_site(self.resource, reactor=reactor)
        port = reactor.listenTCP(0, LimitedFactory(site, 8, 8),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        self.http = JsonClient(reactor, None, timeout=10)
        self.clock = Skewed()
        self.ctl = ProxyControl(client=self.http, url=self.url, key=self.key, clock=self.clock)

    async def open(self, ctl: ProxyControl | None = None, **kw: Any) -> dict[str, Any]:
        args: dict[str, Any] = {"user": "alice", "session": "s1", "vm": "vm-1",
                                "target": "127.0.0.1:2201", "address": "::ffff:127.0.0.1",
                                "expires": int(reactor.seconds()) + 600}
        args.update(kw)
        return await (ctl or self.ctl).open(**args)

    async def refused(self, coro: Any) -> ProxyControlError:
        try:
            await coro
        except ProxyControlError as e:
            return e
        self.fail("not refused")

    async def test_open_list_get_close(self) -> None:
        lease = await self.open()
        self.assertEqual((lease["port"], lease["allowed"], lease["host"], lease["user"]),
                         (6000, "127.0.0.1", "proxy.test", "alice"))
        self.assertEqual(self.opener.opened, [6000])
        again = await self.open(address="127.0.0.1")
        self.assertEqual(again["id"], lease["id"])
        self.assertEqual(self.opener.opened, [6000])
        listed = await self.ctl.leases("alice")
        self.assertEqual([x["id"] for x in listed], [lease["id"]])
        self.assertEqual(await self.ctl.leases("bob"), [])
        self.assertFalse(await self.ctl.close(lease["id"], "bob"))
        self.assertTrue(await self.ctl.close(lease["id"], "alice"))
        self.assertFalse(await self.ctl.close(lease["id"], "alice"))
        self.assertEqual(self.opener.closed, [(6000, lease["id"])])
        events = [(e["event"], e.get("reason")) for e in read_audit(self.audit_path)]
        self.assertEqual(events, [("lease-open", None), ("lease-close", "closed")])

    async def test_close_session(self) -> None:
        await self.open(vm="a")
        await self.open(vm="b", user="bob", session="s2")
        self.assertEqual(await self.ctl.close_session("s1"), 1)
        self.assertEqual([x.user for x in self.leases.leases()], ["bob"])

    async def test_exhaustion_and_per_user_cap(self) -> None:
        await self.open(vm="a")
        await self.open(vm="b")
        e = await self.refused(self.open(vm="c"))
        self.assertEqual((e.status, e.code), (409, "too-many-leases"))
        e = await self.refused(self.open(vm="c", user="bob"))
        self.assertEqual((e.status, e.code), (503, "no-free-port"))

    async def test_bad_address(self) -> None:
        e = await self.refused(self.open(address="not-an-ip"))
        self.assertEqual((e.status, e.code), (400, "bad-address"))

    async def test_bad_signature(self) -> None:
        other = ProxyControl(client=self.http, url=self.url, key=identity.generate(),
                             clock=self.clock)
        e = await self.refused(self.open(other))
        self.assertEqual((e.status, e.code), (401, "bad-signature"))
        self.assertEqual(self.leases.leases(), [])
        [line] = read_audit(self.audit_path)
        self.assertEqual((line["event"], line["reason"], line["path"]),
                         ("control-refused", "bad-signature", "/v1/leases"))

    async def test_stale(self) -> None:
        for offset in (-31, 31):
            self.clock.offset = offset
            e = await self.refused(self.open())
            self.assertEqual((e.status, e.code), (401, "stale"))
        self.assertEqual(self.leases.leases(), [])

    async def raw(self, method: str, path: str, body: Any, token: str | None) -> Any:
        headers = {"Authorization": f"{SCHEME} {token}"} if token else {}
        return await self.http.request(method, self.url + path, body, headers)

    def token(self, method: str, path: str, body: Any, nonce: bytes = b"n" * 16) -> str:
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        return signed.sign_control_request(self.key, method=method, path=path, body=data,
                                           now=reactor.seconds(),
                                           nonce=b64(nonce))

    async def test_replay(self) -> None:
        token = self.token("GET", "/v1/users/alice/leases", None)
        status, _ = await self.raw("GET", "/v1/users/alice/leases", None, token)
        self.assertEqual(status, 200)
        status, answer = await self.raw("GET", "/v1/users/alice/leases", None, token)
        self.assertEqual((status, answer["error"]["code"]), (401, "replayed"))

    async def test_signature_bound_to_request(self) -> None:
        body = {"user": "alice", "session": "s1", "vm": "vm-1", "target": "127.0.0.1:1",
                "address": "127.0.0.1", "expires": int(reactor.seconds()) + 60}
        token = self.token("POST", "/v1/leases", body)
        status, answer = await self.raw("POST", "/v1/leases", dict(body, user="mallory"),
                                        token)
        self.assertEqual((status, answer["error"]["code"]), (401, "wrong-request"))
        token = self.token("GET", "/v1/users/alice/leases", None, b"m" * 16)
        status, answer = await self.raw("GET", "/v1/users/bob/leases", None, token)
        self.assertEqual((status, answer["error"]["code"]), (401, "wrong-request"))
        self.assertEqual(self.leases.leases(), [])

    async def test_missing_or_garbled_signature(self) -> None:
        status, answer = await self.raw("GET", "/v1/users/alice/leases", None, None)
        self.assertEqual((status, answer["error"]["code"]), (401, "missing-signature"))
        status, answer = await self.raw("GET", "/v1/users/alice/leases", None, "x.y")
        self.assertEqual((status, answer["error"]["code"]), (401, "bad-token"))
        status, answer = await self.http.request(
            "GET", self.url + "/v1/users/alice/leases", None,
            {"Authorization": "Bearer " + self.token("GET", "/v1/users/alice/leases", None)})
        self.assertEqual((status, answer["error"]["code"]), (401, "missing-signature"))

    async def test_refusals_rate_limited(self) -> None:
        from ticrypt.proxy.ctlapi import FAILURES_PER_ADDRESS
        for _ in range(FAILURES_PER_ADDRESS):
            status, _ = await self.raw("GET", "/v1/users/alice/leases", None, "x.y")
            self.assertEqual(status, 401)
        for _ in range(3):
            e = await self.refused(self.ctl.leases("alice"))  # even a good one now
            self.assertEqual((e.status, e.code), (429, "rate-limited"))
        reasons = [x["reason"] for x in read_audit(self.audit_path)]
        self.assertEqual(reasons, ["bad-token"] * FAILURES_PER_ADDRESS + ["rate-limited"])

    async def test_open_failure_blocks_port_and_uses_next(self) -> None:
        self.opener.fail.add(6000)
        lease = await self.open()
        self.assertEqual(lease["port"], 6001)
        self.assertEqual(self.opener.opened, [6001])
        e = await self.refused(self.open(vm="b", user="bob"))
        self.assertEqual(e.code, "no-free-port")
        # the failed port was never audited as a lease
        self.assertEqual([x["event"] for x in read_audit(self.audit_path)], ["lease-open"])


class NonceCacheTests(SynchronousTestCase):
    def test_replay_expiry_and_bound(self) -> None:
        cache = NonceCache(keep=10, max_entries=2)
        self.assertIsNone(cache.use("a", 0))
        self.assertEqual(cache.use("a", 5), "replayed")
        self.assertIsNone(cache.use("b", 5))
        self.assertEqual(cache.use("c", 5), "busy")
        self.assertIsNone(cache.use("c", 10))  # "a" forgotten
        self.assertIsNone(cache.use("a", 15))  # "b" forgotten too
        self.assertEqual(len(cache), 2)


class LeaseServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.audit_path = os.path.join(self.dir, "audit.log")
        self.audit = AuditLog(self.audit_path, self.clock, role="proxy")
        self.addCleanup(self.audit.close)
        self.journal = LeaseJournal(os.path.join(self.dir, "leases.json"))

    def service(self, opener: RecordingOpener, idle: float = 600) -> LeaseService:
        s = LeaseService(table=LeaseTable((6000, 6005), LeaseLimits(idle_timeout=idle)),
                         opener=opener, clock=self.clock, audit=self.audit,
                         journal=self.journal, public_host="h", new_id=iter(
                             f"ls-{i}" for i in range(100)).__next__)
        opener.service = s
        return s

    def open(self, s: LeaseService, **kw: Any) -> Lease:
        args: dict[str, Any] = {"user": "alice", "session": "s1", "vm": "vm-1",
                                "target": "127.0.0.1:2201", "address": "127.0.0.1",
                                "expires": 5000.0}
        args.update(kw)
        lease, _ = self.successResultOf(defer.ensureDeferred(s.open(**args)))
        return lease

    def test_journal_survives_restart(self) -> None:
        first = RecordingOpener()
        s = self.service(first)
        s.startService()
        lease = self.open(s)
        self.successResultOf(s.stopService())
        self.assertEqual(first.stopped, 1)
        self.assertEqual(first.closed, [])  # a stop ends no lease
        second = RecordingOpener()
        s2 = self.service(second)
        s2.startService()
        self.assertEqual(second.opened, [lease.port])
        restored = s2.get(lease.id)
        assert restored is not None
        self.assertEqual(restored.allowed, "127.0.0.1")
        events = [(e["event"], e.get("restored")) for e in read_audit(self.audit_path)]
        self.assertEqual(events, [("lease-open", None), ("lease-open", True)])
        self.successResultOf(s2.stopService())

    def test_expired_while_down_not_restored(self) -> None:
        s = self.service(RecordingOpener())
        s.startService()
        self.open(s, expires=1100.0)
        self.successResultOf(s.stopService())
        self.clock.advance(200)
        second = RecordingOpener()
        s2 = self.service(second)
        s2.startService()
        self.assertEqual((second.opened, s2.leases()), ([], []))
        with open(self.journal.path) as f:
            self.assertEqual(json.load(f), {"leases": []})

    def test_garbled_journal_ignored(self) -> None:
        with open(self.journal.path, "w") as f:
            f.write("{not json")
        opener = RecordingOpener()
        s = self.service(opener)
        s.startService()
        self.assertEqual(s.leases(), [])
        self.successResultOf(s.stopService())

    def test_timer_ends_idle_and_expired_leases(self) -> None:
        opener = RecordingOpener()
        s = self.service(opener, idle=60)
        s.startService()
        a = self.open(s, expires=1500.0)
        b = self.open(s, vm="b", expires=9000.0)
        opener.connections[b.id] = 1
        s.activity(b.id)
        self.clock.advance(60)
        self.assertEqual(opener.closed, [(a.port, a.id)])
        self.clock.advance(1000)
        self.assertEqual(len(opener.closed), 1)  # b has a connection
        opener.connections[b.id] = 0
        s.activity(b.id)
        self.clock.advance(59)
        self.assertEqual(len(opener.closed), 1)
        self.clock.advance(1)
        self.assertEqual(opener.closed[1], (b.port, b.id))
        reasons = [e.get("reason") for e in read_audit(self.audit_path)
                   if e["event"] == "lease-close"]
        self.assertEqual(reasons, ["idle", "idle"])
        self.successResultOf(s.stopService())

    def test_replacement_closes_before_it_opens(self) -> None:
        opener = RecordingOpener()
        s = LeaseService(table=LeaseTable((6000, 6000), LeaseLimits()), opener=opener,
                         clock=self.clock, audit=self.audit, journal=None, public_host="h")
        opener.service = s
        s.startService()
        old = self.open(s, address="192.0.2.1")
        new = self.open(s, address="198.51.100.2")
        self.assertEqual((old.port, new.port), (6000, 6000))
        self.assertEqual(opener.closed, [(6000, old.id)])
        self.assertEqual(opener.opened, [6000, 6000])
        reasons = [e.get("reason") for e in read_audit(self.audit_path)
                   if e["event"] == "lease-close"]
        self.assertEqual(reasons, ["replaced"])
        self.successResultOf(s.stopService())

    def test_revoke(self) -> None:
        opener = RecordingOpener()
        s = self.service(opener)
        s.startService()
        self.open(s, vm="a")
        self.open(s, vm="b", user="bob", session="s2")
        self.open(s, vm="c", user="carol", session="s3")
        self.assertEqual(s.revoke({"bob": 1}, frozenset({"s1"})), 2)
        self.assertEqual([x.user for x in s.leases()], ["carol"])
        self.successResultOf(s.stopService())
