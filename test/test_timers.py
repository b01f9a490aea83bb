"""Cancelling delayed calls (:mod:`ticrypt.timers`)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ticrypt.timers import cancel_call


class CancelCallTests(SynchronousTestCase):
    def test_pending_call_never_runs(self) -> None:
        clock = Clock()
        ran: list[int] = []
        call = clock.callLater(5, ran.append, 1)
        cancel_call(call)
        clock.advance(10)
        self.assertEqual((ran, call.active()), ([], False))

    def test_none_run_or_cancelled_are_left_alone(self) -> None:
        clock = Clock()
        ran: list[int] = []
        fired = clock.callLater(1, ran.append, 1)
        clock.advance(1)
        cancelled = clock.callLater(1, ran.append, 2)
        cancelled.cancel()
        for call in (None, fired, cancelled):
            cancel_call(call)  # IDelayedCall.cancel would raise for the last two
        self.assertEqual(ran, [1])
