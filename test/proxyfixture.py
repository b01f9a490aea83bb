"""Reusable pieces for tests (and the lab) that talk to ticrypt-proxy.

* :class:`Backend`: a backend Ed25519 key written as ``backend.pub``, and the
  credentials it signs (VM credentials, connection tickets) via ticrypt.signed;
  no ticrypt-rest needed.
* :func:`write_proxy_config`: a proxy ini (plain tcp on 127.0.0.1 port 0 by
  default, status listener on) for in-process services or twistd.
* :class:`WsClient`: an autobahn client protocol that queues what it receives
  (``next()``), and exposes ``opened``/``closed`` deferreds.
* :func:`open_ws`, :func:`vm_connect` (does the challenge / vm-auth / waiting
  dance), :func:`user_connect` (sends ``connect`` with a ticket).
* :func:`start_proxy`: the proxy service in this process on a free port.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import deque
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorTCP
from twisted.trial.unittest import TestCase

from ticrypt import identity, signed, tlsutil
from ticrypt.config import load_config
from ticrypt.encoding import b64, unb64

_ids = itertools.count(1)


class Backend:
    """A backend signing key for tests; ``pub_path`` holds ``ed25519:...``."""

    def __init__(self, directory: str, key: Ed25519PrivateKey | None = None):
        self.key = key or identity.generate()
        self.public = identity.public_bytes(self.key)
        self.pub_path = os.path.join(os.path.abspath(directory), "backend.pub")
        identity.save_public(self.pub_path, self.key, "test backend")

    def vm_credential(self, vm_id: str, vm_key: Ed25519PrivateKey,
                      now: float | None = None) -> str:
        return signed.make_vm_credential(self.key, vm=vm_id,
                                         vm_key=identity.public_bytes(vm_key),
                                         now=_now() if now is None else now)

    def ticket(self, vm_id: str, user: str = "alice", user_key: Ed25519PrivateKey | None = None,
               client: str = "127.0.0.1", ttl: int = 300, now: float | None = None,
               session: str | None = None) -> str:
        user_key = user_key or identity.generate()
        return signed.make_ticket(self.key, user=user, user_key=identity.public_bytes(user_key),
                                  vm=vm_id, client=client, now=_now() if now is None else now,
                                  ttl=ttl, ticket_id=f"t{next(_ids)}",
                                  session=session or b64(os.urandom(signed.SID_BYTES)))

    def revocations(self, serial: int, users: dict[str, int] | None = None,
                    sessions: list[str] | None = None, now: float | None = None) -> str:
        """A signed revocation feed (what rest serves at GET /v1/revocations)."""
        return signed.make_revocation_feed(self.key, serial=serial,
                                           now=_now() if now is None else now,
                                           users=users or {}, sessions=sessions or [])


def _now() -> float:
    from twisted.internet import reactor
    return float(reactor.seconds())  # type: ignore[attr-defined]


def write_proxy_config(directory: str, backend: Backend, *,
                       listen: str = "tcp:0:interface=127.0.0.1",
                       status_listen: str = "tcp:0:interface=127.0.0.1",
                       allow_plain: bool | None = None, rest_url: str = "off",
                       feeds: dict[str, str] | None = None, **limits: Any) -> str:
    """Write ``proxy.ini`` into ``directory``; ``limits`` go to ``[limits]``
    verbatim (e.g. ``user_wait_timeout="1s"``), ``feeds`` to ``[proxy]``
    (``ca_file``, ``revocation_feed_secret``, ``revocation_poll_interval``).
    Returns its path."""
    directory = os.path.abspath(directory)
    if allow_plain is None:
        allow_plain = not listen.startswith("ssl:")
    lines = ["[proxy]", f"listen = {listen}", f"allow_plain = {'yes' if allow_plain else 'no'}",
             f"status_listen = {status_listen}", f"backend_public_key = {backend.pub_path}",
             f"audit_log = {os.path.join(directory, 'proxy-audit.log')}",
             f"ticket_ledger = {os.path.join(directory, 'proxy-tickets.ledger')}",
             f"rest_url = {rest_url}"]
    lines += [f"{k} = {v}" for k, v in (feeds or {}).items()]
    lines += ["", "[limits]"]
    lines += [f"{k} = {v}" for k, v in limits.items()]
    path = os.path.join(directory, "proxy.ini")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o644)
    return path


def make_tls(directory: str) -> tuple[str, str]:
    """A CA and a server PEM for 127.0.0.1: returns (ca_path, server_pem)."""
    ca, ca_key, pem = (os.path.join(directory, n) for n in ("ca.pem", "ca.key", "server.pem"))
    tlsutil.make_ca(ca, ca_key)
    tlsutil.make_server_cert(ca, ca_key, pem)
    return ca, pem


def read_audit(directory: str) -> list[dict[str, Any]]:
    path = os.path.join(directory, "proxy-audit.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class WsClient(WebSocketClientProtocol):
    """Queues received messages; ``next()`` returns a Deferred of
    ``(payload, is_binary)``; ``closed`` fires with ``(was_clean, code, reason)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inbox: deque[tuple[bytes, bool]] = deque()
        self.waiters: deque[defer.Deferred[tuple[bytes, bool]]] = deque()
        self.opened: defer.Deferred[WsClient] = defer.Deferred()
        self.closed: defer.Deferred[tuple[bool, int | None, str | None]] = defer.Deferred()
        self.close_info: tuple[bool, int | None, str | None] | None = None
        self.answer_pings = True
        self.received_bytes = 0

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received_bytes += len(payload)
        if self.waiters:
            self.waiters.popleft().callback((payload, isBinary))
        else:
            self.inbox.append((payload, isBinary))

    def onPing(self, payload: bytes) -> None:
        if self.answer_pings:
            super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        call = getattr(self, "closeHandshakeTimeoutCall", None)
        if call is not None:
            call.cancel()
            self.closeHandshakeTimeoutCall = None
        self.close_info = (wasClean, code, reason)
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"closed before open: {code} {reason}"))
        for d in self.waiters:
            d.errback(ConnectionError(f"closed: {code} {reason}"))
        self.waiters.clear()
        if not self.closed.called:
            self.closed.callback(self.close_info)

    def next(self) -> defer.Deferred[tuple[bytes, bool]]:
        if self.inbox:
            return defer.succeed(self.inbox.popleft())
        if self.close_info is not None:
            return defer.fail(ConnectionError(f"closed: {self.close_info}"))
        d: defer.Deferred[tuple[bytes, bool]] = defer.Deferred()
        self.waiters.append(d)
        return d

    async def next_json(self) -> dict[str, Any]:
        payload, is_binary = await self.next()
        assert not is_binary, "expected a text message"
        msg: dict[str, Any] = json.loads(payload)
        return msg

    def send_json(self, obj: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(obj).encode(), False)


def client_factory(url: str, reactor: Any, **options: Any) -> WebSocketClientFactory:
    factory = WebSocketClientFactory(url, reactor=reactor)
    factory.protocol = WsClient
    opts: dict[str, Any] = {"maxMessagePayloadSize": 0, "closeHandshakeTimeout": 5,
                            "openHandshakeTimeout": 10}
    opts.update(options)
    factory.setProtocolOptions(**opts)
    return factory


async def open_ws(reactor: IReactorTCP, port: int, path: str, ca: str | None = None,
                  host: str = "127.0.0.1", **options: Any) -> WsClient:
    """Open a websocket to the proxy at ``path``; TLS pinned to ``ca`` if given."""
    scheme = "wss" if ca else "ws"
    factory = client_factory(f"{scheme}://{host}:{port}{path}", reactor, **options)
    ep: Any = endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=10)
    if ca:
        ep = endpoints.wrapClientTLS(tlsutil.client_options(host, ca), ep)
    proto: WsClient = await ep.connect(factory)
    await proto.opened
    return proto


async def vm_connect(reactor: IReactorTCP, port: int, backend: Backend, vm_id: str,
                     vm_key: Ed25519PrivateKey | None = None, ca: str | None = None,
                     **options: Any) -> WsClient:
    """A VM socket that authenticated and received ``waiting``."""
    vm_key = vm_key or identity.generate()
    client = await open_ws(reactor, port, "/v1/vm", ca, **options)
    challenge = await client.next_json()
    assert challenge["type"] == "challenge", challenge
    send_vm_auth(client, backend.vm_credential(vm_id, vm_key), vm_key, vm_id,
                 challenge["nonce"])
    waiting = await client.next_json()
    assert waiting == {"type": "waiting"}, waiting
    return client


def send_vm_auth(client: WsClient, credential: str, vm_key: Ed25519PrivateKey, vm_id: str,
                 nonce: str) -> None:
    unb64(nonce, 32)
    sig = signed.sign(vm_key, signed.PROXY_VM_AUTH, {"nonce": nonce, "vm": vm_id})
    client.send_json({"type": "vm-auth", "credential": credential, "signature": b64(sig)})


async def user_connect(reactor: IReactorTCP, port: int, ticket: str, ca: str | None = None,
                       **options: Any) -> WsClient:
    """A user socket that sent ``connect``; the caller awaits ``paired``."""
    client = await open_ws(reactor, port, "/v1/user", ca, **options)
    client.send_json({"type": "connect", "ticket": ticket})
    return client


async def start_proxy(testcase: TestCase, config_path: str, reactor: Any = None) -> Any:
    """Run the proxy service in-process; returns the RoleService with
    ``.port`` and ``.status_port`` set.  Stopped in cleanup."""
    from ticrypt.proxy import tap

    if reactor is None:
        from twisted.internet import reactor as _r
        reactor = _r
    cfg = load_config(config_path, tap.SCHEMA)
    service: Any = tap.makeService({"cfg": cfg}, reactor=reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    listeners: dict[str, Any] = {s.label: s for s in service.listeners()}
    await defer.gatherResults([s.ready for s in listeners.values()])
    service.port = listeners["proxy"].port.getHost().port
    service.status_port = (listeners["status"].port.getHost().port
                           if "status" in listeners else None)
    service.factory = listeners["proxy"].factory
    return service


async def get_status(reactor: Any, port: int) -> dict[str, Any]:
    """GET /v1/status from the status listener."""
    from twisted.web.client import Agent, readBody

    agent = Agent(reactor)
    response = await agent.request(b"GET", f"http://127.0.0.1:{port}/v1/status".encode())
    body = await readBody(response)
    assert response.code == 200, (response.code, body)
    result: dict[str, Any] = json.loads(body)
    return result
