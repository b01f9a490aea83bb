"""The proxy's side of each leg's control exchange (PROTOCOL.md §3), sans-IO.

Every websocket to the proxy begins with a control exchange; once paired it
belongs to the relay (:mod:`ticrypt.proxy.relay`).  One machine per leg::

    VM leg   (/v1/vm):    CONNECTING -opened: challenge-> HANDSHAKE
                              -vm-auth: Join-> WAITING -paired-> PAIRED
    user leg (/v1/user):  CONNECTING -opened-> HANDSHAKE
                              -connect: Join-> WAITING -paired-> PAIRED
    CONNECTING, HANDSHAKE, WAITING -refused, timed out, lost-> DONE

(A join that finds a partner at once skips WAITING.)  The machines check the
challenge nonce and the VM credential (:class:`VmLegMachine`), the ticket,
the revocation list, the user's count of pending connections
(:class:`PendingUsers`) and the single-use ledger (:class:`UserLegMachine`), and
return what to do: :class:`Send` a message, :class:`Close` (a refusal,
already audited), :class:`Audit`, :class:`ArmTimer` / :class:`CancelTimer`
(one timer per leg; :meth:`~_LegMachine.timed_out` when it fires),
:class:`Join` / :class:`Leave` the pairing table (the table's answer to a
join goes back in through :meth:`~_LegMachine.joined`), :class:`Idle`,
:class:`StartRelay`.  They never touch a transport, the reactor or the
clock (the time comes in with each message); the websocket adapter,
:class:`~ticrypt.proxy.ws.Leg`, does what they say.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeAlias

import attrs

from ticrypt import closecodes as cc
from ticrypt import identity, signed
from ticrypt.encoding import JsonError, b64, loads_bounded, unb64
from ticrypt.proxy.pairing import Paired, Refused, Waiting
from ticrypt.proxy.replay import TicketUses, Use

#: Largest control message (a ticket is at most signed.MAX_TOKEN characters).
MAX_CONTROL = 8192


class LegState(enum.Enum):
    CONNECTING = "connecting"   # websocket opening handshake
    HANDSHAKE = "handshake"     # open, control message not yet accepted
    WAITING = "waiting"         # in the pairing table
    PAIRED = "paired"           # relaying: the machine is done
    DONE = "done"               # refused, closing or closed


# -- actions -------------------------------------------------------------------


@attrs.frozen
class Send:
    """Send ``payload`` (compact JSON) as a text message."""

    payload: bytes


@attrs.frozen
class Close:
    """Refused: close with ``code`` and ``reason`` (audited already).  The
    leg's timer ends with it."""

    code: int
    reason: str


@attrs.frozen(init=False)
class Audit:
    """Write the audit line ``event`` with ``fields``, in this order."""

    event: str
    fields: dict[str, Any]

    def __init__(self, event: str, **fields: Any):
        self.__attrs_init__(event, fields)


@attrs.frozen
class ArmTimer:
    """Call :meth:`~_LegMachine.timed_out` in ``seconds`` (instead of any
    timer already armed)."""

    seconds: float


@attrs.frozen
class CancelTimer:
    """Disarm the timer, if one is armed."""


@attrs.frozen
class Join:
    """Put this socket into the pairing table as a ``role`` socket of
    ``vm_id``; hand the table's answer to :meth:`~_LegMachine.joined`."""

    role: str
    vm_id: str


@attrs.frozen
class Leave:
    """Take this socket out of the pairing table (it waited there)."""

    role: str
    vm_id: str


@attrs.frozen
class Idle:
    """The socket waits for a partner, possibly for hours: once this read is
    over, free what only the TLS handshake needed."""


@attrs.frozen
class StartRelay:
    """The table joined a VM socket and a user: relay between them."""

    paired: Paired[Any]


Action: TypeAlias = (Send | Close | Audit | ArmTimer | CancelTimer | Join | Leave | Idle
                     | StartRelay)


# -- control messages ----------------------------------------------------------


class ControlError(Exception):
    """A control message was refused: close with ``code`` and ``reason``
    (``name: text``, the name from ``close``)."""

    def __init__(self, close: cc.CloseCode, text: str):
        self.code = close.code
        self.reason = cc.reason(close.name, text)
        super().__init__(self.reason)


_JSON_WHY = {"too-large": "too long", "too-deep": "nested too deeply",
             "not-json": "is not JSON"}


def parse_control(payload: bytes, is_binary: bool, expected: str,
                  fields: tuple[str, ...]) -> dict[str, str]:
    """A control message: a text message of compact JSON with exactly
    ``type`` and ``fields``, all strings; ControlError(4000) otherwise."""
    if is_binary:
        raise ControlError(cc.BAD_MESSAGE, "control message must be text")
    try:
        msg = loads_bounded(payload, max_size=MAX_CONTROL)
    except JsonError as e:
        raise ControlError(cc.BAD_MESSAGE, f"control message {_JSON_WHY[e.code]}") from None
    if not isinstance(msg, dict) or msg.get("type") != expected:
        raise ControlError(cc.BAD_MESSAGE, f"expected a {expected} message")
    if set(msg) != {"type", *fields} or not all(isinstance(msg[f], str) for f in fields):
        raise ControlError(cc.BAD_MESSAGE, f"{expected} needs exactly " + ", ".join(fields))
    return {f: msg[f] for f in fields}


def _message(**fields: str) -> Send:
    """One of the proxy's own messages: compact JSON, sorted keys."""
    return Send(json.dumps(fields, separators=(",", ":"), sort_keys=True).encode())


# -- the machines --------------------------------------------------------------


class Revocations(Protocol):
    """The revocation list as the ticket check sees it
    (:class:`~ticrypt.proxy.revocations.RevocationList`)."""

    def reason(self, ticket: signed.Ticket) -> str | None: ...


@attrs.define(eq=False)
class PendingUsers:
    """Users whose ticket the proxy accepted and who are not paired yet
    (waiting for a VM socket, or on their way into the pairing table),
    counted per user name against ``limit``: a user with valid tickets
    cannot fill the VMs' waiting queues alone (PROTOCOL.md §3 Limits)."""

    limit: int = 4
    _held: dict[str, int] = attrs.field(factory=dict, init=False)

    def full(self, user: str) -> bool:
        return self._held.get(user, 0) >= self.limit

    def add(self, user: str) -> None:
        self._held[user] = self._held.get(user, 0) + 1

    def remove(self, user: str) -> None:
        left = self._held.pop(user) - 1
        if left:
            self._held[user] = left

    def held(self, user: str) -> int:
        return self._held.get(user, 0)


@attrs.define(eq=False)
class ControlContext:
    """What the control exchanges of all legs share."""

    backend_key: bytes
    #: single-use ledger of ticket ids
    tickets: TicketUses
    handshake_timeout: float
    user_wait_timeout: float
    rng: Callable[[int], bytes]
    #: rest's revocation feed as last verified (None: not followed)
    revocations: Revocations | None = None
    #: users not paired yet, per user name
    pending: PendingUsers = attrs.field(factory=PendingUsers)


@attrs.define(eq=False)
class _LegMachine:
    """What both legs' exchanges do alike.  ``address`` is the peer's IP."""

    role: ClassVar[str]
    context: ControlContext
    address: str
    state: LegState = LegState.CONNECTING
    #: the VM id, once a credential or a ticket named it
    vm_id: str | None = None

    def opened(self) -> list[Action]:
        """The websocket opened: the control message is due within
        ``handshake_timeout``."""
        self.state = LegState.HANDSHAKE
        return [ArmTimer(self.context.handshake_timeout)]

    def message(self, payload: bytes, is_binary: bool, now: float) -> list[Action]:
        """A whole message from the peer, before pairing."""
        if self.state is LegState.HANDSHAKE:
            try:
                return self._control(payload, is_binary, now)
            except ControlError as e:
                return self._refuse(e.code, e.reason, **({"vm": self.vm_id} if self.vm_id else {}))
        if self.state is LegState.WAITING:
            return self._refuse(cc.BAD_MESSAGE.code, cc.reason(
                cc.BAD_MESSAGE.name, "unexpected message before pairing"), vm=self.vm_id)
        if self.state is LegState.PAIRED:
            raise RuntimeError("paired: the relay carries this socket's messages")
        return []  # DONE: closing; drop whatever still arrives

    def joined(self, outcome: Paired[Any] | Waiting | Refused) -> list[Action]:
        """The pairing table's answer to :class:`Join`."""
        if isinstance(outcome, Refused):
            return self._refuse(cc.OVER_LIMIT.code,
                                cc.reason(cc.OVER_LIMIT.name, outcome.reason), vm=self.vm_id)
        if isinstance(outcome, Waiting):
            self.state = LegState.WAITING
        return self._joined(outcome)

    def timed_out(self) -> list[Action]:
        """The timer armed last fired."""
        if self.state is LegState.HANDSHAKE:
            t = self.context.handshake_timeout
            return self._refuse(cc.TIMEOUT.code, cc.reason(
                cc.TIMEOUT.name, f"no control message within {t:g}s"))
        return []

    def paired(self, vm_id: str, ticket: signed.Ticket) -> list[Action]:
        """The relay starts: with a VM socket of ``vm_id`` or the user of
        ``ticket``.  The machine is done."""
        self.state = LegState.PAIRED
        return [CancelTimer(), self._paired_message(vm_id, ticket)]

    def over_frame_limit(self, reason: str) -> list[Action]:
        """The peer sent too many frames (nothing more of it is parsed).
        Before pairing: refused 4009 with ``reason``; otherwise nothing to
        say (the relay, or the close under way, speaks for the leg)."""
        if self.state not in (LegState.HANDSHAKE, LegState.WAITING):
            return []
        fields: dict[str, Any] = {"vm": self.vm_id, **self._who()}
        return self._refuse(cc.OVER_LIMIT.code, reason, **fields)

    def closing(self) -> None:
        """The leg is being closed: read nothing more."""
        self.state = LegState.DONE

    def lost(self) -> list[Action]:
        """The connection is gone (or being dropped)."""
        actions: list[Action] = [CancelTimer()]
        if self.state is LegState.WAITING and self.vm_id is not None:
            actions.append(Leave(self.role, self.vm_id))
        self.state = LegState.DONE
        return actions

    # -- for the subclasses ------------------------------------------------------

    def _control(self, payload: bytes, is_binary: bool, now: float) -> list[Action]:
        raise NotImplementedError

    def _joined(self, outcome: Paired[Any] | Waiting) -> list[Action]:
        raise NotImplementedError

    def _paired_message(self, vm_id: str, ticket: signed.Ticket) -> Send:
        raise NotImplementedError

    def _who(self) -> dict[str, Any]:
        """Who the leg is, for the audit lines of its refusal."""
        return {}

    def _refuse(self, code: int, reason: str, **fields: Any) -> list[Action]:
        """Refused before pairing: leave the table, audit (no secrets), close."""
        actions: list[Action] = []
        if self.state is LegState.WAITING and self.vm_id is not None:
            actions.append(Leave(self.role, self.vm_id))
        self.state = LegState.DONE
        actions += [Audit(f"{self.role}-refused", reason=reason, address=self.address, **fields),
                    Close(code, reason)]
        return actions


@attrs.define(eq=False)
class VmLegMachine(_LegMachine):
    """``/v1/vm``: the challenge, the VM credential and the signature over
    the nonce."""

    role: ClassVar[str] = "vm"
    #: the challenge sent; single use ("" once answered)
    nonce: str = ""
    #: fingerprint of the authenticated VM key, until the vm-connected line
    _key: str = ""

    def opened(self) -> list[Action]:
        actions = super().opened()
        self.nonce = b64(self.context.rng(32))
        return [*actions, _message(type="challenge", nonce=self.nonce)]

    def _control(self, payload: bytes, is_binary: bool, now: float) -> list[Action]:
        msg = parse_control(payload, is_binary, "vm-auth", ("credential", "signature"))
        try:
            cred = signed.verify_vm_credential(self.context.backend_key, msg["credential"])
        except signed.TokenError as e:
            raise ControlError(cc.VM_AUTH_FAILED, f"credential {e.code}") from None
        self.vm_id = cred.vm  # from the credential only
        try:
            sig = unb64(msg["signature"], 64)
        except ValueError:
            raise ControlError(cc.VM_AUTH_FAILED, "bad-signature") from None
        if not signed.verify(cred.vm_key, signed.PROXY_VM_AUTH,
                             {"nonce": self.nonce, "vm": cred.vm}, sig):
            raise ControlError(cc.VM_AUTH_FAILED, "bad-signature")
        self.nonce = ""
        self._key = identity.fingerprint(cred.vm_key)
        return [CancelTimer(), Join(self.role, cred.vm)]

    def _joined(self, outcome: Paired[Any] | Waiting) -> list[Action]:
        key, self._key = self._key, ""
        actions: list[Action] = [
            Audit("vm-connected", vm=self.vm_id, address=self.address, key=key),
            _message(type="waiting")]
        if isinstance(outcome, Waiting):
            actions.append(Idle())
        else:
            actions.append(StartRelay(outcome))
        return actions

    def _paired_message(self, vm_id: str, ticket: signed.Ticket) -> Send:
        return _message(type="paired", user=ticket.user, client=ticket.client,
                        user_key=identity.public_text(ticket.user_key))


@attrs.define(eq=False)
class UserLegMachine(_LegMachine):
    """``/v1/user``: the ticket (signature, expiry, client address,
    revocation, single use), then the wait for a VM socket."""

    role: ClassVar[str] = "user"
    #: the verified ticket
    ticket: signed.Ticket | None = None
    #: counted in ``context.pending`` (from the accepted ticket until paired or done)
    _pending: bool = attrs.field(default=False, init=False)

    def timed_out(self) -> list[Action]:
        if self.state is LegState.WAITING:
            t = self.context.user_wait_timeout
            return self._refuse(cc.NO_VM.code, cc.reason(
                cc.NO_VM.name, f"no VM socket within {t:g}s"), vm=self.vm_id, **self._who())
        return super().timed_out()

    def revoked(self, revocations: Revocations) -> list[Action]:
        """The revocation list changed: a waiting user whose user or session
        it lists is closed 4011 (audited ``user-refused``)."""
        if self.state is not LegState.WAITING or self.ticket is None:
            return []
        reason = revocations.reason(self.ticket)
        if reason is None:
            return []
        return self._refuse(cc.REVOKED.code, reason, vm=self.vm_id, user=self.ticket.user)

    def _control(self, payload: bytes, is_binary: bool, now: float) -> list[Action]:
        msg = parse_control(payload, is_binary, "connect", ("ticket",))
        ctx = self.context
        try:
            ticket = signed.verify_ticket(ctx.backend_key, msg["ticket"], vm=None,
                                          client=self.address, now=now)
        except signed.TokenError as e:
            raise ControlError(cc.TICKET_REFUSED, e.code) from None
        if ctx.revocations is not None and ctx.revocations.reason(ticket) is not None:
            raise ControlError(cc.TICKET_REFUSED, "revoked")
        if ctx.pending.full(ticket.user):  # before the ledger: its room is bounded too
            return self._refuse(cc.OVER_LIMIT.code, cc.reason(
                cc.OVER_LIMIT.name, "too many pending connections for this user"),
                vm=ticket.vm, user=ticket.user)
        use = ctx.tickets.use(ticket.ticket_id, ticket.expires, now)
        if use is Use.REPLAYED:
            raise ControlError(cc.TICKET_REFUSED, "replayed")
        if use is Use.FULL:
            raise ControlError(cc.OVER_LIMIT, "too many recent tickets")
        if use is not Use.FIRST:  # not written to the ledger: fail closed
            raise ControlError(cc.SERVER_ERROR, "cannot record the ticket")
        self.ticket = ticket
        self.vm_id = ticket.vm
        ctx.pending.add(ticket.user)
        self._pending = True
        return [CancelTimer(), Join(self.role, ticket.vm)]

    def paired(self, vm_id: str, ticket: signed.Ticket) -> list[Action]:
        self._not_pending()
        return super().paired(vm_id, ticket)

    def closing(self) -> None:
        self._not_pending()
        super().closing()

    def lost(self) -> list[Action]:
        self._not_pending()
        return super().lost()

    def _refuse(self, code: int, reason: str, **fields: Any) -> list[Action]:
        self._not_pending()
        return super()._refuse(code, reason, **fields)

    def _not_pending(self) -> None:
        if self._pending and self.ticket is not None:
            self.context.pending.remove(self.ticket.user)
        self._pending = False

    def _joined(self, outcome: Paired[Any] | Waiting) -> list[Action]:
        if isinstance(outcome, Waiting):
            return [ArmTimer(self.context.user_wait_timeout)]
        return [StartRelay(outcome)]

    def _paired_message(self, vm_id: str, ticket: signed.Ticket) -> Send:
        return _message(type="paired", vm=vm_id)

    def _who(self) -> dict[str, Any]:
        return {"user": self.ticket.user} if self.ticket is not None else {}


LegMachine: TypeAlias = VmLegMachine | UserLegMachine
