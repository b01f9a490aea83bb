"""Async client for ticrypt-rest over HTTPS that trusts only one CA file.

    client = RestClient(reactor, "https://rest:8443", "ca.pem")
    await client.login("alice", private_key)     # keeps the token
    vms = await client.list_vms()

A thin translation of rest's API over :class:`ticrypt.http.client.JsonClient`
(which pins the CA, bounds the answer to ``max_response`` bytes and gives
every call one deadline, ``timeout``).  Every failure is a
:class:`RestError` (``status`` 0 for transport failures: ``timeout``,
``unreachable``, ``tls-error``, ``bad-response``).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.web import client as webclient

from ticrypt import signed
from ticrypt.encoding import b64
from ticrypt.frontend import clientconfig
from ticrypt.frontend.clientconfig import ClientConfig
from ticrypt.http.client import MAX_RESPONSE, HttpError, JsonClient

TIMEOUT = 30.0


class RestError(Exception):
    """A failed REST call: HTTP ``status`` (0 if none), stable ``code``, human ``message``."""

    def __init__(self, status: int, code: str, message: str):
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{message} ({code})" if status == 0 else
                         f"{message} (HTTP {status} {code})")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class RestClient:
    """One rest server; ``token`` is the session used for bearer calls.

    ``pool`` shares an HTTP connection pool between clients (a benchmark).
    """

    def __init__(self, reactor: Any, rest_url: str, ca_file: str | None = None,
                 token: str | None = None, *, pool: webclient.HTTPConnectionPool | None = None,
                 timeout: float = TIMEOUT, max_response: int = MAX_RESPONSE):
        self.rest_url = rest_url.rstrip("/")
        self.token = token
        if self.rest_url.startswith("https:") and ca_file is None:
            raise ValueError("an https rest_url needs a CA file")
        self._http = JsonClient(reactor, ca_file, timeout=timeout, max_response=max_response,
                                pool=pool)

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None,
                   auth: bool = True) -> Any:
        """Send one request; return the decoded JSON (None for 204)."""
        headers = {}
        if auth:
            if self.token is None:
                raise RestError(0, "not-logged-in", "not logged in")
            headers["Authorization"] = "Bearer " + self.token
        try:
            status, obj = await self._http.request(method, self.rest_url + path, body, headers)
        except HttpError as e:
            if e.status >= 300:  # an error status without rest's error object
                raise RestError(e.status, "http-error",
                                f"HTTP {e.status} {_phrase(e.status)}".rstrip()) from None
            raise RestError(e.status, e.code, str(e)) from None
        if status == 204:
            return None
        if 200 <= status < 300:
            if obj is None:
                raise RestError(status, "bad-response", "response is not JSON")
            return obj
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and isinstance(err.get("code"), str):
            raise RestError(status, err["code"], str(err.get("message", "")))
        raise RestError(status, "http-error", f"HTTP {status} {_phrase(status)}".rstrip())

    async def _object(self, method: str, path: str, body: dict[str, Any] | None = None,
                      auth: bool = True) -> dict[str, Any]:
        """:meth:`call` for an answer that must be a JSON object."""
        answer = await self.call(method, path, body, auth)
        if not isinstance(answer, dict):
            raise RestError(0, "bad-response", f"{method} {path} did not answer an object")
        return answer

    async def _list(self, path: str, key: str) -> list[dict[str, Any]]:
        """The list ``key`` of the object a GET of ``path`` answers."""
        items = (await self._object("GET", path)).get(key)
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise RestError(0, "bad-response", f"GET {path} did not answer a list of {key}")
        return items

    # ------------------------------------------------------------ API

    async def backend(self) -> dict[str, Any]:
        return await self._object("GET", "/v1/backend", auth=False)

    async def challenge(self, user: str) -> dict[str, Any]:
        return await self._object("POST", "/v1/auth/challenge", {"user": user}, auth=False)

    async def login(self, user: str, private_key: Ed25519PrivateKey) -> dict[str, Any]:
        """Challenge, sign, log in; keep and return the session
        (``token``, ``expires``, ``user``, ``role``)."""
        c = await self.challenge(user)
        sig = signed.sign(private_key, signed.LOGIN, {
            "challenge": c["challenge"], "challenge_id": c["challenge_id"], "user": user})
        result = await self._object("POST", "/v1/auth/login", {
            "user": user, "challenge_id": c["challenge_id"], "signature": b64(sig)}, auth=False)
        self.token = result["token"]
        return result

    async def logout(self) -> None:
        await self.call("POST", "/v1/auth/logout", {})
        self.token = None

    async def me(self) -> dict[str, Any]:
        return await self._object("GET", "/v1/me")

    async def list_vms(self) -> list[dict[str, Any]]:
        return await self._list("/v1/vms", "vms")

    async def get_vm(self, vm_id: str) -> dict[str, Any]:
        return await self._object("GET", "/v1/vms/" + _segment(vm_id))

    async def ticket(self, vm_id: str) -> dict[str, Any]:
        """``{"ticket", "expires", "proxy_url", "vm_public_key"}`` for the proxy."""
        return await self._object("POST", f"/v1/vms/{_segment(vm_id)}/ticket", {})

    async def create_pathway(self, vm_id: str) -> dict[str, Any]:
        """A proxy lease to the VM from this machine's address: ``{"id", "vm",
        "proxy_host", "port", "allowed", "expires", "tls_fingerprint"}``."""
        answer = await self._object("POST", f"/v1/vms/{_segment(vm_id)}/pathways", {})
        pathway = answer.get("pathway")
        if not isinstance(pathway, dict):
            raise RestError(0, "bad-response", "rest answered the pathway request without "
                            "a pathway")
        return pathway

    async def list_pathways(self) -> list[dict[str, Any]]:
        return await self._list("/v1/pathways", "pathways")

    async def delete_pathway(self, pathway_id: str) -> None:
        await self.call("DELETE", f"/v1/pathways/{_segment(pathway_id)}")

    async def enroll(self, token: str, vm_public_key: str,
                     tls_fingerprint: str) -> dict[str, Any]:
        return await self._object("POST", "/v1/enroll", {
            "token": token, "vm_public_key": vm_public_key,
            "tls_fingerprint": tls_fingerprint}, auth=False)

    # superadmin
    async def list_users(self) -> list[dict[str, Any]]:
        return await self._list("/v1/users", "users")

    async def create_user(self, name: str, public_key: str,
                          role: str = "user") -> dict[str, Any]:
        return await self._object("POST", "/v1/users", {
            "name": name, "public_key": public_key, "role": role})

    async def disable_user(self, name: str) -> dict[str, Any]:
        return await self._object("POST", f"/v1/users/{_segment(name)}/disable", {})

    async def create_vm(self, name: str, owner: str, host: str) -> dict[str, Any]:
        """``{"vm": VM, "enrollment_token", "enrollment_expires"}``."""
        return await self._object("POST", "/v1/vms", {
            "name": name, "owner": owner, "host": host})

    async def list_allowlist(self) -> list[dict[str, Any]]:
        return await self._list("/v1/allowlist", "entries")

    async def add_allowlist(self, name: str, ports: list[int], protocol: str = "tcp",
                            comment: str = "") -> dict[str, Any]:
        """The new entry (ALLOW of PROTOCOL.md §1.1)."""
        answer = await self._object("POST", "/v1/allowlist", {
            "name": name, "ports": ports, "protocol": protocol, "comment": comment})
        entry = answer.get("entry")
        if not isinstance(entry, dict):
            raise RestError(0, "bad-response", "rest's answer has no entry")
        return entry

    async def remove_allowlist(self, entry_id: str) -> None:
        await self.call("DELETE", f"/v1/allowlist/{_segment(entry_id)}")


def _segment(value: str) -> str:
    return quote(value, safe="")


def client_from_config(reactor: Any, cfg: ClientConfig, token: str | None = None) -> RestClient:
    return RestClient(reactor, cfg.client.rest_url, cfg.client.ca_file, token)


def authenticated_client(reactor: Any, cfg: ClientConfig) -> RestClient:
    """A RestClient carrying the stored session of ``cfg``;
    :class:`~ticrypt.frontend.clientconfig.NotLoggedIn` if not logged in."""
    session = clientconfig.load_session(cfg, now=reactor.seconds())
    return client_from_config(reactor, cfg, session.token)
