"""Regenerate ``test/vectors/mux-v1.json``, the tunnel mux frame vectors.

Run from the project root: ``python test/vectors/make_mux_vectors.py``.
The bytes are packed here by hand from PROTOCOL.md ("Tunnel multiplexing
(port 22)", frame layout), not with ticrypt.mux.frames, so the file checks
the codec against the spec. A vector has either ``frame`` (the decoded
value, as a JSON object) or ``error`` (the FrameError reason).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "mux-v1.json"


def h(ftype: int, stream: int, payload: bytes, length: int | None = None) -> str:
    n = len(payload) if length is None else length
    return (struct.pack(">BII", ftype, stream, n) + payload).hex()


def ok(name: str, data: str, frame: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "hex": data, "frame": frame}


def bad(name: str, data: str, error: str) -> dict[str, Any]:
    return {"name": name, "hex": data, "error": error}


VECTORS = [
    ok("open port 8080", h(1, 1, b"\x1f\x90"), {"type": "OPEN", "stream": 1, "port": 8080}),
    ok("open port 65535 on the largest id", h(1, 2**31 - 1, b"\xff\xff"), {"type": "OPEN", "stream": 2**31 - 1, "port": 65535}),
    ok("accept", h(2, 3, b""), {"type": "ACCEPT", "stream": 3}),
    ok("data", h(3, 5, b"hello"), {"type": "DATA", "stream": 5, "payload": b"hello".hex()}),
    ok("empty data", h(3, 5, b""), {"type": "DATA", "stream": 5, "payload": ""}),
    ok("window", h(4, 1, struct.pack(">I", 1048576)), {"type": "WINDOW", "stream": 1, "increment": 1048576}),
    ok("window, largest increment", h(4, 1, struct.pack(">I", 2**31 - 1)), {"type": "WINDOW", "stream": 1, "increment": 2**31 - 1}),
    ok("window, zero increment (a connection error, not a frame error)", h(4, 1, b"\0\0\0\0"), {"type": "WINDOW", "stream": 1, "increment": 0}),
    ok("half-close", h(5, 9, b""), {"type": "HALF_CLOSE", "stream": 9}),
    ok("reset refused", h(6, 1, b"\x00\x01port-not-allowed"), {"type": "RESET", "stream": 1, "code": 1, "reason": "port-not-allowed"}),
    ok("reset cancel, empty reason", h(6, 1, b"\x00\x00"), {"type": "RESET", "stream": 1, "code": 0, "reason": ""}),
    ok("reset error", h(6, 11, b"\x00\x02connect-failed"), {"type": "RESET", "stream": 11, "code": 2, "reason": "connect-failed"}),
    ok("ping", h(7, 0, bytes(range(8))), {"type": "PING", "opaque": bytes(range(8)).hex()}),
    ok("pong", h(8, 0, bytes(range(8))), {"type": "PONG", "opaque": bytes(range(8)).hex()}),
    ok("goaway", h(9, 0, b"normal"), {"type": "GOAWAY", "reason": "normal"}),
    ok("goaway, 64-byte reason", h(9, 0, b"x" * 64), {"type": "GOAWAY", "reason": "x" * 64}),
    bad("type 0", h(0, 1, b""), "unknown-type"),
    bad("type 10", h(10, 1, b""), "unknown-type"),
    bad("type 255", h(255, 0, b""), "unknown-type"),
    bad("reserved stream bit", h(3, 0x80000001, b""), "reserved-bits"),
    bad("reserved bit in window increment", h(4, 1, b"\x80\0\0\1"), "reserved-bits"),
    bad("data over 65536", h(3, 1, b"", length=65537), "frame-too-large"),
    bad("length 2^32-1", h(3, 1, b"", length=2**32 - 1), "frame-too-large"),
    bad("open with 3 bytes", h(1, 1, b"\0\1\2"), "bad-length"),
    bad("accept with a payload", h(2, 1, b"x"), "bad-length"),
    bad("window with 2 bytes", h(4, 1, b"\0\1"), "bad-length"),
    bad("half-close with a payload", h(5, 1, b"x"), "bad-length"),
    bad("reset with 1 byte", h(6, 1, b"\0"), "bad-length"),
    bad("reset with a 65-byte reason", h(6, 1, b"\0\0" + b"x" * 65), "bad-length"),
    bad("ping with 7 bytes", h(7, 0, b"1234567"), "bad-length"),
    bad("pong with 9 bytes", h(8, 0, b"123456789"), "bad-length"),
    bad("goaway with a 65-byte reason", h(9, 0, b"x" * 65), "bad-length"),
    bad("truncated header", h(3, 1, b"")[:16], "bad-length"),
    bad("truncated payload", h(3, 1, b"abc", length=4), "bad-length"),
    bad("trailing bytes", h(2, 1, b"") + "00", "bad-length"),
    bad("open on stream 0", h(1, 0, b"\0\x50"), "bad-stream-id"),
    bad("data on stream 0", h(3, 0, b"x"), "bad-stream-id"),
    bad("ping on stream 1", h(7, 1, bytes(8)), "bad-stream-id"),
    bad("goaway on stream 1", h(9, 1, b""), "bad-stream-id"),
    bad("open port 0", h(1, 1, b"\0\0"), "bad-port"),
    bad("reset code 3", h(6, 1, b"\0\3x"), "bad-reset-code"),
    bad("reset reason with a space", h(6, 1, b"\0\0a b"), "bad-reason"),
    bad("goaway reason not ASCII", h(9, 0, "é".encode()), "bad-reason"),
    bad("goaway reason with a newline", h(9, 0, b"a\n"), "bad-reason"),
]


def main() -> None:
    doc = {
        "description": "Tunnel mux frames, version 1 (PROTOCOL.md, Tunnel multiplexing (port 22)). "
        "Each vector: hex of exactly one frame and either the decoded frame or the FrameError reason. "
        "Byte strings in decoded frames are hex.",
        "generator": "test/vectors/make_mux_vectors.py",
        "vectors": VECTORS,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
