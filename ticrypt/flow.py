"""Bytes held for a consumer that pauses and resumes their producer.

:class:`BufferedProducer` is the base of the classes that buffer byte chunks
for a consumer and are its ``IPushProducer``: a mux stream's input, held for
the application (:class:`ticrypt.mux.stream.StreamTransport`), and a child's
stdin, held for its pipe (``ticrypt.vmc.processes._Stdin``).  The buffer, its
byte count, the paused flag and the loop that passes chunks on while the
consumer has not paused us are here; what a subclass does around that loop
(credit, ends, re-entrancy) stays in its ``_deliver``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class BufferedProducer(ABC):
    """Byte chunks held for a consumer, passed on while it has not paused us.

    A subclass adds chunks with :meth:`_hold` and passes them on in
    ``_deliver`` (its drain loop, around :meth:`_drain`), which
    :meth:`resumeProducing` runs; it defines ``stopProducing``.  What is
    held is bounded by the subclass (a window, a credit), not here.
    """

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        #: Bytes held and not passed on yet.
        self.buffered = 0
        self._paused = False

    def _hold(self, chunk: bytes) -> None:
        """Keep ``chunk`` (after what is held) until :meth:`_drain` passes it on."""
        self._chunks.append(chunk)
        self.buffered += len(chunk)

    def _drop(self) -> int:
        """Forget what is held; the number of bytes dropped."""
        dropped, self.buffered = self.buffered, 0
        self._chunks.clear()
        return dropped

    def _drain(self, deliver: Callable[[bytes], object]) -> int:
        """Pass held chunks, oldest first, to ``deliver`` until none is left or
        we are paused (``deliver`` may pause us, or :meth:`_drop` the rest);
        the number of bytes passed."""
        passed = 0
        while self._chunks and not self._paused:
            chunk = self._chunks.popleft()
            self.buffered -= len(chunk)
            passed += len(chunk)
            deliver(chunk)
        return passed

    @abstractmethod
    def _deliver(self) -> None:
        """Pass on what the consumer takes now (runs on every resume)."""

    # -- IPushProducer ---------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._deliver()

    @abstractmethod
    def stopProducing(self) -> None:
        """The consumer is gone."""
