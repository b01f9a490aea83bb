"""connect's side of the browser page (PROTOCOL.md §7 "The page"): its files
and their headers, Host/Origin, one-time links and page tokens (in memory,
on a task.Clock); the REST relay against rest over real sockets on
127.0.0.1 (twistd, and a scripted stand-in for statuses rest gives only
under load); the websocket relay against the in-memory proxy and vmc
(test/memtrio.py); ``ticrypt open --print``."""

from __future__ import annotations

import json
import os
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource

from test import wsframes as wf
from test.daemon import daemon_env, run_command, runner, script_path, starter
from test.memtrio import MemTrio
from test.test_connect import OWN, PORT, TOKEN, Env, http
from ticrypt import closecodes as cc
from ticrypt import identity, signed
from ticrypt.audit import AuditLog
from ticrypt.channel import Delivered, Established, SendMessage, UserChannel, app
from ticrypt.channel.errors import MESSAGES
from ticrypt.connect.api import Admission, ConnectResource, connect_site
from ticrypt.connect.page import CSP, VENDOR, PageFiles, PageRoot, PageTokens
from ticrypt.connect.restrelay import RestRelay
from ticrypt.connect.wsrelay import (
    BEARER,
    BUFFER,
    SUBPROTOCOL,
    PageRelayFactory,
    RelayResource,
    RelaySettings,
)
from ticrypt.encoding import b64
from ticrypt.framebudget import PEER_REASON, REASON, FrameLimits
from ticrypt.http.client import JsonClient
from ticrypt.http.server import LimitedFactory
from ticrypt.lab.deploy import Addresses, Deployment, free_port

ORIGIN = f"http://{OWN}"


def request(method: str, path: str, *, token: str | None = None, **kw: Any) -> bytes:
    """An HTTP/1.1 request (no token unless given)."""
    return http(method, path, token=token, **kw)


def parse(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {n.lower(): v for n, v in (line.split(b": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, rest[:int(headers.get(b"content-length", b"0"))]


def web_dir(base: str, vendor: bool = True) -> str:
    """A page folder: index.html, app.css, js/main.js and (``vendor``) the
    node_modules files, each naming itself; a secret beside them."""
    d = os.path.join(base, "web")
    os.makedirs(os.path.join(d, "js"))
    files = {"index.html": "<!doctype html>", "app.css": "body{}", "js/main.js": "//main",
             "package.json": "{}", "secret.txt": "s3cret"}
    if vendor:
        files.update({f"node_modules/{rel}": f"/*{name}*/" for name, rel in VENDOR.items()})
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(d, rel)), exist_ok=True)
        with open(os.path.join(d, rel), "w") as f:
            f.write(text)
    return d


class Page:
    """connect's site in memory, with a page (or ``enabled=False``)."""

    def __init__(self, tc: SynchronousTestCase, enabled: bool = True, vendor: bool = True):
        self.env = Env(tc)
        self.clock = self.env.clock
        self.tokens = PageTokens(self.clock, link_ttl=600, session_ttl=3600)
        self.api = ConnectResource(
            token=lambda: TOKEN, address=lambda: ("127.0.0.1", PORT), certs=self.env.certs,
            table=self.env.table, make_tunnel=self.env.tunnel, audit=self.env.audit,
            page=self.tokens if enabled else None)
        adm = self.api.admission
        files = PageFiles(web_dir(self.env.dir, vendor), lambda r: adm.site_problem(
            (r.getHeader(b"host") or b"").decode(), (r.getHeader(b"origin") or b"").decode()
            or None), enabled=enabled)
        rest = RestRelay(admission=adm, client=None, rest_url=None)
        self.root = PageRoot(self.api, files, resource.NoResource(), rest)
        self.site = connect_site(self.root, reactor=self.clock, max_body=65536,
                                 idle_timeout=60, request_timeout=30)

    def raw(self, data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        addr = IPv4Address("TCP", "127.0.0.1", 50123)
        proto = self.site.buildProtocol(addr)
        t = StringTransport(peerAddress=addr)
        proto.makeConnection(t)
        proto.dataReceived(data)
        return parse(t.value())

    def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        status, _, body = self.raw(request(method, path, **kw))
        return status, json.loads(body) if body else None

    def code(self, method: str, path: str, **kw: Any) -> tuple[int, str]:
        status, body = self.call(method, path, **kw)
        return status, body["error"]["code"]

    def link(self) -> str:
        status, body = self.call("POST", "/v1/page/link", token=TOKEN)
        assert status == 201, body
        url: str = body["url"]
        assert url.startswith(f"http://{OWN}/#link="), url
        return url.split("#link=", 1)[1]

    def page_token(self) -> str:
        status, body = self.call("POST", "/v1/page/session", origin=ORIGIN,
                                 body={"link": self.link()})
        assert status == 201, body
        return str(body["token"])


class StaticTests(SynchronousTestCase):
    """Exactly the page's files, with the security headers on every answer."""

    def setUp(self) -> None:
        self.page = Page(self)

    def get(self, path: str, method: str = "GET", **kw: Any) -> tuple[int, dict[bytes, bytes],
                                                                      bytes]:
        return self.page.raw(request(method, path, **kw))

    def assert_page_headers(self, headers: dict[bytes, bytes], path: str) -> None:
        self.assertEqual(headers.get(b"content-security-policy"), CSP.encode(), path)
        self.assertEqual(headers.get(b"x-content-type-options"), b"nosniff", path)
        self.assertEqual(headers.get(b"referrer-policy"), b"no-referrer", path)
        self.assertEqual(headers.get(b"cache-control"), b"no-store", path)
        self.assertEqual(headers.get(b"x-frame-options"), b"DENY", path)

    def test_files_and_types(self) -> None:
        served = {"/": (b"text/html; charset=utf-8", b"<!doctype html>"),
                  "/app/index.html": (b"text/html; charset=utf-8", b"<!doctype html>"),
                  "/app/app.css": (b"text/css; charset=utf-8", b"body{}"),
                  "/app/js/main.js": (b"text/javascript; charset=utf-8", b"//main")}
        for name in VENDOR:
            kind = b"text/css" if name.endswith(".css") else b"text/javascript"
            served[f"/vendor/{name}"] = (kind + b"; charset=utf-8", f"/*{name}*/".encode())
        for path, (ctype, body) in served.items():
            status, headers, got = self.get(path)
            self.assertEqual((status, headers[b"content-type"], got), (200, ctype, body), path)
            self.assert_page_headers(headers, path)
        status, headers, got = self.get("/app/app.css", "HEAD")
        self.assertEqual((status, got), (200, b""))
        self.assert_page_headers(headers, "HEAD")
        self.assertEqual(CSP, "default-src 'none'; script-src 'self'; style-src 'self'; "
                              "connect-src 'self'; img-src 'self' data:; font-src 'self'; "
                              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

    def test_channel_error_table(self) -> None:
        """The secure channel's error table, from Python (its one home), as
        the JSON module channelerror.js imports."""
        status, headers, body = self.get("/app/js/channelerrors.json")
        self.assertEqual((status, headers[b"content-type"]), (200, b"application/json"))
        self.assertEqual(json.loads(body), MESSAGES)
        self.assert_page_headers(headers, "channelerrors.json")
        self.assertEqual(self.get("/app/js/channelerrors.json", "POST")[0], 405)
        self.assertEqual(self.get("/app/js/channelerrors.json", host="evil.example:7480")[0], 403)

    def test_close_code_table(self) -> None:
        """The close codes and the explanations of reason names, from
        Python (their one home, ticrypt.closecodes), as the JSON module
        closes.js imports."""
        status, headers, body = self.get("/app/js/closecodes.json")
        self.assertEqual((status, headers[b"content-type"]), (200, b"application/json"))
        self.assertEqual(json.loads(body), {
            "codes": {str(c.code): [c.name, c.human] for c in cc.ALL},
            "reasons": cc.REASON_HUMAN})
        self.assertEqual(len(json.loads(body)["codes"]), len(cc.BY_CODE))  # no code twice
        self.assert_page_headers(headers, "closecodes.json")
        status, _, body = self.get("/app/js/closecodes.json", "HEAD")
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(self.get("/app/js/closecodes.json", "POST")[0], 405)
        self.assertEqual(self.get("/app/js/closecodes.json", host="evil.example:7480")[0], 403)

    def test_nothing_else_is_served(self) -> None:
        for path in ("/app/", "/app/js/", "/app/secret.txt", "/app/package.json",
                     "/app/../secret.txt", "/app/js/../../secret.txt", "/app/%2e%2e/secret.txt",
                     "/app/js/main.js/", "/app//app.css", "/app/js/sub/x.js", "/vendor/",
                     "/vendor/../package.json", "/vendor/xterm.js.map", "/app/node_modules/"
                     "@xterm/xterm/lib/xterm.js", "/favicon.ico", "/app/js/.js"):
            status, headers, body = self.get(path)
            self.assertEqual(status, 404, path)
            self.assertNotIn(b"s3cret", body)
            self.assert_page_headers(headers, path)

    def test_only_get_and_head(self) -> None:
        status, headers, _ = self.get("/app/app.css", "POST")
        self.assertEqual((status, headers[b"allow"]), (405, b"GET, HEAD"))
        self.assert_page_headers(headers, "POST")

    def test_host_and_origin(self) -> None:
        for kw in ({"host": "localhost:7480"}, {"host": "evil.example:7480"}, {"host": None},
                   {"origin": "http://evil.example"}, {"origin": "null"}):
            status, headers, body = self.get("/", **kw)
            self.assertEqual(status, 403, kw)
            self.assertNotIn(b"doctype", body)
            self.assert_page_headers(headers, str(kw))
        self.assertEqual(self.get("/app/js/main.js", origin=ORIGIN)[0], 200)

    def test_missing_node_modules(self) -> None:
        page = Page(self, vendor=False)
        status, _, body = page.raw(request("GET", "/vendor/xterm.js"))
        self.assertEqual((status, json.loads(body)["error"]["code"]), (404, "not-installed"))

    def test_page_off(self) -> None:
        page = Page(self, enabled=False)
        self.assertEqual(page.code("GET", "/"), (503, "page-disabled"))
        self.assertEqual(page.code("POST", "/v1/page/link", token=TOKEN), (503, "page-disabled"))
        self.assertEqual(page.code("GET", "/rest/v1/me", token=TOKEN), (503, "page-disabled"))
        self.assertEqual(page.call("GET", "/v1/tunnels", token=TOKEN), (200, {"tunnels": []}))


class PageTokenTests(SynchronousTestCase):
    """A link works once and expires; its page token opens connect's API
    (not /v1/page/link), until it expires."""

    def setUp(self) -> None:
        self.page = Page(self)

    def test_link_once(self) -> None:
        link = self.page.link()
        status, body = self.page.call("POST", "/v1/page/session", origin=ORIGIN,
                                      body={"link": link})
        self.assertEqual((status, sorted(body)), (201, ["expires", "token"]))
        self.assertEqual(body["expires"], int(self.page.clock.seconds()) + 3600)
        self.assertEqual(self.page.code("POST", "/v1/page/session", origin=ORIGIN,
                                        body={"link": link}), (401, "bad-link"))
        self.assertEqual(self.page.code("POST", "/v1/page/session", origin=ORIGIN,
                                        body={"link": "x" * 43}), (401, "bad-link"))
        lines = self.page.env.audit_lines()
        self.assertEqual([e["event"] for e in lines], ["page-session", "page-refused",
                                                       "page-refused"])
        self.assertNotIn(link, json.dumps(lines))
        self.assertNotIn(body["token"], json.dumps(lines))

    def test_link_expires(self) -> None:
        link = self.page.link()
        self.page.clock.advance(600)
        self.assertEqual(self.page.code("POST", "/v1/page/session", origin=ORIGIN,
                                        body={"link": link}), (401, "bad-link"))
        link = self.page.link()
        self.page.clock.advance(599)
        self.assertEqual(self.page.call("POST", "/v1/page/session", origin=ORIGIN,
                                        body={"link": link})[0], 201)

    def test_session_needs_own_origin(self) -> None:
        link = self.page.link()
        for origin in (None, "http://evil.example", "http://localhost:7480"):
            self.assertEqual(self.page.code("POST", "/v1/page/session", origin=origin,
                                            body={"link": link}), (403, "bad-origin"), origin)
        self.assertEqual(self.page.code("POST", "/v1/page/session", origin=ORIGIN,
                                        host="localhost:7480", body={"link": link}),
                         (403, "bad-host"))
        # the refusals did not use the link up
        self.assertEqual(self.page.call("POST", "/v1/page/session", origin=ORIGIN,
                                        body={"link": link})[0], 201)

    def test_page_token_opens_the_api(self) -> None:
        token = self.page.page_token()
        self.assertEqual(self.page.call("GET", "/v1/tunnels", token=token),
                         (200, {"tunnels": []}))
        self.assertEqual(self.page.call("POST", "/v1/certs", token=token,
                                        origin=ORIGIN)[0], 201)
        self.assertEqual(self.page.code("GET", "/v1/tunnels", token=token,
                                        origin="http://evil.example"), (403, "bad-origin"))
        # only the token_file token makes links
        self.assertEqual(self.page.code("POST", "/v1/page/link", token=token),
                         (401, "unauthorized"))
        self.page.clock.advance(3600)
        self.assertEqual(self.page.code("GET", "/v1/tunnels", token=token),
                         (401, "unauthorized"))

    def test_links_and_tokens_bounded(self) -> None:
        tokens = PageTokens(task.Clock(), link_ttl=60, session_ttl=60, max_links=3,
                            max_sessions=2)
        links = [tokens.new_link()[0] for _ in range(5)]
        self.assertIsNone(tokens.redeem(links[0]))
        got = [tokens.redeem(link) for link in links[2:]]
        self.assertTrue(all(got))
        self.assertEqual(len(tokens), 2)
        self.assertFalse(tokens.valid(got[0][0]))  # type: ignore[index]
        self.assertTrue(tokens.valid(got[2][0]))  # type: ignore[index]


# ---------------------------------------------------------------- the websocket relay

class PageSocket(WebSocketClientProtocol):
    """What the page does with its websocket: records what it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[bytes, bool]] = []
        self.opened = False
        self.closed: tuple[int | None, str | None] | None = None
        self.protocol_chosen: str | None = None

    def onConnect(self, response: Any) -> None:
        self.protocol_chosen = response.protocol

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.got.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (code, reason)


class RestsProxyUrl:
    """The proxy's URL as rest tells it (``error``: rest cannot tell it);
    counts the relays' asks and forgets."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.error: str | None = None
        self.asked = self.forgotten = 0

    async def get(self) -> str:
        self.asked += 1
        if self.error is not None:
            raise ValueError(self.error)
        return self.url

    def forget(self) -> None:
        self.forgotten += 1


class WsRelayTests(SynchronousTestCase):
    """The page's websocket through connect to the in-memory proxy and vmc."""

    def setUp(self) -> None:
        self.trio = MemTrio.build(self)
        r = self.trio.reactor
        self.audit_path = os.path.join(self.trio.deployment.dir, "connect-audit.log")
        audit = AuditLog(self.audit_path, r, role="connect")
        self.addCleanup(audit.close)
        self.tokens = PageTokens(r, link_ttl=600, session_ttl=3600)
        admission = Admission(token=lambda: TOKEN, address=lambda: ("127.0.0.1", PORT),
                              audit=audit, page=self.tokens)
        self.proxy_url = RestsProxyUrl(self.trio.proxy_url)
        self.factory = PageRelayFactory(
            reactor=r, clock=r, audit=audit, proxy_url=self.proxy_url,
            settings=RelaySettings(ca_file=self.trio.deployment.ca_file, max_relays=2,
                                   handshake_timeout=5.0, max_message=2 * 1024 * 1024))
        none = resource.NoResource()
        root = PageRoot(none, none, RelayResource(self.factory, admission), none)
        site = connect_site(root, reactor=r, max_body=65536, idle_timeout=60,
                            request_timeout=30)
        r.listenTCP(PORT, LimitedFactory(site, 64, 64), interface="127.0.0.1")
        link, _ = self.tokens.new_link()
        redeemed = self.tokens.redeem(link)
        assert redeemed is not None
        self.token = redeemed[0]

    def open(self, token: str | None = None, origin: str | None = ORIGIN,
             protocols: list[str] | None = None) -> PageSocket:
        factory = WebSocketClientFactory(
            url=f"ws://127.0.0.1:{PORT}/relay/v1/user", origin=origin, reactor=self.trio.reactor,
            protocols=protocols if protocols is not None
            else [SUBPROTOCOL, BEARER + (token or self.token)])
        factory.protocol = PageSocket
        factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
        got: list[PageSocket] = []
        connecting: Any = endpoints.TCP4ClientEndpoint(self.trio.reactor, "127.0.0.1",
                                                       PORT).connect(factory)
        connecting.addCallback(got.append)
        self.trio.pump()
        return got[0]

    def audit(self) -> list[dict[str, Any]]:
        with open(self.audit_path) as f:
            return [json.loads(line) for line in f]

    def pair(self, user: str = "owen", vm: str | None = None) -> PageSocket:
        page = self.open()
        self.assertTrue(page.opened)
        self.assertEqual(page.protocol_chosen, SUBPROTOCOL)
        ticket = self.trio.backend.ticket(vm or self.trio.vm_id, user=user,
                                          user_key=self.trio.keys[user])
        page.sendMessage(json.dumps({"type": "connect", "ticket": ticket}).encode())
        self.trio.pump()
        return page

    def test_channel_through_the_relay(self) -> None:
        page = self.pair()
        payload, binary = page.got.pop(0)
        self.assertEqual((json.loads(payload)["type"], binary), ("paired", False))
        vm_key = identity.public_bytes(self.trio.state.vm_key)
        ch = UserChannel(self.trio.keys["owen"], self.trio.vm_id, vm_key)

        def send(events: Any) -> bool:
            established = False
            for e in events:
                if isinstance(e, SendMessage):
                    data = e.data
                    page.sendMessage(data.encode() if isinstance(data, str) else data,
                                     isBinary=not isinstance(data, str))
                established = established or isinstance(e, Established)
            self.trio.pump()
            return established

        send(ch.start())
        established = False
        while page.got and not established:
            payload, binary = page.got.pop(0)
            established = send(ch.receive(payload if binary else payload.decode()))
        self.assertTrue(established)
        page.sendMessage(ch.seal(app.encode({"t": "req", "id": 1, "op": "info"})), True)
        self.trio.pump()
        [(record, binary)] = page.got
        self.assertTrue(binary)
        [delivered] = [e for e in ch.receive(record) if isinstance(e, Delivered)]
        header, _ = app.decode(delivered.plaintext)
        self.assertEqual((header["t"], header["id"]), ("ok", 1))
        self.assertEqual(header["vm"], self.trio.vm_id)
        page.sendClose(1000, "bye")
        self.trio.pump()
        events = [e["event"] for e in self.audit()]
        self.assertEqual(events, ["relay-open", "relay-closed"])
        closed = self.audit()[1]
        self.assertEqual((closed["code"], closed["ended_by"]), (1000, "page"))
        self.assertGreater(closed["bytes_up"], 0)
        self.assertNotIn(self.token, open(self.audit_path).read())
        # the proxy saw the page's close as the page sent it
        ends = [e for e in self.trio.proxy_audit() if e["event"] == "pair-end"]
        self.assertEqual((ends[0]["close_code"], ends[0]["close_reason"]), (1000, "bye"))

    def test_no_vm_close_reaches_the_page(self) -> None:
        page = self.pair(vm="vm-not-there")
        self.trio.advance(11)  # the proxy's user_wait_timeout
        self.assertEqual(page.closed and page.closed[0], 4004)
        self.assertIn("no-vm-available", str(page.closed))

    def test_not_authorized_close_reaches_the_page(self) -> None:
        page = self.pair(user="bob")
        self.assertEqual(json.loads(page.got.pop(0)[0])["type"], "paired")
        vm_key = identity.public_bytes(self.trio.state.vm_key)
        ch = UserChannel(self.trio.keys["bob"], self.trio.vm_id, vm_key)
        for e in ch.start():
            assert isinstance(e, SendMessage)
            page.sendMessage(e.data.encode() if isinstance(e.data, str) else e.data)
        self.trio.pump()
        while page.got and page.closed is None:
            payload, binary = page.got.pop(0)
            for event in ch.receive(payload if binary else payload.decode()):
                if isinstance(event, SendMessage):
                    data = event.data
                    page.sendMessage(data.encode() if isinstance(data, str) else data,
                                     isBinary=not isinstance(data, str))
            self.trio.pump()
        assert page.closed is not None
        self.assertEqual(page.closed[0], 4401)
        self.assertTrue(str(page.closed[1]).startswith("not-authorized"))

    def test_proxy_down(self) -> None:
        self.proxy_url.url = "wss://127.0.0.1:444"
        page = self.open()
        self.trio.advance(1)
        assert page.closed is not None
        self.assertEqual(page.closed[0], 4013)
        self.assertTrue(str(page.closed[1]).startswith("proxy-unreachable: "))
        self.assertEqual(self.proxy_url.forgotten, 1)  # the next relay asks rest again
        closed = self.audit()[-1]
        self.assertEqual((closed["event"], closed["code"], closed["ended_by"]),
                         ("relay-closed", 4013, "connect"))

    def test_rest_cannot_tell_the_proxy(self) -> None:
        self.proxy_url.error = "rest did not answer: unreachable"
        page = self.open()
        self.assertEqual(page.closed, (4013, "proxy-unreachable: rest did not answer: "
                                             "unreachable"))
        self.assertEqual(self.proxy_url.forgotten, 0)

    def test_oversize_refused(self) -> None:
        page = self.pair()
        page.got.clear()
        page.sendMessage(b"x" * (2 * 1024 * 1024 + 1), True)
        self.trio.pump()
        assert page.closed is not None
        self.assertEqual(page.closed[0], 1009)
        ends = [e for e in self.trio.proxy_audit() if e["event"] == "pair-end"]
        self.assertEqual(ends[0]["bytes_up"], 0)

    def test_refused_before_dialling(self) -> None:
        for kw in ({"token": "wrong"}, {"origin": None}, {"origin": "http://evil.example"},
                   {"protocols": [BEARER + self.token]}, {"protocols": [SUBPROTOCOL]}):
            page = self.open(**kw)  # type: ignore[arg-type]
            self.assertFalse(page.opened, kw)
        self.assertEqual(self.proxy_url.asked, 0)
        self.assertEqual([e["reason"] for e in self.audit()],
                         ["unauthorized", "bad-origin", "bad-origin", "bad-subprotocol",
                          "unauthorized"])

    def test_max_relays(self) -> None:
        a, b, c = self.open(), self.open(), self.open()
        self.assertEqual((a.closed, b.closed), (None, None))
        assert c.closed is not None
        self.assertEqual(c.closed[0], 4009)

    def test_backpressure_wiring(self) -> None:
        """Each side's transport holds a producer; a full send buffer on one
        side stops reading the other until it drained."""
        self.pair()
        [leg] = self.factory.relays
        assert leg.proxy is not None
        page_tcp: Any = leg.transport.transport  # type: ignore[union-attr]
        proxy_tcp: Any = leg.proxy.transport.transport  # type: ignore[union-attr]
        self.assertEqual((page_tcp.bufferSize, proxy_tcp.bufferSize), (BUFFER, BUFFER))
        calls: list[str] = []
        for name, t in (("page", page_tcp), ("proxy", proxy_tcp)):
            for verb in ("pause", "resume"):
                self.patch(t, f"{verb}Producing",
                           lambda n=name, v=verb: calls.append(f"{v} {n}"))
        page_tcp.producer.pauseProducing()     # the page's buffer is full
        page_tcp.producer.resumeProducing()
        proxy_tcp.producer.pauseProducing()    # the proxy's (through TLS)
        proxy_tcp.producer.resumeProducing()
        self.assertEqual(calls, ["pause proxy", "resume proxy", "pause page", "resume page"])

    def over_frame_limit(self, flood: bytes, listen: bool = True) -> PageSocket:
        """A paired page sends ``flood`` and then a message; both sides are
        closed 4009, audited; nothing after the frame over the limit is
        relayed.  ``listen=False``: the page reads nothing more."""
        page = self.pair()
        page.got.clear()
        [leg] = self.factory.relays
        page_tcp: Any = leg.transport.transport  # type: ignore[union-attr]
        up = leg.bytes_up
        if not listen:
            self.patch(page, "dataReceived", lambda data: None)
        assert page.transport is not None
        page.transport.write(flood + wf.frame(wf.TEXT, b"after the flood"))
        self.trio.pump()
        # connect dropped the page's connection without waiting for a close reply
        self.assertTrue(page_tcp.disconnected)
        self.assertIsNotNone(page.closed)
        self.assertEqual(self.factory.relays, set())
        closed = self.audit()[-1]
        self.assertEqual((closed["event"], closed["code"], closed["reason"], closed["ended_by"]),
                         ("relay-closed", 4009, REASON, "page"))
        self.assertEqual(closed["bytes_up"], up)
        ends = [e for e in self.trio.proxy_audit() if e["event"] == "pair-end"]
        self.assertEqual((ends[0]["close_code"], ends[0]["close_reason"]), (4009, PEER_REASON))
        self.assertEqual(page.got, [])
        return page

    def test_ping_flood(self) -> None:
        """More control frames than max_control_frames at once."""
        page = self.over_frame_limit(wf.frame(wf.PING) * 101)
        self.assertEqual(page.closed, (4009, "over-limit: too many websocket frames"))

    def test_fragment_flood(self) -> None:
        """A message in more fragments than max_message_frames."""
        page = self.over_frame_limit(b"".join(wf.fragments(wf.BINARY, [b"x"] * 1025)))
        self.assertEqual(page.closed, (4009, REASON))

    def test_over_frame_limit_page_not_reading(self) -> None:
        self.over_frame_limit(wf.frame(wf.PONG, b"") * 101, listen=False)

    def test_within_frame_limits(self) -> None:
        """Fragmented messages and pings under the limits are relayed; the
        control budget refills over time."""
        page = self.open()
        ticket = self.trio.backend.ticket(self.trio.vm_id, user="owen",
                                          user_key=self.trio.keys["owen"])
        text = json.dumps({"type": "connect", "ticket": ticket}).encode()
        assert page.transport is not None
        page.transport.write(b"".join(wf.fragments(wf.TEXT, [text[:9], b"", text[9:]])))
        self.trio.pump()
        self.assertEqual(json.loads(page.got.pop(0)[0])["type"], "paired")
        for pings in (90, 55):  # 145: only with the bucket refilled in between
            for _ in range(pings):
                page.sendPing()
            self.trio.pump()
            self.trio.advance(5)  # half control_frames_interval: 50 more
        self.assertIsNone(page.closed)
        page.sendClose(1000, "bye")
        self.trio.pump()
        closed = self.audit()[-1]
        self.assertEqual((closed["event"], closed["code"]), ("relay-closed", 1000))

    def test_frame_limits_from_config(self) -> None:
        """[page] holds the frame limits, defaults as the proxy's [limits]."""
        from ticrypt.config import load_config
        from ticrypt.connect.config import ConnectConfig
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "connect.ini")
        with open(path, "w") as f:
            f.write("[connect]\n[page]\nmax_control_frames = 5\ncontrol_frames_interval = 1m\n")
        frames = load_config(path, ConnectConfig).page.frames
        self.assertEqual(frames, FrameLimits(max_control_frames=5, control_frames_interval=60.0))
        self.assertEqual(RelaySettings(None, 1, 1.0, 1).frames, FrameLimits())

    def test_proxy_close_codes_passed_on(self) -> None:
        self.assertEqual(cc.passed_on(4004, "no-vm-available: x"), (4004, "no-vm-available: x"))
        self.assertEqual(cc.passed_on(1001, "going-away"), (1001, "going-away"))
        self.assertEqual(cc.passed_on(None, None), (1000, ""))
        self.assertEqual(cc.passed_on(1011, "boom")[0], 4010)


# ---------------------------------------------------------------- real daemons

class RealPageTests(TestCase):
    """twistd rest, proxy and connect on 127.0.0.1: the page URL of the
    readiness line, ``ticrypt open --print``, the REST relay."""

    async def start(self) -> None:
        dep = self.dep = Deployment(self.mktemp(), Addresses(rest_port=free_port()))
        dep.ca()
        dep.feed_secret()
        self.key, _ = dep.user_key("alice")
        dep.rest_ini(login_failures_per_user_and_address="1")
        await dep.init(runner(), "alice")
        _, self.rest = await dep.start_backend(starter(self))
        self.connect = await dep.start_connect(starter(self))
        self.port = dep.addresses.connect_port
        self.client_ini = dep.client_ini("alice")
        self.http = JsonClient(reactor, None, timeout=20)

    async def call(self, method: str, path: str, body: Any = None, *,
                   token: str | None = None, session: str | None = None,
                   origin: bool = True) -> tuple[int, Any, Any]:
        headers = {"Origin": f"http://127.0.0.1:{self.port}"} if origin else {}
        if token:
            headers["Authorization"] = "Bearer " + token
        if session:
            headers["X-Ticrypt-Session"] = session
        answer = await self.http.exchange(method, f"http://127.0.0.1:{self.port}{path}", body,
                                          headers)
        return answer.status, answer.json, answer

    async def page_token(self, url: str) -> str:
        status, body, _ = await self.call("POST", "/v1/page/session",
                                          {"link": url.split("#link=", 1)[1]})
        self.assertEqual(status, 201, body)
        return str(body["token"])

    async def test_page_url_open_and_rest_relay(self) -> None:
        await self.start()
        url = (self.connect.ready_info or {})["page_url"]
        self.assertTrue(url.startswith(f"http://127.0.0.1:{self.port}/#link="), url)
        token = await self.page_token(url)
        status, _, _ = await self.call("POST", "/v1/page/session",
                                       {"link": url.split("#link=", 1)[1]})
        self.assertEqual(status, 401)

        # ticrypt open --print: a fresh link, printed only
        env = {**daemon_env(), "TICRYPT_CLIENT_CONFIG": self.client_ini}
        code, out, err = await run_command([script_path("ticrypt"), "open", "--print"], env=env)
        self.assertEqual((code, err), (0, ""))
        [printed] = out.split()
        self.assertTrue(printed.startswith(f"http://127.0.0.1:{self.port}/#link="))
        await self.page_token(printed)

        # the page's REST calls, through connect, signing in as the page does
        status, backend, _ = await self.call("GET", "/rest/v1/backend", token=token)
        self.assertEqual((status, backend["proxy_url"]), (200, self.dep.addresses.proxy_url))
        status, c, _ = await self.call("POST", "/rest/v1/auth/challenge", {"user": "alice"},
                                       token=token)
        self.assertEqual(status, 200, c)
        sig = signed.sign(self.key, signed.LOGIN, {"challenge": c["challenge"],
                                                   "challenge_id": c["challenge_id"],
                                                   "user": "alice"})
        status, login, _ = await self.call("POST", "/rest/v1/auth/login", {
            "user": "alice", "challenge_id": c["challenge_id"], "signature": b64(sig)},
            token=token)
        self.assertEqual(status, 200, login)
        status, me, _ = await self.call("GET", "/rest/v1/me", token=token,
                                        session=login["token"])
        self.assertEqual((status, me["user"], me["role"]), (200, "alice", "superadmin"))
        # rest's own refusals pass unchanged
        status, body, _ = await self.call("GET", "/rest/v1/me", token=token)
        self.assertEqual(status, 401, body)
        self.assertIn("error", body)
        status, body, _ = await self.call("GET", "/rest/v1/me", token=token, session="bad")
        self.assertEqual(status, 401, body)
        # the page token is connect's, not rest's: without it nothing is relayed
        status, body, _ = await self.call("GET", "/rest/v1/backend")
        self.assertEqual((status, body["error"]["code"]), (401, "unauthorized"))
        for method, path in (("GET", "/rest/v1/revocations"), ("GET", "/rest/v1/allowlist/feed"),
                             ("POST", "/rest/v1/enroll"), ("GET", "/rest/v1/openapi.json"),
                             ("DELETE", "/rest/v1/vms/x"), ("GET", "/rest/v1/vms/..%2f..")):
            status, body, _ = await self.call(method, path, token=token)
            self.assertEqual((status, body["error"]["code"]), (404, "not-relayed"), path)
        # a failed login, then rest's 429 and Retry-After come through unchanged
        for expected in (401, 429):
            status, c, _ = await self.call("POST", "/rest/v1/auth/challenge",
                                           {"user": "alice"}, token=token)
            self.assertEqual(status, 200, c)
            status, body, answer = await self.call("POST", "/rest/v1/auth/login", {
                "user": "alice", "challenge_id": c["challenge_id"],
                "signature": b64(b"\0" * 64)}, token=token)
            self.assertEqual(status, expected, body)
        self.assertEqual(body["error"]["code"], "rate-limited")
        self.assertRegex(answer.header("Retry-After") or "", r"^[0-9]+$")

        # the websocket relay over real sockets: TLS to the proxy pinned to
        # the deployment's CA, a message relayed, the proxy's close passed on
        closed: defer.Deferred[tuple[int | None, str | None]] = defer.Deferred()

        class Page(PageSocket):
            def onOpen(self) -> None:
                self.sendMessage(b'{"type":"hello"}')

            def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
                closed.callback((code, reason))

        factory = WebSocketClientFactory(
            url=f"ws://127.0.0.1:{self.port}/relay/v1/user", reactor=reactor,
            origin=f"http://127.0.0.1:{self.port}", protocols=[SUBPROTOCOL, BEARER + token])
        factory.protocol = Page
        await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        ws_code, reason = await closed
        self.assertEqual(ws_code, 4000, reason)
        self.assertTrue(str(reason).startswith("bad-message"), reason)

        # rest down: 502
        await self.rest.stop()
        status, body, _ = await self.call("GET", "/rest/v1/backend", token=token)
        self.assertEqual((status, body["error"]["code"]), (502, "rest-unavailable"))
        await self.http.close()
