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
  on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from ticrypt import closecodes, signed
from ticrypt.http.client import HttpError, JsonClient

#: Close reasons of a leg whose user was disabled or whose session ended
#: (code :data:`ticrypt.closecodes.REVOKED`, 4011).
USER_DISABLED = closecodes.reason(closecodes.REVOKED.name, "the user was disabled")
SESSION_ENDED = closecodes.reason(closecodes.REVOKED.name, "the session was ended")

#: Path of the feed at rest.
FEED_PATH = "/v1/revocations"
#: Deadline of one feed request.
FEED_TIMEOUT = 10.0
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


class RevocationPoller(Service):
    """Fetch the feed every ``interval`` seconds; ``apply`` (the factory's
    :meth:`~ticrypt.proxy.ws.RelayFactory.revoke_pairs`) runs after every
    verified feed, so that a pair formed since the last one is closed too."""

    log = Logger()

    def __init__(self, *, clock: Any, client: JsonClient, rest_url: str, secret: str,
                 revocations: RevocationList, apply: Callable[[], int], interval: float):
        self._clock = clock
        self._client = client
        self._url = rest_url.rstrip("/") + FEED_PATH
        self._secret = secret
        self.revocations = revocations
        self._apply = apply
        self._interval = interval
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
                     else self.log.failure("revocation feed: unexpected error", f))

        def done(result: None) -> None:
            self._busy = None
            return result

        return d.addBoth(done)

    async def poll(self) -> None:
        """One fetch; never raises for an unavailable or refused feed."""
        try:
            status, answer = await self._client.request(
                "GET", self._url, headers={"Authorization": "Bearer " + self._secret})
            if status != 200 or not isinstance(answer, dict) or \
                    not isinstance(answer.get("feed"), str):
                raise HttpError("bad-response", f"rest answered HTTP {status} "
                                f"{_error_code(answer)}".rstrip())
            before = self.revocations.serial
            feed = self.revocations.update(answer["feed"], self._clock.seconds())
        except (HttpError, signed.TokenError) as e:
            if not self.running:
                return
            why = f"{getattr(e, 'code', 'error')}: {e}"
            if self.outage is None:
                self.log.warn("revocation feed unavailable ({why}); keeping the list of "
                              "serial {serial}, retrying every {interval}s", why=why,
                              serial=self.revocations.serial, interval=self._interval)
            self.outage = why
            return
        if self.outage is not None:
            self.log.info("revocation feed available again (serial {serial})",
                          serial=feed.serial)
            self.outage = None
        if feed.serial != before:
            self.log.info("revocation feed serial {serial}: {users} disabled users, "
                          "{sessions} ended sessions", serial=feed.serial,
                          users=len(feed.users), sessions=len(feed.sessions))
        self._apply()


def _error_code(answer: Any) -> str:
    err = answer.get("error") if isinstance(answer, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return "".join(c for c in code[:64] if c.isprintable()) if isinstance(code, str) else ""
