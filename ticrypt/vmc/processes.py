"""Child processes of one secure channel: ``exec`` (pipes) and ``shell`` (PTY).

:class:`ProcessGroup` carries out the dispatcher's process actions.  Output
goes to ``send(header, body)``; flow control both ways:

* output: :meth:`ProcessGroup.pauseProducing` / ``resumeProducing`` stop and
  restart reading every child's stdout/stderr (the websocket leg registers
  the group as the streaming producer of its transport, so a slow user
  stops the children instead of filling memory);
* input: each child has a :class:`_Stdin` buffer, registered as the producer
  of the child's stdin.  It passes bytes on while the child's pipe (or PTY)
  takes them and reports every byte passed on through
  ``on_stdin_consumed(rid, n)``, which returns the frontend's window credit
  (PROTOCOL.md §5).  The dispatcher bounds the buffer by that window, so
  vmc never stops reading the channel because one child does not read.

Every exec child runs in its own session (``setsid``), every shell in its own
session with the PTY as controlling terminal.  ``cancel`` and channel close
SIGTERM the child's process group and every other process of its session
(job control puts a shell's jobs in process groups of their own), then,
after ``kill_grace``, SIGKILL them all.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import struct
import termios
from collections import deque
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

from ticrypt.channel.app import WINDOW, chunks

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


def session_pids(sid: int, proc: str = "/proc") -> list[int] | None:
    """PIDs of the live (not zombie) processes whose session id is ``sid``.

    Reads field 6 (``session``) of ``<proc>/<pid>/stat``; a process that ends
    while we look is skipped.  None where there is no ``proc`` (not Linux):
    callers then fall back to the process group alone.
    """
    try:
        names = os.listdir(proc)
    except OSError:
        return None
    found = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "stat"), "rb") as f:
                stat = f.read()
            # "pid (comm) state ppid pgrp session ...": comm may hold spaces
            # and parentheses, so split after its last ")".
            fields = stat[stat.rindex(b")") + 1:].split()
            if fields[0] != b"Z" and int(fields[3]) == sid:
                found.append(int(name))
        except (OSError, ValueError, IndexError):
            continue  # vanished (or unreadable): nothing to signal
    return found


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, someone else's
        return True
    return True


@implementer(IPushProducer)
class _Stdin:
    """vmc's buffer of one child's input, and the producer for its stdin.

    Bytes are passed to the child's transport while it has not paused us (so
    the transport holds at most about its ``bufferSize`` more); each batch
    passed on, or dropped because the child's stdin is gone, is reported to
    ``consumed(n)``.  What is buffered here is bounded by the request's
    window, which the dispatcher enforces.
    """

    def __init__(self, transport: Any, consumed: Callable[[int], None]):
        self._transport = transport
        self._consumed = consumed
        self._queue: deque[bytes] = deque()
        self.buffered = 0
        self._paused = False
        self._gone = False  # the child's stdin is closed: input is dropped
        self._eof = False  # exec: close the child's stdin once the buffer is written

    def write(self, data: bytes) -> None:
        if self._gone or self._eof:
            self._consumed(len(data))
            return
        self._queue.append(data)
        self.buffered += len(data)
        self._flush()

    def close_after(self) -> None:
        """Close the child's stdin once everything buffered is written."""
        if not self._gone and not self._eof:
            self._eof = True
            self._flush()

    def discard(self) -> None:
        """The child ended: drop the buffer (its request is over, no credit)."""
        self._gone = True
        self._queue.clear()
        self.buffered = 0

    def _flush(self) -> None:
        passed = 0
        while self._queue and not self._paused and not self._gone:
            data = self._queue.popleft()
            self.buffered -= len(data)
            passed += len(data)
            self._transport.write(data)  # may pause us at once
        if self._eof and not self._queue and not self._gone:
            self._gone = True
            # A consumer with a registered producer never finishes closing:
            # unregister first (what is already buffered is still written).
            self._transport.unregisterProducer()
            self._transport.closeStdin()
        if passed:
            self._consumed(passed)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        # The child's stdin went away (it closed it, or exited): what is
        # buffered can never be written; give its credit back.
        dropped = self.buffered
        self.discard()
        if dropped:
            self._consumed(dropped)


class _Child(protocol.ProcessProtocol):
    def __init__(self, group: ProcessGroup, rid: int, kind: str):
        self.group, self.rid, self.kind = group, rid, kind
        self.ended = False
        #: The child's pid, kept after Twisted reaps it (``transport.pid``
        #: is None from then on): it is also its session id.
        self.pid: int | None = None
        self.stdin: _Stdin | None = None

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
    tells the dispatcher a request is over; ``on_stdin_consumed(rid, n)``
    that ``n`` stdin bytes of ``rid`` left vmc's buffer (window credit).
    """

    log = Logger()

    reactor: Any  # IReactorProcess & IReactorTime
    run_as: RunAs
    send: Send
    on_finished: Callable[[int], None]
    on_stdin_consumed: Callable[[int, int], None]
    kill_grace: float = 3.0
    _children: dict[int, tuple[_Child, Any]] = attrs.field(factory=dict)
    _paused: bool = False
    _closed: bool = False
    #: Pending SIGKILLs, by the pid (= session id) of the child they are for.
    _kill_timers: dict[int, IDelayedCall] = attrs.field(factory=dict)
    _empty_waiters: list[defer.Deferred[None]] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        assert IReactorProcess.providedBy(self.reactor) and IReactorTime.providedBy(self.reactor)

    # -- starting --------------------------------------------------------

    def start_exec(self, rid: int, argv: tuple[str, ...], window: int = WINDOW) -> None:
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
        # setsid(1) makes the child a session and process-group leader (same
        # pid) so that cancel and close can signal every process it starts,
        # not just the first.
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
        self.send({"t": "ok", "id": rid, "window": window}, b"")
        self._started(rid, child, transport)

    def start_shell(self, rid: int, term: str, rows: int, cols: int,
                    window: int = WINDOW) -> None:
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
        self.send({"t": "ok", "id": rid, "window": window}, b"")
        self._started(rid, child, transport)

    def _started(self, rid: int, child: _Child, transport: Any) -> None:
        self._children[rid] = (child, transport)
        child.pid = transport.pid
        child.stdin = _Stdin(transport, lambda n: self._stdin_consumed(rid, n))
        transport.registerProducer(child.stdin, True)
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
        if entry is not None and not entry[0].ended and entry[0].stdin is not None:
            entry[0].stdin.write(data)

    def buffered(self, rid: int) -> int:
        """Stdin bytes of ``rid`` that vmc holds (not yet passed to the child)."""
        entry = self._children.get(rid)
        stdin = entry[0].stdin if entry is not None else None
        return stdin.buffered if stdin is not None else 0

    def eof(self, rid: int) -> None:
        entry = self._children.get(rid)
        stdin = entry[0].stdin if entry is not None and not entry[0].ended else None
        if stdin is None:
            return
        if entry is not None and entry[0].kind == "shell":
            # VEOF: what a terminal user types for end of input, in order
            # after the input before it (the dispatcher counted its byte).
            stdin.write(b"\x04")
        else:
            stdin.close_after()

    def resize(self, rid: int, rows: int, cols: int) -> None:
        t = self._transport(rid)
        if t is not None:
            try:
                set_window(t.fileno(), rows, cols)
            except OSError as e:
                self.log.warn("resize failed: {error}", error=e.strerror)

    def cancel(self, rid: int) -> None:
        entry = self._children.get(rid)
        if entry is not None and not entry[0].ended:
            self._kill(*entry)

    # -- killing -------------------------------------------------------------
    #
    # A child's pid is its session id and its process group id.  Job control
    # moves a shell's jobs to process groups of their own, so signalling the
    # group is not enough: every process of the session is signalled too,
    # found through /proc (Linux; elsewhere only the group).  A process that
    # calls setsid() itself (a daemon, ``setsid cmd``) leaves the session and
    # escapes; only a cgroup per channel would hold everything.
    #
    # Once Twisted has reaped a child its pid may be reused.  It cannot be
    # while any process still has it as session or group id, so if a process
    # with that pid exists again, the session is someone else's and is left
    # alone; if none does, the processes found with that session id are the
    # child's leftovers.

    def _kill(self, child: _Child, transport: Any) -> None:
        pid = child.pid
        if pid is None:
            return
        self._signal_session(pid, transport, signal.SIGTERM)
        if pid not in self._kill_timers:
            self._kill_timers[pid] = self.reactor.callLater(
                self.kill_grace, self._kill_now, pid, transport)

    def _kill_now(self, pid: int, transport: Any) -> None:
        self._kill_timers.pop(pid, None)
        self._signal_session(pid, transport, signal.SIGKILL)
        self._maybe_empty()

    def _signal_session(self, pid: int, transport: Any, sig: int) -> None:
        if transport.pid is None and _pid_exists(pid):
            return  # reaped, and the pid belongs to another process now
        self._signal(pid, sig)
        for other in session_pids(pid) or ():
            if other != os.getpid():
                try:
                    os.kill(other, sig)
                except OSError:
                    pass  # gone meanwhile

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
                self._kill(child, t)

    def when_empty(self) -> defer.Deferred[None]:
        """Fires once no child of this group is left and no SIGKILL is
        pending (at once if so)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._empty_waiters.append(d)
        self._maybe_empty()
        return d

    def _maybe_empty(self) -> None:
        if self._children or self._kill_timers:
            return
        waiters, self._empty_waiters = self._empty_waiters, []
        for d in waiters:
            d.callback(None)

    def stop_timers(self) -> None:
        """Cancel pending SIGKILL timers."""
        for timer in self._kill_timers.values():
            if timer.active():
                timer.cancel()
        self._kill_timers.clear()
        self._maybe_empty()

    # -- events from children --------------------------------------------

    def _output(self, rid: int, stream: str, data: bytes) -> None:
        if self._closed:
            return
        for part in chunks(data):
            self.send({"t": stream, "id": rid}, part)

    def _stdin_consumed(self, rid: int, n: int) -> None:
        if not self._closed and rid in self._children:
            self.on_stdin_consumed(rid, n)

    def _ended(self, rid: int, status: int) -> None:
        entry = self._children.pop(rid, None)
        if entry is not None:
            child, transport = entry
            if child.stdin is not None:
                child.stdin.discard()
            try:
                transport.unregisterProducer()
            except Exception:  # already unregistered by the closed pipe
                pass
            self._drop_kill(child)
        self._maybe_empty()
        if self._closed:
            return
        self.on_finished(rid)
        self.send({"t": "exit", "id": rid, "status": status}, b"")

    def _drop_kill(self, child: _Child) -> None:
        """The child ended: its pending SIGKILL is only needed for leftovers."""
        timer = self._kill_timers.get(child.pid) if child.pid is not None else None
        if timer is None or child.pid is None:
            return
        left = session_pids(child.pid)
        if left == [] or (left is None and not self._children):
            del self._kill_timers[child.pid]
            if timer.active():
                timer.cancel()

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
