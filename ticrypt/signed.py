"""Signed messages and tokens under Ed25519 with domain separation.

Every signature in ticrypt is over ``b"ticrypt-signed-v1\\x00" + purpose +
b"\\x00" + canonical(payload)``, so a signature made for one purpose (a
login challenge, a connection ticket, a proxy challenge) is worthless for any
other.  A *token* carries its payload: ``b64(canonical(payload)) "." b64(sig)``.

Connection tickets (rest -> frontend -> proxy) are tokens of purpose
``connection-ticket-v1``; VM credentials (rest -> vmc -> proxy) of purpose
``vm-credential-v1``; the revocation feed (rest -> proxy) of purpose
``revocations-v1``; requests to the proxy's control API (rest -> proxy) of
purpose ``proxy-control-v1``.  PROTOCOL.md documents them all.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticrypt import identity
from ticrypt.encoding import b64, canonical, loads_bounded, unb64
from ticrypt.errors import CodedError

DOMAIN = b"ticrypt-signed-v1\x00"
MAX_TOKEN = 4096

LOGIN = "login-v1"
TICKET = "connection-ticket-v1"
VM_CREDENTIAL = "vm-credential-v1"
PROXY_VM_AUTH = "proxy-vm-auth-v1"
REVOCATIONS = "revocations-v1"
PROXY_CONTROL = "proxy-control-v1"

#: Largest revocation feed token (characters); PROTOCOL.md §3 "Revocation".
MAX_FEED = 4 * 1024 * 1024
#: A session id in a ticket and the feed: b64 of this many bytes.
SID_BYTES = 12

#: Clock skew tolerated for "issued at" in the future.
SKEW = 30


class TokenError(CodedError):
    """A token or signature was refused; ``code`` is stable, ``str()`` human."""


def signing_input(purpose: str, payload: dict[str, Any]) -> bytes:
    return DOMAIN + purpose.encode("ascii") + b"\x00" + canonical(payload)


def sign(key: Ed25519PrivateKey, purpose: str, payload: dict[str, Any]) -> bytes:
    return key.sign(signing_input(purpose, payload))


def verify(raw_public: bytes, purpose: str, payload: dict[str, Any], signature: bytes) -> bool:
    return identity.verify(raw_public, signature, signing_input(purpose, payload))


def make_token(key: Ed25519PrivateKey, purpose: str, payload: dict[str, Any]) -> str:
    return b64(canonical(payload)) + "." + b64(sign(key, purpose, payload))


def open_token(raw_public: bytes, purpose: str, token: str,
               max_size: int = MAX_TOKEN) -> dict[str, Any]:
    """Verify ``token`` (at most ``max_size`` characters) and return its
    payload; TokenError otherwise."""
    if not isinstance(token, str) or len(token) > max_size:
        raise TokenError("bad-token", "token missing or too long")
    parts = token.split(".")
    if len(parts) != 2:
        raise TokenError("bad-token", "token is not PAYLOAD.SIGNATURE")
    try:
        body = unb64(parts[0])
        sig = unb64(parts[1], 64)
    except ValueError:
        raise TokenError("bad-token", "token is not valid base64url") from None
    # The signature covers canonical(payload), which a valid token carries
    # verbatim: check it over the raw bytes *before* parsing anything, so an
    # unsigned payload never reaches the JSON parser.
    if not identity.verify(raw_public, sig, DOMAIN + purpose.encode("ascii") + b"\x00" + body):
        raise TokenError("bad-signature", "token signature is not valid")
    try:
        payload = loads_bounded(body, max_size=max_size)
    except ValueError:
        raise TokenError("bad-token", "token payload is not valid JSON") from None
    if not isinstance(payload, dict) or canonical(payload) != body:
        raise TokenError("bad-token", "token payload is not canonical JSON")
    return payload


@attrs.frozen
class Ticket:
    """A verified connection ticket."""

    user: str
    user_key: bytes
    vm: str
    client: str
    issued: int
    expires: int
    ticket_id: str
    #: the session id (``sid``) of the rest session the ticket was issued
    #: under; empty only for a Ticket built by hand in a test
    session: str = ""


def make_ticket(
    backend_key: Ed25519PrivateKey,
    *,
    user: str,
    user_key: bytes,
    vm: str,
    client: str,
    now: float,
    ttl: int,
    ticket_id: str,
    session: str,
) -> str:
    payload = {
        "client": client,
        "exp": int(now) + ttl,
        "iat": int(now),
        "jti": ticket_id,
        "sid": session,
        "user": user,
        "user_key": b64(user_key),
        "vm": vm,
    }
    return make_token(backend_key, TICKET, payload)


def verify_ticket(backend_public: bytes, token: str, *, vm: str | None, client: str,
                  now: float) -> Ticket:
    """Check signature, expiry, VM (when given) and client address.

    A ticket without ``sid`` (issued by a rest older than the revocation
    feed) is refused ``bad-token``: tickets live ``ticket_ttl`` (a minute by
    default), so the frontend simply asks the upgraded rest for a new one."""
    p = open_token(backend_public, TICKET, token)
    try:
        t = Ticket(
            user=_s(p["user"]), user_key=unb64(_s(p["user_key"]), 32), vm=_s(p["vm"]),
            client=_s(p["client"]), issued=_i(p["iat"]), expires=_i(p["exp"]),
            ticket_id=_s(p["jti"]), session=_sid(p["sid"]),
        )
    except (KeyError, TypeError, ValueError):
        raise TokenError("bad-token", "ticket payload is malformed") from None
    if set(p) != {"client", "exp", "iat", "jti", "sid", "user", "user_key", "vm"}:
        raise TokenError("bad-token", "ticket payload has unexpected fields")
    if t.expires <= now:
        raise TokenError("expired", "ticket has expired")
    if t.issued > now + SKEW:
        raise TokenError("bad-token", "ticket issued in the future")
    if vm is not None and t.vm != vm:
        raise TokenError("wrong-vm", "ticket is for another VM")
    if t.client != client:
        raise TokenError("wrong-client", "ticket is for another client address")
    return t


@attrs.frozen
class VmCredential:
    vm: str
    vm_key: bytes
    issued: int


def make_vm_credential(backend_key: Ed25519PrivateKey, *, vm: str, vm_key: bytes,
                       now: float) -> str:
    return make_token(backend_key, VM_CREDENTIAL,
                      {"iat": int(now), "vm": vm, "vm_key": b64(vm_key)})


def verify_vm_credential(backend_public: bytes, token: str) -> VmCredential:
    p = open_token(backend_public, VM_CREDENTIAL, token)
    try:
        if set(p) != {"iat", "vm", "vm_key"}:
            raise ValueError
        return VmCredential(vm=_s(p["vm"]), vm_key=unb64(_s(p["vm_key"]), 32),
                            issued=_i(p["iat"]))
    except (KeyError, TypeError, ValueError):
        raise TokenError("bad-token", "VM credential payload is malformed") from None


@attrs.frozen
class RevocationFeed:
    """A verified revocation feed: who lost access, as of ``issued``."""

    issued: int
    serial: int
    #: disabled user name -> since when (Unix seconds; informational)
    users: dict[str, int]
    #: session ids (``sid``) of ended sessions
    sessions: frozenset[str]


def make_revocation_feed(backend_key: Ed25519PrivateKey, *, serial: int, now: float,
                         users: dict[str, int], sessions: list[str] | set[str]) -> str:
    """The signed feed rest serves at ``GET /v1/revocations``."""
    return make_token(backend_key, REVOCATIONS, {
        "iat": int(now), "serial": serial, "users": dict(users),
        "sessions": sorted(sessions)})


def verify_revocation_feed(backend_public: bytes, token: str, *, now: float,
                           max_age: float) -> RevocationFeed:
    """Check signature, fields and freshness (``now - max_age <= iat <=
    now + SKEW``; ``stale`` otherwise).  Ordering against the previous feed
    (serial, iat) is the caller's job."""
    p = open_token(backend_public, REVOCATIONS, token, max_size=MAX_FEED)
    try:
        if set(p) != {"iat", "serial", "sessions", "users"}:
            raise ValueError
        users, sessions = p["users"], p["sessions"]
        if not isinstance(users, dict) or not isinstance(sessions, list):
            raise TypeError
        feed = RevocationFeed(
            issued=_i(p["iat"]), serial=_i(p["serial"]),
            users={_s(name): _i(since) for name, since in users.items()},
            sessions=frozenset(_sid(sid) for sid in sessions))
    except (KeyError, TypeError, ValueError):
        raise TokenError("bad-token", "revocation feed payload is malformed") from None
    if feed.serial < 0 or len(feed.sessions) != len(sessions):
        raise TokenError("bad-token", "revocation feed payload is malformed")
    if feed.issued > now + SKEW:
        raise TokenError("bad-token", "revocation feed issued in the future")
    if feed.issued < now - max_age:
        raise TokenError("stale", f"revocation feed is older than {max_age:g}s")
    return feed


@attrs.frozen
class ControlRequest:
    """A verified signed request to the proxy's control API."""

    issued: int
    nonce: str


def sign_control_request(backend_key: Ed25519PrivateKey, *, method: str, path: str,
                         body: bytes, now: float, nonce: str) -> str:
    """The token rest sends in ``Authorization: Ticrypt-Signed <token>`` to
    the proxy's control API (PROTOCOL.md "Proxy control API"): it binds the
    method, the path, the body's SHA-256, the time and a single-use nonce."""
    return make_token(backend_key, PROXY_CONTROL, {
        "body": b64(hashlib.sha256(body).digest()), "iat": int(now), "method": method,
        "nonce": nonce, "path": path})


def verify_control_request(backend_public: bytes, token: str, *, method: str, path: str,
                           body: bytes, now: float, window: float) -> ControlRequest:
    """Check signature, method, path, body and freshness (``|now - iat| <=
    window``; ``stale`` otherwise).  The nonce's single use is the caller's
    job (it keeps the nonces it saw for ``2 * window``)."""
    p = open_token(backend_public, PROXY_CONTROL, token)
    try:
        if set(p) != {"body", "iat", "method", "nonce", "path"}:
            raise ValueError
        req = ControlRequest(issued=_i(p["iat"]), nonce=_s(p["nonce"]))
        unb64(req.nonce, 16)
        signed_for = (_s(p["method"]), _s(p["path"]), unb64(_s(p["body"]), 32))
    except (KeyError, TypeError, ValueError):
        raise TokenError("bad-token", "control request token is malformed") from None
    if signed_for != (method, path, hashlib.sha256(body).digest()):
        raise TokenError("wrong-request", "the signature is for another request")
    if abs(now - req.issued) > window:
        raise TokenError("stale", f"request time is more than {window:g}s from the proxy's")
    return req


def _sid(v: Any) -> str:
    """A session id: b64 of SID_BYTES bytes."""
    unb64(_s(v), SID_BYTES)
    return str(v)


def _s(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError
    return v


def _i(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError
    return v
