"""Kernel-tracked groups for vmc's user processes (ticrypt.vmc.cgroup, the
fallback in ticrypt.vmc.processes) and the user's side of a cancel.

The cgroup tests run against the real cgroup2 file system where this
process may create cgroups (root, cgroup2 mounted); elsewhere they are
skipped with the reason.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from test.daemon import kill_if_alive, pid_alive, pid_gone
from ticrypt.frontend.session import Command, SessionError
from ticrypt.vmc import cgroup
from ticrypt.vmc.cgroup import (
    LAUNCHER,
    Cgroup,
    CgroupTracker,
    CgroupUnavailable,
    cgroup2_mount,
    find_parent,
    own_cgroup,
)
from ticrypt.vmc.incgroup import parse
from ticrypt.vmc.processes import ProcessGroup, RunAs, SessionTracker, proc_info

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
PURE = "36 25 0:31 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def _end(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


def _deferred_later(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def wait_unpopulated(cg: Cgroup, timeout: float = 10.0) -> bool:
    """Block until ``cg`` has no live process: the kernel wakes poll(2) on
    ``cgroup.events`` when ``populated`` changes (no sleeping)."""
    deadline = time.monotonic() + timeout
    path = os.path.join(cg.path, "cgroup.events")
    with open(path, "rb", buffering=0) as f:
        poller = select.poll()
        poller.register(f, select.POLLPRI | select.POLLERR)
        while True:
            f.seek(0)
            if b"populated 0" in f.read():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)


def real_tracker(testcase: SynchronousTestCase, clock: Any = None) -> CgroupTracker:
    """A CgroupTracker in a fresh directory of the real tree (removed in
    cleanup), or SkipTest with the reason."""
    try:
        parent = find_parent("auto")
        tracker = CgroupTracker.open(parent, f"test-{uuid.uuid4().hex[:12]}",
                                     clock if clock is not None else reactor)
    except CgroupUnavailable as e:
        raise SkipTest(f"no writable cgroup v2 tree here: {e}") from None

    def cleanup() -> None:
        for cg in tracker.root.children():
            cg.kill()
            wait_unpopulated(cg)
        tracker.root.remove()

    testcase.addCleanup(cleanup)
    return tracker


class FindTreeTests(SynchronousTestCase):
    """Sans-IO: where the cgroup2 tree is and which parent vmc uses."""

    def test_mountinfo(self) -> None:
        self.assertEqual(cgroup2_mount(HYBRID), ("/sys/fs/cgroup/unified", "/"))
        self.assertEqual(cgroup2_mount(PURE), ("/sys/fs/cgroup", "/"))
        self.assertIsNone(cgroup2_mount(HYBRID.splitlines()[0] + "\n"))
        escaped = "41 31 0:38 /a\\040b /mnt/c\\040g rw - cgroup2 cgroup2 rw\n"
        self.assertEqual(cgroup2_mount(escaped), ("/mnt/c g", "/a b"))

    def test_own_cgroup(self) -> None:
        self.assertEqual(own_cgroup("4:memory:/x\n1:name=systemd:/\n0::/system.slice/v.service\n"),
                         "/system.slice/v.service")
        self.assertIsNone(own_cgroup("4:memory:/x\n"))

    def fake_proc(self, mountinfo: str, own: str) -> str:
        proc = self.mktemp()
        os.makedirs(os.path.join(proc, "self"))
        for name, text in (("mountinfo", mountinfo), ("cgroup", own)):
            with open(os.path.join(proc, "self", name), "w") as f:
                f.write(text)
        return proc

    def test_auto_parent(self) -> None:
        proc = self.fake_proc(PURE, "0::/system.slice/ticrypt-vmc.service\n")
        self.patch(cgroup, "delegated", lambda path: False)
        self.assertEqual(find_parent("auto", proc), "/sys/fs/cgroup/ticrypt-vmc")
        seen: list[str] = []

        def delegated(path: str) -> bool:
            seen.append(path)
            return True

        self.patch(cgroup, "delegated", delegated)
        self.assertEqual(find_parent("auto", proc),
                         "/sys/fs/cgroup/system.slice/ticrypt-vmc.service/ticrypt-vmc")
        self.assertEqual(seen, ["/sys/fs/cgroup/system.slice/ticrypt-vmc.service"])
        # vmc in the root cgroup (a container's, or no systemd): its own parent
        proc = self.fake_proc(HYBRID, "0::/\n")
        self.assertEqual(find_parent("auto", proc), "/sys/fs/cgroup/unified/ticrypt-vmc")

    def test_no_cgroup2(self) -> None:
        proc = self.fake_proc(HYBRID.splitlines()[1] + "\n", "1:cpu:/\n")
        e = self.assertRaises(CgroupUnavailable, find_parent, "auto", proc)
        self.assertIn("no cgroup2", str(e))
        e = self.assertRaises(CgroupUnavailable, find_parent, self.mktemp())
        self.assertIn("not in a cgroup v2 tree", str(e))

    def test_launcher_arguments(self) -> None:
        self.assertEqual(parse(["--cgroup", "/c", "--setsid", "--", "/bin/x", "x", "-y"]),
                         ({"cgroup": "/c", "setsid": "1"}, ["/bin/x", "x", "-y"]))
        for bad in (["--cgroup"], ["--bogus", "--", "/x", "x"], ["--", "/x"], ["/x", "x"]):
            self.assertRaises(ValueError, parse, bad)


class CgroupTests(SynchronousTestCase):
    """The helper against the real cgroup2 file system: create, add, kill,
    remove (cgroup.kill, and the freeze + SIGKILL fallback)."""

    def sleeper(self, *argv: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv or ("sleep", "1000"), stdin=subprocess.DEVNULL)
        self.addCleanup(_end, p)
        return p

    def check_kill(self, use_kill: bool) -> None:
        tracker = real_tracker(self)
        channel = Cgroup(tracker.root.child("c1").path, use_kill).create()
        first = channel.child("r1").create()
        second = channel.child("r2").create()
        self.assertTrue(first.exists())
        self.assertFalse(channel.populated())
        p = self.sleeper()
        first.add(p.pid)
        self.assertEqual(channel.pids(), [p.pid])
        self.assertTrue(channel.populated())
        # one that forks, and whose child leaves the session (it joined its
        # cgroup before exec, through the launcher, so its children are in it)
        q = subprocess.Popen([sys.executable, "-I", "-S", LAUNCHER, "--cgroup", second.path,
                              "--", "/bin/sh", "sh", "-c",
                              "setsid sleep 1000 & echo ready; exec sleep 1001"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        self.addCleanup(_end, q)
        assert q.stdout is not None
        self.addCleanup(q.stdout.close)
        self.assertEqual(q.stdout.readline(), b"ready\n")
        self.assertEqual(len(second.pids()), 2)
        self.assertFalse(first.remove())  # EBUSY while a process is in it
        channel.kill()
        while not wait_unpopulated(channel, 2.0):  # the freeze fallback may need more passes
            channel.kill()
        self.assertEqual(p.wait(timeout=10), -signal.SIGKILL)
        self.assertEqual(q.wait(timeout=10), -signal.SIGKILL)
        self.assertEqual(channel.pids(), [])
        self.assertTrue(channel.remove())
        self.assertFalse(os.path.exists(channel.path))
        self.assertTrue(channel.remove())  # already gone: fine

    def test_create_add_kill_remove(self) -> None:
        self.check_kill(use_kill=True)

    def test_freeze_and_sigkill_without_cgroup_kill(self) -> None:
        self.check_kill(use_kill=False)

    def test_descendants_are_members(self) -> None:
        tracker = real_tracker(self)
        cg = tracker.root.child("c2").create()
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        p = subprocess.Popen(
            [sys.executable, "-I", "-S", LAUNCHER, "--cgroup", cg.path, "--", "/bin/sh", "sh",
             "-c", "setsid sh -c 'echo $$; exec sleep 1000' & echo $$; exec sleep 1000"],
            stdout=w, stdin=subprocess.DEVNULL)
        os.close(w)
        self.addCleanup(_end, p)
        with os.fdopen(os.dup(r), "rb") as out:
            pids = {int(out.readline()), int(out.readline())}
        for pid in pids:
            self.addCleanup(kill_if_alive, pid)
        self.assertEqual(set(cg.pids()), pids)  # the setsid one too
        cg.kill()
        self.assertTrue(wait_unpopulated(cg))
        self.assertFalse(any(pid_alive(pid) for pid in pids))

    def test_launcher_joins_before_exec(self) -> None:
        tracker = real_tracker(self)
        cg = tracker.root.child("c3").create()
        out = subprocess.run([sys.executable, "-I", "-S", LAUNCHER, "--cgroup", cg.path,
                              "--setsid", "--", "/bin/cat", "cat", "/proc/self/cgroup"],
                             capture_output=True, check=True).stdout.decode()
        path = own_cgroup(out)
        assert path is not None
        self.assertTrue(cg.path.endswith(path), (cg.path, path))

    def test_launcher_does_not_run_outside_its_cgroup(self) -> None:
        marker = os.path.abspath(self.mktemp())
        result = subprocess.run([sys.executable, "-I", "-S", LAUNCHER, "--cgroup",
                                 "/nonexistent-cgroup", "--", "/bin/touch", "touch", marker],
                                capture_output=True)
        self.assertEqual(result.returncode, 126)
        self.assertIn(b"cannot join its cgroup", result.stderr)
        self.assertFalse(os.path.exists(marker))

    def test_leftovers_of_a_previous_run_are_killed(self) -> None:
        """The first start after a crash: every cgroup under this vmc's
        directory is a previous run's; it is killed and removed."""
        clock = task.Clock()
        tracker = real_tracker(self, clock)
        old = tracker.root.child("c999-1").create().child("r1").create()
        p = self.sleeper()
        old.add(p.pid)
        again = CgroupTracker(tracker.root, clock)  # the next start
        found = again.clean_leftovers()
        self.assertEqual(found, [("c999-1", 1)])
        self.assertEqual(p.wait(timeout=10), -signal.SIGKILL)
        for _ in range(200):  # removal retries on the clock until the kernel is done
            if not os.path.exists(os.path.dirname(old.path)):
                break
            wait_unpopulated(Cgroup(os.path.dirname(old.path)), 0.1)
            clock.advance(again.retry_every)
        self.assertFalse(os.path.exists(os.path.dirname(old.path)))


class _GroupMixin:
    """A real ProcessGroup (real processes) with some ``track``."""

    def group(self, testcase: TestCase, track: Any, grace: float = 0.5) -> ProcessGroup:
        self.sent: list[tuple[dict[str, Any], bytes]] = []
        self.exits: dict[int, defer.Deferred[int]] = {}
        self.finished: list[int] = []

        def send(header: dict[str, Any], body: bytes) -> None:
            self.sent.append((header, body))
            if header["t"] in ("exit", "error"):
                self.exits.setdefault(header["id"], defer.Deferred()).callback(
                    header.get("status", -1))

        group = ProcessGroup(reactor, RunAs.lookup(None, "/bin/sh"), send,
                             self.finished.append, lambda rid, n: None, kill_grace=grace,
                             track=track)
        testcase.addCleanup(group.stop_timers)
        testcase.addCleanup(group.when_empty)
        testcase.addCleanup(group.close)
        return group

    def out(self, rid: int) -> bytes:
        return b"".join(b for h, b in self.sent if h["t"] == "stdout" and h["id"] == rid)

    async def pid_from(self, testcase: TestCase, rid: int, tag: bytes) -> tuple[int, int]:
        """(pid, start time) printed by request ``rid`` as ``TAG=<pid>``."""
        for _ in range(400):  # bounded: 20 s
            out = self.out(rid)
            if tag + b"=" in out and out.split(tag + b"=")[1].split(b"\n")[0].strip().isdigit():
                break
            await _deferred_later(0.05)
        pid = int(self.out(rid).split(tag + b"=")[1].split(b"\n")[0])
        testcase.addCleanup(kill_if_alive, pid)
        info = proc_info(pid)
        assert info is not None, f"{tag!r} {pid} is not running"
        return pid, info.start

    def exit(self, rid: int) -> defer.Deferred[int]:
        return self.exits.setdefault(rid, defer.Deferred())


#: An exec whose grandchild leaves the session (setsid) and its parent
#: (the subshell ends at once: a double fork), keeping stdout open.
ESCAPE = ("sh", "-c", "(setsid sh -c 'echo ESC=$$; exec sleep 1000' &); "
          "echo started; exec sleep 300")


class CgroupGroupTests(_GroupMixin, TestCase):
    """ProcessGroup with a cgroup per channel, real processes."""

    timeout = 60

    async def test_setsid_escape_killed_on_cancel(self) -> None:
        tracker = real_tracker(self)
        group = self.group(self, tracker.channel())
        group.start_exec(1, ESCAPE)
        pid, start = await self.pid_from(self, 1, b"ESC")
        self.assertNotEqual(os.getsid(pid), group._children[1][0].pid)  # left the session
        group.cancel(1)
        self.assertEqual(await self.exit(1).addTimeout(20, reactor), 128 + signal.SIGTERM)
        self.assertTrue(await pid_gone(pid, start=start), "the setsid'd process survived cancel")

    async def test_close_kills_what_ended_requests_left_and_removes_cgroups(self) -> None:
        tracker = real_tracker(self)
        track = tracker.channel()
        group = self.group(self, track)
        group.start_exec(2, ("sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 & echo BG=$!"))
        self.assertEqual(await self.exit(2).addTimeout(20, reactor), 0)
        pid, start = await self.pid_from(self, 2, b"BG")
        self.assertTrue(pid_alive(pid))  # outlives its request ...
        self.assertTrue(track.cgroup.exists())
        group.close()
        await group.when_empty().addTimeout(20, reactor)
        self.assertTrue(await pid_gone(pid, start=start), "a leftover survived channel close")
        for _ in range(200):  # ... not its channel; the cgroups go too (bounded)
            if not os.path.exists(track.cgroup.path):
                break
            await _deferred_later(0.05)
        self.assertFalse(os.path.exists(track.cgroup.path))

    async def test_shell_and_other_user_in_the_cgroup(self) -> None:
        import pwd

        tracker = real_tracker(self)
        track = tracker.channel()
        group = self.group(self, track)
        run_as = RunAs.lookup(None, "/bin/sh")
        if os.getuid() == 0:
            try:
                run_as = RunAs.lookup("nobody", "/bin/sh")
            except KeyError:
                pass
        group.run_as = run_as
        group.start_shell(3, "xterm", 24, 80)
        group.write_stdin(3, b"id -u; cat /proc/self/cgroup; tty; exit 4\n")
        self.assertEqual(await self.exit(3).addTimeout(20, reactor), 4)
        out = self.out(3)
        self.assertIn(f"{pwd.getpwnam(run_as.user).pw_uid}\r\n".encode(), out)
        self.assertIn(f"/{os.path.basename(track.cgroup.path)}/r3\r\n".encode(), out)
        self.assertIn(b"/dev/pts/", out)  # the PTY is still its terminal


class FallbackGroupTests(_GroupMixin, TestCase):
    """Without cgroups: sessions, process groups and descendants."""

    timeout = 60

    async def test_setsid_descendant_killed_on_cancel(self) -> None:
        """Leaving the session no longer escapes while the parent lives:
        the process tree below the child is found by parent pid."""
        from ticrypt.vmc.processes import SessionChannel

        group = self.group(self, SessionChannel())
        group.start_exec(1, ("sh", "-c", "setsid sh -c 'echo ESC=$$; exec sleep 1000' & "
                             "echo started; wait"))
        pid, start = await self.pid_from(self, 1, b"ESC")
        group.cancel(1)
        self.assertEqual(await self.exit(1).addTimeout(20, reactor), 128 + signal.SIGTERM)
        self.assertTrue(await pid_gone(pid, start=start), "the setsid'd process survived cancel")

    async def test_request_ends_after_grace_while_an_escapee_holds_the_pipe(self) -> None:
        """An orphan that left the session (found by nothing in a bare
        group) holds stdout: the cancelled request still ends after the
        grace, with the child's status."""
        from ticrypt.vmc.processes import SessionChannel

        group = self.group(self, SessionChannel(), grace=0.3)
        group.start_exec(1, ESCAPE)
        pid, start = await self.pid_from(self, 1, b"ESC")
        self.addCleanup(kill_if_alive, pid)
        group.cancel(1)
        self.assertEqual(await self.exit(1).addTimeout(20, reactor), 128 + signal.SIGTERM)
        self.assertEqual(self.finished, [1])

    def test_state_file_kills_leftovers_at_next_start(self) -> None:
        import json

        state = os.path.abspath(self.mktemp())
        os.makedirs(state)
        clock = task.Clock()
        p = subprocess.Popen(["setsid", "sh", "-c", "sleep 1000 & echo ready; exec sleep 1000"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        self.addCleanup(_end, p)
        assert p.stdout is not None
        self.addCleanup(p.stdout.close)
        self.assertEqual(p.stdout.readline(), b"ready\n")  # its session has two now
        other = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
        self.addCleanup(_end, other)
        first = SessionTracker(os.path.join(state, "processes.json"), clock, "test")
        first.record(p.pid, "c1-1")
        first.record(other.pid, "c1-2")
        # "other" ended and its pid was reused meanwhile: its start time differs
        with open(first.state_path) as f:
            doc = json.load(f)
        for entry in doc["processes"]:
            if entry["pid"] == other.pid:
                entry["start"] -= 1
        with open(first.state_path, "w") as f:
            json.dump(doc, f)
        found = SessionTracker(first.state_path, clock, "test").clean_leftovers()
        self.assertEqual(found, [(f"pid {p.pid}", 2)])  # p and its session's sleep
        self.assertEqual(p.wait(timeout=10), -signal.SIGKILL)
        self.assertIsNone(other.poll())  # not ours any more: left alone
        self.assertEqual(SessionTracker(first.state_path, clock, "t").clean_leftovers(), [])


class _FakeSession:
    def __init__(self, clock: Any):
        self._clock = clock
        self.sent: list[dict[str, Any]] = []
        self._requests: dict[int, Any] = {}

    def _send(self, header: dict[str, Any], body: bytes = b"") -> None:
        self.sent.append(header)


class CancelWaitTests(SynchronousTestCase):
    """The user's side: a cancelled command ends even if the VM never
    reports its end (an escaped process holds its output, an old vmc)."""

    def command(self) -> tuple[Command, _FakeSession, task.Clock]:
        clock = task.Clock()
        session = _FakeSession(clock)
        cmd = Command(session, 1, "exec", None, None)  # type: ignore[arg-type]
        session._requests[1] = cmd
        return cmd, session, clock

    def test_gives_up_after_the_wait(self) -> None:
        cmd, session, clock = self.command()
        cmd.cancel(wait=5)
        self.assertEqual(session.sent, [{"t": "cancel", "id": 1}])
        clock.advance(4.9)
        self.assertNoResult(cmd.done)
        clock.advance(0.2)
        err = self.failureResultOf(cmd.done, SessionError).value
        self.assertEqual(err.code, "cancelled")
        self.assertIn("within 5s", str(err))
        self.assertEqual(session._requests, {})  # a late exit is ignored

    def test_second_cancel_stops_waiting(self) -> None:
        cmd, session, clock = self.command()
        cmd.cancel()
        cmd.cancel()
        self.assertEqual(self.failureResultOf(cmd.done, SessionError).value.code, "cancelled")
        self.assertEqual(session.sent, [{"t": "cancel", "id": 1}])  # sent once
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_exit_in_time_wins(self) -> None:
        cmd, session, clock = self.command()
        cmd.cancel()
        cmd._deliver({"t": "exit", "id": 1, "status": 143}, b"")
        self.assertEqual(self.successResultOf(cmd.done), 143)
        self.assertEqual(clock.getDelayedCalls(), [])


class ModeTests(SynchronousTestCase):
    """Which mode ``[processes] cgroup`` gives, and the line that names it."""

    def setUp(self) -> None:
        from ticrypt.vmc import processes

        # Never make the test process a subreaper.
        self.patch(processes, "set_child_subreaper", lambda: False)
        self.state = os.path.abspath(self.mktemp())
        os.makedirs(self.state)

    def test_off(self) -> None:
        from ticrypt.vmc.processes import open_tracker

        tracker = open_tracker("off", self.state, task.Clock())
        self.assertIsInstance(tracker, SessionTracker)
        self.assertTrue(tracker.describe().startswith("fallback ([processes] cgroup = off)"))
        self.assertIn("processes.json", tracker.describe())

    def test_auto_falls_back_saying_why(self) -> None:
        from ticrypt.vmc import processes

        def unavailable(setting: str) -> str:
            raise CgroupUnavailable("no cgroup2 file system is mounted")

        self.patch(processes, "find_parent", unavailable)
        tracker = processes.open_tracker("auto", self.state, task.Clock())
        self.assertIn("fallback (no cgroup2 file system is mounted)", tracker.describe())

    def test_explicit_path_that_cannot_be_used_stops_start_up(self) -> None:
        from ticrypt.vmc.processes import open_tracker

        e = self.assertRaises(CgroupUnavailable, open_tracker, self.mktemp(), self.state,
                              task.Clock())
        self.assertIn("not in a cgroup v2 tree", str(e))

    def test_auto_uses_cgroups_where_it_can(self) -> None:
        from ticrypt.vmc.processes import open_tracker

        real_tracker(self)  # skips where there is no writable tree
        tracker = open_tracker("auto", self.state, task.Clock())
        assert isinstance(tracker, CgroupTracker)
        self.addCleanup(tracker.root.remove)
        self.assertTrue(tracker.describe().startswith("cgroup v2 under "))
