"""The proxy's websocket legs (autobahn on Twisted) and their factory.

Two paths on one listener (wire format: ``PROTOCOL.md`` §3): ``/v1/vm``
(vmc's sockets: challenge, ``vm-auth``, then they wait in the
:class:`~ticrypt.proxy.pairing.PairingTable`) and ``/v1/user`` (the
frontend's: ``connect`` with a ticket, then the oldest waiting VM socket of
its VM, or a wait of up to ``user_wait_timeout``).  A :class:`Leg` is an
adapter: before pairing it feeds its control machine
(:mod:`ticrypt.proxy.control`, sans-IO) and does what it answers; once
paired it is an :class:`~ticrypt.proxy.relay.IRelayEnd` of a
:class:`~ticrypt.proxy.relay.Pair`, which relays whole messages both ways,
unchanged and in order, holds each leg's partner while the leg's send
buffer (``max_buffered``) is full, and closes one leg when the other closes.
Every leg's frames are counted (:mod:`ticrypt.framebudget`): a peer
over a frame limit is dropped with 4009.  :class:`RelayFactory` holds what
the legs share: the pairing table, the settings, the audit log.

What reads or overrides autobahn internals lives in :mod:`ticrypt.proxy.wsmem`.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attrs
from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ticrypt import closecodes as cc
from ticrypt.audit import AuditLog
from ticrypt.config import Duration, Int, Size, group, setting
from ticrypt.framebudget import FrameBudget, FrameLimits, Violation
from ticrypt.heap import tune_malloc
from ticrypt.proxy import control as ctl
from ticrypt.proxy.control import (
    ControlContext,
    LegMachine,
    LegState,
    PendingUsers,
    UserLegMachine,
    VmLegMachine,
)
from ticrypt.proxy.pairing import Limits, Paired, PairingTable, Refused, Waiting
from ticrypt.proxy.relay import (
    OWN_FULL,
    PARTNER_FULL,
    PEER_OVER_FRAME_LIMIT,
    IRelayEnd,
    Pair,
    SendBufferWatch,
    peer_closed,
    peer_failed,
    peer_lost,
)
from ticrypt.proxy.replay import TicketLedger, TicketUses
from ticrypt.proxy.revocations import RevocationList
from ticrypt.proxy.wsmem import LeanWebSocket, OutputBatch, with_factory_options
from ticrypt.timers import cancel_call

VM_PATH = "/v1/vm"
USER_PATH = "/v1/user"


@attrs.frozen
class Settings:
    """The proxy's ``[limits]`` section (seconds and bytes): the websocket
    limits and timeouts, the frame budget's and the pairing table's."""

    max_message_size: int = setting(Size(min=1024), 2 * 1024 * 1024,
                                    "largest websocket message")
    max_frame_size: int = setting(Size(min=1024), 2 * 1024 * 1024,
                                  "largest websocket frame (<= max_message_size)")
    max_connections: int = setting(Int(1, 10_000_000), 30000, "open websockets")
    user_wait_timeout: float = setting(Duration(), 10.0,
                                       "how long a user waits for a VM socket")
    handshake_timeout: float = setting(Duration(), 10.0,
                                       "from TCP accept to the leg's first message")
    idle_timeout: float = setting(Duration(), 3600.0, "a pair with no traffic is closed")
    ping_interval: float = setting(Duration(), 30.0, "websocket ping interval")
    ping_timeout: float = setting(Duration(), 30.0, "a ping not answered closes the leg")
    max_buffered: int = setting(Size(min=4096), 256 * 1024,
                                "bytes queued towards a peer before its partner is paused")
    max_recent_tickets: int = setting(Int(100, 10_000_000), 100_000,
                                      "ticket ids remembered against replay")
    open_handshake_timeout: float = setting(Duration(), 10.0, "websocket opening handshake")
    close_handshake_timeout: float = setting(Duration(), 5.0, "websocket closing handshake")
    max_pending_per_user: int = setting(
        Int(1, 100_000), 4,
        "connections of one user accepted but not yet paired, over all VMs")
    frames: FrameLimits = group(FrameLimits)
    pairing: Limits = group(Limits)


F = TypeVar("F", bound=Callable[..., Any])


def _guarded(method: F) -> F:
    """Never let a bad peer's surprise escape into the reactor: log it and
    drop that one connection."""

    @functools.wraps(method)
    def wrapper(self: Leg, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception:
            self.plog.failure("proxy: unexpected error in {name} from {address}",
                              name=method.__name__, address=self.address)
            try:
                if self.machine is not None:
                    self._run(self.machine.lost())
                self.dropConnection(abort=True)
            except Exception:
                self.plog.failure("proxy: could not drop the connection")
            return None

    return wrapper  # type: ignore[return-value]


def _peer_ip(transport: Any) -> str:
    host = str(getattr(transport.getPeer(), "host", "?"))
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@implementer(IRelayEnd)
class Leg(LeanWebSocket):
    """One websocket to the proxy, VM side or user side: the adapter between
    autobahn, the leg's control machine (:mod:`ticrypt.proxy.control`) and,
    once paired, its :class:`~ticrypt.proxy.relay.Pair`."""

    # autobahn's protocol already has ``log`` (a txaio logger it calls with
    # its own formats); ours is a separate Twisted Logger.
    plog = Logger()
    factory: RelayFactory
    # class-level defaults: an idle socket keeps no instance entry for them
    address = "?"
    #: the control exchange, from the opening handshake's path on
    machine: LegMachine | None = None
    pair: Pair | None = None
    _timer: IDelayedCall | None = None

    @property
    def phase(self) -> LegState:
        return self.machine.state if self.machine is not None else LegState.CONNECTING

    @property
    def role(self) -> str:
        return self.machine.role if self.machine is not None else ""

    # -- what the machine says ---------------------------------------------------

    def _run(self, actions: Iterable[ctl.Action]) -> None:
        for action in actions:
            self._do(action)

    def _do(self, action: ctl.Action) -> None:
        match action:
            case ctl.Send(payload):
                self.sendMessage(payload, False)
            case ctl.Close(code, reason):
                self.plog.info("proxy: refused {role} from {address}: {reason}",
                               role=self.role, address=self.address, reason=reason)
                self.close_with(code, reason)
            case ctl.Audit(event, fields):
                self.factory.audit_write(event, **fields)
            case ctl.ArmTimer(seconds):
                self._cancel_timer()
                self._timer = self.factory.clock.callLater(seconds, self._timed_out)
            case ctl.CancelTimer():
                self._cancel_timer()
            case ctl.Join(role, vm_id):
                assert self.machine is not None
                self._run(self.machine.joined(self.factory.join(self, role, vm_id)))
            case ctl.Leave(role, vm_id):
                self.factory.leave(self, role, vm_id)
            case ctl.Idle():
                self.factory.clock.callLater(0, self._idle)
            case ctl.StartRelay(paired):
                self.factory.start_pair(paired)

    def _cancel_timer(self) -> None:
        cancel_call(self._timer)
        self._timer = None

    @_guarded
    def _timed_out(self) -> None:
        self._timer = None
        if self.machine is not None:
            self._run(self.machine.timed_out())

    @_guarded
    def _idle(self) -> None:
        # waiting, possibly for hours: drop the TLS handshake's buffers
        if self.phase is LegState.WAITING:
            self.release_tls_buffers()

    # -- for the factory and the pair (IRelayEnd) ----------------------------------

    def join_pair(self, pair: Pair) -> None:
        """Paired: tell the peer, relay from now on."""
        assert self.machine is not None
        self.pair = pair
        self._run(self.machine.paired(pair.vm_id, pair.ticket))

    def revoked(self, revocations: RevocationList) -> bool:
        """Close this leg if it is a waiting user that ``revocations``
        revokes; returns whether it did."""
        if not isinstance(self.machine, UserLegMachine):
            return False
        actions = self.machine.revoked(revocations)
        self._run(actions)
        return bool(actions)

    def send(self, payload: bytes, is_binary: bool) -> None:
        if self.phase is LegState.PAIRED and self.ws_open():
            self.sendMessage(payload, is_binary)

    def send_buffer_full(self) -> bool:
        return self.reading_held(OWN_FULL)

    def close_with(self, code: int, reason: str) -> None:
        """Close this leg with ``code``/``reason`` (after queued data)."""
        self._cancel_timer()
        self.resume_reading(PARTNER_FULL | OWN_FULL)
        if self.machine is not None:
            self.machine.closing()
        self.send_close(code, reason)

    @_guarded
    def frames_exceeded(self, violation: Violation) -> None:
        """Over a frame limit (LeanWebSocket parses no more of it): close it
        4009 with an audit line, its partner too, and drop the connection
        once the close frame is out (or after close_handshake_timeout)."""
        self.plog.info("proxy: {role} from {address} over the frame limit "
                       "({limit}, {allowed}): dropped", role=self.role,
                       address=self.address, limit=violation.limit, allowed=violation.allowed)
        refusal = self.machine.over_frame_limit(violation.reason) if self.machine else []
        if refusal:
            self._run(refusal)
        else:  # paired, or already closing (it was audited then)
            if self.pair is not None:
                self.pair.end(self, cc.OVER_LIMIT.code, PEER_OVER_FRAME_LIMIT)
            self.close_with(cc.OVER_LIMIT.code, violation.reason)
        self.drop_after_close()

    # -- autobahn callbacks --------------------------------------------------------

    def connectionMade(self) -> None:
        self.address = _peer_ip(self.transport)
        self.factory.open_legs += 1
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.factory.leg_gone()

    def onConnect(self, request: ConnectionRequest) -> None:
        machine: type[LegMachine]
        if request.path == VM_PATH:
            machine = VmLegMachine
        elif request.path == USER_PATH:
            machine = UserLegMachine
        else:
            raise ConnectionDeny(ConnectionDeny.NOT_FOUND, "unknown path")
        self.machine = machine(self.factory.control, self.address)
        return None

    @_guarded
    def onOpen(self) -> None:
        self.release_handshake_state()
        settings = self.factory.settings
        self.frame_budget = FrameBudget(settings.frames, self.factory.clock.seconds())
        self.watch_output(settings.max_buffered, SendBufferWatch(self))
        assert self.machine is not None
        self._run(self.machine.opened())

    @_guarded
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.pair is not None:
            self.pair.relay(self, payload, isBinary)
        elif self.machine is not None:
            self._run(self.machine.message(payload, isBinary, self.factory.clock.seconds()))

    def close_sent(self, code: int | None) -> None:
        # (a pair that ended first, closing this leg, is not ended again)
        if self.pair is not None:
            self.pair.end(self, *peer_failed(code))

    @_guarded
    def close_received(self, code: int | None, reason: str | None,
                       protocol_error: bool) -> None:
        if self.pair is not None:
            self.pair.end(self, *peer_closed(code, reason, protocol_error))

    @_guarded
    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._cancel_timer()
        if self.machine is not None:
            self._run(self.machine.lost())
        if self.pair is not None:
            self.pair.end(self, *peer_lost(self.lost_to_ping_timeout()))


class RelayFactory(WebSocketServerFactory):
    """Shared state of the relay: the pairing table, keys, settings, audit."""

    protocol = Leg  # type: ignore[assignment]
    log = Logger()

    def __init__(self, *, reactor: Any, clock: IReactorTime, backend_key: bytes,
                 table: PairingTable[Leg], settings: Settings, audit: AuditLog,
                 rng: Callable[[int], bytes] = os.urandom, url: str = "wss://localhost",
                 tickets: TicketUses | None = None):
        super().__init__(url=url, reactor=reactor, server="ticrypt-proxy")
        tune_malloc()  # relayed messages: no page faults per message
        self.clock = clock
        self.table = table
        self.settings = settings
        self.audit = audit
        self.pairs: set[Pair] = set()
        self.output_batch = OutputBatch()
        self.control = ControlContext(
            backend_key=backend_key,
            # single-use tickets: a TicketJournal (kept across restarts) from
            # tap.makeService, else this memory-only ledger
            tickets=tickets if tickets is not None else TicketLedger(settings.max_recent_tickets),
            handshake_timeout=settings.handshake_timeout,
            user_wait_timeout=settings.user_wait_timeout, rng=rng,
            pending=PendingUsers(settings.max_pending_per_user))
        self._revocations: RevocationList | None = None
        self.open_legs = 0
        self._idle_waiters: list[defer.Deferred[None]] = []
        s = settings
        # autobahn's defaults are unlimited or permissive: set everything
        self.setProtocolOptions(
            webStatus=False,
            maxMessagePayloadSize=s.max_message_size,
            maxFramePayloadSize=s.max_frame_size,
            maxConnections=s.max_connections,
            autoPingInterval=s.ping_interval,
            autoPingTimeout=s.ping_timeout,
            autoPingRestartOnAnyTraffic=False,
            openHandshakeTimeout=s.open_handshake_timeout,
            closeHandshakeTimeout=s.close_handshake_timeout,
            failByDrop=False,
            utf8validateIncoming=True,
            requireMaskedClientFrames=True,
            autoFragmentSize=0,
            trustXForwardedFor=0,
            perMessageCompressionAccept=lambda offers: None,
        )
        self.protocol = with_factory_options(self.protocol, self)

    @property
    def backend_key(self) -> bytes:
        """The backend's Ed25519 public key (held by the control context)."""
        return self.control.backend_key

    @property
    def tickets(self) -> TicketUses:
        """The single-use ledger of ticket ids."""
        return self.control.tickets

    @property
    def revocations(self) -> RevocationList | None:
        """rest's revocation feed as last verified (None: not followed)."""
        return self._revocations

    @revocations.setter
    def revocations(self, revocations: RevocationList | None) -> None:
        self._revocations = self.control.revocations = revocations

    def leg_gone(self) -> None:
        self.open_legs -= 1
        if self.open_legs == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def all_closed(self) -> defer.Deferred[None]:
        """Fires once no connection is open (tests wait on it in cleanup)."""
        if self.open_legs == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def audit_write(self, event: str, **fields: Any) -> None:
        try:
            self.audit.write(event, **{k: v for k, v in fields.items() if v is not None})
        except Exception:
            self.log.failure("proxy: audit write failed for {event}", event=event)

    def depth_changed(self, vm_id: str) -> None:
        self.log.debug("proxy: VM {vm} has {depth} waiting sockets ({total} waiting in all)",
                       vm=vm_id, depth=self.table.depth(vm_id),
                       total=self.table.waiting_total)

    def join(self, leg: Leg, role: str, vm_id: str) -> Paired[Leg] | Waiting | Refused:
        """``leg`` authenticated as a ``role`` socket of ``vm_id``: into the
        pairing table."""
        if role == "vm":
            result = self.table.add_vm(vm_id, leg)
            if isinstance(result, Waiting):
                self.depth_changed(vm_id)
            return result
        return self.table.add_user(vm_id, leg)

    def leave(self, leg: Leg, role: str, vm_id: str) -> None:
        """``leg`` no longer waits in the pairing table."""
        if role == "vm":
            if self.table.remove_vm(vm_id, leg):
                self.depth_changed(vm_id)
        else:
            self.table.remove_user(vm_id, leg)

    def start_pair(self, paired: Paired[Leg]) -> None:
        vm_leg, user_leg = paired.vm, paired.user
        assert isinstance(user_leg.machine, UserLegMachine) and user_leg.machine.ticket
        ticket = user_leg.machine.ticket
        pair = Pair(vm_id=paired.vm_id, ticket=ticket, vm=vm_leg, user=user_leg,
                    clock=self.clock, idle_timeout=self.settings.idle_timeout,
                    audit=self.audit_write, on_end=self._pair_ended)
        self.pairs.add(pair)
        vm_leg.join_pair(pair)
        user_leg.join_pair(pair)
        pair.start()
        self.depth_changed(paired.vm_id)
        self.audit_write("pair-start", vm=paired.vm_id, user=ticket.user,
                         client=ticket.client, vm_address=vm_leg.address)

    def _pair_ended(self, pair: Pair) -> None:
        self.pairs.discard(pair)
        for formed in self.table.pair_ended():
            self.start_pair(formed)

    def revoke_pairs(self) -> int:
        """Close every pair, and every waiting user, whose ticket's user or
        session :attr:`revocations` lists: both legs with 4011 ``revoked``
        (vmc ends the channel and its processes), audited ``pair-revoked``.
        Returns how many were closed."""
        if self.revocations is None:
            return 0
        closed = 0
        # waiting users first: a pair that ends below may pair a waiting user
        for leg in self.table.waiting_users():
            if leg.revoked(self.revocations):
                closed += 1
        for pair in list(self.pairs):
            reason = self.revocations.reason(pair.ticket)
            if reason is not None and not pair.ended:
                self.audit_write("pair-revoked", vm=pair.vm_id, user=pair.ticket.user,
                                 client=pair.ticket.client, reason=reason)
                pair.end(None, cc.REVOKED.code, reason)
                closed += 1
        return closed

    def status(self) -> dict[str, Any]:
        """``{"vms": {vm_id: waiting sockets}, "pairs": n}`` for /v1/status."""
        return {"vms": self.table.snapshot(), "pairs": self.table.pairs}
