"""Single-use connection tickets at the proxy, across restarts.

A ticket is valid for a short time (``ticket_ttl`` at rest) and bound to the
client's IP; the ledger also makes it single-use, so that a ticket seen once
(in a log, a proxy-side capture, a shared NAT) cannot pair a second time and
tie up one of the VM's waiting sockets.  Each id is kept until its ticket
expires; the ledger is bounded and fails closed when full.

* :class:`TicketLedger`: the rule, sans-IO (ids and expiries in memory).
* :class:`TicketJournal`: the same ledger kept in an append-only file
  (``[proxy] ticket_ledger``), so a restart of the proxy does not forget
  which tickets were used.  Each accepted id is written (``write(2)``,
  ``O_APPEND``) *before* the ticket is accepted; a ticket that cannot be
  written is refused.  The file is compacted (expired ids dropped, rewritten
  atomically with fsync) when it is opened and whenever the records
  appended since the last compaction outnumber the live ones.  A torn or
  garbled line (a crash mid-write, a full disk) is ignored.  Appends are not
  fsync'ed: they survive a crash or ``kill -9`` of the proxy (the kernel has
  them), a power loss may forget the last seconds' ids, whose tickets have
  mostly expired by the time the machine is back.
* :class:`TicketLedgerService`: opens the journal at start (a failure is a
  one-line start-up error naming the key) and closes it at stop.
"""

from __future__ import annotations

import enum
import heapq
import json
import os
from collections.abc import Iterable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.logger import Logger

from ticrypt.fsutil import atomic_write


class Use(enum.Enum):
    FIRST = "first"          # accepted: first use of this ticket id
    REPLAYED = "replayed"    # refused: seen before and not yet expired
    FULL = "full"            # refused: the ledger is at its bound
    UNRECORDED = "unrecorded"  # refused: the use could not be written down


class TicketUses(Protocol):
    def use(self, ticket_id: str, expires: int, now: float) -> Use: ...


class TicketLedger:
    """Ticket ids seen, each until its expiry; at most ``max_entries``."""

    def __init__(self, max_entries: int):
        self._max = max_entries
        self._expiry: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def check(self, ticket_id: str, now: float) -> Use:
        """Would a use of ``ticket_id`` be accepted (FIRST)?  Records nothing."""
        self._forget_expired(now)
        if ticket_id in self._expiry:
            return Use.REPLAYED
        if len(self._expiry) >= self._max:
            return Use.FULL
        return Use.FIRST

    def record(self, ticket_id: str, expires: int) -> None:
        """Remember ``ticket_id`` until ``expires`` (after a FIRST check)."""
        self._expiry[ticket_id] = expires
        heapq.heappush(self._heap, (expires, ticket_id))

    def use(self, ticket_id: str, expires: int, now: float) -> Use:
        """Record a use of ``ticket_id`` (valid until ``expires``)."""
        result = self.check(ticket_id, now)
        if result is Use.FIRST:
            self.record(ticket_id, expires)
        return result

    def entries(self) -> list[tuple[int, str]]:
        """The ids remembered, ``(expires, ticket_id)``, soonest expiry first."""
        return sorted((exp, tid) for tid, exp in self._expiry.items())

    def restore(self, entries: Iterable[tuple[int, str]], now: float) -> int:
        """Remember ``entries`` (from a journal) that have not expired, at
        most ``max_entries`` of them: those expiring last win.  Returns how
        many unexpired ones did not fit."""
        live: dict[str, int] = {}
        for expires, ticket_id in entries:
            if expires > now and live.get(ticket_id, 0) < expires:
                live[ticket_id] = expires
        kept = sorted(((exp, tid) for tid, exp in live.items()), reverse=True)
        for expires, ticket_id in kept[: self._max - len(self._expiry)]:
            if ticket_id not in self._expiry:
                self.record(ticket_id, expires)
        return max(0, len(kept) - self._max)

    def _forget_expired(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            expires, ticket_id = heapq.heappop(heap)
            if self._expiry.get(ticket_id) == expires:
                del self._expiry[ticket_id]


#: Longest journal line we parse ("[<exp>,\"<id>\"]"; ids are short).
MAX_LINE = 1024
#: Compaction waits for at least this many appended records.
MIN_COMPACT = 1024


def encode_entry(expires: int, ticket_id: str) -> bytes:
    """One journal line: ``[<expires>,"<ticket id>"]\\n`` (JSON, so any id)."""
    return json.dumps([expires, ticket_id], separators=(",", ":")).encode() + b"\n"


def decode_entries(data: bytes) -> tuple[list[tuple[int, str]], int]:
    """The entries of a journal, and how many lines were unusable (torn,
    garbled).  Text after the last newline is a torn write: ignored."""
    *lines, _torn = data.split(b"\n")
    entries: list[tuple[int, str]] = []
    bad = 0 if not _torn else 1
    for line in lines:
        if not line:
            continue
        try:
            if len(line) > MAX_LINE:
                raise ValueError("too long")
            value = json.loads(line)
            expires, ticket_id = value
            if type(expires) is not int or not isinstance(ticket_id, str):
                raise ValueError("wrong types")
        except (ValueError, TypeError):
            bad += 1
            continue
        entries.append((expires, ticket_id))
    return entries, bad


class TicketJournal:
    """A :class:`TicketLedger` kept in the append-only file ``path``."""

    log = Logger()

    def __init__(self, path: str, ledger: TicketLedger):
        self.path = path
        self.ledger = ledger
        self._fd = -1
        self._appended = 0      # records appended since the last compaction
        self._compacted = 0     # live records written by the last compaction
        self._torn = False      # a failed append may have left half a line

    def open(self, now: float) -> None:
        """Load the journal (missing: empty), drop what expired, rewrite it
        compacted and open it for appending.  OSError if that fails."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        entries, bad = decode_entries(data)
        over = self.ledger.restore(entries, now)
        if bad:
            self.log.warn("proxy: {n} unusable line(s) in {path} ignored (torn or garbled)",
                          n=bad, path=self.path)
        if over:
            self.log.warn("proxy: {path} holds {n} more unexpired tickets than "
                          "max_recent_tickets; those expiring soonest were dropped",
                          n=over, path=self.path)
        self._compact()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def use(self, ticket_id: str, expires: int, now: float) -> Use:
        """Like :meth:`TicketLedger.use`; a first use is written to the
        journal before it counts (UNRECORDED if that fails)."""
        result = self.ledger.check(ticket_id, now)
        if result is not Use.FIRST:
            return result
        if not self._append(encode_entry(expires, ticket_id)):
            return Use.UNRECORDED
        self.ledger.record(ticket_id, expires)
        self._appended += 1
        if self._appended > max(MIN_COMPACT, self._compacted):
            try:
                self._compact()
            except OSError:
                self.log.failure("proxy: could not compact {path}", path=self.path)
        return result

    def _append(self, line: bytes) -> bool:
        if self._fd < 0:
            self.log.error("proxy: ticket ledger {path} is not open", path=self.path)
            return False
        try:
            if self._torn:
                os.write(self._fd, b"\n")  # end the half line before ours
                self._torn = False
            written = os.write(self._fd, line)
        except OSError as e:
            self.log.error("proxy: cannot write the ticket ledger {path}: {error}",
                           path=self.path, error=e)
            self._torn = True
            return False
        if written != len(line):
            self.log.error("proxy: short write to the ticket ledger {path}", path=self.path)
            self._torn = True
            return False
        return True

    def _compact(self) -> None:
        entries = self.ledger.entries()
        atomic_write(self.path, b"".join(encode_entry(e, t) for e, t in entries), 0o600)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.close()
        self._fd = fd
        self._appended = 0
        self._compacted = len(entries)
        self._torn = False


class TicketLedgerService(Service):
    """Opens ``journal`` when the proxy starts, closes it when it stops.

    ``error`` turns an OSError into the role's start-up error (one line
    naming ``[proxy] ticket_ledger``)."""

    def __init__(self, journal: TicketJournal, clock: Any, error: Any):
        self.journal = journal
        self._clock = clock
        self._error = error

    def startService(self) -> None:
        super().startService()
        try:
            self.journal.open(self._clock.seconds())
        except OSError as e:
            raise self._error(f"cannot use {self.journal.path}: {e.strerror or e}") from None

    def stopService(self) -> Any:
        super().stopService()
        self.journal.close()
        return None
