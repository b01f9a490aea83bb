"""``twistd -n ticrypt-proxy --config etc/proxy.ini``: options and service.

Every key is documented in ``etc/proxy.ini``.  ``makeService`` only wires
endpoints to factories; the config (including the backend public key file)
was fully checked when the options were parsed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.web.server import Site

from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.http import load_secret
from ticrypt.http.client import JsonClient
from ticrypt.http.feed import FEED_TIMEOUT
from ticrypt.http.server import LimitedFactory
from ticrypt.proxy.config import ProxyConfig
from ticrypt.proxy.ctlapi import ControlResource, control_site
from ticrypt.proxy.leases import LeaseJournal, LeaseService, Opener, UserspaceOpener
from ticrypt.proxy.pairing import PairingTable
from ticrypt.proxy.ports import LeaseTable
from ticrypt.proxy.replay import TicketJournal, TicketLedger, TicketLedgerService, TicketUses
from ticrypt.proxy.revocations import RevocationList, RevocationPoller, max_age
from ticrypt.proxy.status import status_resource
from ticrypt.proxy.tlsmem import lean_endpoint
from ticrypt.proxy.ws import RelayFactory
from ticrypt.service import ListenerService, RoleService, StartupError, options_for
from ticrypt.signed import MAX_FEED

log = Logger()

Options = options_for("proxy", ProxyConfig)


def make_factory(cfg: ProxyConfig, reactor: Any,
                 tickets: TicketUses | None = None) -> RelayFactory:
    """The websocket factory for ``cfg`` (shared by the service and tests);
    without ``tickets`` the ticket ledger is in memory only."""
    settings = cfg.limits
    factory = RelayFactory(
        reactor=reactor, clock=reactor,
        backend_key=identity.load_public_file(cfg.proxy.backend_public_key),
        table=PairingTable(settings.pairing), settings=settings,
        audit=AuditLog(cfg.proxy.audit_log, clock=reactor, role="proxy"),
        url=("wss" if cfg.proxy.listen.startswith("ssl:") else "ws") + "://localhost",
        tickets=tickets)
    if cfg.proxy.rest_url is not None:
        factory.revocations = RevocationList(factory.backend_key,
                                             max_age(cfg.proxy.revocation_poll_interval))
    return factory


def make_leases(cfg: ProxyConfig, reactor: Any, audit: AuditLog) -> LeaseService:
    """The pathway leases of ``[leases]`` (userspace listeners or nft rules)."""
    lc = cfg.leases
    opener: Opener
    if lc.mode == "nft":
        from ticrypt.proxy.nftleases import make_nft_opener
        opener = make_nft_opener(lc, reactor)
    else:
        opener = UserspaceOpener(reactor=reactor, interface=lc.interface,
                                 connect_timeout=lc.connect_timeout,
                                 idle_timeout=lc.connection_idle_timeout,
                                 max_connections=lc.max_connections_per_lease)
    service = LeaseService(table=LeaseTable(lc.ports, lc.limits), opener=opener, clock=reactor,
                           audit=audit, journal=LeaseJournal(lc.journal), public_host=lc.host)
    opener.service = service
    return service


def make_poller(cfg: ProxyConfig, reactor: Any, factory: RelayFactory,
                leases: LeaseService | None = None) -> RevocationPoller | None:
    """The job that follows rest's revocation feed (None when rest_url = off);
    it closes the revoked users' and sessions' pairs and leases."""
    p = cfg.proxy
    if p.rest_url is None or factory.revocations is None:
        return None
    assert p.revocation_feed_secret is not None  # ProxyConfig.check
    revocations = factory.revocations

    def apply() -> int:
        closed = factory.revoke_pairs()
        if leases is not None:
            closed += leases.revoke(revocations.users, revocations.sessions)
        return closed
    return RevocationPoller(
        clock=reactor, client=JsonClient(reactor, p.ca_file, timeout=FEED_TIMEOUT,
                                         max_response=2 * MAX_FEED, persistent=True),
        rest_url=p.rest_url, secret=load_secret(p.revocation_feed_secret),
        revocations=revocations, apply=apply,
        interval=p.revocation_poll_interval)


def makeService(options: dict[str, Any], reactor: Any = None) -> RoleService:
    if reactor is None:
        from twisted.internet import reactor as _reactor
        reactor = _reactor
    cfg: ProxyConfig = options["cfg"]
    journal = TicketJournal(cfg.proxy.ticket_ledger,
                            TicketLedger(cfg.limits.max_recent_tickets))
    factory = make_factory(cfg, reactor, tickets=journal)
    top = RoleService("proxy", cfg)
    # opened (loaded, compacted) at start, before any connection is read
    TicketLedgerService(journal, reactor, lambda text: StartupError(
        text, "proxy", "ticket_ledger")).setServiceParent(top)
    if not cfg.proxy.listen.startswith("ssl:"):
        log.warn("proxy: listening WITHOUT TLS on {listen} (allow_plain = yes); "
                 "use only on a trusted network or behind a TLS terminator",
                 listen=cfg.proxy.listen)
    # ssl: listener: RELEASE_BUFFERS, no tickets, no session cache (tlsmem)
    endpoint = lean_endpoint(endpoints.serverFromString(reactor, cfg.proxy.listen))
    ListenerService("proxy", endpoint, factory, key=("proxy", "listen")).setServiceParent(top)
    if cfg.proxy.status_listen is not None:
        site = Site(status_resource(factory.status))
        site.noisy = False
        ListenerService("status", endpoints.serverFromString(reactor, cfg.proxy.status_listen),
                        site, key=("proxy", "status_listen")).setServiceParent(top)
    leases = None
    if cfg.control.listen is not None:
        leases = make_leases(cfg, reactor, factory.audit)
        leases.setServiceParent(top)
        top.extra_ready.append(leases.ready)
        resource = ControlResource(
            leases, backend_public=factory.backend_key, clock=reactor, audit=factory.audit,
            window=cfg.control.request_window)
        limited = LimitedFactory(control_site(resource, reactor=reactor),
                                 cfg.control.max_connections, cfg.control.max_connections)
        ListenerService("control", endpoints.serverFromString(reactor, cfg.control.listen),
                        limited, key=("control", "listen")).setServiceParent(top)
    poller = make_poller(cfg, reactor, factory, leases)
    if poller is None:
        log.warn("proxy: rest_url = off: disabling a user or ending a session at rest "
                 "does not close the pairs already open")
    else:
        poller.setServiceParent(top)
    return top
