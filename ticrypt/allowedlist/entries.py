"""Following rest's allow-list: ``GET /v1/allowlist/feed`` with the shared
bearer secret ``allowlist_feed_secret`` every ``poll_interval`` (2 s by
default, so a change is in force within seconds), like
:mod:`ticrypt.proxy.revocations` follows the revocation feed.

The feed is ``{"serial": N, "entries": [ENTRY, ...]}``; N increases on
every change.  :func:`parse_feed` checks it (an entry that does not pass
:func:`~ticrypt.allowedlist.policy.parse_entry` is left out and logged once
per serial, the rest still apply).  A lower serial than the current one is
refused (rolled back).  While rest cannot be reached the last entries stay
in force (saved in the state file across restarts) and the outage is
logged once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from ticrypt.allowedlist.policy import Entry, parse_entry
from ticrypt.http.client import HttpError, JsonClient

__all__ = ["FEED_PATH", "FEED_TIMEOUT", "MAX_ENTRIES", "EntriesPoller", "parse_feed"]

FEED_PATH = "/v1/allowlist/feed"
FEED_TIMEOUT = 10.0
MAX_ENTRIES = 4096
#: largest feed body (MAX_ENTRIES entries of ~400 bytes)
MAX_FEED = 2 * 1024 * 1024


def parse_feed(answer: Any) -> tuple[int, list[Entry], list[str]]:
    """(serial, valid entries, problems); ValueError if not a feed at all."""
    if not isinstance(answer, dict):
        raise ValueError("the feed is not a JSON object")
    serial, raw = answer.get("serial"), answer.get("entries")
    if type(serial) is not int or serial < 0 or not isinstance(raw, list):
        raise ValueError("the feed needs an integer serial and an entries list")
    if len(raw) > MAX_ENTRIES:
        raise ValueError(f"the feed has more than {MAX_ENTRIES} entries")
    entries: list[Entry] = []
    problems: list[str] = []
    seen: set[str] = set()
    for item in raw:
        try:
            entry = parse_entry(item)
        except ValueError as e:
            problems.append(str(e))
            continue
        if entry.id in seen:
            problems.append(f"entry {entry.id}: listed twice")
            continue
        seen.add(entry.id)
        entries.append(entry)
    return serial, entries, problems


class EntriesPoller(Service):
    """Fetch the feed every ``interval`` seconds; ``apply(serial, entries)``
    runs when the serial changes."""

    log = Logger()

    def __init__(self, *, clock: Any, client: JsonClient, rest_url: str, secret: str,
                 apply: Callable[[int, list[Entry]], None], interval: float,
                 serial: int = -1) -> None:
        self._clock = clock
        self._client = client
        self._url = rest_url.rstrip("/") + FEED_PATH
        self._secret = secret
        self._apply = apply
        self._interval = interval
        self.serial = serial
        self._loop: task.LoopingCall | None = None
        self._busy: defer.Deferred[None] | None = None
        #: why the feed is unavailable (None while it works)
        self.outage: str | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._busy is not None:
            self._busy.cancel()
        return self._client.close()

    def _tick(self) -> defer.Deferred[None]:
        # A LoopingCall whose call fails stops for good: never let it fail.
        d = defer.ensureDeferred(self.poll())
        self._busy = d
        d.addErrback(lambda f: None if not self.running
                     else self.log.failure("allow-list feed: unexpected error", f))

        def done(result: None) -> None:
            self._busy = None
            return result

        return d.addBoth(done)

    async def poll(self) -> None:
        """One fetch; never raises for an unavailable or refused feed."""
        try:
            status, answer = await self._client.request(
                "GET", self._url, headers={"Authorization": "Bearer " + self._secret})
            if status != 200:
                raise HttpError("bad-response", f"rest answered HTTP {status}")
            try:
                serial, entries, problems = parse_feed(answer)
            except ValueError as e:
                raise HttpError("bad-feed", str(e)) from None
            if serial < self.serial:
                raise HttpError("rolled-back", f"feed serial {serial} is older than the "
                                f"current {self.serial}")
        except HttpError as e:
            if not self.running:
                return
            why = f"{e.code}: {e}"
            if self.outage is None:
                self.log.warn("allow-list feed unavailable ({why}); keeping the entries of "
                              "serial {serial}, retrying every {interval}s", why=why,
                              serial=self.serial, interval=self._interval)
            self.outage = why
            return
        if self.outage is not None:
            self.log.info("allow-list feed available again (serial {serial})", serial=serial)
            self.outage = None
        if serial == self.serial:
            return
        for problem in problems[:10]:
            self.log.warn("allow-list feed serial {serial}: left out: {problem}",
                          serial=serial, problem=problem)
        self.log.info("allow-list feed serial {serial}: {n} entries", serial=serial,
                      n=len(entries))
        self.serial = serial
        self._apply(serial, entries)
