"""A real ticrypt-rest for integration tests (and the lab): temp dir, private
CA and server certificate, keys, config, ``ticrypt-admin init``, twistd.

    env = await start_rest(self)                 # self: a trial TestCase
    client = env.client()                        # RestClient trusting env.ca_file
    await client.login(env.admin_name, env.admin_key)

Everything lives in ``env.dir``; the daemon is stopped in the test's cleanup.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from test.daemon import Daemon, run_command, start_daemon
from ticrypt import identity, tlsutil
from ticrypt.frontend.client import RestClient


def script(name: str) -> str:
    """A console script installed beside this Python (ticrypt, ticrypt-admin)."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else name


@attrs.define
class RestEnv:
    dir: str
    config_path: str
    ca_file: str
    server_pem: str
    database: str
    audit_log: str
    signing_key: str
    backend_public: bytes
    admin_name: str
    admin_key: Ed25519PrivateKey
    admin_key_file: str
    settings: dict[str, str]
    #: bearer secret of GET /v1/revocations (rest and the proxy share it)
    feed_secret_file: str = ""
    daemon: Daemon | None = None
    url: str = ""

    def client(self, token: str | None = None, **kwargs: Any) -> RestClient:
        return RestClient(reactor, self.url, self.ca_file, token, **kwargs)

    def new_user_key(self, name: str) -> tuple[Ed25519PrivateKey, str]:
        """A fresh key for ``name``; returns it and its public key file."""
        key = identity.generate()
        pub = os.path.join(self.dir, f"{name}.pub")
        identity.save_public(pub, key)
        return key, pub

    async def admin(self, *args: str) -> tuple[int, str, str]:
        """Run ``ticrypt-admin --config <config> ARGS``."""
        return await run_command([script("ticrypt-admin"), "--config", self.config_path,
                                  *args])

    def write_config(self, **overrides: str) -> None:
        self.settings.update(overrides)
        lines = ["[rest]"] + [f"{k} = {v}" for k, v in self.settings.items()]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    async def start(self, testcase: TestCase) -> Daemon:
        self.daemon = await start_daemon(testcase, "ticrypt-rest", self.config_path)
        label = "https" if "https" in self.daemon.ready_info["listening"] else "http"  # type: ignore
        host, port = self.daemon.address(label)
        self.url = f"{label}://{host}:{port}"
        return self.daemon


def write_secret(path: str) -> str:
    """A fresh bearer secret (64 hex digits) in ``path``, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    return path


def make_rest_dir(directory: str, admin_name: str = "alice",
                  overrides: Mapping[str, str] | None = None) -> RestEnv:
    """Create TLS files, the admin key and rest.ini in ``directory`` (no init)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    ca, ca_key = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    pem = os.path.join(directory, "server.pem")
    tlsutil.make_ca(ca, ca_key)
    tlsutil.make_server_cert(ca, ca_key, pem, ("localhost", "127.0.0.1"))
    admin_key = identity.generate()
    admin_key_file = os.path.join(directory, f"{admin_name}.key")
    identity.save_private(admin_key_file, admin_key)
    identity.save_public(admin_key_file[:-4] + ".pub", admin_key)
    feed_secret = write_secret(os.path.join(directory, "feed.secret"))
    settings = {
        "listen": tlsutil.server_endpoint(0, pem),
        "database": "rest.db",
        "signing_key": "backend.key",
        "audit_log": "audit.log",
        "proxy_url": "wss://127.0.0.1:8444",
        "revocation_feed_secret": "feed.secret",
    }
    settings.update(overrides or {})
    env = RestEnv(dir=directory, config_path=os.path.join(directory, "rest.ini"), ca_file=ca,
                  server_pem=pem, database=os.path.join(directory, "rest.db"),
                  audit_log=os.path.join(directory, "audit.log"),
                  signing_key=os.path.join(directory, "backend.key"), backend_public=b"",
                  admin_name=admin_name, admin_key=admin_key, admin_key_file=admin_key_file,
                  settings=settings, feed_secret_file=feed_secret)
    env.write_config()
    return env


async def start_rest(testcase: TestCase, *, overrides: Mapping[str, str] | None = None,
                     start: bool = True, admin_name: str = "alice") -> RestEnv:
    """A temp dir with everything rest needs, initialised with ``ticrypt-admin
    init`` (``admin_name`` is the superadmin) and, if ``start``, a running
    daemon.  ``overrides`` replace or add ``[rest]`` keys."""
    directory = os.path.abspath(testcase.mktemp())
    env = make_rest_dir(directory, admin_name, overrides)
    code, out, err = await env.admin("init", "--superadmin", admin_name, "--public-key",
                                     env.admin_key_file[:-4] + ".pub")
    if code != 0:
        raise RuntimeError(f"ticrypt-admin init failed ({code}): {err}{out}")
    env.backend_public = identity.load_public_file(os.path.join(directory, "backend.pub"))
    if start:
        await env.start(testcase)
    return env
