"""Single-use connection tickets at the proxy (sans-IO).

A ticket is valid for a short time (``ticket_ttl`` at rest) and bound to the
client's IP; :class:`TicketLedger` also makes it single-use, so that a ticket
seen once (in a log, a proxy-side capture, a shared NAT) cannot pair a
second time and tie up one of the VM's waiting sockets.  Each id is kept
until its ticket expires; the ledger is bounded and fails closed when full.
"""

from __future__ import annotations

import enum
import heapq


class Use(enum.Enum):
    FIRST = "first"          # accepted: first use of this ticket id
    REPLAYED = "replayed"    # refused: seen before and not yet expired
    FULL = "full"            # refused: the ledger is at its bound


class TicketLedger:
    """Ticket ids seen, each until its expiry; at most ``max_entries``."""

    def __init__(self, max_entries: int):
        self._max = max_entries
        self._expiry: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def use(self, ticket_id: str, expires: int, now: float) -> Use:
        """Record a use of ``ticket_id`` (valid until ``expires``)."""
        self._forget_expired(now)
        if ticket_id in self._expiry:
            return Use.REPLAYED
        if len(self._expiry) >= self._max:
            return Use.FULL
        self._expiry[ticket_id] = expires
        heapq.heappush(self._heap, (expires, ticket_id))
        return Use.FIRST

    def _forget_expired(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, ticket_id = heapq.heappop(heap)
            self._expiry.pop(ticket_id, None)
