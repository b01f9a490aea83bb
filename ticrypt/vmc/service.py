"""The vmc role's service: state, enrollment, process tracking, the pool.

Start-up: load (or create) the VM key and TLS certificate in ``state_dir``;
if not yet enrolled, enroll with rest using the single-use token (retried
with backoff while rest cannot be reached); then keep ``pool_size`` sockets
waiting at the proxy.  The readiness line is logged once the first socket
waits at the proxy.  A failure after start-up (a refused enrollment) stops
the reactor and exits 1 once shut down, so that a supervisor sees it.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.backoff import Backoff
from ticrypt.config import check_file_mode
from ticrypt.nft.apply import INft, NftError, SpawnNft
from ticrypt.service import (
    ListenerService,
    RoleService,
    StartupError,
    StartupFailed,
    exit_failed,
)
from ticrypt.vmc.cgroup import CgroupUnavailable
from ticrypt.vmc.config import VmcConfig
from ticrypt.vmc.enroll import EnrollError, enroll
from ticrypt.vmc.firewall import FirewallService
from ticrypt.vmc.pool import PoolSettings, ProxyPool
from ticrypt.vmc.processes import RunAs, Tracker, open_tracker
from ticrypt.vmc.state import Enrollment, OwnerKeyChanged, StateError, VmState

if TYPE_CHECKING:
    from ticrypt.vmc.tunnel import TunnelServer


def pool_settings(cfg: VmcConfig, proxy_url: str) -> PoolSettings:
    """The pool's settings: ``proxy_url``, and ``[vmc]`` and ``[exec]`` as loaded."""
    return PoolSettings(proxy_url=proxy_url, ca_file=cfg.vmc.ca_file,
                        links=cfg.vmc.links, sessions=cfg.exec.limits)


class _Later(Factory):
    """A listener's factory whose real factory exists only once the state is
    loaded (``startService``); the port is bound before, in
    ``privilegedStartService`` (port 22 needs root).  Until then a
    connection is closed at once."""

    noisy = False

    def __init__(self) -> None:
        self.target: IProtocolFactory | None = None

    def set_target(self, target: IProtocolFactory) -> None:
        self.target = target
        target.doStart()

    def stopFactory(self) -> None:
        if self.target is not None:
            self.target.doStop()

    def buildProtocol(self, addr: IAddress | None) -> IProtocol | None:  # type: ignore[override]
        if self.target is None or addr is None:
            return None
        return self.target.buildProtocol(addr)


class VmcService(RoleService):
    """Loads the state, enrolls if needed, then runs the proxy pool."""

    log = Logger()
    config: VmcConfig

    def __init__(self, config: VmcConfig, reactor: Any, rng: random.Random | None = None,
                 nft: INft | None = None):
        super().__init__("vmc", config)
        self._reactor = reactor
        self._nft = nft
        #: the VM's own rules (``[firewall] enabled``), installed before enrolling
        self.firewall: FirewallService | None = None
        self._random = rng or random.SystemRandom()
        self.pool: ProxyPool | None = None
        self.state: VmState | None = None
        self.audit: AuditLog | None = None
        self.tracker: Tracker | None = None
        self._pool_ready: defer.Deferred[None] = defer.Deferred()
        self.extra_ready.append(self._pool_ready)
        #: the tunnel server (``[tunnel] enabled``), built once the state is loaded
        self.tunnel: TunnelServer | None = None
        self._tunnel_factory, self._sftp_factory = _Later(), _Later()
        if config.tunnel.enabled:
            ListenerService("tunnel", endpoints.serverFromString(reactor, config.tunnel.listen),
                            self._tunnel_factory, ("tunnel", "listen")).setServiceParent(self)
        if config.sftp.enabled:
            ListenerService("sftp", endpoints.TCP4ServerEndpoint(
                reactor, config.sftp.port, interface="127.0.0.1"), self._sftp_factory,
                ("sftp", "port")).setServiceParent(self)

    def startService(self) -> None:
        cfg = self.config
        assert cfg is not None
        self.audit = AuditLog(cfg.vmc.audit_log, self._reactor, role="vmc")
        try:
            self.state = VmState(cfg.vmc.state_dir, self.audit)
        except StateError as e:
            # one line naming [vmc] state_dir, exit 1 (also in daemon mode)
            self._refuse(StartupError(str(e), "vmc", "state_dir"))
        self._track_processes()
        self._start_firewall()
        self._start_tunnel()
        self.ready_info.update(vm_public_key=identity.public_text(self.state.vm_key),
                               tls_fingerprint=self.state.tls_fingerprint)
        super().startService()
        d = defer.ensureDeferred(self._run())
        d.addErrback(self._fatal)

    def _track_processes(self) -> None:
        """Pick cgroups or the fallback; kill what a crashed run left."""
        cfg, audit = self.config, self.audit
        assert cfg is not None and audit is not None
        try:
            self.tracker = open_tracker(cfg.processes.cgroup, cfg.vmc.state_dir, self._reactor)
        except CgroupUnavailable as e:
            raise StartupFailed(f"ticrypt-vmc: {cfg.path}: [processes] cgroup: {e}") from None
        self.log.info("user processes: {mode}", mode=self.tracker.describe())
        left = self.tracker.clean_leftovers()
        if left:
            audit.write("leftover-processes-killed", mode=self.tracker.mode,
                        groups=[name for name, _ in left],
                        processes=sum(n for _, n in left), result="killed")

    def _start_firewall(self) -> None:
        """Table inet ticrypt_vmc (installed at start; vmc is ready only once
        it is in the kernel) and, with a log_group, the denied-egress reader."""
        cfg, state, audit = self.config, self.state, self.audit
        assert cfg is not None and state is not None and audit is not None
        if not cfg.firewall.enabled:
            return
        from ticrypt.nft.denied import DeniedEgressService

        enrolled = state.enrollment.proxy_url if state.enrollment is not None else None
        nft = self._nft or SpawnNft(self._reactor, self._reactor)
        self.firewall = FirewallService(cfg, nft, audit, enrolled)
        self.firewall.setServiceParent(self)
        self.extra_ready.append(self.firewall.when_ready())
        if cfg.firewall.log_group:
            DeniedEgressService(cfg.firewall.log_group, audit, self._reactor,
                                self._reactor).setServiceParent(self)

    def _start_tunnel(self) -> None:
        """The tunnel server and the SFTP server, as configured."""
        cfg, state, audit = self.config, self.state, self.audit
        assert cfg is not None and state is not None and audit is not None
        grant: dict[str, Any] = {}
        host_key = None
        # Both are off by default: their modules (Conch; the mux and its TLS)
        # are imported only when configured, like the firewall's reader.
        if cfg.sftp.enabled:
            from ticrypt.vmc.sftp import load_host_key

            host_key = load_host_key(cfg.vmc.state_dir)
            grant["sftp_host_key"] = host_key.public().toString("OPENSSH").decode()
            self.ready_info["sftp_host_key"] = grant["sftp_host_key"]
        if cfg.tunnel.enabled:
            from ticrypt.vmc.tunnel import TunnelServer, TunnelService, TunnelSettings

            t = cfg.tunnel
            self.tunnel = TunnelServer(
                reactor=self._reactor, clock=self._reactor, audit=audit,
                settings=TunnelSettings(ports=t.ports, handshake_timeout=t.handshake_timeout,
                                        connect_timeout=t.connect_timeout,
                                        max_connections=t.max_connections, pins=t.pins),
                state_dir=cfg.vmc.state_dir, tls_pem=state.tls_pem,
                tls_fingerprint=state.tls_fingerprint, extra_grant=grant)
            self._tunnel_factory.set_target(self.tunnel.factory)
            TunnelService(self.tunnel).setServiceParent(self)
        if host_key is not None:
            tunnel = self.tunnel

            def origin(peer: IAddress) -> tuple[bytes, str] | None:
                pin = tunnel.origins.user_of(peer) if tunnel is not None else None
                return (pin.user_key, pin.user) if pin is not None else None

            from ticrypt.vmc.sftp import SftpFactory

            assert cfg.sftp.root is not None  # VmcConfig.check
            self._sftp_factory.set_target(SftpFactory(cfg.sftp.root, host_key, origin, audit))

    async def _run(self) -> None:
        state = self.state
        assert state is not None and self.config is not None
        if self.firewall is not None:
            try:
                await self.firewall.when_ready()
            except StartupError:
                return  # reported, and the reactor stopped, by RoleService (extra_ready)
        if state.enrollment is None:
            await self._enroll()
        assert state.enrollment is not None
        if self.firewall is not None:
            try:
                await self.firewall.update(state.enrollment.proxy_url)
            except NftError as e:
                raise StartupError(f"cannot install the nftables rules for the enrolled "
                                   f"proxy: {e}", "firewall", "enabled") from None
        self.ready_info["vm_id"] = state.enrollment.vm_id
        self._start_pool()

    def _read_token(self) -> str:
        cfg = self.config
        assert cfg is not None
        path = cfg.vmc.enrollment_token_file
        try:
            if not path:
                raise ValueError("[vmc] enrollment_token_file is not set and this VM is "
                                 "not enrolled yet")
            check_file_mode(path, secret=True)
            with open(path, encoding="utf-8") as f:
                return f.read(4096).strip()
        except (OSError, ValueError) as e:
            raise EnrollError("no-token", f"cannot read the enrollment token: {e}",
                              permanent=True) from None

    async def _enroll(self) -> None:
        """Enroll with rest; retried with backoff until rest answers."""
        cfg, state, audit = self.config, self.state, self.audit
        assert cfg is not None and state is not None and audit is not None
        token = self._read_token()
        links = cfg.vmc.links
        backoff = Backoff(links.backoff_initial, links.backoff_max, self._random.random)
        while True:
            try:
                answer = await enroll(
                    self._reactor, cfg.vmc.rest_url, cfg.vmc.ca_file, token=token,
                    vm_public_key=identity.public_text(state.vm_key),
                    tls_fingerprint=state.tls_fingerprint,
                    timeout=cfg.vmc.request_timeout)
                enrollment = Enrollment.from_json(answer)
                break
            except ValueError as e:
                raise EnrollError("bad-response", f"malformed enrollment answer: {e}",
                                  permanent=True) from None
            except EnrollError as e:
                audit.write("enroll", result="failed", reason=e.code)
                if e.permanent:
                    raise
                delay = backoff.next_delay()
                self.log.warn("enrollment failed ({why}); retrying in {delay:.1f}s",
                              why=str(e), delay=delay)
                await _sleep(self._reactor, delay)
        try:
            state.accept_enrollment(enrollment)
        except OwnerKeyChanged as e:
            raise EnrollError("owner-key-change-refused", str(e), permanent=True) from None
        audit.write("enroll", vm=enrollment.vm_id, owner=enrollment.owner, result="ok")
        self.log.info("enrolled as VM {vm}", vm=enrollment.vm_id)

    def _start_pool(self) -> None:
        cfg, state, audit = self.config, self.state, self.audit
        assert cfg is not None and state is not None and audit is not None
        assert state.enrollment is not None
        e = cfg.exec
        self.pool = ProxyPool(reactor=self._reactor, clock=self._reactor,
                              random=self._random.random,
                              settings=pool_settings(
                                  cfg, cfg.vmc.proxy_url or state.enrollment.proxy_url),
                              state=state, audit=audit,
                              run_as=RunAs.lookup(e.run_as or None, e.shell),
                              tracker=self.tracker, tunnel=self.tunnel)
        self.pool.ready.chainDeferred(self._pool_ready)
        self.pool.setServiceParent(self)

    def _fatal(self, failure: Any) -> None:
        if failure.check(EnrollError):
            self.log.critical("ticrypt-vmc cannot start: {why}", why=str(failure.value))
        elif failure.check(StartupError):
            self.log.critical("{line}", line=self.failure_line(failure.value))
        else:
            self.log.failure("ticrypt-vmc cannot start", failure)
        if self._reactor.running:
            # twistd has no way to report a failure after start-up; exit 1 once
            # shut down so that a supervisor sees the failure instead of a stop.
            self._reactor.addSystemEventTrigger("after", "shutdown", exit_failed)
            self._reactor.stop()

    def stopService(self) -> Any:
        # The pool may wait for child processes to end: keep the audit log
        # open for the session-closed lines until it is done.
        d = defer.maybeDeferred(super().stopService)
        audit, tracker = self.audit, self.tracker

        def stop_tracking(result: Any) -> Any:
            if tracker is None:
                return result
            # what the pool's kills left, if anything; then remove the cgroups
            return tracker.shutdown().addBoth(lambda _: result)

        d.addBoth(stop_tracking)

        def close_audit(result: Any) -> Any:
            if audit is not None:
                audit.close()
            return result

        return d.addBoth(close_audit)


def _sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
