"""A real ticrypt-rest for integration tests: a trial wrapper over
:class:`ticrypt.lab.deploy.Deployment` (CA, keys, rest.ini, ``ticrypt-admin
init``) and test/daemon.py (twistd, stopped in the test's cleanup).

The database, users and VMs are made by ``ticrypt-admin``'s own code run in
this process (:func:`admin_runner`: its ``main``, same exit codes and lines,
no Python start-up per command); :meth:`RestEnv.admin` runs the console
script itself, for the tests that are about it.

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
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from test.daemon import Daemon, runner, starter
from ticrypt import identity
from ticrypt.admin import cli as admin_cli
from ticrypt.frontend.client import RestClient
from ticrypt.lab.deploy import Addresses, Deployment, Run


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


@attrs.define
class RestEnv:
    deployment: Deployment
    admin_name: str
    admin_key: Ed25519PrivateKey
    backend_public: bytes = b""
    daemon: Daemon | None = None

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
            await env.deployment.init(runner(), admin_name)
            _templates[admin_name] = env.dir
    return _templates[admin_name]


async def start_rest(testcase: TestCase, *, overrides: Mapping[str, str] | None = None,
                     start: bool = True, admin_name: str = "alice",
                     addresses: Addresses | None = None, copy: bool = False) -> RestEnv:
    """A temp dir with everything rest needs, initialised with ``ticrypt-admin
    init`` (``admin_name`` is the superadmin) and, if ``start``, a running
    daemon.  ``overrides`` replace or add ``[rest]`` keys.

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
    if start:
        await env.start(testcase)
    return env
