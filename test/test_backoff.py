"""Reconnect delays (:mod:`ticrypt.backoff`): exponential, jittered, bounded."""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from ticrypt.backoff import Backoff


class BackoffTests(SynchronousTestCase):
    def test_grows_bounded_and_resets(self) -> None:
        b = Backoff(1.0, 30.0, random.Random(7).random)
        delays = [b.next_delay() for _ in range(12)]
        bases = [min(30.0, 2.0**n) for n in range(12)]
        for d, base in zip(delays, bases, strict=True):
            self.assertTrue(base / 2 <= d <= base, (d, base))
        self.assertLessEqual(max(delays), 30.0)
        self.assertGreater(delays[5], delays[0])
        b.reset()
        self.assertLessEqual(b.next_delay(), 1.0)

    def test_jitter_differs_per_seed(self) -> None:
        a = [Backoff(1, 60, random.Random(1).random).next_delay() for _ in range(1)]
        c = [Backoff(1, 60, random.Random(2).random).next_delay() for _ in range(1)]
        self.assertNotEqual(a, c)

    def test_huge_failure_count_stays_bounded(self) -> None:
        b = Backoff(0.5, 10.0, lambda: 0.999, failures=10_000)
        self.assertLessEqual(b.next_delay(), 10.0)

    def test_rejects_bad_bounds(self) -> None:
        self.assertRaises(ValueError, Backoff, 5.0, 1.0, random.random)
