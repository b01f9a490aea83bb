"""End to end: real ticrypt-proxy and ticrypt-vmc daemons on 127.0.0.1
(twistd, TLS, websockets) and rest run in the test's process (the daemon's
own service from the same rest.ini, HTTPS on 127.0.0.1), the session
library and the CLI."""

from __future__ import annotations

import json
import os
import re
import termios
from collections.abc import Coroutine
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ProcessDone
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from test.daemon import daemon_env, kill_if_alive, pid_alive, pid_gone, script_path, spawn_daemon
from test.vmcfixture import Trio, deferred_later, start_trio
from ticrypt import identity
from ticrypt.channel import app
from ticrypt.frontend.session import ChannelSession, RemoteError, SessionError
from ticrypt.vmc.processes import proc_info, set_window


class _PtyClient(protocol.ProcessProtocol):
    """The CLI on a pseudo-terminal: collects output, reports the exit code."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.waiting: list[defer.Deferred[None]] = []
        self.ended: defer.Deferred[int] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)

    def next_output(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append(d)
        return d

    def processEnded(self, reason: Failure) -> None:
        code = 0 if isinstance(reason.value, ProcessDone) else reason.value.exitCode
        for d in self.waiting:
            d.errback(AssertionError(f"CLI ended early: {bytes(self.output)!r}"))
        self.ended.callback(code if code is not None else -1)


async def together(*runs: Coroutine[Any, Any, tuple[int, str, str]]
                   ) -> list[tuple[int, str, str]]:
    """Independent CLI runs at once; their results in order."""
    return list(await defer.gatherResults([defer.ensureDeferred(r) for r in runs],
                                          consumeErrors=True))


async def run(session: ChannelSession, argv: list[str], stdin: bytes | None = b""
              ) -> tuple[int, bytes, bytes]:
    out, err = bytearray(), bytearray()
    cmd = session.exec(argv, stdin=stdin, on_stdout=out.extend, on_stderr=err.extend)
    status = await cmd.done
    return status, bytes(out), bytes(err)


async def eventually_exec(trio: Trio, user: str, attempts: int = 60) -> tuple[int, bytes]:
    """Open a session and run ``echo back`` until it works (after a restart);
    bounded by ``attempts`` tries 0.25s apart."""
    last: Exception | None = None
    for _ in range(attempts):
        try:
            session = await trio.session(user)
        except SessionError as e:
            last = e
            await deferred_later(0.25)
            continue
        status, out, _ = await run(session, ["echo", "back"])
        await session.close()
        return status, out
    raise AssertionError(f"exec never worked again: {last}")



class ExecTests(TestCase):
    """What a user runs on the VM, checked on one trio (each check opens its
    own session; none disturbs another); restarts of vmc and the proxy on
    another."""

    timeout = 120

    async def test_exec_cancel_window_children_and_shell(self) -> None:
        trio = await start_trio(self)
        await self._round_trip(trio)
        await self._cancel(trio)
        await self._stdin_window_keeps_the_channel_usable(trio)
        await self._children_killed_when_channel_closes(trio)
        await self._shell_pty(trio)
        await self._refused_resize_keeps_the_shell(trio)

    async def _round_trip(self, trio: Trio) -> None:
        assert trio.vmc is not None and trio.vmc.ready_info is not None
        self.assertEqual(trio.vmc.ready_info["vm_id"], trio.vm_id)
        s = await trio.session("owen")
        self.assertEqual(await run(s, ["echo", "hello", "world"]), (0, b"hello world\n", b""))
        self.assertEqual(await run(s, ["sh", "-c", "echo oops >&2; exit 7"]),
                         (7, b"", b"oops\n"))
        self.assertEqual(await run(s, ["cat"], stdin=b"through stdin\n" * 1000),
                         (0, b"through stdin\n" * 1000, b""))
        self.assertEqual(await run(s, ["sh", "-c", "kill -9 $$"]), (137, b"", b""))
        with self.assertRaises(RemoteError) as e:
            await run(s, ["no-such-command-zz"])
        self.assertEqual(e.exception.code, "command-not-found")
        info = await s.info()
        self.assertEqual(info["vm"], trio.vm_id)
        self.assertEqual(info["owner"], "owen")
        await s.close()
        lines = trio.vmc_audit_lines()
        self.assertIn(("enroll", "ok"), [(r["event"], r.get("result")) for r in lines])
        self.assertIn("session-open", [r["event"] for r in lines])

    async def _cancel(self, trio: Trio) -> None:
        s = await trio.session("owen")
        out = bytearray()
        cmd = s.exec(["sh", "-c", "echo started; sleep 300"], on_stdout=out.extend)
        while b"started" not in out:
            await deferred_later(0.05)
        cmd.cancel()
        self.assertEqual(await cmd.done, 128 + 15, "a cancelled command ends with SIGTERM")
        await s.close()

    async def _stdin_window_keeps_the_channel_usable(self, trio: Trio) -> None:
        """A command that never reads its stdin is offered far more than its
        window: only that command's input waits.  The same channel still
        answers, runs a second command and cancels the stalled one (vmc
        never stops reading the channel for it)."""
        s = await trio.session("owen")
        out = bytearray()
        cmd = s.exec(["sh", "-c", "echo started; exec sleep 300"], on_stdout=out.extend)
        cmd.write(b"x" * (4 * app.WINDOW))
        for _ in range(400):  # bounded: 20 s
            # the VM took the first window and gave credit back as the pipe
            # filled; the rest is held by the frontend, not by vmc
            if cmd.sent > app.WINDOW and b"started" in out:
                break
            await deferred_later(0.05)
        self.assertGreater(cmd.sent, app.WINDOW)
        self.assertGreater(cmd.pending, 0)
        self.assertEqual(cmd.sent + cmd.pending, 4 * app.WINDOW)
        info = await defer.ensureDeferred(s.info()).addTimeout(30, reactor)
        self.assertEqual(info["vm"], trio.vm_id)
        second = defer.ensureDeferred(run(s, ["sh", "-c", "head -c 5; echo ' second'"],
                                          stdin=b"hello"))
        self.assertEqual(await second.addTimeout(30, reactor), (0, b"hello second\n", b""))
        self.assertGreater(cmd.pending, 0)  # still stalled: it never read
        cmd.cancel()
        self.assertEqual(await cmd.done.addTimeout(30, reactor), 128 + 15)
        await s.close()

    async def _children_killed_when_channel_closes(self, trio: Trio) -> None:
        s = await trio.session("owen")
        out = bytearray()
        cmd = s.exec(["sh", "-c", "sleep 300 & echo $!; wait"], on_stdout=out.extend)
        cmd.done.addErrback(lambda f: f.trap(SessionError))  # ends with the channel
        while b"\n" not in out:
            await deferred_later(0.05)
        pid = int(out.split()[0])
        self.assertTrue(pid_alive(pid))
        await s.close()
        for _ in range(200):  # bounded: 10 s
            if not pid_alive(pid):
                break
            await deferred_later(0.05)
        self.assertFalse(pid_alive(pid), "the background child survived the channel")

    async def _shell_pty(self, trio: Trio) -> None:
        s = await trio.session("owen")
        out = bytearray()
        cmd = s.shell("xterm", 24, 80, on_output=out.extend)
        await cmd.started
        cmd.write(b"echo h''i; exit 3\n")
        self.assertEqual(await cmd.done, 3, "the shell's exit status")
        self.assertIn(b"hi\r\n", bytes(out))  # the PTY turns \n into \r\n
        await s.close()

    async def _refused_resize_keeps_the_shell(self, trio: Trio) -> None:
        """vmc refuses a 0x0 resize with an error carrying the shell's id;
        the shell keeps running (PROTOCOL.md §5 Errors)."""
        s = await trio.session("owen")
        out, warnings = bytearray(), list[RemoteError]()
        cmd = s.shell("xterm", 24, 80, on_output=out.extend, on_warning=warnings.append)
        await cmd.started
        cmd.resize(0, 0)
        cmd.write(b"stty size; exit 4\n")
        self.assertEqual(await cmd.done, 4, "the shell ended after a refused resize")
        self.assertIn(b"24 80", bytes(out))
        self.assertEqual([w.code for w in warnings], ["bad-request"])
        await s.close()

    async def test_vmc_restart_and_proxy_restart(self) -> None:
        """vmc started while rest is down retries its enrollment until rest
        answers; started again it does not enroll again (its token file is
        gone anyway); a proxy killed with SIGKILL refuses sessions until it
        is started again on its port, then the VM is reachable again."""
        trio = await start_trio(self, enroll=False)
        await trio.stop_rest()
        trio.vmc = spawn_daemon(self, "ticrypt-vmc", trio.vmc_config)
        for _ in range(400):  # bounded: 20 s
            if any(r["event"] == "enroll" for r in trio.vmc_audit_lines()):
                break
            await deferred_later(0.05)
        self.assertEqual([(r.get("result"), r.get("reason")) for r in trio.vmc_audit_lines()
                          if r["event"] == "enroll"][:1],
                         [("failed", "unreachable")], "vmc's first enrollment attempt")
        self.assertFalse(trio.vmc.ready.called, "vmc ready without an enrollment")
        await trio.start_rest(self)
        await trio.vmc.ready
        await trio.vmc.stop()
        os.unlink(trio.vmc_token_file)  # single use anyway
        await trio.start_vmc(self)
        status, out = await eventually_exec(trio, "owen")
        self.assertEqual((status, out), (0, b"back\n"), "after vmc's restart")
        enrolls = [r for r in trio.vmc_audit_lines()
                   if r["event"] == "enroll" and r.get("result") == "ok"]
        self.assertEqual(len(enrolls), 1, "vmc enrolled again at its second start")

        await trio.kill_proxy()
        with self.assertRaises(SessionError):
            await trio.session("owen")
        await trio.restart_proxy(self)
        status, out = await eventually_exec(trio, "owen")
        self.assertEqual((status, out), (0, b"back\n"), "after the proxy's restart")


class StopTests(TestCase):
    """Nothing a user started survives its channel or vmc's stop (SIGTERM
    to twistd), even what ignores SIGTERM: vmc waits kill_grace and sends
    SIGKILL before its reactor stops.  One trio: a channel closed first,
    then vmc stopped under two live sessions."""

    timeout = 120

    async def test_channel_close_and_vmc_stop_kill_what_users_started(self) -> None:
        trio = await start_trio(self, exec_kill_grace="1s")
        assert trio.vmc is not None
        # a shell's job control group, ended with its channel
        s, pid = await self._shell_job(trio)
        await s.close()
        await self._gone(pid, "after its channel closed")

        # an exec'd child that ignores SIGTERM, and a shell's job: vmc stops
        s = await trio.session("owen")
        out = bytearray()
        cmd = s.exec(["sh", "-c", "trap '' TERM; sleep 300 & echo $!; wait"],
                     on_stdout=out.extend)
        codes: list[str] = []
        cmd.done.addErrback(lambda f: codes.append(f.trap(SessionError) and f.value.code))
        while b"\n" not in out:
            await deferred_later(0.05)
        child = int(out.split()[0])
        self.addCleanup(kill_if_alive, child)  # only if the test failed
        self.assertTrue(pid_alive(child))
        _, job = await self._shell_job(trio)
        await trio.vmc.stop()
        self.assertIn("Server Shut Down", trio.vmc.text())  # stopped, not SIGKILLed
        for _ in range(40):  # bounded: 2 s (the SIGKILL was sent before vmc exited)
            if not pid_alive(child):
                break
            await deferred_later(0.05)
        self.assertFalse(pid_alive(child), "a child that ignores SIGTERM survived vmc's stop")
        await self._gone(job, "after vmc's stop")
        closed = [r for r in trio.vmc_audit_lines() if r["event"] == "session-closed"]
        # clean closes, audited: the first channel's, then the two vmc's stop ended
        self.assertEqual([r["code"] for r in closed], [1000] * 3)
        await s.closed
        self.assertEqual(codes, ["closed"])  # the user's command ended with the session

    async def _shell_job(self, trio: Trio) -> tuple[ChannelSession, int]:
        """A shell on the VM that started a job in a process group of its own
        (job control) that ignores SIGTERM; the job's pid."""
        s = await trio.session("owen")
        out = bytearray()
        cmd = s.shell("xterm", 24, 80, on_output=out.extend)
        await cmd.started
        cmd.done.addErrback(lambda f: f.trap(SessionError))  # ends with the channel
        cmd.write(b"set -m; (trap '' TERM; sleep 1000) & echo PID=$!\n")
        for _ in range(400):  # bounded: 20 s
            if re.search(rb"PID=\d+", out):
                break
            await deferred_later(0.05)
        pid = int(re.findall(rb"PID=(\d+)", out)[0])
        self.addCleanup(kill_if_alive, pid)  # only if the test failed
        self.assertTrue(pid_alive(pid))
        self.assertNotEqual(os.getpgid(pid), os.getsid(pid))  # not in the shell's group
        return s, pid

    async def _gone(self, pid: int, when: str) -> None:
        if not await pid_gone(pid):
            self.fail(f"process {pid} of the shell's session survived {when}")


class EnrollmentPinTests(TestCase):
    """The owner pin across a re-enrollment (a process that must exit 1).
    Authorization, revocation and the VM key check run in memory:
    test_trio.AuthorizationTests."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.trio = await start_trio(self)

    async def test_owner_key_change_refused(self) -> None:
        """A re-enrollment that reports another owner is refused; the pin holds."""
        trio = self.trio
        assert trio.vmc is not None
        await trio.vmc.stop()
        # The backend (say, compromised) hands this VM to bob with a new token.
        os.unlink(os.path.join(trio.vmc_state, "enrollment.json"))
        _, token = await trio.add_vm("bob", name="vm2")
        config = trio.write_vmc_config(token)
        proc = await _start_expect_exit(self, config)
        self.assertIn("owner-key-change-refused", proc)
        refused = [r for r in trio.vmc_audit_lines()
                   if r["event"] == "owner-key-change-refused"]
        self.assertEqual(len(refused), 1)
        self.assertEqual(refused[0]["pinned"],
                         identity.fingerprint(identity.public_bytes(trio.keys["owen"])))
        with open(os.path.join(trio.vmc_state, "owner.pub")) as f:
            self.assertEqual(identity.parse_public(f.read()),
                             identity.public_bytes(trio.keys["owen"]))


async def _start_expect_exit(testcase: TestCase, config: str) -> str:
    from test.daemon import spawn_daemon

    proc = spawn_daemon(testcase, "ticrypt-vmc", config)
    proc.ready.addErrback(lambda f: None)
    code = await proc.ended
    if proc.ready.called and proc.ready_info is not None:
        raise AssertionError("vmc became ready with a changed owner key")
    if code != 1:
        raise AssertionError(f"vmc exited with {code}, expected 1")
    return proc.text()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class BackpressureTests(TestCase):
    timeout = 300

    async def test_slow_reader_bounds_vmc_memory(self) -> None:
        """A user who stops reading stops the command, not vmc's memory: vmc
        stays small while 64 MiB of output wait, and all of it arrives later."""
        trio = await start_trio(self)
        assert trio.vmc is not None and trio.vmc.transport is not None
        pid = trio.vmc.transport.pid
        s = await trio.session("owen")
        before = _rss_kib(pid)
        received = [0]
        cmd = s.exec(["head", "-c", str(64 * 1024 * 1024), "/dev/zero"],
                     on_stdout=lambda b: received.__setitem__(0, received[0] + len(b)))
        s.transport.pauseProducing()  # the user stops reading its socket
        await deferred_later(3)  # let every buffer on the way fill up
        stalled = received[0]
        grown = _rss_kib(pid) - before
        self.assertLess(grown, 32 * 1024, f"vmc grew by {grown} KiB while the user was stalled")
        self.assertLess(stalled, 64 * 1024 * 1024)
        s.transport.resumeProducing()
        self.assertEqual(await cmd.done, 0)
        self.assertEqual(received[0], 64 * 1024 * 1024)
        await s.close()


class CliTests(TestCase):
    """``ticrypt`` against a trio: the commands on one (``exec`` and
    ``shell`` as the console script, a process each, which is what they
    show; the others, authorize, users, revoke and info, in the test's
    process, :meth:`Trio.cli`; run at once where they are independent),
    the local terminal on another."""

    timeout = 180

    async def test_commands(self) -> None:
        trio = await start_trio(self)
        vm = trio.vm_id
        for user in ("owen", "bob"):
            await trio.client_config(user)  # logged in once, before the runs
        # two of owen's sessions at once: with the two of the batch before
        # that vmc may not have seen closed yet, within vmc's
        # max_sessions_per_user and the proxy's max_pending_per_user (4)
        status, stdin, unauthorized, needs_key = await together(
            trio.cli("owen", "exec", vm, "--", "sh", "-c",
                     "echo to-out; echo to-err >&2; exit 7"),
            trio.cli("owen", "exec", vm, "--", "wc", "-c", stdin=b"x" * 300000),
            trio.cli("bob", "exec", vm, "--", "true"),
            trio.cli("owen", "authorize", vm, "bob"))
        shell, not_found = await together(
            trio.cli("owen", "shell", vm, stdin=b"echo h''i; exit 3\n"),
            trio.cli("owen", "exec", vm, "--", "no-such-command-zz"))
        refused_shell, info = await together(
            trio.cli("owen", "shell", vm, "--term", "bad term!"),
            trio.cli("owen", "info", vm, "--json"))

        code, out, err = status  # the remote exit status, stdout and stderr apart
        self.assertEqual(code, 7, err)
        self.assertEqual(out, "to-out\n")
        self.assertEqual(err, "to-err\n")
        code, out, err = not_found
        self.assertEqual(code, 127, f"a command not found exits 127: {err}")
        self.assertIn("command not found", err)
        code, out, err = stdin  # stdin piped through
        self.assertEqual(code, 0, err)
        self.assertEqual(out.strip(), "300000")
        code, out, err = shell  # a shell fed from a pipe
        self.assertEqual(code, 3, err)
        self.assertIn("hi", out)
        code, out, err = refused_shell  # a shell the VM refuses: one line, no traceback
        self.assertEqual(code, 1)
        self.assertIn("bad-request", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        code, out, err = unauthorized  # the reason reaches the CLI, one line
        self.assertEqual(code, 1)
        self.assertIn("not-authorized", err)
        self.assertIn("ticrypt authorize", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        code, out, err = needs_key  # authorize needs --key for a non-admin
        self.assertEqual(code, 1)
        self.assertIn("--key", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        code, out, err = info
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["vm"], vm)

        # authorize, users, revoke: one after the other
        bob_pub = identity.public_text(identity.public_bytes(trio.keys["bob"]))
        code, out, err = await trio.cli("owen", "authorize", vm, "bob", "--key", bob_pub)
        self.assertEqual(code, 0, err)
        code, out, err = await trio.cli("owen", "users", vm)
        self.assertEqual(code, 0, err)
        self.assertIn("bob", out)
        code, out, err = await trio.cli("bob", "exec", vm, "--", "echo", "ok")
        self.assertEqual((code, out), (0, "ok\n"), err)
        code, out, err = await trio.cli("owen", "revoke", vm, "bob")
        self.assertEqual(code, 0, err)
        code, out, err = await trio.cli("bob", "exec", vm, "--", "echo", "ok")
        self.assertEqual(code, 1, "bob still runs commands after the revoke")
        self.assertIn("not-authorized", err)

    async def _shell_on_pty(self, trio: Trio, rows: int, cols: int) -> tuple[Any, int, Any]:
        """``ticrypt shell`` on a fresh local PTY of ``rows`` x ``cols``, up to
        the remote prompt; returns (process protocol, an fd that reads the
        terminal's modes, the modes before the CLI started)."""
        path = await trio.client_config("owen")
        master, slave = os.openpty()
        # A second master fd reads the terminal's modes (on Linux the master
        # reports the slave's termios) without holding the slave open.
        keep = os.dup(master)
        self.addCleanup(os.close, keep)
        set_window(slave, rows, cols)
        before = termios.tcgetattr(keep)
        proto = _PtyClient()
        reactor.spawnProcess(proto, script_path("ticrypt"),
                             [script_path("ticrypt"), "--config", path, "shell", trio.vm_id],
                             env=daemon_env(), usePTY=(master, slave, os.ttyname(slave)))  # type: ignore[arg-type]
        while b"$ " not in proto.output and b"# " not in proto.output:
            await proto.next_output()
        return proto, keep, before

    async def test_shell_on_a_real_terminal(self) -> None:
        """Raw mode locally, the local window size reaches the remote PTY, the
        exit status comes back and the local terminal is restored; and a
        ``kill`` of the CLI while a shell runs (the reactor stops under the
        shell) leaves the local terminal as it found it, not in raw mode."""
        trio = await start_trio(self)
        proto, keep, before = await self._shell_on_pty(trio, 37, 111)
        raw = termios.tcgetattr(keep)
        self.assertFalse(raw[3] & termios.ICANON, "the CLI did not put the tty in raw mode")
        proto.transport.write(b"stty size; exit 4\r")  # type: ignore[union-attr]
        code = await proto.ended
        self.assertEqual(code, 4)
        self.assertIn(b"37 111", bytes(proto.output))
        self.assertEqual(termios.tcgetattr(keep), before, "terminal not restored after exit")

        proto, keep, before = await self._shell_on_pty(trio, 24, 80)
        self.assertFalse(termios.tcgetattr(keep)[3] & termios.ICANON)  # raw now
        proto.transport.signalProcess("TERM")  # type: ignore[union-attr]
        await proto.ended
        self.assertEqual(termios.tcgetattr(keep), before,
                         "terminal not restored after SIGTERM during a shell")


#: A command whose grandchild leaves the session (setsid) and its parent (the
#: subshell ends at once: a double fork) and keeps stdout open; it prints its
#: pid as ESC=<pid>.
ESCAPE = "(setsid sh -c 'echo ESC=$$; exec sleep 1000' &); echo MAIN=$$; exec sleep 300"


async def _tagged_pid(out: bytearray, tag: bytes, testcase: TestCase) -> tuple[int, int]:
    """(pid, start time) that a command printed as ``TAG=<pid>``, bounded;
    the process is killed in cleanup if the test failed to end it."""
    for _ in range(400):  # bounded: 20 s
        found = re.search(tag + rb"=(\d+)\n", bytes(out))
        if found:
            break
        await deferred_later(0.05)
    assert found, f"no {tag!r} in {bytes(out)!r}"
    pid = int(found.group(1))
    testcase.addCleanup(kill_if_alive, pid)
    info = proc_info(pid)
    assert info is not None, f"{tag!r} {pid} is not running"
    return pid, info.start


class ContainmentTests(TestCase):
    """Nothing a user starts outlives its request, its channel or vmc
    (issue 6, defect 6): a cgroup per channel where cgroup v2 is usable
    (``[processes] cgroup = auto``), else the documented fallback."""

    timeout = 180

    async def _fallback_trio(self) -> Trio:
        trio = await start_trio(self, enroll=False, exec_kill_grace="1s")
        with open(trio.vmc_config, "a") as f:
            f.write("\n[processes]\ncgroup = off\n")
        await trio.start_vmc(self)
        assert trio.vmc is not None
        self.assertIn("user processes: fallback", trio.vmc.text())
        return trio

    async def test_escape_killed_on_cancel_and_after_a_crash(self) -> None:
        """cgroup = auto: a setsid'd double fork is killed when its request
        is cancelled; after vmc is killed (SIGKILL), its first start kills
        what the old one left."""
        trio = await start_trio(self, exec_kill_grace="1s")
        assert trio.vmc is not None
        self.assertIn("user processes: ", trio.vmc.text())  # the mode, named at start
        s = await trio.session("owen")
        out = bytearray()
        cmd = s.exec(["sh", "-c", ESCAPE], on_stdout=out.extend)
        pid, start = await _tagged_pid(out, b"ESC", self)
        cmd.cancel()
        self.assertEqual(await cmd.done.addTimeout(30, reactor), 128 + 15)
        self.assertTrue(await pid_gone(pid, 15.0, start), "a setsid'd double fork survived cancel")
        await s.close()
        await self._crash_and_restart(trio, ESCAPE)

    async def _crash_and_restart(self, trio: Trio, cmd_line: str) -> None:
        assert trio.vmc is not None
        s = await trio.session("owen")
        out = bytearray()
        cmd = s.exec(["sh", "-c", cmd_line], on_stdout=out.extend)
        cmd.done.addErrback(lambda f: f.trap(SessionError))  # ends with the channel
        main = await _tagged_pid(out, b"MAIN", self)
        escaped = await _tagged_pid(out, b"ESC", self)
        if trio.vmc_state and os.path.exists(os.path.join(trio.vmc_state, "processes.json")):
            # fallback: the orphan is recorded once vmc's reaper has seen it
            for _ in range(200):  # bounded: 10 s
                with open(os.path.join(trio.vmc_state, "processes.json")) as f:
                    if f'"pid": {escaped[0]},' in f.read():
                        break
                await deferred_later(0.05)
        await trio.vmc.kill()  # SIGKILL: no cleanup at all
        self.assertFalse(await pid_gone(main[0], 0.5, main[1]), "the test needs a survivor")
        await trio.start_vmc(self)
        self.assertTrue(await pid_gone(main[0], 15.0, main[1]), "the command survived vmc's crash and restart")
        self.assertTrue(await pid_gone(escaped[0], 15.0, escaped[1]), "its escaped child survived the restart")
        killed = [r for r in trio.vmc_audit_lines() if r["event"] == "leftover-processes-killed"]
        self.assertEqual(len(killed), 1)
        self.assertGreaterEqual(killed[0]["processes"], 2)

    async def test_fallback_after_a_crash_and_ctrl_c(self) -> None:
        """cgroup = off (the fallback): the first start after a crash kills
        what the old vmc left.  Then: the fallback cannot find a process that
        left its session, lost its parent and cleared its environment; it
        holds the command's stdout.  Ctrl-C still ends ``ticrypt exec`` after
        the grace (vmc ends the request), and vmc's stop kills the escapee
        (subreaper)."""
        trio = await self._fallback_trio()
        await self._crash_and_restart(trio, ESCAPE)
        path = await trio.client_config("owen")
        proto = _PtyClient()  # plain pipes here, no terminal
        hidden = ("(setsid env -u TICRYPT_VMC_JOB sh -c 'echo ESC=$$; exec sleep 1000' &); "
                  "echo started; exec sleep 300")
        reactor.spawnProcess(proto, script_path("ticrypt"),  # type: ignore[attr-defined]
                             [script_path("ticrypt"), "--config", path, "exec", "-n", trio.vm_id,
                              "--", "sh", "-c", hidden], env=daemon_env())
        pid, start = await _tagged_pid(proto.output, b"ESC", self)
        while b"started" not in proto.output:
            await proto.next_output()
        proto.transport.signalProcess("INT")  # type: ignore[union-attr]
        code = await proto.ended.addTimeout(30, reactor)
        self.assertEqual(code, 128 + 15)  # the remote command's status
        self.assertTrue(pid_alive(pid))  # nothing found it ...
        assert trio.vmc is not None
        await trio.vmc.stop()
        self.assertTrue(await pid_gone(pid, 15.0, start), "an orphan below vmc survived its stop")
