"""twistd entry for ticrypt-rest: ``twistd -n ticrypt-rest --config rest.ini``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger

from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.http import load_secret
from ticrypt.http.client import JsonClient
from ticrypt.http.server import LimitedFactory
from ticrypt.rest import store
from ticrypt.rest.api import RestApi
from ticrypt.rest.config import RestConfig
from ticrypt.rest.db import Database
from ticrypt.rest.proxyctl import ProxyControl
from ticrypt.rest.web import rest_site
from ticrypt.service import ListenerService, RoleService, options_for, start_loop

Options = options_for("rest", RestConfig)

log = Logger(namespace="ticrypt.rest")

#: How often expired sessions, challenges and rate-limit entries are purged.
PRUNE_INTERVAL = 300.0


def make_purge(api: RestApi, db: Any, clock: Any) -> Callable[[], defer.Deferred[None]]:
    """The periodic job: forget expired challenges and rate-limit entries, and
    delete expired sessions.  It catches and logs its own errors, since a
    LoopingCall whose function raises (or whose Deferred fails) stops for good."""

    def purge() -> defer.Deferred[None]:
        try:
            api.purge()
        except Exception:
            log.failure("purging expired challenges failed")
        d = defer.maybeDeferred(db.run, store.prune, clock.seconds())
        d.addCallback(lambda n: log.debug("pruned {n} expired sessions", n=n))
        d.addErrback(lambda f: log.failure("pruning expired sessions failed", f))
        return d

    return purge


class PurgeService(Service):
    """Runs ``purge`` (:func:`make_purge`) on ``clock`` at start and then
    every :data:`PRUNE_INTERVAL` seconds; stopping waits for a purge under
    way.  What Twisted's ``TimerService`` does, without importing
    ``twisted.application.internet`` (its ClientService loads automat: about
    a twentieth of every rest start)."""

    def __init__(self, purge: Callable[[], defer.Deferred[None]], clock: Any):
        self._purge = purge
        self._clock = clock
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = start_loop(self._purge, self._clock, PRUNE_INTERVAL, now=True)

    def stopService(self) -> defer.Deferred[task.LoopingCall] | None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is None or not loop.running:
            return None
        finished = loop.deferred  # fires once a purge under way has ended
        loop.stop()
        return finished


def make_rest_service(cfg: RestConfig, reactor: Any) -> RoleService:
    """Wire database -> API -> site -> listener under one RoleService."""
    rest = cfg.rest
    top = RoleService("rest", cfg, reactor)
    db = Database(reactor, rest.database)
    db.setServiceParent(top)
    audit = AuditLog(rest.audit_log, reactor, role="rest")
    signing_key = identity.load_private(rest.signing_key)
    proxyctl = None
    if rest.proxy_control_url is not None:
        proxyctl = ProxyControl(
            client=JsonClient(reactor, rest.proxy_control_ca_file,
                              timeout=rest.proxy_control_timeout),
            url=rest.proxy_control_url, key=signing_key, clock=reactor)
    api = RestApi(
        clock=reactor, db=db, signing_key=signing_key,
        proxy_url=rest.proxy_url, audit=audit, settings=rest.api,
        feed_secret=(load_secret(rest.revocation_feed_secret)
                     if rest.revocation_feed_secret is not None else None),
        proxyctl=proxyctl,
        allowlist_secret=(load_secret(rest.allowlist_feed_secret)
                          if rest.allowlist_feed_secret is not None else None),
    )
    site = rest_site(api, reactor=reactor, max_body=rest.max_body,
                     idle_timeout=rest.idle_timeout, request_timeout=rest.request_timeout)
    plain = not rest.listen.startswith("ssl:")
    if plain:
        log.warn("listening without TLS ({listen}): allow_plain_http = yes is for tests only",
                 listen=rest.listen)
    label = "http" if plain else "https"
    limited = LimitedFactory(site, rest.max_connections, rest.max_connections_per_address)
    ListenerService(label, endpoints.serverFromString(reactor, rest.listen),
                    limited, key=("rest", "listen")).setServiceParent(top)

    PurgeService(make_purge(api, db, reactor), reactor).setServiceParent(top)
    top.ready_info["backend_public_key"] = identity.public_text(api.public_key)
    return top


def makeService(options: Any) -> RoleService:
    from twisted.internet import reactor

    return make_rest_service(options["cfg"], reactor)
