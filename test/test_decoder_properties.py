"""Property tests (Hypothesis) for every decoder of network input.

Each decoder either returns a value or raises its own documented error type:
never another exception (a RecursionError, KeyError, TypeError, ... escaping
into the reactor is a crash for everyone on that connection), whatever the
bytes.  Round trips hold for well-formed input.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ticrypt import closecodes, identity, signed
from ticrypt.channel import ChannelError, app
from ticrypt.channel.handshake import decode_handshake
from ticrypt.channel.records import RecordOpener, RecordSealer
from ticrypt.encoding import JsonError, b64, canonical, loads_bounded, unb64
from ticrypt.http.server import ApiError, Field, parse_body
from ticrypt.proxy.control import ControlError, parse_control

PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30)

#: Bytes that look like JSON often enough to reach the parser's corners.
json_ish = st.one_of(
    st.binary(max_size=300),
    st.text(alphabet='[]{}",:\\0123456789.eE+-truefalsnNaIiy \n\t\x00', max_size=300)
      .map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.integers(1, 5000).map(lambda n: b"[" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n),
)


class LoadsBoundedProperties(SynchronousTestCase):
    @PROPS
    @given(json_ish)
    def test_only_json_error(self, raw: bytes) -> None:
        try:
            loads_bounded(raw, max_size=1 << 16)
        except JsonError as e:
            self.assertIn(e.code, ("too-large", "too-deep", "not-json"))

    @PROPS
    @given(json_values)
    def test_round_trip(self, value: Any) -> None:
        self.assertEqual(loads_bounded(json.dumps(value), max_size=1 << 20), value)


class TokenProperties(SynchronousTestCase):
    key = identity.generate()
    pub = identity.public_bytes(key)

    @PROPS
    @given(st.text(max_size=5000))
    def test_arbitrary_token_text(self, token: str) -> None:
        with self.assertRaises(signed.TokenError):
            signed.verify_ticket(self.pub, token, vm=None, client="127.0.0.1", now=0)

    @PROPS
    @given(json_ish, st.binary(min_size=64, max_size=64))
    def test_arbitrary_payload_and_signature(self, body: bytes, sig: bytes) -> None:
        token = b64(body) + "." + b64(sig)
        with self.assertRaises(signed.TokenError):
            signed.open_token(self.pub, signed.TICKET, token)

    @PROPS
    @given(json_ish)
    def test_signed_garbage_is_a_bad_token(self, body: bytes) -> None:
        sig = self.key.sign(signed.DOMAIN + signed.TICKET.encode() + b"\x00" + body)
        try:
            payload = signed.open_token(self.pub, signed.TICKET, b64(body) + "." + b64(sig))
        except signed.TokenError as e:
            self.assertIn(e.code, ("bad-token", "bad-signature"))
        else:
            self.assertEqual(canonical(payload), body)

    @PROPS
    @given(st.dictionaries(st.text(max_size=6), json_values, max_size=5))
    def test_round_trip(self, payload: dict[str, Any]) -> None:
        token = signed.make_token(self.key, signed.LOGIN, payload)
        if len(token) <= signed.MAX_TOKEN:
            self.assertEqual(signed.open_token(self.pub, signed.LOGIN, token), payload)


class ControlMessageProperties(SynchronousTestCase):
    @PROPS
    @given(json_ish, st.booleans())
    def test_only_control_error(self, raw: bytes, binary: bool) -> None:
        try:
            msg = parse_control(raw, binary, "connect", ("ticket",))
        except ControlError as e:
            self.assertEqual(e.code, closecodes.BAD_MESSAGE.code)
            self.assertTrue(e.reason.startswith("bad-message: "))
        else:
            self.assertEqual(set(msg), {"ticket"})
            self.assertIsInstance(msg["ticket"], str)


class RestBodyProperties(SynchronousTestCase):
    fields = {"user": Field(str), "n": Field(int, required=False)}

    @PROPS
    @given(json_ish)
    def test_only_api_error_400(self, raw: bytes) -> None:
        try:
            body = parse_body(raw, self.fields)
        except ApiError as e:
            self.assertEqual(e.status, 400)
        else:
            self.assertIsInstance(body["user"], str)


class ChannelDecoderProperties(SynchronousTestCase):
    @PROPS
    @given(json_ish)
    def test_handshake_message(self, raw: bytes) -> None:
        try:
            decode_handshake(raw.decode("utf-8", "replace"))
        except ChannelError as e:
            self.assertEqual(e.code, "bad-message")

    @PROPS
    @given(json_ish, st.binary(max_size=50))
    def test_app_message(self, head: bytes, body: bytes) -> None:
        try:
            header, got = app.decode(head + b"\n" + body)
        except app.AppError as e:
            self.assertEqual(e.code, "bad-message")
        else:
            self.assertIsInstance(header["t"], str)
            self.assertTrue(got.endswith(body))

    @PROPS
    @given(st.binary(max_size=200), st.integers(0, 3))
    def test_records(self, record: bytes, expected: int) -> None:
        opener = RecordOpener(b"k" * 32, expected_seq=expected)
        with self.assertRaises(ChannelError) as cm:
            opener.open(record)
        self.assertIn(cm.exception.code, ("bad-record", "replay", "out-of-order",
                                          "decrypt-failed"))
        self.assertEqual(opener.expected_seq, expected)  # state untouched

    @PROPS
    @given(st.lists(st.binary(max_size=100), min_size=1, max_size=5),
           st.integers(0, 4), st.integers(0, 7))
    def test_one_flipped_bit_is_refused(self, plaintexts: list[bytes], which: int,
                                        bit: int) -> None:
        sealer, opener = RecordSealer(b"k" * 32), RecordOpener(b"k" * 32)
        records = [sealer.seal(p) for p in plaintexts]
        which %= len(records)
        for r, p in zip(records[:which], plaintexts[:which], strict=True):
            self.assertEqual(opener.open(r), p)
        bad = bytearray(records[which])
        bad[len(bad) // 2] ^= 1 << bit
        self.assertRaises(ChannelError, opener.open, bytes(bad))
        self.assertEqual(opener.open(records[which]), plaintexts[which])


class Base64Properties(SynchronousTestCase):
    @PROPS
    @given(st.text(max_size=100))
    def test_only_value_error(self, text: str) -> None:
        try:
            data = unb64(text)
        except ValueError:
            return
        self.assertEqual(b64(data), text)
