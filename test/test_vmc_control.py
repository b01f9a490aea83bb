"""vmc's side of the proxy's control exchange (:mod:`ticrypt.vmc.control`),
sans-IO: messages in, actions out, no websocket, no clock."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ticrypt import identity, signed
from ticrypt.encoding import b64, unb64
from ticrypt.vmc.control import (
    MAX_CONTROL,
    Close,
    Paired,
    Send,
    State,
    VmControl,
    Waiting,
)

NONCE = b64(bytes(range(32)))
LIMIT = 1100000


def _msg(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _bad(text: str) -> list[Close]:
    return [Close(4000, f"bad-message: {text}")]


UNEXPECTED = _bad("unexpected control message")
NOT_AN_OBJECT = _bad("control message is not a JSON object")


class ControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.vm_key = identity.generate()
        self.machine = VmControl(self.vm_key, "vm-1", "the-credential", LIMIT)

    def at(self, state: State) -> VmControl:
        """The machine driven to ``state`` by the proxy's messages."""
        steps = [(State.AUTH_SENT, _msg(type="challenge", nonce=NONCE)),
                 (State.WAITING, _msg(type="waiting")),
                 (State.PAIRED, _msg(type="paired", user="owen", client="10.0.0.1"))]
        for reached, message in steps:
            if self.machine.state is state:
                break
            self.machine.message(message, False)
            self.assertIs(self.machine.state, reached)
        return self.machine

    # -- the way through --------------------------------------------------------

    def test_starts_at_challenge(self) -> None:
        self.assertIs(self.machine.state, State.CHALLENGE)

    def test_challenge_is_answered_with_vm_auth(self) -> None:
        [send] = self.machine.message(_msg(type="challenge", nonce=NONCE), False)
        assert isinstance(send, Send)
        self.assertIs(self.machine.state, State.AUTH_SENT)
        answer = json.loads(send.text)
        self.assertEqual(sorted(answer), ["credential", "signature", "type"])
        self.assertEqual((answer["type"], answer["credential"]), ("vm-auth", "the-credential"))
        # compact JSON, as the proxy's bounded decoder expects it
        self.assertNotIn(" ", send.text)
        self.assertTrue(signed.verify(identity.public_bytes(self.vm_key), signed.PROXY_VM_AUTH,
                                      {"nonce": NONCE, "vm": "vm-1"},
                                      unb64(answer["signature"], 64)))

    def test_waiting_after_vm_auth(self) -> None:
        self.at(State.AUTH_SENT)
        self.assertEqual(self.machine.message(_msg(type="waiting"), False), [Waiting()])
        self.assertIs(self.machine.state, State.WAITING)

    def test_paired_names_user_and_client(self) -> None:
        self.at(State.WAITING)
        actions = self.machine.message(_msg(type="paired", user="owen", client="10.0.0.1",
                                            user_key="ignored"), False)
        self.assertEqual(actions, [Paired(user="owen", client="10.0.0.1")])
        self.assertIs(self.machine.state, State.PAIRED)

    def test_paired_fields_are_bounded_text(self) -> None:
        self.at(State.WAITING)
        [paired] = self.machine.message(_msg(type="paired", user="u" * 500, client=12345),
                                        False)
        self.assertEqual(paired, Paired(user="u" * 128, client="12345"))

    def test_paired_without_names(self) -> None:
        self.at(State.WAITING)
        self.assertEqual(self.machine.message(_msg(type="paired"), False),
                         [Paired(user="", client="")])

    def test_after_paired_the_socket_is_the_channels(self) -> None:
        self.at(State.PAIRED)
        self.assertRaises(RuntimeError, self.machine.message, _msg(type="waiting"), False)
        self.assertEqual(self.machine.oversized(), [])
        self.assertEqual(self.machine.timed_out(), [])

    # -- refusals: close 4000 bad-message, then nothing more is read -------------

    def assertRefused(self, actions: list[Any], expected: list[Close]) -> None:
        self.assertEqual(actions, expected)
        self.assertIs(self.machine.state, State.CLOSED)
        self.assertEqual(self.machine.message(_msg(type="challenge", nonce=NONCE), False), [])

    def test_not_a_json_object(self) -> None:
        for state in (State.CHALLENGE, State.AUTH_SENT, State.WAITING):
            for payload, binary in ((_msg(type="challenge", nonce=NONCE), True),
                                    (b"not json", False), (b"[1, 2]", False),
                                    (b'"challenge"', False), (b"\xff\xfe", False),
                                    (b"[" * 100 + b"]" * 100, False),
                                    (b'{"type":"waiting","x":NaN}', False),
                                    (_msg(type="waiting", pad="x" * MAX_CONTROL), False)):
                self.setUp()
                self.at(state)
                self.assertRefused(self.machine.message(payload, binary), NOT_AN_OBJECT)

    def test_bad_nonce(self) -> None:
        for nonce in (None, 32, "", b64(bytes(31)), b64(bytes(33)), "not base64!" * 4,
                      NONCE + "=="):
            self.setUp()
            fields = {"type": "challenge"} if nonce is None else {"type": "challenge",
                                                                  "nonce": nonce}
            self.assertRefused(self.machine.message(_msg(**fields), False),
                               _bad("challenge nonce is not b64 of 32 bytes"))

    def test_unexpected_messages(self) -> None:
        wrong = {State.CHALLENGE: ["waiting", "paired", "vm-auth", None, "nope"],
                 State.AUTH_SENT: ["challenge", "paired", None],
                 State.WAITING: ["challenge", "waiting", None]}
        for state, kinds in wrong.items():
            for kind in kinds:
                self.setUp()
                self.at(state)
                fields = {} if kind is None else {"type": kind}
                self.assertRefused(self.machine.message(_msg(nonce=NONCE, **fields), False),
                                   UNEXPECTED)

    def test_oversized_message(self) -> None:
        for state in (State.CHALLENGE, State.AUTH_SENT, State.WAITING):
            self.setUp()
            self.at(state)
            self.assertRefused(self.machine.oversized(), _bad(f"message over {LIMIT} bytes"))

    def test_closed_ignores_everything(self) -> None:
        self.machine.message(b"junk", False)
        self.assertEqual(self.machine.oversized(), [])
        self.assertEqual(self.machine.timed_out(), [])
        self.assertIs(self.machine.state, State.CLOSED)

    # -- the authentication deadline --------------------------------------------

    def test_timeout_before_waiting(self) -> None:
        for state in (State.CHALLENGE, State.AUTH_SENT):
            self.setUp()
            self.at(state)
            self.assertRefused(self.machine.timed_out(),
                               [Close(4008, "timeout: proxy authentication")])

    def test_no_deadline_while_waiting(self) -> None:
        self.at(State.WAITING)
        self.assertEqual(self.machine.timed_out(), [])
        self.assertIs(self.machine.state, State.WAITING)
