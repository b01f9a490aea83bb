"""Sliding-window failure limits per key (a client address, a user name):
sans-IO, the clock injected.  rest limits failed logins with it; allowedlist
will limit queries per client."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Protocol


class Clock(Protocol):
    """What the limiters need of a clock: the reactor, or a ``task.Clock``."""

    def seconds(self) -> float: ...


class RateLimiter:
    """At most ``limit`` failures per key within a sliding ``window`` seconds.

    Tracks at most ``max_keys`` keys (the least recently failed is forgotten),
    so spraying names or addresses cannot exhaust memory."""

    def __init__(self, clock: Clock, limit: int, window: float, max_keys: int = 100_000):
        self._clock = clock
        self._limit = limit
        self._window = window
        self._max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        # key -> time of the last failure of the lockout already reported
        self._reported: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, key: str) -> int:
        """0 if ``key`` may try now, else whole seconds until it may."""
        times = self._failures.get(key)
        if times is None:
            return 0
        now = self._clock.seconds()
        while times and times[0] <= now - self._window:
            times.popleft()
        if not times:
            self._forget(key)
            return 0
        if len(times) < self._limit:
            return 0
        return max(1, math.ceil(times[0] + self._window - now))

    def first_refusal(self, key: str) -> bool:
        """True the first time it is asked during one lockout of ``key`` (call
        it when :meth:`retry_after` refused), so that a flood of refused
        attempts is reported (audited) once rather than once per attempt."""
        times = self._failures.get(key)
        if not times:
            return True
        if self._reported.get(key) == times[-1]:
            return False
        self._reported[key] = times[-1]
        return True

    def failed(self, key: str) -> None:
        now = self._clock.seconds()
        times = self._failures.pop(key, None) or deque(maxlen=self._limit)
        times.append(now)
        self._failures[key] = times
        while len(self._failures) > self._max_keys:
            self._forget(next(iter(self._failures)))

    def purge(self) -> None:
        """Forget every key whose failures have all left the window."""
        horizon = self._clock.seconds() - self._window
        # Keys are in order of their last failure: stop at the first live one.
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if times and times[-1] > horizon:
                break
            self._forget(key)

    def _forget(self, key: str) -> None:
        self._failures.pop(key, None)
        self._reported.pop(key, None)
