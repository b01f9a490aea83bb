"""The proxy pool: ``pool_size`` idle authenticated websockets to the
proxy's ``/v1/vm``, and the sessions of the sockets that users were paired with.

Each of ``pool_size`` :class:`_Slot` s keeps one socket (a
:class:`~ticrypt.vmc.leg.VmLeg`) waiting at the proxy.  When its socket gets
``paired`` the socket becomes a session and the slot opens a fresh one at
once; when a connection fails the slot retries after an exponential,
jittered, bounded delay (:class:`~ticrypt.backoff.Backoff`).  A slot hears
of its legs' events through the callbacks it builds them with; the pool
counts the sessions against ``max_sessions`` and ``max_sessions_per_user``
and builds each established channel's :class:`~ticrypt.vmc.session.VmSession`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ticrypt import __version__, closecodes
from ticrypt.audit import AuditLog
from ticrypt.backoff import Backoff
from ticrypt.channel import MAX_PLAINTEXT
from ticrypt.channel.records import MIN_RECORD_SIZE
from ticrypt.config import Duration, Int, Size, setting
from ticrypt.timers import cancel_call
from ticrypt.vmc.commands import TunnelGate
from ticrypt.vmc.leg import LegCallbacks, LegContext, LegFactory, VmLeg
from ticrypt.vmc.processes import RunAs, SessionChannel, Tracker
from ticrypt.vmc.processes import Send as SendApp
from ticrypt.vmc.session import Peer, VmSession
from ticrypt.vmc.state import VmState
from ticrypt.ws import set_limits, ws_endpoint

#: Largest valid record: version byte, sequence number, 1 MiB of plaintext, tag.
MAX_RECORD = MIN_RECORD_SIZE + MAX_PLAINTEXT
#: Default of ``[vmc] max_message``, the largest websocket message vmc reads.
#: Above MAX_RECORD, so that a record one byte too large still reaches the
#: channel and is refused ``record-too-large`` like any other bad record.
MAX_MESSAGE = 1100000


@attrs.frozen(kw_only=True)
class LinkSettings:
    """The pool's sockets to the proxy (keys of ``[vmc]``)."""

    pool_size: int = setting(Int(1, 64), 2, "sockets kept waiting at the proxy")
    backoff_initial: float = setting(Duration(), 1.0, "first retry delay (also enrollment)")
    backoff_max: float = setting(Duration(), 60.0, "longest retry delay (also enrollment)")
    connect_timeout: float = setting(Duration(), 10.0, "TCP and TLS connect to the proxy")
    handshake_timeout: float = setting(Duration(), 15.0, "websocket and channel handshakes")
    idle_timeout: float = setting(Duration(), 3600.0, "a session with no traffic is closed")
    ping_interval: float = setting(Duration(), 30.0, "websocket ping interval")
    max_message: int = setting(Size(min=MAX_RECORD + 1, max=16 * 1024 * 1024), MAX_MESSAGE,
                               "largest websocket message read; above the largest record")


@attrs.frozen(kw_only=True)
class SessionLimits:
    """What paired users may run (keys of ``[exec]``)."""

    max_sessions: int = setting(Int(1, 10000), 16, "sessions at the same time")
    max_sessions_per_user: int = setting(Int(1, 10000), 4, "sessions of one user")
    max_processes: int = setting(Int(1, 1000), 16, "running requests per session")
    kill_grace: float = setting(Duration(), 3.0, "from SIGTERM to SIGKILL")


@attrs.frozen(kw_only=True)
class PoolSettings:
    """Tunables of the pool: the proxy's URL (enrolled, or ``[vmc]
    proxy_url``), the CA, and the ``[vmc]`` and ``[exec]`` settings."""

    proxy_url: str
    ca_file: str
    links: LinkSettings = attrs.Factory(LinkSettings)
    sessions: SessionLimits = attrs.Factory(SessionLimits)


@attrs.define(eq=False)
class _Slot:
    """One place in the pool: at most one connecting or waiting socket.

    Its legs report to it through the callbacks it builds them with."""

    pool: ProxyPool
    backoff: Backoff
    factory: LegFactory = attrs.field(init=False)
    leg: VmLeg | None = None
    timer: IDelayedCall | None = None
    connecting: defer.Deferred[Any] | None = None

    def __attrs_post_init__(self) -> None:
        self.factory = self.pool.leg_factory(self._new_leg)

    def _new_leg(self) -> VmLeg:
        return self.pool.new_leg(LegCallbacks(on_waiting=self._waiting, on_paired=self._paired,
                                              on_closed=self._closed))

    def connect(self) -> None:
        self.timer = None
        if not self.pool.running:
            return
        d = self.pool.endpoint.connect(self.factory)
        self.connecting = d
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, leg: VmLeg) -> None:
        self.connecting = None
        self.leg = leg

    def _failed(self, reason: Failure) -> None:
        self.connecting = None
        if not reason.check(defer.CancelledError):
            self.pool.log.info("proxy connection failed: {why}",
                               why=reason.getErrorMessage())
        self.retry()

    def retry(self) -> None:
        self.leg = None
        if not self.pool.running:
            return
        delay = self.backoff.next_delay()
        self.pool.log.info("reconnecting to the proxy in {delay:.1f}s", delay=delay)
        self.timer = self.pool.clock.callLater(delay, self.connect)

    def stop(self) -> None:
        cancel_call(self.timer)
        self.timer = None
        if self.connecting is not None:
            self.connecting.cancel()
        if self.leg is not None:
            self.leg.stop()

    # -- from its legs ---------------------------------------------------------

    def _waiting(self, leg: VmLeg) -> None:
        if leg is self.leg:
            self.backoff.reset()
        self.pool.waiting()

    def _paired(self, leg: VmLeg) -> str | None:
        if leg is self.leg:  # it became a session: refill the slot at once
            self.leg = None
            self.connect()
        return self.pool.admit(leg)

    def _closed(self, leg: VmLeg, code: int | None, reason: str | None) -> None:
        self.pool.discard(leg)
        if leg is self.leg:
            self.pool.log.info("proxy socket closed ({code} {reason})", code=code,
                               reason=(reason or "")[:120])
            self.retry()


class ProxyPool(Service):
    """Keeps ``pool_size`` sockets waiting at the proxy; owns the sessions.

    ``ready`` fires once the first socket is waiting at the proxy.
    """

    log = Logger()

    def __init__(self, *, reactor: Any, clock: Any, random: Callable[[], float],
                 settings: PoolSettings, state: VmState, audit: AuditLog, run_as: RunAs,
                 endpoint: Any | None = None, tracker: Tracker | None = None,
                 tunnel: TunnelGate | None = None):
        assert state.enrollment is not None
        self.reactor = reactor
        self.clock = clock
        self.settings = settings
        self.state = state
        self.audit = audit
        self.run_as = run_as
        #: Keeps each channel's processes in a kernel-tracked group (None:
        #: sessions and process groups only).
        self.tracker = tracker
        #: the tunnel server's pins (``tunnel-accept``), if enabled
        self.tunnel = tunnel
        self.vm_id = state.enrollment.vm_id
        self.ready: defer.Deferred[None] = defer.Deferred()
        #: Legs paired with a user (counted against the session limits).
        self.sessions: set[VmLeg] = set()
        self.url = settings.proxy_url.rstrip("/") + "/v1/vm"
        # ws:// only if rest enrolled this VM with it (rest's allow_plain_http);
        # the schema refuses it in [vmc] proxy_url
        self.endpoint = endpoint if endpoint is not None else ws_endpoint(
            reactor, self.url, settings.ca_file, timeout=settings.links.connect_timeout,
            allow_plain=True)
        links = settings.links
        self.slots = [_Slot(self, Backoff(links.backoff_initial, links.backoff_max, random))
                      for _ in range(links.pool_size)]

    def leg_factory(self, build: Callable[[], VmLeg]) -> LegFactory:
        """The websocket factory of one slot: its legs come from ``build()``."""
        s = self.settings.links
        factory = LegFactory(build, url=self.url, reactor=self.reactor)
        factory.noisy = False
        # max_message 0: none in autobahn, VmLeg.onMessageFrameBegin enforces it
        return set_limits(factory, self.url, max_message=0,
                          handshake_timeout=s.handshake_timeout, ping_interval=s.ping_interval)

    def new_leg(self, callbacks: LegCallbacks) -> VmLeg:
        s = self.settings.links
        return VmLeg(LegContext(clock=self.clock, state=self.state, audit=self.audit,
                                max_message=s.max_message,
                                handshake_timeout=s.handshake_timeout,
                                open_session=self.open_session), callbacks)

    def open_session(self, peer: Peer, send_app: SendApp,
                     close: Callable[[int, str], None]) -> VmSession:
        """The session of a channel just established with ``peer``."""
        s = self.settings
        session = VmSession(
            peer=peer, state=self.state, info=self.info(), audit=self.audit,
            reactor=self.reactor, clock=self.clock, run_as=self.run_as,
            track=self.tracker.channel() if self.tracker else SessionChannel(),
            max_processes=s.sessions.max_processes, kill_grace=s.sessions.kill_grace,
            idle_timeout=s.links.idle_timeout, send_app=send_app, close=close,
            on_revoked=self.revoked, tunnel=self.tunnel)
        session.start()
        return session

    def info(self) -> dict[str, Any]:
        """The static part of the ``info`` answer."""
        enrollment = self.state.enrollment
        assert enrollment is not None
        return {"vm": self.vm_id, "hostname": socket.gethostname(), "owner": enrollment.owner,
                "version": __version__, "tls_fingerprint": self.state.tls_fingerprint}

    def startService(self) -> None:
        super().startService()
        for slot in self.slots:
            slot.connect()

    def stopService(self) -> defer.Deferred[None]:
        """Close every socket; fires once every child process is gone and
        the SIGKILLs for what is left of their sessions went out.

        twistd keeps the reactor running until then, so the SIGKILL that
        follows ``kill_grace`` after the SIGTERM still reaches children (and
        their shells' jobs) that ignore SIGTERM instead of leaving them behind.
        """
        super().stopService()
        for slot in self.slots:
            slot.stop()
        # SIGTERM now, SIGKILL after kill_grace
        waits = [leg.stop() for leg in list(self.sessions)]
        done = defer.gatherResults(waits, consumeErrors=True)
        # Bounded: a process stuck in the kernel must not block shutdown forever.
        done.addTimeout(self.settings.sessions.kill_grace + 5.0, self.clock)
        done.addErrback(lambda f: self.log.warn("child processes still running at stop"))
        result: defer.Deferred[None] = done.addCallback(lambda _: None)
        return result

    # -- from the slots' legs --------------------------------------------------

    def waiting(self) -> None:
        """A socket waits at the proxy for a user."""
        self.log.info("waiting at the proxy for a user")
        if not self.ready.called:
            self.ready.callback(None)

    def admit(self, leg: VmLeg) -> str | None:
        """A leg was paired: it counts as a session unless that is over a
        limit, whose name (``max_sessions``, ``max_sessions_per_user``) is
        returned."""
        if len(self.sessions) >= self.settings.sessions.max_sessions:
            return "max_sessions"
        if sum(1 for s in self.sessions if s.user == leg.user) \
                >= self.settings.sessions.max_sessions_per_user:
            return "max_sessions_per_user"
        self.sessions.add(leg)
        return None

    def discard(self, leg: VmLeg) -> None:
        """A leg closed: it no longer counts."""
        self.sessions.discard(leg)

    def revoked(self, key: bytes) -> None:
        """Close every session (and tunnel) of a user who just lost access."""
        if self.tunnel is not None:
            self.tunnel.revoked(key)
        for leg in list(self.sessions):
            if leg.user_key == key:
                leg.close(closecodes.NOT_AUTHORIZED.code,
                          closecodes.reason(closecodes.NOT_AUTHORIZED.name, "access revoked"))
