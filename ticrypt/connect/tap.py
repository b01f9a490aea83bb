"""``twistd -n ticrypt-connect --config etc/connect.ini``: the user's local agent.

Every key is documented in ``etc/connect.ini``.  The API listens on
127.0.0.1 (:mod:`ticrypt.connect.api`); at start connect writes a fresh
random API token, 0600, to ``token_file`` (the ``ticrypt`` CLI reads it
there) and announces itself with the readiness line.  Stopping connect
closes every tunnel.

With ``[page] rest_url`` set, the same listener serves the browser page
(:mod:`ticrypt.connect.page`) and its relays to rest
(:mod:`ticrypt.connect.restrelay`) and the proxy
(:mod:`ticrypt.connect.wsrelay`); at start connect logs the page's URL
with a fresh one-time sign-in link (also ``page_url`` in the readiness line).
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
from ticrypt.connect.api import ConnectResource, connect_site, header_text
from ticrypt.connect.certs import CertStore, pinned_client
from ticrypt.connect.config import LOOPBACK, ConnectConfig
from ticrypt.connect.page import WEB_DIR, PageFiles, PageRoot, PageTokens, vendor_missing
from ticrypt.connect.restrelay import RestRelay
from ticrypt.connect.tunnels import Tunnel, TunnelSpec, TunnelTable, mux_dialer
from ticrypt.connect.wsrelay import (
    PageRelayFactory,
    ProxyUrl,
    ProxyUrlSource,
    RelayResource,
    RelaySettings,
)
from ticrypt.fsutil import atomic_write
from ticrypt.http.client import JsonClient
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

    p = cfg.page
    page = PageTokens(reactor, p.link_ttl, p.session_ttl) if p.enabled else None
    resource = ConnectResource(token=lambda: tokens.token, address=address, certs=certs,
                               table=table, make_tunnel=make_tunnel, audit=audit, page=page)
    root = page_root(cfg, reactor, resource, audit)
    site = connect_site(root, reactor=reactor, max_body=c.max_body,
                        idle_timeout=c.idle_timeout, request_timeout=c.request_timeout)
    limited = LimitedFactory(site, c.max_connections, c.max_connections)
    svc = ListenerService("api", endpoints.serverFromString(reactor, c.listen), limited,
                          key=("connect", "listen"))
    svc.setServiceParent(top)
    listener.append(svc)
    top.ready_info["token_file"] = c.token_file
    if page is not None:
        svc.ready.addCallback(_announce_page, resource, top)
    return top


def page_root(cfg: ConnectConfig, reactor: Any, api: ConnectResource,
              audit: AuditLog) -> PageRoot:
    """The site's root: the page, its relays and the API (page off: the
    page's paths answer 503 ``page-disabled``)."""
    p = cfg.page
    admission = api.admission
    client = None
    proxy_url: ProxyUrlSource = _PageOff()
    if p.rest_url is not None:
        client = JsonClient(reactor, p.ca_file, timeout=p.rest_timeout,
                            max_response=cfg.connect.max_body * 16, persistent=True)
        proxy_url = ProxyUrl(client, p.rest_url, reactor)
    files = PageFiles(WEB_DIR, lambda r: admission.site_problem(
        header_text(r, b"host"), header_text(r, b"origin")), enabled=p.enabled)
    relay_factory = PageRelayFactory(
        reactor=reactor, clock=reactor, audit=audit,
        settings=RelaySettings(ca_file=p.ca_file, max_relays=p.max_relays,
                               handshake_timeout=p.handshake_timeout,
                               max_message=p.max_message, frames=p.frames),
        proxy_url=proxy_url)
    rest = RestRelay(admission=admission, client=client, rest_url=p.rest_url)
    return PageRoot(api, files, RelayResource(relay_factory, admission, p.enabled), rest)


class _PageOff:
    """The proxy's URL without ``[page] rest_url`` (the relay refuses first)."""

    async def get(self) -> str:
        raise ValueError("the page is off")

    def forget(self) -> None:
        pass


def _announce_page(port: Any, api: ConnectResource, top: RoleService) -> Any:
    """Log the page's URL with a one-time link; name it in the readiness line."""
    url, _ = api.new_page_url()
    top.ready_info["page_url"] = url
    log.info("page: open {url} in your browser (the link works once)", url=url)
    missing = vendor_missing()
    if missing:
        log.warn("page: the terminal's npm files are missing ({files}); run npm ci in "
                 "{web} (./dev does)", files=", ".join(missing), web=WEB_DIR)
    return port


def makeService(options: Any) -> RoleService:
    from twisted.internet import reactor

    return make_connect_service(options["cfg"], reactor)
