"""The frontend's user leg without a network: the sans-IO control exchange
(ticrypt.frontend.control), close codes turned into errors
(ticrypt.frontend.errors), and UserLeg performing both with a VM end of
the secure channel on the other side."""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from ticrypt import closecodes
from ticrypt.channel import VmChannel, app
from ticrypt.channel.primitives import ed25519_public_bytes
from ticrypt.frontend.control import (
    MAX_CONTROL,
    Close,
    Feed,
    Phase,
    SendText,
    StartChannel,
    UserControl,
)
from ticrypt.frontend.errors import SessionError, close_error
from ticrypt.frontend.leg import UserLeg
from ticrypt.ws import ChannelPump

PAIRED = b'{"type":"paired","vm":"vm-1"}'


class ControlTests(SynchronousTestCase):
    def paired(self) -> UserControl:
        c = UserControl()
        c.opened("T")
        self.assertEqual(c.message(PAIRED, False), [StartChannel()])
        return c

    def test_ticket_then_paired_then_channel(self) -> None:
        c = UserControl()
        [send] = c.opened("tick.et")
        assert isinstance(send, SendText)
        self.assertEqual(json.loads(send.text), {"type": "connect", "ticket": "tick.et"})
        self.assertIs(c.phase, Phase.CONNECT_SENT)
        self.assertEqual(c.message(PAIRED, False), [StartChannel()])
        self.assertIs(c.phase, Phase.HANDSHAKE)
        self.assertEqual(c.message(b"hello", False), [Feed(b"hello", False)])
        c.established()
        self.assertEqual(c.message(b"\x01rec", True), [Feed(b"\x01rec", True)])
        self.assertIsNone(c.ended)

    def test_anything_but_paired_is_bad_message(self) -> None:
        for payload, binary in ((b'{"type":"waiting"}', False), (PAIRED, True), (b"[]", False),
                                (b"{", False), (b"[" * 3000, False),
                                (b'{"type":"paired","x":"' + b"a" * MAX_CONTROL + b'"}', False)):
            c = UserControl()
            c.opened("T")
            self.assertEqual(c.message(payload, binary),
                             [Close(4000, "bad-message: expected paired")])
            assert c.ended is not None
            self.assertEqual(c.ended.code, "bad-message")
            self.assertEqual(c.message(PAIRED, False), [])  # closing: nothing more is read

    def test_set_up_timeout(self) -> None:
        c = self.paired()
        self.assertEqual(c.timed_out(30), [Close(4008, "timeout: no secure channel within 30s")])
        assert c.ended is not None
        self.assertEqual(str(c.ended), "timeout: no secure channel within 30s")
        self.assertEqual(c.timed_out(30), [])
        done = self.paired()
        done.established()
        self.assertEqual(done.timed_out(30), [])

    def test_channel_failure_closes_4400_with_the_bare_code(self) -> None:
        c = self.paired()
        self.assertEqual(c.channel_failed("vm-key-mismatch", "x"), [Close(4400, "vm-key-mismatch")])
        assert c.ended is not None
        self.assertEqual(c.ended.code, "vm-key-mismatch")
        self.assertIn("registered in rest", str(c.ended))
        # a failure detected here wins over the close code the far end answers with
        self.assertIs(c.closed(4400, "vm-key-mismatch"), c.ended)

    def test_close_once_and_reason_cut(self) -> None:
        c = self.paired()
        [close] = c.close(1000, "x" * 500)
        assert isinstance(close, Close)
        self.assertEqual(len(close.reason.encode()), closecodes.MAX_REASON)
        self.assertEqual(c.close(1000, "bye"), [])

    def test_clean_close_after_established_is_no_error(self) -> None:
        c = self.paired()
        c.established()
        self.assertIsNone(c.closed(1000, "bye"))
        assert c.ended is not None  # but the leg is no longer usable
        self.assertEqual(c.ended.code, "closed")

    def test_close_before_established_is_an_error(self) -> None:
        c = self.paired()
        err = c.closed(1000, "going-away: vmc stopping")
        assert err is not None
        self.assertEqual(err.code, "going-away")
        for code in (None, 1006):
            lost = self.paired().closed(code, "")
            assert lost is not None
            self.assertEqual(lost.code, "connection-lost")
        refused = UserControl()
        refused.opened("T")
        err = refused.closed(4003, "ticket-refused: expired")
        assert err is not None
        self.assertEqual((err.code, str(err)), ("ticket-refused", "ticket-refused: the proxy "
                                                "refused the connection ticket (expired)"))


class CloseErrorTableTests(SynchronousTestCase):
    """Every close code of PROTOCOL.md §1.2 reaches the user named and
    explained by ticrypt.closecodes; unknown ones keep the code and reason."""

    def test_every_code_is_named_and_explained(self) -> None:
        for entry in closecodes.ALL:
            if entry.code in (closecodes.NORMAL.code, closecodes.CHANNEL_ERROR.code):
                continue  # named after the reason
            e = close_error(entry.code, f"{entry.name}: some detail")
            self.assertEqual(e.code, entry.name)
            self.assertEqual(str(e), f"{entry.name}: {entry.human} (some detail)")

    def test_revoked_is_explained(self) -> None:
        e = close_error(4011, "revoked: the user was disabled")
        self.assertEqual(e.code, "revoked")
        self.assertIn("access was revoked", str(e))
        self.assertIn("(the user was disabled)", str(e))

    def test_channel_reasons_explained_as_channel_errors(self) -> None:
        e = close_error(4400, "bad-message")
        self.assertEqual(str(e), "bad-message: malformed handshake message")
        self.assertEqual(str(close_error(4400, "")), "channel-error: the secure channel failed")
        self.assertIn("record was over the size limit", str(close_error(4400, "record-too-large")))

    def test_unknown_code_keeps_code_and_reason(self) -> None:
        self.assertEqual(str(close_error(4999, "weird thing")),
                         "weird: connection closed (4999 weird thing)")
        self.assertEqual(str(close_error(3000, "")), "closed: connection closed (3000 )")


class _Factory:
    """What UserLeg reads from its factory."""

    def __init__(self, user_key: Ed25519PrivateKey, vm_public_key: bytes) -> None:
        self.ticket = "T"
        self.user_key = user_key
        self.vm_id = "vm-1"
        self.vm_public_key = vm_public_key
        self.ready: defer.Deferred[Any] = defer.Deferred()
        self.made: list[UserLeg] = []

    def make_receiver(self, leg: UserLeg) -> _Receiver:
        self.made.append(leg)
        return _Receiver()


class _Receiver:
    def __init__(self) -> None:
        self.messages: list[tuple[dict[str, Any], bytes]] = []
        self.closed: list[SessionError | None] = []

    def app_message(self, header: dict[str, Any], body: bytes) -> None:
        self.messages.append((header, body))

    def leg_closed(self, err: SessionError | None) -> None:
        self.closed.append(err)


class _Leg(UserLeg):
    """UserLeg with its websocket writes recorded instead of framed."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[tuple[bytes, bool]] = []
        self.closes: list[tuple[int, str]] = []

    def sendMessage(self, payload: bytes, isBinary: bool = False,  # type: ignore[override]
                    *a: Any, **kw: Any) -> None:
        self.out.append((payload, isBinary))

    def sendClose(self, code: int | None = None,  # type: ignore[override]
                  reason: str | None = None) -> None:
        self.closes.append((code or 0, reason or ""))


class UserLegTests(SynchronousTestCase):
    """UserLeg performs the control actions and runs the channel through
    ticrypt.ws.ChannelPump against a real VM end."""

    def setUp(self) -> None:
        user_key, vm_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        self.factory = _Factory(user_key, ed25519_public_bytes(vm_key))
        self.leg = _Leg()
        self.leg.factory = self.factory  # type: ignore[assignment]
        self.vm_out: list[tuple[bytes, bool]] = []
        self.vm = ChannelPump(VmChannel(vm_key, "vm-1", lambda key: True),
                              send=lambda p, b: self.vm_out.append((p, b)),
                              on_established=lambda key: None,
                              on_delivered=lambda p: self.vm_out.append((b"got:" + p, True)),
                              on_failed=self.fail)

    def to_vm(self) -> None:
        out, self.leg.out = self.leg.out, []
        for payload, binary in out:
            self.vm.feed(payload, binary)

    def to_leg(self) -> None:
        out, self.vm_out = self.vm_out, []
        for payload, binary in out:
            self.leg.onMessage(payload, binary)

    def establish(self) -> _Receiver:
        self.leg.onOpen()
        [(connect, binary)] = self.leg.out
        self.assertEqual((json.loads(connect)["type"], binary), ("connect", False))
        self.leg.out = []
        self.leg.onMessage(PAIRED, False)
        self.to_vm()  # ClientHello
        self.to_leg()  # VmHello
        self.to_vm()  # ClientFinish
        receiver = self.successResultOf(self.factory.ready)
        self.assertEqual(self.factory.made, [self.leg])
        self.assertEqual(self.leg.peer_key, self.factory.vm_public_key)
        return receiver  # type: ignore[no-any-return]

    def test_established_then_app_messages_both_ways(self) -> None:
        receiver = self.establish()
        self.leg.send_app({"t": "req", "id": 1, "op": "info"})
        self.to_vm()
        [(got, _)] = self.vm_out
        self.assertEqual(got, b"got:" + app.encode({"t": "req", "id": 1, "op": "info"}))
        self.vm_out = []
        self.vm.send_app(app.encode({"t": "ok", "id": 1, "vm": "vm-1"}))
        self.to_leg()
        self.assertEqual(receiver.messages, [({"t": "ok", "id": 1, "vm": "vm-1"}, b"")])
        self.leg.close(1000, "bye")
        self.assertEqual(self.leg.closes, [(1000, "bye")])
        self.leg.onClose(True, 1000, "bye")
        self.assertEqual(receiver.closed, [None])

    def test_nothing_sent_before_established(self) -> None:
        self.leg.send_app({"t": "req", "id": 1, "op": "info"})
        self.leg.onOpen()
        self.leg.onMessage(PAIRED, False)
        self.leg.send_app({"t": "req", "id": 1, "op": "info"})
        self.assertEqual([b for _, b in self.leg.out], [False, False])  # connect, ClientHello

    def test_channel_failure_closes_and_fails_ready(self) -> None:
        self.leg.onOpen()
        self.leg.onMessage(PAIRED, False)
        self.leg.onMessage(b"\xff", False)  # not UTF-8
        self.assertEqual(self.leg.closes, [(4400, "bad-message")])
        self.leg.onClose(True, 4400, "bad-message")
        err = self.failureResultOf(self.factory.ready, SessionError).value
        self.assertEqual(str(err), "bad-message: a text message is not UTF-8")

    def test_set_up_timeout(self) -> None:
        self.leg.onOpen()
        self.leg.timed_out(30)
        self.assertEqual(self.leg.closes, [(4008, "timeout: no secure channel within 30s")])
        self.leg.onClose(True, 4008, "")
        self.assertEqual(self.failureResultOf(self.factory.ready, SessionError).value.code,
                         "timeout")

    def test_revoked_reaches_the_session(self) -> None:
        receiver = self.establish()
        self.leg.onClose(True, 4011, "revoked: the session was ended")
        [err] = receiver.closed
        assert err is not None
        self.assertEqual(err.code, "revoked")
        self.assertIs(self.leg.ended, err)
