"""The proxy's single-use ticket ledger: the sans-IO rule and the journal
that keeps it across restarts (the restart of a real proxy is in
test_proxy_daemon)."""

from __future__ import annotations

import os
import stat

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ticrypt.proxy.replay import (
    MIN_COMPACT,
    TicketJournal,
    TicketLedger,
    TicketLedgerService,
    Use,
    encode_entry,
)


class TicketLedgerTests(SynchronousTestCase):
    def test_first_use_then_replay_until_expiry(self) -> None:
        ledger = TicketLedger(10)
        self.assertIs(ledger.use("a", expires=100, now=50), Use.FIRST)
        self.assertIs(ledger.use("a", expires=100, now=99), Use.REPLAYED)
        # once expired the id is forgotten (the ticket itself is refused as
        # expired by the signature check before the ledger is asked)
        self.assertIs(ledger.use("b", expires=200, now=100), Use.FIRST)
        self.assertEqual(len(ledger), 1)

    def test_bounded_and_fails_closed(self) -> None:
        ledger = TicketLedger(2)
        self.assertIs(ledger.use("a", 100, 0), Use.FIRST)
        self.assertIs(ledger.use("b", 50, 0), Use.FIRST)
        self.assertIs(ledger.use("c", 100, 0), Use.FULL)
        self.assertIs(ledger.use("c", 100, 50), Use.FIRST)  # "b" expired at 50
        self.assertEqual(len(ledger), 2)


class TicketJournalTests(SynchronousTestCase):
    """The ledger in an append-only file (real files in the test's directory)."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "tickets.ledger")

    def journal(self, max_entries: int = 100, now: float = 0.0) -> TicketJournal:
        j = TicketJournal(self.path, TicketLedger(max_entries))
        j.open(now)
        self.addCleanup(j.close)
        return j

    def lines(self) -> list[bytes]:
        with open(self.path, "rb") as f:
            return f.read().splitlines()

    def test_use_is_written_before_it_counts_and_survives_a_crash(self) -> None:
        j = self.journal()
        self.assertIs(j.use("a", 100, 0), Use.FIRST)
        self.assertIs(j.use("b", 200, 0), Use.FIRST)
        self.assertIs(j.use("a", 100, 1), Use.REPLAYED)
        self.assertEqual(self.lines(), [b'[100,"a"]', b'[200,"b"]'])
        # a second proxy on the same file (the first never closed it: kill -9)
        k = self.journal(now=50)
        self.assertIs(k.use("a", 100, 50), Use.REPLAYED)
        self.assertIs(k.use("b", 200, 50), Use.REPLAYED)
        self.assertIs(k.use("c", 300, 50), Use.FIRST)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_open_drops_expired_and_rewrites(self) -> None:
        j = self.journal()
        for i in range(5):
            j.use(f"t{i}", 10 * (i + 1), 0)
        j.close()
        k = self.journal(now=30)
        self.assertEqual(self.lines(), [b'[40,"t3"]', b'[50,"t4"]'])
        self.assertIs(k.use("t2", 30, 30), Use.FIRST)  # expired at 30: forgotten
        self.assertIs(k.use("t3", 40, 30), Use.REPLAYED)

    def test_torn_and_garbled_lines_are_ignored(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b'[100,"good"]\n' + b"garbage\n" + b'[100,2]\n' + b'["100","x"]\n'
                    + b"[" + b"1" * 2000 + b',"long"]\n' + b'[100.5,"float"]\n'
                    + b'[100,"torn')
        j = self.journal()
        self.assertIs(j.use("good", 100, 1), Use.REPLAYED)
        self.assertIs(j.use("torn", 100, 1), Use.FIRST)
        self.assertIs(j.use("x", 100, 1), Use.FIRST)
        self.assertEqual(self.lines(), [b'[100,"good"]', b'[100,"torn"]', b'[100,"x"]'])

    def test_open_keeps_at_most_max_entries_latest_expiry_first(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"".join(encode_entry(100 + i, f"t{i}") for i in range(10)))
        j = self.journal(max_entries=3)
        self.assertEqual(len(j.ledger), 3)
        self.assertEqual(self.lines(), [b'[107,"t7"]', b'[108,"t8"]', b'[109,"t9"]'])
        self.assertIs(j.use("t9", 109, 0), Use.REPLAYED)
        self.assertIs(j.use("new", 200, 0), Use.FULL)  # fails closed

    def test_a_failed_write_refuses_the_ticket(self) -> None:
        j = self.journal()
        os.close(j._fd)  # the file can no longer be written
        self.assertIs(j.use("a", 100, 0), Use.UNRECORDED)
        self.assertEqual(len(j.ledger), 0)
        j._fd = -1

    def test_half_written_line_does_not_spoil_the_next(self) -> None:
        j = self.journal()
        os.write(j._fd, b'[100,"ha')  # as a full disk would leave it
        j._torn = True
        self.assertIs(j.use("b", 100, 0), Use.FIRST)
        k = self.journal()
        self.assertIs(k.use("b", 100, 0), Use.REPLAYED)

    def test_compacted_as_it_grows(self) -> None:
        """Appended records never outnumber the live ones by more than
        max(MIN_COMPACT, live): the file stays bounded by max_entries."""
        j = self.journal(max_entries=5000)
        longest = 0
        for i in range(20_000):
            now = float(i)
            self.assertIs(j.use(f"t{i}", i + 100, now), Use.FIRST)
            longest = max(longest, len(self.lines()) if i % 500 == 0 else 0)
        self.assertLessEqual(len(self.lines()), 100 + MIN_COMPACT + 1)
        self.assertLessEqual(longest, 100 + MIN_COMPACT + 1)
        k = self.journal(now=20_000)
        self.assertIs(k.use("t19999", 20_099, 20_000), Use.REPLAYED)
        self.assertIs(k.use("t19899", 19_999, 20_000), Use.FIRST)  # expired

    def test_unusable_path(self) -> None:
        j = TicketJournal(os.path.join(self.path, "below-a-file"), TicketLedger(10))
        with open(self.path, "w"):
            pass
        self.assertRaises(OSError, j.open, 0.0)
        errors: list[str] = []

        class Err(Exception):
            pass

        service = TicketLedgerService(j, Clock(), lambda text: (errors.append(text), Err())[1])
        self.assertRaises(Err, service.startService)
        self.assertIn("cannot use", errors[0])
