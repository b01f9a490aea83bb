"""A small JSON-over-HTTP(S) client: trusts only one CA file, bounds the
answer, and has one deadline for the whole exchange.

    client = JsonClient(reactor, ca_file="ca.pem", timeout=10)
    status, answer = await client.request("POST", url, {"a": 1})

``answer`` is the decoded JSON (through the bounded decoder), or None for
an empty body.  :meth:`JsonClient.exchange` also gives the raw body and the
headers (a relay passing rest's answer on), and takes a body that is
already JSON as bytes.  Every transport failure is an :class:`HttpError` with a
stable ``code``: ``timeout``, ``unreachable``, ``tls-error`` or
``bad-response`` (answer too large, or not JSON).  HTTP error statuses are
not exceptions: the caller reads ``status`` and rest's error object.

Used by the proxy (the revocation feed) and vmc (enrollment).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IConsumer, IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from ticrypt.encoding import loads_bounded

if TYPE_CHECKING:
    from twisted.web.client import HTTPConnectionPool

# twisted.web.client and ticrypt.tlsutil (Twisted's agent, endpoints and TLS)
# are imported where a client is made, not here: ticrypt-admin imports this
# module (through rest's proxy control client) and never makes a request.

MAX_RESPONSE = 1024 * 1024


class HttpError(Exception):
    """No usable answer: ``code`` is stable, ``str()`` one human line;
    ``status`` is the HTTP status of an answer that was not JSON (0: none)."""

    def __init__(self, code: str, message: str, *, status: int = 0):
        self.code = code
        self.status = status
        super().__init__(message)


@implementer(IPolicyForHTTPS)
class PinnedCAPolicy:
    """HTTPS trusting only ``ca_file``, verifying the URL's host name or IP."""

    def __init__(self, ca_file: str):
        self._ca_file = ca_file
        self._cache: dict[bytes, IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        creator = self._cache.get(hostname)
        if creator is None:
            from ticrypt import tlsutil

            creator = tlsutil.client_options(hostname.decode("ascii"), self._ca_file)
            self._cache[hostname] = creator
        return creator


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory."""

    def __init__(self, data: bytes):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BoundedBody(protocol.Protocol):
    """Collect a response body of at most ``limit`` bytes; more, or a
    cancelled wait, drops the connection."""

    def __init__(self, limit: int):
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.done.errback(HttpError("bad-response",
                                        f"answer larger than {self._limit} bytes"))
            self._abort()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        from twisted.web.client import ResponseDone

        if reason.check(ResponseDone):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(HttpError("unreachable", "the connection was lost during "
                                        "the answer"))


@attrs.frozen
class Answer:
    """One answer: ``status``, the decoded ``json`` (None for an empty
    body), the ``raw`` body and ``header(name)``."""

    status: int
    json: Any
    raw: bytes
    _headers: Headers

    def header(self, name: str) -> str | None:
        """The first value of header ``name``, or None."""
        values = self._headers.getRawHeaders(name)
        return values[0] if values else None


class JsonClient:
    """Requests to one or more URLs, with one CA and one set of bounds.

    ``persistent`` keeps connections open between requests (a poller);
    :meth:`close` then drops the idle ones (call it when stopping).
    ``pool`` shares a connection pool of the caller's instead (a benchmark)."""

    def __init__(self, reactor: Any, ca_file: str | None, *, timeout: float,
                 max_response: int = MAX_RESPONSE, persistent: bool = False,
                 idle_keep: int = 30, pool: HTTPConnectionPool | None = None):
        from twisted.web import client as webclient

        self._reactor = reactor
        self._timeout = timeout
        self._max_response = max_response
        self._pool = (pool if pool is not None
                      else webclient.HTTPConnectionPool(reactor, persistent=persistent))
        if persistent and pool is None:
            self._pool.maxPersistentPerHost = 1
            self._pool.cachedConnectionTimeout = int(idle_keep)
            self._pool.retryAutomatically = False
        policy: Any = (PinnedCAPolicy(ca_file) if ca_file is not None
                       else webclient.BrowserLikePolicyForHTTPS())
        self._https = ca_file is not None
        self._agent = webclient.Agent(reactor, contextFactory=policy, connectTimeout=timeout,
                                      pool=self._pool)

    def close(self) -> defer.Deferred[None]:
        """Close idle persistent connections."""
        return self._pool.closeCachedConnections()  # type: ignore[no-any-return]

    async def request(self, method: str, url: str, body: Any = None,
                      headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """``(status, JSON answer or None)`` within the deadline; HttpError."""
        answer = await self.exchange(method, url, body, headers)
        return answer.status, answer.json

    async def exchange(self, method: str, url: str, body: Any = None,
                       headers: dict[str, str] | None = None) -> Answer:
        """The :class:`Answer` within the deadline; HttpError.  ``body``:
        a JSON value, or bytes that are JSON already (sent as they are)."""
        if url.startswith("https:") and not self._https:
            raise HttpError("tls-error", "an https URL needs a CA file")
        d = defer.ensureDeferred(self._request(method, url, body, headers or {}))
        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=_deadline_passed)
        try:
            return await d
        except HttpError:
            raise
        except defer.TimeoutError:
            raise HttpError("timeout", f"no answer from {_origin(url)} within "
                            f"{self._timeout:g}s") from None
        except Exception as e:
            raise transport_error(url, e) from None

    async def _request(self, method: str, url: str, body: Any,
                       headers: dict[str, str]) -> Answer:
        h = Headers({b"Accept": [b"application/json"]})
        for name, value in headers.items():
            h.addRawHeader(name.encode("ascii"), value.encode("latin-1"))
        producer = None
        if body is not None:
            h.addRawHeader(b"Content-Type", b"application/json")
            producer = BytesProducer(body if isinstance(body, bytes)
                                     else json.dumps(body, separators=(",", ":")).encode())
        response = await self._agent.request(method.encode("ascii"), url.encode("utf-8"), h,
                                             producer)
        reader = _BoundedBody(self._max_response)
        response.deliverBody(reader)
        raw = await reader.done
        if not raw.strip():
            return Answer(response.code, None, raw, response.headers)
        try:
            return Answer(response.code, loads_bounded(raw, max_size=self._max_response), raw,
                          response.headers)
        except ValueError:
            raise HttpError("bad-response", f"{_origin(url)} answered HTTP {response.code} "
                            "without JSON", status=response.code) from None


def _deadline_passed(result: object, timeout: float) -> NoReturn:
    """Whatever a request cancelled at its deadline failed with (the agent
    wraps the cancellation, e.g. ResponseNeverReceived while waiting for
    the headers), it is a timeout."""
    raise defer.TimeoutError(f"no answer within {timeout:g}s")


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def transport_error(url: str, e: BaseException) -> HttpError:
    """The HttpError for an exception from the agent (no traceback, one line)."""
    reasons = getattr(e, "reasons", None)
    inner = reasons[0].value if reasons else e
    text = str(inner) or type(inner).__name__
    where = _origin(url)
    if "SSL" in type(inner).__module__ + type(inner).__name__ or "certificate" in text.lower():
        return HttpError("tls-error", f"TLS with {where} failed: {text}")
    if isinstance(inner, error.ConnectError | error.DNSLookupError):
        return HttpError("unreachable", f"cannot connect to {where}: {text}")
    return HttpError("unreachable", f"request to {where} failed: {text}")
