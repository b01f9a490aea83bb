"""Child processes of one secure channel: ``exec`` (pipes) and ``shell`` (PTY).

:class:`ProcessGroup` carries out the dispatcher's process actions.  Output
goes to ``send(header, body)``; flow control both ways:

* output: :meth:`ProcessGroup.pauseProducing` / ``resumeProducing`` stop and
  restart reading every child's stdout/stderr (the websocket leg registers
  the group as the streaming producer of its transport, so a slow user
  stops the children instead of filling memory);
* input: each child's stdin is a consumer whose producer is a small
  :class:`_InputPressure` adapter; while any child's stdin buffer is full,
  ``pause_input(True)`` asks the leg to stop reading the websocket.

Every exec child runs in its own process group (``setsid``), every shell in
its own session (the PTY), so ``cancel`` and channel close can signal the
whole group.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import struct
import termios
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, protocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorProcess,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ticrypt.channel.app import chunks

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Send = Callable[[dict[str, Any], bytes], None]


@attrs.frozen
class RunAs:
    """Who children run as, and their base environment."""

    user: str
    uid: int | None
    gid: int | None
    home: str
    shell: str

    @classmethod
    def lookup(cls, user: str | None, shell: str) -> RunAs:
        """``user`` (None: the daemon's own user); KeyError if unknown."""
        pw = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
        switch = pw.pw_uid != os.getuid() or pw.pw_gid != os.getgid()
        return cls(user=pw.pw_name, uid=pw.pw_uid if switch else None,
                   gid=pw.pw_gid if switch else None,
                   home=pw.pw_dir if os.path.isdir(pw.pw_dir) else "/", shell=shell)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {"PATH": DEFAULT_PATH, "HOME": self.home, "USER": self.user,
               "LOGNAME": self.user, "SHELL": self.shell,
               "LANG": os.environ.get("LANG", "C.UTF-8")}
        env.update(extra or {})
        return env


def exit_status(reason: Failure) -> int:
    """Exit code, or 128 + signal number, as shells report it."""
    value = reason.value
    if isinstance(value, ProcessDone):
        return 0
    if isinstance(value, ProcessTerminated):
        if value.exitCode is not None:
            return int(value.exitCode)
        if value.signal is not None:
            return 128 + int(value.signal)
    return 255


def set_window(fd: int, rows: int, cols: int) -> None:
    """Set a terminal's window size (the child gets SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


@implementer(IPushProducer)
class _InputPressure:
    """Producer for one child's stdin: its buffer is full -> pause the websocket."""

    def __init__(self, group: ProcessGroup, rid: int):
        self._group, self._rid = group, rid

    def pauseProducing(self) -> None:
        self._group._input_pressure(self._rid, True)

    def resumeProducing(self) -> None:
        self._group._input_pressure(self._rid, False)

    def stopProducing(self) -> None:
        self._group._input_pressure(self._rid, False)


class _Child(protocol.ProcessProtocol):
    def __init__(self, group: ProcessGroup, rid: int, kind: str):
        self.group, self.rid, self.kind = group, rid, kind
        self.ended = False
        #: exec: ``eof`` closed stdin; later input is dropped (it could only
        #: pile up in the transport's buffer, with no producer to pause).
        self.stdin_closed = False

    def outReceived(self, data: bytes) -> None:
        self.group._output(self.rid, "stdout", data)

    def errReceived(self, data: bytes) -> None:
        self.group._output(self.rid, "stderr", data)

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.group._ended(self.rid, exit_status(reason))


@implementer(IPushProducer)
@attrs.define
class ProcessGroup:
    """The children of one channel.

    ``send`` delivers application messages to the user; ``on_finished(rid)``
    tells the dispatcher a request is over; ``pause_input(paused)`` asks the
    websocket leg to stop/restart reading.
    """

    log = Logger()

    reactor: Any  # IReactorProcess & IReactorTime
    run_as: RunAs
    send: Send
    on_finished: Callable[[int], None]
    pause_input: Callable[[bool], None]
    kill_grace: float = 3.0
    _children: dict[int, tuple[_Child, Any]] = attrs.field(factory=dict)
    _pressure: set[int] = attrs.field(factory=set)
    _paused: bool = False
    _closed: bool = False
    _kill_timers: list[IDelayedCall] = attrs.field(factory=list)
    _empty_waiters: list[defer.Deferred[None]] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        assert IReactorProcess.providedBy(self.reactor) and IReactorTime.providedBy(self.reactor)

    # -- starting --------------------------------------------------------

    def start_exec(self, rid: int, argv: tuple[str, ...]) -> None:
        env = self.run_as.env()
        try:
            exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env["PATH"])
            found = exe is not None and os.access(exe, os.X_OK)
        except ValueError:  # not encodable as a file name (a lone surrogate)
            found = False
        if exe is None or not found:
            self._fail(rid, "command-not-found", "command not found")
            return
        setsid = shutil.which("setsid")
        # setsid(1) makes the child a process-group leader (same pid) so that
        # cancel can signal every process it starts, not just the first.
        args = [setsid, exe, *argv[1:]] if setsid else [exe, *argv[1:]]
        child = _Child(self, rid, "exec")
        try:
            # Encode here: Twisted's fork path would only fail in the child,
            # after the fork, and write a traceback to the user's stderr.
            for a in args:
                os.fsencode(a)
            transport = self.reactor.spawnProcess(
                child, args[0], args, env=env, path=self.run_as.home,
                uid=self.run_as.uid, gid=self.run_as.gid,
                childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            self._fail(rid, "spawn-failed", f"cannot start command: {e.strerror}")
            return
        except ValueError:  # an argument not encodable for exec (UnicodeEncodeError)
            self._fail(rid, "spawn-failed", "cannot start command: invalid argument")
            return
        self._started(rid, child, transport)

    def start_shell(self, rid: int, term: str, rows: int, cols: int) -> None:
        master, slave = os.openpty()
        try:
            set_window(slave, rows, cols)
            child = _Child(self, rid, "shell")
            shell = self.run_as.shell
            transport = self.reactor.spawnProcess(
                child, shell, [shell], env=self.run_as.env({"TERM": term}),
                path=self.run_as.home, uid=self.run_as.uid, gid=self.run_as.gid,
                usePTY=(master, slave, os.ttyname(slave)))
        except OSError as e:
            for fd in (master, slave):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fail(rid, "spawn-failed", f"cannot start shell: {e.strerror}")
            return
        self.send({"t": "ok", "id": rid}, b"")
        self._started(rid, child, transport)

    def _started(self, rid: int, child: _Child, transport: Any) -> None:
        self._children[rid] = (child, transport)
        transport.registerProducer(_InputPressure(self, rid), True)
        if self._paused:
            transport.pauseProducing()

    def _fail(self, rid: int, code: str, message: str) -> None:
        self.send({"t": "error", "id": rid, "code": code, "message": message}, b"")
        self.on_finished(rid)

    # -- actions ----------------------------------------------------------

    def _transport(self, rid: int) -> Any | None:
        entry = self._children.get(rid)
        return None if entry is None or entry[0].ended else entry[1]

    def write_stdin(self, rid: int, data: bytes) -> None:
        entry = self._children.get(rid)
        if entry is not None and not entry[0].ended and not entry[0].stdin_closed:
            entry[1].write(data)

    def eof(self, rid: int) -> None:
        entry = self._children.get(rid)
        if entry is None or entry[0].ended:
            return
        child, t = entry
        if child.kind == "shell":
            t.write(b"\x04")  # VEOF: what a terminal user types for end of input
        elif not child.stdin_closed:
            child.stdin_closed = True
            # A consumer with a registered producer never finishes closing:
            # unregister first (what is already buffered is still written).
            t.unregisterProducer()
            self._input_pressure(rid, False)
            t.closeStdin()

    def resize(self, rid: int, rows: int, cols: int) -> None:
        t = self._transport(rid)
        if t is not None:
            try:
                set_window(t.fileno(), rows, cols)
            except OSError as e:
                self.log.warn("resize failed: {error}", error=e.strerror)

    def cancel(self, rid: int) -> None:
        t = self._transport(rid)
        if t is not None:
            self._kill(t.pid)

    def _kill(self, pid: int | None) -> None:
        if pid is None:
            return
        self._signal(pid, signal.SIGTERM)
        self._kill_timers.append(
            self.reactor.callLater(self.kill_grace, self._signal, pid, signal.SIGKILL))

    def _signal(self, pid: int, sig: int) -> None:
        try:
            os.killpg(pid, sig)
        except OSError:
            # not (yet) a group leader: signal the process itself
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    def close(self) -> None:
        """The channel is gone: kill every child; send nothing more.

        Idempotent: only the first call signals (and arms the SIGKILLs).
        """
        if self._closed:
            return
        self._closed = True
        for child, t in list(self._children.values()):
            if not child.ended:
                self._kill(t.pid)

    def when_empty(self) -> defer.Deferred[None]:
        """Fires once no child of this group is left (at once if none is)."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._children:
            self._empty_waiters.append(d)
        else:
            d.callback(None)
        return d

    def stop_timers(self) -> None:
        """Cancel pending SIGKILL timers (children already gone)."""
        for timer in self._kill_timers:
            if timer.active():
                timer.cancel()
        self._kill_timers.clear()

    # -- events from children --------------------------------------------

    def _output(self, rid: int, stream: str, data: bytes) -> None:
        if self._closed:
            return
        for part in chunks(data):
            self.send({"t": stream, "id": rid}, part)

    def _ended(self, rid: int, status: int) -> None:
        entry = self._children.pop(rid, None)
        self._input_pressure(rid, False)
        if entry is not None:
            try:
                entry[1].unregisterProducer()
            except Exception:  # already unregistered by the closed pipe
                pass
        if not self._children:
            self.stop_timers()
            waiters, self._empty_waiters = self._empty_waiters, []
            for d in waiters:
                d.callback(None)
        if self._closed:
            return
        self.on_finished(rid)
        self.send({"t": "exit", "id": rid, "status": status}, b"")

    def _input_pressure(self, rid: int, paused: bool) -> None:
        before = bool(self._pressure)
        if paused:
            self._pressure.add(rid)
        else:
            self._pressure.discard(rid)
        if before != bool(self._pressure):
            self.pause_input(bool(self._pressure))

    @property
    def count(self) -> int:
        return len(self._children)

    # -- IPushProducer for the websocket transport ------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        for child, t in self._children.values():
            if not child.ended:
                t.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        for child, t in self._children.values():
            if not child.ended:
                t.resumeProducing()

    def stopProducing(self) -> None:
        self.close()

