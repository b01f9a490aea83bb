"""Shared wire encodings: base64url without padding, canonical JSON, and the
one bounded JSON decoder every network input goes through."""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from ticrypt.errors import CodedError


def b64(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str, length: int | None = None) -> bytes:
    """Strict inverse of :func:`b64`; ValueError on anything else (or wrong length)."""
    if not isinstance(text, str) or "=" in text or not text.isascii():
        raise ValueError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise ValueError("not base64url") from e
    if b64(data) != text:
        raise ValueError("non-canonical base64url")
    if length is not None and len(data) != length:
        raise ValueError(f"expected {length} bytes, got {len(data)}")
    return data


def canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


#: Deepest nesting of arrays and objects accepted from the network.  Our own
#: messages nest at most 3 levels; Python's JSON parser recurses per level and
#: a few thousand ``[`` would raise RecursionError (a crash, not a check).
MAX_JSON_DEPTH = 32

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


class JsonError(CodedError, ValueError):
    """Network JSON was refused.  ``code`` is stable: ``too-large``,
    ``too-deep`` or ``not-json``; ``str()`` is a human line without the input."""


def json_depth(raw: bytes) -> int:
    """Deepest bracket nesting of ``raw`` (brackets inside strings ignored).
    Linear in ``len(raw)`` and never recursive."""
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub(b"", raw)):
        if m.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_bounded(data: bytes | str, *, max_size: int,
                  max_depth: int = MAX_JSON_DEPTH,
                  object_pairs_hook: Any = None) -> Any:
    """Parse JSON from the network: size and nesting depth are checked before
    the parser runs; ``NaN``/``Infinity`` are refused.  Raises :class:`JsonError`
    (a ``ValueError``) for anything refused."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_size:
        raise JsonError("too-large", f"JSON text over {max_size} bytes")
    if json_depth(raw) > max_depth:
        raise JsonError("too-deep", f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw, parse_constant=_no_constant,
                          object_pairs_hook=object_pairs_hook)
    except (ValueError, RecursionError):
        raise JsonError("not-json", "not valid JSON") from None
