"""The page's JavaScript crypto and session modules (ticrypt/connect/web/js/)
in headless Chromium: the secure channel's test vectors (PROTOCOL.md §4),
the strict encodings, key files written by the Python reference and
signatures the Python reference verifies.

The modules are served in-process on 127.0.0.1 by connect's own PageFiles
(with the channel's error table and the close codes it serves from Python),
the test-only page test/web/ by twisted.web.static, all with the page's
Content-Security-Policy, so nothing here runs unless it runs under that policy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.trial.unittest import TestCase
from twisted.web import resource, server, static
from twisted.web.iweb import IRequest

from test.browser import WINDOW, Browser, chromium_skip_reason, serve, start_browser
from ticrypt.channel import ChannelError, VmChannel, app
from ticrypt.channel.errors import MESSAGES
from ticrypt.connect.page import CSP, PageFiles
from ticrypt.ws import ChannelPump

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "ticrypt" / "connect" / "web"
VECTORS = ROOT / "test" / "vectors" / "channel-v1.json"

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


TOKEN = "page-token-for-tests"
TICKET = "a-ticket"
VM_ID = "vm-web-1"
VM_SEED = bytes(range(100, 132))
USER_SEED = bytes(range(1, 33))


class FakeVmc(WebSocketServerProtocol):
    """Plays connect's relay, the proxy's user leg and a small vmc (§3, §4,
    §5) for session.js: checks the subprotocols, answers ``connect`` with
    ``paired``, runs the VM end of the secure channel (Python reference),
    then serves ``info``, ``exec`` (``echo`` and ``cat``: stdin back, exit 7
    after eof), ``shell`` (a window of 8 bytes: stdin back as output,
    ``resize`` reported, ^D ends it) and ``close`` (closes with the code
    and reason asked for).  Before answering ``info`` it sends an
    unreadable message and one for an unknown id, which the page skips."""

    factory: FakeVmcFactory
    pump: ChannelPump | None = None

    def onConnect(self, request: Any) -> str:
        if request.protocols != ["ticrypt-relay-v1", "bearer." + TOKEN]:
            raise ConnectionDeny(401, "unauthorized")
        return "ticrypt-relay-v1"

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.pump is None:
            msg = json.loads(payload)
            if msg != {"type": "connect", "ticket": TICKET}:
                self.sendClose(4003, "ticket-refused: bad-token")
                return
            if self.factory.behaviour == "no-vm":
                self.sendClose(4004, "no-vm-available: no VM socket within 1s")
                return
            self.sendMessage(json.dumps({"type": "paired", "vm": VM_ID}).encode())
            vm_key = Ed25519PrivateKey.from_private_bytes(VM_SEED)
            user = Ed25519PrivateKey.from_private_bytes(USER_SEED).public_key().public_bytes_raw()
            self.pump = ChannelPump(VmChannel(vm_key, VM_ID, lambda k: k == user),
                                    send=self.sendMessage, on_established=lambda k: None,
                                    on_delivered=self.app_message, on_failed=self.failed)
            self.windows: dict[int, int] = {}
            return
        self.pump.feed(payload, isBinary)

    def failed(self, e: ChannelError) -> None:
        self.factory.failures.append(e.code)
        self.sendClose(4400, e.code)

    def send_app(self, header: dict[str, Any], body: bytes = b"") -> None:
        assert self.pump is not None
        self.pump.send_app(app.encode(header, body))

    def app_message(self, plaintext: bytes) -> None:
        header, body = app.decode(plaintext)
        self.factory.received.append({**header, "len": len(body)})
        t, rid = header["t"], header.get("id")
        if t == "req" and header["op"] == "info":
            assert self.pump is not None
            self.pump.send_app(b"no newline at all")
            self.send_app({"t": "stdout", "id": 999}, b"for nobody")
            self.send_app({"t": "ok", "id": rid, "vm": VM_ID, "hostname": "h",
                           "owner": "anna", "owner_user": True})
        elif t == "req" and header["op"] == "exec":
            argv = header["argv"]
            if argv[0] == "nope":
                self.send_app({"t": "error", "id": rid, "code": "command-not-found",
                               "message": "nope: not found\x1b[31m"})
                return
            self.send_app({"t": "ok", "id": rid, "window": 4})
            if argv[0] == "echo":
                self.send_app({"t": "stdout", "id": rid}, " ".join(argv[1:]).encode() + b"\n")
                self.send_app({"t": "stderr", "id": rid}, b"err")
                self.send_app({"t": "exit", "id": rid, "status": 0})
        elif t == "req" and header["op"] == "shell":
            self.send_app({"t": "ok", "id": rid, "window": 8})
            self.send_app({"t": "stdout", "id": rid},
                          f"{header['term']} {header['rows']}x{header['cols']}\n".encode())
        elif t == "req" and header["op"] == "close":
            self.sendClose(header["code"], header["reason"])
        elif t == "stdin":
            self.send_app({"t": "stdout", "id": rid}, body)
            self.send_app({"t": "window", "id": rid, "bytes": len(body)})
        elif t == "eof":
            self.send_app({"t": "window", "id": rid, "bytes": 1})
            self.send_app({"t": "exit", "id": rid, "status": 7})
        elif t == "resize":
            self.send_app({"t": "stdout", "id": rid},
                          f"resized {header['rows']}x{header['cols']}\n".encode())
        elif t == "cancel":
            self.send_app({"t": "exit", "id": rid, "status": 143})


class FakeVmcFactory(WebSocketServerFactory):
    """FakeVmc's settings and what it saw (headers with ``len`` of the body)."""

    protocol = FakeVmc  # type: ignore[assignment]

    def __init__(self, behaviour: str) -> None:
        super().__init__()
        self.behaviour = behaviour
        self.received: list[dict[str, Any]] = []
        self.failures: list[str] = []


def site(behaviour: str = "") -> tuple[server.Site, FakeVmcFactory]:
    """/app/ the product's page files (as connect serves them), /test/ the
    test page, /vectors/ the vectors, /relay/v1/user a FakeVmc."""
    root = resource.Resource()
    root.putChild(b"app", PageFiles(str(WEB), lambda request: None))
    root.putChild(b"test", _js(ROOT / "test" / "web"))
    root.putChild(b"vectors", _js(VECTORS.parent))
    factory = FakeVmcFactory(behaviour)
    relay = resource.Resource()
    v1 = resource.Resource()
    relay.putChild(b"v1", v1)
    v1.putChild(b"user", WebSocketResource(factory))
    root.putChild(b"relay", relay)
    return server.Site(_Strict(root)), factory


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
    relay: FakeVmcFactory

    async def open_page(self, behaviour: str = "") -> None:
        web, self.relay = site(behaviour)
        self.base = f"http://127.0.0.1:{serve(self, web)}"
        self.browser = await start_browser(self, script_timeout=120)
        await self.browser.get(self.base + "/test/index.html")

    async def call(self, name: str, *args: Any, allow: str = "\0") -> Any:
        """window.ticryptTests[name](...args) in the page; its value.  The
        page must log no error (but those containing ``allow``)."""
        result = await self.browser.run_async(CALL, name, list(args))
        if "error" in result:
            self.fail(f"{name} failed in the page: {result['error']}")
        errors = [e for e in await self.browser.logs() if allow not in e]
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

    async def test_error_codes_and_messages(self) -> None:
        """The page's ChannelError carries exactly the codes and fixed
        messages of ticrypt/channel/errors.py: the JSON module connect
        serves from that table loads under the page's CSP, and is the one
        channelerror.js uses."""
        await self.open_page()
        got = await self.call("channelMessages")
        self.assertEqual(got["table"], MESSAGES)
        self.assertEqual(got["errors"], [f"{code}: {text}" for code, text in MESSAGES.items()])

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


class SessionTests(WebTestCase):
    """session.js (§5 over §4 over the relay's websocket) against FakeVmc,
    whose VM end is the Python reference channel."""

    def cfg(self, **kw: Any) -> dict[str, Any]:
        vm_public = Ed25519PrivateKey.from_private_bytes(VM_SEED).public_key().public_bytes_raw()
        return {"token": TOKEN, "ticket": TICKET, "vmId": VM_ID, "vmKeyHex": vm_public.hex(),
                "userSeedHex": USER_SEED.hex(), **kw}

    async def test_session(self) -> None:
        """Requests, exec with output and exit status, stdin within the
        window, a refused exec, a shell with resize and ^D, cancel, and a
        close by the VM (4401) that ends the session with its human line."""
        await self.open_page()
        out = await self.call("sessionFlow", self.cfg())
        self.assertEqual(out["progress"], ["connecting", "waiting-for-vm", "handshake", "ready"])
        self.assertEqual(out["info"]["owner"], "anna")
        self.assertEqual((out["echoStatus"], out["echo"]), (0, ["hi there\n", "err"]))
        stdin = "hello world, in pieces"
        self.assertEqual((out["catStatus"], out["cat"], out["catSent"]), (7, stdin, len(stdin)))
        self.assertEqual(out["catPendingAtOnce"], len(stdin))  # nothing before the VM's ok
        self.assertEqual(out["nope"]["kind"], "RequestError")
        self.assertEqual(out["nope"]["code"], "command-not-found")
        self.assertNotIn("\x1b", out["nope"]["message"])
        self.assertEqual(out["shellStatus"], 7)
        self.assertIn("resized 40x120\n", out["shell"])
        self.assertEqual(out["shell"].replace("resized 40x120\n", ""),
                         "xterm-256color 30x100\n0123456789abcdefghij")
        self.assertEqual(out["cancelStatus"], 143)
        self.assertEqual(out["revoked"]["kind"], "SessionError")
        self.assertEqual((out["revoked"]["code"], out["revoked"]["closeCode"]),
                         ("not-authorized", 4401))
        [close] = out["closes"]
        self.assertEqual((close["name"], close["code"], close["byUs"]), ("not-authorized", 4401, False))
        self.assertIn("ask its owner", close["human"])
        self.assertEqual(close["text"], "access revoked??[2J")
        self.assertFalse(out["isOpen"])
        self.assertEqual(out["after"]["code"], "not-authorized")
        # stdin never beyond the window: 4 for the exec of cat, 8 for the shell
        windows = {h["id"]: {"exec": 4, "shell": 8}[h["op"]] for h in self.relay.received
                   if h["t"] == "req" and h["op"] in ("exec", "shell")}
        sent = [(h["id"], h["len"]) for h in self.relay.received if h["t"] == "stdin"]
        self.assertGreater(len(sent), 4)
        for rid, size in sent:
            self.assertLessEqual(size, windows[rid])
        self.assertEqual(self.relay.failures, [])
        ids = [h["id"] for h in self.relay.received if h["t"] == "req"]
        self.assertEqual(ids, list(range(1, len(ids) + 1)))

    async def test_close_by_the_page(self) -> None:
        """close() sends 1000 bye; onClose fires once, also for a late callback."""
        await self.open_page()
        out = await self.call("sessionClose", self.cfg())
        [close] = out["closes"]
        self.assertEqual((close["code"], close["name"], close["byUs"]), (1000, "bye", True))
        self.assertEqual(out["late"], out["closes"])
        self.assertEqual((out["after"]["kind"], out["after"]["code"]), ("SessionError", "closed"))

    async def test_failures(self) -> None:
        """A refused page token, no VM at the proxy, and a VM with another key
        (the page closes 4400 vm-key-mismatch): each with its code."""
        await self.open_page()
        got = await self.call("sessionFailure", self.cfg(token="wrong"),
                              allow="HTTP Authentication failed")
        self.assertEqual((got["kind"], got["code"]), ("SessionError", "relay-refused"))
        got = await self.call("sessionFailure", self.cfg(ticket="other"))
        self.assertEqual((got["code"], got["closeCode"]), ("ticket-refused", 4003))
        self.assertIn("bad-token", got["message"])
        self.assertEqual(got["progress"], ["connecting", "waiting-for-vm"])
        other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        got = await self.call("sessionFailure", self.cfg(vmKeyHex=other.hex()))
        self.assertEqual((got["code"], got["closeCode"]), ("vm-key-mismatch", 4400))
        self.assertEqual(got["progress"], ["connecting", "waiting-for-vm", "handshake"])

    async def test_no_vm(self) -> None:
        await self.open_page("no-vm")
        got = await self.call("sessionFailure", self.cfg())
        self.assertEqual((got["code"], got["closeCode"]), ("no-vm-available", 4004))
        self.assertIn("is it running", got["message"])


class CloseTests(WebTestCase):
    """closes.js names and explains closes as ticrypt.frontend.errors does."""

    async def test_describe_close(self) -> None:
        from ticrypt.frontend.errors import close_error
        await self.open_page()
        cases: list[tuple[int, str]] = [
            (4004, "no-vm-available: no VM socket within 30s"), (4003, "ticket-refused: expired"),
            (4400, "decrypt-failed"), (4400, "vm-key-mismatch"), (4400, "window-exceeded: 5 > 4"),
            (4401, "not-authorized: access revoked"), (4011, "revoked: the user was disabled"),
            (4013, "proxy-unreachable: connection refused"), (4008, "timeout: idle"),
            (4009, "over-limit: too many sessions on this VM"), (4010, "peer-lost"),
            (1000, "going-away: vmc stopping"), (4001, "vm-auth-failed"),
            (4401, "not-authorized: x\n\x1b[31mred\u202e"), (4400, "record-too-large"),
        ]
        got = await self.call("describeCloses", cases)
        for (code, reason), d in zip(cases, got, strict=True):
            want = close_error(code, reason)
            self.assertEqual((d["code"], d["name"]), (code, want.code), reason)
            self.assertEqual(d["line"], str(want), reason)
        self.assertEqual(got[13]["text"], "x??[31mred?")
        lost, bye, unknown = await self.call("describeCloses", [[1006, ""], [1000, "bye"],
                                                                 [4567, "strange: thing"]])
        self.assertEqual(lost["name"], "connection-lost")
        self.assertEqual((bye["name"], bye["human"]), ("bye", "the session ended"))
        self.assertEqual((unknown["name"], unknown["text"]), ("strange", "thing"))


    _TABLES = """
const done = arguments[arguments.length - 1];
(async () => {
  for (let i = 0; i < 200 && !window.ticryptTests; i++) await new Promise((r) => setTimeout(r, 25));
  const m = await import("/app/js/closes.js");  // the page's own instance (tests.js imports it)
  const frozen = [m.CLOSE_CODES, m.REASON_HUMAN, ...Object.values(m.CLOSE_CODES)].every(Object.isFrozen);
  return { codes: m.CLOSE_CODES, reasons: m.REASON_HUMAN, frozen };
})().then((value) => done({value}), (e) => done({error: String(e && e.stack || e)}));
"""

    async def test_close_codes_are_pythons(self) -> None:
        """The page's CLOSE_CODES and REASON_HUMAN are ticrypt.closecodes'
        ALL and REASON_HUMAN: the JSON module connect serves from them loads
        under the page's CSP and is what closes.js uses; and every close
        code, and every reason name under 4400 and 1000, reads in the page
        as ticrypt.frontend.errors reads it."""
        from ticrypt import closecodes as cc
        from ticrypt.frontend.errors import close_error
        await self.open_page()
        got = await self.browser.run_async(self._TABLES)
        self.assertNotIn("error", got)
        self.assertEqual(got["value"], {
            "codes": {str(c.code): [c.name, c.human] for c in cc.ALL},
            "reasons": cc.REASON_HUMAN, "frozen": True})
        explained = [*cc.REASON_HUMAN, *(c.name for c in cc.ALL)]
        # under 1000 a name neither table explains reads differently (the
        # page: "the session ended", Python: "connection closed (...)")
        cases: list[tuple[int, str]] = (
            [(c.code, "") for c in cc.ALL] + [(4400, n) for n in [*explained, *MESSAGES]]
            + [(1000, f"{n}: why") for n in explained])
        described = await self.call("describeCloses", cases)
        mismatches = []
        for (code, reason), d in zip(cases, described, strict=True):
            want = close_error(code, reason)
            if (d["name"], d["line"]) != (want.code, str(want)):
                mismatches.append((code, reason, d["line"], str(want)))
        self.assertEqual(mismatches, [])


class ListenerTests(WebTestCase):
    """listeners.js, the one set of callbacks behind onPageLost,
    onSessionLost and VmConn.listen."""

    async def test_add_remove_fire(self) -> None:
        """Callbacks hear fire() in the order added until removed; one added
        or removed by a callback counts from the next fire()."""
        await self.open_page()
        self.assertEqual(await self.call("listenerRounds"), ["a1", "b1", "b2", "c2", "b3"])


class BrowserResetTests(WebTestCase):
    """test/browser.py lends one browser to test after test: what a test
    leaves in it is gone for the next one."""

    _LEAVE = """
const done = arguments[arguments.length - 1];
localStorage.setItem("k", "v");
sessionStorage.setItem("k", "v");
document.cookie = "k=v; max-age=3600";
const req = indexedDB.open("left-behind", 1);
req.onupgradeneeded = () => req.result.createObjectStore("s");
req.onsuccess = () => { req.result.close(); done(true); };
req.onerror = () => done(String(req.error));
"""
    _STATE = """
const done = arguments[arguments.length - 1];
indexedDB.databases().then((dbs) => done({
  local: localStorage.length, session: sessionStorage.length, cookie: document.cookie,
  databases: dbs.map((d) => d.name)}));
"""

    async def test_reset_leaves_nothing(self) -> None:
        """Storages, cookies, other tabs, the window size and console
        messages of a test do not reach the next one."""
        await self.open_page()
        b = self.browser
        self.assertIs(await b.run_async(self._LEAVE), True)
        await b.get(self.base + "/test/index.html")
        left = {"local": 1, "session": 1, "cookie": "k=v", "databases": ["left-behind"]}
        self.assertEqual(await b.run_async(self._STATE), left)  # what reset must clear
        await b.run("console.error('left behind')")
        first = await b.call(lambda: b.driver.current_window_handle)
        await b.call(b.driver.switch_to.new_window, "tab")
        await b.call(b.driver.switch_to.window, first)  # the tab with a sessionStorage
        await b.call(b.driver.set_window_size, 700, 500)
        await b.reset()
        await b.get(self.base + "/test/index.html")
        self.assertEqual(await b.run_async(self._STATE),
                         {"local": 0, "session": 0, "cookie": "", "databases": []})
        self.assertEqual(len(await b.call(lambda: b.driver.window_handles)), 1)
        size = await b.call(b.driver.get_window_size)
        self.assertEqual((size["width"], size["height"]), WINDOW)
        self.assertEqual(await b.logs(), [])
