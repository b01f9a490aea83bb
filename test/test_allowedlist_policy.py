"""The allow-list's sans-IO DNS policy: matching, lookalikes, rate limits."""

from __future__ import annotations

from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from ticrypt.allowedlist import policy
from ticrypt.allowedlist.policy import Entry, Kind, Policy, Question


def query(name: bytes, qtype: int = dns.A, labels: tuple[bytes, ...] | None = None) -> bytes:
    m = dns.Message(id=7, recDes=1)
    m.queries = [dns.Query(b"x", qtype, dns.IN)]
    raw = m.toStr()
    if labels is None:
        labels = tuple(name.split(b"."))
    wire = b"".join(bytes([len(x)]) + x for x in labels if x) + b"\0"
    return raw[:12] + wire + raw[12 + 3:]


def q(name: bytes, qtype: int = dns.A) -> Question:
    parsed = policy.question(query(name, qtype))
    assert parsed is not None
    return parsed


ENTRIES = [Entry("al-1", "license.example.org", (27000,)),
           Entry("al-2", "*.flex.example.net", (27001,)),
           Entry("al-3", "xn--bcher-kva.example", (443,))]


def make(refused: str = "nxdomain") -> Policy:
    p = Policy(["10.77.3.0/24", "fd00:77::/64"], refused_answer=refused, rate=1.0, burst=3)
    p.set_entries(ENTRIES)
    p.admitted = {"license.example.org": "10.77.9.1", "a.flex.example.net": "10.77.9.2",
                  "xn--bcher-kva.example": "10.77.9.3"}
    return p


class QuestionTests(SynchronousTestCase):
    def test_labels(self) -> None:
        parsed = policy.question(query(b"License.Example.org", dns.AAAA))
        self.assertEqual(parsed, Question((b"License", b"Example", b"org"), dns.AAAA, dns.IN))

    def test_malformed(self) -> None:
        good = query(b"license.example.org")
        for bad in (good[:11], good[:20], good[:-1], good[:2] + b"\x80" + good[3:],
                    good[:4] + b"\x00\x02" + good[6:], good[:12] + b"\xc0\x0c" + good[-4:],
                    good[:12] + b"\x40" + b"a" * 64 + b"\0" + good[-4:]):
            self.assertIsNone(policy.question(bad), bad)

    def test_too_long(self) -> None:
        long = tuple([b"a" * 63] * 4)
        self.assertIsNone(policy.question(query(b"", labels=long)))
        self.assertIsNotNone(policy.question(query(b"", labels=long[:3])))


class EntryNameTests(SynchronousTestCase):
    def test_good(self) -> None:
        for name in ("license.example.org", "*.example.org", "xn--bcher-kva.example", "a-b.c"):
            self.assertEqual(policy.entry_name(name), name)

    def test_bad(self) -> None:
        for name in ("License.example.org", "license.example.org.", "bücher.example", "*.org",
                     "a..b", "-a.b", "a-.b", "ab--c.d", "xn--license-.example", "xn--.x",
                     "a.*.b", "*", "", "a" * 254, "a b.c", "lic\0ense.org", "a_b.example.org"):
            self.assertRaises(ValueError, policy.entry_name, name)

    def test_parse_entry(self) -> None:
        e = policy.parse_entry({"id": "al-ab", "name": "l.example.org", "ports": [2, 1, 2],
                                "protocol": "udp", "comment": "x"})
        self.assertEqual(e, Entry("al-ab", "l.example.org", (1, 2), "udp", "x"))
        b = {"id": "al-1", "name": "l.example.org"}
        bads: list[object] = [
            {**b, "id": "x", "ports": [1]}, {**b, "ports": []},
            {**b, "ports": list(range(1, 34))}, {**b, "ports": [True]}, {**b, "ports": [70000]},
            {**b, "ports": [1], "protocol": "icmp"}, {**b, "ports": [1], "comment": "x" * 201},
            {**b, "name": "L.example.org", "ports": [1]}, []]
        for bad in bads:
            self.assertRaises(ValueError, policy.parse_entry, bad)


class DecideTests(SynchronousTestCase):
    def test_answer(self) -> None:
        p = make()
        d = p.decide("10.77.3.11", q(b"license.example.org"), 0)
        self.assertEqual((d.kind, d.addresses, d.entry), (Kind.ANSWER, ("10.77.9.1",), ENTRIES[0]))

    def test_case_and_trailing_dot(self) -> None:
        p = make()
        for name in (b"LICENSE.example.ORG", b"license.example.org."):
            self.assertEqual(p.answer(q(name)).kind, Kind.ANSWER)

    def test_any_aaaa_cname(self) -> None:
        p = make()
        self.assertEqual(p.answer(q(b"license.example.org", dns.ALL_RECORDS)).kind, Kind.ANSWER)
        self.assertEqual(p.answer(q(b"license.example.org", dns.AAAA)).kind, Kind.NODATA)
        self.assertEqual(p.answer(q(b"license.example.org", dns.CNAME)).kind, Kind.NODATA)
        p.admitted["license.example.org"] = "fd00:9::1"
        self.assertEqual(p.answer(q(b"license.example.org", dns.AAAA)).addresses, ("fd00:9::1",))
        self.assertEqual(p.answer(q(b"license.example.org", dns.A)).kind, Kind.NODATA)

    def test_not_allowed(self) -> None:
        for refused, kind in (("nxdomain", Kind.NXDOMAIN), ("refused", Kind.REFUSED)):
            p = make(refused)
            for name in (b"example.org", b"x.license.example.org", b"license.example.com",
                         b"flex.example.net", b"a.flex.example.net.evil.org"):
                self.assertEqual(p.answer(q(name)).kind, kind, name)

    def test_wildcard_one_or_more_labels(self) -> None:
        p = make()
        self.assertEqual(p.answer(q(b"a.flex.example.net")).kind, Kind.ANSWER)
        d = p.answer(q(b"B.flex.example.net"))
        self.assertEqual((d.kind, d.name, d.entry), (Kind.PENDING, "b.flex.example.net",
                                                     ENTRIES[1]))
        d = p.answer(q(b"x.Y.flex.example.net"))
        self.assertEqual((d.kind, d.name, d.entry), (Kind.PENDING, "x.y.flex.example.net",
                                                     ENTRIES[1]))
        self.assertEqual(p.answer(q(b"*.flex.example.net")).kind, Kind.NXDOMAIN)
        self.assertEqual(p.answer(q(b"flex.example.net")).kind, Kind.NXDOMAIN)
        self.assertEqual(p.answer(q(b"aflex.example.net")).kind, Kind.NXDOMAIN)

    def test_lookalikes(self) -> None:
        p = make()
        looks = [
            (b"lic\0ense", b"example", b"org"),        # embedded NUL
            (b"license\0", b"example", b"org"),
            (b"license.example", b"org"),              # dot inside a label
            (b"license", b"example.org"),
            ("lіcense".encode(), b"example", b"org"),  # Cyrillic i (U-label bytes)
            ("license．example".encode(), b"org"),     # full-width dot
            (b"xn--lcense-2of", b"example", b"org"),   # punycode of the Cyrillic spelling
            (b"xn--license-", b"example", b"org"),     # punycode of the plain name
            ("bücher".encode(), b"example"),           # U-label of an allowed A-label
            (b"xn--bcher-kva ", b"example"),
            (b"license ", b"example", b"org"),
        ]
        for labels in looks:
            d = p.answer(policy.question(query(b"", labels=labels)))  # type: ignore[arg-type]
            self.assertEqual(d.kind, Kind.NXDOMAIN, labels)
        self.assertEqual(p.answer(q(b"XN--BCHER-KVA.example")).kind, Kind.ANSWER)

    def test_class(self) -> None:
        p = make()
        d = p.answer(Question((b"license", b"example", b"org"), dns.A, dns.CH))
        self.assertEqual(d.kind, Kind.REFUSED)

    def test_pending_until_admitted(self) -> None:
        p = make()
        p.admitted.clear()
        self.assertEqual(p.answer(q(b"license.example.org")).kind, Kind.PENDING)

    def test_outsider_dropped(self) -> None:
        p = make()
        for client in ("10.77.4.2", "127.0.0.1", "fd00:78::1", "nonsense"):
            d = p.decide(client, q(b"license.example.org"), 0)
            self.assertEqual((d.kind, d.why), (Kind.DROP, "outside"))
        self.assertEqual(p.decide("::ffff:10.77.3.11", q(b"license.example.org"), 0).kind,
                         Kind.ANSWER)
        self.assertEqual(p.decide("fd00:77::5", q(b"license.example.org"), 0).kind, Kind.ANSWER)

    def test_rate_per_client(self) -> None:
        p = make()
        name = q(b"license.example.org")
        kinds = [p.decide("10.77.3.11", name, 0).kind for _ in range(4)]
        self.assertEqual(kinds, [Kind.ANSWER] * 3 + [Kind.DROP])
        # another client is not starved
        self.assertEqual(p.decide("10.77.3.12", name, 0).kind, Kind.ANSWER)
        self.assertEqual(p.decide("10.77.3.11", name, 0.5).kind, Kind.DROP)
        self.assertEqual(p.decide("10.77.3.11", name, 1.0).kind, Kind.ANSWER)

    def test_buckets_bounded(self) -> None:
        b = policy.TokenBuckets(1, 1, max_keys=10)
        for i in range(100):
            b.take(str(i), 0)
        self.assertEqual(len(b), 10)
