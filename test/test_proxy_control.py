"""The proxy's control exchanges as sans-IO machines (ticrypt.proxy.control):
every transition and every refusal with its close code, reason and audit
line, with no autobahn, no transport and no clock.  The same exchanges
through real websockets are ``test_proxy.ProxyTests``."""

from __future__ import annotations

import ast
import json
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ticrypt import closecodes as cc
from ticrypt import identity, signed
from ticrypt.encoding import b64
from ticrypt.framebudget import REASON as FRAMES
from ticrypt.proxy import control
from ticrypt.proxy.control import (
    ArmTimer,
    Audit,
    CancelTimer,
    Close,
    ControlContext,
    Idle,
    Join,
    Leave,
    LegState,
    Send,
    StartRelay,
    UserLegMachine,
    VmLegMachine,
)
from ticrypt.proxy.pairing import Paired, Refused, Waiting
from ticrypt.proxy.replay import TicketLedger, Use

NOW = 1_800_000_000.0
ADDRESS = "10.0.0.7"
NONCE = b"\x07" * 32


def _sent(action: Any) -> dict[str, Any]:
    assert isinstance(action, Send), action
    return json.loads(action.payload)  # type: ignore[no-any-return]


def _refusal(role: str, code: int, reason: str, *, leave: str | None = None,
             **fields: Any) -> list[Any]:
    """The actions of a refusal: leave the table (if it waited there in
    ``leave``'s VM), audit, close."""
    return ([Leave(role, leave)] if leave else []) + [
        Audit(f"{role}-refused", reason=reason, address=ADDRESS, **fields), Close(code, reason)]


class _Revoked:
    """A revocation list that revokes the users in ``users``."""

    def __init__(self, *users: str):
        self.users = set(users)

    def reason(self, ticket: signed.Ticket) -> str | None:
        return "revoked: the user was disabled" if ticket.user in self.users else None


class _Ledger:
    """A ticket ledger that answers ``use`` with ``answer``."""

    def __init__(self, answer: Use):
        self.answer = answer

    def use(self, ticket_id: str, expires: int, now: float) -> Use:
        return self.answer


class _Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = identity.generate()
        self.context = ControlContext(
            backend_key=identity.public_bytes(self.backend), tickets=TicketLedger(100),
            handshake_timeout=10.0, user_wait_timeout=2.5, rng=lambda n: NONCE[:n])

    def ticket(self, user: str = "alice", vm: str = "vm1", client: str = ADDRESS,
               now: float = NOW, ticket_id: str = "j1") -> str:
        return signed.make_ticket(self.backend, user=user, user_key=b"\x01" * 32, vm=vm,
                                  client=client, now=now, ttl=60, ticket_id=ticket_id,
                                  session=b64(b"\x02" * signed.SID_BYTES))

    def assert_done(self, machine: Any) -> None:
        """A refused machine reads nothing more and never raises."""
        self.assertIs(machine.state, LegState.DONE)
        self.assertEqual(machine.message(b"{}", False, NOW), [])
        self.assertEqual(machine.timed_out(), [])
        self.assertEqual(machine.over_frame_limit(FRAMES), [])


class _EitherLeg:
    """What both machines do alike; ``waiting()`` brings ``self.m`` into
    the table of vm1."""

    m: Any

    def test_handshake_timeout(self: Any) -> None:
        self.m.opened()
        self.assertEqual(self.m.timed_out(), _refusal(
            self.m.role, 4008, "timeout: no control message within 10s"))
        self.assert_done(self.m)

    def test_message_while_waiting(self: Any) -> None:
        self.waiting()
        self.assertEqual(self.m.message(b"early", True, NOW), _refusal(
            self.m.role, 4000, "bad-message: unexpected message before pairing",
            leave="vm1", vm="vm1"))
        self.assert_done(self.m)

    def test_lost_while_waiting(self: Any) -> None:
        self.waiting()
        self.assertEqual(self.m.lost(), [CancelTimer(), Leave(self.m.role, "vm1")])
        self.assertEqual(self.m.lost(), [CancelTimer()])  # once out of the table
        self.assert_done(self.m)

    def test_closing(self: Any) -> None:
        self.waiting()
        self.m.closing()
        self.assert_done(self.m)


class VmLegMachineTests(_EitherLeg, _Case):
    def setUp(self) -> None:
        super().setUp()
        self.vm_key = identity.generate()
        self.m = VmLegMachine(self.context, ADDRESS)

    def credential(self, vm: str = "vm1", key: Any = None, backend: Any = None) -> str:
        return signed.make_vm_credential(backend or self.backend, vm=vm,
                                         vm_key=identity.public_bytes(key or self.vm_key),
                                         now=NOW)

    def auth(self, credential: str | None = None, key: Any = None, nonce: str | None = None,
             vm: str = "vm1", signature: str | None = None) -> bytes:
        if signature is None:
            signature = b64(signed.sign(key or self.vm_key, signed.PROXY_VM_AUTH,
                                        {"nonce": nonce or b64(NONCE), "vm": vm}))
        return json.dumps({"type": "vm-auth", "credential": credential or self.credential(),
                           "signature": signature}).encode()

    def authenticated(self) -> None:
        self.m.opened()
        self.assertEqual(self.m.message(self.auth(), False, NOW),
                         [CancelTimer(), Join("vm", "vm1")])

    def waiting(self) -> None:
        self.authenticated()
        self.m.joined(Waiting(1))

    def test_opened_sends_the_challenge_and_arms_the_handshake_timer(self) -> None:
        self.assertIs(self.m.state, LegState.CONNECTING)
        arm, challenge = self.m.opened()
        self.assertEqual(arm, ArmTimer(10.0))
        self.assertEqual(_sent(challenge), {"type": "challenge", "nonce": b64(NONCE)})
        self.assertEqual(challenge.payload, b'{"nonce":"%s","type":"challenge"}'
                         % b64(NONCE).encode())  # compact, sorted keys
        self.assertIs(self.m.state, LegState.HANDSHAKE)

    def test_authenticated_vm_waits(self) -> None:
        self.authenticated()
        self.assertEqual(self.m.nonce, "")  # single use
        self.assertEqual(self.m.vm_id, "vm1")
        audit, waiting, idle = self.m.joined(Waiting(1))
        self.assertEqual(audit, Audit("vm-connected", vm="vm1", address=ADDRESS,
                                      key=identity.fingerprint(identity.public_bytes(self.vm_key))))
        self.assertEqual(waiting.payload, b'{"type":"waiting"}')
        self.assertEqual(idle, Idle())
        self.assertIs(self.m.state, LegState.WAITING)
        self.assertEqual(self.m.timed_out(), [])  # a waiting VM socket has no deadline

    def test_authenticated_vm_pairs_at_once(self) -> None:
        self.authenticated()
        paired = Paired("vm1", "v", "u")
        actions = self.m.joined(paired)
        self.assertEqual([type(a) for a in actions], [Audit, Send, StartRelay])
        self.assertEqual(_sent(actions[1]), {"type": "waiting"})
        self.assertEqual(actions[2], StartRelay(paired))
        user_key = identity.generate()
        ticket = signed.Ticket(user="bob", user_key=identity.public_bytes(user_key), vm="vm1",
                               client="10.9.9.9", issued=0, expires=1, ticket_id="t")
        cancel, message = self.m.paired("vm1", ticket)
        self.assertEqual(cancel, CancelTimer())
        self.assertEqual(_sent(message), {"type": "paired", "user": "bob", "client": "10.9.9.9",
                                          "user_key": identity.public_text(user_key)})
        self.assertIs(self.m.state, LegState.PAIRED)
        self.assertRaises(RuntimeError, self.m.message, b"x", True, NOW)
        self.assertEqual(self.m.over_frame_limit(FRAMES), [])  # the relay speaks for it

    def test_table_full(self) -> None:
        self.authenticated()
        self.assertEqual(self.m.joined(Refused("too many waiting sockets (max 3)")), _refusal(
            "vm", 4009, "over-limit: too many waiting sockets (max 3)", vm="vm1"))
        self.assert_done(self.m)

    def refused(self, payload: bytes, is_binary: bool = False) -> list[Any]:
        self.m.opened()
        actions = self.m.message(payload, is_binary, NOW)
        self.assert_done(self.m)
        return actions

    def test_credential_refused(self) -> None:
        forged = self.credential(backend=identity.generate())
        self.assertEqual(self.refused(self.auth(credential=forged)), _refusal(
            "vm", 4001, "vm-auth-failed: credential bad-signature"))

    def test_credential_malformed(self) -> None:
        self.assertEqual(self.refused(self.auth(credential="x.y")), _refusal(
            "vm", 4001, "vm-auth-failed: credential bad-token"))

    def test_signature_refused(self) -> None:
        for case in ({"key": identity.generate()},             # an impostor's key
                     {"nonce": b64(os.urandom(32))},            # another challenge
                     {"vm": "vm2"},                              # another VM id
                     {"signature": "not base64!"},
                     {"signature": b64(b"\x00" * 63)}):
            with self.subTest(case=case):
                self.setUp()
                self.assertEqual(self.refused(self.auth(**case)), _refusal(
                    "vm", 4001, "vm-auth-failed: bad-signature", vm="vm1"))

    def test_nonce_is_single_use(self) -> None:
        self.authenticated()
        self.m.joined(Paired("vm1", "v", "u"))
        # (still HANDSHAKE until the relay starts) the same answer again
        self.assertEqual(self.m.message(self.auth(), False, NOW), _refusal(
            "vm", 4001, "vm-auth-failed: bad-signature", vm="vm1"))

    def test_bad_messages(self) -> None:
        for payload, binary, why in [
            (self.auth(), True, "control message must be text"),
            (b"not json", False, "control message is not JSON"),
            (b"[" * 4000 + b"]" * 4000, False, "control message nested too deeply"),
            (b'{"type":"vm-auth","x":"' + b"a" * 9000 + b'"}', False, "control message too long"),
            (b"[]", False, "expected a vm-auth message"),
            (b'{"type":"connect","ticket":"t"}', False, "expected a vm-auth message"),
            (b'{"type":"vm-auth","credential":"c"}', False,
             "vm-auth needs exactly credential, signature"),
            (b'{"type":"vm-auth","credential":"c","signature":1}', False,
             "vm-auth needs exactly credential, signature"),
        ]:
            with self.subTest(why=why):
                self.setUp()
                self.assertEqual(self.refused(payload, binary), _refusal(
                    "vm", 4000, f"bad-message: {why}"))

    def test_over_frame_limit(self) -> None:
        self.m.opened()
        self.assertEqual(self.m.over_frame_limit(FRAMES), _refusal("vm", 4009, FRAMES, vm=None))
        self.assert_done(self.m)
        self.setUp()
        self.waiting()
        self.assertEqual(self.m.over_frame_limit(FRAMES),
                         _refusal("vm", 4009, FRAMES, leave="vm1", vm="vm1"))



class UserLegMachineTests(_EitherLeg, _Case):
    def setUp(self) -> None:
        super().setUp()
        self.m = UserLegMachine(self.context, ADDRESS)

    def connect(self, ticket: str | None = None) -> list[Any]:
        return self.m.message(json.dumps({"type": "connect",
                                          "ticket": ticket or self.ticket()}).encode(),
                              False, NOW)

    def connected(self) -> None:
        self.assertEqual(self.m.opened(), [ArmTimer(10.0)])  # nothing to send first
        self.assertEqual(self.connect(), [CancelTimer(), Join("user", "vm1")])
        assert self.m.ticket is not None
        self.assertEqual((self.m.ticket.user, self.m.vm_id), ("alice", "vm1"))

    def waiting(self) -> None:
        self.connected()
        self.m.joined(Waiting(1))

    def test_user_waits_then_gives_up(self) -> None:
        self.connected()
        self.assertEqual(self.m.joined(Waiting(1)), [ArmTimer(2.5)])
        self.assertIs(self.m.state, LegState.WAITING)
        self.assertEqual(self.m.timed_out(), _refusal(
            "user", 4004, "no-vm-available: no VM socket within 2.5s", leave="vm1",
            vm="vm1", user="alice"))
        self.assert_done(self.m)

    def test_user_pairs(self) -> None:
        self.connected()
        paired = Paired("vm1", "v", "u")
        self.assertEqual(self.m.joined(paired), [StartRelay(paired)])
        assert self.m.ticket is not None
        cancel, message = self.m.paired("vm1", self.m.ticket)
        self.assertEqual(cancel, CancelTimer())
        self.assertEqual(message.payload, b'{"type":"paired","vm":"vm1"}')
        self.assertIs(self.m.state, LegState.PAIRED)

    def test_table_full(self) -> None:
        self.connected()
        self.assertEqual(self.m.joined(Refused("too many pairs (max 1)")), _refusal(
            "user", 4009, "over-limit: too many pairs (max 1)", vm="vm1"))
        self.assert_done(self.m)

    def refused(self, ticket: str) -> list[Any]:
        self.m.opened()
        actions = self.connect(ticket)
        self.assert_done(self.m)
        return actions

    def test_ticket_refused(self) -> None:
        other = identity.generate()
        forged = signed.make_ticket(other, user="alice", user_key=b"\x01" * 32, vm="vm1",
                                    client=ADDRESS, now=NOW, ttl=60, ticket_id="j",
                                    session=b64(b"\x02" * signed.SID_BYTES))
        for ticket, why in [(self.ticket(now=NOW - 120), "expired"),
                            (self.ticket(client="10.0.0.8"), "wrong-client"),
                            (forged, "bad-signature"),
                            ("x.y", "bad-token")]:
            with self.subTest(why=why):
                self.m = UserLegMachine(self.context, ADDRESS)
                self.assertEqual(self.refused(ticket), _refusal(
                    "user", 4003, f"ticket-refused: {why}"))

    def test_revoked_ticket_refused_and_not_recorded(self) -> None:
        self.context.revocations = _Revoked("alice")
        self.assertEqual(self.refused(self.ticket()), _refusal(
            "user", 4003, "ticket-refused: revoked"))
        self.assertEqual(len(self.context.tickets), 0)  # type: ignore[arg-type]

    def test_ticket_is_single_use(self) -> None:
        self.connected()
        second = UserLegMachine(self.context, ADDRESS)
        second.opened()
        self.assertEqual(second.message(json.dumps(
            {"type": "connect", "ticket": self.ticket()}).encode(), False, NOW + 1), _refusal(
            "user", 4003, "ticket-refused: replayed"))

    def test_ledger_full_or_unwritable(self) -> None:
        for use, code, reason in [(Use.FULL, 4009, "over-limit: too many recent tickets"),
                                  (Use.UNRECORDED, 1011, "server-error: cannot record the ticket")]:
            with self.subTest(use=use):
                self.setUp()
                self.context.tickets = _Ledger(use)
                self.assertEqual(self.refused(self.ticket()), _refusal("user", code, reason))

    def test_bad_messages(self) -> None:
        for payload, why in [(b'{"type":"connect"}', "connect needs exactly ticket"),
                             (b'{"type":"connect","ticket":"t","x":"y"}',
                              "connect needs exactly ticket"),
                             (b'{"type":"vm-auth","ticket":"t"}', "expected a connect message")]:
            with self.subTest(why=why):
                self.setUp()
                self.m.opened()
                self.assertEqual(self.m.message(payload, False, NOW), _refusal(
                    "user", 4000, f"bad-message: {why}"))

    def test_over_frame_limit_names_the_user(self) -> None:
        self.m.opened()
        self.assertEqual(self.m.over_frame_limit(FRAMES), _refusal("user", 4009, FRAMES,
                                                                   vm=None))
        self.setUp()
        self.waiting()
        self.assertEqual(self.m.over_frame_limit(FRAMES), _refusal(
            "user", 4009, FRAMES, leave="vm1", vm="vm1", user="alice"))

    def test_revoked_while_waiting(self) -> None:
        self.m.opened()
        self.assertEqual(self.m.revoked(_Revoked("alice")), [])  # not waiting: no ticket
        self.setUp()
        self.waiting()
        self.assertEqual(self.m.revoked(_Revoked("bob")), [])
        self.assertEqual(self.m.revoked(_Revoked("alice")), _refusal(
            "user", cc.REVOKED.code, "revoked: the user was disabled", leave="vm1",
            vm="vm1", user="alice"))
        self.assert_done(self.m)


class PendingPerUserTests(_Case):
    """A user's waiting connections are capped (``PendingUsers.limit``):
    the next is refused 4009 and audited before its ticket is recorded;
    each way out of waiting (paired, gave up, refused, lost, closed) frees
    its place."""

    def user(self, ticket_id: str, user: str = "alice") -> tuple[UserLegMachine, list[Any]]:
        m = UserLegMachine(self.context, ADDRESS)
        m.opened()
        actions = m.message(json.dumps({"type": "connect", "ticket": self.ticket(
            user=user, ticket_id=ticket_id)}).encode(), False, NOW)
        if actions == [CancelTimer(), Join("user", "vm1")]:
            m.joined(Waiting(1))
        return m, actions

    def fill(self) -> list[UserLegMachine]:
        legs = []
        for i in range(self.context.pending.limit):
            m, actions = self.user(f"j{i}")
            self.assertIs(m.state, LegState.WAITING, actions)
            legs.append(m)
        return legs

    def assert_over(self, ticket_id: str) -> None:
        m, actions = self.user(ticket_id)
        self.assertEqual(actions, _refusal(
            "user", 4009, "over-limit: too many pending connections for this user",
            vm="vm1", user="alice"))
        self.assert_done(m)

    def test_default_limit(self) -> None:
        self.assertEqual(ControlContext(b"", TicketLedger(1), 1.0, 1.0, os.urandom)
                         .pending.limit, 4)

    def test_over_the_limit_refused_and_not_recorded(self) -> None:
        self.fill()
        recorded = len(self.context.tickets)  # type: ignore[arg-type]
        self.assert_over("over")
        self.assertEqual(len(self.context.tickets), recorded)  # type: ignore[arg-type]
        m, actions = self.user("bob1", user="bob")  # other users are not held up
        self.assertIs(m.state, LegState.WAITING, actions)
        self.assertEqual(self.context.pending.held("alice"), self.context.pending.limit)

    def test_every_way_out_frees_a_place(self) -> None:
        ways = {
            "paired": lambda m: m.paired("vm1", m.ticket),
            "gave up": lambda m: m.timed_out(),
            "refused": lambda m: m.message(b"early", True, NOW),
            "revoked": lambda m: m.revoked(_Revoked("alice")),
            "lost": lambda m: m.lost(),
            "closed": lambda m: m.closing(),
        }
        for n, (way, leave) in enumerate(ways.items()):
            with self.subTest(way=way):
                self.setUp()
                legs = self.fill()
                leave(legs[0])
                leave(legs[0])  # twice: counted once
                m, actions = self.user(f"again{n}")
                self.assertIs(m.state, LegState.WAITING, actions)
                self.assert_over(f"over{n}")

    def test_table_refusal_and_ledger_refusal_hold_nothing(self) -> None:
        for i in range(self.context.pending.limit + 1):
            m = UserLegMachine(self.context, ADDRESS)
            m.opened()
            m.message(json.dumps({"type": "connect", "ticket": self.ticket(
                ticket_id=f"t{i}")}).encode(), False, NOW)
            m.joined(Refused("too many pairs (max 1)"))
        self.assertEqual(self.context.pending.held("alice"), 0)
        self.context.tickets = _Ledger(Use.FULL)
        for i in range(self.context.pending.limit + 1):
            self.user(f"f{i}")
        self.assertEqual(self.context.pending.held("alice"), 0)
        self.context.tickets = TicketLedger(100)
        self.fill()


class ShapeTests(SynchronousTestCase):
    def test_no_autobahn_no_reactor(self) -> None:
        """control.py is sans-IO: it imports neither autobahn nor Twisted."""
        with open(control.__file__) as f:
            tree = ast.parse(f.read())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        self.assertEqual([n for n in names if n.split(".")[0] in ("autobahn", "twisted")], [])

    def test_machines_keep_no_instance_dict(self) -> None:
        """Thousands of idle legs each hold one: slots, no __dict__."""
        context = ControlContext(b"", TicketLedger(1), 1.0, 1.0, os.urandom)
        for machine in (VmLegMachine(context, ADDRESS), UserLegMachine(context, ADDRESS)):
            self.assertFalse(hasattr(machine, "__dict__"), type(machine).__name__)
