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
session with the PTY as controlling terminal.  Each channel's processes are
in a kernel-tracked group: a cgroup v2 per channel with one per request
(:mod:`ticrypt.vmc.cgroup`), or where cgroups are unavailable the fallback
:class:`SessionTracker`.  ``cancel`` SIGTERMs every process of the request,
channel close every process of the channel (also what ended requests left
behind), then, after ``kill_grace``, SIGKILLs them all and ends the request
even if an escaped process still holds its pipes.  :func:`open_tracker`
picks the mode (``[processes] cgroup``).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import json
import os
import pwd
import shutil
import signal
import struct
import termios
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

import attrs
from twisted.internet import defer, protocol
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST

# Twisted's registry of the children it started and will reap; the
# fallback's orphan reaper must leave those alone.
from twisted.internet.process import reapProcessHandlers
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ticrypt.channel.app import WINDOW, chunks
from ticrypt.flow import BufferedProducer
from ticrypt.fsutil import atomic_write
from ticrypt.service import start_loop, stop_loop
from ticrypt.timers import cancel_call
from ticrypt.vmc.cgroup import (
    CgroupTracker,
    CgroupUnavailable,
    Launch,
    find_parent,
    instance_name,
)

#: Bytes read from a child's stdout or stderr pipe at a time, and the
#: largest output body (PROTOCOL.md §5: at most 256 KiB): every read
#: becomes one record, and each record costs the same sealing, framing and
#: relaying work whatever its size (Twisted reads 8 KiB: 32 times as many).
#: The pipe is enlarged to this size (F_SETPIPE_SZ) so that a read can fill it.
PIPE_READ_SIZE = 262144
_F_SETPIPE_SZ = 1031

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


@attrs.frozen
class ProcInfo:
    """What vmc needs of ``/proc/<pid>/stat``."""

    state: str
    ppid: int
    session: int
    #: Start time after boot, in clock ticks (-1 if unknown): with the pid,
    #: it names one process (pids are reused, start times are not).
    start: int


def _parse_stat(stat: bytes) -> ProcInfo:
    # "pid (comm) state ppid pgrp session ... starttime(22) ...": comm may
    # hold spaces and parentheses, so split after its last ")".
    fields = stat[stat.rindex(b")") + 1:].split()
    start = int(fields[19]) if len(fields) > 19 else -1
    return ProcInfo(fields[0].decode("ascii", "replace"), int(fields[1]), int(fields[3]), start)


def proc_info(pid: int, proc: str = "/proc") -> ProcInfo | None:
    """``pid``'s stat, or None if it does not exist (or cannot be read)."""
    try:
        with open(os.path.join(proc, str(pid), "stat"), "rb") as f:
            return _parse_stat(f.read())
    except (OSError, ValueError, IndexError):
        return None


def scan_proc(proc: str = "/proc") -> dict[int, ProcInfo] | None:
    """Every live (not zombie) process; None where there is no ``proc``
    (not Linux).  A process that ends while we look is skipped."""
    try:
        names = os.listdir(proc)
    except OSError:
        return None
    found = {}
    for name in names:
        if name.isdigit():
            info = proc_info(int(name), proc)
            if info is not None and info.state != "Z":
                found[int(name)] = info
    return found


def session_pids(sid: int, proc: str = "/proc") -> list[int] | None:
    """PIDs of the live (not zombie) processes whose session id is ``sid``.

    None where there is no ``proc`` (not Linux): callers then fall back to
    the process group alone.
    """
    table = scan_proc(proc)
    return None if table is None else [p for p, i in table.items() if i.session == sid]


def descendants(roots: set[int], table: dict[int, ProcInfo]) -> set[int]:
    """``roots`` and every process below them (by parent pid) in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, someone else's
        return True
    return True


# -- finding a channel's processes -------------------------------------------
#
# vmc keeps each channel's processes in a kernel-tracked group: a cgroup v2
# per channel with one per request below it (ticrypt.vmc.cgroup).  Where
# cgroups are unavailable (no cgroup2 mount, vmc not root and not
# delegated, ``[processes] cgroup = off``) the fallback below finds them by
# session, parent pid and a marker in their environment; see
# :class:`SessionTracker`.  Both implement ChannelTrack.


class ChannelTrack(Protocol):
    """The processes of one channel (cgroup or fallback)."""

    def command(self, rid: int, argv: list[str], *, user: str, uid: int | None,
                gid: int | None, new_session: bool) -> Launch: ...

    def started(self, rid: int, pid: int) -> None: ...

    def reaped(self, rid: int) -> None: ...

    def signal(self, rid: int | None, sig: int) -> None: ...

    def alive(self, rid: int | None) -> bool: ...

    def ended(self, rid: int) -> None: ...

    def release(self) -> None: ...


#: Environment variable of each fallback-mode command: ``<channel>.<rid>``.
#: It survives ``setsid`` and double forks, so an orphan re-parented to vmc
#: (a child subreaper) can be told apart by channel and request.
MARKER = "TICRYPT_VMC_JOB"
#: The fallback's record of started processes, in ``state_dir``.
STATE_FILE = "processes.json"
#: How often the fallback reaps (and records) orphans re-parented to vmc.
REAP_EVERY = 2.0
_PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> bool:
    """Make vmc the child subreaper of its descendants (Linux prctl): an
    orphan (its parent ended, e.g. after ``setsid`` in a backgrounded
    subshell) is re-parented to vmc instead of to init.  False if refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _marker(pid: int, proc: str = "/proc") -> str | None:
    """The value of ``MARKER`` in ``pid``'s (initial) environment."""
    try:
        with open(os.path.join(proc, str(pid), "environ"), "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return None
    key = MARKER.encode() + b"="
    for item in data.split(b"\0"):
        if item.startswith(key):
            return item[len(key):].decode("ascii", "replace")
    return None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


@attrs.define(eq=False)
class SessionChannel:
    """The fallback's view of one channel's processes.

    Each exec runs under ``setsid(1)`` (a session and process group of its
    own), each shell in the PTY's session.  A request's processes are its
    child's session (a shell's job-control jobs have process groups of their
    own), everything below them by parent pid (also what called ``setsid``
    while its parent lives) and, with a :class:`SessionTracker`, the orphans
    re-parented to vmc whose ``MARKER`` names the request.  What leaves the
    session, loses its parent and clears its environment escapes; only a
    cgroup holds everything.

    Without a tracker (a bare :class:`ProcessGroup`) there are no markers and
    no state file.

    Once Twisted has reaped a child its pid may be reused.  It cannot be
    while any process still has it as session or group id, so if a process
    with that pid exists again, the session is someone else's and is left
    alone; if none does, the processes found with that session id are the
    child's leftovers.
    """

    tracker: SessionTracker | None = None
    name: str = ""
    _pids: dict[int, int] = attrs.field(factory=dict)
    _reaped: set[int] = attrs.field(factory=set)

    def command(self, rid: int, argv: list[str], *, user: str, uid: int | None,
                gid: int | None, new_session: bool) -> Launch:
        # setsid(1) makes the child a session and process-group leader (same
        # pid) so that cancel and close can signal every process it starts,
        # not just the first.
        setsid = shutil.which("setsid") if new_session else None
        args = [setsid, *argv] if setsid else list(argv)
        env = {MARKER: f"{self.name}.{rid}"} if self.tracker is not None else {}
        return Launch(args[0], args, uid, gid, env)

    def started(self, rid: int, pid: int) -> None:
        self._pids[rid] = pid
        if self.tracker is not None:
            self.tracker.record(pid, self.name)

    def reaped(self, rid: int) -> None:
        self._reaped.add(rid)

    def members(self, rid: int | None) -> set[int]:
        """The live processes of request ``rid`` (None: of the channel)."""
        table = scan_proc()
        roots: set[int] = set()
        for r in [rid] if rid is not None else list(self._pids):
            pid = self._pids.get(r)
            if pid is None or (r in self._reaped and _pid_exists(pid)):
                continue  # never started, or reaped and its pid reused
            if table is None:
                roots.add(pid)
                continue
            if r not in self._reaped and pid in table:
                roots.add(pid)
            roots |= {p for p, info in table.items() if info.session == pid}
        if table is None:
            return roots
        if self.tracker is not None:
            want = f"{self.name}.{rid}" if rid is not None else f"{self.name}."
            roots |= self.tracker.marked(table, want, exact=rid is not None)
        found = descendants(roots, table)
        found.discard(os.getpid())
        return found

    def signal(self, rid: int | None, sig: int) -> None:
        # Look first: once the child ends, what it started is re-parented
        # and no longer below it.
        members = self.members(rid)
        for r in [rid] if rid is not None else list(self._pids):
            if r in self._pids and r not in self._reaped:
                try:  # the group, also where there is no /proc
                    os.killpg(self._pids[r], sig)
                except OSError:
                    pass
        for pid in members:
            try:
                os.kill(pid, sig)
            except OSError:
                pass  # gone meanwhile

    def alive(self, rid: int | None) -> bool:
        return bool(self.members(rid))

    def ended(self, rid: int) -> None:
        """Kept: the channel's close still signals the session's leftovers."""

    def release(self) -> None:
        if self.tracker is not None:
            self.tracker.forget(self.name)


@attrs.define(eq=False)
class SessionTracker:
    """The fallback where vmc cannot use cgroups (one per vmc).

    * vmc is the child subreaper of its descendants (prctl), so orphans that
      left their session are re-parented to it: they are found by their
      ``MARKER`` and killed with their channel or request, reaped when they
      end (Twisted reaps only the children it started), and all of them are
      killed when vmc stops.
    * ``state_dir/processes.json`` records every started child and every
      marked orphan seen (pid, start time, owner, boot id) until its channel
      is over.  The first start after a crash kills each recorded process
      whose start time still matches, its session and what is below them
      (same owner only: a pid may have been reused meanwhile).
    """

    log = Logger()
    mode = "fallback"

    state_path: str
    clock: Any  # IReactorTime
    reason: str
    subreaper: bool = False
    _entries: list[dict[str, Any]] = attrs.field(factory=list)
    _seq: int = 0
    _reaper: LoopingCall | None = None

    @classmethod
    def open(cls, state_dir: str, clock: Any, reason: str) -> SessionTracker:
        tracker = cls(os.path.join(state_dir, STATE_FILE), clock, reason)
        tracker.subreaper = set_child_subreaper()
        if tracker.subreaper:
            tracker._reaper = start_loop(tracker._reap_orphans, clock, REAP_EVERY, now=False,
                                         failed=lambda f: tracker.log.failure("orphan reaper stopped", f))
        return tracker

    def describe(self) -> str:
        parts = ["process sessions", "descendants by parent pid",
                 "child subreaper and environment markers" if self.subreaper
                 else "no child subreaper", f"pid file {self.state_path}"]
        return f"fallback ({self.reason}): " + ", ".join(parts)

    def channel(self) -> SessionChannel:
        self._seq += 1
        return SessionChannel(self, f"c{os.getpid()}-{self._seq}")

    # -- the state file ------------------------------------------------------

    def _save(self) -> None:
        doc = {"boot_id": _boot_id(), "processes": self._entries}
        try:
            atomic_write(self.state_path, json.dumps(doc, sort_keys=True).encode(), 0o600)
        except OSError as e:
            self.log.warn("cannot write {path}: {why}", path=self.state_path, why=e.strerror)

    def record(self, pid: int, channel: str) -> None:
        info = proc_info(pid)
        if info is None or any(e["pid"] == pid and e["start"] == info.start
                               for e in self._entries):
            return
        self._entries.append({"pid": pid, "start": info.start, "uid": _owner(pid),
                              "channel": channel})
        self._save()

    def forget(self, channel: str) -> None:
        kept = [e for e in self._entries if e["channel"] != channel]
        if len(kept) != len(self._entries):
            self._entries = kept
            self._save()

    def clean_leftovers(self) -> list[tuple[str, int]]:
        """Kill what the recorded processes of a previous run left:
        (``pid <n>``, processes killed) per record that still matched."""
        try:
            with open(self.state_path, "rb") as f:
                doc = json.loads(f.read(1 << 22))
            entries = doc["processes"] if doc.get("boot_id") == _boot_id() else []
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.log.warn("{path} is unreadable; ignored", path=self.state_path)
            entries = []
        table = scan_proc() or {}
        found = []
        for e in entries if isinstance(entries, list) else []:
            try:
                pid, start, uid = int(e["pid"]), int(e["start"]), e.get("uid")
            except (KeyError, TypeError, ValueError):
                continue
            now = table.get(pid)
            if now is not None and now.start != start:
                continue  # the pid is another process's now: so is its session
            roots = {p for p, i in table.items() if i.session == pid}
            if now is not None:
                roots.add(pid)
            victims = {p for p in descendants(roots, table)
                       if p != os.getpid() and (uid is None or _owner(p) == uid)}
            for p in victims:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            if victims:
                found.append((f"pid {pid}", len(victims)))
        self._entries = []
        self._save()
        return found

    # -- orphans -------------------------------------------------------------

    def _orphans(self, table: dict[int, ProcInfo]) -> list[int]:
        """vmc's children that Twisted did not start (re-parented orphans)."""
        me = os.getpid()
        return [p for p, i in table.items() if i.ppid == me and p not in reapProcessHandlers]

    def marked(self, table: dict[int, ProcInfo], want: str, exact: bool) -> set[int]:
        """Orphans re-parented to vmc whose marker is ``want`` (or, not
        ``exact``, starts with it)."""
        if not self.subreaper:
            return set()
        found = set()
        for pid in self._orphans(table):
            m = _marker(pid)
            if m is not None and (m == want if exact else m.startswith(want)):
                found.add(pid)
        return found

    def _reap_orphans(self) -> None:
        """Reap orphans that ended; record the live ones with a marker.
        (Catches its own errors: a raising LoopingCall stops for good.)"""
        try:
            me = os.getpid()
            try:
                names = [int(n) for n in os.listdir("/proc") if n.isdigit()]
            except OSError:
                return
            for pid in names:
                info = proc_info(pid)
                if info is None or info.ppid != me or pid in reapProcessHandlers:
                    continue
                if info.state == "Z":
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
                    continue
                m = _marker(pid)
                if m is not None and "." in m:
                    self.record(pid, m.rsplit(".", 1)[0])
        except Exception:
            self.log.failure("reaping orphans failed")

    def shutdown(self) -> defer.Deferred[None]:
        """vmc stops: SIGKILL every descendant left (the subreaper keeps
        orphans below vmc) and forget the records."""
        stop_loop(self._reaper)
        table = scan_proc()
        if self.subreaper and table is not None:
            for pid in descendants({os.getpid()}, table) - {os.getpid()}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self._entries = []
        self._save()
        return defer.succeed(None)


Tracker: TypeAlias = CgroupTracker | SessionTracker


def open_tracker(setting: str, state_dir: str, clock: Any) -> Tracker:
    """vmc's tracker for ``[processes] cgroup`` = ``setting``.

    ``auto`` falls back to :class:`SessionTracker` (saying why) where cgroups
    cannot be used; an explicit path that cannot be used raises
    CgroupUnavailable (a start-up error).
    """
    if setting == "off":
        return SessionTracker.open(state_dir, clock, "[processes] cgroup = off")
    try:
        return CgroupTracker.open(find_parent(setting), instance_name(state_dir), clock)
    except CgroupUnavailable as e:
        if setting != "auto":
            raise
        return SessionTracker.open(state_dir, clock, str(e))


def _read_pipe(reader: Any) -> object:
    """``ProcessReader.doRead`` with :data:`PIPE_READ_SIZE` reads (Twisted's
    ``fdesc.readFromFD``, which reads 8 KiB, otherwise unchanged)."""
    try:
        data = os.read(reader.fd, PIPE_READ_SIZE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return CONNECTION_LOST
    if not data:
        return CONNECTION_DONE
    reader.dataReceived(data)
    return None


def read_pipes_in_chunks(transport: Any) -> None:
    """Read ``transport``'s output pipes (a spawned ``Process``) in
    :data:`PIPE_READ_SIZE` pieces, and give them and its stdin pipe that
    capacity (stdin: fewer, larger writes to the child); a PTY process is
    left as it is."""
    pipes = getattr(transport, "pipes", {})
    for fd in (0, 1, 2):
        pipe = pipes.get(fd)
        if pipe is None:
            continue
        if fd and hasattr(pipe, "dataReceived"):
            pipe.doRead = functools.partial(_read_pipe, pipe)
        try:
            fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, PIPE_READ_SIZE)
        except (OSError, ValueError):  # over pipe-max-size: the default stays
            pass


class _Stdin(BufferedProducer):
    """vmc's buffer of one child's input, and the producer for its stdin.

    Bytes are passed to the child's transport while it has not paused us (so
    the transport holds at most about its ``bufferSize`` more); each batch
    passed on, or dropped because the child's stdin is gone, is reported to
    ``consumed(n)``.  What is buffered here is bounded by the request's
    window, which the dispatcher enforces.
    """

    def __init__(self, transport: Any, consumed: Callable[[int], None]):
        super().__init__()
        self._transport = transport
        self._consumed = consumed
        self._gone = False  # the child's stdin is closed: input is dropped
        self._eof = False  # exec: close the child's stdin once the buffer is written

    def write(self, data: bytes) -> None:
        if self._gone or self._eof:
            self._consumed(len(data))
            return
        self._hold(data)
        self._deliver()

    def close_after(self) -> None:
        """Close the child's stdin once everything buffered is written."""
        if not self._gone and not self._eof:
            self._eof = True
            self._deliver()

    def discard(self) -> None:
        """The child ended: drop the buffer (its request is over, no credit)."""
        self._gone = True
        self._drop()

    def _deliver(self) -> None:
        passed = self._drain(self._transport.write)  # a write may pause us at once
        if self._eof and not self._chunks and not self._gone:
            self._gone = True
            # A consumer with a registered producer never finishes closing:
            # unregister first (what is already buffered is still written).
            self._transport.unregisterProducer()
            self._transport.closeStdin()
        if passed:
            self._consumed(passed)

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
        #: is None from then on): in the fallback it is also its session id.
        self.pid: int | None = None
        self.stdin: _Stdin | None = None

    def outReceived(self, data: bytes) -> None:
        self.group._output(self.rid, "stdout", data)

    def errReceived(self, data: bytes) -> None:
        self.group._output(self.rid, "stderr", data)

    def processExited(self, reason: Failure) -> None:
        self.group.track.reaped(self.rid)

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        self.group._ended(self.rid, exit_status(reason))


#: Key of the channel-wide SIGKILL timer in ``ProcessGroup._kill_timers``.
_CHANNEL = -1


@implementer(IPushProducer)
@attrs.define
class ProcessGroup:
    """The children of one channel.

    ``send`` delivers application messages to the user; ``on_finished(rid)``
    tells the dispatcher a request is over; ``on_stdin_consumed(rid, n)``
    that ``n`` stdin bytes of ``rid`` left vmc's buffer (window credit).
    ``track`` finds (and kills) every process of a request or of the whole
    channel: a cgroup per channel from vmc's tracker, or the fallback
    (default: sessions and process groups, for a bare group).
    """

    log = Logger()

    reactor: Any  # IReactorProcess & IReactorTime
    run_as: RunAs
    send: Send
    on_finished: Callable[[int], None]
    on_stdin_consumed: Callable[[int, int], None]
    kill_grace: float = 3.0
    track: ChannelTrack = attrs.field(factory=SessionChannel)
    _children: dict[int, tuple[_Child, Any]] = attrs.field(factory=dict)
    _paused: bool = False
    _closed: bool = False
    #: Pending SIGKILLs, by request id (``_CHANNEL``: the whole channel's).
    _kill_timers: dict[int, IDelayedCall] = attrs.field(factory=dict)
    _empty_waiters: list[defer.Deferred[None]] = attrs.field(factory=list)

    def __attrs_post_init__(self) -> None:
        assert IReactorProcess.providedBy(self.reactor) and IReactorTime.providedBy(self.reactor)

    # -- starting --------------------------------------------------------

    def _launch(self, rid: int, argv: list[str], new_session: bool) -> Launch:
        return self.track.command(rid, argv, user=self.run_as.user, uid=self.run_as.uid,
                                  gid=self.run_as.gid, new_session=new_session)

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
        child = _Child(self, rid, "exec")
        try:
            # Encode here: Twisted's fork path would only fail in the child,
            # after the fork, and write a traceback to the user's stderr.
            for a in argv:
                os.fsencode(a)
            launch = self._launch(rid, [exe, *argv[1:]], new_session=True)
            transport = self.reactor.spawnProcess(
                child, launch.executable, launch.args, env={**env, **launch.env},
                path=self.run_as.home, uid=launch.uid, gid=launch.gid,
                childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            self.track.ended(rid)
            self._fail(rid, "spawn-failed", f"cannot start command: {e.strerror}")
            return
        except ValueError:  # an argument not encodable for exec (UnicodeEncodeError)
            self.track.ended(rid)
            self._fail(rid, "spawn-failed", "cannot start command: invalid argument")
            return
        read_pipes_in_chunks(transport)
        self.send({"t": "ok", "id": rid, "window": window}, b"")
        self._started(rid, child, transport)

    def start_shell(self, rid: int, term: str, rows: int, cols: int,
                    window: int = WINDOW) -> None:
        master, slave = os.openpty()
        try:
            set_window(slave, rows, cols)
            child = _Child(self, rid, "shell")
            shell = self.run_as.shell
            # Twisted makes the PTY's session (setsid, controlling terminal).
            launch = self._launch(rid, [shell], new_session=False)
            transport = self.reactor.spawnProcess(
                child, launch.executable, launch.args,
                env={**self.run_as.env({"TERM": term}), **launch.env},
                path=self.run_as.home, uid=launch.uid, gid=launch.gid,
                usePTY=(master, slave, os.ttyname(slave)))
        except OSError as e:
            for fd in (master, slave):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.track.ended(rid)
            self._fail(rid, "spawn-failed", f"cannot start shell: {e.strerror}")
            return
        self.send({"t": "ok", "id": rid, "window": window}, b"")
        self._started(rid, child, transport)

    def _started(self, rid: int, child: _Child, transport: Any) -> None:
        self._children[rid] = (child, transport)
        child.pid = transport.pid
        if child.pid is not None:
            self.track.started(rid, child.pid)
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
        """SIGTERM every process of ``rid``; after ``kill_grace`` SIGKILL
        them and end the request even if something still holds its pipes."""
        entry = self._children.get(rid)
        if entry is not None and not entry[0].ended:
            self._kill(rid)

    # -- killing -------------------------------------------------------------

    def _kill(self, rid: int) -> None:
        self.track.signal(None if rid == _CHANNEL else rid, signal.SIGTERM)
        if rid not in self._kill_timers:
            self._kill_timers[rid] = self.reactor.callLater(self.kill_grace, self._kill_now, rid)

    def _kill_now(self, rid: int) -> None:
        self._kill_timers.pop(rid, None)
        self.track.signal(None if rid == _CHANNEL else rid, signal.SIGKILL)
        # The grace is over: a process that escaped the kill (or one that is
        # still dying) may hold the request's pipes or PTY open, and Twisted
        # reports the end only once they close.  Close vmc's ends, so the
        # request ends (with the child's exit status) as soon as it is reaped.
        for r, (child, transport) in list(self._children.items()):
            if not child.ended and rid in (r, _CHANNEL):
                transport.loseConnection()
        self._maybe_empty()

    def close(self) -> None:
        """The channel is gone: kill every process of it (also what is left
        of requests that already ended); send nothing more.

        Idempotent: only the first call signals (and arms the SIGKILL).
        """
        if self._closed:
            return
        self._closed = True
        if self._children or self.track.alive(None):
            self._kill(_CHANNEL)
        self._maybe_empty()

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
        if self._closed:
            self.track.release()
        waiters, self._empty_waiters = self._empty_waiters, []
        for d in waiters:
            d.callback(None)

    def stop_timers(self) -> None:
        """Cancel pending SIGKILL timers."""
        for timer in self._kill_timers.values():
            cancel_call(timer)
        self._kill_timers.clear()
        self._maybe_empty()

    # -- events from children --------------------------------------------

    def _output(self, rid: int, stream: str, data: bytes) -> None:
        if self._closed:
            return
        for part in chunks(data, PIPE_READ_SIZE):
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
            self._drop_kill(rid)
            self.track.ended(rid)
        self._maybe_empty()
        if self._closed:
            return
        self.on_finished(rid)
        self.send({"t": "exit", "id": rid, "status": status}, b"")

    def _drop_kill(self, rid: int) -> None:
        """``rid`` ended: its pending SIGKILL (and, once no child is left,
        the channel's) is only needed while processes of it are left."""
        for key in (rid, _CHANNEL):
            timer = self._kill_timers.get(key)
            if timer is None or (key == _CHANNEL and self._children):
                continue
            if not self.track.alive(None if key == _CHANNEL else key):
                del self._kill_timers[key]
                cancel_call(timer)

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
