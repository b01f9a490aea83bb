"""Reconnect delays: exponential, with jitter, bounded."""

from __future__ import annotations

from collections.abc import Callable

import attrs


@attrs.define
class Backoff:
    """Delay before the next attempt: ``initial * 2**n`` capped at ``maximum``,
    then "equal jitter" (a uniform pick in the upper half), so a fleet of VMs
    that lost the proxy together does not return together, and no delay ever
    exceeds ``maximum``.

    ``random`` returns floats in [0, 1) (inject ``random.Random(seed).random``
    in tests).
    """

    initial: float
    maximum: float
    random: Callable[[], float]
    failures: int = 0

    def __attrs_post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("need 0 < initial <= maximum")

    def next_delay(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        # min() on the exponent keeps 2**n from growing without bound.
        base = min(self.maximum, self.initial * 2 ** min(self.failures, 64))
        self.failures += 1
        return base / 2 + base / 2 * self.random()

    def reset(self) -> None:
        """A connection succeeded: start again from ``initial``."""
        self.failures = 0
