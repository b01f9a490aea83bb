"""``twistd -n ticrypt-connect --config etc/connect.ini``: the user's local agent.

Every key is documented in ``etc/connect.ini``.  The API listens on
127.0.0.1 (:mod:`ticrypt.connect.api`); at start connect writes a fresh
random API token, 0600, to ``token_file`` (the ``ticrypt`` CLI reads it
there) and announces itself with the readiness line.  Stopping connect
closes every tunnel.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger

from ticrypt.audit import AuditLog
from ticrypt.connect.api import ConnectResource, connect_site
from ticrypt.connect.certs import CertStore, pinned_client
from ticrypt.connect.config import LOOPBACK, ConnectConfig
from ticrypt.connect.tunnels import Tunnel, TunnelSpec, TunnelTable, mux_dialer
from ticrypt.fsutil import atomic_write
from ticrypt.http.server import LimitedFactory
from ticrypt.service import ListenerService, RoleService, StartupError, options_for

Options = options_for("connect", ConnectConfig)

log = Logger(namespace="ticrypt.connect")


class TokenService(Service):
    """Writes a new API token at start (so a token read by anyone before
    is worthless) and removes the file at stop."""

    def __init__(self, path: str):
        self.path = path
        self.token: str | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._write()

    def startService(self) -> None:
        super().startService()
        if self.token is None:
            self._write()

    def _write(self) -> None:
        token = secrets.token_urlsafe(32)
        try:
            atomic_write(self.path, (token + "\n").encode(), 0o600)
        except OSError as e:
            raise StartupError(f"cannot write {self.path}: {e.strerror}",
                               "connect", "token_file") from None
        self.token = token

    def stopService(self) -> Any:
        super().stopService()
        self.token = None
        try:
            os.unlink(self.path)
        except OSError:
            pass


class TunnelsService(Service):
    """Closes every tunnel when connect stops."""

    def __init__(self, table: TunnelTable):
        self.table = table

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self.table.close_all())


def local_listen(reactor: Any) -> Any:
    """Listen on 127.0.0.1:port (0: any free port)."""
    def listen(port: int, factory: IProtocolFactory) -> defer.Deferred[IListeningPort]:
        return endpoints.TCP4ServerEndpoint(reactor, port, interface=LOOPBACK).listen(factory)
    return listen


def make_connect_service(cfg: ConnectConfig, reactor: Any) -> RoleService:
    c, t = cfg.connect, cfg.tunnels
    top = RoleService("connect", cfg, reactor)
    tokens = TokenService(c.token_file)
    tokens.setServiceParent(top)
    audit = AuditLog(c.audit_log, reactor, role="connect")
    certs = CertStore(os.path.join(c.state_dir, "certs"), reactor, lifetime=t.cert_lifetime,
                      max_certs=t.max_certs)
    table = TunnelTable(t)
    TunnelsService(table).setServiceParent(top)

    def make_tunnel(tid: str, spec: TunnelSpec) -> Tunnel:
        creator = pinned_client(certs.get(spec.cert_id), spec.fingerprint)
        dial = mux_dialer(reactor, spec.proxy_host, spec.proxy_port, creator,
                          timeout=t.connect_timeout)
        return Tunnel(tid, spec, clock=reactor, dial=dial, listen=local_listen(reactor),
                      settings=t, audit=audit)

    listener: list[ListenerService] = []

    def address() -> tuple[str, int] | None:
        port = listener[0].port if listener else None
        if port is None:
            return None
        host = port.getHost()
        return str(getattr(host, "host", "")), int(getattr(host, "port", 0))

    resource = ConnectResource(token=lambda: tokens.token, address=address, certs=certs,
                               table=table, make_tunnel=make_tunnel, audit=audit)
    site = connect_site(resource, reactor=reactor, max_body=c.max_body,
                        idle_timeout=c.idle_timeout, request_timeout=c.request_timeout)
    limited = LimitedFactory(site, c.max_connections, c.max_connections)
    svc = ListenerService("api", endpoints.serverFromString(reactor, c.listen), limited,
                          key=("connect", "listen"))
    svc.setServiceParent(top)
    listener.append(svc)
    top.ready_info["token_file"] = c.token_file
    return top


def makeService(options: Any) -> RoleService:
    from twisted.internet import reactor

    return make_connect_service(options["cfg"], reactor)
