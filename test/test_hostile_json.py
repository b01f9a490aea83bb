"""Deeply nested and otherwise hostile JSON at every parser of network input.

A few thousand ``[`` used to raise RecursionError inside Python's JSON parser:
a critical traceback and a dropped connection at the proxy, HTTP 500 at rest,
a traceback in the CLI.  Every parser now goes through
:func:`ticrypt.encoding.loads_bounded` (size and depth checked first), and
signed tokens are verified before their payload is parsed.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ticrypt import closecodes, identity, signed
from ticrypt.channel import ChannelError, app
from ticrypt.channel.handshake import decode_handshake
from ticrypt.encoding import MAX_JSON_DEPTH, JsonError, b64, json_depth, loads_bounded
from ticrypt.frontend.control import Phase
from ticrypt.frontend.errors import SessionError
from ticrypt.frontend.leg import UserLeg
from ticrypt.http.server import ApiError, Field, parse_body
from ticrypt.proxy.control import ControlError, parse_control

#: Deep enough to overflow the interpreter's recursion limit, small enough
#: to fit every size limit (8 KiB control messages, 4 KiB tokens).
DEEP = b"[" * 3000 + b"]" * 3000
DEEP_OPEN = b"[" * 3500


class LoadsBoundedTests(SynchronousTestCase):
    def test_deep_input_is_refused_not_a_recursion_error(self) -> None:
        self.assertGreater(3000, sys.getrecursionlimit() // 2)
        for raw in (DEEP, DEEP_OPEN, b'{"a":' * 3000):
            e = self.assertRaises(JsonError, loads_bounded, raw, max_size=1 << 20)
            self.assertEqual(e.code, "too-deep")

    def test_depth_limit_is_exact(self) -> None:
        ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
        self.assertEqual(json_depth(ok), MAX_JSON_DEPTH)
        loads_bounded(ok, max_size=1000)
        deeper = b"[" + ok + b"]"
        self.assertEqual(self.assertRaises(JsonError, loads_bounded, deeper,
                                           max_size=1000).code, "too-deep")

    def test_brackets_inside_strings_do_not_count(self) -> None:
        text = b'{"a":"' + b"[[[[" * 100 + b'\\"[[[","b":[1]}'
        self.assertEqual(json_depth(text), 2)
        self.assertEqual(loads_bounded(text, max_size=1000)["b"], [1])

    def test_size_is_checked_first(self) -> None:
        e = self.assertRaises(JsonError, loads_bounded, b"1" * 11, max_size=10)
        self.assertEqual(e.code, "too-large")
        self.assertEqual(loads_bounded("12", max_size=10), 12)

    def test_not_json_and_constants(self) -> None:
        for raw in (b"{", b"NaN", b"[Infinity]", b"-Infinity", b"\xff"):
            e = self.assertRaises(JsonError, loads_bounded, raw, max_size=100)
            self.assertEqual(e.code, "not-json")
        self.assertIsInstance(JsonError("x", "y"), ValueError)

    def test_message_does_not_echo_input(self) -> None:
        e = self.assertRaises(JsonError, loads_bounded, b'{"secret-token":', max_size=100)
        self.assertNotIn("secret", str(e))


class TokenTests(SynchronousTestCase):
    """A token's signature is checked over the raw payload bytes before the
    payload is parsed: nobody without the backend key reaches the parser."""

    def setUp(self) -> None:
        self.backend = identity.generate()
        self.pub = identity.public_bytes(self.backend)

    def token(self, body: bytes, key: Any = None) -> str:
        key = key or self.backend
        sig = key.sign(signed.DOMAIN + signed.TICKET.encode() + b"\x00" + body)
        return b64(body) + "." + b64(sig)

    def test_unsigned_deep_payload_is_a_bad_signature(self) -> None:
        forged = self.token(b"[" * 1400 + b"]" * 1400, identity.generate())
        e = self.assertRaises(signed.TokenError, signed.open_token, self.pub, signed.TICKET,
                              forged)
        self.assertEqual(e.code, "bad-signature")

    def test_signed_deep_payload_is_a_bad_token(self) -> None:
        token = self.token(b"[" * 1400 + b"]" * 1400)
        e = self.assertRaises(signed.TokenError, signed.verify_ticket, self.pub, token,
                              vm=None, client="127.0.0.1", now=0)
        self.assertEqual(e.code, "bad-token")

    def test_signed_but_not_canonical_is_a_bad_token(self) -> None:
        token = self.token(b'{"vm": "vm1"}')
        e = self.assertRaises(signed.TokenError, signed.open_token, self.pub, signed.TICKET,
                              token)
        self.assertEqual(e.code, "bad-token")


class ParserTests(SynchronousTestCase):
    def test_proxy_control_message(self) -> None:
        for raw in (DEEP, DEEP_OPEN):
            e = self.assertRaises(ControlError, parse_control, raw, False, "connect",
                                  ("ticket",))
            self.assertEqual((e.code, e.reason),
                             (closecodes.BAD_MESSAGE.code, "bad-message: control message nested too deeply"))

    def test_rest_body(self) -> None:
        e = self.assertRaises(ApiError, parse_body, DEEP, {"user": Field(str)})
        self.assertEqual((e.status, e.code), (400, "malformed-json"))

    def test_channel_handshake_and_app_header(self) -> None:
        e = self.assertRaises(ChannelError, decode_handshake, DEEP.decode())
        self.assertEqual(e.code, "bad-message")
        e2 = self.assertRaises(app.AppError, app.decode, DEEP[:app.MAX_HEADER] + b"\n")
        self.assertEqual(e2.code, "bad-message")


class _Sent:
    def __init__(self) -> None:
        self.closes: list[tuple[int, str]] = []


class VmcControlTests(SynchronousTestCase):
    def test_deep_control_message_from_the_proxy(self) -> None:
        from ticrypt.vmc.control import Close, VmControl

        machine = VmControl(identity.generate(), "vm-1", "credential", 1 << 20)
        self.assertEqual(machine.message(DEEP, False),
                         [Close(4000, "bad-message: control message is not a JSON object")])


class FrontendControlTests(SynchronousTestCase):
    def test_deep_paired_message_from_the_proxy(self) -> None:
        sent = _Sent()

        class Leg(UserLeg):
            def sendClose(self, code: int | None = None,  # type: ignore[override]
                          reason: str | None = None) -> None:
                sent.closes.append((code or 0, reason or ""))

        leg = Leg()
        leg.control.phase = Phase.CONNECT_SENT
        leg.onMessage(DEEP, False)
        self.assertEqual(sent.closes, [(4000, "bad-message: expected paired")])
        assert isinstance(leg.ended, SessionError)
        self.assertEqual(leg.ended.code, "bad-message")
