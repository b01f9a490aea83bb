"""The page's JavaScript crypto and session modules (ticrypt/connect/web/js/)
in headless Chromium: the secure channel's test vectors (PROTOCOL.md §4),
the strict encodings, key files written by the Python reference and
signatures the Python reference verifies.

The modules and the test-only page test/web/ are served in-process by
twisted.web.static on 127.0.0.1 with the page's Content-Security-Policy, so
nothing here runs unless it runs under that policy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.trial.unittest import TestCase
from twisted.web import resource, server, static
from twisted.web.iweb import IRequest

from test.browser import Browser, chromium_skip_reason, start_browser

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "ticrypt" / "connect" / "web"
VECTORS = ROOT / "test" / "vectors" / "channel-v1.json"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; font-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")


class _Strict(resource.Resource):
    """Wraps a resource tree and adds the page's security headers."""

    def __init__(self, inner: resource.Resource) -> None:
        super().__init__()
        self._inner = inner

    def getChildWithDefault(self, path: bytes, request: IRequest) -> resource.Resource:
        request.setHeader(b"content-security-policy", CSP.encode())
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-store")
        return self._inner.getChildWithDefault(path, request)


def _js(path: Path) -> static.File:
    f = static.File(str(path), defaultType="text/plain")
    f.contentTypes = {**f.contentTypes, ".js": "text/javascript", ".mjs": "text/javascript",
                      ".html": "text/html; charset=utf-8", ".json": "application/json"}
    return f


def site() -> server.Site:
    """/app/ the product's web folder, /test/ the test page, /vectors/ the vectors."""
    root = resource.Resource()
    root.putChild(b"app", _js(WEB))
    root.putChild(b"test", _js(ROOT / "test" / "web"))
    root.putChild(b"vectors", _js(VECTORS.parent))
    return server.Site(_Strict(root))


CALL = """
const [name, args] = [arguments[0], arguments[1]];
const done = arguments[arguments.length - 1];
(async () => {
  for (let i = 0; i < 200 && !window.ticryptTests; i++) await new Promise((r) => setTimeout(r, 25));
  return window.ticryptTests[name](...args);
})().then((value) => done({value}), (e) => done({error: String(e && e.stack || e)}));
"""


class WebTestCase(TestCase):
    """A browser on the test page, served in-process."""

    skip = chromium_skip_reason()
    browser: Browser
    base: str

    async def open_page(self) -> None:
        port: IListeningPort = reactor.listenTCP(  # type: ignore[arg-type]
            0, site(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        self.browser = await start_browser(self, script_timeout=120)
        await self.browser.get(self.base + "/test/index.html")

    async def call(self, name: str, *args: Any) -> Any:
        """window.ticryptTests[name](...args) in the page; its value."""
        result = await self.browser.run_async(CALL, name, list(args))
        if "error" in result:
            self.fail(f"{name} failed in the page: {result['error']}")
        errors = await self.browser.logs()
        self.assertEqual(errors, [], "console errors in the page")
        return result["value"]


class ChannelVectorTests(WebTestCase):
    """test/vectors/channel-v1.json in the browser, as test/test_channel.py in Python."""

    def setUp(self) -> None:
        self.v: dict[str, Any] = json.loads(VECTORS.read_text())

    async def test_positive_vectors(self) -> None:
        """Messages, intermediates and records are reproduced exactly and
        every record opens at the other end."""
        await self.open_page()
        result = await self.call("positive")
        self.assertEqual(result["mismatches"], [])
        self.assertEqual(result["records"], 4)

    async def test_negative_vectors(self) -> None:
        """Every negative vector is refused with exactly its code, and the
        channel is dead after it."""
        await self.open_page()
        results = await self.call("negative")
        want = [{"name": e["name"], "got": e["error"]} for e in self.v["negative"]]
        self.assertEqual(len(results), 76)
        self.assertEqual(results, want)

    async def test_limits(self) -> None:
        """record-too-large and counter-exhausted at the sender and the
        receiver; misuse; records sealed and opened without waiting stay in order."""
        await self.open_page()
        out = await self.call("limits")
        self.assertEqual(out, {
            "sealTooLarge": "record-too-large",  # refused, nothing consumed
            "sealMaxAfter": "accepted",
            "sealMaxSeq": "0000000000000001",
            "receiveTooLarge": "record-too-large",
            "receiveAfter": "closed",
            "sealThird": "counter-exhausted",
            "sealAfterExhausted": "closed",
            "receiveThird": "counter-exhausted",
            "sealEarly": "wrong-state",
            "startTwice": "wrong-state",
            "ordered": "m0,m1,m2,m3,m4",
        })


class EncodingTests(WebTestCase):
    """b64.js and canon.js agree with ticrypt.encoding."""

    async def test_b64(self) -> None:
        from ticrypt.encoding import b64, unb64
        await self.open_page()
        cases: list[tuple[str, int | None]] = [
            ("", None), ("AA", None), ("AAA", None), ("AAAA", None), ("AB", None), ("AAB", None),
            ("A", None), ("AA==", None), ("AA=", None), ("A+", None), ("A/", None), ("_-8", None),
            ("-_8", None), ("AAAA AAAA", None), ("AAAA\n", None), ("é", None), ("AAAAAA", 4),
            ("AAAAAA", 3), ("YWJj", 3), ("YWJj", None), ("YW", 1), ("YX", 1), ("/w", None),
            ("_w", None), ("_x", None),
        ]
        for n in range(0, 40):
            text = b64(os.urandom(n))
            cases.append((text, n))
            cases.append((text, n + 1))
        want = []
        for text, length in cases:
            try:
                want.append(unb64(text, length).hex())
            except ValueError:
                want.append("error")
        self.assertEqual(await self.call("b64cases", cases), want)
        self.assertIn("error", want)
        blobs = [os.urandom(n).hex() for n in range(0, 70)]
        self.assertEqual(await self.call("b64encodes", blobs),
                         [b64(bytes.fromhex(h)) for h in blobs])

    async def test_canonical(self) -> None:
        from ticrypt.encoding import canonical
        await self.open_page()
        objects: list[Any] = [
            {}, [], {"b": 1, "a": [1, 2, {"d": None, "c": True}]}, {"k": "é\u2028\x7f\x00\n\"\\/"},
            {"\U0001f600": 1, "\uffff": 2, "z": 3, "A": 4, "10": 5, "9": 6},
            {"neg": -5, "big": 2**53 - 1, "f": False, "s": "tab\tcr\rbs\bff\f"},
            "only a string", 7,
        ]
        texts = [json.dumps(o, ensure_ascii=False, indent=1) for o in objects]
        self.assertEqual(await self.call("canonicals", texts),
                         [canonical(o).decode() for o in objects])
        good = canonical({"type": "hello", "v": 1, "vm": "vm-é"}).decode()
        bad = [
            good.replace(",", ", ", 1),  # whitespace
            '{"v":1,"type":"hello"}',  # key order
            good.replace('"type"', '"\\u0074ype"'),  # escaped ASCII
            good + "\n",  # trailing newline
            '{"a":1,"a":1}',  # duplicate key
            '{"v":1.0}',  # a float for an int
            '{"v":NaN}', "[1]", '"s"', "1", "null", "", "{", '{"a":"\\u00E9"}',  # upper-case hex
            '{"a":"é"}',  # raw non-ASCII
            '{"a":' + "[" * 40 + "]" * 40 + "}",  # canonical, but nested deeper than 32
            "{" + '"a":"' + "x" * 5000 + '"}',  # over 4096 characters
        ]
        got = await self.call("parses", [good, '{"a":[1,{"b":null}]}', *bad])
        self.assertEqual(got[:2], ["ok", "ok"])
        self.assertEqual(got[2:], ["bad-message"] * len(bad))
