"""ticrypt-proxy for tests: thin wrappers over :mod:`ticrypt.lab.deploy`
(files) and :mod:`ticrypt.lab.peers` (scripted websocket peers), and the
proxy service run in this process.

* :class:`Backend`: a backend signing key whose ``backend.pub`` is written
  in a folder, and the credentials it signs; no ticrypt-rest needed.
* :func:`write_proxy_config`: proxy.ini with plain tcp on 127.0.0.1 port 0
  and the status listener on, by default; :func:`make_tls`: CA + server PEM.
* :class:`WsClient`, :func:`open_ws`, :func:`vm_connect`, :func:`user_connect`,
  :func:`send_vm_auth`, :func:`client_factory`, :func:`get_status`: from
  :mod:`ticrypt.lab.peers`.
* :func:`start_proxy`: the proxy service in this process on a free port.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from ticrypt import identity
from ticrypt.config import load_config
from ticrypt.lab import deploy
from ticrypt.lab.deploy import Deployment
from ticrypt.lab.peers import (
    WsClient,
    client_factory,
    get_status,
    open_ws,
    send_vm_auth,
    user_connect,
    vm_connect,
)

__all__ = ["Backend", "WsClient", "client_factory", "get_status", "make_tls", "open_ws",
           "read_audit", "send_vm_auth", "start_proxy", "user_connect", "vm_connect",
           "write_proxy_config"]


class Backend(deploy.Backend):
    """A fresh backend key (or ``key``) whose public half is written as
    ``directory/backend.pub``."""

    def __init__(self, directory: str, key: Ed25519PrivateKey | None = None):
        super().__init__(key or identity.generate())
        self.write_public(os.path.join(directory, "backend.pub"))


def write_proxy_config(directory: str, backend: deploy.Backend, *,
                       listen: str = "tcp:0:interface=127.0.0.1",
                       status_listen: str = "tcp:0:interface=127.0.0.1",
                       allow_plain: bool | None = None, rest_url: str = "off",
                       feeds: dict[str, str] | None = None, **limits: Any) -> str:
    """Write ``proxy.ini`` into ``directory``; ``limits`` go to ``[limits]``
    verbatim (e.g. ``user_wait_timeout="1s"``), ``feeds`` to ``[proxy]``
    (``ca_file``, ``revocation_feed_secret``, ``revocation_poll_interval``).
    Returns its path."""
    if allow_plain is None:
        allow_plain = not listen.startswith("ssl:")
    settings: dict[str, str | None] = {
        "listen": listen, "allow_plain": "yes" if allow_plain else "no",
        "status_listen": status_listen, "backend_public_key": backend.pub_path,
        "rest_url": rest_url, "ca_file": None, "revocation_feed_secret": None}
    settings.update(feeds or {})
    return Deployment(directory).proxy_ini({k: str(v) for k, v in limits.items()},
                                           **settings)


def make_tls(directory: str) -> tuple[str, str]:
    """A CA and a server PEM for 127.0.0.1: returns (ca_path, server_pem)."""
    return Deployment(directory).ca()


def read_audit(directory: str) -> list[dict[str, Any]]:
    path = Deployment(directory).path("proxy_audit")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


async def start_proxy(testcase: TestCase, config_path: str, reactor: Any = None) -> Any:
    """Run the proxy service in-process; returns the RoleService with
    ``.port`` and ``.status_port`` set.  Stopped in cleanup."""
    from ticrypt.proxy import tap
    from ticrypt.proxy.config import ProxyConfig

    if reactor is None:
        from twisted.internet import reactor as _r
        reactor = _r
    cfg = load_config(config_path, ProxyConfig)
    service: Any = tap.makeService({"cfg": cfg}, reactor=reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    listeners: dict[str, Any] = {s.label: s for s in service.listeners()}
    await defer.gatherResults([s.ready for s in listeners.values()])
    service.port = listeners["proxy"].port.getHost().port
    service.status_port = (listeners["status"].port.getHost().port
                           if "status" in listeners else None)
    service.factory = listeners["proxy"].factory
    return service
