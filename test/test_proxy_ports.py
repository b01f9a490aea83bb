"""The proxy's lease table (ticrypt.proxy.ports), sans-IO."""

from __future__ import annotations

import itertools
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ticrypt.proxy.ports import (
    Close,
    Lease,
    LeaseError,
    LeaseLimits,
    LeaseTable,
    Open,
    normalize_address,
)


def table(low: int = 6000, high: int = 6002, **limits: Any) -> LeaseTable:
    return LeaseTable((low, high), LeaseLimits(**limits))


_ids = itertools.count(1)


def ask(t: LeaseTable, *, user: str = "alice", session: str = "s1", vm: str = "vm-1",
        address: str = "192.0.2.1", now: float = 1000.0,
        expires: float = 5000.0) -> tuple[Lease, list[Any]]:
    return t.request(user=user, session=session, vm=vm, target="10.0.0.5:2201",
                     address=address, expires=expires, now=now,
                     new_id=lambda: f"ls-{next(_ids)}")


class NormalizeTests(SynchronousTestCase):
    def test_mapped_ipv6_is_ipv4(self) -> None:
        self.assertEqual(normalize_address("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(normalize_address("::FFFF:c000:0201"), "192.0.2.1")

    def test_ipv6_canonical(self) -> None:
        self.assertEqual(normalize_address("2001:DB8:0:0::1"), "2001:db8::1")

    def test_not_an_address(self) -> None:
        for bad in ("", "example.org", "192.0.2.1:80", "300.1.1.1"):
            with self.assertRaises(LeaseError) as e:
                normalize_address(bad)
            self.assertEqual(e.exception.code, "bad-address")

    def test_request_normalises_and_admits_mapped(self) -> None:
        t = table()
        lease, _ = ask(t, address="::ffff:192.0.2.7")
        self.assertEqual(lease.allowed, "192.0.2.7")
        self.assertIs(t.admits(lease.port, "192.0.2.7"), lease)
        self.assertIs(t.admits(lease.port, "::ffff:192.0.2.7"), lease)
        self.assertIsNone(t.admits(lease.port, "192.0.2.8"))
        self.assertIsNone(t.admits(lease.port, "garbage"))
        self.assertIsNone(t.admits(lease.port + 1, "192.0.2.7"))


class AllocationTests(SynchronousTestCase):
    def test_open_action_and_lookups(self) -> None:
        t = table()
        lease, actions = ask(t)
        self.assertEqual(actions, [Open(lease)])
        self.assertEqual(lease.port, 6000)
        self.assertIs(t.get(lease.id), lease)
        self.assertIs(t.at_port(6000), lease)
        self.assertEqual(t.leases("alice"), [lease])
        self.assertEqual(t.leases("bob"), [])

    def test_exhaustion(self) -> None:
        t = table(6000, 6001)
        ask(t, vm="a")
        ask(t, vm="b")
        with self.assertRaises(LeaseError) as e:
            ask(t, vm="c")
        self.assertEqual(e.exception.code, "no-free-port")
        self.assertEqual(len(t), 2)

    def test_total_cap(self) -> None:
        t = table(6000, 6010, max_total=1)
        ask(t, vm="a")
        with self.assertRaises(LeaseError) as e:
            ask(t, user="bob", vm="b")
        self.assertEqual(e.exception.code, "no-free-port")

    def test_per_user_cap(self) -> None:
        t = table(6000, 6010, max_per_user=2)
        ask(t, vm="a")
        ask(t, vm="b")
        with self.assertRaises(LeaseError) as e:
            ask(t, vm="c")
        self.assertEqual(e.exception.code, "too-many-leases")
        # another user is not affected
        lease, _ = ask(t, user="bob", vm="c")
        self.assertEqual(lease.user, "bob")

    def test_reuse_same_session_vm_address(self) -> None:
        t = table(6000, 6000)
        first, _ = ask(t, now=1000, expires=2000)
        again, actions = ask(t, address="::ffff:192.0.2.1", now=1500, expires=3000)
        self.assertIs(again, first)
        self.assertEqual(actions, [])
        self.assertEqual(again.expires, 3000)
        self.assertEqual(again.last_activity, 1500)

    def test_other_session_or_vm_is_a_new_lease(self) -> None:
        t = table()
        first, _ = ask(t)
        other, actions = ask(t, session="s2")
        self.assertNotEqual(other.port, first.port)
        self.assertEqual(actions, [Open(other)])
        third, _ = ask(t, vm="vm-2")
        self.assertEqual(len({first.id, other.id, third.id}), 3)

    def test_other_address_replaces_the_sessions_lease(self) -> None:
        t = table(6000, 6000)
        old, _ = ask(t, address="192.0.2.1")
        new, actions = ask(t, address="198.51.100.2")
        self.assertEqual(actions, [Close(old, "replaced"), Open(new)])
        self.assertEqual(new.port, 6000)  # the only port, freed by the close
        self.assertIs(t.admits(6000, "198.51.100.2"), new)
        self.assertIsNone(t.admits(6000, "192.0.2.1"))
        self.assertIsNone(t.get(old.id))

    def test_refused_replacement_keeps_the_old_lease(self) -> None:
        t = table(6000, 6000)
        old, _ = ask(t, address="192.0.2.1")
        t.block(6000, until=5000)
        with self.assertRaises(LeaseError):
            ask(t, address="198.51.100.2")
        self.assertIs(t.get(old.id), old)
        self.assertIs(t.admits(6000, "192.0.2.1"), old)

    def test_freed_port_never_keeps_old_address(self) -> None:
        t = table(6000, 6000)
        old, _ = ask(t, address="192.0.2.1")
        self.assertEqual(t.release(old.id), [Close(old, "closed")])
        self.assertIsNone(t.at_port(6000))
        self.assertIsNone(t.admits(6000, "192.0.2.1"))
        new, _ = ask(t, user="bob", session="s9", address="198.51.100.9")
        self.assertEqual(new.port, 6000)
        self.assertIsNone(t.admits(6000, "192.0.2.1"))
        self.assertIs(t.admits(6000, "198.51.100.9"), new)

    def test_freed_port_goes_to_the_back(self) -> None:
        t = table(6000, 6002)
        a, _ = ask(t, vm="a")
        t.release(a.id)
        b, _ = ask(t, vm="b")
        self.assertEqual(b.port, 6001)

    def test_blocked_port_skipped_until_time(self) -> None:
        t = table(6000, 6000)
        t.block(6000, until=2000)
        with self.assertRaises(LeaseError) as e:
            ask(t, now=1000)
        self.assertEqual(e.exception.code, "no-free-port")
        lease, _ = ask(t, now=2000, expires=9000)
        self.assertEqual(lease.port, 6000)

    def test_release_checks_owner(self) -> None:
        t = table()
        lease, _ = ask(t)
        self.assertEqual(t.release(lease.id, user="mallory"), [])
        self.assertEqual(t.release("nope"), [])
        self.assertEqual(t.release(lease.id, user="alice"), [Close(lease, "closed")])
        self.assertEqual(len(t), 0)

    def test_bad_requests(self) -> None:
        t = table()
        for kwargs in ({"expires": 1000.0}, {"user": ""}, {"address": "nowhere"}):
            with self.assertRaises(LeaseError):
                ask(t, **kwargs)
        self.assertEqual(len(t), 0)


class ExpiryTests(SynchronousTestCase):
    def test_expires_at_session_end(self) -> None:
        t = table(idle_timeout=10_000)
        lease, _ = ask(t, now=1000, expires=1500)
        self.assertEqual(t.next_deadline(), 1500)
        self.assertEqual(t.expire(1499), [])
        self.assertEqual(t.expire(1500), [Close(lease, "expired")])
        self.assertIsNone(t.next_deadline())

    def test_idle_without_connections(self) -> None:
        t = table(idle_timeout=60)
        lease, _ = ask(t, now=1000)
        self.assertEqual(t.expire(1059), [])
        self.assertEqual(t.expire(1060), [Close(lease, "idle")])

    def test_open_connection_is_not_idle(self) -> None:
        t = table(idle_timeout=60)
        lease, _ = ask(t, now=1000, expires=5000)
        t.connection_opened(lease.id, 1010)
        self.assertEqual(t.expire(2000), [])
        self.assertEqual(t.next_deadline(), 5000)
        t.connection_closed(lease.id, 2000)
        self.assertEqual(t.expire(2059), [])
        self.assertEqual(t.expire(2060), [Close(lease, "idle")])

    def test_expiry_wins_over_open_connection(self) -> None:
        t = table(idle_timeout=60)
        lease, _ = ask(t, now=1000, expires=1200)
        t.connection_opened(lease.id, 1000)
        self.assertEqual(t.expire(1200), [Close(lease, "expired")])

    def test_touch_defers_idle(self) -> None:
        t = table(idle_timeout=60)
        lease, _ = ask(t, now=1000)
        t.touch(lease.id, 1050)
        self.assertEqual(t.expire(1100), [])
        self.assertEqual(t.next_deadline(), 1110)

    def test_close_session_and_user(self) -> None:
        t = table(6000, 6010)
        a, _ = ask(t, session="s1", vm="a")
        b, _ = ask(t, session="s2", vm="b")
        c, _ = ask(t, user="bob", session="s3", vm="c")
        self.assertEqual(t.close_session("s1"), [Close(a, "session-ended")])
        self.assertEqual(t.close_user("alice"), [Close(b, "user-revoked")])
        self.assertEqual(t.close_all(), [Close(c, "stopped")])
        self.assertEqual(len(t), 0)


class RestoreTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        t = table(6000, 6005)
        a, _ = ask(t, vm="a", now=1000, expires=5000)
        b, _ = ask(t, vm="b", now=1000, expires=1500)
        records = t.snapshot() + [{"id": "junk"}, "x", dict(a.to_json(), id="dup")]
        fresh = table(6000, 6005)
        actions, dropped = fresh.restore(records, now=2000)
        # b expired, junk and x malformed, dup holds a's port
        self.assertEqual(dropped, 4)
        self.assertEqual([type(x) for x in actions], [Open])
        restored = fresh.get(a.id)
        assert restored is not None
        self.assertEqual((restored.port, restored.allowed, restored.last_activity),
                         (a.port, a.allowed, 2000))
        self.assertIsNone(fresh.get(b.id))
        # the restored port is not handed out again
        c, _ = ask(fresh, vm="c", now=2000)
        self.assertNotEqual(c.port, a.port)

    def test_out_of_range_dropped(self) -> None:
        t = table(6000, 6005)
        a, _ = ask(t)
        fresh = table(7000, 7001)
        self.assertEqual(fresh.restore(t.snapshot(), now=1000), ([], 1))
        self.assertIsNone(fresh.get(a.id))
