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

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource

from test.test_connect import OWN, PORT, TOKEN, Env, http
from ticrypt.connect.api import ConnectResource, connect_site
from ticrypt.connect.page import CSP, VENDOR, PageFiles, PageRoot, PageTokens
from ticrypt.connect.restrelay import RestRelay

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
