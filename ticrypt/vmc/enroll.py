"""``POST /v1/enroll``: the one HTTPS call vmc makes to rest.

The client trusts only ``ca_file``, has a connect and an overall timeout and
reads at most :data:`MAX_BODY` bytes of answer.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from ticrypt import tlsutil
from ticrypt.encoding import loads_bounded

MAX_BODY = 65536


class EnrollError(Exception):
    """Enrollment failed.  ``code`` is rest's error code (or a local one such as
    ``unreachable``); ``permanent`` is True when retrying cannot help."""

    def __init__(self, code: str, message: str, permanent: bool):
        self.code = code
        self.permanent = permanent
        super().__init__(message)


@implementer(IPolicyForHTTPS)
class CAPolicy:
    """HTTPS policy that trusts only the configured CA."""

    def __init__(self, ca_file: str):
        self._ca_file = ca_file

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return tlsutil.client_options(hostname.decode("ascii"), self._ca_file)


class _BoundedBody(Protocol):
    def __init__(self, limit: int):
        self.data = bytearray()
        self.limit = limit
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > self.limit and not self.done.called:
            self.done.errback(EnrollError("bad-response", "answer from rest is too large",
                                          permanent=False))
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(bytes(self.data))
        else:
            self.done.errback(EnrollError("unreachable", "connection to rest lost",
                                          permanent=False))


async def post_json(reactor: Any, url: str, ca_file: str, body: dict[str, Any],
                    timeout: float) -> tuple[int, Any]:
    """POST ``body`` as JSON; (status, parsed JSON answer) within ``timeout``."""
    agent = Agent(reactor, contextFactory=CAPolicy(ca_file), connectTimeout=timeout)
    producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode()))
    d = agent.request(b"POST", url.encode("ascii"),
                      Headers({b"content-type": [b"application/json"]}), producer)
    assert IReactorTime.providedBy(reactor)
    d.addTimeout(timeout, reactor)
    try:
        response = await d
    except defer.CancelledError:
        raise EnrollError("timeout", f"rest did not answer within {timeout:g}s",
                          permanent=False) from None
    except Exception as e:
        raise EnrollError("unreachable", f"cannot reach rest: {e.__class__.__name__}",
                          permanent=False) from None
    reader = _BoundedBody(MAX_BODY)
    response.deliverBody(reader)
    reader.done.addTimeout(timeout, reactor)
    try:
        raw = await reader.done
    except defer.CancelledError:
        raise EnrollError("timeout", "rest answer timed out", permanent=False) from None
    try:
        return response.code, loads_bounded(raw, max_size=MAX_BODY)
    except ValueError:
        raise EnrollError("bad-response", f"rest answered HTTP {response.code} without JSON",
                          permanent=False) from None


async def enroll(reactor: Any, rest_url: str, ca_file: str, *, token: str,
                 vm_public_key: str, tls_fingerprint: str, timeout: float) -> dict[str, Any]:
    """The enrollment answer (a JSON object), or :class:`EnrollError`."""
    status, answer = await post_json(
        reactor, rest_url + "/v1/enroll", ca_file,
        {"token": token, "vm_public_key": vm_public_key, "tls_fingerprint": tls_fingerprint},
        timeout)
    if status == 200 and isinstance(answer, dict):
        return answer
    err = answer.get("error") if isinstance(answer, dict) else None
    code = str(err.get("code", "error")) if isinstance(err, dict) else "error"
    message = str(err.get("message", "")) if isinstance(err, dict) else ""
    raise EnrollError(code[:64], f"rest refused enrollment (HTTP {status} {code}): "
                      f"{message[:200]}", permanent=400 <= status < 500)
