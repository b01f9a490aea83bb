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
        web = site()
        port: IListeningPort = reactor.listenTCP(0, web, interface="127.0.0.1")  # type: ignore[arg-type]
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


class KeyFileTests(WebTestCase):
    """keyfile.js reads the key files of the Python reference
    (ticrypt.identity.save_private, what ``ticrypt keygen`` writes);
    signed.js signs what ticrypt.signed verifies; keystore.js keeps the
    non-extractable key across a reload until it is forgotten."""

    PURPOSE = "login-v1"
    PAYLOAD = {"challenge": "Y2hhbGxlbmdl", "challenge_id": "aWQ", "user": "ännä"}

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()

    def write_key(self, passphrase: bytes | None) -> tuple[str, bytes]:
        """A new key file from the reference: (PEM text, raw public key)."""
        from ticrypt import identity
        key = identity.generate()
        path = self.dir / f"key{len(list(self.dir.iterdir()))}"
        identity.save_private(str(path), key, passphrase)
        return path.read_text(), identity.public_bytes(key)

    def assert_usable(self, got: dict[str, Any], public: bytes) -> None:
        """The page has the right key, non-extractable, and its login-v1
        signature verifies with the reference."""
        from ticrypt import signed
        from ticrypt.encoding import b64, unb64
        self.assertNotIn("error", got)
        self.assertEqual(got["publicKey"], b64(public))
        self.assertEqual((got["extractable"], got["exportRefused"]), (False, True))
        self.assertEqual((got["algorithm"], got["usages"]), ("Ed25519", ["sign"]))
        self.assertTrue(signed.verify(public, self.PURPOSE, self.PAYLOAD,
                                      unb64(got["signature"], 64)))
        self.assertFalse(signed.verify(public, "connection-ticket-v1", self.PAYLOAD,
                                       unb64(got["signature"], 64)))

    async def key_file(self, pem: str, passphrase: str | None) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("keyFile", pem, passphrase, self.PURPOSE,
                                                 self.PAYLOAD)
        return result

    async def test_key_files_of_the_reference(self) -> None:
        """Plain and passphrase-protected (PBKDF2-SHA256, AES-256-CBC) files
        import; a wrong or missing passphrase is refused with its code."""
        from ticrypt import signed
        await self.open_page()
        pem, public = self.write_key(None)
        self.assert_usable(await self.key_file(pem, None), public)
        self.assert_usable(await self.key_file(pem, "ignored"), public)
        secret = "pässwörd ✓"
        pem, public = self.write_key(secret.encode())
        self.assertIn("ENCRYPTED PRIVATE KEY", pem)
        self.assert_usable(await self.key_file(pem, secret), public)
        for passphrase, code in [(None, "passphrase-needed"), ("", "passphrase-needed"),
                                 ("pässwörd", "bad-passphrase"),
                                 ("pa\u0308sswo\u0308rd ✓", "bad-passphrase")]:  # NFD: not normalised
            got = await self.key_file(pem, passphrase)
            self.assertEqual(got.get("error"), code, passphrase)
        self.assertEqual(await self.call("signingInputHex", self.PURPOSE, self.PAYLOAD),
                         signed.signing_input(self.PURPOSE, self.PAYLOAD).hex())

    async def test_other_encryptions_and_refusals(self) -> None:
        """PBES2 with the parameters OpenSSL can write (AES-128-CBC with
        HMAC-SHA1, AES-256-CBC with HMAC-SHA512, a PKCS#8 v2 key with its
        public key); other keys and files are refused with their code."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        from test.daemon import run_command
        await self.open_page()
        pem, public = self.write_key(None)
        plain = self.dir / "plain.pem"
        plain.write_text(pem)
        for cipher, prf in [("aes-128-cbc", "hmacWithSHA1"), ("aes-256-cbc", "hmacWithSHA512")]:
            status, out, err = await run_command(
                ["openssl", "pkcs8", "-topk8", "-in", str(plain), "-v2", cipher, "-v2prf", prf,
                 "-iter", "1000", "-passout", "pass:s3cret"])
            self.assertEqual(status, 0, err)
            self.assert_usable(await self.key_file(out, "s3cret"), public)
            self.assertEqual((await self.key_file(out, "s3cre")).get("error"), "bad-passphrase")
        ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()
        public_pem = (
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
            "-----END PUBLIC KEY-----\n")
        damaged = pem.replace(pem.splitlines()[1], pem.splitlines()[1][:-8] + "AAAAAAAA")
        cases = {
            "not-a-key": ["", "hello", public_pem, pem.replace("M", "!", 1),
                          "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n"],
            "unsupported": [ec_key, "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n"
                            "-----END OPENSSH PRIVATE KEY-----\n"],
        }
        for code, pems in cases.items():
            for text in pems:
                got = await self.key_file(text, None)
                self.assertEqual(got.get("error"), code, text)
                self.assertTrue(got["message"])
        # a seed changed inside a valid structure is just another key
        got = await self.key_file(damaged, None)
        self.assertNotEqual(got.get("publicKey"), public)

    async def test_keystore(self) -> None:
        """The key survives a reload as a non-extractable CryptoKey that
        still signs; forgetKey removes it."""
        await self.open_page()
        pem, public = self.write_key(b"x")
        got = await self.call("storeKey", pem, "x", "anna", self.PURPOSE, self.PAYLOAD)
        self.assertEqual(got.pop("user"), "anna")
        self.assert_usable(got, public)
        await self.browser.get(self.base + "/test/index.html")
        got = await self.call("storedKey", self.PURPOSE, self.PAYLOAD)
        self.assertEqual(got.pop("user"), "anna")
        self.assert_usable(got, public)
        self.assertIsNone(await self.call("forget"))
        await self.browser.get(self.base + "/test/index.html")
        self.assertIsNone(await self.call("storedKey", self.PURPOSE, self.PAYLOAD))
