"""The REST operations, independent of twisted.web.

Each handler takes a :class:`Call` (method, path parameters, body bytes,
client address, bearer token) and returns ``(status, json_or_None)`` or
raises :class:`~ticrypt.http.server.ApiError`.  Each handler of
:class:`RestApi` declares its route (``@route("GET", "/v1/me")``), and
:data:`ROUTES` collects them: what the service serves.  The OpenAPI document
(packaged beside this module, served at ``GET /v1/openapi.json``) is checked
against it.
"""

from __future__ import annotations

import functools
import hmac
import importlib.resources
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.logger import Logger

import ticrypt
from ticrypt import identity, signed
from ticrypt.audit import AuditLog
from ticrypt.encoding import b64, unb64
from ticrypt.http.server import ApiError, Field, Result, enabled, parse_body, route, routes_of
from ticrypt.ratelimit import Clock, RateLimiter
from ticrypt.rest import store
from ticrypt.rest.common import (
    ApiSettings,
    allow_entry,
    check_allow_name,
    check_comment,
    check_ports,
    check_protocol,
    new_vm_id,
)
from ticrypt.rest.core import (
    FINGERPRINT_RE,
    Challenge,
    ChallengeTable,
    check_name,
    new_token,
    parse_token,
    session_id,
    token_hash,
    valid_host,
)
from ticrypt.rest.proxyctl import ProxyControl, ProxyControlError
from ticrypt.rest.store import StoreError


class Db(Protocol):
    def run(self, fn: Callable[..., Any], *args: Any, write: bool = True) -> Awaitable[Any]: ...


@attrs.frozen
class Call:
    """One request as the operations see it."""

    method: str
    params: tuple[str, ...]
    body: bytes
    client: str
    bearer: str | None


def _check_public_key(value: str) -> str | None:
    try:
        identity.parse_public(value)
    except ValueError:
        return "must be an Ed25519 public key 'ed25519:<base64url>'"
    return None


def _check_b64(length: int) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        try:
            unb64(value, length)
        except ValueError:
            return f"must be base64url of {length} bytes"
        return None
    return check


def _check_host(value: str) -> str | None:
    return None if valid_host(value) else "must be HOST:PORT"


def _check_fingerprint(value: str) -> str | None:
    return None if FINGERPRINT_RE.fullmatch(value) else "must be 'sha256:<64 lowercase hex>'"


def _check_role(value: str) -> str | None:
    return None if value in store.ROLES else "must be 'user' or 'superadmin'"


CHALLENGE_BODY = {"user": Field(str, check=check_name)}
LOGIN_BODY = {"user": Field(str, check=check_name),
              "challenge_id": Field(str, check=_check_b64(16)),
              "signature": Field(str, check=_check_b64(64))}
EMPTY_BODY: dict[str, Field] = {}
USER_BODY = {"name": Field(str, check=check_name),
             "public_key": Field(str, check=_check_public_key),
             "role": Field(str, required=False, check=_check_role)}
VM_BODY = {"name": Field(str, check=check_name), "owner": Field(str, check=check_name),
           "host": Field(str, check=_check_host)}
ENROLL_BODY = {"token": Field(str, check=_check_b64(32)),
               "vm_public_key": Field(str, check=_check_public_key),
               "tls_fingerprint": Field(str, check=_check_fingerprint)}

ALLOW_BODY = {"name": Field(str, check=check_allow_name),
              "ports": Field(list, check=check_ports),
              "protocol": Field(str, required=False, check=check_protocol),
              "comment": Field(str, required=False, check=check_comment)}

_STORE_STATUS = {"user-exists": 409, "vm-exists": 409, "no-such-user": 404,
                 "user-disabled": 409, "invalid-role": 400,
                 "enrollment-token-invalid": 401, "enrollment-token-used": 409,
                 "enrollment-token-expired": 401, "vm-disabled": 409,
                 "allowlist-entry-exists": 409, "allowlist-full": 409, "no-such-entry": 404}


def _store_error(e: StoreError) -> ApiError:
    return ApiError(_STORE_STATUS.get(e.code, 400), e.code, str(e))


def _unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, {"WWW-Authenticate": 'Bearer realm="ticrypt"'})


class RestApi:
    """State and operations of one rest service."""

    log = Logger()

    def __init__(self, *, clock: Clock, db: Db, signing_key: Ed25519PrivateKey,
                 proxy_url: str, audit: AuditLog, settings: ApiSettings,
                 feed_secret: str | None = None, proxyctl: ProxyControl | None = None,
                 allowlist_secret: str | None = None,
                 random: Callable[[int], bytes] = os.urandom):
        self._clock = clock
        self._db = db
        self._key = signing_key
        self.public_key = identity.public_bytes(signing_key)
        self._proxy_url = proxy_url
        self._audit = audit
        self._session_ttl = settings.session_ttl
        self._ticket_ttl = max(1, int(settings.ticket_ttl))
        self._enrollment_ttl = settings.enrollment_ttl
        self._random = random
        self.challenges = ChallengeTable(clock, settings.challenge_ttl,
                                         settings.challenges_per_address, random=random)
        # Failures count per client address, and per (user name, address):
        # never per user name alone, which would let anyone lock a named user
        # out, and buys nothing against guessing Ed25519 signatures.
        self.address_limits = RateLimiter(clock, settings.login_failures_per_address,
                                          settings.login_window)
        self.user_address_limits = RateLimiter(
            clock, settings.login_failures_per_user_and_address, settings.login_window)
        self._feed_secret = feed_secret.encode("ascii") if feed_secret is not None else None
        self._proxyctl = proxyctl
        self._allowlist_secret = (allowlist_secret.encode("ascii")
                                  if allowlist_secret is not None else None)

    # ------------------------------------------------------------ helpers

    def _now(self) -> float:
        return self._clock.seconds()

    async def _run(self, fn: Callable[..., Any], *args: Any, write: bool = True) -> Any:
        try:
            return await self._db.run(fn, *args, write=write)
        except StoreError as e:
            raise _store_error(e) from None

    def _check_session(self, session: store.Session | None,
                       superadmin: bool) -> store.Session:
        if session is None:
            raise _unauthorized("invalid-token", "the session token is not valid")
        if session.revoked:
            raise _unauthorized("session-revoked", "the session was ended; log in again")
        if session.expires <= self._now():
            raise _unauthorized("session-expired", "the session has expired; log in again")
        if session.user.disabled:
            raise _unauthorized("user-disabled", "the user is disabled")
        if superadmin and session.user.role != "superadmin":
            raise ApiError(403, "forbidden", "this needs the superadmin role")
        return session

    async def _authed(self, call: Call, fn: Callable[..., Any] | None = None, *args: Any,
                      write: bool = False, superadmin: bool = False) -> Any:
        """Check the bearer session and run ``fn(conn, session, *args)`` in the
        same transaction (one trip to the database thread); return
        ``(session, result)``."""
        if call.bearer is None:
            raise _unauthorized("missing-token", "an Authorization: Bearer token is required")
        h = parse_token(call.bearer)
        if h is None:
            raise _unauthorized("invalid-token", "the session token is not valid")

        def txn(conn: Any) -> tuple[store.Session, Any]:
            session = self._check_session(store.get_session(conn, h), superadmin)
            return session, (fn(conn, session, *args) if fn is not None else None)

        return await self._run(txn, write=write)

    # ------------------------------------------------------------ public

    @route("GET", "/v1/backend")
    async def backend(self, call: Call) -> Result:
        parse_body(call.body, EMPTY_BODY)
        return 200, {"public_key": identity.public_text(self.public_key),
                     "proxy_url": self._proxy_url, "version": ticrypt.__version__}

    @route("GET", "/v1/openapi.json")
    async def openapi(self, call: Call) -> Result:
        """This API's OpenAPI document, byte for byte the packaged file."""
        return 200, openapi_document()

    @route("POST", "/v1/auth/challenge")
    async def challenge(self, call: Call) -> Result:
        body = parse_body(call.body, CHALLENGE_BODY)
        # Same answer for every syntactically valid name: no user enumeration.
        c = self.challenges.issue(body["user"], call.client)
        return 200, {"challenge_id": c.challenge_id, "challenge": c.challenge,
                     "expires": int(c.expires)}

    @route("POST", "/v1/auth/login")
    async def login(self, call: Call) -> Result:
        body = parse_body(call.body, LOGIN_BODY)
        name = body["user"]
        self._check_rate_limits("login-failed", call.client, name)
        c = self.challenges.take(body["challenge_id"], name)
        token = new_token(self._random)
        reason, user, expires = await self._run(
            _login_txn, name, c, unb64(body["signature"], 64), token_hash(token), self._now(),
            self._session_ttl)
        if reason is not None or user is None:
            self.address_limits.failed(call.client)
            self.user_address_limits.failed(_user_at(name, call.client))
            self._audit.write("login-failed", user=name, client=call.client, reason=reason)
            raise ApiError(401, "login-failed", "login failed")
        self._audit.write("login-ok", user=name, client=call.client, user_role=user.role)
        return 200, {"token": token, "expires": expires, "user": name, "role": user.role}

    def _check_rate_limits(self, event: str, client: str, user: str | None = None) -> None:
        """ApiError 429 if ``client`` (or ``user`` from ``client``) has failed
        too often.  The refusal is audited once per lockout, not once per
        refused request, so that a flood cannot grow the audit log without
        bound."""
        locked = [(limiter, key) for limiter, key in (
            (self.address_limits, client),
            (self.user_address_limits, None if user is None else _user_at(user, client)))
            if key is not None and limiter.retry_after(key)]
        if not locked:
            return
        wait = max(limiter.retry_after(key) for limiter, key in locked)
        if any([limiter.first_refusal(key) for limiter, key in locked]):
            fields = {"user": user} if user is not None else {}
            self._audit.write(event, client=client, reason="rate-limited", **fields)
        raise ApiError(429, "rate-limited", f"too many failed attempts; retry in {wait}s",
                       {"Retry-After": str(wait)})

    def purge(self) -> None:
        """Forget expired challenges and rate-limit entries (periodic job)."""
        self.challenges.purge()
        self.address_limits.purge()
        self.user_address_limits.purge()

    @route("POST", "/v1/auth/logout")
    async def logout(self, call: Call) -> Result:
        parse_body(call.body, EMPTY_BODY)
        session, _ = await self._authed(call, _revoke, call.bearer or "", self._now(),
                                        write=True)
        self._audit.write("logout", user=session.user.name, client=call.client)
        if self._proxyctl is not None:
            # The session's pathways end now; if the proxy cannot be told, the
            # revocation feed (which lists the ended session) closes them.
            sid = session_id(token_hash(call.bearer or ""))
            try:
                await self._proxyctl.close_session(sid)
            except ProxyControlError as e:
                self.log.warn("logout: the proxy could not close the session's pathways: "
                              "{why}", why=str(e))
        return 204, None

    @route("GET", "/v1/me")
    async def me(self, call: Call) -> Result:
        session, _ = await self._authed(call)
        u = session.user
        return 200, {"user": u.name, "role": u.role, "public_key": identity.public_text(
            u.public_key)}

    # ------------------------------------------------------------ users (superadmin)

    @route("GET", "/v1/users")
    async def list_users(self, call: Call) -> Result:
        _, users = await self._authed(call, _unbound(store.list_users), superadmin=True)
        return 200, {"users": [u.to_json() for u in users]}

    @route("POST", "/v1/users")
    async def create_user(self, call: Call) -> Result:
        body = parse_body(call.body, USER_BODY)
        session, user = await self._authed(
            call, _unbound(store.add_user), body["name"],
            identity.parse_public(body["public_key"]), body.get("role", "user"), self._now(),
            write=True, superadmin=True)
        self._audit.write("user-created", user=user.name, user_role=user.role,
                          by=session.user.name, client=call.client)
        return 201, user.to_json()

    @route("POST", "/v1/users/{name}/disable")
    async def disable_user(self, call: Call) -> Result:
        parse_body(call.body, EMPTY_BODY)
        session, user = await self._authed(call, _unbound(store.disable_user), call.params[0],
                                           self._now(), write=True, superadmin=True)
        self._audit.write("user-disabled", user=user.name, by=session.user.name,
                          client=call.client)
        return 200, user.to_json()

    # ------------------------------------------------------------ VMs

    @route("GET", "/v1/vms")
    async def list_vms(self, call: Call) -> Result:
        _, vms = await self._authed(call, _visible_vms)
        return 200, {"vms": [v.to_json() for v in vms]}

    @route("POST", "/v1/vms")
    async def create_vm(self, call: Call) -> Result:
        body = parse_body(call.body, VM_BODY)
        token = new_token(self._random)
        session, (vm, expires) = await self._authed(
            call, _unbound(store.add_vm), new_vm_id(self._random), body["name"], body["owner"],
            body["host"], token_hash(token), self._now(), self._enrollment_ttl, write=True,
            superadmin=True)
        self._audit.write("vm-created", vm=vm.id, name=vm.name, owner=vm.owner,
                          by=session.user.name, client=call.client)
        return 201, {"vm": vm.to_json(), "enrollment_token": token,
                     "enrollment_expires": expires}

    async def add_vm(self, name: str, owner: str, host: str) -> tuple[store.Vm, str, int]:
        token = new_token(self._random)
        vm, expires = await self._run(store.add_vm, new_vm_id(self._random), name, owner,
                                      host, token_hash(token), self._now(),
                                      self._enrollment_ttl)
        return vm, token, expires

    @route("GET", "/v1/vms/{id}")
    async def get_vm(self, call: Call) -> Result:
        _, vm = await self._authed(call, _existing_vm, call.params[0])
        return 200, vm.to_json()

    @route("POST", "/v1/vms/{id}/ticket")
    async def ticket(self, call: Call) -> Result:
        parse_body(call.body, EMPTY_BODY)
        session, vm = await self._authed(call, _existing_vm, call.params[0])
        if vm.state == "disabled":
            raise ApiError(409, "vm-disabled", "the VM is disabled")
        if vm.state != "enrolled" or vm.public_key is None:
            raise ApiError(409, "vm-not-enrolled", "the VM has not enrolled yet")
        now = self._now()
        ticket_id = b64(self._random(16))
        # the session's public id: a logout revokes the pairs of its tickets
        sid = session_id(token_hash(call.bearer or ""))
        ticket = signed.make_ticket(self._key, user=session.user.name,
                                    user_key=session.user.public_key, vm=vm.id,
                                    client=call.client, now=now, ttl=self._ticket_ttl,
                                    ticket_id=ticket_id, session=sid)
        self._audit.write("ticket-issued", user=session.user.name, vm=vm.id,
                          client=call.client, ticket_id=ticket_id)
        return 200, {"ticket": ticket, "expires": int(now) + self._ticket_ttl,
                     "proxy_url": self._proxy_url,
                     "vm_public_key": identity.public_text(vm.public_key)}

    # ------------------------------------------------------------ pathways

    def _pathways(self) -> ProxyControl:
        return enabled(self._proxyctl, "pathways-disabled",
                       "pathways are off at this rest (proxy_control_url = off)")

    @route("POST", "/v1/vms/{id}/pathways")
    async def create_pathway(self, call: Call) -> Result:
        """Open (or return the live) lease at the proxy from the caller's
        address to the VM's host endpoint, for this session."""
        parse_body(call.body, EMPTY_BODY)
        proxyctl = self._pathways()
        session, vm = await self._authed(call, _existing_vm, call.params[0])
        if vm.state == "disabled":
            raise ApiError(409, "vm-disabled", "the VM is disabled")
        if vm.state != "enrolled" or vm.tls_fingerprint is None:
            raise ApiError(409, "vm-not-enrolled", "the VM has not enrolled yet")
        sid = session_id(token_hash(call.bearer or ""))
        try:
            lease = await proxyctl.open(user=session.user.name, session=sid, vm=vm.id,
                                        target=vm.host, address=call.client,
                                        expires=session.expires)
        except ProxyControlError as e:
            self._audit.write("pathway-refused", user=session.user.name, vm=vm.id,
                              client=call.client, reason=e.code)
            raise _proxy_refused(e) from None
        self._audit.write("pathway-opened", user=session.user.name, vm=vm.id,
                          client=call.client, pathway=lease.get("id"), port=lease.get("port"))
        return 201, {"pathway": _pathway(lease, vm.tls_fingerprint)}

    async def _own_pathways(self, call: Call) -> tuple[ProxyControl, store.Session]:
        """For an operation on the caller's pathways (no body): the proxy's
        control client (503 if pathways are off), and the caller's session."""
        parse_body(call.body, EMPTY_BODY)
        proxyctl = self._pathways()
        session, _ = await self._authed(call)
        return proxyctl, session

    @route("GET", "/v1/pathways")
    async def list_pathways(self, call: Call) -> Result:
        proxyctl, session = await self._own_pathways(call)
        try:
            leases = await proxyctl.leases(session.user.name)
        except ProxyControlError as e:
            raise _proxy_refused(e) from None
        vms = {str(lease.get("vm")) for lease in leases}
        found = await self._run(_vms_by_id, sorted(vms), write=False)
        return 200, {"pathways": [
            _pathway(lease, getattr(found.get(str(lease.get("vm"))), "tls_fingerprint", None))
            for lease in leases]}

    @route("DELETE", "/v1/pathways/{id}")
    async def delete_pathway(self, call: Call) -> Result:
        proxyctl, session = await self._own_pathways(call)
        try:
            closed = await proxyctl.close(call.params[0], session.user.name)
        except ProxyControlError as e:
            raise _proxy_refused(e) from None
        if not closed:
            raise ApiError(404, "no-such-pathway", "no such pathway of yours")
        self._audit.write("pathway-closed", user=session.user.name, pathway=call.params[0],
                          client=call.client)
        return 204, None

    @route("POST", "/v1/enroll")
    async def enroll(self, call: Call) -> Result:
        body = parse_body(call.body, ENROLL_BODY)
        # Failed enrollments count with failed logins against the address: an
        # unauthenticated flood costs neither database trips nor audit lines.
        self._check_rate_limits("enroll-failed", call.client)
        vm_key = identity.parse_public(body["vm_public_key"])
        now = self._now()
        try:
            vm = await self._db.run(store.enroll, token_hash(body["token"]), vm_key,
                                    body["tls_fingerprint"], now)
        except StoreError as e:
            self.address_limits.failed(call.client)
            self._audit.write("enroll-failed", client=call.client, reason=e.code)
            raise _store_error(e) from None
        credential = signed.make_vm_credential(self._key, vm=vm.id, vm_key=vm_key, now=now)
        self._audit.write("enroll-ok", vm=vm.id, owner=vm.owner, client=call.client,
                          vm_key_fingerprint=identity.fingerprint(vm_key))
        return 200, {"vm_id": vm.id, "owner": vm.owner,
                     "owner_public_key": identity.public_text(vm.owner_key),
                     "proxy_url": self._proxy_url,
                     "backend_public_key": identity.public_text(self.public_key),
                     "vm_credential": credential}

    @route("GET", "/v1/revocations")
    async def revocations(self, call: Call) -> Result:
        """The signed revocation feed, for the proxy (bearer: the shared
        ``revocation_feed_secret``).  A wrong secret counts as a failure
        against the address, like a failed login."""
        parse_body(call.body, EMPTY_BODY)
        if self._feed_secret is None:
            raise ApiError(404, "feed-disabled", "the revocation feed is off "
                           "(revocation_feed_secret is not set)")
        self._check_feed_secret(call, self._feed_secret, "revocation")
        found: store.Revocations = await self._run(store.revocations, write=False)
        feed = signed.make_revocation_feed(
            self._key, serial=found.serial, now=self._now(), users=found.users,
            sessions={session_id(h) for h in found.sessions})
        return 200, {"feed": feed}

    def _check_feed_secret(self, call: Call, secret: bytes, feed: str) -> None:
        """A shared-secret feed's bearer, compared in constant time; a wrong
        one counts as a failure against the address, like a failed login."""
        self._check_rate_limits("feed-refused", call.client)
        given = (call.bearer or "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, secret):
            self.address_limits.failed(call.client)
            self._audit.write("feed-refused", client=call.client, feed=feed,
                              reason="missing-token" if call.bearer is None else "invalid-token")
            raise _unauthorized("invalid-token", f"the {feed} feed needs its bearer secret")

    # ------------------------------------------------------------ allow-list (superadmin)

    @route("GET", "/v1/allowlist")
    async def list_allowlist(self, call: Call) -> Result:
        parse_body(call.body, EMPTY_BODY)
        _, entries = await self._authed(call, _unbound(store.list_allowlist), superadmin=True)
        return 200, {"entries": [e.to_json() for e in entries]}

    @route("POST", "/v1/allowlist")
    async def add_allowlist(self, call: Call) -> Result:
        body = parse_body(call.body, ALLOW_BODY)
        entry = allow_entry(body["name"], body["ports"], body.get("protocol", "tcp"),
                            body.get("comment", ""), self._random)
        session, added = await self._authed(call, _add_allow_entry, entry, self._now(),
                                            write=True, superadmin=True)
        self._audit.write("allowlist-add", entry=added.id, name=added.name,
                          ports=list(added.ports), protocol=added.protocol,
                          by=session.user.name, client=call.client)
        return 201, {"entry": added.to_json()}

    @route("GET", "/v1/allowlist/feed")
    async def allowlist_feed(self, call: Call) -> Result:
        """The allow-list for ticrypt-allowedlist (bearer: the shared
        ``allowlist_feed_secret``): every entry and a serial that grows with
        every change."""
        parse_body(call.body, EMPTY_BODY)
        if self._allowlist_secret is None:
            raise ApiError(404, "feed-disabled", "the allow-list feed is off "
                           "(allowlist_feed_secret is not set)")
        self._check_feed_secret(call, self._allowlist_secret, "allow-list")
        serial, entries = await self._run(store.allowlist_feed, write=False)
        return 200, {"serial": serial, "entries": [e.to_json() for e in entries]}

    @route("DELETE", "/v1/allowlist/{id}")
    async def remove_allowlist(self, call: Call) -> Result:
        parse_body(call.body, EMPTY_BODY)
        if call.params[0] == "feed":
            # the path of GET /v1/allowlist/feed, which is no entry
            raise ApiError(405, "method-not-allowed", "DELETE is not allowed here",
                           {"Allow": "GET"})
        session, removed = await self._authed(call, _unbound(store.remove_allow_entry),
                                              call.params[0], write=True, superadmin=True)
        self._audit.write("allowlist-remove", entry=removed.id, name=removed.name,
                          ports=list(removed.ports), protocol=removed.protocol,
                          by=session.user.name, client=call.client)
        return 204, None


#: What the service serves, as declared on the handlers above.
ROUTES = routes_of(RestApi)


@functools.cache
def openapi_document() -> bytes:
    """``ticrypt/rest/openapi.json`` as installed (read once, on first use)."""
    return importlib.resources.files("ticrypt.rest").joinpath("openapi.json").read_bytes()


def _proxy_refused(e: ProxyControlError) -> ApiError:
    """rest's answer when the proxy refused a lease or could not be asked:
    the two refusals a user can act on keep their meaning, anything else
    (the proxy unreachable, or refusing rest itself) is 502."""
    if e.code == "no-free-port":
        return ApiError(503, "no-free-port", str(e))
    if e.code == "too-many-leases":
        return ApiError(409, "too-many-pathways", str(e))
    return ApiError(502, "proxy-unavailable", str(e))


def _pathway(lease: dict[str, Any], tls_fingerprint: str | None) -> dict[str, Any]:
    """A pathway as rest shows it, from the proxy's lease."""
    return {"id": lease.get("id"), "vm": lease.get("vm"), "proxy_host": lease.get("host"),
            "port": lease.get("port"), "allowed": lease.get("allowed"),
            "expires": lease.get("expires"), "tls_fingerprint": tls_fingerprint}


def _vms_by_id(conn: Any, ids: list[str]) -> dict[str, store.Vm]:
    return {vm.id: vm for vm in (store.get_vm(conn, i) for i in ids) if vm is not None}


def _user_at(user: str, client: str) -> str:
    """The rate-limit key of one user name from one address (names have no '@')."""
    return f"{user}@{client}"


def _login_txn(conn: Any, name: str, c: Challenge | None, signature: bytes, hashed: bytes,
               now: float, ttl: float) -> tuple[str | None, store.User | None, int]:
    """Check a login and, if good, create its session: (failure reason, user, expiry)."""
    user = store.get_user(conn, name)
    # Verify a signature whatever happens, so that the answer takes as long
    # for unknown and disabled users as for a bad signature.
    good = signed.verify(user.public_key if user is not None else _DUMMY_KEY, signed.LOGIN, {
        "challenge": c.challenge if c else "", "challenge_id": c.challenge_id if c else "",
        "user": name}, signature)
    if c is None:
        return "bad-challenge", user, 0
    if user is None:
        return "unknown-user", None, 0
    if user.disabled:
        return "user-disabled", user, 0
    if not good:
        return "bad-signature", user, 0
    return None, user, store.create_session(conn, hashed, name, now, ttl)


#: Public key checked against when the user does not exist (nobody holds its private key).
_DUMMY_KEY = identity.public_bytes(Ed25519PrivateKey.generate())


def _unbound(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adapt a store function for :meth:`RestApi._authed` (drop the session)."""
    return lambda conn, session, *args: fn(conn, *args)


def _revoke(conn: Any, session: store.Session, token: str, now: float) -> bool:
    return store.revoke_session(conn, token_hash(token), now)


def _visible_vms(conn: Any, session: store.Session) -> list[store.Vm]:
    owner = None if session.user.role == "superadmin" else session.user.name
    return store.list_vms(conn, owner)


def _existing_vm(conn: Any, session: store.Session, vm_id: str) -> store.Vm:
    vm = store.get_vm(conn, vm_id)
    if vm is None:
        raise ApiError(404, "no-such-vm", "no such VM")
    return vm


def _add_allow_entry(conn: Any, session: store.Session, entry: store.AllowEntry,
                     now: float) -> store.AllowEntry:
    return store.add_allow_entry(conn, entry, session.user.name, now)
