"""Scripted peers of ticrypt-proxy, for the benchmarks and the integration
tests: a websocket client that queues what it receives, and the opening
moves of each side of the relay.

* :class:`WsClient`: an autobahn client protocol; ``next()`` /
  ``next_json()`` return what arrived, ``opened``/``closed`` are deferreds.
* :func:`open_ws`; :func:`vm_connect` (challenge, ``vm-auth`` with a
  credential the :class:`~ticrypt.lab.deploy.Backend` signed, ``waiting``);
  :func:`user_connect` (``connect`` with a ticket).
* :func:`get_status`: the proxy's ``GET /v1/status``.

Not a client for users: ``ticrypt.frontend`` and ``ticrypt.vmc`` are.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorTCP

from ticrypt import identity, signed, tlsutil
from ticrypt.encoding import b64, unb64
from ticrypt.lab.deploy import Backend
from ticrypt.wsfast import drop_close_timer


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
        drop_close_timer(self)
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


async def get_status(reactor: Any, port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    """GET /v1/status from the status listener."""
    from twisted.web.client import Agent, readBody

    agent = Agent(reactor)
    response = await agent.request(b"GET", f"http://{host}:{port}/v1/status".encode())
    body = await readBody(response)
    assert response.code == 200, (response.code, body)
    result: dict[str, Any] = json.loads(body)
    return result
