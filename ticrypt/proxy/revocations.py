"""Revocation at the proxy: rest's signed feed of disabled users and ended
sessions, and the job that fetches it (wire format: PROTOCOL.md §3
"Revocation").

* :class:`RevocationList` (sans-IO) keeps the newest verified feed, refuses
  one that is forged, stale, replayed or rolled back, and says whether a
  connection ticket's user or session has been revoked.
* :class:`RevocationPoller` (a Service) GETs the feed from rest every
  ``revocation_poll_interval`` over HTTPS pinned to ``ca_file`` with the
  shared bearer secret; after each verified feed it has the factory close
  every pair and waiting user the list revokes (close code 4011 ``revoked``).
  While rest cannot be reached, or answers with a feed it should not, the
  last good list stays in force, the outage is logged once, and polling goes
  on (the polling itself: :class:`ticrypt.http.feed.FeedPoller`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ticrypt import closecodes, signed
from ticrypt.http.client import HttpError, JsonClient
from ticrypt.http.feed import FeedPoller

#: Close reasons of a leg whose user was disabled or whose session ended
#: (code :data:`ticrypt.closecodes.REVOKED`, 4011).
USER_DISABLED = closecodes.reason(closecodes.REVOKED.name, "the user was disabled")
SESSION_ENDED = closecodes.reason(closecodes.REVOKED.name, "the session was ended")

#: Path of the feed at rest.
FEED_PATH = "/v1/revocations"
#: A feed issued longer ago than this (or 3 poll intervals, if longer) is
#: stale: a replayed old feed must not pass for the current one.
MIN_MAX_AGE = 60.0


def max_age(poll_interval: float) -> float:
    return max(MIN_MAX_AGE, 3 * poll_interval)


class RevocationList:
    """The newest verified revocation feed (empty until the first one)."""

    def __init__(self, backend_key: bytes, max_age: float):
        self._backend_key = backend_key
        self._max_age = max_age
        self.serial = -1
        self.issued: int | None = None
        self.users: dict[str, int] = {}
        self.sessions: frozenset[str] = frozenset()

    def update(self, token: str, now: float) -> signed.RevocationFeed:
        """Verify ``token`` and make it the current list; TokenError (codes
        of :func:`ticrypt.signed.verify_revocation_feed`, and ``rolled-back``
        for a lower serial, ``replayed`` for an older issue time than the
        current list's) leaves the current list in force."""
        feed = signed.verify_revocation_feed(self._backend_key, token, now=now,
                                             max_age=self._max_age)
        if feed.serial < self.serial:
            raise signed.TokenError("rolled-back", f"revocation feed serial {feed.serial} is "
                                    f"older than the current {self.serial}")
        if self.issued is not None and feed.issued < self.issued:
            raise signed.TokenError("replayed", "revocation feed is older than the current one")
        self.serial, self.issued = feed.serial, feed.issued
        self.users, self.sessions = feed.users, feed.sessions
        return feed

    def reason(self, ticket: signed.Ticket) -> str | None:
        """The close reason if ``ticket``'s user or session is revoked."""
        if ticket.user in self.users:
            return USER_DISABLED
        if ticket.session and ticket.session in self.sessions:
            return SESSION_ENDED
        return None


class RevocationPoller(FeedPoller[signed.RevocationFeed]):
    """Fetch the feed every ``interval`` seconds; ``apply`` (the factory's
    :meth:`~ticrypt.proxy.ws.RelayFactory.revoke_pairs`) runs after every
    verified feed, so that a pair formed since the last one is closed too."""

    feed = "revocation feed"
    kept = "list"
    refusals = (HttpError, signed.TokenError)

    def __init__(self, *, clock: Any, client: JsonClient, rest_url: str, secret: str,
                 revocations: RevocationList, apply: Callable[[], int], interval: float):
        super().__init__(clock=clock, client=client, url=rest_url.rstrip("/") + FEED_PATH,
                         secret=secret, interval=interval)
        self.revocations = revocations
        self._apply = apply

    def current_serial(self) -> int:
        return self.revocations.serial

    def accept(self, status: int, answer: Any) -> tuple[int, signed.RevocationFeed]:
        if status != 200 or not isinstance(answer, dict) or \
                not isinstance(answer.get("feed"), str):
            raise HttpError("bad-response", f"rest answered HTTP {status} "
                            f"{_error_code(answer)}".rstrip())
        feed = self.revocations.update(answer["feed"], self._clock.seconds())
        return feed.serial, feed

    def use(self, before: int, serial: int, feed: signed.RevocationFeed) -> None:
        if serial != before:
            self.log.info("revocation feed serial {serial}: {users} disabled users, "
                          "{sessions} ended sessions", serial=serial,
                          users=len(feed.users), sessions=len(feed.sessions))
        self._apply()


def _error_code(answer: Any) -> str:
    err = answer.get("error") if isinstance(answer, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return "".join(c for c in code[:64] if c.isprintable()) if isinstance(code, str) else ""
