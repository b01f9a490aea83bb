"""The tunnel's accepted client certificates, sans-IO (sibling of state.py).

A frontend hands vmc a TLS client certificate over the encrypted control
channel (``tunnel-accept``, PROTOCOL.md §5); vmc pins the SHA-256 of its DER
encoding, bound to the user of that channel.  The tunnel server
(:mod:`ticrypt.vmc.tunnel`) then accepts a TLS client only if the certificate
it presents has a pinned fingerprint.

A pin expires once unused for ``pin_ttl`` (a handshake, or a tunnel still
open, is a use); at most ``max_pins_per_user`` pins per user and
``max_pins`` in all.  A fingerprint pinned for one user is never rebound to
another.  :class:`PinSet` takes the time as an argument and does no I/O: its
owner persists :meth:`PinSet.to_json` (``state_dir/tunnel-pins.json``, so a
restart of vmc keeps open tunnels reconnectable) and feeds it back with
:meth:`PinSet.from_json`.
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from ticrypt import identity
from ticrypt.config import Duration, Int, setting
from ticrypt.errors import CodedError

#: ``sha256:<64 hex>``: how fingerprints are written everywhere.
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


@attrs.frozen(kw_only=True)
class PinLimits:
    """Pin lifetime and caps (keys of ``[tunnel]``)."""

    pin_ttl: float = setting(Duration(), 3600.0, "a pin unused this long expires")
    max_pins_per_user: int = setting(Int(1, 1000), 8, "pinned certificates of one user")
    max_pins: int = setting(Int(1, 100000), 256, "pinned certificates in all")


class PinRefused(CodedError):
    """``tunnel-accept`` cannot pin: ``code`` is the stable error code
    (``too-many-pins``, ``bad-certificate``), ``message`` the human text."""


@attrs.define
class Pin:
    """One accepted certificate: its fingerprint, its user, when it was last used."""

    fingerprint: str
    user: str
    user_key: bytes = attrs.field(repr=False)
    last_used: float

    def expires(self, ttl: float) -> float:
        return self.last_used + ttl


@attrs.define
class PinSet:
    """The accepted certificates.  Every method takes ``now`` (seconds since
    the epoch: pins outlive a restart, so wall-clock time)."""

    limits: PinLimits = attrs.Factory(PinLimits)
    _pins: dict[str, Pin] = attrs.field(factory=dict)

    def __len__(self) -> int:
        return len(self._pins)

    def pins(self) -> list[Pin]:
        return list(self._pins.values())

    def accept(self, fingerprint: str, user: str, user_key: bytes, now: float) -> Pin:
        """Pin ``fingerprint`` for ``user_key`` (``user`` its name, for the
        audit).  Pinning it again refreshes it.  Raises :class:`PinRefused`
        over a cap, or when another user pinned the same certificate."""
        if not FINGERPRINT.fullmatch(fingerprint):
            raise ValueError(f"not a sha256 fingerprint: {fingerprint!r}")
        self.expire(now)
        old = self._pins.get(fingerprint)
        if old is not None:
            if old.user_key != user_key:
                raise PinRefused("bad-certificate", "this certificate is pinned for "
                                 "another user; generate a new one")
            old.last_used, old.user = now, user
            return old
        if sum(1 for p in self._pins.values() if p.user_key == user_key) \
                >= self.limits.max_pins_per_user:
            raise PinRefused("too-many-pins", f"at most {self.limits.max_pins_per_user} "
                             "tunnel certificates per user; unused ones expire after "
                             f"{self.limits.pin_ttl:g}s")
        if len(self._pins) >= self.limits.max_pins:
            raise PinRefused("too-many-pins", f"at most {self.limits.max_pins} tunnel "
                             "certificates on this VM")
        pin = self._pins[fingerprint] = Pin(fingerprint, user, user_key, now)
        return pin

    def check(self, fingerprint: str, now: float) -> Pin | None:
        """The live pin of ``fingerprint`` (marked used now), else None."""
        pin = self._pins.get(fingerprint)
        if pin is None:
            return None
        if now >= pin.expires(self.limits.pin_ttl):
            del self._pins[fingerprint]
            return None
        pin.last_used = max(pin.last_used, now)
        return pin

    def touch(self, fingerprint: str, now: float) -> None:
        """``fingerprint`` is in use (an open tunnel) even without handshakes."""
        pin = self._pins.get(fingerprint)
        if pin is not None:
            pin.last_used = max(pin.last_used, now)

    def expire(self, now: float) -> list[Pin]:
        """Drop and return the pins unused for ``pin_ttl``."""
        gone = [p for p in self._pins.values() if now >= p.expires(self.limits.pin_ttl)]
        for p in gone:
            del self._pins[p.fingerprint]
        return gone

    def remove_user(self, user_key: bytes) -> list[Pin]:
        """Drop and return every pin of ``user_key`` (the user was revoked)."""
        gone = [p for p in self._pins.values() if p.user_key == user_key]
        for p in gone:
            del self._pins[p.fingerprint]
        return gone

    # -- persistence (the caller writes and reads the file) ----------------------

    def to_json(self) -> dict[str, Any]:
        return {"pins": [{"fingerprint": p.fingerprint, "user": p.user,
                          "user_key": identity.public_text(p.user_key),
                          "last_used": round(p.last_used, 3)}
                         for p in self._pins.values()]}

    @classmethod
    def from_json(cls, obj: Any, limits: PinLimits, now: float) -> PinSet:
        """The pins of a stored :meth:`to_json`, expired ones and those over
        the caps (a lowered limit) dropped; ValueError if malformed."""
        if not isinstance(obj, dict) or not isinstance(obj.get("pins"), list):
            raise ValueError("not a pin list")
        pins = cls(limits)
        stored = sorted(obj["pins"], key=lambda p: -_number(p, "last_used"))
        for item in stored:
            if not isinstance(item, dict):
                raise ValueError("a pin is not an object")
            fp, user, key = item.get("fingerprint"), item.get("user"), item.get("user_key")
            if not (isinstance(fp, str) and isinstance(user, str) and isinstance(key, str)):
                raise ValueError("a pin lacks fingerprint, user or user_key")
            used = min(_number(item, "last_used"), now)
            if now >= used + limits.pin_ttl:
                continue
            try:
                pins.accept(fp, user, identity.parse_public(key), used)
            except PinRefused:
                continue  # over a cap lowered since: the most recently used stay
        return pins


def _number(item: Any, key: str) -> float:
    value = item.get(key) if isinstance(item, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"a pin's {key} is not a number")
    return float(value)
