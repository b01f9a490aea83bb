"""Kernel-tracked groups for the processes vmc starts: cgroup v2.

Layout (``[processes] cgroup``, PROTOCOL.md §5 "Processes on the VM")::

    PARENT/                    vmc's parent cgroup (auto, or the configured path)
      vm-<instance>/           one vmc (a hash of its state_dir): its tree only
        c<pid>-<n>/            one secure channel (session)
          r<rid>/              one exec/shell request: its process and all
                               its descendants, whatever they do

Every command is spawned through :mod:`ticrypt.vmc.incgroup`, which joins
its request's cgroup before it execs, so nothing of the user's runs outside.
A process cannot leave a cgroup by itself (only a writer of ``cgroup.procs``
of a common ancestor can move it), so ``setsid``, double forks and daemons
stay found.  Cancel signals the request's cgroup, channel close the
channel's; SIGKILL is ``cgroup.kill`` (atomic, also for processes forking
meanwhile), or on kernels before 5.14 freeze + SIGKILL of every member,
repeated until the cgroup is empty.  At start-up every cgroup under
``vm-<instance>`` is a leftover of a previous run that did not stop cleanly
(a crash, SIGKILL): it is killed and removed before vmc takes users.

``auto`` looks up the cgroup2 mount in ``/proc/self/mountinfo`` and vmc's
own cgroup in ``/proc/self/cgroup``.  If that cgroup was delegated to vmc
(systemd ``Delegate=yes``; systemd marks it with the ``trusted.delegate``
xattr), PARENT is ``<own cgroup>/ticrypt-vmc``; otherwise ``<mount>/ticrypt-vmc``
where vmc may create it (root).  Anything else: no cgroups, and vmc uses the
fallback in :mod:`ticrypt.vmc.processes`.

The filesystem helpers here are synchronous and quick (a few small files in
cgroupfs); the timing (grace, retries) belongs to the injected clock.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger

#: The launcher, run by path (``python -I -S``): it only needs the standard library.
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "incgroup.py")
#: Name of the parent cgroup vmc creates in ``auto`` mode.
PARENT_NAME = "ticrypt-vmc"


class CgroupUnavailable(Exception):
    """No usable cgroup v2 tree; ``str()`` says why (for the start-up line)."""


@attrs.frozen
class Launch:
    """How to spawn one command: what to pass to ``spawnProcess``."""

    executable: str
    args: list[str]
    uid: int | None = None
    gid: int | None = None
    env: dict[str, str] = attrs.field(factory=dict)


# -- finding the cgroup2 tree (sans-IO parsers) ------------------------------

def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup2_mount(mountinfo: str) -> tuple[str, str] | None:
    """(mount point, root within the hierarchy) of the first cgroup2 mount in
    the text of ``/proc/self/mountinfo``; None if there is none."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, kind = left.split(), right.split()[:1]
        if sep and kind == ["cgroup2"] and len(fields) >= 5:
            return _unescape(fields[4]), _unescape(fields[3])
    return None


def own_cgroup(proc_cgroup: str) -> str | None:
    """The cgroup v2 path in the text of ``/proc/self/cgroup`` (``0::/path``)."""
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "" and path.startswith("/"):
            return path
    return None


def delegated(path: str) -> bool:
    """Whether systemd delegated the cgroup at ``path`` (``Delegate=yes``)."""
    for name in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(path, name).strip() == b"1":
                return True
        except OSError:
            continue
    return False


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def find_parent(setting: str, proc: str = "/proc") -> str:
    """The parent cgroup directory for ``[processes] cgroup`` = ``setting``
    (``auto`` or an absolute path); raises CgroupUnavailable saying why."""
    if setting != "auto":
        if not os.path.isfile(os.path.join(setting, "cgroup.procs")):
            parent = os.path.dirname(setting.rstrip("/"))
            if not os.path.isfile(os.path.join(parent, "cgroup.procs")):
                raise CgroupUnavailable(f"{setting} is not in a cgroup v2 tree")
        return setting
    try:
        mount = cgroup2_mount(_read(os.path.join(proc, "self", "mountinfo")))
        own = own_cgroup(_read(os.path.join(proc, "self", "cgroup")))
    except OSError as e:
        raise CgroupUnavailable(f"cannot read {proc}: {e.strerror}") from None
    if mount is None:
        raise CgroupUnavailable("no cgroup2 file system is mounted")
    point, root = mount
    inside = own is not None and own != root and own.startswith(root.rstrip("/") + "/")
    if inside and own is not None:
        own_dir = os.path.join(point, os.path.relpath(own, root))
        if delegated(own_dir):
            return os.path.join(own_dir, PARENT_NAME)
    return os.path.join(point, PARENT_NAME)


def instance_name(state_dir: str) -> str:
    """This vmc's cgroup name: several vmcs (tests, several VMs on one host)
    never touch each other's processes."""
    digest = hashlib.sha256(os.path.realpath(state_dir).encode()).hexdigest()
    return f"vm-{digest[:16]}"


# -- one cgroup ------------------------------------------------------------

@attrs.frozen
class Cgroup:
    """A cgroup v2 directory.  ``use_kill`` False skips ``cgroup.kill`` (the
    freeze + SIGKILL fallback, for kernels before 5.14; tests use it too)."""

    path: str
    use_kill: bool = True

    def child(self, name: str) -> Cgroup:
        return Cgroup(os.path.join(self.path, name), self.use_kill)

    def create(self) -> Cgroup:
        """mkdir (FileExistsError if it exists); returns self."""
        os.mkdir(self.path, 0o755)
        return self

    def exists(self) -> bool:
        return os.path.isfile(os.path.join(self.path, "cgroup.procs"))

    def children(self) -> list[Cgroup]:
        try:
            names = sorted(os.listdir(self.path))
        except FileNotFoundError:
            return []
        return [self.child(n) for n in names if os.path.isdir(os.path.join(self.path, n))]

    def add(self, pid: int) -> None:
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def pids(self) -> list[int]:
        """Every process in this cgroup and its descendants (zombies are not
        members any more)."""
        found: list[int] = []
        try:
            found += [int(p) for p in _read(os.path.join(self.path, "cgroup.procs")).split()]
        except FileNotFoundError:
            return []
        for c in self.children():
            found += c.pids()
        return found

    def populated(self) -> bool:
        """Any live process in this cgroup or below (``cgroup.events``)."""
        try:
            events = _read(os.path.join(self.path, "cgroup.events"))
        except FileNotFoundError:
            return False
        return "populated 1" in events.splitlines()

    def signal(self, sig: int) -> int:
        """Send ``sig`` to every member (one pass); how many were signalled."""
        sent = 0
        for pid in self.pids():
            try:
                os.kill(pid, sig)
                sent += 1
            except OSError:
                pass  # gone meanwhile
        return sent

    def kill(self) -> None:
        """SIGKILL every member, also those forking meanwhile.

        ``cgroup.kill`` does it atomically.  Without it: freeze the cgroup
        (frozen processes cannot fork; a fatal signal still ends them), then
        SIGKILL every member; callers repeat :meth:`kill` until
        :meth:`populated` is False, for processes that forked before the
        freeze took hold.
        """
        if self.use_kill:
            try:
                with open(os.path.join(self.path, "cgroup.kill"), "w") as f:
                    f.write("1")
                return
            except FileNotFoundError:
                if not os.path.isdir(self.path):
                    return
            except OSError:
                pass
        try:
            with open(os.path.join(self.path, "cgroup.freeze"), "w") as f:
                f.write("1")
        except OSError:
            pass  # no freezer (before 5.2): SIGKILL passes alone
        self.signal(signal.SIGKILL)

    def remove(self) -> bool:
        """rmdir this cgroup and those below it, deepest first; False if a
        process is still in one (EBUSY), True once gone."""
        gone = all([c.remove() for c in self.children()])
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return gone
        except OSError as e:
            if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise
        return gone


# -- vmc's use of them -----------------------------------------------------

@attrs.define(eq=False)
class CgroupChannel:
    """The cgroups of one secure channel (created on its first command)."""

    log = Logger()

    tracker: CgroupTracker
    cgroup: Cgroup
    _created: bool = False
    _requests: dict[int, Cgroup] = attrs.field(factory=dict)
    _released: bool = False

    def command(self, rid: int, argv: list[str], *, user: str, uid: int | None,
                gid: int | None, new_session: bool) -> Launch:
        """The launcher command line that runs ``argv`` (``argv[0]``: the
        program's path) in a fresh cgroup for ``rid``; OSError if that
        cannot be created."""
        if not self._created:
            self.cgroup.create()
            self._created = True
        cg = self.cgroup.child(f"r{rid}").create()
        self._requests[rid] = cg
        args = [sys.executable, "-I", "-S", LAUNCHER, "--cgroup", cg.path]
        if new_session:
            args.append("--setsid")
        if uid is not None:
            args += ["--user", user, "--uid", str(uid), "--gid", str(gid if gid is not None
                                                                    else os.getgid())]
        return Launch(sys.executable, [*args, "--", argv[0], *argv])

    def started(self, rid: int, pid: int) -> None:
        """Nothing to do: the launcher joined the cgroup itself."""

    def reaped(self, rid: int) -> None:
        """Nothing to do: membership, not the pid, says what to kill."""

    def _target(self, rid: int | None) -> Cgroup | None:
        if rid is None:
            return self.cgroup if self._created else None
        return self._requests.get(rid)

    def signal(self, rid: int | None, sig: int) -> None:
        """``sig`` to every process of request ``rid`` (None: of the channel)."""
        cg = self._target(rid)
        if cg is None:
            return
        if sig == signal.SIGKILL:
            cg.kill()
        else:
            cg.signal(sig)

    def alive(self, rid: int | None) -> bool:
        cg = self._target(rid)
        return cg is not None and cg.populated()

    def ended(self, rid: int) -> None:
        """Request ``rid`` is over: drop its cgroup if nothing is left in it
        (else it goes with the channel's)."""
        cg = self._requests.get(rid)
        if cg is not None and not cg.populated() and cg.remove():
            del self._requests[rid]

    def release(self) -> None:
        """The channel is closed and its processes were killed: remove its
        cgroups once the kernel has finished them (retried on the clock)."""
        if self._released or not self._created:
            return
        self._released = True
        self.tracker.remove_later(self.cgroup)


@attrs.define(eq=False)
class CgroupTracker:
    """vmc's cgroup tree: ``root`` is ``PARENT/vm-<instance>``."""

    log = Logger()
    mode = "cgroup"

    root: Cgroup
    clock: Any  # IReactorTime
    retry_every: float = 0.05
    retry_for: float = 10.0
    _seq: int = 0

    @classmethod
    def open(cls, parent: str, instance: str, clock: Any) -> CgroupTracker:
        """Create (if needed) and check ``parent/instance``; CgroupUnavailable
        if vmc cannot use it."""
        if not sys.executable:
            raise CgroupUnavailable("no Python interpreter path to run the launcher with")
        root = Cgroup(os.path.join(parent, instance))
        try:
            os.makedirs(root.path, mode=0o755, exist_ok=True)
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {root.path}: {e.strerror}") from None
        if not root.exists():
            raise CgroupUnavailable(f"{root.path} is not a cgroup v2 directory")
        if not os.access(os.path.join(root.path, "cgroup.procs"), os.W_OK):
            raise CgroupUnavailable(f"{root.path}/cgroup.procs is not writable")
        use_kill = os.path.exists(os.path.join(root.path, "cgroup.kill"))
        return cls(Cgroup(root.path, use_kill), clock)

    def describe(self) -> str:
        how = "cgroup.kill" if self.root.use_kill else "freeze + SIGKILL"
        return f"cgroup v2 under {self.root.path} (killed with {how})"

    def channel(self) -> CgroupChannel:
        self._seq += 1
        return CgroupChannel(self, self.root.child(f"c{os.getpid()}-{self._seq}"))

    def clean_leftovers(self) -> list[tuple[str, int]]:
        """Kill what a previous run left (every cgroup under ``root``):
        (name, processes killed) per cgroup.  They are removed once empty."""
        found = []
        for cg in self.root.children():
            pids = cg.pids()
            cg.kill()
            found.append((os.path.basename(cg.path), len(pids)))
            self.remove_later(cg)
        return found

    def shutdown(self) -> defer.Deferred[None]:
        """vmc stops: kill whatever is still in the tree and remove it (and
        this vmc's own directory); fires once removed, or given up."""
        for cg in self.root.children():
            cg.kill()
        d: defer.Deferred[None] = defer.Deferred()
        self.remove_later(self.root, lambda removed: d.callback(None))
        return d

    def remove_later(self, cg: Cgroup, on_done: Callable[[bool], None] | None = None) -> None:
        """Remove ``cg`` now or, while processes are still dying, retry
        (SIGKILL again each time: see :meth:`Cgroup.kill`) for ``retry_for``."""
        tries = max(1, int(self.retry_for / self.retry_every))

        def attempt(left: int) -> None:
            try:
                done = cg.remove()
            except OSError as e:
                self.log.warn("cannot remove cgroup {path}: {why}", path=cg.path,
                              why=e.strerror)
                done = False
                left = 0
            if not done and left > 0:
                cg.kill()
                self.clock.callLater(self.retry_every, attempt, left - 1)
                return
            if not done:
                self.log.warn("cgroup {path} still has processes; it is killed again "
                              "at the next start", path=cg.path)
            if on_done is not None:
                on_done(done)

        attempt(tries)
