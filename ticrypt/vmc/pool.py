"""The proxy pool: idle authenticated websockets to the proxy's ``/v1/vm``,
and the VM end of the secure channel on each socket once a user is paired.

Each of ``pool_size`` :class:`_Slot` s keeps one socket waiting at the proxy.
When its socket gets ``paired`` the socket becomes a session and the slot
opens a fresh one at once; when a connection fails the slot retries after an
exponential, jittered, bounded delay (:class:`~ticrypt.backoff.Backoff`).

A :class:`VmLeg` goes through::

    challenge -> (vm-auth sent) -> waiting -> paired -> established -> closed

Before ``paired`` it speaks the proxy's JSON control messages; after, every
message belongs to the secure channel (:class:`~ticrypt.channel.VmChannel`):
handshake text messages, then sealed binary records carrying the application
protocol (:mod:`ticrypt.channel.app`).
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ticrypt import __version__, closecodes, identity, tlsutil
from ticrypt.audit import AuditLog
from ticrypt.backoff import Backoff
from ticrypt.channel import (
    MAX_PLAINTEXT,
    ChannelError,
    Delivered,
    Established,
    SendMessage,
    VmChannel,
    app,
)
from ticrypt.channel.records import MIN_RECORD_SIZE
from ticrypt.vmc.commands import (
    Cancel,
    Dispatcher,
    Eof,
    Resize,
    Revoked,
    Send,
    StartExec,
    StartShell,
    Stdin,
    Violation,
)
from ticrypt.vmc.control import Action as ControlAction
from ticrypt.vmc.control import Close, Paired, VmControl, Waiting
from ticrypt.vmc.control import Send as SendText
from ticrypt.vmc.processes import ProcessGroup, RunAs, SessionChannel, Tracker
from ticrypt.vmc.state import VmState

#: Largest valid record: version byte, sequence number, 1 MiB of plaintext, tag.
MAX_RECORD = MIN_RECORD_SIZE + MAX_PLAINTEXT
#: Default of ``[vmc] max_message``, the largest websocket message vmc reads.
#: Above MAX_RECORD, so that a record one byte too large still reaches the
#: channel and is refused ``record-too-large`` like any other bad record.
MAX_MESSAGE = 1100000
#: Close when vmc stops: 1000 with the reason ``going-away``.  Not 1001
#: (:data:`~ticrypt.closecodes.GOING_AWAY`): autobahn lets an application
#: send only 1000 or 3000-4999 (sendClose raises otherwise).
STOPPING = (closecodes.NORMAL.code, closecodes.reason(closecodes.GOING_AWAY.name,
                                                      "vmc stopping"))


@attrs.frozen
class PoolSettings:
    """Tunables of the pool (from ``[vmc]``, ``[exec]`` and ``[limits]``)."""

    proxy_url: str
    ca_file: str
    pool_size: int = 2
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    connect_timeout: float = 10.0
    handshake_timeout: float = 15.0
    idle_timeout: float = 3600.0
    ping_interval: float = 30.0
    max_message: int = MAX_MESSAGE
    max_sessions: int = 16
    max_sessions_per_user: int = 4
    max_processes: int = 16
    kill_grace: float = 3.0


class Phase(enum.Enum):
    CONNECTING = "connecting"
    CONTROL = "control"  # the proxy's control exchange (VmLeg.control)
    HANDSHAKE = "handshake"  # paired: the secure channel's handshake
    ESTABLISHED = "established"  # the channel carries the application protocol
    CLOSED = "closed"


class VmLeg(WebSocketClientProtocol):
    """One websocket to the proxy: control dance, then the secure channel."""

    # autobahn owns ``log`` (txaio) and ``state``; ours are plog and phase.
    plog = Logger()
    factory: _LegFactory

    phase = Phase.CONNECTING
    control: VmControl
    channel: VmChannel | None = None
    dispatcher: Dispatcher | None = None
    group: ProcessGroup | None = None
    user: str = ""
    user_key: bytes | None = None
    client: str = ""
    _timer: IDelayedCall | None = None
    _idle_timer: IDelayedCall | None = None
    _close_sent = False
    _incoming = 0
    _incoming_binary = False

    @property
    def pool(self) -> ProxyPool:
        return self.factory.pool

    # -- autobahn callbacks ------------------------------------------------

    def onOpen(self) -> None:
        self.phase = Phase.CONTROL
        self.control = VmControl(self.pool.state.vm_key, self.pool.vm_id,
                                 self.pool.credential, self.pool.settings.max_message)
        self._arm(self.pool.settings.handshake_timeout, "proxy authentication")

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._incoming, self._incoming_binary = 0, isBinary

    def onMessageFrameBegin(self, length: int) -> None:
        # vmc bounds messages itself, not through autobahn, whose 1009 the
        # user would see as 4010 peer-lost: a message over max_message is
        # refused by its announced length as soon as a frame header says so
        # (PROTOCOL.md §4 Records).
        super().onMessageFrameBegin(length)
        self._incoming += length
        if self._incoming > self.pool.settings.max_message and not self._close_sent:
            self._oversized()

    def onMessageFrameData(self, payload: bytes) -> None:
        if self._close_sent:
            return  # closing: read nothing more into memory
        super().onMessageFrameData(payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._close_sent:
            return
        if self.phase is Phase.CONTROL:
            self._control_actions(self.control.message(payload, isBinary))
        elif self.phase in (Phase.HANDSHAKE, Phase.ESTABLISHED):
            self._channel_message(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        previous, self.phase = self.phase, Phase.CLOSED
        self._disarm()
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        if self.group is not None:
            self.group.close()
        if self.channel is not None:
            self.channel.close()
        if previous is Phase.ESTABLISHED:
            self.pool.audit.write("session-closed", vm=self.pool.vm_id, user=self.user,
                                  user_key=self._fp(), client=self.client, code=code,
                                  result="closed")
        self.pool.leg_closed(self, previous, code, reason)

    # -- helpers -------------------------------------------------------------

    def _fp(self) -> str:
        return identity.fingerprint(self.user_key) if self.user_key else ""

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.pool.clock.callLater(seconds, self._timed_out, what)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, what: str) -> None:
        self.plog.info("{what} timed out", what=what)
        if self.phase is Phase.CONTROL:
            self._control_actions(self.control.timed_out())
            return
        if self.phase is Phase.HANDSHAKE:
            self.pool.audit.write("session-refused", vm=self.pool.vm_id, user=self.user,
                                  client=self.client, reason="handshake-timeout",
                                  result="refused")
        self.close(closecodes.TIMEOUT.code, closecodes.reason(closecodes.TIMEOUT.name, what))

    def close(self, code: int, reason: str) -> None:
        """Close with a code and a short reason, ``name: text`` or ``name``
        (PROTOCOL.md §1.2; vmc keeps it under 120 characters).

        The children are signalled now, not when the close handshake ends
        (which the far end may delay): a revoked user loses access at once.
        """
        if self._close_sent:
            return
        self._close_sent = True
        if self.group is not None:
            self.group.close()
        self.sendClose(code, reason[:120])

    # -- proxy control messages ------------------------------------------

    def _control_actions(self, actions: list[ControlAction]) -> None:
        for action in actions:
            if isinstance(action, SendText):
                self.sendMessage(action.text.encode(), isBinary=False)
            elif isinstance(action, Close):
                self.close(action.code, action.reason)
            elif isinstance(action, Waiting):
                self._disarm()
                self.pool.leg_waiting(self)
            elif isinstance(action, Paired):
                self._paired(action)

    def _paired(self, paired: Paired) -> None:
        self.phase = Phase.HANDSHAKE
        self.user, self.client = paired.user, paired.client
        over = self.pool.leg_paired(self)
        if over:
            self.pool.audit.write("session-refused", vm=self.pool.vm_id, user=self.user,
                                  client=self.client, reason="over-limit", limit=over,
                                  result="refused")
            self.close(closecodes.OVER_LIMIT.code, closecodes.reason(
                closecodes.OVER_LIMIT.name, "too many sessions "
                + ("for this user" if over == "max_sessions_per_user" else "on this VM")))
            return
        self.channel = VmChannel(self.pool.state.vm_key, self.pool.vm_id, self._authorize)
        self._arm(self.pool.settings.handshake_timeout, "secure channel handshake")

    # -- secure channel ----------------------------------------------------

    def _authorize(self, user_key: bytes) -> bool:
        self.user_key = user_key  # for the audit line, also when refused
        return self.pool.state.is_authorized(user_key)

    def _channel_message(self, payload: bytes, is_binary: bool) -> None:
        assert self.channel is not None
        try:
            message: bytes | str = payload if is_binary else payload.decode("utf-8")
            events = self.channel.receive(message)
        except UnicodeDecodeError:
            self._channel_failed(ChannelError("bad-message"))
            return
        except ChannelError as e:
            self._channel_failed(e)
            return
        for event in events:
            if isinstance(event, SendMessage):
                data = event.data
                if isinstance(data, str):
                    self.sendMessage(data.encode("utf-8"), isBinary=False)
                else:
                    self.sendMessage(data, isBinary=True)
            elif isinstance(event, Established):
                self._established(event.peer_key)
            elif isinstance(event, Delivered):
                self._touch()
                self._app_message(event.plaintext)
            if self._close_sent:
                return

    def _channel_failed(self, e: ChannelError) -> None:
        key = self.channel.peer_key if self.channel is not None else None
        self.user_key = self.user_key or key
        event = "session-refused" if self.phase is Phase.HANDSHAKE else "session-error"
        self.pool.audit.write(event, vm=self.pool.vm_id, user=self.user, user_key=self._fp(),
                              client=self.client, reason=e.code, result="refused")
        if e.code == "not-authorized":
            self.close(closecodes.NOT_AUTHORIZED.code, closecodes.reason(
                closecodes.NOT_AUTHORIZED.name, "this user is not authorized on this VM"))
        else:
            # 4400 carries the channel's own error name (PROTOCOL.md §1.2)
            self.close(closecodes.CHANNEL_ERROR.code, closecodes.reason(e.code))

    def _oversized(self) -> None:
        """A message over ``max_message``: refused as the channel would refuse
        it, judged by its size alone; before pairing, a bad control message."""
        if self.phase is Phase.CONTROL:
            self._control_actions(self.control.oversized())
            return
        established = self.phase is Phase.ESTABLISHED
        if self._incoming_binary:
            code = "record-too-large" if established else "unexpected-message"
        else:
            code = "plaintext-after-handshake" if established else "bad-message"
        self._channel_failed(ChannelError(code))

    def _established(self, user_key: bytes) -> None:
        self._disarm()
        self.phase = Phase.ESTABLISHED
        self.user_key = user_key
        pool = self.pool
        owner = pool.state.is_owner(user_key)
        pool.audit.write("session-open", vm=pool.vm_id, user=self.user, user_key=self._fp(),
                         client=self.client, owner=owner, result="ok")
        self.dispatcher = Dispatcher(pool.state, user_key, pool.info(),
                                     max_processes=pool.settings.max_processes)
        self.group = ProcessGroup(pool.reactor, pool.run_as, self._send_app,
                                  self.dispatcher.finished, self._stdin_consumed,
                                  kill_grace=pool.settings.kill_grace,
                                  track=pool.tracker.channel() if pool.tracker else SessionChannel())
        # Children's output stops when the websocket's transport buffer is full.
        self.transport.registerProducer(self.group, True)  # type: ignore[union-attr]
        self._touch()

    def _touch(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.pool.settings.idle_timeout)
        else:
            self._idle_timer = self.pool.clock.callLater(self.pool.settings.idle_timeout,
                                                         self._idle)

    def _idle(self) -> None:
        if self.group is not None and self.group.count:
            self._touch()  # a running command is not idleness
            return
        self.close(closecodes.TIMEOUT.code, closecodes.reason(closecodes.TIMEOUT.name, "idle"))

    def _stdin_consumed(self, rid: int, n: int) -> None:
        """A child took ``n`` stdin bytes: the frontend may send that many more."""
        if self.dispatcher is not None:
            for action in self.dispatcher.consumed(rid, n):
                if isinstance(action, Send):
                    self._send_app(action.header, action.body)

    def _violation(self, v: Violation) -> None:
        self.pool.audit.write("session-error", vm=self.pool.vm_id, user=self.user,
                              user_key=self._fp(), client=self.client, reason=v.code,
                              result="closed")
        self.close(closecodes.CHANNEL_ERROR.code, closecodes.reason(v.code, v.message))

    def _send_app(self, header: dict[str, Any], body: bytes = b"") -> None:
        if self._close_sent or self.channel is None or self.phase is not Phase.ESTABLISHED:
            return
        try:
            record = self.channel.seal(app.encode(header, body))
        except ChannelError as e:
            self._channel_failed(e)
            return
        self.sendMessage(record, isBinary=True)

    def _app_message(self, plaintext: bytes) -> None:
        assert self.dispatcher is not None and self.group is not None
        try:
            header, body = app.decode(plaintext)
        except app.AppError as e:
            self._send_app({"t": "error", "code": e.code, "message": e.message})
            return
        group = self.group
        for action in self.dispatcher.handle(header, body):
            if isinstance(action, Send):
                self._send_app(action.header, action.body)
            elif isinstance(action, StartExec):
                self.pool.audit.write("exec", vm=self.pool.vm_id, user=self.user,
                                      user_key=self._fp(), command=action.argv[0][:200],
                                      result="started")
                group.start_exec(action.rid, action.argv, action.window)
            elif isinstance(action, StartShell):
                self.pool.audit.write("shell", vm=self.pool.vm_id, user=self.user,
                                      user_key=self._fp(), result="started")
                group.start_shell(action.rid, action.term, action.rows, action.cols,
                                  action.window)
            elif isinstance(action, Stdin):
                group.write_stdin(action.rid, action.data)
            elif isinstance(action, Eof):
                group.eof(action.rid)
            elif isinstance(action, Cancel):
                group.cancel(action.rid)
            elif isinstance(action, Resize):
                group.resize(action.rid, action.rows, action.cols)
            elif isinstance(action, Revoked):
                self.pool.revoked(action.key)
            elif isinstance(action, Violation):
                self._violation(action)
                return


class _LegFactory(WebSocketClientFactory):
    protocol = VmLeg  # type: ignore[assignment]
    pool: ProxyPool


@attrs.define(eq=False)
class _Slot:
    """One place in the pool: at most one connecting or waiting socket."""

    pool: ProxyPool
    backoff: Backoff
    leg: VmLeg | None = None
    timer: IDelayedCall | None = None
    connecting: defer.Deferred[Any] | None = None

    def connect(self) -> None:
        self.timer = None
        if not self.pool.running:
            return
        d = self.pool.endpoint.connect(self.pool.factory)
        self.connecting = d
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, leg: VmLeg) -> None:
        self.connecting = None
        self.leg = leg
        leg.slot = self  # type: ignore[attr-defined]

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
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.connecting is not None:
            self.connecting.cancel()
        if self.leg is not None:
            self.leg.close(*STOPPING)


class ProxyPool(Service):
    """Keeps ``pool_size`` sockets waiting at the proxy; owns the sessions.

    ``ready`` fires once the first socket is waiting at the proxy.
    """

    log = Logger()

    def __init__(self, *, reactor: Any, clock: Any, random: Callable[[], float],
                 settings: PoolSettings, state: VmState, audit: AuditLog, run_as: RunAs,
                 endpoint: Any | None = None, tracker: Tracker | None = None):
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
        self.vm_id = state.enrollment.vm_id
        self.credential = state.enrollment.vm_credential
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.sessions: set[VmLeg] = set()
        url = settings.proxy_url.rstrip("/") + "/v1/vm"
        self.factory = _LegFactory(url=url, reactor=reactor)
        self.factory.pool = self
        self.factory.noisy = False
        self.factory.setProtocolOptions(
            # none in autobahn: VmLeg.onMessageFrameBegin enforces max_message
            maxMessagePayloadSize=0,
            maxFramePayloadSize=0,
            openHandshakeTimeout=settings.handshake_timeout,
            closeHandshakeTimeout=5,
            autoPingInterval=settings.ping_interval,
            autoPingTimeout=settings.ping_interval,
            perMessageCompressionOffers=[],
        )
        self.endpoint = endpoint if endpoint is not None else self._endpoint(url)
        self.slots = [_Slot(self, Backoff(settings.backoff_initial, settings.backoff_max,
                                          random)) for _ in range(settings.pool_size)]

    def _endpoint(self, url: str) -> Any:
        parts = urlsplit(url)
        host = parts.hostname or ""
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        ep = HostnameEndpoint(self.reactor, host, port, timeout=self.settings.connect_timeout)
        if secure:
            return wrapClientTLS(tlsutil.client_options(host, self.settings.ca_file), ep)
        return ep

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
        waits = []
        for leg in list(self.sessions):
            if leg.group is not None:
                leg.group.close()  # SIGTERM now, SIGKILL after kill_grace
                waits.append(leg.group.when_empty())
            leg.close(*STOPPING)
        done = defer.gatherResults(waits, consumeErrors=True)
        # Bounded: a process stuck in the kernel must not block shutdown forever.
        done.addTimeout(self.settings.kill_grace + 5.0, self.clock)
        done.addErrback(lambda f: self.log.warn("child processes still running at stop"))
        result: defer.Deferred[None] = done.addCallback(lambda _: None)
        return result

    # -- events from legs --------------------------------------------------

    def _slot_of(self, leg: VmLeg) -> _Slot | None:
        slot = getattr(leg, "slot", None)
        return slot if isinstance(slot, _Slot) and slot.leg is leg else None

    def leg_waiting(self, leg: VmLeg) -> None:
        slot = self._slot_of(leg)
        if slot is not None:
            slot.backoff.reset()
        self.log.info("waiting at the proxy for a user")
        if not self.ready.called:
            self.ready.callback(None)

    def leg_paired(self, leg: VmLeg) -> str | None:
        """The leg became a session; refill its slot.  The name of the limit
        it is over (``max_sessions``, ``max_sessions_per_user``) or None."""
        slot = self._slot_of(leg)
        if slot is not None:
            slot.leg = None
            slot.connect()
        if len(self.sessions) >= self.settings.max_sessions:
            return "max_sessions"
        if sum(1 for s in self.sessions if s.user == leg.user) \
                >= self.settings.max_sessions_per_user:
            return "max_sessions_per_user"
        self.sessions.add(leg)
        return None

    def leg_closed(self, leg: VmLeg, state: Phase, code: int | None, reason: str | None) -> None:
        self.sessions.discard(leg)
        slot = self._slot_of(leg)
        if slot is not None:
            self.log.info("proxy socket closed ({code} {reason})", code=code,
                          reason=(reason or "")[:120])
            slot.retry()

    def revoked(self, key: bytes) -> None:
        """Close every session of a user who just lost access."""
        for leg in list(self.sessions):
            if leg.user_key == key:
                leg.close(closecodes.NOT_AUTHORIZED.code,
                          closecodes.reason(closecodes.NOT_AUTHORIZED.name, "access revoked"))
