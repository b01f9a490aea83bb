"""The proxy's single-use ticket ledger (sans-IO)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from ticrypt.proxy.replay import TicketLedger, Use


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
