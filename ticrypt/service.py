"""Service plumbing shared by every daemon: ``--config`` options, listeners
whose failed bind stops start-up, and the readiness line.

When all listeners of a role are up the role logs one line::

    TICRYPT-READY {"role": "rest", "listening": {"https": "127.0.0.1:8443"}}

Tests and ``ticrypt-lab`` wait for that line instead of sleeping.

A role that cannot start says so in one line naming the config file,
section and key, and exits with status 1 (:class:`StartupFailed`): a config
error before twistd logs anything (no usage text, see :func:`options_for`),
a listener that cannot bind once twistd logs (:class:`RoleService`).

A service's periodic job runs on its injected clock: :func:`start_loop`
in ``startService``, :func:`stop_loop` in ``stopService``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorCore, IReactorTime
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from ticrypt.config import Config, ConfigError, RoleConfig, Schema, load_config

READY_MARKER = "TICRYPT-READY"


def options_for(role: str, schema: Schema | type[RoleConfig]) -> type[usage.Options]:
    """A twistd Options class: ``--config FILE`` loaded into ``self["cfg"]``
    (an instance of ``schema`` when that is a role's typed config class).

    A config error is a ``UsageError`` naming file, section and key.  Under
    twistd (a subcommand of its options) it ends the process instead, with
    that one line on stderr and exit status 1 (:class:`StartupFailed`): from
    a ``UsageError`` twistd would print its usage text first, which says
    nothing about the error."""

    class Options(usage.Options):
        synopsis = f"--config {role}.ini"
        longdesc = f"Run ticrypt-{role}.  Every key is documented in etc/{role}.ini."
        optParameters = [["config", "c", None, f"path to the {role} ini file"]]

        def postOptions(self) -> None:
            if not self["config"]:
                raise usage.UsageError(f"ticrypt-{role}: --config FILE is required")
            try:
                self["cfg"] = load_config(self["config"], schema)
            except ConfigError as e:
                if self.parent is not None:  # twistd's ServerOptions
                    raise StartupFailed(f"ticrypt-{role}: {e}") from None
                raise usage.UsageError(str(e)) from None

    Options.__name__ = f"{role.capitalize()}Options"
    return Options


class StartupError(Exception):
    """A role cannot start.  ``message`` says what failed and why;
    ``section``/``key`` name the config key at fault, if there is one."""

    def __init__(self, message: str, section: str | None = None, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.section = section
        self.key = key


class StartupFailed(SystemExit, Exception):
    """Ends a role that cannot start: exit status 1, no traceback (how Python
    ends on a ``SystemExit``).  ``str()`` is the one line; Python prints it
    on stderr unless ``logged`` (it went to twistd's log already).

    Also an ``Exception``, so that twistd's own start-up error handling runs
    before it propagates: it removes the pid file and tells the parent that
    waits in daemon mode through the status pipe (on a plain ``SystemExit``
    that parent waits forever)."""

    def __init__(self, line: str, logged: bool = False):
        super().__init__(1 if logged else line)
        self.line = line

    def __str__(self) -> str:
        return self.line


def _host_port(host: str, port: Any) -> str:
    host = host or "*"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_error_text(error: BaseException) -> str:
    """``cannot listen on 127.0.0.1:8443: address already in use``."""
    if isinstance(error, CannotListenError):
        why: Any = error.socketError
        reason = getattr(why, "strerror", None) or str(why)
        reason = reason[:1].lower() + reason[1:]
        return f"cannot listen on {_host_port(error.interface, error.port)}: {reason}"
    return f"cannot listen: {error}"


class ListenerService(Service):
    """Listen on a server endpoint whose string is config key ``key``
    (``(section, key)``).

    It listens in ``privilegedStartService``, like Twisted's
    ``StreamServerEndpointService``: before any sibling starts threads or
    timers, and before twistd sheds privileges.  A bind that fails there
    raises :class:`StartupError`, which :class:`RoleService` turns into one
    line and exit status 1.  TLS endpoints get the ALPN policy of
    :func:`ticrypt.tlsutil.alpn_http11`."""

    log = Logger()

    def __init__(self, label: str, endpoint: Any, factory: IProtocolFactory,
                 key: tuple[str, str] | None = None):
        # here, not at the top: ticrypt-admin imports this module (through
        # ticrypt.rest.db) and never listens; tlsutil loads Twisted's TLS
        from ticrypt.tlsutil import alpn_http11

        self.label = label
        self.endpoint = alpn_http11(endpoint)
        self.factory = factory
        self.key = key
        self.port: IListeningPort | None = None
        self.ready: defer.Deferred[IListeningPort] = defer.Deferred()
        self._listen_called = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if not self._listen_called:  # started without privilegedStartService
            self._listen()

    def _listen(self) -> None:
        self._listen_called = True
        now: list[BaseException] = []
        later = False

        def failed(f: Failure) -> None:
            if later:  # an endpoint that binds asynchronously reports via ready
                self.ready.errback(self.error(f.value))
            else:
                now.append(f.value)

        self.endpoint.listen(self.factory).addCallbacks(self._listening, failed)
        later = True
        if now:  # the usual case: binding is synchronous
            raise self.error(now[0])

    def error(self, error: BaseException) -> StartupError:
        """The :class:`StartupError` for a failed listen."""
        section, key = self.key if self.key is not None else (None, None)
        text = listen_error_text(error)
        if self.key is None:
            text = f"{self.label}: {text}"
        return StartupError(text, section, key)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.log.info("{label} listening on {address}", label=self.label,
                      address=self.address())
        self.ready.callback(port)
        return port

    def address(self) -> str:
        if self.port is None:
            return ""
        host = self.port.getHost()
        h = getattr(host, "host", "?")
        port = getattr(host, "port", 0)
        return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class RoleService(MultiService):
    """A role's top service.  Once every :class:`ListenerService` child is
    listening (and every ``extra_ready`` deferred has fired) it logs the
    readiness line.

    A :class:`StartupError` from a child's start becomes
    :class:`StartupFailed`: one line naming the config file, section and
    key, and exit status 1 (twistd has not run the reactor yet, so nothing is
    left to stop).  One that arrives later (a listener that binds asynchronously,
    an ``extra_ready`` that fails) stops the reactor and exits 1 after
    shut-down, so that a supervisor sees a failure instead of a daemon that
    runs without its port."""

    log = Logger()

    def __init__(self, role: str, config: Config | RoleConfig | None = None,
                 reactor: IReactorCore | None = None):
        super().__init__()
        self.role = role
        self.config = config
        self._reactor: Any = reactor  # subclasses may set it too (vmc)
        self.extra_ready: list[defer.Deferred[Any]] = []
        self.ready_info: dict[str, Any] = {}

    def listeners(self) -> list[ListenerService]:
        return [s for s in self if isinstance(s, ListenerService)]

    def failure_line(self, error: StartupError) -> str:
        """``ticrypt-rest: /etc/rest.ini: [rest] listen: cannot listen on ...``."""
        if self.config is not None and error.section is not None:
            text = str(self.config.error(error.section, error.key, error.message))
        else:
            text = error.message
        return f"ticrypt-{self.role}: {text}"

    def _refuse(self, error: StartupError) -> NoReturn:
        # logged before twistd writes its status pipe: in daemon mode the
        # line is in the log file by the time the parent exits
        line = self.failure_line(error)
        self.log.critical("{line}", line=line)
        raise StartupFailed(line, logged=True) from None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except StartupError as e:
            self._refuse(e)

    def startService(self) -> None:
        try:
            super().startService()
        except StartupError as e:
            self._refuse(e)
        waits = [s.ready for s in self.listeners()] + list(self.extra_ready)
        d = defer.gatherResults(waits, consumeErrors=True)
        d.addCallback(lambda _: self._announce())
        d.addErrback(self._failed_later)

    def _failed_later(self, failure: Failure) -> None:
        if failure.check(defer.FirstError):
            failure = failure.value.subFailure  # type: ignore[union-attr]
        if isinstance(failure.value, StartupError):
            self.log.critical("{line}", line=self.failure_line(failure.value))
        else:
            self.log.failure("ticrypt-{role} failed to start", failure, role=self.role)
        reactor = self._reactor
        if reactor is None:  # a role built without one: twistd's global reactor
            from twisted.internet import reactor
        # twistd exits 0 once the reactor stops; exit 1 after shut-down
        reactor.addSystemEventTrigger("after", "shutdown", exit_failed)
        reactor.callWhenRunning(reactor.stop)

    def _announce(self) -> None:
        info = {"role": self.role,
                "listening": {s.label: s.address() for s in self.listeners()}}
        info.update(self.ready_info)
        self.log.info(READY_MARKER + " {ready}", ready=json.dumps(info, sort_keys=True))


def exit_failed() -> None:
    """Exit with status 1 now (an "after shutdown" trigger: twistd itself
    has no way to report a failure once the reactor ran)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def start_loop(call: Callable[[], object], clock: IReactorTime, interval: float, *, now: bool,
               failed: Callable[[Failure], None] | None = None) -> task.LoopingCall:
    """A started LoopingCall of ``call`` every ``interval`` seconds on
    ``clock`` (the first call at once when ``now``).  A call that raises, or
    whose Deferred fails, stops the loop for good, so ``call`` catches its
    own errors; ``failed`` hears of such a stop."""
    loop = task.LoopingCall(call)
    loop.clock = clock
    d = loop.start(interval, now=now)
    if failed is not None:
        d.addErrback(failed)
    return loop


def stop_loop(loop: task.LoopingCall | None) -> None:
    """Stop a loop of :func:`start_loop` if it still runs."""
    if loop is not None and loop.running:
        loop.stop()
