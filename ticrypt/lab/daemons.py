"""Run ticrypt daemons as real ``twistd -n`` processes and wait for their
``TICRYPT-READY`` line (event-driven, with a deadline; never a sleep).

Used by ``ticrypt-lab``, the benchmarks and the integration tests
(test/daemon.py); :mod:`ticrypt.lab.deploy` writes the files they read.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.python.failure import Failure

from ticrypt.service import READY_MARKER
from ticrypt.timers import cancel_call

#: Project root when running from a checkout (twistd finds our plugins here).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def twistd_path() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    return candidate if os.path.exists(candidate) else "twistd"


def script_path(name: str) -> str:
    """A console script installed beside this Python (ticrypt, ticrypt-admin)."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


def daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    if os.path.isdir(os.path.join(ROOT, "twisted", "plugins")):
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")
    return env


class Daemon(protocol.ProcessProtocol):
    """One twistd process; ``ready`` fires with the parsed readiness info."""

    def __init__(self, name: str, reactor: Any, timeout: float, echo: Any = None):
        self.name = name
        self._reactor = reactor
        self.output = bytearray()
        self.ready_info: dict[str, Any] | None = None
        self.ready: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.exit_code: int | None = None
        self._echo = echo
        self._timeout = reactor.callLater(timeout, self._time_out)
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
        if len(self.output) > 8 * 1024 * 1024:  # keep the tail only
            del self.output[: len(self.output) - 4 * 1024 * 1024]
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", "replace")
            if self._echo is not None:
                self._echo(self.name, text)
            if READY_MARKER in text and not self.ready.called:
                self.ready_info = json.loads(text.split(READY_MARKER, 1)[1].strip())
                cancel_call(self._timeout)
                self.ready.callback(self.ready_info)

    def processEnded(self, reason: Failure) -> None:
        self.exit_code = 0 if isinstance(reason.value, ProcessDone) else getattr(
            reason.value, "exitCode", None)
        cancel_call(self._timeout)
        if not self.ready.called:
            self.ready.errback(RuntimeError(
                f"{self.name} exited ({self.exit_code}) before it was ready; output:\n"
                f"{self.text()[-4000:]}"))
        self.ended.callback(self.exit_code)

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def address(self, label: str) -> tuple[str, int]:
        """(host, port) of listener ``label`` from the readiness line."""
        assert self.ready_info is not None, f"{self.name} is not ready"
        host, _, port = self.ready_info["listening"][label].rpartition(":")
        return host.strip("[]"), int(port)

    def signal(self, sig: int) -> None:
        try:
            self.transport.signalProcess(sig)  # type: ignore[union-attr]
        except (ProcessExitedAlready, AttributeError):
            pass

    def stop(self, grace: float = 20.0) -> defer.Deferred[int | None]:
        """SIGTERM, then SIGKILL after ``grace`` seconds; fires when it ended."""
        if not self.ended.called:
            self.signal(signal.SIGTERM)
            kill = self._reactor.callLater(grace, self.signal, signal.SIGKILL)
            self.ended.addBoth(lambda r: (kill.active() and kill.cancel(), r)[1])
        return _follow(self.ended)

    def kill(self) -> defer.Deferred[int | None]:
        self.signal(signal.SIGKILL)
        return _follow(self.ended)


def _follow(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """A new Deferred with ``d``'s result, leaving ``d``'s own chain alone."""
    out: defer.Deferred[Any] = defer.Deferred()
    if d.called:
        out.callback(d.result)
    else:
        def fire(r: Any) -> Any:
            out.callback(r)
            return r
        d.addBoth(fire)
    return out


def spawn(reactor: Any, plugin: str, config_path: str, *,
          timeout: float = 30.0, cwd: str | None = None, echo: Any = None,
          env: dict[str, str] | None = None) -> Daemon:
    """Spawn ``twistd -n --pidfile= PLUGIN --config CONFIG``."""
    proc = Daemon(plugin, reactor, timeout, echo)
    args = [twistd_path(), "-n", "--pidfile=", plugin, "--config", config_path]
    reactor.spawnProcess(proc, args[0], args, env=env or daemon_env(),
                         path=cwd or os.path.dirname(os.path.abspath(config_path)))
    return proc


async def run_command(reactor: Any, args: list[str], *, env: dict[str, str] | None = None,
                      stdin: bytes = b"", timeout: float = 60.0,
                      cwd: str | None = None) -> tuple[int, str, str]:
    """Run a command to completion; (exit code, stdout, stderr).  Killed after
    ``timeout`` seconds."""
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
            if isinstance(reason.value, ProcessDone):
                done.callback(0)
            else:
                code = getattr(reason.value, "exitCode", None)
                sig = getattr(reason.value, "signal", None)
                done.callback(code if code is not None else 128 + (sig or 0))

    transport = reactor.spawnProcess(P(), args[0], args, env=env or daemon_env(),
                                     path=cwd or os.getcwd())
    timer = reactor.callLater(timeout, _kill, transport)
    code = await done
    cancel_call(timer)
    return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def runner(reactor: Any, *, cwd: str | None = None, env: dict[str, str] | None = None,
           timeout: float = 60.0) -> Callable[[list[str]], Awaitable[tuple[int, str, str]]]:
    """:func:`run_command` for console scripts: ``argv[0]`` is a name such as
    ``ticrypt-admin``, found beside this Python (:func:`script_path`)."""
    async def run(args: list[str]) -> tuple[int, str, str]:
        return await run_command(reactor, [script_path(args[0]), *args[1:]], env=env,
                                 timeout=timeout, cwd=cwd)
    return run


def _kill(transport: Any) -> None:
    try:
        transport.signalProcess("KILL")
    except ProcessExitedAlready:
        pass
