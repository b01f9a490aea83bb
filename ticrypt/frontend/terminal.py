"""The local terminal for ``ticrypt shell`` (and stdin for ``exec``).

* :class:`RawMode`: ``tty.setraw`` on enter, the saved attributes restored on
  exit (also after an error), and nothing at all when the fd is not a tty.
* :func:`window_size` and :func:`on_resize` (SIGWINCH -> callback in the
  reactor thread).
* :class:`InputReader`: reads fd 0 in the reactor without making it
  non-blocking (which would also change the shared stdout/stderr file
  description); it is an ``IPushProducer`` so the websocket can pause it.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import termios
import tty
from collections.abc import Callable
from types import TracebackType
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReadDescriptor
from zope.interface import implementer


class RawMode:
    """Put ``fd`` in raw mode for the duration of a ``with`` block (if a tty)."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self._saved: list[Any] | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def __enter__(self) -> RawMode:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd, termios.TCSADRAIN)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.restore()

    def restore(self) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None


def window_size(fd: int = 1) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on ``fd``, or None if it is not a terminal
    or does not know its size (reports 0 rows or columns)."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    if not size.lines or not size.columns:
        return None
    return size.lines, size.columns


def on_resize(reactor: Any, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` (in the reactor thread) on SIGWINCH; returns an undo."""
    previous = signal.getsignal(signal.SIGWINCH)

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(callback)

    signal.signal(signal.SIGWINCH, handler)

    def undo() -> None:
        signal.signal(signal.SIGWINCH, previous)

    return undo


def enlarge_pipe(fd: int, size: int) -> None:
    """Give the pipe ``fd`` (if it is one) a capacity of ``size`` bytes, so
    that a read can return a whole record's worth; nothing if it is not a
    pipe or ``size`` is over the system's pipe-max-size."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, ValueError, AttributeError):
        pass


@implementer(IReadDescriptor, IPushProducer)
class InputReader:
    """Feeds what arrives on ``fd`` to ``on_data``; ``on_eof`` at end of input."""

    def __init__(self, reactor: Any, on_data: Callable[[bytes], None],
                 on_eof: Callable[[], None], fd: int = 0, chunk: int = 262144):
        self._reactor = reactor
        self._fd = fd
        self._chunk = chunk
        self._on_data = on_data
        self._on_eof = on_eof
        self._reading = False
        self._done = False
        self._polled = False

    def start(self) -> None:
        if self._done or self._reading:
            return
        self._reading = True
        try:
            self._reactor.addReader(self)
            self._polled = True
        except OSError:
            # epoll refuses regular files and some devices (< file, /dev/null);
            # those never block, so read them in reactor turns instead.
            self._polled = False
            self._reactor.callLater(0, self._poll_loop)

    def _poll_loop(self) -> None:
        if self._reading and not self._done:
            self.doRead()
            if self._reading and not self._done:
                self._reactor.callLater(0, self._poll_loop)

    def stop(self) -> None:
        if self._reading:
            self._reading = False
            if self._polled:
                self._reactor.removeReader(self)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "stdin"

    def doRead(self) -> None:
        # Only called when select/epoll reports fd readable, so a read on a
        # blocking pipe or tty returns at once with what is there.
        try:
            data = os.read(self._fd, self._chunk)
        except InterruptedError:
            return
        except OSError:
            data = b""
        if data:
            self._on_data(data)
            return
        self._done = True
        self.stop()
        self._on_eof()

    def connectionLost(self, reason: Any) -> None:
        # The reactor saw the write end close (HUP) and already dropped us.
        self._reading = False
        if not self._done:
            self._done = True
            self._on_eof()

    # IPushProducer: the websocket's transport pauses us when it is full.
    def pauseProducing(self) -> None:
        self.stop()

    def resumeProducing(self) -> None:
        self.start()

    def stopProducing(self) -> None:
        self._done = True
        self.stop()
