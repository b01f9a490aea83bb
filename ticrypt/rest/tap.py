"""twistd entry for ticrypt-rest: ``twistd -n ticrypt-rest --config rest.ini``."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import TimerService
from twisted.internet import endpoints
from twisted.logger import Logger

from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.rest import store
from ticrypt.rest.api import RestApi
from ticrypt.rest.config import SCHEMA
from ticrypt.rest.db import Database
from ticrypt.rest.web import RestSite
from ticrypt.service import ListenerService, RoleService, options_for

Options = options_for("rest", SCHEMA)

log = Logger(namespace="ticrypt.rest")

#: How often expired sessions are deleted.
PRUNE_INTERVAL = 3600.0


def make_rest_service(cfg: Any, reactor: Any) -> RoleService:
    """Wire database -> API -> site -> listener under one RoleService."""
    rest = cfg.rest
    top = RoleService("rest", cfg)
    db = Database(reactor, rest.database)
    db.setServiceParent(top)
    audit = AuditLog(rest.audit_log, reactor, role="rest")
    api = RestApi(
        clock=reactor, db=db, signing_key=identity.load_private(rest.signing_key),
        proxy_url=rest.proxy_url, audit=audit, session_ttl=rest.session_ttl,
        challenge_ttl=rest.challenge_ttl, ticket_ttl=rest.ticket_ttl,
        enrollment_ttl=rest.enrollment_ttl, login_window=rest.login_window,
        login_failures_per_address=rest.login_failures_per_address,
        login_failures_per_user=rest.login_failures_per_user,
        challenges_per_address=rest.challenges_per_address,
    )
    site = RestSite(api, rest.max_body, rest.idle_timeout, reactor=reactor)
    plain = not rest.listen.startswith("ssl:")
    if plain:
        log.warn("listening without TLS ({listen}): allow_plain_http = yes is for tests only",
                 listen=rest.listen)
    label = "http" if plain else "https"
    ListenerService(label, endpoints.serverFromString(reactor, rest.listen),
                    site).setServiceParent(top)

    def prune() -> None:
        d = db.run(store.prune, reactor.seconds())
        d.addErrback(lambda f: log.failure("pruning expired sessions failed", f))

    TimerService(PRUNE_INTERVAL, prune).setServiceParent(top)
    top.ready_info["backend_public_key"] = identity.public_text(api.public_key)
    return top


def makeService(options: Any) -> RoleService:
    from twisted.internet import reactor

    return make_rest_service(options["cfg"], reactor)
