"""twisted.web plumbing for rest: bounded request bodies, routing over
:data:`ticrypt.rest.api.ROUTES`, JSON responses and JSON errors.

Bodies are limited while they are read (:class:`BoundedRequest`): nothing
past ``max_body`` is stored; a request that declares or sends more gets 413
``body-too-large`` once its body has been read, and a client that keeps
sending far past the limit is answered and disconnected at once.

Open connections are bounded in total and per client address
(:class:`ConnectionLimits`).  Slow clients are bounded too (:class:`BoundedChannel`): besides the idle
timeout, a request must arrive whole (request line, headers and body) within
``request_timeout`` of its first byte, else it is answered 408
``request-timeout`` and the connection is closed.  Only HTTP/1.1 is served.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from ticrypt.rest.api import ROUTES, Call, RestApi, Route
from ticrypt.rest.core import ApiError

#: Successful requests of this path are logged at debug level (polled).
QUIET_PATH = "/v1/revocations"

#: Bytes past ``max_body`` still read (and dropped) so that the client sees
#: the 413 instead of a connection reset; beyond that we hang up.
DRAIN_LIMIT = 1024 * 1024


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}},
                      separators=(",", ":")).encode()


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

    site: RestSite
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


class ConnectionLimits(policies.WrappingFactory):
    """Refuse connections past ``max_total`` open ones, or past
    ``per_address`` open ones from one client address, so that many idle or
    slow connections cannot exhaust the daemon's file descriptors.

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


def send_json(request: server.Request, status: int, body: bytes | None,
              headers: dict[str, str] | None = None) -> None:
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


class ApiResource(resource.Resource):
    """The whole API as one leaf resource dispatching on ROUTES."""

    isLeaf = True
    log = Logger()

    def __init__(self, api: RestApi):
        super().__init__()
        self._api = api

    def render(self, request: server.Request) -> Any:
        disconnected: list[bool] = []
        request.notifyFinish().addErrback(lambda _: disconnected.append(True))
        d = defer.ensureDeferred(self._handle(request))
        d.addErrback(self._unexpected, request)
        d.addCallback(lambda result: None if disconnected else send_json(request, *result))
        d.addErrback(lambda f: self.log.failure("writing a response failed", f))
        return server.NOT_DONE_YET

    def _unexpected(self, f: Failure, request: server.Request) -> Any:
        self.log.failure("unexpected error in {method} {path}", f,
                         method=request.method.decode("ascii", "replace"),
                         path=request.path.decode("ascii", "replace"))
        return 500, error_body("internal-error", "internal error"), {}

    async def _handle(self, request: server.Request) -> tuple[int, bytes | None,
                                                              dict[str, str]]:
        try:
            if getattr(request, "too_large", False):
                raise ApiError(413, "body-too-large", "request body is larger than "
                               f"{request.channel.site.max_body} bytes")  # type: ignore
            route, params = match(request.method.decode("ascii", "replace"),
                                  request.path.decode("ascii", "replace"))
            assert request.content is not None
            call = Call(method=route.method, params=params, body=request.content.read(),
                        client=request.getClientAddress().host, bearer=_bearer(request))
            status, obj = await getattr(self._api, route.handler)(call)
        except ApiError as e:
            return e.status, error_body(e.code, e.message), e.headers
        body = obj if obj is None or isinstance(obj, bytes) else json.dumps(
            obj, separators=(",", ":")).encode()
        return status, body, {}


def _bearer(request: server.Request) -> str | None:
    value = request.getHeader(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def match(method: str, path: str) -> tuple[Route, tuple[str, ...]]:
    """The route for ``method path``; ApiError 404 or 405 (with Allow)."""
    allowed = []
    for route in ROUTES:
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


class RestSite(server.Site):
    """A Site whose requests are bounded and whose errors are JSON."""

    # HTTP/1.1 only (no HTTP/2 negotiation): the bounds above live in the HTTP/1 parser.
    protocol = BoundedChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest
    displayTracebacks = False

    def __init__(self, api: RestApi, max_body: int, idle_timeout: float,
                 reactor: Any = None, request_timeout: float = 30.0):
        kwargs: dict[str, Any] = {"timeout": idle_timeout}
        if reactor is not None:
            kwargs["reactor"] = reactor
        super().__init__(ApiResource(api), **kwargs)
        self.max_body = max_body
        self.request_timeout = request_timeout
        self._parsePOSTFormSubmission = False

    def log(self, request: Any) -> None:
        # Access lines without query strings or headers (no secrets either way).
        path = request.path.decode("ascii", "replace")[:200]
        # the proxy fetches the revocation feed every couple of seconds: its
        # successful polls would drown every other line
        emit = self._access.debug if (path, request.code) == (QUIET_PATH, 200) \
            else self._access.info
        emit("{client} {method} {path} {code}", client=request.getClientAddress().host,
             method=request.method.decode("ascii", "replace"), path=path, code=request.code)

    _access = Logger(namespace="ticrypt.rest.access")


__all__ = ["ApiResource", "BoundedChannel", "ConnectionLimits", "BoundedRequest", "RestSite", "error_body", "match"]
