"""Async client for ticrypt-rest over HTTPS that trusts only one CA file.

    client = RestClient(reactor, "https://rest:8443", "ca.pem")
    await client.login("alice", private_key)     # keeps the token
    vms = await client.list_vms()

Every failure is a :class:`RestError` (``status`` 0 for transport failures:
``timeout``, ``unreachable``, ``tls-error``, ``bad-response``).  Responses are
bounded (``max_response``) and every call has a deadline (``timeout``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IConsumer, IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client as webclient
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from ticrypt import signed, tlsutil
from ticrypt.config import Config
from ticrypt.encoding import b64, loads_bounded
from ticrypt.frontend import clientconfig

MAX_RESPONSE = 1024 * 1024
TIMEOUT = 30.0


class RestError(Exception):
    """A failed REST call: HTTP ``status`` (0 if none), stable ``code``, human ``message``."""

    def __init__(self, status: int, code: str, message: str):
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{message} ({code})" if status == 0 else
                         f"{message} (HTTP {status} {code})")


@implementer(IPolicyForHTTPS)
class PinnedCAPolicy:
    """HTTPS trusting only ``ca_file``, verifying the URL's host name or IP."""

    def __init__(self, ca_file: str):
        self._ca_file = ca_file
        self._cache: dict[bytes, IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        creator = self._cache.get(hostname)
        if creator is None:
            creator = tlsutil.client_options(hostname.decode("ascii"), self._ca_file)
            self._cache[hostname] = creator
        return creator


@implementer(IBodyProducer)
class _Bytes:
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


class _Collect(protocol.Protocol):
    """Collect a response body up to ``limit`` bytes."""

    def __init__(self, limit: int, done: defer.Deferred[bytes]):
        self._limit = limit
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._done.errback(RestError(0, "bad-response",
                                         f"response larger than {self._limit} bytes"))
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._done.called:
            return
        if reason.check(webclient.ResponseDone, webclient.PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


class RestClient:
    """One rest server; ``token`` is the session used for bearer calls."""

    log = Logger()

    def __init__(self, reactor: Any, rest_url: str, ca_file: str | None = None,
                 token: str | None = None, *, pool: webclient.HTTPConnectionPool | None = None,
                 timeout: float = TIMEOUT, max_response: int = MAX_RESPONSE):
        self._reactor = reactor
        self.rest_url = rest_url.rstrip("/")
        self.token = token
        self._timeout = timeout
        self._max_response = max_response
        if self.rest_url.startswith("https:"):
            if ca_file is None:
                raise ValueError("an https rest_url needs a CA file")
            policy: Any = PinnedCAPolicy(ca_file)
        else:
            policy = webclient.BrowserLikePolicyForHTTPS()
        self._agent = webclient.Agent(reactor, contextFactory=policy, connectTimeout=timeout,
                                      pool=pool)

    # ------------------------------------------------------------ transport

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None,
                   auth: bool = True) -> Any:
        """Send one request; return the decoded JSON (None for 204)."""
        d = defer.ensureDeferred(self._call(method, path, body, auth))
        d.addTimeout(self._timeout, self._reactor)
        try:
            return await d
        except RestError:
            raise
        except defer.TimeoutError:
            raise RestError(0, "timeout", f"no answer from {self.rest_url} "
                            f"within {self._timeout:g}s") from None
        except Exception as e:
            raise _transport_error(self.rest_url, e) from None

    async def _call(self, method: str, path: str, body: dict[str, Any] | None,
                    auth: bool) -> Any:
        headers = Headers({b"Accept": [b"application/json"]})
        if auth:
            if self.token is None:
                raise RestError(0, "not-logged-in", "not logged in")
            headers.addRawHeader(b"Authorization", b"Bearer " + self.token.encode("ascii"))
        producer = None
        if body is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
            producer = _Bytes(json.dumps(body, separators=(",", ":")).encode())
        response: IResponse = await self._agent.request(
            method.encode("ascii"), (self.rest_url + path).encode("utf-8"), headers, producer)
        done: defer.Deferred[bytes] = defer.Deferred()
        response.deliverBody(_Collect(self._max_response, done))
        raw = await done
        if response.code == 204:
            return None
        try:
            obj = loads_bounded(raw, max_size=self._max_response) if raw else None
        except ValueError:
            obj = None
        if 200 <= response.code < 300:
            if obj is None:
                raise RestError(response.code, "bad-response", "response is not JSON")
            return obj
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            raise RestError(response.code, err["code"], str(err.get("message", "")))
        raise RestError(response.code, "http-error",
                        f"HTTP {response.code} {response.phrase.decode('latin-1')}")

    # ------------------------------------------------------------ API

    async def backend(self) -> dict[str, Any]:
        return await self.call("GET", "/v1/backend", auth=False)  # type: ignore[no-any-return]

    async def challenge(self, user: str) -> dict[str, Any]:
        return await self.call(  # type: ignore[no-any-return]
            "POST", "/v1/auth/challenge", {"user": user}, auth=False)

    async def login(self, user: str, private_key: Ed25519PrivateKey) -> dict[str, Any]:
        """Challenge, sign, log in; keep and return the session
        (``token``, ``expires``, ``user``, ``role``)."""
        c = await self.challenge(user)
        sig = signed.sign(private_key, signed.LOGIN, {
            "challenge": c["challenge"], "challenge_id": c["challenge_id"], "user": user})
        result = await self.call("POST", "/v1/auth/login", {
            "user": user, "challenge_id": c["challenge_id"], "signature": b64(sig)}, auth=False)
        self.token = result["token"]
        return result  # type: ignore[no-any-return]

    async def logout(self) -> None:
        await self.call("POST", "/v1/auth/logout", {})
        self.token = None

    async def me(self) -> dict[str, Any]:
        return await self.call("GET", "/v1/me")  # type: ignore[no-any-return]

    async def list_vms(self) -> list[dict[str, Any]]:
        return (await self.call("GET", "/v1/vms"))["vms"]  # type: ignore[no-any-return]

    async def get_vm(self, vm_id: str) -> dict[str, Any]:
        return await self.call("GET", "/v1/vms/" + _segment(vm_id))  # type: ignore

    async def ticket(self, vm_id: str) -> dict[str, Any]:
        """``{"ticket", "expires", "proxy_url", "vm_public_key"}`` for the proxy."""
        return await self.call("POST", f"/v1/vms/{_segment(vm_id)}/ticket", {})  # type: ignore

    async def enroll(self, token: str, vm_public_key: str,
                     tls_fingerprint: str) -> dict[str, Any]:
        return await self.call("POST", "/v1/enroll", {  # type: ignore[no-any-return]
            "token": token, "vm_public_key": vm_public_key,
            "tls_fingerprint": tls_fingerprint}, auth=False)

    # superadmin
    async def list_users(self) -> list[dict[str, Any]]:
        return (await self.call("GET", "/v1/users"))["users"]  # type: ignore[no-any-return]

    async def create_user(self, name: str, public_key: str,
                          role: str = "user") -> dict[str, Any]:
        return await self.call("POST", "/v1/users", {  # type: ignore[no-any-return]
            "name": name, "public_key": public_key, "role": role})

    async def disable_user(self, name: str) -> dict[str, Any]:
        return await self.call("POST", f"/v1/users/{_segment(name)}/disable", {})  # type: ignore

    async def create_vm(self, name: str, owner: str, host: str) -> dict[str, Any]:
        """``{"vm": VM, "enrollment_token", "enrollment_expires"}``."""
        return await self.call("POST", "/v1/vms", {  # type: ignore[no-any-return]
            "name": name, "owner": owner, "host": host})


def _segment(value: str) -> str:
    return quote(value, safe="")


def _transport_error(url: str, e: Exception) -> RestError:
    reasons = getattr(e, "reasons", None)
    inner = reasons[0].value if reasons else e
    text = str(inner) or type(inner).__name__
    if "SSL" in type(inner).__module__ + type(inner).__name__ or "certificate" in text.lower():
        return RestError(0, "tls-error", f"TLS with {url} failed: {text}")
    if isinstance(inner, error.ConnectError | error.DNSLookupError):
        return RestError(0, "unreachable", f"cannot connect to {url}: {text}")
    return RestError(0, "unreachable", f"request to {url} failed: {text}")


def client_from_config(reactor: Any, cfg: Config, token: str | None = None) -> RestClient:
    return RestClient(reactor, cfg.client.rest_url, cfg.client.ca_file, token)


def authenticated_client(reactor: Any, cfg: Config) -> RestClient:
    """A RestClient carrying the stored session of ``cfg``;
    :class:`~ticrypt.frontend.clientconfig.SessionError` if not logged in."""
    session = clientconfig.load_session(cfg, now=reactor.seconds())
    return client_from_config(reactor, cfg, session.token)
