"""RestClient is a thin translation over ticrypt.http.client.JsonClient:
what each kind of answer becomes for the CLI (RestError), against a small
HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from ticrypt.frontend.client import RestClient, RestError


class _Canned(resource.Resource):
    """Answers every path with the (status, body) given for it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.seen: list[tuple[bytes, bytes | None]] = []

    def render(self, request: Any) -> Any:
        self.seen.append((request.path, request.getHeader(b"authorization")))
        status, body = self.answers[request.path.decode()]
        if status == 0:
            return server.NOT_DONE_YET  # never answers
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return body


class _Site(server.Site):
    """Tracks its connections, so a test can wait until all are gone."""

    def __init__(self, root: resource.Resource) -> None:
        super().__init__(root)
        self.open: set[Any] = set()
        self.gone: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        assert proto is not None
        done: defer.Deferred[None] = defer.Deferred()
        self.gone.append(done)
        lost = proto.connectionLost

        def connection_lost(reason: Any) -> None:
            lost(reason)
            done.callback(None)

        proto.connectionLost = connection_lost  # type: ignore[method-assign]
        return proto


class RestClientTests(TestCase):
    def setUp(self) -> None:
        self.root = _Canned()
        self.site = _Site(self.root)
        port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{port.getHost().port}"

        async def stop() -> None:
            await port.stopListening()
            await defer.gatherResults(self.site.gone)

        self.addCleanup(lambda: defer.ensureDeferred(stop()))

    def client(self, token: str | None = "tok", **kw: Any) -> RestClient:
        return RestClient(reactor, self.url, token=token, **kw)

    def answer(self, path: str, status: int, body: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.root.answers[path] = (status, raw)

    async def error_of(self, call: Any) -> RestError:
        with self.assertRaises(RestError) as e:
            await call
        return e.exception

    async def test_answer_and_bearer(self) -> None:
        self.answer("/v1/me", 200, {"user": "alice", "role": "user"})
        self.assertEqual((await self.client().me())["user"], "alice")
        self.assertEqual(self.root.seen, [(b"/v1/me", b"Bearer tok")])

    async def test_rest_error_object(self) -> None:
        self.answer("/v1/me", 401, {"error": {"code": "session-expired", "message": "expired"}})
        e = await self.error_of(self.client().me())
        self.assertEqual((e.status, e.code, str(e)),
                         (401, "session-expired", "expired (HTTP 401 session-expired)"))

    async def test_error_status_without_json(self) -> None:
        self.answer("/v1/me", 502, b"<html>bad gateway</html>")
        e = await self.error_of(self.client().me())
        self.assertEqual((e.status, e.code, e.message), (502, "http-error", "HTTP 502 Bad Gateway"))

    async def test_success_without_an_object(self) -> None:
        self.answer("/v1/me", 200, [1, 2])
        self.assertEqual((await self.error_of(self.client().me())).code, "bad-response")
        self.answer("/v1/vms", 200, {"vms": "nope"})
        self.assertEqual((await self.error_of(self.client().list_vms())).code, "bad-response")
        self.answer("/v1/backend", 200, b"not json")
        e = await self.error_of(self.client().backend())
        self.assertEqual((e.status, e.code), (200, "bad-response"))

    async def test_answer_is_bounded(self) -> None:
        self.answer("/v1/me", 200, {"pad": "x" * 5000})
        e = await self.error_of(self.client(max_response=1000).me())
        self.assertEqual((e.status, e.code), (0, "bad-response"))

    async def test_deadline(self) -> None:
        self.root.answers["/v1/me"] = (0, b"")
        e = await self.error_of(self.client(timeout=0.2).me())
        self.assertEqual((e.status, e.code), (0, "timeout"), str(e))
        self.assertIn("within 0.2s", str(e))

    async def test_not_logged_in_sends_nothing(self) -> None:
        e = await self.error_of(self.client(token=None).me())
        self.assertEqual((e.status, e.code), (0, "not-logged-in"))
        self.assertEqual(self.root.seen, [])

    def test_https_needs_a_ca_file(self) -> None:
        self.assertRaises(ValueError, RestClient, reactor, "https://rest.example:8443")
