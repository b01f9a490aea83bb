"""A bounded JSON-over-HTTP/1.1 server on twisted.web, for every API we serve
(rest's public API; later the proxy's control API and connect's local API).

What a client controls is bounded:

* **Bodies** are limited while they are read (:class:`BoundedRequest`):
  nothing past ``max_body`` is kept; a request that declares or sends more is
  answered 413 ``body-too-large`` once its body has been read, and a client
  that keeps sending :data:`DRAIN_LIMIT` bytes past the limit is answered and
  disconnected at once.
* **Slow clients** (:class:`BoundedChannel`): besides the idle timeout, a
  request must arrive whole (request line, headers and body) within
  ``request_timeout`` of its first byte, else it is answered 408
  ``request-timeout`` and the connection is closed.
* **Connections** are limited in total and per client address
  (:class:`LimitedFactory`, a wrapping factory); over the limit they are
  aborted as soon as they are made.
* Only HTTP/1.1 is served: the bounds live in its parser.

Every answer has ``Cache-Control: no-store`` and a JSON body (or none); every
error is ``{"error": {"code", "message"}}`` (:func:`error_body`), raised
anywhere below a handler as :class:`ApiError`.  Unexpected exceptions are
logged and answered 500 ``internal-error`` without details.

How an API uses it::

    class ControlResource(JsonResource):
        def admit(self, request):        # optional: before routing
            ...                          # Host/Origin, token or client certificate;
                                         # raise ApiError(403, ...) to refuse
        @route("DELETE", "/v1/leases/{id}")
        async def close_lease(self, body, lease_id):
            args = parse_body(body, {"user": Field(str, required=False)})
            return 204, None             # or raise ApiError(409, "code", "...")

    ROUTES = routes_of(ControlResource)
    site = JsonSite(ControlResource(ROUTES), reactor=reactor, max_body=65536,
                    idle_timeout=60, request_timeout=30)
    factory = LimitedFactory(site, max_total=256, per_address=16)
    ListenerService("https", endpoints.serverFromString(reactor, listen), factory, ...)

Each handler declares its routes with :func:`route`; :func:`routes_of`
collects them as a tuple of :class:`Route`, and the default
:meth:`JsonResource.handle` calls the handler a request's route names (an
API whose handlers live on another object overrides it, as rest does).

TLS comes from the endpoint (an ``ssl:`` string, or a TLS endpoint with
tlsutil options that require a client certificate); the limits sit inside
TLS, and :meth:`JsonResource.admit` can read the peer certificate from
``request.channel.transport``.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import attrs
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from ticrypt.encoding import loads_bounded

Json = dict[str, Any]
#: What a handler returns, (status, body): a JSON object, bytes that are
#: already JSON (sent as they are), or None for no body.
Result = tuple[int, Json | bytes | None]

#: Bytes past ``max_body`` still read (and dropped) so that the client sees
#: the 413 instead of a connection reset; beyond that we hang up.
DRAIN_LIMIT = 1024 * 1024


class ApiError(Exception):
    """A failure shown to the client as ``{"error": {"code", "message"}}``
    with HTTP ``status`` and any extra ``headers``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None):
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        super().__init__(f"{status} {code}: {message}")


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}},
                      separators=(",", ":")).encode()


_T = TypeVar("_T")


def enabled(value: _T | None, code: str, message: str) -> _T:
    """``value``, the object behind a feature that may be off (None): where
    it is off, ApiError 503 ``code`` with ``message`` (saying how to turn it
    on) instead."""
    if value is None:
        raise ApiError(503, code, message)
    return value


# ---------------------------------------------------------------- bodies

@attrs.frozen
class Field:
    """One JSON body field: a Python type and an optional check returning an
    error message (or None)."""

    type: type
    required: bool = True
    check: Callable[[Any], str | None] | None = None


def parse_body(raw: bytes, fields: Mapping[str, Field]) -> dict[str, Any]:
    """Decode a JSON object and check it against ``fields``; ApiError 400 with
    codes ``malformed-json``, ``invalid-body``, ``unknown-field``,
    ``missing-field`` or ``invalid-field``.  An empty body counts as ``{}``."""
    if raw.strip() == b"":
        obj: Any = {}
    else:
        try:
            obj = loads_bounded(raw.decode("utf-8"), max_size=len(raw))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "malformed-json", "request body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "invalid-body", "request body must be a JSON object")
    for key in obj:
        if key not in fields:
            raise ApiError(400, "unknown-field", f"unknown field {key!r}")
    for key, spec in fields.items():
        if key not in obj:
            if spec.required:
                raise ApiError(400, "missing-field", f"missing field {key!r}")
            continue
        value = obj[key]
        if not isinstance(value, spec.type) or isinstance(value, bool) != (spec.type is bool):
            raise ApiError(400, "invalid-field",
                           f"field {key!r} must be a {spec.type.__name__}")
        if spec.check is not None:
            problem = spec.check(value)
            if problem:
                raise ApiError(400, "invalid-field", f"field {key!r} {problem}")
    return obj


# ---------------------------------------------------------------- HTTP/1.1 bounds

def _raw_response(status: int, reason: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class BoundedRequest(server.Request):
    """A Request that keeps at most ``site.max_body`` bytes of body."""

    log = Logger()
    too_large = False
    _received = 0
    _aborted = False

    def _max_body(self) -> int:
        return int(getattr(getattr(self.channel, "site", None), "max_body", 65536))

    def gotLength(self, length: int | None) -> None:
        self.content = io.BytesIO()  # type: ignore[assignment]
        if length is not None and length > self._max_body():
            self.too_large = True
            if length > self._max_body() + DRAIN_LIMIT:
                self._abort()

    def handleContentChunk(self, data: bytes) -> None:
        if self._aborted:
            return
        self._received += len(data)
        if self._received > self._max_body():
            if not self.too_large:
                self.too_large = True
                self.content = io.BytesIO()  # type: ignore[assignment]  # drop what was kept
            if self._received > self._max_body() + DRAIN_LIMIT:
                self._abort()
            return
        if not self.too_large and self.content is not None:
            self.content.write(data)

    def _abort(self) -> None:
        """Answer 413 before the body has arrived, and hang up."""
        self._aborted = True
        transport = self.channel.transport
        if transport is not None:
            transport.write(_raw_response(413, "Request Entity Too Large", error_body(
                "body-too-large", f"request body is larger than {self._max_body()} bytes")))
            transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._aborted:
            return
        super().requestReceived(command, path, version)

    def processingFailed(self, reason: Failure) -> None:  # type: ignore[override]
        self.log.failure("unexpected error in {method} {path}", reason,
                         method=self.method, path=self.path)
        if not self.finished and not self.startedWriting:
            send_json(self, 500, error_body("internal-error", "internal error"))


class BoundedChannel(http.HTTPChannel):
    """An HTTPChannel that gives each request ``site.request_timeout`` seconds,
    from its first byte to its last, to arrive.

    The idle timeout alone is reset by every byte, so a client sending one
    byte a minute would hold its connection (and its file descriptor) forever.
    """

    site: JsonSite
    _request_deadline: IDelayedCall | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._request_deadline is None and not self._handlingRequest:
            self._request_deadline = self.callLater(self.site.request_timeout,
                                                    self._request_too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_request_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_request_deadline()
        super().connectionLost(reason)

    def _cancel_request_deadline(self) -> None:
        if self._request_deadline is not None:
            if self._request_deadline.active():
                self._request_deadline.cancel()
            self._request_deadline = None

    def _request_too_slow(self) -> None:
        self._request_deadline = None
        if self.transport is None or self._handlingRequest:
            return
        self.transport.write(_raw_response(408, "Request Timeout", error_body(
            "request-timeout",
            f"the request did not arrive within {self.site.request_timeout:g}s")))
        # Close, and abort after abortTimeout if the client does not read.
        self.timeoutConnection()


class _Refused(protocol.Protocol):
    """Hang up at once (an over-limit connection)."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class LimitedFactory(policies.WrappingFactory):
    """Wraps a factory (a :class:`JsonSite`) and refuses connections past
    ``max_total`` open ones, or past ``per_address`` open ones from one client
    address, so that many idle or slow connections cannot exhaust the
    daemon's file descriptors.

    Under an ``ssl:`` endpoint this sits inside TLS; a refused connection is
    aborted as soon as it is made (it never reaches HTTP)."""

    def __init__(self, wrapped: Any, max_total: int, per_address: int):
        super().__init__(wrapped)
        self.max_total = max_total
        self.per_address = per_address
        self.refused = 0
        self._hosts: dict[protocol.Protocol, str] = {}
        self._per_host: dict[str, int] = {}

    def buildProtocol(self, addr: Any) -> Any:
        host = str(getattr(addr, "host", ""))
        if len(self._hosts) >= self.max_total or self._per_host.get(host, 0) >= self.per_address:
            self.refused += 1
            return _Refused()
        p = super().buildProtocol(addr)
        self._hosts[p] = host
        self._per_host[host] = self._per_host.get(host, 0) + 1
        return p

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        host = self._hosts.pop(p, None)
        if host is not None:
            self._per_host[host] -= 1
            if not self._per_host[host]:
                del self._per_host[host]

    def __len__(self) -> int:
        return len(self._hosts)


class JsonSite(server.Site):
    """A Site whose requests are bounded (``max_body``, ``request_timeout``,
    ``idle_timeout``) and whose errors are JSON.

    Access lines go to ``access_namespace`` without query strings or headers;
    successful requests of ``quiet_paths`` (polled ones) at debug level."""

    # HTTP/1.1 only (no HTTP/2 negotiation): the bounds above live in the HTTP/1 parser.
    protocol = BoundedChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest
    displayTracebacks = False

    def __init__(self, root: resource.IResource, *, reactor: Any, max_body: int,
                 idle_timeout: float, request_timeout: float,
                 access_namespace: str = "ticrypt.http.access",
                 quiet_paths: Collection[str] = ()):
        super().__init__(root, timeout=idle_timeout, reactor=reactor)
        self.max_body = max_body
        self.request_timeout = request_timeout
        self._parsePOSTFormSubmission = False
        self._access = Logger(namespace=access_namespace)
        self._quiet = frozenset(quiet_paths)

    def log(self, request: Any) -> None:
        # Access lines without query strings or headers (no secrets either way).
        path = request.path.decode("ascii", "replace")[:200]
        emit = self._access.debug if path in self._quiet and request.code == 200 \
            else self._access.info
        emit("{client} {method} {path} {code}", client=request.getClientAddress().host,
             method=request.method.decode("ascii", "replace"), path=path, code=request.code)


def send_json(request: server.Request, status: int, body: bytes | None,
              headers: Mapping[str, str] | None = None) -> None:
    request.setResponseCode(status)
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    if body is not None:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", str(len(body)).encode())
        request.write(body)
    request.finish()


# ---------------------------------------------------------------- routing

@attrs.frozen
class Route:
    """``method template`` served by the handler named ``handler``; the
    template is OpenAPI-style (``/v1/vms/{id}``), each ``{name}`` one path
    segment passed to the handler in order."""

    method: str
    template: str
    handler: str
    regex: re.Pattern[str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "([^/]+)", re.escape(self.template))
        object.__setattr__(self, "regex", re.compile(pattern))


_Handler = TypeVar("_Handler", bound=Callable[..., Any])

#: The attribute in which :func:`route` leaves a handler's routes.
_ROUTES_ATTR = "_ticrypt_routes"


def route(method: str, template: str) -> Callable[[_Handler], _Handler]:
    """Declare that the decorated method handles ``method template``
    (stacked, one route each, in the order written); :func:`routes_of`
    collects the routes of a class."""
    def declare(handler: _Handler) -> _Handler:
        # decorators apply bottom-up: the route written first goes first
        setattr(handler, _ROUTES_ATTR,
                ((method, template), *getattr(handler, _ROUTES_ATTR, ())))
        return handler
    return declare


def routes_of(cls: type) -> tuple[Route, ...]:
    """The routes declared with :func:`route` in the body of ``cls``, in the
    order they are written there (:func:`match` takes the first that
    fits), each naming its method.  ValueError if one ``method template``
    is declared twice, by one handler or two: the second could never be
    reached."""
    routes: list[Route] = []
    declared: dict[tuple[str, str], str] = {}
    for name, handler in vars(cls).items():
        for method, template in getattr(handler, _ROUTES_ATTR, ()):
            new = Route(method, template, name)
            key = (method, new.regex.pattern)  # /v1/vms/{id} is /v1/vms/{vm}
            if key in declared:
                on = name if declared[key] == name else f"{declared[key]} and {name}"
                raise ValueError(f"{cls.__name__}: {method} {template} is declared "
                                 f"twice (on {on})")
            declared[key] = name
            routes.append(new)
    return tuple(routes)


def match(routes: Sequence[Route], method: str, path: str) -> tuple[Route, tuple[str, ...]]:
    """The route for ``method path``; ApiError 404 or 405 (with Allow)."""
    allowed = []
    for route in routes:
        m = route.regex.fullmatch(path)
        if m is None:
            continue
        if route.method == method:
            return route, m.groups()
        allowed.append(route.method)
    if allowed:
        raise ApiError(405, "method-not-allowed", f"{method} is not allowed here",
                       {"Allow": ", ".join(sorted(set(allowed)))})
    raise ApiError(404, "not-found", "no such endpoint")


def bearer_token(request: server.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    value = request.getHeader(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class JsonResource(resource.Resource):
    """A whole API as one leaf resource: refuses what :meth:`admit` refuses,
    routes over ``routes``, awaits :meth:`handle` and sends its result as
    JSON (an :class:`ApiError` as a JSON error).  Nothing is written to a
    client that has gone."""

    isLeaf = True
    log = Logger()

    def __init__(self, routes: Sequence[Route]):
        super().__init__()
        self.routes = tuple(routes)

    def admit(self, request: server.Request) -> None:
        """Raise ApiError to refuse ``request`` before it is routed."""

    async def handle(self, request: server.Request, route: Route,
                     params: tuple[str, ...]) -> Result:
        """The answer to ``request``, which matched ``route`` with ``params``:
        by default that of this resource's method the route names (declared
        with :func:`route`), awaited with the body and the parameters."""
        assert request.content is not None
        result: Result = await getattr(self, route.handler)(request.content.read(), *params)
        return result

    def render(self, request: server.Request) -> Any:
        disconnected: list[bool] = []
        request.notifyFinish().addErrback(lambda _: disconnected.append(True))
        d = defer.ensureDeferred(self._answer(request))
        d.addErrback(self._unexpected, request)
        d.addCallback(lambda result: None if disconnected else send_json(request, *result))
        d.addErrback(lambda f: self.log.failure("writing a response failed", f))
        return server.NOT_DONE_YET

    def _unexpected(self, f: Failure, request: server.Request) -> Any:
        self.log.failure("unexpected error in {method} {path}", f,
                         method=request.method.decode("ascii", "replace"),
                         path=request.path.decode("ascii", "replace"))
        return 500, error_body("internal-error", "internal error"), {}

    async def _answer(self, request: server.Request) -> tuple[int, bytes | None,
                                                              dict[str, str]]:
        try:
            self.admit(request)
            if getattr(request, "too_large", False):
                raise ApiError(413, "body-too-large", "request body is larger than "
                               f"{request.channel.site.max_body} bytes")  # type: ignore
            route, params = match(self.routes, request.method.decode("ascii", "replace"),
                                  request.path.decode("ascii", "replace"))
            status, obj = await self.handle(request, route, params)
        except ApiError as e:
            return e.status, error_body(e.code, e.message), e.headers
        body = obj if obj is None or isinstance(obj, bytes) else json.dumps(
            obj, separators=(",", ":")).encode()
        return status, body, {}
