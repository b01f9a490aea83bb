"""A real ticrypt-rest for integration tests: a trial wrapper over
:class:`ticrypt.lab.deploy.Deployment` (CA, keys, rest.ini, ``ticrypt-admin
init``) and test/daemon.py (twistd, stopped in the test's cleanup).

``start_rest(self, in_process=True)`` runs rest in the test's own process
instead (:class:`RestHere`): the service ``twistd ticrypt-rest`` would run,
built by the daemon's own ``make_rest_service`` from the same rest.ini and
listening on 127.0.0.1 with the same TLS, on trial's reactor.  That is for
tests of what rest answers; what only the daemon shows (start-up, config
refusal, kill -9 durability) starts twistd.

The database, users and VMs are made by ``ticrypt-admin``'s own code run in
this process (:func:`admin_runner`: its ``main``, same exit codes and lines,
no Python start-up per command); :meth:`RestEnv.admin` runs the console
script itself, for the tests that are about it.  :func:`run_ticrypt` is the
same for the ``ticrypt`` CLI's commands that only talk to rest.

    env = await start_rest(self)                 # self: a trial TestCase
    client = env.client()                        # RestClient trusting env.ca_file
    await client.login(env.admin_name, env.admin_key)

Everything lives in ``env.dir`` (``env.deployment``).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from test.daemon import Daemon, runner, starter
from ticrypt import identity
from ticrypt.admin import cli as admin_cli
from ticrypt.config import load_config
from ticrypt.frontend import cli as ticrypt_cli
from ticrypt.frontend import runner as ticrypt_runner
from ticrypt.frontend.client import RestClient
from ticrypt.http.server import LimitedFactory
from ticrypt.lab.deploy import Addresses, Deployment, Run
from ticrypt.rest.config import RestConfig
from ticrypt.rest.tap import make_rest_service
from ticrypt.service import ListenerService, RoleService


def run_admin(argv: Sequence[str]) -> tuple[int, str, str]:
    """``ticrypt-admin ARGV`` run in this process (its ``main``, stdout and
    stderr captured): (exit code, stdout, stderr) as the console script gives."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = admin_cli.main(list(argv))
        except SystemExit as e:  # argparse refusing the command line
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def _environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``changes`` (None: removed), restored after."""
    def apply(values: Mapping[str, str | None]) -> None:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    saved = {name: os.environ.get(name) for name in changes}
    try:
        apply(changes)
        yield
    finally:
        apply(saved)


#: one in-process ``ticrypt`` at a time: stdout, stderr, stdin and the
#: environment it sees are this process's
_ticrypt_lock = defer.DeferredLock()


async def run_ticrypt(argv: Sequence[str], env: Mapping[str, str | None] | None = None
                      ) -> tuple[int, str, str]:
    """``ticrypt ARGV`` run in this process on trial's reactor: its ``main``
    under :func:`ticrypt.frontend.runner.call_on`, with an empty stdin that
    is not a terminal, as a console script run from a test has, and
    ``env``'s changes to the environment (None removes a variable).
    (exit code, stdout, stderr) as the console script gives.  For the
    commands that talk to rest or over the VM's channel; exec, shell and
    tunnel (stdin, a terminal, a process that stays) run the console script."""
    async with _ticrypt_lock:
        out, err = io.StringIO(), io.StringIO()
        with _environment(env or {}), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            saved_stdin, sys.stdin = sys.stdin, io.StringIO()
            try:
                code = await ticrypt_runner.call_on(
                    reactor, lambda: ticrypt_cli.main(list(argv)))
            except SystemExit as e:  # argparse refusing the command line
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdin = saved_stdin
    return code, out.getvalue(), err.getvalue()


def admin_runner() -> Run:
    """A :data:`~ticrypt.lab.deploy.Run` for a Deployment that runs
    ``ticrypt-admin`` in this process (:func:`run_admin`) and any other
    console script as a process."""
    other = runner()

    async def run(args: list[str]) -> tuple[int, str, str]:
        if args[0] == "ticrypt-admin":
            return run_admin(args[1:])
        return await other(args)
    return run


class ShiftedReactor:
    """The reactor, with a clock a test moves forward (:meth:`advance`)
    instead of waiting: what rest reads as the time (session, challenge and
    enrollment expiry, audit times).  Everything else, timers included, is
    the reactor's own."""

    def __init__(self, reactor: Any):
        self._reactor = reactor
        self.offset = 0.0

    def seconds(self) -> float:
        return float(self._reactor.seconds()) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@attrs.define
class RestHere:
    """rest run in this process: ``make_rest_service`` (what ``twistd
    ticrypt-rest`` runs) from rest.ini, on trial's reactor with a
    :class:`ShiftedReactor` clock.  :meth:`stop` ends it as the daemon's
    shut-down does, and waits until every connection it accepted is gone
    (trial's janitor fails a test that leaves one)."""

    service: RoleService
    clock: ShiftedReactor
    listener: ListenerService
    _gone: defer.Deferred[None] = attrs.field(factory=defer.Deferred)

    @classmethod
    async def start(cls, config_path: str) -> RestHere:
        clock = ShiftedReactor(reactor)
        service = make_rest_service(load_config(config_path, RestConfig), clock)
        [listener] = service.listeners()
        here = cls(service, clock, listener)
        connections = here.connections
        unregister = connections.unregisterProtocol

        def unregistered(p: Any) -> None:
            unregister(p)
            if not len(connections) and not service.running and not here._gone.called:
                here._gone.callback(None)

        connections.unregisterProtocol = unregistered  # type: ignore[method-assign]
        service.privilegedStartService()
        service.startService()
        await listener.ready
        return here

    @property
    def connections(self) -> LimitedFactory:
        factory = self.listener.factory
        assert isinstance(factory, LimitedFactory)
        return factory

    @property
    def label(self) -> str:
        """``https``, or ``http`` for a plain listener."""
        return self.listener.label

    @property
    def port(self) -> int:
        assert self.listener.port is not None
        return int(self.listener.port.getHost().port)  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stop listening, the purge timer and the database thread, then end
        the connections still open and wait until they are gone.  Once
        stopped, nothing more (a test that stopped it, then its cleanup)."""
        if not self.service.running:
            return
        await self.service.stopService()
        if not len(self.connections):
            return
        for p in list(self.connections.protocols):
            p.transport.abortConnection()
        await self._gone


@attrs.define
class RestEnv:
    deployment: Deployment
    admin_name: str
    admin_key: Ed25519PrivateKey
    backend_public: bytes = b""
    daemon: Daemon | None = None
    #: rest in this process (:meth:`start_here`)
    here: RestHere | None = None

    # where its files are (see ``deployment.names``)
    dir: str = attrs.field(init=False)
    config_path: str = attrs.field(init=False)
    ca_file: str = attrs.field(init=False)
    server_pem: str = attrs.field(init=False)
    database: str = attrs.field(init=False)
    audit_log: str = attrs.field(init=False)
    signing_key: str = attrs.field(init=False)
    #: bearer secret of GET /v1/revocations (rest and the proxy share it)
    feed_secret_file: str = attrs.field(init=False)
    admin_key_file: str = attrs.field(init=False)
    admin_pub_file: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        dep = self.deployment
        self.dir, self.config_path = dep.dir, dep.rest_config
        self.ca_file, self.server_pem = dep.ca_file, dep.server_pem
        self.database, self.audit_log = dep.path("rest_db"), dep.path("rest_audit")
        self.signing_key, self.feed_secret_file = dep.path("backend_key"), dep.feed_secret_file
        self.admin_key_file = dep.path(f"{self.admin_name}.key")
        self.admin_pub_file = self.admin_key_file + ".pub"

    @property
    def url(self) -> str:
        return self.deployment.addresses.rest_url

    def client(self, token: str | None = None, **kwargs: Any) -> RestClient:
        return RestClient(reactor, self.url, self.ca_file, token, **kwargs)

    def new_user_key(self, name: str) -> tuple[Ed25519PrivateKey, str]:
        """A key for ``name``; returns it and its public key file."""
        return self.deployment.user_key(name)

    async def admin(self, *args: str) -> tuple[int, str, str]:
        """Run the console script ``ticrypt-admin --config <config> ARGS``."""
        return await runner()(self.deployment.admin_command(*args))

    def admin_here(self, *args: str) -> tuple[int, str, str]:
        """``ticrypt-admin --config <config> ARGS`` run in this process
        (:func:`run_admin`), for tests that are not about the console script."""
        return run_admin(self.deployment.admin_command(*args)[1:])

    def write_config(self, **overrides: str | None) -> None:
        self.deployment.rest_ini(**overrides)

    async def start(self, testcase: TestCase) -> Daemon:
        self.daemon = await self.deployment.start_rest(starter(testcase))
        return self.daemon

    async def start_here(self, testcase: TestCase) -> RestHere:
        """Write rest.ini and run rest in this process (:class:`RestHere`,
        stopped in ``testcase``'s cleanup); record its port and scheme."""
        self.here = await RestHere.start(self.deployment.rest_ini())
        testcase.addCleanup(self.here.stop)
        addresses = self.deployment.addresses
        addresses.rest_scheme, addresses.rest_port = self.here.label, self.here.port
        return self.here


def make_rest_dir(directory: str, admin_name: str = "alice",
                  overrides: Mapping[str, str] | None = None,
                  addresses: Addresses | None = None) -> RestEnv:
    """TLS files, the feed secret, the admin's key and rest.ini in
    ``directory`` (no init).  Unless ``addresses`` say otherwise, rest
    listens on a free port and the proxy URL names a proxy that is not
    running (wss://127.0.0.1:8444)."""
    deployment = Deployment(directory, addresses or Addresses(proxy_port=8444))
    deployment.ca()
    deployment.feed_secret()
    admin_key, _ = deployment.user_key(admin_name)
    deployment.rest_ini(**(overrides or {}))
    return RestEnv(deployment, admin_name, admin_key)


#: initialised rest folders (``ticrypt-admin init`` run once), by admin name,
#: that ``start_rest(copy=True)`` copies; one set per test process
_templates: dict[str, str] = {}
_template_lock = defer.DeferredLock()


async def _template(admin_name: str) -> str:
    """The folder :func:`make_rest_dir` and ``ticrypt-admin init`` made for
    ``admin_name`` in this process (made on first use, removed at exit)."""
    async with _template_lock:
        if admin_name not in _templates:
            top = tempfile.mkdtemp(prefix="ticrypt-rest-template-")
            atexit.register(shutil.rmtree, top, True)
            env = make_rest_dir(os.path.join(top, "rest"), admin_name)
            await env.deployment.init(admin_runner(), admin_name)
            _templates[admin_name] = env.dir
    return _templates[admin_name]


async def start_rest(testcase: TestCase, *, overrides: Mapping[str, str] | None = None,
                     start: bool = True, admin_name: str = "alice",
                     addresses: Addresses | None = None, copy: bool = False,
                     in_process: bool = False) -> RestEnv:
    """A temp dir with everything rest needs, initialised with ``ticrypt-admin
    init`` (``admin_name`` is the superadmin) and, if ``start``, a running
    daemon, or with ``in_process`` rest run in this process
    (:meth:`RestEnv.start_here`).  ``overrides`` replace or add ``[rest]`` keys.

    ``copy``: copy the folder one ``ticrypt-admin init`` made for this
    process instead of running it again (the same CA, keys and fresh
    database in every test that asks; not with ``addresses``)."""
    if copy and addresses is None:
        directory = os.path.abspath(testcase.mktemp())
        shutil.copytree(await _template(admin_name), directory)
        deployment = Deployment(directory, Addresses(proxy_port=8444))
        deployment.rest_ini(**(overrides or {}))
        env = RestEnv(deployment, admin_name, deployment.user_key(admin_name)[0])
        env.backend_public = identity.load_public_file(deployment.path("backend_pub"))
    else:
        env = make_rest_dir(os.path.abspath(testcase.mktemp()), admin_name, overrides,
                            addresses)
        env.backend_public = await env.deployment.init(admin_runner(), admin_name)
    if start and in_process:
        await env.start_here(testcase)
    elif start:
        await env.start(testcase)
    return env
