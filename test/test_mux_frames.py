"""Tests for ticrypt.mux.frames: round trips, every FrameError, the vectors, the bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ticrypt.mux import frames
from ticrypt.mux.frames import (
    FRAME_ERRORS,
    HEADER_SIZE,
    MAX_PAYLOAD,
    Accept,
    Data,
    Frame,
    FrameDecoder,
    FrameError,
    GoAway,
    HalfClose,
    Open,
    Ping,
    Pong,
    Reset,
    Window,
    decode_one,
    encode,
)

VECTORS = Path(__file__).resolve().parent / "vectors" / "mux-v1.json"
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAMPLES: list[Frame] = [
    Open(1, 22),
    Open(2**31 - 1, 65535),
    Accept(3),
    Data(5, b""),
    Data(5, b"x" * MAX_PAYLOAD),
    Window(7, 1),
    Window(7, 2**31 - 1),
    HalfClose(9),
    Reset(11, frames.RESET_REFUSED, "port-not-allowed"),
    Reset(11, frames.RESET_CANCEL, ""),
    Ping(b"12345678"),
    Pong(b"87654321"),
    GoAway("normal"),
    GoAway("x" * 64),
]


def as_json(frame: Frame) -> dict[str, Any]:
    """A decoded frame in the vectors' JSON shape."""
    names = {Open: "OPEN", Accept: "ACCEPT", Data: "DATA", Window: "WINDOW", HalfClose: "HALF_CLOSE",
             Reset: "RESET", Ping: "PING", Pong: "PONG", GoAway: "GOAWAY"}
    out: dict[str, Any] = {"type": names[type(frame)]}
    for key, value in attrs.asdict(frame).items():
        out[key] = value.hex() if isinstance(value, bytes) else value
    return out


class RoundTripTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        for frame in SAMPLES:
            data = encode(frame)
            self.assertEqual(decode_one(data), frame)
            self.assertEqual(FrameDecoder().feed(data), [frame])

    def test_byte_at_a_time(self) -> None:
        """Frames split anywhere come out whole and in order."""
        stream = b"".join(encode(f) for f in SAMPLES[:6] + SAMPLES[7:])
        decoder = FrameDecoder()
        got: list[Frame] = []
        for i in range(len(stream)):
            got += decoder.feed(stream[i : i + 1])
        self.assertEqual(got, SAMPLES[:6] + SAMPLES[7:])
        self.assertEqual(decoder.buffered, 0)

    def test_cut_once_anywhere(self) -> None:
        """Cut once anywhere: the two feeds give the frames whole and in
        order (a frame inside one feed is read from it directly, a cut one
        through the buffer, and the two mix in one feed)."""
        small = [f for f in SAMPLES if not (isinstance(f, Data) and len(f.payload) > 64)]
        for frames_, step in ((small, 1), (SAMPLES, 997)):
            stream = b"".join(encode(f) for f in frames_)
            for cut in [*range(0, len(stream), step), len(stream)]:
                decoder = FrameDecoder()
                got = decoder.feed(stream[:cut])
                self.assertLessEqual(decoder.buffered, HEADER_SIZE + MAX_PAYLOAD)
                got += decoder.feed(stream[cut:])
                self.assertEqual(got, frames_)
                self.assertEqual(decoder.buffered, 0)

    def test_many_in_one_chunk(self) -> None:
        self.assertEqual(FrameDecoder().feed(b"".join(encode(f) for f in SAMPLES)), SAMPLES)

    def test_header_layout(self) -> None:
        """Type at offset 0, stream at 1, length at 5 (big-endian), payload at 9."""
        self.assertEqual(encode(Data(0x01020304, b"ab")), b"\x03\x01\x02\x03\x04\x00\x00\x00\x02ab")
        self.assertEqual(HEADER_SIZE, 9)

    def test_values_reject_what_cannot_be_encoded(self) -> None:
        for make in (lambda: Open(0, 1), lambda: Open(1, 0), lambda: Open(2**31, 1), lambda: Data(1, b"x" * (MAX_PAYLOAD + 1)),
                     lambda: Window(1, 2**31), lambda: Reset(1, 9, "x"), lambda: Reset(1, 0, "a b"), lambda: GoAway("x" * 65),
                     lambda: Ping(b"short")):
            self.assertRaises(ValueError, make)


class FrameErrorTests(SynchronousTestCase):
    def assertFrameError(self, data: bytes, reason: str) -> None:
        with self.assertRaises(FrameError) as cm:
            FrameDecoder().feed(data)
        self.assertEqual(cm.exception.reason, reason)
        self.assertIn(reason, FRAME_ERRORS)

    def test_header_checked_before_payload(self) -> None:
        """A too-large length is refused from the 9 header bytes alone: nothing is buffered."""
        self.assertFrameError(b"\x03\x00\x00\x00\x01\x00\x01\x00\x01", "frame-too-large")
        self.assertFrameError(b"\x03\x00\x00\x00\x01\xff\xff\xff\xff", "frame-too-large")

    def test_largest_payload_accepted(self) -> None:
        decoder = FrameDecoder()
        self.assertEqual(decoder.feed(encode(Data(1, b"z" * MAX_PAYLOAD))[:-1]), [])
        self.assertEqual(decoder.buffered, HEADER_SIZE + MAX_PAYLOAD - 1)

    def test_decoder_dead_after_error(self) -> None:
        decoder = FrameDecoder()
        self.assertRaises(FrameError, decoder.feed, b"\x00" * 9)
        with self.assertRaises(FrameError) as cm:
            decoder.feed(encode(Accept(1)))
        self.assertEqual(cm.exception.reason, "unknown-type")
        self.assertEqual(decoder.buffered, 0)

    def test_every_error_has_a_vector(self) -> None:
        doc = json.loads(VECTORS.read_text())
        self.assertEqual({v["error"] for v in doc["vectors"] if "error" in v}, set(FRAME_ERRORS))

    def test_error_str_names_reason(self) -> None:
        self.assertIn("bad-port", str(FrameError("bad-port")))


class VectorTests(SynchronousTestCase):
    """test/vectors/mux-v1.json: packed by hand from PROTOCOL.md."""

    def test_vectors(self) -> None:
        doc = json.loads(VECTORS.read_text())
        self.assertGreater(len(doc["vectors"]), 30)
        for vector in doc["vectors"]:
            data = bytes.fromhex(vector["hex"])
            if "error" in vector:
                with self.assertRaises(FrameError, msg=vector["name"]) as cm:
                    decode_one(data)
                self.assertEqual(cm.exception.reason, vector["error"], vector["name"])
                if len(data) >= HEADER_SIZE and vector["error"] != "bad-length":
                    # The streaming decoder reaches the same verdict.
                    with self.assertRaises(FrameError) as cm2:
                        FrameDecoder().feed(data)
                    self.assertEqual(cm2.exception.reason, vector["error"], vector["name"])
            else:
                frame = decode_one(data)
                self.assertEqual(as_json(frame), vector["frame"], vector["name"])
                self.assertEqual(encode(frame), data, vector["name"])


class DecoderPropertyTests(SynchronousTestCase):
    @PROPS
    @given(st.lists(st.binary(max_size=64), max_size=8))
    def test_only_frame_error(self, chunks: list[bytes]) -> None:
        """Whatever the bytes and however split: frames or FrameError, and a bounded buffer."""
        decoder = FrameDecoder()
        for chunk in chunks:
            try:
                decoder.feed(chunk)
            except FrameError as e:
                self.assertIn(e.reason, FRAME_ERRORS)
                return
            self.assertLessEqual(decoder.buffered, HEADER_SIZE + MAX_PAYLOAD)

    @PROPS
    @given(st.integers(0, 255), st.integers(0, 2**32 - 1), st.binary(max_size=80))
    def test_headers_and_payloads(self, ftype: int, stream: int, payload: bytes) -> None:
        """A well-framed header and payload of any content: a frame that re-encodes identically, or FrameError."""
        data = bytes([ftype]) + stream.to_bytes(4, "big") + len(payload).to_bytes(4, "big") + payload
        try:
            frame = decode_one(data)
        except FrameError as e:
            self.assertIn(e.reason, FRAME_ERRORS)
        else:
            self.assertEqual(encode(frame), data)
