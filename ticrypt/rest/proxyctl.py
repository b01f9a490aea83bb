"""rest's client of the proxy's control API (:mod:`ticrypt.proxy.ctlapi`):
signed requests (backend signing key, purpose ``proxy-control-v1``, a
timestamp and a fresh nonce) over a CA-pinned :class:`JsonClient`.

Every failure is a :class:`ProxyControlError` whose ``code`` is the proxy's
error code (``no-free-port``, ``too-many-leases``, ...) or, when the proxy
gave no usable answer, ``proxy-unavailable`` (status 502).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticrypt import signed
from ticrypt.encoding import b64
from ticrypt.http.client import HttpError, JsonClient
from ticrypt.ratelimit import Clock

SCHEME = "Ticrypt-Signed"


class ProxyControlError(Exception):
    """The proxy refused, or could not be asked: ``status`` (HTTP, 502 when
    unreachable), ``code`` stable, ``str()`` one human line."""

    def __init__(self, status: int, code: str, message: str):
        self.status = status
        self.code = code
        super().__init__(message)


def _body_bytes(body: Any) -> bytes:
    """The bytes :class:`JsonClient` sends for ``body`` (it serialises the
    same way), which the signature covers."""
    return b"" if body is None else json.dumps(body, separators=(",", ":")).encode()


class ProxyControl:
    """Lease operations at the proxy at ``url`` (``https://host:port``)."""

    def __init__(self, *, client: JsonClient, url: str, key: Ed25519PrivateKey, clock: Clock,
                 random: Callable[[int], bytes] = os.urandom):
        self._client = client
        self._url = url.rstrip("/")
        self._key = key
        self._clock = clock
        self._random = random

    async def _call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        token = signed.sign_control_request(
            self._key, method=method, path=path, body=_body_bytes(body),
            now=self._clock.seconds(), nonce=b64(self._random(16)))
        try:
            status, answer = await self._client.request(
                method, self._url + path, body, {"Authorization": f"{SCHEME} {token}"})
        except HttpError as e:
            raise ProxyControlError(502, "proxy-unavailable",
                                    f"the proxy's control API did not answer: {e}") from None
        if status >= 400:
            err = answer.get("error") if isinstance(answer, dict) else None
            code = err.get("code") if isinstance(err, dict) else None
            message = err.get("message") if isinstance(err, dict) else None
            raise ProxyControlError(status, str(code or "proxy-error")[:64],
                                    str(message or f"the proxy answered HTTP {status}")[:300])
        return status, answer

    async def open(self, *, user: str, session: str, vm: str, target: str, address: str,
                   expires: int) -> dict[str, Any]:
        """The lease (the proxy's JSON view) for these; ProxyControlError."""
        _, answer = await self._call("POST", "/v1/leases", {
            "user": user, "session": session, "vm": vm, "target": target,
            "address": address, "expires": int(expires)})
        return _lease(answer)

    async def leases(self, user: str) -> list[dict[str, Any]]:
        _, answer = await self._call("GET", f"/v1/users/{quote(user, safe='')}/leases")
        found = answer.get("leases") if isinstance(answer, dict) else None
        if not isinstance(found, list) or not all(isinstance(x, dict) for x in found):
            raise ProxyControlError(502, "proxy-unavailable", "the proxy's answer is malformed")
        return found

    async def close(self, lease_id: str, user: str) -> bool:
        """Close ``user``'s lease ``lease_id``; False if there is no such lease of theirs."""
        try:
            await self._call("DELETE", f"/v1/leases/{quote(lease_id, safe='')}",
                             {"user": user})
        except ProxyControlError as e:
            if e.code == "no-such-lease":
                return False
            raise
        return True

    async def close_session(self, session: str) -> int:
        """Close every lease of ``session``; how many."""
        _, answer = await self._call("DELETE", f"/v1/sessions/{quote(session, safe='')}/leases")
        closed = answer.get("closed") if isinstance(answer, dict) else None
        return closed if isinstance(closed, int) else 0


def _lease(answer: Any) -> dict[str, Any]:
    lease = answer.get("lease") if isinstance(answer, dict) else None
    if not isinstance(lease, dict) or not isinstance(lease.get("port"), int):
        raise ProxyControlError(502, "proxy-unavailable", "the proxy's answer is malformed")
    return lease
