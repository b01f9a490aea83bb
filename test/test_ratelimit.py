"""Failure limits per key (:mod:`ticrypt.ratelimit`): sliding window, one
report per lockout, bounded memory."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from ticrypt.ratelimit import RateLimiter


class RateLimiterTests(SynchronousTestCase):
    def test_sliding_window(self) -> None:
        clock = task.Clock()
        limiter = RateLimiter(clock, limit=2, window=10)
        self.assertEqual(limiter.retry_after("k"), 0)
        limiter.failed("k")
        clock.advance(4)
        limiter.failed("k")
        self.assertEqual(limiter.retry_after("k"), 6)
        self.assertEqual(limiter.retry_after("other"), 0)
        clock.advance(6)
        self.assertEqual(limiter.retry_after("k"), 0)

    def test_refusals_reported_once_per_lockout(self) -> None:
        clock = task.Clock()
        limiter = RateLimiter(clock, limit=2, window=10)
        limiter.failed("k")
        limiter.failed("k")
        self.assertTrue(limiter.retry_after("k"))
        self.assertEqual([limiter.first_refusal("k") for _ in range(3)], [True, False, False])
        clock.advance(10)
        self.assertEqual(limiter.retry_after("k"), 0)
        limiter.failed("k")
        limiter.failed("k")
        self.assertTrue(limiter.first_refusal("k"))  # a new lockout is reported again

    def test_purge_forgets_stale_keys(self) -> None:
        clock = task.Clock()
        limiter = RateLimiter(clock, limit=5, window=10)
        limiter.failed("old")
        clock.advance(5)
        limiter.failed("new")
        clock.advance(5)
        limiter.purge()
        self.assertEqual(len(limiter), 1)
        self.assertEqual(limiter.retry_after("new"), 0)
        clock.advance(5)
        limiter.purge()
        self.assertEqual(len(limiter), 0)

    def test_bounded_keys(self) -> None:
        limiter = RateLimiter(task.Clock(), limit=1, window=10, max_keys=2)
        for key in ("a", "b", "c"):
            limiter.failed(key)
        self.assertEqual(limiter.retry_after("a"), 0)  # forgotten
        self.assertEqual(limiter.retry_after("c"), 10)
