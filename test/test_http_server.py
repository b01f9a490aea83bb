"""The bounded JSON server (:mod:`ticrypt.http.server`) on its own, in memory:
a small API of its own through the real HTTP/1.1 parser on a StringTransport,
with a ``task.Clock`` as the reactor."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.test.requesthelper import DummyRequest

from ticrypt.http.server import (
    ApiError,
    Field,
    JsonResource,
    JsonSite,
    LimitedFactory,
    Result,
    Route,
    bearer_token,
    enabled,
    match,
    parse_body,
    route,
    routes_of,
)

ECHO_BODY = {"text": Field(str), "n": Field(int, required=False)}


class ExampleResource(JsonResource):
    """Echoes bodies, names path parameters, fails on request; refuses any
    request with an ``X-Refuse`` header before routing it.  Its handlers
    are its methods (the default :meth:`JsonResource.handle`)."""

    def __init__(self) -> None:
        super().__init__(ROUTES)
        self.handled: list[str] = []
        self.pending: defer.Deferred[Result] = defer.Deferred()

    def admit(self, request: server.Request) -> None:
        if request.getHeader(b"x-refuse") is not None:
            raise ApiError(403, "forbidden", "refused before routing")

    async def handle(self, request: server.Request, route: Route,
                     params: tuple[str, ...]) -> Result:
        self.handled.append(route.handler)
        return await super().handle(request, route, params)

    @route("POST", "/v1/echo")
    async def echo(self, body: bytes) -> Result:
        return 200, parse_body(body, ECHO_BODY)

    @route("GET", "/v1/items/{id}")
    @route("DELETE", "/v1/items/{id}")
    async def item(self, body: bytes, item_id: str) -> Result:
        return 200, {"id": item_id}

    @route("POST", "/v1/boom")
    async def boom(self, body: bytes) -> Result:
        raise RuntimeError("secret internals")

    @route("GET", "/v1/later")
    async def later(self, body: bytes) -> Result:
        return await self.pending


ROUTES = routes_of(ExampleResource)


def request(method: str, path: str, body: bytes = b"", head: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body and b"chunked" not in head else b""
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + head + length
            + b"\r\n" + body)


def answer(t: StringTransport) -> tuple[int, dict[bytes, bytes], Any]:
    """Status, headers (lower-case names) and decoded body of the first answer."""
    head, _, rest = t.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {name.lower(): value for name, value in
               (line.split(b": ", 1) for line in lines[1:])}
    body = rest[:int(headers.get(b"content-length", b"0"))]
    return int(lines[0].split()[1]), headers, json.loads(body) if body else None


class ServerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.resource = ExampleResource()
        self.site = JsonSite(self.resource, reactor=self.clock, max_body=1024,
                             idle_timeout=60, request_timeout=30)

    def connect(self, factory: Any = None, host: str = "10.0.0.1") -> tuple[Any, StringTransport]:
        addr = IPv4Address("TCP", host, 40000)
        proto = (self.site if factory is None else factory).buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        return proto, transport

    def send(self, data: bytes) -> StringTransport:
        proto, t = self.connect()
        proto.dataReceived(data)
        return t

    def error(self, t: StringTransport) -> tuple[int, str]:
        status, _, body = answer(t)
        return status, body["error"]["code"]


class BodyLimitTests(ServerTestCase):
    """``max_body`` is enforced while reading: nothing past it is kept."""

    def test_within_limit(self) -> None:
        body = json.dumps({"text": "a" * 1012}).encode()
        self.assertEqual(len(body), 1024)  # exactly max_body
        status, headers, obj = answer(self.send(request("POST", "/v1/echo", body)))
        self.assertEqual((status, obj), (200, {"text": "a" * 1012}))
        self.assertEqual((headers[b"content-type"], headers[b"cache-control"],
                          headers[b"x-content-type-options"]),
                         (b"application/json", b"no-store", b"nosniff"))

    def test_declared_too_large_is_413_and_never_handled(self) -> None:
        t = self.send(request("POST", "/v1/echo", b"a" * 1025))
        self.assertEqual(self.error(t), (413, "body-too-large"))
        self.assertEqual(self.resource.handled, [])

    def test_chunked_too_large_is_not_kept(self) -> None:
        chunk = b"200\r\n" + b"b" * 512 + b"\r\n"
        t = self.send(request("POST", "/v1/echo", chunk * 3 + b"0\r\n\r\n",
                              head=b"Transfer-Encoding: chunked\r\n"))
        self.assertEqual(self.error(t), (413, "body-too-large"))
        self.assertEqual(self.resource.handled, [])

    def test_far_too_large_is_answered_and_cut_off_before_the_body(self) -> None:
        t = self.send(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                      % (50 * 1024 * 1024) + b"c" * 4096)
        self.assertEqual(self.error(t), (413, "body-too-large"))
        self.assertTrue(t.disconnecting)

    def test_sending_past_the_drain_limit_is_cut_off(self) -> None:
        proto, t = self.connect()
        proto.dataReceived(request("POST", "/v1/echo", head=b"Transfer-Encoding: chunked\r\n"))
        chunk = b"10000\r\n" + b"d" * 0x10000 + b"\r\n"
        for _ in range(17):  # 1 MiB + 64 KiB: past max_body + DRAIN_LIMIT
            proto.dataReceived(chunk)
        self.assertEqual(self.error(t), (413, "body-too-large"))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.resource.handled, [])


class JsonErrorTests(ServerTestCase):
    """Every refusal is a JSON error with a stable code."""

    def test_malformed_json_is_400(self) -> None:
        t = self.send(request("POST", "/v1/echo", b'{"text": '))
        self.assertEqual(self.error(t), (400, "malformed-json"))

    def test_parse_body_codes(self) -> None:
        def code(raw: bytes) -> str:
            with self.assertRaises(ApiError) as e:
                parse_body(raw, ECHO_BODY)
            self.assertEqual(e.exception.status, 400)
            return e.exception.code

        self.assertEqual(code(b"{"), "malformed-json")
        self.assertEqual(code(b"\xff"), "malformed-json")
        self.assertEqual(code(b'"x"'), "invalid-body")
        self.assertEqual(code(b'{"text":"a","b":1}'), "unknown-field")
        self.assertEqual(code(b"{}"), "missing-field")
        self.assertEqual(code(b'{"text":true}'), "invalid-field")
        self.assertEqual(code(b'{"text":"a","n":true}'), "invalid-field")  # bool is no int
        self.assertEqual(parse_body(b'{"text":"a"}', ECHO_BODY), {"text": "a"})
        self.assertEqual(parse_body(b" ", {}), {})

    def test_unknown_route_is_404(self) -> None:
        self.assertEqual(self.error(self.send(request("GET", "/v1/nothing"))), (404, "not-found"))
        self.assertEqual(self.error(self.send(request("GET", "/v1/items/a/b"))),
                         (404, "not-found"))

    def test_wrong_method_is_405_with_allow(self) -> None:
        t = self.send(request("PUT", "/v1/items/7"))
        self.assertEqual(self.error(t), (405, "method-not-allowed"))
        self.assertEqual(answer(t)[1][b"allow"], b"DELETE, GET")

    def test_path_parameters_reach_the_handler(self) -> None:
        for method in ("GET", "DELETE"):
            _, _, obj = answer(self.send(request(method, "/v1/items/it-7")))
            self.assertEqual(obj, {"id": "it-7"})
        self.assertEqual(self.resource.handled, ["item", "item"])

    def test_admit_refuses_before_routing(self) -> None:
        t = self.send(request("GET", "/v1/nothing", head=b"X-Refuse: 1\r\n"))
        self.assertEqual(self.error(t), (403, "forbidden"))
        self.assertEqual(self.resource.handled, [])

    def test_unexpected_error_is_a_logged_json_500_without_details(self) -> None:
        t = self.send(request("POST", "/v1/boom", b"{}"))
        status, _, body = answer(t)
        self.assertEqual((status, body), (500, {"error": {"code": "internal-error",
                                                          "message": "internal error"}}))
        self.assertNotIn(b"secret internals", t.value())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_nothing_is_written_to_a_client_that_has_gone(self) -> None:
        proto, t = self.connect()
        proto.dataReceived(request("GET", "/v1/later"))
        proto.connectionLost(Failure(ConnectionDone()))
        self.resource.pending.callback((200, {"late": True}))
        self.assertEqual(t.value(), b"")

    def test_bearer_token(self) -> None:
        def token(value: bytes | None) -> str | None:
            r = DummyRequest([])
            if value is not None:
                r.requestHeaders.setRawHeaders(b"authorization", [value])
            return bearer_token(r)  # type: ignore[arg-type]

        self.assertEqual(token(b"Bearer abc "), "abc")
        self.assertEqual(token(b"bearer abc"), "abc")
        for bad in (None, b"Basic abc", b"Bearer ", b"abc"):
            self.assertIsNone(token(bad), bad)

    def test_enabled(self) -> None:
        on = object()
        self.assertIs(enabled(on, "x-disabled", "x is off"), on)
        self.assertEqual(enabled(0, "x-disabled", "x is off"), 0)  # only None is off
        with self.assertRaises(ApiError) as e:
            enabled(None, "x-disabled", "x is off: set x")
        self.assertEqual((e.exception.status, e.exception.code, e.exception.message),
                         (503, "x-disabled", "x is off: set x"))


class RouteDeclarationTests(SynchronousTestCase):
    """:func:`route` on handlers, collected by :func:`routes_of`."""

    def test_routes_in_the_order_written(self) -> None:
        self.assertEqual([(r.method, r.template, r.handler) for r in ROUTES], [
            ("POST", "/v1/echo", "echo"),
            ("GET", "/v1/items/{id}", "item"),
            ("DELETE", "/v1/items/{id}", "item"),
            ("POST", "/v1/boom", "boom"),
            ("GET", "/v1/later", "later")])

    def test_first_match_wins(self) -> None:
        """The order of the class is the order of matching: a literal
        route written before a parameter route of the same shape wins."""

        class Api:
            @route("GET", "/v1/things/all")
            def everything(self) -> None: ...

            @route("GET", "/v1/things/{id}")
            def thing(self) -> None: ...

        found, params = match(routes_of(Api), "GET", "/v1/things/all")
        self.assertEqual((found.handler, params), ("everything", ()))
        found, params = match(routes_of(Api), "GET", "/v1/things/t1")
        self.assertEqual((found.handler, params), ("thing", ("t1",)))

    def test_undecorated_methods_are_no_routes(self) -> None:
        class Api:
            def helper(self) -> None: ...

        self.assertEqual(routes_of(Api), ())

    def test_a_route_declared_on_two_handlers_fails(self) -> None:
        class Api:
            @route("GET", "/v1/vms/{id}")
            def get_vm(self) -> None: ...

            @route("GET", "/v1/vms/{vm}")  # the same path: never reached
            def vm(self) -> None: ...

        with self.assertRaises(ValueError) as e:
            routes_of(Api)
        self.assertEqual(str(e.exception), "Api: GET /v1/vms/{vm} is declared twice "
                         "(on get_vm and vm)")

    def test_a_handler_declaring_a_route_twice_fails(self) -> None:
        class Api:
            @route("GET", "/v1/me")
            @route("GET", "/v1/me")
            def me(self) -> None: ...

        with self.assertRaises(ValueError) as e:
            routes_of(Api)
        self.assertEqual(str(e.exception), "Api: GET /v1/me is declared twice (on me)")

    def test_one_path_with_two_methods_is_no_duplicate(self) -> None:
        class Api:
            @route("GET", "/v1/items/{id}")
            def get(self) -> None: ...

            @route("DELETE", "/v1/items/{id}")
            def delete(self) -> None: ...

        self.assertEqual([r.handler for r in routes_of(Api)], ["get", "delete"])


class SlowClientTests(ServerTestCase):
    """A request must arrive whole within ``request_timeout`` of its first byte."""

    def test_trickling_client_is_cut_off_despite_the_idle_timeout(self) -> None:
        proto, t = self.connect()
        head = request("POST", "/v1/echo")
        for i in range(3):  # one byte every 10s keeps the idle timeout away
            proto.dataReceived(head[i:i + 1])
            self.clock.advance(10)
        self.assertEqual(self.error(t), (408, "request-timeout"))
        self.assertIn(b"within 30s", t.value())
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.resource.handled, [])

    def test_request_timeout_does_not_cut_keep_alive_idle_time(self) -> None:
        proto, t = self.connect()
        echo = request("POST", "/v1/echo", b'{"text":"x"}')
        proto.dataReceived(echo[:10])
        self.clock.advance(29)
        proto.dataReceived(echo[10:])
        self.assertEqual(answer(t)[0], 200)
        self.clock.advance(50)  # idle between requests: only idle_timeout applies
        self.assertFalse(t.disconnecting)
        proto.dataReceived(echo)
        self.assertEqual(t.value().count(b"200 OK"), 2)
        self.clock.advance(61)
        self.assertTrue(t.disconnecting)  # the idle timeout still works


class LimitedFactoryTests(ServerTestCase):
    """Connections are capped in total and per client address."""

    def test_total_and_per_address(self) -> None:
        limited = LimitedFactory(self.site, max_total=3, per_address=2)
        a1, t1 = self.connect(limited, "10.0.0.1")
        self.connect(limited, "10.0.0.1")
        _, refused = self.connect(limited, "10.0.0.1")
        self.assertTrue(refused.disconnected)  # third from one address: aborted
        self.connect(limited, "10.0.0.2")
        _, refused = self.connect(limited, "10.0.0.3")
        self.assertTrue(refused.disconnected)  # fourth in total
        self.assertEqual((len(limited), limited.refused), (3, 2))
        a1.dataReceived(request("POST", "/v1/echo", b'{"text":"x"}'))
        self.assertEqual(answer(t1)[0], 200)  # admitted connections work
        a1.connectionLost(Failure(ConnectionDone()))
        _, t = self.connect(limited, "10.0.0.1")
        self.assertFalse(t.disconnecting)  # a slot is free again, for that address too
        self.assertEqual(len(limited), 3)
