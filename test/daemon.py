"""Real daemons for integration tests: thin trial wrappers around
:mod:`ticrypt.lab.daemons` that stop every process in cleanup."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from ticrypt.lab import daemons
from ticrypt.lab.daemons import ROOT, Daemon, daemon_env, script_path, twistd_path

__all__ = ["ROOT", "Daemon", "daemon_env", "run_command", "script_path", "spawn_daemon",
           "start_daemon", "twistd_path"]


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
