"""Following a feed at rest: ``GET`` one JSON document with a shared bearer
secret every ``interval`` seconds, over a :class:`~ticrypt.http.client.JsonClient`
(CA-pinned, answer bounded, one deadline).

A subclass says what an answer must be (:meth:`FeedPoller.accept`: its
serial and what it carries, or an exception of ``refusals``) and what to do
with it (:meth:`FeedPoller.use`).  The poller does the rest the same way for
every feed: the first poll at start-up, one request at a time, never a
failure that stops the loop; an unavailable or refused feed keeps the last
good one in force and is logged once (``outage`` says why) until a feed is
accepted again ("available again").

Used by the proxy's revocation feed (:mod:`ticrypt.proxy.revocations`) and
allowedlist's entries feed (:mod:`ticrypt.allowedlist.entries`).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from ticrypt.http.client import HttpError, JsonClient
from ticrypt.service import start_loop, stop_loop

__all__ = ["FEED_TIMEOUT", "FeedPoller"]

#: Deadline of one feed request.
FEED_TIMEOUT = 10.0

T = TypeVar("T")


class FeedPoller(Service, Generic[T]):
    """Fetch ``url`` every ``interval`` seconds with ``Authorization: Bearer
    secret``; :meth:`accept` checks each answer, :meth:`use` takes it."""

    log = Logger()
    #: the feed's name in log lines
    feed = "feed"
    #: what stays in force during an outage, in log lines
    kept = "last feed"
    #: exceptions of :meth:`accept` that refuse a feed (like an outage)
    refusals: tuple[type[Exception], ...] = (HttpError,)

    def __init__(self, *, clock: Any, client: JsonClient, url: str, secret: str,
                 interval: float) -> None:
        self._clock = clock
        self._client = client
        self._url = url
        self._secret = secret
        self._interval = interval
        self._loop: task.LoopingCall | None = None
        self._busy: defer.Deferred[None] | None = None
        #: why the feed is unavailable (None while it works)
        self.outage: str | None = None

    def current_serial(self) -> int:
        """The serial of what is in force (-1: nothing yet)."""
        raise NotImplementedError

    def accept(self, status: int, answer: Any) -> tuple[int, T]:
        """Check rest's answer: (its serial, what it carries); raises one of
        ``refusals`` for an answer that must not be used."""
        raise NotImplementedError

    def use(self, before: int, serial: int, feed: T) -> None:
        """Take an accepted feed; ``before`` was :meth:`current_serial` when
        the answer came."""
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        self._loop = start_loop(self._tick, self._clock, self._interval, now=True)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        stop_loop(self._loop)
        self._loop = None
        if self._busy is not None:
            self._busy.cancel()
        return self._client.close()

    def _tick(self) -> defer.Deferred[None]:
        # A LoopingCall whose call fails stops for good: never let it fail.
        d = defer.ensureDeferred(self.poll())
        self._busy = d
        d.addErrback(lambda f: None if not self.running
                     else self.log.failure("{feed}: unexpected error", f, feed=self.feed))

        def done(result: None) -> None:
            self._busy = None
            return result

        return d.addBoth(done)

    async def poll(self) -> None:
        """One fetch; never raises for an unavailable or refused feed."""
        try:
            status, answer = await self._client.request(
                "GET", self._url, headers={"Authorization": "Bearer " + self._secret})
            before = self.current_serial()
            serial, feed = self.accept(status, answer)
        except self.refusals as e:
            if not self.running:
                return
            why = f"{getattr(e, 'code', 'error')}: {e}"
            if self.outage is None:
                self.log.warn("{feed} unavailable ({why}); keeping the {kept} of serial "
                              "{serial}, retrying every {interval}s", feed=self.feed,
                              why=why, kept=self.kept, serial=self.current_serial(),
                              interval=self._interval)
            self.outage = why
            return
        if self.outage is not None:
            self.log.info("{feed} available again (serial {serial})", feed=self.feed,
                          serial=serial)
            self.outage = None
        self.use(before, serial, feed)
