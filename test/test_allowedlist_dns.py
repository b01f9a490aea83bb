"""The allow-list's DNS responder in memory: answers, NXDOMAIN/REFUSED,
dropped outsiders, TC, malformed/oversized dropped and counted,
CNAME/ANY/AAAA, waiting for the firewall, per-client caps."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.names import dns
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ticrypt.allowedlist.dns import MAX_CACHED, MAX_QUERY, AllowListServer, TCPProtocol
from ticrypt.allowedlist.policy import Entry, Policy

VM = ("10.77.3.11", 5353)
ENTRIES = [Entry("al-1", "license.example.org", (27000,)),
           Entry("al-2", "*.flex.example.net", (27001,))]


class FakeUDP:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


class Admitter:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.waits: list[tuple[str, defer.Deferred[None]]] = []

    def wait(self, name: str, entry: Entry) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.waits.append((name, d))
        return d

    def admit(self, name: str, address: str) -> None:
        self.policy.admitted[name] = address
        for n, d in self.waits:
            if n == name and not d.called:
                d.callback(None)


def query(name: bytes, qtype: int = dns.A, ident: int = 1) -> bytes:
    m = dns.Message(id=ident, recDes=1)
    m.queries = [dns.Query(name, qtype, dns.IN)]
    return m.toStr()


def parse(data: bytes) -> dns.Message:
    m = dns.Message()
    m.fromStr(data)
    return m


class Fixture:
    def __init__(self, refused: str = "nxdomain", **kw: object) -> None:
        self.clock = task.Clock()
        self.policy = Policy(["10.77.3.0/24"], refused_answer=refused, rate=100, burst=100)
        self.policy.set_entries(ENTRIES)
        self.policy.admitted = {"license.example.org": "10.77.9.1"}
        self.admitter = Admitter(self.policy)
        self.server = AllowListServer(self.policy, self.clock, admitter=self.admitter,
                                      **kw)  # type: ignore[arg-type]
        self.udp = self.server.udp_protocol()
        self.wire = FakeUDP()
        self.udp.makeConnection(self.wire)  # type: ignore[arg-type]

    def ask(self, data: bytes, addr: tuple[str, int] = VM) -> dns.Message | None:
        before = len(self.wire.sent)
        self.udp.datagramReceived(data, addr)
        if len(self.wire.sent) == before:
            return None
        data, to = self.wire.sent[-1]
        assert to == addr
        return parse(data)

    def tcp(self, host: str = "10.77.3.11") -> tuple[TCPProtocol, StringTransport]:
        p = self.server.buildProtocol(None)
        t = StringTransport(peerAddress=IPv4Address("TCP", host, 4000))
        p.makeConnection(t)
        return p, t


def addresses(m: dns.Message) -> list[str]:
    out = []
    for a in m.answers:
        payload: Any = a.payload
        out.append(payload.dottedQuad() if a.type == dns.A else payload._address)
    return out


class UDPTests(SynchronousTestCase):
    def test_answer(self) -> None:
        f = Fixture()
        r = f.ask(query(b"License.Example.org", ident=77))
        assert r is not None
        self.assertEqual((r.id, r.answer, r.rCode, r.auth, r.trunc), (77, 1, dns.OK, 1, 0))
        self.assertEqual(addresses(r), ["10.77.9.1"])
        self.assertEqual(r.answers[0].name.name, b"License.Example.org")
        self.assertEqual(r.answers[0].ttl, 60)
        self.assertEqual(f.server.counters["answer"], 1)

    def test_nxdomain_and_refused(self) -> None:
        r = Fixture().ask(query(b"evil.example.com"))
        assert r is not None
        self.assertEqual((r.rCode, r.answers), (dns.ENAME, []))
        r = Fixture("refused").ask(query(b"evil.example.com"))
        assert r is not None
        self.assertEqual((r.rCode, r.answers), (dns.EREFUSED, []))

    def test_denied_audited_once_a_minute_per_client(self) -> None:
        f = Fixture()
        lines: list[tuple[str, dict[str, object]]] = []
        f.server.audit = lambda event, **kw: lines.append((event, kw))
        for _ in range(3):
            f.ask(query(b"evil.example.com"))
        f.ask(query(b"evil.example.com"), ("10.77.3.12", 1))
        self.assertEqual(lines, [
            ("allowlist-dns-denied", {"client": "10.77.3.11", "name": "evil.example.com",
                                      "why": "not-allowed"}),
            ("allowlist-dns-denied", {"client": "10.77.3.12", "name": "evil.example.com",
                                      "why": "not-allowed"})])
        f.clock.advance(60)
        f.ask(query(b"evil.example.com"))
        self.assertEqual(len(lines), 3)

    def test_aaaa_cname_any(self) -> None:
        f = Fixture()
        for qtype in (dns.AAAA, dns.CNAME, dns.MX):
            r = f.ask(query(b"license.example.org", qtype))
            assert r is not None
            self.assertEqual((r.rCode, r.answers), (dns.OK, []), qtype)
        r = f.ask(query(b"license.example.org", dns.ALL_RECORDS))
        assert r is not None
        self.assertEqual(addresses(r), ["10.77.9.1"])
        f.policy.admitted["license.example.org"] = "fd00:9::1"
        r = f.ask(query(b"license.example.org", dns.AAAA))
        assert r is not None
        self.assertEqual([a.type for a in r.answers], [dns.AAAA])

    def test_outsider_dropped(self) -> None:
        f = Fixture()
        self.assertIsNone(f.ask(query(b"license.example.org"), ("10.77.4.2", 53)))
        self.assertIsNone(f.ask(query(b"license.example.org"), ("127.0.0.1", 53)))
        self.assertEqual(f.server.counters["dropped-outside"], 2)
        self.assertEqual(f.wire.sent, [])

    def test_outsiders_audited_within_limits(self) -> None:
        """A dropped outsider is an audit line (never an answer): at most
        one per source per minute, and at most 60 at once over all sources
        (UDP sources can be spoofed), then one a second."""
        f = Fixture()
        lines: list[dict[str, object]] = []
        f.server.audit = lambda event, **kw: lines.append(dict(kw, event=event))
        for _ in range(3):
            self.assertIsNone(f.ask(query(b"x.example.org"), ("10.77.4.2", 53)))
        self.assertEqual(lines, [{"event": "allowlist-dns-dropped", "client": "10.77.4.2",
                                  "transport": "udp", "why": "outside vm_networks"}])
        for i in range(200):  # spoofed sources
            f.ask(query(b"x.example.org"), (f"10.88.{i // 250}.{i % 250}", 53))
        self.assertEqual(len(lines), 60)  # the burst over all sources
        self.assertEqual(f.server.counters["dropped-outside"], 203)
        self.assertEqual(f.wire.sent, [])
        f.clock.advance(61)
        f.ask(query(b"x.example.org"), ("10.77.4.2", 53))
        self.assertEqual(len(lines), 61)

    def test_malformed_and_oversized(self) -> None:
        f = Fixture()
        good = query(b"license.example.org")
        for bad in (b"", b"\0" * 11, good[:-2], good[:2] + b"\x80" + good[3:], b"\xff" * 100):
            self.assertIsNone(f.ask(bad))
        self.assertEqual(f.server.counters["dropped-malformed"], 5)
        self.assertIsNone(f.ask(good + b"\0" * (MAX_QUERY + 1 - len(good))))
        self.assertEqual(f.server.counters["dropped-oversized"], 1)
        self.assertEqual(f.wire.sent, [])
        self.assertIsNotNone(f.ask(good))

    def test_truncation(self) -> None:
        f = Fixture(udp_size=40)
        r = f.ask(query(b"license.example.org"))
        assert r is not None
        self.assertEqual((r.trunc, r.answers, r.rCode), (1, [], dns.OK))
        self.assertEqual(f.server.counters["truncated"], 1)

    def test_notimp(self) -> None:
        m = dns.Message(id=3, opCode=dns.OP_STATUS)
        m.queries = [dns.Query(b"license.example.org", dns.A, dns.IN)]
        r = Fixture().ask(m.toStr())
        assert r is not None
        self.assertEqual(r.rCode, dns.ENOTIMP)

    def test_rate_limited_client_does_not_starve_others(self) -> None:
        f = Fixture()
        f.policy.buckets.rate, f.policy.buckets.burst = 1.0, 5.0
        answered = sum(f.ask(query(b"license.example.org")) is not None for _ in range(50))
        self.assertEqual(answered, 5)
        self.assertEqual(f.server.counters["dropped-rate"], 45)
        self.assertIsNotNone(f.ask(query(b"license.example.org"), ("10.77.3.12", 1)))


class CacheTests(SynchronousTestCase):
    """Repeated UDP queries are answered from the cache of replies, never
    past a change of the policy, and with every check still made."""

    def test_new_id_and_case(self) -> None:
        f = Fixture()
        f.ask(query(b"license.example.org", ident=1))
        self.assertEqual(len(f.server.udp_cache), 1)
        r = f.ask(query(b"license.example.org", ident=0xBEEF))
        assert r is not None
        self.assertEqual((r.id, r.rCode, r.auth, addresses(r)), (0xBEEF, dns.OK, 1, ["10.77.9.1"]))
        self.assertEqual(f.wire.sent[0][0][2:], f.wire.sent[1][0][2:])
        self.assertEqual(len(f.server.udp_cache), 1)  # answered from it
        r = f.ask(query(b"LICENSE.example.ORG", ident=5))
        assert r is not None
        self.assertEqual((r.id, addresses(r)), (5, ["10.77.9.1"]))
        self.assertEqual(r.queries[0].name.name, b"LICENSE.example.ORG")
        self.assertEqual(r.answers[0].name.name, b"LICENSE.example.ORG")
        self.assertEqual(f.server.counters["answer"], 3)

    def test_removed_entry_no_longer_answered(self) -> None:
        f = Fixture()
        for _ in range(2):
            r = f.ask(query(b"license.example.org"))
            assert r is not None
            self.assertEqual(addresses(r), ["10.77.9.1"])
        f.policy.set_entries(ENTRIES[1:])
        r = f.ask(query(b"license.example.org"))
        assert r is not None
        self.assertEqual((r.rCode, r.answers), (dns.ENAME, []))
        self.assertEqual(f.server.counters["nxdomain"], 1)
        f.policy.set_entries(ENTRIES)  # back: answered again, not the NXDOMAIN
        r = f.ask(query(b"license.example.org"))
        assert r is not None
        self.assertEqual(addresses(r), ["10.77.9.1"])

    def test_admission_changes(self) -> None:
        f = Fixture()
        f.ask(query(b"license.example.org"))
        f.policy.admitted["license.example.org"] = "10.77.9.7"  # in place
        r = f.ask(query(b"license.example.org"))
        assert r is not None
        self.assertEqual(addresses(r), ["10.77.9.7"])
        f.policy.admitted = {}  # no longer admitted: wait for the firewall
        sent = len(f.wire.sent)
        self.assertIsNone(f.ask(query(b"license.example.org")))
        self.assertEqual([n for n, _ in f.admitter.waits], ["license.example.org"])
        f.admitter.admit("license.example.org", "10.77.9.8")
        self.assertEqual(addresses(parse(f.wire.sent[sent][0])), ["10.77.9.8"])

    def test_denied_name_admitted_later(self) -> None:
        f = Fixture()
        r = f.ask(query(b"new.example.org"))
        assert r is not None
        self.assertEqual(r.rCode, dns.ENAME)
        f.policy.set_entries([*ENTRIES, Entry("al-3", "new.example.org", (1,))])
        f.policy.admitted["new.example.org"] = "10.77.9.3"
        r = f.ask(query(b"new.example.org"))
        assert r is not None
        self.assertEqual(addresses(r), ["10.77.9.3"])

    def test_checks_still_made(self) -> None:
        f = Fixture(udp_size=40)
        data = query(b"license.example.org")
        f.ask(data)
        self.assertIsNone(f.ask(data, ("10.77.4.2", 53)))  # outsider: dropped
        self.assertEqual(f.server.counters["dropped-outside"], 1)
        self.assertIsNone(f.ask(data + b"\0" * (MAX_QUERY + 1 - len(data))))
        self.assertEqual(f.server.counters["dropped-oversized"], 1)
        r = f.ask(data)
        assert r is not None
        self.assertEqual((r.trunc, r.answers), (1, []))
        self.assertEqual(f.server.counters["truncated"], 2)
        self.assertEqual(len(f.wire.sent), 2)

    def test_settings_change_empties_it(self) -> None:
        f = Fixture()
        f.ask(query(b"license.example.org"))
        f.server.answer_ttl = 5
        r = f.ask(query(b"license.example.org"))
        assert r is not None
        self.assertEqual(r.answers[0].ttl, 5)
        f.server.udp_size = 40
        r = f.ask(query(b"license.example.org"))
        assert r is not None
        self.assertEqual(r.trunc, 1)

    def test_wildcard_use_stamped_and_denials_audited(self) -> None:
        f = Fixture()
        lines: list[str] = []
        f.server.audit = lambda event, **kw: lines.append(event)
        f.policy.admitted["a.flex.example.net"] = "10.77.9.2"
        f.ask(query(b"a.flex.example.net"))
        f.clock.advance(5)
        f.ask(query(b"a.flex.example.net"))
        self.assertEqual(f.policy.seen, {"a.flex.example.net": 5.0})
        f.ask(query(b"evil.example.com"))
        f.ask(query(b"evil.example.com"))
        f.clock.advance(60)
        f.ask(query(b"evil.example.com"))
        self.assertEqual(lines, ["allowlist-dns-denied"] * 2)

    def test_bounded(self) -> None:
        f = Fixture()
        f.policy.buckets.rate = f.policy.buckets.burst = 1e9
        for i in range(MAX_CACHED + 1):
            f.ask(query(b"n%d.example.com" % i))
        self.assertEqual(f.server.counters["nxdomain"], MAX_CACHED + 1)
        self.assertLessEqual(len(f.server.udp_cache), MAX_CACHED)

    def test_send_failure_counted(self) -> None:
        f = Fixture()
        broken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        broken.close()
        wire: Any = FakeUDP()
        wire.socket = broken
        udp = f.server.udp_protocol()
        udp.makeConnection(wire)
        udp.datagramReceived(query(b"license.example.org"), VM)
        self.assertEqual(f.server.counters["send-failed"], 1)
        self.assertEqual(wire.sent, [])
        udp.doStop()


class WaitTests(SynchronousTestCase):
    def test_answer_once_admitted(self) -> None:
        f = Fixture()
        self.assertIsNone(f.ask(query(b"a.flex.example.net")))
        self.assertEqual([n for n, _ in f.admitter.waits], ["a.flex.example.net"])
        f.admitter.admit("a.flex.example.net", "10.77.9.2")
        r = parse(f.wire.sent[-1][0])
        self.assertEqual(addresses(r), ["10.77.9.2"])
        self.assertEqual(f.clock.getDelayedCalls(), [])
        self.assertEqual(f.policy.seen, {"a.flex.example.net": 0.0})  # keeps it in use

    def test_not_admitted_in_time(self) -> None:
        f = Fixture()
        self.assertIsNone(f.ask(query(b"a.flex.example.net")))
        f.clock.advance(3)
        r = parse(f.wire.sent[-1][0])
        self.assertEqual(r.rCode, dns.ESERVER)
        self.assertEqual(f.server.counters["servfail-not-admitted"], 1)

    def test_waiting_capped_per_client(self) -> None:
        f = Fixture(max_waiting_per_client=2)
        for i in range(3):
            f.ask(query(b"x%d.flex.example.net" % i))
        self.assertEqual(len(f.admitter.waits), 2)
        self.assertEqual(parse(f.wire.sent[-1][0]).rCode, dns.ESERVER)
        f.ask(query(b"x9.flex.example.net"), ("10.77.3.12", 1))
        self.assertEqual(len(f.admitter.waits), 3)

    def test_no_admitter(self) -> None:
        f = Fixture()
        f.server.admitter = None
        r = f.ask(query(b"a.flex.example.net"))
        assert r is not None
        self.assertEqual(r.rCode, dns.ESERVER)


def frame(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


class TCPTests(SynchronousTestCase):
    def test_answer(self) -> None:
        f = Fixture()
        p, t = f.tcp()
        p.dataReceived(frame(query(b"license.example.org", ident=9)))
        data = t.value()
        r = parse(data[2:])
        self.assertEqual(int.from_bytes(data[:2], "big"), len(data) - 2)
        self.assertEqual((r.id, addresses(r)), (9, ["10.77.9.1"]))

    def test_no_truncation_over_tcp(self) -> None:
        f = Fixture(udp_size=40)
        p, t = f.tcp()
        p.dataReceived(frame(query(b"license.example.org")))
        self.assertEqual(parse(t.value()[2:]).trunc, 0)

    def test_outsider_aborted(self) -> None:
        f = Fixture()
        p, t = f.tcp("10.77.4.2")
        self.assertTrue(t.disconnecting or getattr(t, "aborting", False))
        self.assertEqual(f.server.counters["dropped-outside"], 1)
        self.assertEqual(f.server.connections, [])
        p.connectionLost(None)

    def test_oversized_aborts(self) -> None:
        f = Fixture()
        p, t = f.tcp()
        p.dataReceived((MAX_QUERY + 1).to_bytes(2, "big"))
        self.assertTrue(t.aborting if hasattr(t, "aborting") else t.disconnecting)
        self.assertEqual(f.server.counters["dropped-oversized"], 1)

    def test_per_client_cap_and_idle(self) -> None:
        f = Fixture(max_tcp_per_client=2)
        conns = [f.tcp() for _ in range(3)]
        self.assertEqual(f.server.counters["dropped-tcp-cap"], 1)
        other = f.tcp("10.77.3.12")
        self.assertEqual(len(f.server.connections), 3)
        f.clock.advance(10)
        self.assertEqual(f.server.counters["tcp-idle-closed"], 3)
        for p, _ in conns + [other]:
            p.connectionLost(None)
        self.assertEqual(f.server.connections, [])
        self.assertEqual(f.clock.getDelayedCalls(), [])
