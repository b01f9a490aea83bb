"""Tunnel mux frame codec (sans-IO): bytes <-> frame value objects.

Every frame has a fixed 9-byte header::

    offset 0  type    u8
    offset 1  stream  u32 big-endian (bit 31 reserved, must be 0)
    offset 5  length  u32 big-endian (payload bytes that follow)

followed by ``length`` payload bytes. The decoder checks the header (type,
reserved bit, stream id, length) as soon as the 9 bytes are there, before it
buffers any payload, so a peer can never make it hold more than
``HEADER_SIZE + MAX_PAYLOAD`` bytes. Every malformed frame is a
:class:`FrameError` with a stable reason name; nothing else escapes
:meth:`FrameDecoder.feed`. No Twisted imports here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import attrs

#: Bytes of the fixed frame header.
HEADER_SIZE = 9
#: Largest payload any frame may carry (protocol constant of version 1).
MAX_PAYLOAD = 65536
#: Longest reason text in RESET and GOAWAY.
MAX_REASON = 64
#: Largest stream id (bit 31 of the field is reserved).
MAX_STREAM_ID = 2**31 - 1
#: Largest window increment, and largest window a sender may hold.
MAX_WINDOW = 2**31 - 1
#: Bytes of the opaque value of PING and PONG.
PING_SIZE = 8

T_OPEN = 0x01
T_ACCEPT = 0x02
T_DATA = 0x03
T_WINDOW = 0x04
T_HALF_CLOSE = 0x05
T_RESET = 0x06
T_PING = 0x07
T_PONG = 0x08
T_GOAWAY = 0x09

#: RESET codes: what kind of end the reason text names.
RESET_CANCEL = 0  # the sender's application aborted the stream
RESET_REFUSED = 1  # the server refused the OPEN (the stream never carried data to the app)
RESET_ERROR = 2  # the stream failed (e.g. the server's local connection broke)
RESET_CODES = (RESET_CANCEL, RESET_REFUSED, RESET_ERROR)

#: The fixed header: type, stream, length (big-endian); also used by
#: :mod:`ticrypt.mux.connection` to queue DATA as header + payload.
HEADER = struct.Struct(">BII")

#: Every reason a :class:`FrameError` can carry.
FRAME_ERRORS: dict[str, str] = {
    "unknown-type": "frame type is not defined in version 1",
    "reserved-bits": "a reserved bit is set",
    "frame-too-large": "payload length exceeds 65536",
    "bad-length": "payload length is wrong for the frame type",
    "bad-stream-id": "stream id is 0 on a stream frame, or not 0 on a connection frame",
    "bad-port": "port is 0",
    "bad-reset-code": "unknown RESET code",
    "bad-reason": "reason text is not printable ASCII",
}


class FrameError(Exception):
    """A malformed frame; the connection that read it must end.

    ``reason`` is a stable kebab-case name, a key of :data:`FRAME_ERRORS`.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason, FRAME_ERRORS.get(reason, reason))
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {FRAME_ERRORS.get(self.reason, '')}"


def _stream(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= MAX_STREAM_ID:
        raise ValueError(f"stream id {value} out of range")


def _reason(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _reason_ok(value.encode("ascii", "replace")):
        raise ValueError(f"reason {value!r} must be 0-{MAX_REASON} printable ASCII bytes")


def _reason_ok(raw: bytes) -> bool:
    return len(raw) <= MAX_REASON and all(0x21 <= b <= 0x7E for b in raw)


#: PING's and PONG's opaque bytes: exactly PING_SIZE of them.
_opaque: Callable[[Any, attrs.Attribute[bytes], bytes], Any] = attrs.validators.and_(
    attrs.validators.min_len(PING_SIZE), attrs.validators.max_len(PING_SIZE))


@attrs.frozen
class _StreamFrame:
    """A frame of one stream: its ``stream`` id comes first."""

    stream: int = attrs.field(validator=_stream)


@attrs.frozen
class Open(_StreamFrame):
    """Client -> server: open ``stream`` to TCP ``port`` on the server's host."""

    port: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(1), attrs.validators.le(65535)))


@attrs.frozen
class Accept(_StreamFrame):
    """Server -> client: the OPEN of ``stream`` succeeded."""


@attrs.frozen
class Data(_StreamFrame):
    """Payload bytes on ``stream`` (may be empty; counts against the window)."""

    payload: bytes = attrs.field(validator=attrs.validators.max_len(MAX_PAYLOAD), repr=lambda p: f"<{len(p)} bytes>")


@attrs.frozen
class Window(_StreamFrame):
    """The receiver of ``stream`` grants ``increment`` more bytes of DATA."""

    increment: int = attrs.field(validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(MAX_WINDOW)))


@attrs.frozen
class HalfClose(_StreamFrame):
    """The sender will send no more DATA on ``stream`` (TCP FIN)."""


@attrs.frozen
class Reset(_StreamFrame):
    """``stream`` is over in both directions; ``code`` is one of RESET_CODES."""

    code: int = attrs.field(validator=attrs.validators.in_(RESET_CODES))
    reason: str = attrs.field(validator=_reason)


@attrs.frozen
class Ping:
    """Liveness probe; the peer answers PONG with the same opaque bytes."""

    opaque: bytes = attrs.field(validator=_opaque)


@attrs.frozen
class Pong:
    """Answer to a PING."""

    opaque: bytes = attrs.field(validator=_opaque)


@attrs.frozen
class GoAway:
    """The sender ends the whole connection for ``reason``."""

    reason: str = attrs.field(validator=_reason)


Frame = Open | Accept | Data | Window | HalfClose | Reset | Ping | Pong | GoAway


def encode(frame: Frame) -> bytes:
    """The wire bytes of one frame."""
    if isinstance(frame, Data):
        return HEADER.pack(T_DATA, frame.stream, len(frame.payload)) + frame.payload
    if isinstance(frame, Window):
        return HEADER.pack(T_WINDOW, frame.stream, 4) + frame.increment.to_bytes(4, "big")
    if isinstance(frame, Open):
        return HEADER.pack(T_OPEN, frame.stream, 2) + frame.port.to_bytes(2, "big")
    if isinstance(frame, Accept):
        return HEADER.pack(T_ACCEPT, frame.stream, 0)
    if isinstance(frame, HalfClose):
        return HEADER.pack(T_HALF_CLOSE, frame.stream, 0)
    if isinstance(frame, Reset):
        text = frame.reason.encode("ascii")
        return HEADER.pack(T_RESET, frame.stream, 2 + len(text)) + frame.code.to_bytes(2, "big") + text
    if isinstance(frame, Ping):
        return HEADER.pack(T_PING, 0, PING_SIZE) + frame.opaque
    if isinstance(frame, Pong):
        return HEADER.pack(T_PONG, 0, PING_SIZE) + frame.opaque
    if isinstance(frame, GoAway):
        text = frame.reason.encode("ascii")
        return HEADER.pack(T_GOAWAY, 0, len(text)) + text
    raise TypeError(f"not a frame: {frame!r}")


# type -> (connection-level frame?, min payload, max payload)
_SHAPES: dict[int, tuple[bool, int, int]] = {
    T_OPEN: (False, 2, 2),
    T_ACCEPT: (False, 0, 0),
    T_DATA: (False, 0, MAX_PAYLOAD),
    T_WINDOW: (False, 4, 4),
    T_HALF_CLOSE: (False, 0, 0),
    T_RESET: (False, 2, 2 + MAX_REASON),
    T_PING: (True, PING_SIZE, PING_SIZE),
    T_PONG: (True, PING_SIZE, PING_SIZE),
    T_GOAWAY: (True, 0, MAX_REASON),
}


def check_header(header: bytes) -> tuple[int, int, int]:
    """Check a 9-byte header; (type, stream, length) or FrameError."""
    ftype, stream, length = HEADER.unpack(header)
    shape = _SHAPES.get(ftype)
    if shape is None:
        raise FrameError("unknown-type")
    if stream & 0x80000000:
        raise FrameError("reserved-bits")
    if length > MAX_PAYLOAD:
        raise FrameError("frame-too-large")
    connection_level, low, high = shape
    if not low <= length <= high:
        raise FrameError("bad-length")
    if connection_level != (stream == 0):
        raise FrameError("bad-stream-id")
    return ftype, stream, length


def parse_payload(ftype: int, stream: int, payload: bytes) -> Frame:
    """The frame of a checked header and its payload; FrameError if malformed."""
    if ftype == T_DATA:
        return Data(stream, payload)
    if ftype == T_WINDOW:
        increment = int.from_bytes(payload, "big")
        if increment & 0x80000000:
            raise FrameError("reserved-bits")
        return Window(stream, increment)
    if ftype == T_OPEN:
        port = int.from_bytes(payload, "big")
        if port == 0:
            raise FrameError("bad-port")
        return Open(stream, port)
    if ftype == T_ACCEPT:
        return Accept(stream)
    if ftype == T_HALF_CLOSE:
        return HalfClose(stream)
    if ftype == T_RESET:
        code = int.from_bytes(payload[:2], "big")
        if code not in RESET_CODES:
            raise FrameError("bad-reset-code")
        return Reset(stream, code, _text(payload[2:]))
    if ftype == T_PING:
        return Ping(payload)
    if ftype == T_PONG:
        return Pong(payload)
    if ftype == T_GOAWAY:
        return GoAway(_text(payload))
    raise FrameError("unknown-type")  # pragma: no cover (check_header rejects it)


def _text(raw: bytes) -> str:
    if not _reason_ok(raw):
        raise FrameError("bad-reason")
    return raw.decode("ascii")


def decode_one(data: bytes) -> Frame:
    """Exactly one frame from ``data``; FrameError("bad-length") if bytes are left
    over or missing. (Used by the test vectors.)"""
    if len(data) < HEADER_SIZE:
        raise FrameError("bad-length")
    ftype, stream, length = check_header(data[:HEADER_SIZE])
    if len(data) != HEADER_SIZE + length:
        raise FrameError("bad-length")
    return parse_payload(ftype, stream, data[HEADER_SIZE:])


class FrameDecoder:
    """Incremental decoder: :meth:`feed` bytes, get the complete frames.

    Holds at most one header plus one payload (``HEADER_SIZE + MAX_PAYLOAD``)
    of partial input. After a FrameError the decoder is dead: every later
    feed raises the same error.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: tuple[int, int, int] | None = None
        self._error: FrameError | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """Frames completed by ``data`` (possibly none); FrameError if malformed."""
        if self._error is not None:
            raise self._error
        frames: list[Frame] = []
        view = memoryview(data)
        pos = 0
        try:
            while True:
                # A header or payload wholly inside ``data`` is taken from it
                # directly (one copy); only a part left by an earlier feed,
                # or cut by the end of this one, goes through the buffer.
                if self._header is None:
                    if not self._buf and len(view) - pos >= HEADER_SIZE:
                        self._header = check_header(bytes(view[pos : pos + HEADER_SIZE]))
                        pos += HEADER_SIZE
                    else:
                        pos = self._fill(view, pos, HEADER_SIZE)
                        if len(self._buf) < HEADER_SIZE:
                            break
                        self._header = check_header(bytes(self._buf))
                        self._buf.clear()
                ftype, stream, length = self._header
                if not self._buf and len(view) - pos >= length:
                    payload = bytes(view[pos : pos + length])
                    pos += length
                else:
                    pos = self._fill(view, pos, length)
                    if len(self._buf) < length:
                        break
                    payload = bytes(self._buf)
                    self._buf.clear()
                self._header = None
                frames.append(parse_payload(ftype, stream, payload))
        except FrameError as e:
            self._error = e
            self._buf = bytearray()
            raise
        return frames

    def _fill(self, view: memoryview, pos: int, size: int) -> int:
        """Move bytes from ``view[pos:]`` to the buffer until it holds ``size``
        (or ``view`` is used up); the position after them."""
        take = view[pos : pos + size - len(self._buf)]
        self._buf += take
        return pos + len(take)

    @property
    def buffered(self) -> int:
        """Bytes of a partial frame held (for tests of the bound)."""
        return len(self._buf) + (HEADER_SIZE if self._header is not None else 0)
