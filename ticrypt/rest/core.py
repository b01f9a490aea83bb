"""Sans-IO pieces of rest: login challenges, token hashing, session ids and
the checks of its body fields (names, hosts).  Clock and randomness are
injected.  The failed-login limits are :class:`ticrypt.ratelimit.RateLimiter`,
body decoding is :func:`ticrypt.http.server.parse_body`."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections import OrderedDict, deque
from collections.abc import Callable

import attrs

from ticrypt.encoding import b64, unb64
from ticrypt.ratelimit import Clock
from ticrypt.signed import SID_BYTES

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
TOKEN_BYTES = 32


def new_token(random: Callable[[int], bytes] = os.urandom) -> str:
    """A 256-bit bearer secret (session or enrollment token), base64url."""
    return b64(random(TOKEN_BYTES))


def token_hash(token: str) -> bytes:
    """What the database keeps instead of a token."""
    return hashlib.sha256(token.encode("ascii")).digest()


def session_id(hashed: bytes) -> str:
    """The public id (``sid``) of the session whose token hashes to
    ``hashed``: it names the session in tickets and in the revocation feed.
    Derived from the stored hash (domain-separated, truncated to 96 bits), so
    it reveals nothing that would let anyone use the session."""
    return b64(hashlib.sha256(b"ticrypt-session-id-v1\x00" + hashed).digest()[:SID_BYTES])


def parse_token(token: str) -> bytes | None:
    """The hash of ``token`` if it has the shape of one of ours, else None."""
    try:
        unb64(token, TOKEN_BYTES)
    except ValueError:
        return None
    return token_hash(token)


def valid_host(host: str) -> bool:
    """``HOST:PORT`` with a DNS name, IPv4 or ``[IPv6]`` host and port 1..65535."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})", host)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        return False
    h = m.group(1)
    if h.startswith("["):
        try:
            ipaddress.IPv6Address(h[1:-1])
        except ValueError:
            return False
        return True
    return all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label)
               for label in h.split("."))


# ---------------------------------------------------------------- challenges

@attrs.frozen
class Challenge:
    challenge_id: str
    challenge: str  # b64url of 32 random bytes, as issued
    user: str
    address: str
    expires: float


class ChallengeTable:
    """Outstanding login challenges: single-use, bound to a user, expiring.

    Memory is bounded: at most ``per_address`` outstanding challenges per
    client address (the oldest is dropped) and ``max_total`` overall (the
    oldest is dropped)."""

    def __init__(self, clock: Clock, ttl: float, per_address: int = 64,
                 max_total: int = 100_000, random: Callable[[int], bytes] = os.urandom):
        self._clock = clock
        self._ttl = ttl
        self._per_address = per_address
        self._max_total = max_total
        self._random = random
        self._by_id: OrderedDict[str, Challenge] = OrderedDict()
        self._by_address: dict[str, deque[str]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def issue(self, user: str, address: str) -> Challenge:
        self._expire()
        ids = self._by_address.setdefault(address, deque())
        while len(ids) >= self._per_address:
            self._drop(ids[0])
        while len(self._by_id) >= self._max_total:
            self._drop(next(iter(self._by_id)))
        c = Challenge(challenge_id=b64(self._random(16)), challenge=b64(self._random(32)),
                      user=user, address=address, expires=self._clock.seconds() + self._ttl)
        self._by_id[c.challenge_id] = c
        self._by_address.setdefault(address, deque()).append(c.challenge_id)
        return c

    def take(self, challenge_id: str, user: str) -> Challenge | None:
        """Remove and return the challenge if it exists, is unexpired and was
        issued for ``user``; a challenge is consumed even when refused."""
        c = self._by_id.get(challenge_id)
        if c is None:
            return None
        self._drop(challenge_id)
        if c.expires <= self._clock.seconds() or c.user != user:
            return None
        return c

    def _drop(self, challenge_id: str) -> None:
        c = self._by_id.pop(challenge_id, None)
        if c is None:
            return
        ids = self._by_address.get(c.address)
        if ids is not None:
            try:
                ids.remove(challenge_id)
            except ValueError:
                pass
            if not ids:
                del self._by_address[c.address]

    def purge(self) -> None:
        """Drop every expired challenge (also done on each :meth:`issue`)."""
        self._expire()

    def _expire(self) -> None:
        now = self._clock.seconds()
        # Insertion order equals expiry order (one ttl), so stop at the first live one.
        while self._by_id:
            first = next(iter(self._by_id.values()))
            if first.expires > now:
                break
            self._drop(first.challenge_id)


# ---------------------------------------------------------------- body fields

def check_name(value: str) -> str | None:
    return None if NAME_RE.fullmatch(value) else (
        "must be 1-64 characters of letters, digits, '.', '_' or '-', "
        "starting with a letter or digit")
