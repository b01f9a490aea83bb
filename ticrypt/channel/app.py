"""The application protocol carried inside the secure channel (vmc <-> frontend).

Each sealed record's plaintext is ``header + b"\\n" + body``: the header is
compact JSON without a newline, the body raw bytes (possibly empty).  The
frontend and vmc both use this codec; ``PROTOCOL.md §5`` is the spec.
"""

from __future__ import annotations

import json
from typing import Any

from ticrypt.channel import MAX_PLAINTEXT
from ticrypt.encoding import loads_bounded

#: Longest header accepted (the body carries the bulk data).
MAX_HEADER = 16384
#: Body bytes per record when streaming: leaves room for the header.
CHUNK = 65536
#: Largest body a sender puts in one ``stdin``/``stdout``/``stderr`` record
#: (PROTOCOL.md §5; receivers accept up to the record limit): the reference
#: vmc's output reads and the reference frontend's stdin records.
MAX_BODY = 262144
#: Longest argv (total characters) and most arguments in an exec request.
MAX_ARGV_CHARS = 131072
MAX_ARGS = 4096
#: Default stdin flow-control window of an exec/shell request: the most
#: un-acknowledged ``stdin`` body bytes the frontend may have in flight (vmc
#: announces its actual window in the request's ``ok``), and so the most
#: stdin vmc buffers for one request: 1 MiB, four records of MAX_BODY in
#: flight (256 KiB until 2026-11-30: one 256 KiB record per round trip).
#: vmc's stdin buffers are at most ``max_sessions x max_processes x WINDOW``
#: (256 MiB with the defaults, reached only if every running command of
#: every channel stops reading its stdin; the users who can send stdin can
#: run commands on the VM that use memory as they like anyway).
WINDOW = 1048576

OPS = ("info", "exec", "shell", "authorize", "revoke", "users")


class AppError(Exception):
    """A malformed application message: ``code`` stable, ``str()`` human."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    """One record's plaintext."""
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    out = b"".join((head, b"\n", body))  # one copy of the body
    if len(out) > MAX_PLAINTEXT:
        raise ValueError("application message too large for one record")
    return out


def decode(plaintext: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header, body)``; AppError("bad-message") if malformed."""
    head, sep, body = plaintext.partition(b"\n")
    if not sep or len(head) > MAX_HEADER:
        raise AppError("bad-message", "application message has no header line")
    try:
        header = loads_bounded(head, max_size=MAX_HEADER)
    except ValueError:
        raise AppError("bad-message", "application header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("t"), str):
        raise AppError("bad-message", "application header is not an object with 't'")
    rid = header.get("id")
    if "id" in header and (not isinstance(rid, int) or isinstance(rid, bool)
                           or not 0 <= rid < 2**53):
        raise AppError("bad-message", "application header 'id' is not a non-negative int")
    return header, body


def window_size(value: object) -> int | None:
    """``value`` as a window size or credit (a positive int), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**53:
        return value
    return None


def chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    """``data`` split into record-sized bodies (one empty chunk for empty data)."""
    if not data:
        return [b""]
    return [data[i:i + size] for i in range(0, len(data), size)]
