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
logged once (the polling itself: :class:`ticrypt.http.feed.FeedPoller`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ticrypt.allowedlist.policy import Entry, parse_entry
from ticrypt.http.client import HttpError, JsonClient
from ticrypt.http.feed import FeedPoller

__all__ = ["FEED_PATH", "MAX_ENTRIES", "EntriesPoller", "parse_feed"]

FEED_PATH = "/v1/allowlist/feed"
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


class EntriesPoller(FeedPoller[tuple[list[Entry], list[str]]]):
    """Fetch the feed every ``interval`` seconds; ``apply(serial, entries)``
    runs when the serial changes."""

    feed = "allow-list feed"
    kept = "entries"

    def __init__(self, *, clock: Any, client: JsonClient, rest_url: str, secret: str,
                 apply: Callable[[int, list[Entry]], None], interval: float,
                 serial: int = -1) -> None:
        super().__init__(clock=clock, client=client, url=rest_url.rstrip("/") + FEED_PATH,
                         secret=secret, interval=interval)
        self._apply = apply
        self.serial = serial

    def current_serial(self) -> int:
        return self.serial

    def accept(self, status: int, answer: Any) -> tuple[int, tuple[list[Entry], list[str]]]:
        if status != 200:
            raise HttpError("bad-response", f"rest answered HTTP {status}")
        try:
            serial, entries, problems = parse_feed(answer)
        except ValueError as e:
            raise HttpError("bad-feed", str(e)) from None
        if serial < self.serial:
            raise HttpError("rolled-back", f"feed serial {serial} is older than the "
                            f"current {self.serial}")
        return serial, (entries, problems)

    def use(self, before: int, serial: int, feed: tuple[list[Entry], list[str]]) -> None:
        if serial == before:
            return
        entries, problems = feed
        for problem in problems[:10]:
            self.log.warn("allow-list feed serial {serial}: left out: {problem}",
                          serial=serial, problem=problem)
        self.log.info("allow-list feed serial {serial}: {n} entries", serial=serial,
                      n=len(entries))
        self.serial = serial
        self._apply(serial, entries)
