"""Run a real ticrypt daemon under twistd for integration tests.

``start_daemon(testcase, plugin, config_path)`` spawns
``twistd -n --pidfile= <plugin> --config <file>``, waits (event-driven, with
a deadline) for the ``TICRYPT-READY`` line and returns a :class:`Daemon`
with the parsed readiness info.  The process is stopped in cleanup.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from ticrypt.service import READY_MARKER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twistd_path() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    return candidate if os.path.exists(candidate) else "twistd"


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TICRYPT_CONFIG", None)
    return env


class Daemon(protocol.ProcessProtocol):
    def __init__(self, name: str, timeout: float):
        self.name = name
        self.output = bytearray()
        self.ready_info: dict[str, Any] | None = None
        self.ready: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.exit_code: int | None = None
        self._timeout = reactor.callLater(timeout, self._time_out)  # type: ignore[attr-defined]
        self._pending = b""

    def _time_out(self) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(
                f"{self.name} not ready in time; output:\n{self.text()[-4000:]}"))
            self.stop()

    def outReceived(self, data: bytes) -> None:
        self._feed(data)

    def errReceived(self, data: bytes) -> None:
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        self.output += data
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace")
            if READY_MARKER in text and not self.ready.called:
                self.ready_info = json.loads(text.split(READY_MARKER, 1)[1].strip())
                if self._timeout.active():
                    self._timeout.cancel()
                self.ready.callback(self.ready_info)

    def processEnded(self, reason: Failure) -> None:
        self.exit_code = getattr(reason.value, "exitCode", None)
        if isinstance(reason.value, ProcessDone):
            self.exit_code = 0
        if self._timeout.active():
            self._timeout.cancel()
        if not self.ready.called:
            self.ready.errback(RuntimeError(
                f"{self.name} exited ({self.exit_code}) before ready; output:\n"
                f"{self.text()[-4000:]}"))
        self.ended.callback(self.exit_code)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def address(self, label: str) -> tuple[str, int]:
        assert self.ready_info is not None
        host, _, port = self.ready_info["listening"][label].rpartition(":")
        return host.strip("[]"), int(port)

    def signal(self, sig: int) -> None:
        try:
            self.transport.signalProcess(sig)  # type: ignore[union-attr]
        except ProcessExitedAlready:
            pass

    def stop(self) -> defer.Deferred[int | None]:
        if not self.ended.called:
            self.signal(signal.SIGTERM)
            kill = reactor.callLater(20, self.signal, signal.SIGKILL)  # type: ignore[attr-defined]
            self.ended.addBoth(lambda r: (kill.active() and kill.cancel(), r)[1])
        return _chain(self.ended)

    def kill(self) -> defer.Deferred[int | None]:
        self.signal(signal.SIGKILL)
        return _chain(self.ended)


def _chain(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    out: defer.Deferred[Any] = defer.Deferred()

    def fire(r: Any) -> Any:
        out.callback(r)
        return r

    if d.called:
        out.callback(d.result)
    else:
        d.addBoth(fire)
    return out


def spawn_daemon(testcase: TestCase, plugin: str, config_path: str,
                 timeout: float = 30.0, cwd: str | None = None) -> Daemon:
    """Spawn twistd; the caller waits on ``.ready``. Stopped in cleanup."""
    proc = Daemon(plugin, timeout)
    args = [twistd_path(), "-n", "--pidfile=", plugin, "--config", config_path]
    reactor.spawnProcess(proc, args[0], args, env=daemon_env(),  # type: ignore[attr-defined]
                         path=cwd or ROOT)
    testcase.addCleanup(proc.stop)
    return proc


async def start_daemon(testcase: TestCase, plugin: str, config_path: str,
                       timeout: float = 30.0) -> Daemon:
    proc = spawn_daemon(testcase, plugin, config_path, timeout)
    await proc.ready
    return proc


async def run_command(args: list[str], env: dict[str, str] | None = None,
                      stdin: bytes = b"", timeout: float = 60.0) -> tuple[int, str, str]:
    """Run a command to completion; returns (exit code, stdout, stderr)."""
    out, err = bytearray(), bytearray()
    done: defer.Deferred[int] = defer.Deferred()

    class P(protocol.ProcessProtocol):
        def connectionMade(self) -> None:
            if stdin:
                self.transport.write(stdin)  # type: ignore[union-attr]
            self.transport.closeStdin()  # type: ignore[union-attr]

        def outReceived(self, data: bytes) -> None:
            out.extend(data)

        def errReceived(self, data: bytes) -> None:
            err.extend(data)

        def processEnded(self, reason: Failure) -> None:
            code = getattr(reason.value, "exitCode", None)
            done.callback(0 if isinstance(reason.value, ProcessDone) else (code or -1))

    p = P()
    transport = reactor.spawnProcess(p, args[0], args,  # type: ignore[attr-defined]
                                     env=env or daemon_env(), path=ROOT)
    timer = reactor.callLater(timeout, transport.signalProcess, "KILL")  # type: ignore[attr-defined]
    code = await done
    if timer.active():
        timer.cancel()
    return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
