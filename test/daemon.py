"""Real daemons for integration tests: thin trial wrappers around
:mod:`ticrypt.lab.daemons` that stop every process in cleanup, and the
``run``/``start`` callables :class:`ticrypt.lab.deploy.Deployment` takes."""

from __future__ import annotations

import os

from twisted.internet import reactor, task
from twisted.trial.unittest import TestCase

from ticrypt.lab import daemons
from ticrypt.lab.daemons import ROOT, Daemon, daemon_env, script_path, twistd_path
from ticrypt.lab.deploy import Run, Start

__all__ = ["ROOT", "Daemon", "daemon_env", "kill_if_alive", "pid_alive", "pid_gone", "run_command",
           "runner", "script_path", "spawn_daemon", "start_daemon", "starter", "twistd_path"]


def spawn_daemon(testcase: TestCase, plugin: str, config_path: str,
                 timeout: float = 30.0, cwd: str | None = None) -> Daemon:
    """Spawn ``twistd -n``; the caller waits on ``.ready``.  Stopped in cleanup."""
    proc = daemons.spawn(reactor, plugin, config_path, timeout=timeout, cwd=cwd or ROOT)
    testcase.addCleanup(proc.stop)
    return proc


async def start_daemon(testcase: TestCase, plugin: str, config_path: str,
                       timeout: float = 30.0) -> Daemon:
    """Spawn and wait for the readiness line."""
    proc = spawn_daemon(testcase, plugin, config_path, timeout)
    await proc.ready
    return proc


async def run_command(args: list[str], env: dict[str, str] | None = None,
                      stdin: bytes = b"", timeout: float = 60.0) -> tuple[int, str, str]:
    """Run a command to completion: (exit code, stdout, stderr)."""
    return await daemons.run_command(reactor, args, env=env, stdin=stdin, timeout=timeout,
                                     cwd=ROOT)


def runner() -> Run:
    """Runs console scripts for a :class:`~ticrypt.lab.deploy.Deployment`."""
    return daemons.runner(reactor, cwd=ROOT)


def starter(testcase: TestCase) -> Start:
    """Starts daemons for a :class:`~ticrypt.lab.deploy.Deployment`; each is
    stopped in ``testcase``'s cleanup."""
    return lambda plugin, config: start_daemon(testcase, plugin, config)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


async def pid_gone(pid: int, seconds: float = 10.0, start: int | None = None) -> bool:
    """Wait (polling on the reactor, at most ``seconds``) until ``pid`` is
    gone or a zombie; whether it is.  A SIGKILL is delivered when the target
    next runs, so a test checks its effect with this, not at once.  With
    ``start`` (the process's start time, ``proc_info(pid).start``) a pid now
    used by another process counts as gone."""
    from ticrypt.vmc.processes import proc_info

    def gone() -> bool:
        if start is None:
            return not pid_alive(pid)
        info = proc_info(pid)
        return info is None or info.start != start or info.state == "Z"

    for _ in range(max(1, int(seconds / 0.05))):
        if gone():
            return True
        await task.deferLater(reactor, 0.05, lambda: None)
    return gone()


def kill_if_alive(pid: int) -> None:
    """Cleanup for a test's own child process when the test failed to end it."""
    if pid_alive(pid):
        os.kill(pid, 9)
