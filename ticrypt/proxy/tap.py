"""``twistd -n ticrypt-proxy --config etc/proxy.ini``: options and service.

Every key is documented in ``etc/proxy.ini``.  ``makeService`` only wires
endpoints to factories; the config (including the backend public key file)
was fully checked when the options were parsed.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.web.server import Site

from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.config import (
    Bool,
    Config,
    Duration,
    FilePath,
    Int,
    Key,
    Schema,
    ServerEndpoint,
    Size,
    Url,
)
from ticrypt.http import load_secret
from ticrypt.http.client import JsonClient
from ticrypt.proxy.framebudget import FrameLimits
from ticrypt.proxy.pairing import Limits, PairingTable
from ticrypt.proxy.replay import TicketJournal, TicketLedger, TicketLedgerService, TicketUses
from ticrypt.proxy.revocations import FEED_TIMEOUT, RevocationList, RevocationPoller, max_age
from ticrypt.proxy.status import status_resource
from ticrypt.proxy.tlsmem import lean_endpoint
from ticrypt.proxy.ws import RelayFactory, Settings
from ticrypt.service import ListenerService, RoleService, StartupError, options_for
from ticrypt.signed import MAX_FEED

log = Logger()

_D = Settings()
_L = Limits()
_F = FrameLimits()


def _validate(cfg: Config) -> None:
    listen: str = cfg.proxy.listen
    if not listen.startswith("ssl:") and not cfg.proxy.allow_plain:
        raise cfg.error("proxy", "listen", f"expected an ssl: endpoint, got {listen!r} "
                        "(plain websockets need allow_plain = yes)")
    try:
        identity.load_public_file(cfg.proxy.backend_public_key)
    except identity.KeyFileError as e:
        raise cfg.error("proxy", "backend_public_key", str(e)) from None
    _validate_revocations(cfg)
    lim = cfg.limits
    if lim.max_frame_size > lim.max_message_size:
        raise cfg.error("limits", "max_frame_size", "must not exceed max_message_size")


def _validate_revocations(cfg: Config) -> None:
    p = cfg.proxy
    if p.rest_url is None:
        return
    if p.rest_url.startswith("https:") and p.ca_file is None:
        raise cfg.error("proxy", "ca_file", "an https rest_url needs the CA file")
    if p.rest_url.startswith("http:") and not p.allow_plain:
        raise cfg.error("proxy", "rest_url", "http:// needs allow_plain = yes; use https://")
    if p.revocation_feed_secret is None:
        raise cfg.error("proxy", "revocation_feed_secret",
                        "missing: rest_url is set, so the feed's bearer secret is needed")
    try:
        load_secret(p.revocation_feed_secret)
    except ValueError as e:
        raise cfg.error("proxy", "revocation_feed_secret", str(e)) from None


@attrs.frozen
class _OptionalUrl(Url):
    """An https (or http) URL, or ``off``."""

    schemes: tuple[str, ...] = ("https", "http")

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "an https:// URL, or off"

    def parse(self, raw: str, ctx: Any) -> str | None:  # type: ignore[override]
        if raw.strip().lower() == "off":
            return None
        return super().parse(raw, ctx)


@attrs.frozen
class _OptionalServerEndpoint(ServerEndpoint):
    """A server endpoint string, or ``off`` (the default) for none."""

    expected: str = "a server endpoint string such as tcp:8081:interface=127.0.0.1, or off"

    def parse(self, raw: str, ctx: Any) -> str | None:  # type: ignore[override]
        if raw.strip().lower() == "off":
            return None
        return super().parse(raw, ctx)


SCHEMA = Schema(
    sections={
        "proxy": {
            "listen": Key(ServerEndpoint(), doc="public websocket listener"),
            "allow_plain": Key(Bool(), "no", doc="permit a non-ssl listen endpoint"),
            "status_listen": Key(_OptionalServerEndpoint(), "off",
                                 doc="read-only GET /v1/status listener"),
            "backend_public_key": Key(FilePath(), doc="backend.pub from ticrypt-admin init"),
            "audit_log": Key(FilePath(must_exist=False), doc="JSON-lines audit log"),
            "ticket_ledger": Key(FilePath(must_exist=False), "proxy-tickets.ledger",
                                 doc="ids of used tickets, kept across restarts"),
            "rest_url": Key(_OptionalUrl(), doc="rest base URL for the revocation feed, or off"),
            "ca_file": Key(FilePath(), None, doc="CA that signs rest's certificate"),
            "revocation_feed_secret": Key(FilePath(secret=True), None,
                                          doc="bearer secret of the feed (rest's too)"),
            "revocation_poll_interval": Key(Duration(min=0.1, max=3600), "2s",
                                            doc="how often the feed is fetched"),
        },
        "limits": {
            "max_message_size": Key(Size(min=1024), str(_D.max_message_size)),
            "max_frame_size": Key(Size(min=1024), str(_D.max_frame_size)),
            "max_connections": Key(Int(1, 10_000_000), str(_D.max_connections)),
            "max_waiting_per_vm": Key(Int(1, 100_000), str(_L.max_waiting_per_vm)),
            "max_waiting_total": Key(Int(1, 10_000_000), str(_L.max_waiting_total)),
            "max_pairs": Key(Int(1, 10_000_000), str(_L.max_pairs)),
            "user_wait_timeout": Key(Duration(), f"{_D.user_wait_timeout:g}s"),
            "handshake_timeout": Key(Duration(), f"{_D.handshake_timeout:g}s"),
            "idle_timeout": Key(Duration(), f"{_D.idle_timeout:g}s"),
            "ping_interval": Key(Duration(), f"{_D.ping_interval:g}s"),
            "ping_timeout": Key(Duration(), f"{_D.ping_timeout:g}s"),
            "max_buffered": Key(Size(min=4096), str(_D.max_buffered)),
            "max_recent_tickets": Key(Int(100, 10_000_000), str(_D.max_recent_tickets)),
            "open_handshake_timeout": Key(Duration(), f"{_D.open_handshake_timeout:g}s"),
            "close_handshake_timeout": Key(Duration(), f"{_D.close_handshake_timeout:g}s"),
            "max_message_frames": Key(Int(1, 1_000_000), str(_F.max_message_frames)),
            "max_control_frames": Key(Int(1, 1_000_000), str(_F.max_control_frames)),
            "control_frames_interval": Key(Duration(max=3600),
                                           f"{_F.control_frames_interval:g}s"),
        },
    },
    optional_sections=frozenset({"limits"}),
    validate=_validate,
)

Options = options_for("proxy", SCHEMA)


def settings_from(cfg: Config) -> tuple[Settings, Limits]:
    lim = cfg.limits
    settings = Settings(
        max_message_size=lim.max_message_size, max_frame_size=lim.max_frame_size,
        max_connections=lim.max_connections, user_wait_timeout=lim.user_wait_timeout,
        handshake_timeout=lim.handshake_timeout, idle_timeout=lim.idle_timeout,
        ping_interval=lim.ping_interval, ping_timeout=lim.ping_timeout,
        max_buffered=lim.max_buffered, max_recent_tickets=lim.max_recent_tickets,
        open_handshake_timeout=lim.open_handshake_timeout,
        close_handshake_timeout=lim.close_handshake_timeout,
        frames=FrameLimits(max_message_frames=lim.max_message_frames,
                           max_control_frames=lim.max_control_frames,
                           control_frames_interval=lim.control_frames_interval))
    limits = Limits(max_waiting_per_vm=lim.max_waiting_per_vm,
                    max_waiting_total=lim.max_waiting_total, max_pairs=lim.max_pairs)
    return settings, limits


def make_factory(cfg: Config, reactor: Any, tickets: TicketUses | None = None) -> RelayFactory:
    """The websocket factory for ``cfg`` (shared by the service and tests);
    without ``tickets`` the ticket ledger is in memory only."""
    settings, limits = settings_from(cfg)
    factory = RelayFactory(
        reactor=reactor, clock=reactor,
        backend_key=identity.load_public_file(cfg.proxy.backend_public_key),
        table=PairingTable(limits), settings=settings,
        audit=AuditLog(cfg.proxy.audit_log, clock=reactor, role="proxy"),
        url=("wss" if cfg.proxy.listen.startswith("ssl:") else "ws") + "://localhost",
        tickets=tickets)
    if cfg.proxy.rest_url is not None:
        factory.revocations = RevocationList(factory.backend_key,
                                             max_age(cfg.proxy.revocation_poll_interval))
    return factory


def make_poller(cfg: Config, reactor: Any, factory: RelayFactory) -> RevocationPoller | None:
    """The job that follows rest's revocation feed (None when rest_url = off)."""
    p = cfg.proxy
    if p.rest_url is None or factory.revocations is None:
        return None
    return RevocationPoller(
        clock=reactor, client=JsonClient(reactor, p.ca_file, timeout=FEED_TIMEOUT,
                                         max_response=2 * MAX_FEED, persistent=True),
        rest_url=p.rest_url, secret=load_secret(p.revocation_feed_secret),
        revocations=factory.revocations, apply=factory.revoke_pairs,
        interval=p.revocation_poll_interval)


def makeService(options: dict[str, Any], reactor: Any = None) -> RoleService:
    if reactor is None:
        from twisted.internet import reactor as _reactor
        reactor = _reactor
    cfg: Config = options["cfg"]
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
    poller = make_poller(cfg, reactor, factory)
    if poller is None:
        log.warn("proxy: rest_url = off: disabling a user or ending a session at rest "
                 "does not close the pairs already open")
    else:
        poller.setServiceParent(top)
    return top
