"""Encodings the channel puts on the wire.

These are the project-wide helpers of :mod:`ticrypt.encoding`, re-exported so
channel code and its tests have one import path; there is one implementation.

* :func:`b64` / :func:`unb64`: base64url without padding; ``unb64`` is strict
  (no padding, no foreign characters, canonical trailing bits, optional exact
  length) and raises ``ValueError`` otherwise.
* :func:`canonical`: ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
  ensure_ascii=True).encode()``.
"""

from __future__ import annotations

from ticrypt.encoding import b64, canonical, unb64

__all__ = ["b64", "canonical", "unb64"]
