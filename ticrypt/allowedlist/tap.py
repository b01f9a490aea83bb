"""``twistd -n ticrypt-allowedlist --config etc/allowedlist.ini``.

Every key is documented in ``etc/allowedlist.ini``.  Start order: the DNS
listeners bind in ``privilegedStartService`` (port 53 before privileges
are shed; UDP and TCP on the same port, also when the port is 0); the
sync service reads the state file and installs the table (one atomic
``nft -f``, the previous table stays in the kernel until then); the
readiness line follows that first install; the feed poller keeps the
entries current.  Stopping leaves the table in the kernel.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error, task
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ticrypt.allowedlist.config import AllowedListConfig
from ticrypt.allowedlist.dns import AllowListServer
from ticrypt.allowedlist.entries import MAX_FEED, EntriesPoller
from ticrypt.allowedlist.policy import Policy
from ticrypt.allowedlist.sync import ForwardingPool, StateFile, Sync
from ticrypt.allowedlist.upstream import AddressBook, DnsPythonResolver
from ticrypt.audit import AuditLog
from ticrypt.http import load_secret
from ticrypt.http.client import JsonClient
from ticrypt.http.feed import FEED_TIMEOUT
from ticrypt.nft.apply import INft, OwnedTable, SpawnNft
from ticrypt.service import (
    RoleService,
    StartupError,
    listen_error_text,
    options_for,
    start_loop,
    stop_loop,
)

log = Logger()

Options = options_for("allowedlist", AllowedListConfig)

#: how often the DNS counters are logged (when they changed)
COUNTERS_INTERVAL = 60.0


@implementer(INft)
class NoNft:
    """``mode = off``: nothing is applied (DNS only, unprivileged tests)."""

    def apply(self, script: str) -> defer.Deferred[None]:
        return defer.succeed(None)


class DnsListenerService(Service):
    """UDP and TCP on one address and port (port 0: the kernel picks the
    UDP port and TCP takes the same)."""

    def __init__(self, reactor: Any, server: AllowListServer, host: str, port: int) -> None:
        self._reactor = reactor
        self.server = server
        self.host, self.port = host, port
        self.ports: list[IListeningPort] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if not self.ports:
            self._listen()

    def _listen(self) -> None:
        # with port 0, the UDP port the kernel picked may be taken for TCP:
        # try a few ports before giving up
        for _attempt in range(1 if self.port else 8):
            try:
                udp = self._reactor.listenUDP(self.port, self.server.udp_protocol(),
                                              interface=self.host, maxPacketSize=65535)
                self.ports.append(udp)
                port = getattr(udp.getHost(), "port", self.port)
                self.ports.append(self._reactor.listenTCP(port, self.server,
                                                          interface=self.host, backlog=128))
                return
            except error.CannotListenError as e:
                for p in self.ports:
                    p.stopListening()
                self.ports = []
                failure = e
        raise StartupError(listen_error_text(failure), "allowedlist", "dns_listen")

    def address(self) -> str:
        port = getattr(self.ports[0].getHost(), "port", 0) if self.ports else 0
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    def stopService(self) -> Any:
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


class CountersLog(Service):
    """Logs the DNS counters every minute when they changed."""

    log = Logger()

    def __init__(self, clock: Any, counters: Counter[str]) -> None:
        self._clock, self._counters = clock, counters
        self._last: dict[str, int] = {}
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = start_loop(self._tick, self._clock, COUNTERS_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        stop_loop(self._loop)

    def _tick(self) -> None:
        now = dict(self._counters)
        if now != self._last:
            self._last = now
            self.log.info("allowedlist dns: {counters}",
                          counters=" ".join(f"{k}={v}" for k, v in sorted(now.items())))


class _SyncService(Service):
    """Restores the state, then runs the sync (so nothing is read at
    makeService time)."""

    def __init__(self, sync: Sync) -> None:
        self.sync = sync
        self.poller: EntriesPoller | None = None

    def startService(self) -> None:
        super().startService()
        self.sync.restore()
        if self.poller is not None:
            # a feed older than the saved one is refused (rolled back)
            self.poller.serial = self.sync.serial
        self.sync.startService()

    def stopService(self) -> Any:
        super().stopService()
        return self.sync.stopService()


def make_sync(cfg: AllowedListConfig, reactor: Any, policy: Policy, audit: AuditLog,
              nft: INft | None = None) -> Sync:
    a = cfg.allowedlist
    if nft is None:
        nft = SpawnNft(reactor, reactor) if a.mode == "nft" else NoNft()
    return Sync(policy=policy, pool=ForwardingPool(a.forward_addresses),
                book=AddressBook(max_addresses=a.max_addresses_per_name, min_ttl=a.min_ttl,
                                 max_ttl=a.max_ttl),
                resolver=DnsPythonResolver(reactor, list(a.upstream), timeout=a.upstream_timeout),
                table=OwnedTable(nft), clock=reactor, table_name=a.nft_table,
                state=StateFile(a.state_dir), log_group=a.log_group, masquerade=a.masquerade,
                max_names_per_wildcard=a.max_names_per_wildcard,
                wildcard_idle=a.wildcard_idle, audit=audit.write)


def makeService(options: dict[str, Any], reactor: Any = None) -> RoleService:
    if reactor is None:
        from twisted.internet import reactor as _reactor
        reactor = _reactor
    cfg: AllowedListConfig = options["cfg"]
    a = cfg.allowedlist
    top = RoleService("allowedlist", cfg, reactor)
    audit = AuditLog(a.audit_log, clock=reactor, role="allowedlist")
    policy = Policy(a.vm_networks, refused_answer=a.refused_answer, rate=a.rate, burst=a.burst)
    sync = make_sync(cfg, reactor, policy, audit)
    server = AllowListServer(policy, reactor, admitter=sync, answer_ttl=a.answer_ttl,
                             answer_wait=a.answer_wait, max_tcp=a.max_tcp,
                             max_tcp_per_client=a.max_tcp_per_client, audit=audit.write)
    host, port = a.dns_listen
    dns = DnsListenerService(reactor, server, host, port)
    dns.setServiceParent(top)
    syncing = _SyncService(sync)
    syncing.setServiceParent(top)
    CountersLog(reactor, server.counters).setServiceParent(top)
    if a.mode == "nft" and a.log_group:
        # egress from the VMs that the table drops (copied to NFLOG) becomes
        # egress-denied audit lines
        from ticrypt.nft.denied import DeniedEgressService

        DeniedEgressService(a.log_group, audit, reactor, reactor).setServiceParent(top)

    def not_installed(f: Failure) -> None:
        raise StartupError(f"cannot install the nft table: {f.value}", "allowedlist", "mode")

    def ready(_: object) -> None:
        top.ready_info["dns"] = dns.address()
        top.ready_info["mode"] = a.mode

    top.extra_ready.append(sync.first.addCallbacks(ready, not_installed))
    if a.rest_url is None:
        log.warn("allowedlist: rest_url = off: the entries are those of the state file only")
    else:
        assert a.allowlist_feed_secret is not None  # AllowedListConfig.check
        syncing.poller = EntriesPoller(
            clock=reactor, client=JsonClient(reactor, a.ca_file, timeout=FEED_TIMEOUT,
                                             max_response=MAX_FEED, persistent=True),
            rest_url=a.rest_url, secret=load_secret(a.allowlist_feed_secret),
            apply=sync.set_entries, interval=a.poll_interval)
        syncing.poller.setServiceParent(top)
    return top
