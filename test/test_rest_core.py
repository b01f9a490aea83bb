"""Unit tests of rest's sans-IO cores and web plumbing (no sockets, no threads)."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ticrypt import identity, signed
from ticrypt.audit import AuditLog
from ticrypt.config import ConfigError, load_config
from ticrypt.encoding import b64
from ticrypt.http.server import ApiError, match
from ticrypt.rest import db, store
from ticrypt.rest.api import ROUTES, ApiSettings, Call, RestApi
from ticrypt.rest.config import RestConfig
from ticrypt.rest.core import (
    ChallengeTable,
    session_id,
    token_hash,
    valid_host,
)
from ticrypt.rest.web import rest_site

FEED_SECRET = "s" * 40
SETTINGS = ApiSettings(session_ttl=100, challenge_ttl=30, ticket_ttl=60, enrollment_ttl=50,
                       login_window=60, login_failures_per_address=5,
                       login_failures_per_user_and_address=2, challenges_per_address=8)


class ChallengeTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.table = ChallengeTable(self.clock, ttl=60, per_address=3)

    def test_single_use_and_bound_to_user(self) -> None:
        c = self.table.issue("alice", "1.2.3.4")
        self.assertEqual(self.table.take(c.challenge_id, "alice"), c)
        self.assertIsNone(self.table.take(c.challenge_id, "alice"))
        c2 = self.table.issue("bob", "1.2.3.4")
        self.assertIsNone(self.table.take(c2.challenge_id, "alice"))
        self.assertIsNone(self.table.take(c2.challenge_id, "bob"))  # consumed by the try

    def test_expires(self) -> None:
        c = self.table.issue("alice", "a")
        self.clock.advance(60)
        self.assertIsNone(self.table.take(c.challenge_id, "alice"))

    def test_bounded_per_address_and_expired_entries_are_dropped(self) -> None:
        first = self.table.issue("alice", "a")
        for _ in range(3):
            self.table.issue("alice", "a")
        other = self.table.issue("alice", "b")
        self.assertEqual(len(self.table), 4)
        self.assertIsNone(self.table.take(first.challenge_id, "alice"))
        self.clock.advance(61)
        self.table.issue("alice", "c")
        self.assertEqual(len(self.table), 1)
        self.assertIsNone(self.table.take(other.challenge_id, "alice"))


    def test_purge_without_issuing(self) -> None:
        for address in ("a", "b", "c"):
            self.table.issue("alice", address)
        self.clock.advance(59)
        live = self.table.issue("alice", "d")
        self.clock.advance(1)
        self.table.purge()
        self.assertEqual(len(self.table), 1)
        self.assertEqual(self.table.take(live.challenge_id, "alice"), live)


class FieldAndRouteTests(SynchronousTestCase):
    """rest's own field checks and route table (decoding is test_http_server's)."""

    def test_hosts(self) -> None:
        for good in ("h:1", "10.0.0.5:2201", "[::1]:22", "a.b-c.d:65535"):
            self.assertTrue(valid_host(good), good)
        for bad in ("h", "h:0", "h:70000", "-h:22", "[zz]:22", "a b:22", ":22"):
            self.assertFalse(valid_host(bad), bad)

    def test_routes(self) -> None:
        route, params = match(ROUTES, "GET", "/v1/vms/vm-1")
        self.assertEqual((route.handler, params), ("get_vm", ("vm-1",)))
        with self.assertRaises(ApiError) as e:
            match(ROUTES, "PUT", "/v1/vms/vm-1")
        self.assertEqual((e.exception.status, e.exception.headers), (405, {"Allow": "GET"}))
        with self.assertRaises(ApiError) as e:
            match(ROUTES, "GET", "/v1/vms/a/b")
        self.assertEqual(e.exception.status, 404)


class SyncDb:
    """Runs each transaction at once on the calling thread (for unit tests)."""

    def __init__(self, path: str):
        self.conn = db.connect(path, create=True)

    def run(self, fn: Any, *args: Any, write: bool = True) -> defer.Deferred[Any]:
        return defer.maybeDeferred(db.transaction, self.conn, fn, *args, write=write)


def result(d: Any) -> Any:
    """The result of a coroutine that completes synchronously."""
    out = defer.ensureDeferred(d)
    box: list[Any] = []
    out.addBoth(box.append)
    assert box, "did not complete synchronously"
    if isinstance(box[0], Exception) or hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


class ApiTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.db = SyncDb(self.mktemp())
        self.addCleanup(self.db.conn.close)
        self.key = identity.generate()
        self.alice = identity.generate()
        db.transaction(self.db.conn, store.add_user, "alice", identity.public_bytes(self.alice),
                       "user", self.clock.seconds())
        self.audit_path = self.mktemp()
        self.audit = AuditLog(self.audit_path, self.clock, "rest")
        self.addCleanup(self.audit.close)
        self.api = RestApi(clock=self.clock, db=self.db, signing_key=self.key,
                           proxy_url="wss://p:1", audit=self.audit, settings=SETTINGS,
                           feed_secret=FEED_SECRET)

    def call(self, handler: str, body: dict[str, Any] | None = None, params: tuple[str, ...] = (),
             token: str | None = None, client: str = "10.0.0.9") -> Any:
        c = Call(method="", params=params, body=json.dumps(body or {}).encode(), client=client,
                 bearer=token)
        return result(getattr(self.api, handler)(c))

    def login(self, key: Any = None, purpose: str = signed.LOGIN,
              client: str = "10.0.0.9") -> Any:
        _, c = self.call("challenge", {"user": "alice"}, client=client)
        sig = signed.sign(key or self.alice, purpose, {
            "challenge": c["challenge"], "challenge_id": c["challenge_id"], "user": "alice"})
        return self.call("login", {"user": "alice", "challenge_id": c["challenge_id"],
                                   "signature": b64(sig)}, client=client)

    def test_session_lifetime(self) -> None:
        status, s = self.login()
        self.assertEqual((status, s["expires"]), (200, int(self.clock.seconds()) + 100))
        self.assertEqual(self.call("me", token=s["token"])[1]["user"], "alice")
        self.clock.advance(100)
        with self.assertRaises(ApiError) as e:
            self.call("me", token=s["token"])
        self.assertEqual(e.exception.code, "session-expired")

    def test_logout(self) -> None:
        with self.assertRaises(ApiError) as e:
            self.call("logout")
        self.assertEqual((e.exception.status, e.exception.code), (401, "missing-token"))
        _, s = self.login()
        self.assertEqual(self.call("logout", token=s["token"]), (204, None))
        with self.assertRaises(ApiError) as e:
            self.call("logout", token=s["token"])
        self.assertEqual(e.exception.code, "session-revoked")

    def test_lockout_is_per_user_and_address(self) -> None:
        """Bad logins for alice from one address lock alice out from that
        address only; they never lock alice out everywhere."""
        for _ in range(2):
            self.assertRaises(ApiError, self.login, purpose=signed.TICKET)
        with self.assertRaises(ApiError) as e:
            self.login()
        self.assertEqual(e.exception.code, "rate-limited")
        self.assertEqual(self.login(client="10.0.0.8")[0], 200)

    def test_lockout_per_address_counts_every_user_name(self) -> None:
        """Spraying names from one address hits the per-address limit."""
        for name in ("u1", "u2", "u3", "u4", "u5"):
            _, c = self.call("challenge", {"user": name})
            with self.assertRaises(ApiError) as e:
                self.call("login", {"user": name, "challenge_id": c["challenge_id"],
                                    "signature": b64(bytes(64))})
            self.assertEqual(e.exception.code, "login-failed")
        with self.assertRaises(ApiError) as e:
            self.login()
        self.assertEqual(e.exception.code, "rate-limited")
        self.assertEqual(self.login(client="10.0.0.8")[0], 200)

    def feed(self, token: str | None = FEED_SECRET) -> signed.RevocationFeed:
        status, body = self.call("revocations", token=token)
        self.assertEqual(status, 200)
        return signed.verify_revocation_feed(identity.public_bytes(self.key), body["feed"],
                                             now=self.clock.seconds(), max_age=60)

    def test_revocation_feed(self) -> None:
        feed = self.feed()
        self.assertEqual((feed.serial, feed.issued, feed.users, feed.sessions),
                         (0, int(self.clock.seconds()), {}, frozenset()))
        _, kept = self.login()
        _, ended = self.login()
        vm, token, _ = result(self.api.add_vm("lab", "alice", "h:22"))
        self.call("enroll", {"token": token, "vm_public_key": identity.public_text(
            identity.generate()), "tls_fingerprint": "sha256:" + "1" * 64})
        _, t = self.call("ticket", params=(vm.id,), token=ended["token"])
        ticket = signed.verify_ticket(identity.public_bytes(self.key), t["ticket"], vm=vm.id,
                                      client="10.0.0.9", now=self.clock.seconds())
        self.call("logout", token=ended["token"])
        self.clock.advance(5)
        feed = self.feed()
        # the ended session is listed by the id its tickets carry
        self.assertEqual((feed.serial, feed.users, feed.sessions),
                         (1, {}, {ticket.session}))
        self.assertNotEqual(ticket.session, session_id(token_hash(kept["token"])))
        disabled_at = self.clock.seconds()
        db.transaction(self.db.conn, store.disable_user, "alice", disabled_at)
        self.clock.advance(5)
        feed = self.feed()
        self.assertEqual((feed.serial, feed.users, feed.sessions),
                         (2, {"alice": int(disabled_at)}, frozenset()))
        db.transaction(self.db.conn, store.disable_user, "alice", self.clock.seconds())
        self.assertEqual(self.feed().users, {"alice": int(disabled_at)})  # since: the first

    def test_revocation_feed_needs_its_secret(self) -> None:
        for token in (None, "x" * 40, FEED_SECRET + "x"):
            with self.assertRaises(ApiError) as e:
                self.feed(token)
            self.assertEqual((e.exception.status, e.exception.code), (401, "invalid-token"))
        self.assertEqual([e for e in self.audit_events() if e[0] == "feed-refused"],
                         [("feed-refused", "missing-token")]
                         + [("feed-refused", "invalid-token")] * 2)
        for _ in range(2):
            with self.assertRaises(ApiError) as e:
                self.feed("y" * 40)
            self.assertEqual(e.exception.code, "invalid-token")
        with self.assertRaises(ApiError) as e:  # 5 per address, with failed logins
            self.feed()
        self.assertEqual(e.exception.code, "rate-limited")
        self.assertEqual(self.call("revocations", token=FEED_SECRET, client="10.0.0.8")[0],
                         200)
        self.api._feed_secret = None
        with self.assertRaises(ApiError) as e:
            self.feed()
        self.assertEqual((e.exception.status, e.exception.code), (404, "feed-disabled"))

    def test_pathways_off_is_503_without_a_session(self) -> None:
        # no proxy control API (proxy_control_url = off): answered before the session is looked at
        for handler, params in (("create_pathway", ("vm-1",)), ("list_pathways", ()),
                                ("delete_pathway", ("pw-1",))):
            with self.assertRaises(ApiError) as e:
                self.call(handler, params=params)
            self.assertEqual((e.exception.status, e.exception.code), (503, "pathways-disabled"))
            self.assertIn("proxy_control_url = off", e.exception.message)

    def test_wrong_purpose_then_rate_limited(self) -> None:
        for _ in range(2):
            with self.assertRaises(ApiError) as e:
                self.login(purpose=signed.TICKET)
            self.assertEqual(e.exception.code, "login-failed")
        with self.assertRaises(ApiError) as e:
            self.login()
        self.assertEqual((e.exception.code, e.exception.headers), ("rate-limited",
                                                                    {"Retry-After": "60"}))
        self.clock.advance(60)
        self.assertEqual(self.login()[0], 200)

    def audit_events(self) -> list[tuple[str, str | None]]:
        with open(self.audit_path) as f:
            return [(e["event"], e.get("reason")) for e in map(json.loads, f)]

    def test_rate_limited_logins_are_audited_once_per_lockout(self) -> None:
        for _ in range(2):
            self.assertRaises(ApiError, self.login, purpose=signed.TICKET)
        for _ in range(50):
            with self.assertRaises(ApiError) as e:
                self.login()
            self.assertEqual(e.exception.code, "rate-limited")
        self.assertEqual(self.audit_events(), [("login-failed", "bad-signature")] * 2
                         + [("login-failed", "rate-limited")])

    def test_failed_enrollments_are_rate_limited_per_address(self) -> None:
        queries: list[Any] = []
        run = self.db.run
        self.db.run = lambda fn, *a, **kw: (queries.append(fn), run(fn, *a, **kw))[1]
        body = {"vm_public_key": identity.public_text(identity.generate()),
                "tls_fingerprint": "sha256:" + "1" * 64}
        for _ in range(5):  # login_failures_per_address
            with self.assertRaises(ApiError) as e:
                self.call("enroll", dict(body, token=b64(os.urandom(32))))
            self.assertEqual(e.exception.code, "enrollment-token-invalid")
        self.assertEqual(len(queries), 5)
        for _ in range(100):
            with self.assertRaises(ApiError) as e:
                self.call("enroll", dict(body, token=b64(os.urandom(32))))
            self.assertEqual((e.exception.status, e.exception.code), (429, "rate-limited"))
            self.assertEqual(e.exception.headers, {"Retry-After": "60"})
        self.assertEqual(len(queries), 5)  # refused without touching the database
        self.assertEqual(self.audit_events(), [("enroll-failed", "enrollment-token-invalid")]
                         * 5 + [("enroll-failed", "rate-limited")])
        # Another address is not affected, and the lockout ends with the window.
        vm, token, _ = result(self.api.add_vm("lab", "alice", "h:22"))
        self.assertEqual(self.call("enroll", dict(body, token=token), client="10.0.0.8")[0],
                         200)
        self.clock.advance(60)
        with self.assertRaises(ApiError) as e:
            self.call("enroll", dict(body, token=b64(os.urandom(32))))
        self.assertEqual(e.exception.code, "enrollment-token-invalid")

    def test_enrollment_token_expiry_and_ticket(self) -> None:
        vm, token, expires = result(self.api.add_vm("lab", "alice", "h:22"))
        self.assertEqual(expires, int(self.clock.seconds()) + 50)
        vm_key = identity.public_text(identity.generate())
        body = {"token": token, "vm_public_key": vm_key, "tls_fingerprint": "sha256:" + "1" * 64}
        self.clock.advance(50)
        with self.assertRaises(ApiError) as e:
            self.call("enroll", body)
        self.assertEqual(e.exception.code, "enrollment-token-expired")
        vm2, token2, _ = result(self.api.add_vm("lab2", "alice", "h:22"))
        self.call("enroll", dict(body, token=token2))
        _, s = self.login()
        _, t = self.call("ticket", params=(vm2.id,), token=s["token"])
        ticket = signed.verify_ticket(identity.public_bytes(self.key), t["ticket"], vm=vm2.id,
                                      client="10.0.0.9", now=self.clock.seconds())
        self.assertEqual((ticket.user, ticket.expires), ("alice", int(self.clock.seconds()) + 60))
        with self.assertRaises(signed.TokenError):
            signed.verify_ticket(identity.public_bytes(self.key), t["ticket"], vm=vm2.id,
                                 client="10.0.0.8", now=self.clock.seconds())


class RestSiteTests(SynchronousTestCase):
    """rest on the bounded JSON server (whose bounds test_http_server checks):
    each route reaches the RestApi method it names as a Call, under rest's
    limits."""

    def setUp(self) -> None:
        self.calls: list[Call] = []
        calls = self.calls

        class FakeApi:
            async def get_vm(self, call: Call) -> Any:
                calls.append(call)
                return 200, {"ok": True}

        self.site = rest_site(FakeApi(), reactor=task.Clock(),  # type: ignore[arg-type]
                              max_body=16, idle_timeout=60, request_timeout=30)

    def send(self, data: bytes) -> bytes:
        proto = self.site.buildProtocol(None)
        t = StringTransport()
        proto.makeConnection(t)
        proto.dataReceived(data)
        return t.value()

    def test_a_call_per_route(self) -> None:
        out = self.send(b"GET /v1/vms/vm-1 HTTP/1.1\r\nHost: x\r\n"
                        b"Authorization: Bearer tok\r\nContent-Length: 2\r\n\r\n{}")
        self.assertIn(b"200 OK", out)
        self.assertEqual(self.calls, [Call(method="GET", params=("vm-1",), body=b"{}",
                                           client="192.168.1.1", bearer="tok")])

    def test_rest_limits(self) -> None:
        out = self.send(b"GET /v1/vms/vm-1 HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Length: 17\r\n\r\n" + b"a" * 17)
        self.assertIn(b"413", out.split(b"\r\n")[0])
        self.assertIn(b"request body is larger than 16 bytes", out)
        self.assertEqual(self.calls, [])
        self.assertEqual((self.site.timeOut, self.site.request_timeout), (60, 30))


class AccessLogTests(SynchronousTestCase):
    """The proxy's polls of the revocation feed do not flood rest's log."""

    def test_feed_polls_are_debug_lines(self) -> None:
        from twisted.logger import LogLevel, globalLogPublisher

        events: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_format", "").startswith("{client} {method} {path}"):
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        site = rest_site(None, reactor=task.Clock(), max_body=1024,  # type: ignore[arg-type]
                         idle_timeout=60, request_timeout=30)

        class Request:
            method = b"GET"

            def __init__(self, path: bytes, code: int):
                self.path, self.code = path, code

            def getClientAddress(self) -> Any:
                return type("Addr", (), {"host": "10.0.0.1"})()

        for path, code in ((b"/v1/revocations", 200), (b"/v1/revocations", 401),
                           (b"/v1/me", 200)):
            site.log(Request(path, code))
        self.assertEqual([(e["path"], e["code"], e["log_level"]) for e in events],
                         [("/v1/revocations", 200, LogLevel.debug),
                          ("/v1/revocations", 401, LogLevel.info),
                          ("/v1/me", 200, LogLevel.info)])


class ConfigTests(SynchronousTestCase):
    """Each error path of the rest.ini schema names file, section and key."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        key = identity.generate()
        identity.save_private(os.path.join(self.dir, "backend.key"), key)
        db.connect(os.path.join(self.dir, "rest.db"), create=True).close()
        from ticrypt import tlsutil
        tlsutil.make_ca(os.path.join(self.dir, "ca.pem"), os.path.join(self.dir, "ca.key"))
        tlsutil.make_server_cert(os.path.join(self.dir, "ca.pem"),
                                 os.path.join(self.dir, "ca.key"),
                                 os.path.join(self.dir, "server.pem"))
        self.good = {"listen": "ssl:0:interface=127.0.0.1:privateKey=server.pem",
                     "database": "rest.db", "signing_key": "backend.key",
                     "audit_log": "audit.log", "proxy_url": "wss://127.0.0.1:1"}

    def load(self, **changes: str | None) -> Any:
        settings = dict(self.good)
        for k, v in changes.items():
            if v is None:
                settings.pop(k)
            else:
                settings[k] = v
        path = os.path.join(self.dir, "rest.ini")
        with open(path, "w") as f:
            f.write("[rest]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
        return load_config(path, RestConfig)

    def error(self, key: str, **changes: str | None) -> str:
        with self.assertRaises(ConfigError) as e:
            self.load(**changes)
        self.assertEqual((e.exception.section, e.exception.key), ("rest", key))
        msg = str(e.exception)
        self.assertTrue(msg.startswith(os.path.join(self.dir, "rest.ini") + f": [rest] {key}: "),
                        msg)
        self.assertNotIn("\n", msg)
        return msg

    def test_good(self) -> None:
        cfg = self.load()
        self.assertEqual(cfg.rest.max_body, 65536)
        self.assertEqual(cfg.rest.request_timeout, 30)
        self.assertFalse(cfg.rest.allow_plain_http)

    def test_error_paths(self) -> None:
        self.error("listen", listen=None)
        self.error("listen", listen="ssl:0:privateKey=missing.pem")
        self.assertIn("allow_plain_http = yes",
                      self.error("allow_plain_http", listen="tcp:0"))
        self.error("allow_plain_http", allow_plain_http="maybe")
        self.error("proxy_url", proxy_url="https://x")
        self.error("proxy_url", proxy_url="ws://x")
        self.error("max_body", max_body="12 apples")
        self.error("max_body", max_body="1")
        self.error("session_ttl", session_ttl="-1")
        self.error("challenge_ttl", challenge_ttl="1h")
        self.error("request_timeout", request_timeout="2h")
        self.error("login_failures_per_user_and_address",
                   login_failures_per_user_and_address="0")
        # the old per-user key is gone: named, not silently ignored
        self.assertIn("unknown key", self.error("login_failures_per_user",
                                                login_failures_per_user="10"))
        secret = os.path.join(self.dir, "feed.secret")
        with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("too-short\n")
        self.assertIn("32 to 1024 characters",
                      self.error("revocation_feed_secret", revocation_feed_secret="feed.secret"))
        with open(secret, "w") as f:
            f.write("x" * 40 + "\n")
        self.assertEqual(self.load(revocation_feed_secret="feed.secret").rest.
                         revocation_feed_secret, secret)
        os.chmod(secret, 0o644)
        self.assertIn("chmod 600",
                      self.error("revocation_feed_secret", revocation_feed_secret="feed.secret"))
        self.error("audit_log", audit_log="no/such/dir/audit.log")
        self.assertIn("ticrypt-admin init", self.error("database", database="other.db"))
        self.error("signing_key", signing_key="rest.ini")
        os.chmod(os.path.join(self.dir, "backend.key"), 0o644)
        self.assertIn("chmod 600", self.error("signing_key"))
        self.error("bogus", bogus="1")


class WorkedExampleTests(SynchronousTestCase):
    """PROTOCOL.md's worked example (§2) is what the code produces."""

    def test_worked_example(self) -> None:
        import hashlib

        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        doc_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "PROTOCOL.md")
        with open(doc_path) as f:
            doc = f.read()
        user = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
        backend = Ed25519PrivateKey.from_private_bytes(bytes([0x42] * 32))
        vm = Ed25519PrivateKey.from_private_bytes(bytes([0x07] * 32))
        payload = {"challenge": b64(bytes([0xAA] * 32)), "challenge_id": b64(bytes([0x11] * 16)),
                   "user": "alice"}
        token = b64(bytes([0x55] * 32))
        sid = session_id(token_hash(token))
        expected = [
            identity.public_text(user), identity.public_text(backend), identity.public_text(vm),
            signed.signing_input(signed.LOGIN, payload).decode().replace("\x00", "\\x00"),
            b64(signed.sign(user, signed.LOGIN, payload)),
            token, hashlib.sha256(token.encode()).hexdigest(), sid,
            signed.make_ticket(backend, user="alice", user_key=identity.public_bytes(user),
                               vm="vm-0123456789abcdef", client="127.0.0.1", now=1800000000,
                               ttl=60, ticket_id=b64(bytes([0x22] * 16)), session=sid),
            signed.make_vm_credential(backend, vm="vm-0123456789abcdef",
                                      vm_key=identity.public_bytes(vm), now=1800000000),
            signed.make_revocation_feed(backend, serial=7, now=1800000000,
                                        users={"bob": 1799990000}, sessions=[sid]),
        ]
        for value in expected:
            self.assertIn(value, doc)


class PurgeJobTests(SynchronousTestCase):
    """The periodic purge of ticrypt-rest keeps running through its own errors."""

    def test_purges_and_survives_errors(self) -> None:
        from ticrypt.rest.tap import PRUNE_INTERVAL, PurgeService, make_purge

        clock = task.Clock()
        clock.advance(1_800_000_000)
        sync = SyncDb(self.mktemp())
        self.addCleanup(sync.conn.close)
        db.transaction(sync.conn, store.add_user, "alice",
                       identity.public_bytes(identity.generate()), "user", clock.seconds())
        db.transaction(sync.conn, store.create_session, b"h" * 32, "alice", clock.seconds(),
                       10.0)
        api = RestApi(clock=clock, db=sync, signing_key=identity.generate(),
                      proxy_url="wss://p:1", audit=AuditLog(None, clock, "rest"),
                      settings=SETTINGS)
        failures = ["sync", "async"]

        class FlakyDb:
            def run(self, fn: Any, *args: Any, write: bool = True) -> Any:
                if failures:
                    kind = failures.pop(0)
                    if kind == "sync":
                        raise RuntimeError("database went away")
                    return defer.fail(RuntimeError("disk full"))
                return sync.run(fn, *args, write=write)

        def sessions() -> int:
            return int(sync.conn.execute("SELECT count(*) FROM sessions").fetchone()[0])

        timer = PurgeService(make_purge(api, FlakyDb(), clock), clock)
        timer.startService()
        self.addCleanup(timer.stopService)
        api.challenges.issue("alice", "10.0.0.1")
        api.address_limits.failed("10.0.0.1")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # sync failure
        clock.advance(PRUNE_INTERVAL)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # async failure
        # Challenges and rate-limit entries are gone once stale.
        self.assertEqual((len(api.challenges), len(api.address_limits)), (0, 0))
        self.assertEqual(sessions(), 1)  # expired less than a day ago: kept
        clock.advance(86400)
        self.assertTrue(timer.running)
        self.assertEqual(sessions(), 0)

    def test_stopping_waits_for_a_purge_under_way(self) -> None:
        """Stopping rest (the database thread stops after this service)
        waits for the purge running then, and no purge starts afterwards."""
        from ticrypt.rest.tap import PRUNE_INTERVAL, PurgeService

        clock = task.Clock()
        calls: list[defer.Deferred[None]] = []

        def purge() -> defer.Deferred[None]:
            calls.append(defer.Deferred())
            return calls[-1]

        timer = PurgeService(purge, clock)
        timer.startService()
        self.assertEqual(len(calls), 1)  # at start
        stopped = timer.stopService()
        assert stopped is not None
        self.assertNoResult(stopped)
        calls[0].callback(None)
        self.successResultOf(stopped)
        clock.advance(PRUNE_INTERVAL * 3)
        self.assertEqual((len(calls), timer.running), (1, False))

        idle = PurgeService(lambda: defer.succeed(None), clock)
        idle.startService()
        stopped = idle.stopService()
        assert stopped is not None
        self.successResultOf(stopped)  # nothing under way: at once
