"""Bytes held for a pausing consumer (:mod:`ticrypt.flow`)."""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ticrypt.flow import BufferedProducer


class _Feed(BufferedProducer):
    """Passes held chunks to ``received``; ``on_chunk`` runs after each."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[bytes] = []
        self.passed: list[int] = []
        self.on_chunk = lambda: None
        self.stopped = False

    def add(self, data: bytes) -> None:
        self._hold(data)
        self._deliver()

    def _take(self, chunk: bytes) -> None:
        self.received.append(chunk)
        self.on_chunk()

    def _deliver(self) -> None:
        self.passed.append(self._drain(self._take))

    def stopProducing(self) -> None:
        self.stopped = True


def _holding(*chunks: bytes) -> _Feed:
    """A paused feed holding ``chunks``."""
    feed = _Feed()
    feed.pauseProducing()
    for chunk in chunks:
        feed.add(chunk)
    return feed


class BufferedProducerTests(SynchronousTestCase):
    def test_is_a_push_producer(self) -> None:
        feed = _Feed()
        self.assertTrue(verifyObject(IPushProducer, feed))
        feed.stopProducing()
        self.assertTrue(feed.stopped)

    def test_needs_deliver_and_stop(self) -> None:
        self.assertRaises(TypeError, BufferedProducer)  # type: ignore[abstract]

    def test_passes_chunks_in_order_while_not_paused(self) -> None:
        feed = _Feed()
        feed.add(b"ab")
        feed.add(b"cde")
        self.assertEqual(feed.received, [b"ab", b"cde"])
        self.assertEqual(feed.passed, [2, 3])
        self.assertEqual(feed.buffered, 0)

    def test_paused_holds_and_resume_delivers(self) -> None:
        feed = _holding(b"ab", b"cde")
        self.assertEqual(feed.received, [])
        self.assertEqual(feed.buffered, 5)
        feed.resumeProducing()
        self.assertEqual(feed.received, [b"ab", b"cde"])
        self.assertEqual(feed.passed[-1], 5)
        self.assertEqual(feed.buffered, 0)

    def test_consumer_pausing_during_a_chunk_stops_after_it(self) -> None:
        feed = _holding(b"a", b"bc", b"def")
        feed.on_chunk = feed.pauseProducing
        feed.resumeProducing()
        self.assertEqual(feed.received, [b"a"])
        self.assertEqual(feed.passed[-1], 1)
        self.assertEqual(feed.buffered, 5)
        feed.resumeProducing()
        self.assertEqual(feed.received, [b"a", b"bc"])
        self.assertEqual(feed.buffered, 3)

    def test_drop_during_drain_ends_it(self) -> None:
        feed = _holding(b"a", b"bc", b"def")
        dropped: list[int] = []
        feed.on_chunk = lambda: dropped.append(feed._drop())
        feed.resumeProducing()
        self.assertEqual(feed.received, [b"a"])
        self.assertEqual(dropped, [5])
        self.assertEqual(feed.passed[-1], 1)
        self.assertEqual(feed.buffered, 0)

    def test_drop_counts_what_is_held(self) -> None:
        feed = _holding(b"abc", b"", b"de")
        self.assertEqual(feed._drop(), 5)
        self.assertEqual(feed._drop(), 0)
        feed.resumeProducing()
        self.assertEqual(feed.received, [])
