"""A hostile websocket client at the frame level, for tests of the proxy's
frame limits (autobahn's client would never send these patterns).

* :func:`frame`: one masked client frame (any opcode, FIN, payload, mask).
* :func:`parse_frames`: server frames (unmasked) out of a receive buffer.
* :class:`RawClient`: a Twisted protocol that does the HTTP upgrade, then
  writes raw frames (:meth:`RawClient.send`, or :meth:`RawClient.flood` as a
  streaming producer that writes only while its own transport accepts) and
  collects what the server sends; it can stop reading altogether
  (:meth:`RawClient.stop_reading`), like a peer that never reads its pongs.
* :func:`connect_raw`: a :class:`RawClient` on 127.0.0.1, opened.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10


def frame(opcode: int, payload: bytes = b"", fin: bool = True,
          mask: bytes | None = None) -> bytes:
    """One client-to-server frame, masked as RFC 6455 requires."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    if n:
        key = (mask * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + payload


def fragments(opcode: int, pieces: Iterable[bytes]) -> Iterator[bytes]:
    """One message as frames: ``opcode`` first, continuations after, FIN on
    the last piece."""
    it = iter(pieces)
    current = next(it)
    op = opcode
    for piece in it:
        yield frame(op, current, fin=False, mask=b"\x00\x00\x00\x00")
        op = CONT
        current = piece
    yield frame(op, current, fin=True, mask=b"\x00\x00\x00\x00")


@attrs.frozen
class Frame:
    opcode: int
    fin: bool
    payload: bytes


def parse_frames(buf: bytearray) -> list[Frame]:
    """Whole server frames at the start of ``buf`` (removed from it)."""
    out = []
    while len(buf) >= 2:
        b0, b1 = buf[0], buf[1]
        n, i = b1 & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, i = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, i = struct.unpack("!Q", buf[2:10])[0], 10
        if b1 & 0x80:
            raise ValueError("masked server frame")
        if len(buf) < i + n:
            break
        out.append(Frame(b0 & 0x0F, bool(b0 & 0x80), bytes(buf[i:i + n])))
        del buf[:i + n]
    return out


@implementer(IPushProducer)
class _Flood:
    """Writes ``chunks`` while the transport accepts them (a streaming
    producer: this side never buffers beyond its own ``bufferSize``)."""

    def __init__(self, client: RawClient, chunks: Iterator[bytes]):
        self.client = client
        self.chunks = chunks
        self.paused = False
        self.sent = 0
        self.done: defer.Deferred[int] = defer.Deferred()

    def resumeProducing(self) -> None:
        self.paused = False
        transport = self.client.transport
        while not self.paused and not self.done.called and transport is not None \
                and self.client.lost_reason is None:
            chunk = next(self.chunks, None)
            if chunk is None:
                self._finish()
                return
            transport.write(chunk)
            self.sent += len(chunk)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True
        self._finish()

    def _finish(self) -> None:
        if not self.done.called:
            transport = self.client.transport
            if transport is not None and self.client.lost_reason is None:
                transport.unregisterProducer()
            self.done.callback(self.sent)


class RawClient(protocol.Protocol):
    """HTTP upgrade, then raw frames.  ``opened`` fires after the 101;
    ``lost`` fires (with None) when the connection ended; ``lost_reason``
    then says how."""

    def __init__(self, host: str, port: int, path: str):
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()
        self.opened: defer.Deferred[RawClient] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.lost_reason: Failure | None = None
        self._buf = bytearray()
        self._upgraded = False
        self.frames_received = 0
        self.pongs = 0
        self.close_frame: tuple[int | None, str] | None = None
        self.messages: deque[Frame] = deque()
        self._waiters: deque[defer.Deferred[Frame]] = deque()
        self.flooding: _Flood | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        if not self._upgraded:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self._buf[:end]).split(b"\r\n", 1)[0]
            del self._buf[:end + 4]
            if b" 101 " not in status + b" ":
                self.opened.errback(ConnectionError(status.decode("latin-1")))
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self._upgraded = True
            self.opened.callback(self)
        for f in parse_frames(self._buf):
            self.frames_received += 1
            if f.opcode == PONG:
                self.pongs += 1
            elif f.opcode == CLOSE:
                code = struct.unpack("!H", f.payload[:2])[0] if len(f.payload) >= 2 else None
                self.close_frame = (code, f.payload[2:].decode("utf-8", "replace"))
            elif f.opcode in (TEXT, BINARY, CONT):
                if self._waiters:
                    self._waiters.popleft().callback(f)
                else:
                    self.messages.append(f)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost_reason = reason
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"lost before upgrade: {reason.value}"))
        while self._waiters:
            self._waiters.popleft().errback(ConnectionError(f"lost: {reason.value}"))
        if self.flooding is not None:
            self.flooding._finish()
        self.lost.callback(None)

    # -- what a test does with it ------------------------------------------

    def send(self, *frames: bytes) -> None:
        self.transport.write(b"".join(frames))  # type: ignore[union-attr]

    def send_json_text(self, text: str) -> None:
        self.send(frame(TEXT, text.encode()))

    def next_message(self) -> defer.Deferred[Frame]:
        """The next data frame from the server (the proxy never fragments)."""
        if self.messages:
            return defer.succeed(self.messages.popleft())
        if self.lost_reason is not None:
            return defer.fail(ConnectionError("connection lost"))
        d: defer.Deferred[Frame] = defer.Deferred()
        self._waiters.append(d)
        return d

    def flood(self, chunks: Iterable[bytes]) -> defer.Deferred[int]:
        """Write ``chunks`` as fast as this side's transport accepts them;
        fires with the bytes written when they ran out or the connection ended."""
        self.flooding = _Flood(self, iter(chunks))
        self.transport.registerProducer(self.flooding, True)  # type: ignore[union-attr]
        self.flooding.resumeProducing()
        return self.flooding.done

    def stop_reading(self) -> None:
        """Stop reading: what the server sends piles up in its buffers.  (With
        nothing to write either, Twisted would not notice the connection end.)"""
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def abort(self) -> None:
        if self.lost_reason is None and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[union-attr]


def repeated(one: bytes, batch: int = 64 * 1024) -> Iterator[bytes]:
    """``one`` over and over, in writes of about ``batch`` bytes."""
    return itertools.repeat(one * max(1, batch // len(one)))


def batched(frames: Iterable[bytes], batch: int = 64 * 1024) -> Iterator[bytes]:
    """Concatenate ``frames`` into writes of about ``batch`` bytes."""
    buf: list[bytes] = []
    size = 0
    for f in frames:
        buf.append(f)
        size += len(f)
        if size >= batch:
            yield b"".join(buf)
            buf, size = [], 0
    if buf:
        yield b"".join(buf)


async def connect_raw(reactor: Any, port: int, path: str,
                      host: str = "127.0.0.1") -> RawClient:
    """A :class:`RawClient` connected to ``host:port`` with the upgrade done."""
    ep = endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=10)
    client: RawClient = await ep.connect(
        protocol.Factory.forProtocol(lambda: RawClient(host, port, path)))  # type: ignore[arg-type]
    await client.opened
    return client


async def connect_raw_user(reactor: Any, port: int, ticket: str,
                           host: str = "127.0.0.1") -> RawClient:
    """A raw client on ``/v1/user`` that sent ``connect`` with ``ticket`` and
    received ``paired``."""
    client = await connect_raw(reactor, port, "/v1/user", host)
    client.send_json_text(json.dumps({"type": "connect", "ticket": ticket}))
    paired = await client.next_message()
    if json.loads(paired.payload).get("type") != "paired":
        raise AssertionError(f"expected paired, got {paired.payload!r}")
    return client


# -- the hostile patterns (each an endless or long iterator of writes) -------

_ZERO = b"\x00\x00\x00\x00"


def ping_flood() -> Iterator[bytes]:
    """Pings with the largest payload (125 bytes): each owes a 127-byte pong."""
    return repeated(frame(PING, b"p" * 125, mask=b"abcd"))


def one_byte_fragments(count: int) -> Iterator[bytes]:
    """One binary message of ``count`` one-byte frames."""
    return batched(fragments(BINARY, itertools.repeat(b"x", count)))


def empty_continuations() -> Iterator[bytes]:
    """A message that never ends: one byte, then empty continuation frames."""
    return itertools.chain([frame(BINARY, b"x", fin=False, mask=_ZERO)],
                           repeated(frame(CONT, b"", fin=False, mask=_ZERO)))


def empty_messages() -> Iterator[bytes]:
    """Binary messages of one empty frame each."""
    return repeated(frame(BINARY, b"", mask=_ZERO))
