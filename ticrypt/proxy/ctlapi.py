"""The proxy's internal control API (``[control] listen``): rest opens and
closes pathway leases here.  PROTOCOL.md "Proxy control API".

It is its own listener (TLS, on a management address), never the public
websocket listener, served by :mod:`ticrypt.http.server`.  Every request is
signed by rest's backend signing key, which the proxy already trusts for
tickets (``[proxy] backend_public_key``)::

    Authorization: Ticrypt-Signed <token>

where the token (:func:`ticrypt.signed.sign_control_request`, purpose
``proxy-control-v1``) binds the method, the path, the body's SHA-256, the
time (within ``[control] request_window``) and a 16-byte nonce that the
proxy accepts once (:class:`NonceCache`).  A request that fails any check
is answered 401 with a stable code before it is routed, and audited
(``control-refused``); an address refused :data:`FAILURES_PER_ADDRESS`
times in :data:`FAILURE_WINDOW` is answered 429 ``rate-limited`` (audited
once) until the window passes.

Routes (bodies and answers are JSON):

* ``POST /v1/leases`` ``{user, session, vm, target, address, expires}`` ->
  201 ``{"lease": {...}, "reused": bool}``; 503 ``no-free-port``, 409
  ``too-many-leases``, 400 ``bad-address``/``bad-request``/``bad-target``.
* ``GET /v1/users/{user}/leases`` -> 200 ``{"leases": [...]}``
* ``GET /v1/leases/{id}`` -> 200 ``{"lease": {...}}``; 404 ``no-such-lease``
* ``DELETE /v1/leases/{id}`` ``{"user"?}`` -> 204; 404 ``no-such-lease``
* ``DELETE /v1/sessions/{sid}/leases`` -> 200 ``{"closed": n}``
"""

from __future__ import annotations

import heapq
from collections.abc import Awaitable
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.web import server

from ticrypt import signed
from ticrypt.audit import AuditLog
from ticrypt.http.server import (
    ApiError,
    Field,
    JsonResource,
    JsonSite,
    Result,
    parse_body,
    route,
    routes_of,
)
from ticrypt.proxy.ports import Lease, LeaseError
from ticrypt.ratelimit import Clock, RateLimiter

#: The Authorization scheme of a signed control request.
SCHEME = "Ticrypt-Signed"

#: Refused control requests one address may make per FAILURE_WINDOW seconds.
FAILURES_PER_ADDRESS = 20
FAILURE_WINDOW = 300.0

_LEASE_STATUS = {"no-free-port": 503, "too-many-leases": 409, "bad-address": 400,
                 "bad-request": 400, "bad-target": 400}


def _text(limit: int) -> Field:
    return Field(str, check=lambda v: None if 0 < len(v) <= limit else
                 f"must be 1 to {limit} characters")


OPEN_BODY = {"user": _text(64), "session": _text(64), "vm": _text(64),
             "target": _text(300), "address": _text(64), "expires": Field(int)}
CLOSE_BODY = {"user": Field(str, required=False)}
EMPTY_BODY: dict[str, Field] = {}


class Leases(Protocol):
    """What the control API drives (:class:`ticrypt.proxy.leases.LeaseService`)."""

    public_host: str

    def open(self, *, user: str, session: str, vm: str, target: str, address: str,
             expires: float) -> Awaitable[tuple[Lease, bool]]: ...

    def get(self, lease_id: str) -> Lease | None: ...

    def leases(self, user: str | None = None) -> list[Lease]: ...

    def close(self, lease_id: str, reason: str, user: str | None = None) -> bool: ...

    def close_session(self, session: str, reason: str) -> int: ...


class NonceCache:
    """Nonces seen, each kept ``keep`` seconds; at most ``max_entries``."""

    def __init__(self, keep: float, max_entries: int = 100_000):
        self._keep = keep
        self._max = max_entries
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    def use(self, nonce: str, now: float) -> str | None:
        """None if ``nonce`` is new (now recorded); else ``replayed`` or
        ``busy`` (full: fail closed)."""
        while self._heap and self._heap[0][0] <= now:
            until, old = heapq.heappop(self._heap)
            if self._until.get(old) == until:
                del self._until[old]
        if nonce in self._until:
            return "replayed"
        if len(self._until) >= self._max:
            return "busy"
        until = now + self._keep
        self._until[nonce] = until
        heapq.heappush(self._heap, (until, nonce))
        return None


def lease_json(lease: Lease, host: str) -> dict[str, Any]:
    return dict(lease.to_json(), host=host)


class ControlResource(JsonResource):
    """The control API over a :class:`Leases`."""

    log = Logger()

    def __init__(self, leases: Leases, *, backend_public: bytes, clock: Clock,
                 audit: AuditLog, window: float = 30.0, max_nonces: int = 100_000):
        super().__init__(ROUTES)
        self._leases = leases
        self._public = backend_public
        self._clock = clock
        self._audit = audit
        self._window = window
        # a nonce must be remembered as long as its iat is acceptable: iat
        # may be up to window ahead of us and is accepted until window after
        self.nonces = NonceCache(2 * window + 1, max_nonces)
        #: refused requests per client address: past the limit the address
        #: is answered 429 without a signature check, audited once
        self.failures = RateLimiter(clock, FAILURES_PER_ADDRESS, FAILURE_WINDOW)

    def admit(self, request: server.Request) -> None:
        client = request.getClientAddress()
        host = str(getattr(client, "host", ""))
        fields = {"client": host, "method": request.method.decode("ascii", "replace")[:16],
                  "path": request.path.decode("ascii", "replace")[:200]}
        wait = self.failures.retry_after(host)
        if wait:
            if self.failures.first_refusal(host):
                self._audit.write("control-refused", reason="rate-limited", **fields)
            raise ApiError(429, "rate-limited", f"too many refused requests; retry in {wait}s",
                           {"Retry-After": str(wait)})
        try:
            self._verify(request)
        except ApiError as e:
            self.failures.failed(host)
            self._audit.write("control-refused", reason=e.code, **fields)
            raise

    def _verify(self, request: server.Request) -> None:
        value = request.getHeader(b"authorization")
        scheme, _, token = (value or b"").decode("latin-1").partition(" ")
        if scheme != SCHEME or not token.strip():
            raise _refused("missing-signature",
                           f"an Authorization: {SCHEME} header is required")
        assert request.content is not None
        body = request.content.read()
        request.content.seek(0)
        try:
            signed_request = signed.verify_control_request(
                self._public, token.strip(), method=request.method.decode("ascii", "replace"),
                path=request.path.decode("ascii", "replace"), body=body,
                now=self._clock.seconds(), window=self._window)
        except signed.TokenError as e:
            raise _refused(e.code, str(e)) from None
        problem = self.nonces.use(signed_request.nonce, self._clock.seconds())
        if problem == "replayed":
            raise _refused("replayed", "this request was already received")
        if problem is not None:
            raise ApiError(503, "busy", "too many recent requests; retry shortly")

    # -- operations ------------------------------------------------------------

    @route("POST", "/v1/leases")
    async def open_lease(self, body: bytes) -> Result:
        args = parse_body(body, OPEN_BODY)
        try:
            lease, reused = await self._leases.open(
                user=args["user"], session=args["session"], vm=args["vm"],
                target=args["target"], address=args["address"],
                expires=float(args["expires"]))
        except LeaseError as e:
            raise ApiError(_LEASE_STATUS.get(e.code, 400), e.code, str(e)) from None
        return 201, {"lease": lease_json(lease, self._leases.public_host), "reused": reused}

    @route("GET", "/v1/leases/{id}")
    async def get_lease(self, body: bytes, lease_id: str) -> Result:
        parse_body(body, EMPTY_BODY)
        found = self._leases.get(lease_id)
        if found is None:
            raise ApiError(404, "no-such-lease", "no such lease")
        return 200, {"lease": lease_json(found, self._leases.public_host)}

    @route("DELETE", "/v1/leases/{id}")
    async def close_lease(self, body: bytes, lease_id: str) -> Result:
        args = parse_body(body, CLOSE_BODY)
        if not self._leases.close(lease_id, "closed", user=args.get("user")):
            raise ApiError(404, "no-such-lease", "no such lease")
        return 204, None

    @route("GET", "/v1/users/{user}/leases")
    async def list_leases(self, body: bytes, user: str) -> Result:
        parse_body(body, EMPTY_BODY)
        return 200, {"leases": [lease_json(lease, self._leases.public_host)
                                for lease in self._leases.leases(user)]}

    @route("DELETE", "/v1/sessions/{sid}/leases")
    async def close_session(self, body: bytes, session: str) -> Result:
        parse_body(body, EMPTY_BODY)
        return 200, {"closed": self._leases.close_session(session, "session-ended")}


#: The control API's routes, as declared on the operations above.
ROUTES = routes_of(ControlResource)


def _refused(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, {"WWW-Authenticate": SCHEME})


def control_site(resource: ControlResource, *, reactor: Any, max_body: int = 16 * 1024,
                 idle_timeout: float = 60.0, request_timeout: float = 30.0) -> JsonSite:
    """The control API's site; wrap it in a
    :class:`~ticrypt.http.server.LimitedFactory` to listen."""
    return JsonSite(resource, reactor=reactor, max_body=max_body, idle_timeout=idle_timeout,
                    request_timeout=request_timeout,
                    access_namespace="ticrypt.proxy.control.access")
