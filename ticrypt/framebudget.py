"""What one websocket peer may send, counted in frames (sans-IO): the
proxy's legs and connect's page relay (:class:`ticrypt.wsfast.FrameCounting`).

Byte limits (``max_message_size``, ``max_frame_size``) do not bound what a
peer costs: every frame costs the receiver parsing work and a few dozen bytes
of bookkeeping whatever its length, a ping costs a pong, and frames of
length zero cost as much as any other while adding nothing to a byte count.
:class:`FrameBudget` counts frames, the thing the peer controls:

* **fragments per message**: a message may have at most
  ``max_message_frames`` frames (its first frame and its continuations,
  empty ones included);
* **control frames per interval**: pings, pongs and close frames, and
  messages that start with an empty frame, draw on a bucket of
  ``max_control_frames`` refilled at ``max_control_frames`` per
  ``control_frames_interval`` seconds.

The caller passes each frame's opcode and payload length as the frame
header arrives, with the time; a :class:`Violation` means: drop this peer.
No clock, no I/O.  Wire rules: ``PROTOCOL.md`` §3 "Limits" (the proxy) and
§7 "The page" (connect).
"""

from __future__ import annotations

import attrs

from ticrypt import closecodes
from ticrypt.config import Duration, Int, setting

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

#: The close reason for the peer that exceeded a frame limit (code 4009).
REASON = closecodes.reason(closecodes.OVER_LIMIT.name, "too many websocket frames")
#: The close reason for that peer's partner, the other side of its relay (4009).
PEER_REASON = closecodes.reason(closecodes.OVER_LIMIT.name,
                                "the peer sent too many websocket frames")


@attrs.frozen
class FrameLimits:
    """The frame limits of the proxy's ``[limits]`` and connect's ``[page]``
    (defaults far above any client of ours: they send unfragmented messages
    and a ping every 30 s)."""

    max_message_frames: int = setting(Int(1, 1_000_000), 1024,
                                      "frames of one message, continuations included")
    max_control_frames: int = setting(Int(1, 1_000_000), 100,
                                      "control frames (and empty first frames) per interval")
    control_frames_interval: float = setting(Duration(max=3600), 10.0,
                                             "the interval of max_control_frames")


@attrs.frozen
class Violation:
    """A frame over a limit: ``limit`` is ``"message-frames"`` or
    ``"control-frames"``; ``allowed`` the limit's value."""

    limit: str
    allowed: int
    reason: str = REASON


class FrameBudget:
    """Counts the frames of one peer against :class:`FrameLimits`."""

    def __init__(self, limits: FrameLimits, now: float):
        self._limits = limits
        self._message_frames = 0
        self._tokens = float(limits.max_control_frames)
        self._refilled = now

    def frame(self, opcode: int, length: int, now: float) -> Violation | None:
        """A frame header arrived (``length`` = payload bytes, 0 counts too)."""
        lim = self._limits
        if opcode >= CLOSE or (opcode in (TEXT, BINARY) and length == 0):
            if not self._take(now):
                return Violation("control-frames", lim.max_control_frames)
        if opcode == CONTINUATION:
            self._message_frames += 1
        elif opcode in (TEXT, BINARY):
            self._message_frames = 1
        if self._message_frames > lim.max_message_frames:
            return Violation("message-frames", lim.max_message_frames)
        return None

    def _take(self, now: float) -> bool:
        lim = self._limits
        elapsed = max(0.0, now - self._refilled)
        self._refilled = max(self._refilled, now)
        rate = lim.max_control_frames / lim.control_frames_interval
        self._tokens = min(float(lim.max_control_frames), self._tokens + elapsed * rate)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
