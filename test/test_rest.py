"""rest over real sockets on 127.0.0.1: what its HTTPS API answers, from
rest run in the test's process (``start_rest(in_process=True)``: the
service twistd runs, from the same rest.ini, with the same TLS, on trial's
reactor; its clock moved forward instead of waiting), and what only the
daemon shows with a real ``twistd ticrypt-rest``: the refusal to start on a
plain listener, and that every acknowledged change survives kill -9."""

from __future__ import annotations

import importlib.resources
import json
import os
import signal
import sqlite3
import time
from typing import Any, cast

from twisted.internet import defer, endpoints, error, protocol, reactor, task
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web import client as webclient
from twisted.web.http_headers import Headers

from test.daemon import run_command, twistd_path
from test.restfixture import RestEnv, start_rest
from ticrypt import identity, signed, tlsutil
from ticrypt.encoding import b64
from ticrypt.frontend.client import RestClient, RestError
from ticrypt.http import load_secret
from ticrypt.http.client import BytesProducer, PinnedCAPolicy
from ticrypt.rest import api
from ticrypt.rest.core import session_id, token_hash


async def rest_here(testcase: TestCase, **overrides: str) -> RestEnv:
    """rest run in this process (``start_rest(in_process=True)``) on a copy
    of the initialised folder, with ``overrides`` of ``[rest]`` keys."""
    return await start_rest(testcase, copy=True, in_process=True, overrides=overrides)


async def raw_bytes(env: RestEnv, method: str, path: str, body: bytes | None = None,
                    headers: dict[bytes, list[bytes]] | None = None,
                    source: str | None = None) -> tuple[int, bytes, Headers]:
    """One request with an arbitrary body (from the loopback address
    ``source``, if given); returns (status, response body, headers)."""
    agent = webclient.Agent(reactor, contextFactory=PinnedCAPolicy(env.ca_file),
                            bindAddress=(source, 0) if source else None)
    response = await agent.request(method.encode(), (env.url + path).encode(),
                                   Headers(headers or {}),
                                   BytesProducer(body) if body is not None else None)
    return response.code, await webclient.readBody(response), response.headers


async def raw(env: RestEnv, method: str, path: str, body: bytes | None = None,
              headers: dict[bytes, list[bytes]] | None = None,
              source: str | None = None) -> tuple[int, Any, Headers]:
    """:func:`raw_bytes`, the body decoded as JSON (None if empty)."""
    status, data, response_headers = await raw_bytes(env, method, path, body, headers, source)
    return status, json.loads(data) if data else None, response_headers


def audit_lines(env: RestEnv) -> list[dict[str, Any]]:
    with open(env.audit_log) as f:
        return [json.loads(line) for line in f]


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


class LoginTests(TestCase):
    timeout = 120

    async def test_right_key_me_logout(self) -> None:
        env = await rest_here(self)
        client = env.client()
        result = await client.login("alice", env.admin_key)
        self.assertEqual((result["user"], result["role"]), ("alice", "superadmin"))
        self.assertGreater(result["expires"], time.time() + 3600)
        me = await client.me()
        self.assertEqual(me, {"user": "alice", "role": "superadmin",
                              "public_key": identity.public_text(env.admin_key)})
        token = client.token
        assert token is not None
        await client.logout()
        with self.assertRaises(RestError) as e:
            await env.client(token).me()
        self.assertEqual((e.exception.status, e.exception.code), (401, "session-revoked"))
        # The token itself is never stored or logged.
        with open(env.database, "rb") as f:
            self.assertNotIn(token.encode(), f.read())
        with open(env.audit_log) as f:
            log_text = f.read()
        self.assertNotIn(token, log_text)
        self.assertEqual([e["event"] for e in audit_lines(env)[-2:]], ["login-ok", "logout"])

    async def _expect_login_failed(self, env: RestEnv, body: dict[str, Any]) -> None:
        code, obj, _ = await raw(env, "POST", "/v1/auth/login", json.dumps(body).encode())
        self.assertEqual((code, obj["error"]["code"]), (401, "login-failed"))

    async def test_wrong_key(self) -> None:
        env = await rest_here(self)
        with self.assertRaises(RestError) as e:
            await env.client().login("alice", identity.generate())
        self.assertEqual((e.exception.status, e.exception.code), (401, "login-failed"))
        last = audit_lines(env)[-1]
        self.assertEqual((last["event"], last["user"], last["reason"], last["client"]),
                         ("login-failed", "alice", "bad-signature", "127.0.0.1"))

    async def test_replayed_challenge(self) -> None:
        env = await rest_here(self)
        client = env.client()
        c = await client.challenge("alice")
        sig = b64(signed.sign(env.admin_key, signed.LOGIN, {
            "challenge": c["challenge"], "challenge_id": c["challenge_id"], "user": "alice"}))
        body = {"user": "alice", "challenge_id": c["challenge_id"], "signature": sig}
        ok = await client.call("POST", "/v1/auth/login", body, auth=False)
        self.assertEqual(ok["user"], "alice")
        await self._expect_login_failed(env, body)

    async def test_other_users_challenge(self) -> None:
        env = await rest_here(self)
        c = await env.client().challenge("bob")
        # alice signs bob's challenge as if it were hers
        sig = b64(signed.sign(env.admin_key, signed.LOGIN, {
            "challenge": c["challenge"], "challenge_id": c["challenge_id"], "user": "alice"}))
        await self._expect_login_failed(
            env, {"user": "alice", "challenge_id": c["challenge_id"], "signature": sig})

    async def test_signature_for_another_purpose(self) -> None:
        env = await rest_here(self)
        c = await env.client().challenge("alice")
        payload = {"challenge": c["challenge"], "challenge_id": c["challenge_id"],
                   "user": "alice"}
        sig = b64(signed.sign(env.admin_key, signed.PROXY_VM_AUTH, payload))
        await self._expect_login_failed(
            env, {"user": "alice", "challenge_id": c["challenge_id"], "signature": sig})

    async def test_unknown_user_gets_a_challenge_and_a_generic_failure(self) -> None:
        env = await rest_here(self)
        client = env.client()
        known = await client.challenge("alice")
        unknown = await client.challenge("mallory")
        self.assertEqual(sorted(known), sorted(unknown))
        with self.assertRaises(RestError) as e:
            await client.login("mallory", identity.generate())
        self.assertEqual((e.exception.status, e.exception.code), (401, "login-failed"))
        self.assertEqual(audit_lines(env)[-1]["reason"], "unknown-user")

    async def test_disabled_user(self) -> None:
        env = await rest_here(self)
        bob_key, bob_pub = env.new_user_key("bob")
        code, out, err = env.admin_here("user", "add", "bob", "--public-key", bob_pub)
        self.assertEqual(code, 0, err)
        bob = env.client()
        await bob.login("bob", bob_key)
        self.assertEqual((await bob.me())["user"], "bob")
        code, out, err = env.admin_here("user", "disable", "bob")
        self.assertEqual(code, 0, err)
        with self.assertRaises(RestError) as e:
            await bob.me()
        self.assertEqual(e.exception.status, 401)
        with self.assertRaises(RestError) as e:
            await env.client().login("bob", bob_key)
        self.assertEqual((e.exception.status, e.exception.code), (401, "login-failed"))
        self.assertEqual(audit_lines(env)[-1]["reason"], "user-disabled")

    async def _login_from(self, env: RestEnv, source: str, key: Any) -> tuple[int, Any,
                                                                               Headers]:
        """Log alice in with ``key`` from the loopback address ``source``."""
        _, c, _ = await raw(env, "POST", "/v1/auth/challenge", b'{"user":"alice"}',
                            source=source)
        sig = b64(signed.sign(key, signed.LOGIN, {
            "challenge": c["challenge"], "challenge_id": c["challenge_id"], "user": "alice"}))
        return await raw(env, "POST", "/v1/auth/login", json.dumps(
            {"user": "alice", "challenge_id": c["challenge_id"], "signature": sig}).encode(),
            source=source)

    async def test_rate_limit_per_user_and_address(self) -> None:
        """Failures lock a user name out from the address they came from
        only: the user still logs in from another address."""
        env = await rest_here(self, login_failures_per_user_and_address="3", login_window="1h")
        for _ in range(3):
            code, obj, _ = await self._login_from(env, "127.0.0.3", identity.generate())
            self.assertEqual((code, obj["error"]["code"]), (401, "login-failed"))
        code, obj, headers = await self._login_from(env, "127.0.0.3", env.admin_key)
        self.assertEqual((code, obj["error"]["code"]), (429, "rate-limited"))
        retry = int((headers.getRawHeaders(b"retry-after") or [b""])[0])
        self.assertTrue(3000 < retry <= 3600, retry)
        code, obj, _ = await self._login_from(env, "127.0.0.4", env.admin_key)
        self.assertEqual((code, obj["user"]), (200, "alice"))
        events = [(e["event"], e["client"], e.get("reason")) for e in audit_lines(env)
                  if e["event"].startswith("login")]
        self.assertEqual(events, [("login-failed", "127.0.0.3", "bad-signature")] * 3 + [
            ("login-failed", "127.0.0.3", "rate-limited"), ("login-ok", "127.0.0.4", None)])

    async def test_rate_limit_per_address(self) -> None:
        env = await rest_here(self, login_failures_per_address="2")
        for name in ("u1", "u2"):
            with self.assertRaises(RestError):
                await env.client().login(name, identity.generate())
        with self.assertRaises(RestError) as e:
            await env.client().login("alice", env.admin_key)
        self.assertEqual((e.exception.status, e.exception.code), (429, "rate-limited"))

    async def test_session_expires(self) -> None:
        env = await rest_here(self, session_ttl="5s")
        client = env.client()
        result = await client.login("alice", env.admin_key)
        await client.me()
        # rest's clock moves just past the expiry it announced
        assert env.here is not None
        env.here.clock.advance(result["expires"] - env.here.clock.seconds() + 0.2)
        with self.assertRaises(RestError) as e:
            await client.me()
        self.assertEqual((e.exception.status, e.exception.code), (401, "session-expired"))

    async def test_bad_tokens(self) -> None:
        env = await rest_here(self)
        for token, code in ((None, "missing-token"), ("junk", "invalid-token"),
                            (b64(os.urandom(32)), "invalid-token")):
            with self.assertRaises(RestError) as e:
                await RestClient(reactor, env.url, env.ca_file, token).call("GET", "/v1/me",
                                                                           auth=False)
            self.assertEqual((e.exception.status, e.exception.code), (401, "missing-token"))
            if token is not None:
                with self.assertRaises(RestError) as e:
                    await env.client(token).me()
                self.assertEqual((e.exception.status, e.exception.code), (401, code))


class EnrollmentTests(TestCase):
    timeout = 120

    def _add_vm(self, env: RestEnv, name: str = "lab1") -> dict[str, Any]:
        code, out, err = env.admin_here("--json", "vm", "add", name, "--owner", "alice",
                                        "--host", "127.0.0.1:2201")
        self.assertEqual(code, 0, err)
        return json.loads(out)  # type: ignore[no-any-return]

    async def test_enroll_once_then_ticket(self) -> None:
        env = await rest_here(self)
        added = self._add_vm(env)
        vm_id = added["vm"]["id"]
        vm_key = identity.generate()
        fp = "sha256:" + "ab" * 32
        client = env.client()
        got = await client.enroll(added["enrollment_token"], identity.public_text(vm_key), fp)
        self.assertEqual(got["vm_id"], vm_id)
        self.assertEqual(got["owner"], "alice")
        self.assertEqual(got["owner_public_key"], identity.public_text(env.admin_key))
        self.assertEqual(got["backend_public_key"], identity.public_text(env.backend_public))
        self.assertEqual(got["proxy_url"], "wss://127.0.0.1:8444")
        cred = signed.verify_vm_credential(env.backend_public, got["vm_credential"])
        self.assertEqual((cred.vm, cred.vm_key), (vm_id, identity.public_bytes(vm_key)))
        # A token is single use.
        with self.assertRaises(RestError) as e:
            await client.enroll(added["enrollment_token"], identity.public_text(vm_key), fp)
        self.assertEqual((e.exception.status, e.exception.code), (409, "enrollment-token-used"))
        events = [(line["event"], line.get("reason")) for line in audit_lines(env)]
        self.assertIn(("enroll-ok", None), events)
        self.assertIn(("enroll-failed", "enrollment-token-used"), events)
        # The VM is now visible with its keys, and tickets can be issued.
        await client.login("alice", env.admin_key)
        vm = await client.get_vm(vm_id)
        self.assertEqual((vm["state"], vm["public_key"], vm["tls_fingerprint"]),
                         ("enrolled", identity.public_text(vm_key), fp))
        t = await client.ticket(vm_id)
        self.assertEqual(t["vm_public_key"], identity.public_text(vm_key))
        ticket = signed.verify_ticket(env.backend_public, t["ticket"], vm=vm_id,
                                      client="127.0.0.1", now=time.time())
        self.assertEqual((ticket.user, ticket.user_key, ticket.expires),
                         ("alice", identity.public_bytes(env.admin_key), t["expires"]))
        # it names the session it was issued under (so a logout revokes it)
        assert client.token is not None
        self.assertEqual(ticket.session, session_id(token_hash(client.token)))
        self.assertEqual(audit_lines(env)[-1]["event"], "ticket-issued")
        # A ticket forged with another key is refused by the proxy's check.
        forged = signed.make_ticket(identity.generate(), user="alice",
                                    user_key=identity.public_bytes(env.admin_key), vm=vm_id,
                                    client="127.0.0.1", now=time.time(), ttl=60,
                                    ticket_id="x", session=ticket.session)
        with self.assertRaises(signed.TokenError) as te:
            signed.verify_ticket(env.backend_public, forged, vm=vm_id, client="127.0.0.1",
                                 now=time.time())
        self.assertEqual(te.exception.code, "bad-signature")

    async def test_ticket_needs_enrollment(self) -> None:
        env = await rest_here(self)
        added = self._add_vm(env)
        client = env.client()
        await client.login("alice", env.admin_key)
        with self.assertRaises(RestError) as e:
            await client.ticket(added["vm"]["id"])
        self.assertEqual((e.exception.status, e.exception.code), (409, "vm-not-enrolled"))
        with self.assertRaises(RestError) as e:
            await client.ticket("vm-0000000000000000")
        self.assertEqual((e.exception.status, e.exception.code), (404, "no-such-vm"))

    async def test_expired_enrollment_token(self) -> None:
        env = await rest_here(self, enrollment_ttl="1s")
        added = self._add_vm(env)
        assert env.here is not None
        env.here.clock.advance(added["enrollment_expires"] - env.here.clock.seconds() + 0.2)
        with self.assertRaises(RestError) as e:
            await env.client().enroll(added["enrollment_token"],
                                      identity.public_text(identity.generate()),
                                      "sha256:" + "00" * 32)
        self.assertEqual((e.exception.status, e.exception.code),
                         (401, "enrollment-token-expired"))


class ErrorTests(TestCase):
    timeout = 120

    async def test_json_errors(self) -> None:
        env = await rest_here(self, max_body="2KiB")
        cases = [
            ("POST", "/v1/auth/challenge", b"{nope", "malformed-json", 400),
            ("POST", "/v1/auth/challenge", b"[1]", "invalid-body", 400),
            ("POST", "/v1/auth/challenge", b'{"user":"a","x":1}', "unknown-field", 400),
            ("POST", "/v1/auth/challenge", b"{}", "missing-field", 400),
            ("POST", "/v1/auth/challenge", b'{"user":5}', "invalid-field", 400),
            ("POST", "/v1/auth/challenge", b'{"user":"a b"}', "invalid-field", 400),
            ("POST", "/v1/auth/challenge", b"[" * 2000, "malformed-json", 400),
            ("POST", "/v1/auth/challenge", b'{"user":"' + b"a" * 3000 + b'"}',
             "body-too-large", 413),
            ("GET", "/v1/nothing", None, "not-found", 404),
            ("DELETE", "/v1/me", None, "method-not-allowed", 405),
            ("GET", "/v1/auth/login", None, "method-not-allowed", 405),
        ]
        for method, path, body, code, status in cases:
            got, obj, headers = await raw(env, method, path, body)
            self.assertEqual((got, obj["error"]["code"]), (status, code), (method, path, body))
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
            if status == 405:
                self.assertTrue(headers.getRawHeaders(b"allow"))

    async def test_oversized_body_is_not_read_past_the_limit(self) -> None:
        env = await rest_here(self, max_body="2KiB")
        # Declared far past max_body + the drain limit: answered before the body arrives.
        big = b"x" * (3 * 1024 * 1024)
        try:
            status, obj, _ = await raw(env, "POST", "/v1/auth/challenge", big)
        except Exception:
            pass  # the server may hang up while we are still sending; that is allowed
        else:
            self.assertEqual((status, obj["error"]["code"]), (413, "body-too-large"))
        # The daemon is alive and well afterwards.
        self.assertIn("public_key", await env.client().backend())

    async def test_forbidden_for_plain_users(self) -> None:
        env = await rest_here(self)
        admin = env.client()
        await admin.login("alice", env.admin_key)
        bob_key, _ = env.new_user_key("bob")
        created = await admin.create_user("bob", identity.public_text(bob_key))
        self.assertEqual(created["role"], "user")
        bob = env.client()
        await bob.login("bob", bob_key)
        for call in (bob.list_users(), bob.create_vm("x", "bob", "h:1"),
                     bob.create_user("eve", identity.public_text(bob_key)),
                     bob.disable_user("alice")):
            with self.assertRaises(RestError) as e:
                await call
            self.assertEqual((e.exception.status, e.exception.code), (403, "forbidden"))
        # Users see their own VMs; the superadmin sees all.
        await admin.create_vm("a-vm", "alice", "10.0.0.1:2200")
        await admin.create_vm("b-vm", "bob", "10.0.0.1:2201")
        self.assertEqual([v["name"] for v in await bob.list_vms()], ["b-vm"])
        self.assertEqual([v["name"] for v in await admin.list_vms()], ["a-vm", "b-vm"])

    async def test_connections_per_address_are_bounded(self) -> None:
        env = await rest_here(self, max_connections_per_address="2")
        host, port = env.url.split("//")[1].rsplit(":", 1)
        ends: list[defer.Deferred[None]] = []

        class Hold(protocol.Protocol):
            def connectionMade(self) -> None:
                self.ended: defer.Deferred[None] = defer.Deferred()
                ends.append(self.ended)

            def connectionLost(self, reason: Any = None) -> None:
                self.ended.callback(None)

        async def open_tls() -> Hold:
            ep = endpoints.wrapClientTLS(
                tlsutil.client_options(host, env.ca_file),
                endpoints.TCP4ClientEndpoint(reactor, host, int(port)))
            return await endpoints.connectProtocol(ep, Hold())  # type: ignore

        held = [await open_tls() for _ in range(2)]
        # The third connection from this address is reset by the server at
        # once, before any HTTP (an idle one would otherwise live idle_timeout).
        try:
            third = await defer.ensureDeferred(open_tls()).addTimeout(10, reactor)
        except error.ConnectError:
            pass  # reset during the TLS handshake
        else:
            await third.ended.addTimeout(10, reactor)
        with self.assertRaises(RestError) as e:
            await env.client(timeout=10).backend()
        self.assertEqual(e.exception.status, 0)
        for h in held:
            assert h.transport is not None
            h.transport.loseConnection()
        # Our side ends after the server's (TLS close_notify, then its FIN).
        await defer.DeferredList(ends)
        self.assertIn("public_key", await env.client().backend())

    async def test_plain_http_only_when_allowed(self) -> None:
        # twistd refuses to start: one line naming the key, a failure exit
        env = await start_rest(self, copy=True, start=False)
        env.write_config(listen="tcp:0:interface=127.0.0.1")
        code, out, err = await run_command([twistd_path(), "-n", "--pidfile=", "ticrypt-rest",
                                            "--config", env.config_path])
        self.assertNotEqual(code, 0)
        self.assertIn(f"{env.config_path}: [rest] allow_plain_http: listen is a plain tcp:",
                      (out + err).strip().splitlines()[-1])
        # allowed, it serves plain HTTP with a warning
        warnings: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.warn:
                warnings.append(formatEvent(event))

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        env.write_config(allow_plain_http="yes")
        await env.start_here(self)
        self.assertTrue(env.url.startswith("http://"))
        self.assertEqual(len([w for w in warnings
                              if "allow_plain_http = yes is for tests only" in w]), 1, warnings)
        self.assertIn("public_key", await RestClient(reactor, env.url).backend())


class OpenApiTests(TestCase):
    timeout = 120

    async def test_document_is_served_without_auth(self) -> None:
        env = await rest_here(self)
        status, body, headers = await raw_bytes(env, "GET", "/v1/openapi.json")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        # byte for byte the file of the installed package, which is the source file
        packaged = importlib.resources.files("ticrypt.rest").joinpath("openapi.json")
        self.assertEqual(body, packaged.read_bytes())
        with open(os.path.join(os.path.dirname(api.__file__), "openapi.json"), "rb") as f:
            self.assertEqual(body, f.read())
        self.assertIn("GET /v1/openapi.json", json.loads(body)["info"]["description"])
        # a session token changes nothing; other methods are refused
        token = (await env.client().login("alice", env.admin_key))["token"]
        status, again, _ = await raw_bytes(env, "GET", "/v1/openapi.json",
                                           headers={b"Authorization": [b"Bearer " +
                                                                       token.encode()]})
        self.assertEqual((status, again), (200, body))
        status, obj, _ = await raw(env, "POST", "/v1/openapi.json", b"{}")
        self.assertEqual((status, obj["error"]["code"]), (405, "method-not-allowed"))


class RevocationFeedTests(TestCase):
    """GET /v1/revocations: what the proxy polls (PROTOCOL.md §3 "Revocation")."""

    timeout = 120

    async def feed(self, env: RestEnv) -> signed.RevocationFeed:
        secret = load_secret(env.feed_secret_file)
        code, obj, _ = await raw(env, "GET", "/v1/revocations",
                                 headers={b"Authorization": [b"Bearer " + secret.encode()]})
        self.assertEqual(code, 200, obj)
        return signed.verify_revocation_feed(env.backend_public, obj["feed"], now=time.time(),
                                             max_age=60)

    async def test_feed_follows_logout_and_admin_disable(self) -> None:
        env = await rest_here(self)
        bob_key, bob_pub = env.new_user_key("bob")
        self.assertEqual((env.admin_here("user", "add", "bob", "--public-key", bob_pub))[0], 0)
        first = await self.feed(env)
        self.assertEqual((first.users, first.sessions), ({}, frozenset()))
        bob, bob2 = env.client(), env.client()
        await bob.login("bob", bob_key)
        await bob2.login("bob", bob_key)
        assert bob.token is not None
        ended = session_id(token_hash(bob.token))
        await bob.logout()
        after_logout = await self.feed(env)
        self.assertEqual((after_logout.users, after_logout.sessions), ({}, {ended}))
        self.assertGreater(after_logout.serial, first.serial)
        # ticrypt-admin writes the database directly: the feed still sees it
        self.assertEqual((env.admin_here("user", "disable", "bob"))[0], 0)
        after_disable = await self.feed(env)
        self.assertEqual(list(after_disable.users), ["bob"])
        self.assertLessEqual(abs(after_disable.users["bob"] - time.time()), 60)
        # bob's sessions are covered by his entry
        self.assertEqual(after_disable.sessions, frozenset())
        self.assertGreater(after_disable.serial, after_logout.serial)

    async def test_feed_needs_its_secret(self) -> None:
        env = await rest_here(self)
        admin = env.client()
        await admin.login("alice", env.admin_key)
        assert admin.token is not None
        for headers in ({}, {b"Authorization": [b"Bearer " + admin.token.encode()]}):
            code, obj, _ = await raw(env, "GET", "/v1/revocations", headers=headers)
            self.assertEqual((code, obj["error"]["code"]), (401, "invalid-token"))
        refused = [e for e in audit_lines(env) if e["event"] == "feed-refused"]
        self.assertEqual([e["reason"] for e in refused], ["missing-token", "invalid-token"])
        with open(env.audit_log) as f:
            self.assertNotIn(admin.token, f.read())


class DurabilityTests(TestCase):
    timeout = 180

    async def test_kill9_during_writes_keeps_every_acknowledged_change(self) -> None:
        env = await start_rest(self, copy=True)
        admin = env.client()
        await admin.login("alice", env.admin_key)
        pub = identity.public_text(identity.generate())
        acked: list[str] = []
        stop = False

        async def writer(n: int) -> bool:
            """Create users and VMs until the daemon dies under us (returns True)."""
            i = 0
            while not stop:
                name = f"w{n}-{i}"
                i += 1
                try:
                    if i % 2:
                        await admin.create_user(name, pub)
                    else:
                        await admin.create_vm(name, "alice", "127.0.0.1:2200")
                except RestError:
                    return True
                acked.append(name)
            return False

        writers = [defer.ensureDeferred(writer(n)) for n in range(4)]
        while len(acked) < 40:
            await sleep(0.05)
        assert env.daemon is not None
        env.daemon.signal(signal.SIGKILL)
        await env.daemon.ended
        stop = True
        interrupted = await defer.gatherResults(writers)
        self.assertTrue(any(interrupted), "the kill did not land during writes")
        # Restart on the same files; everything acknowledged must be there.
        await env.start(self)
        admin = env.client()
        await admin.login("alice", env.admin_key)
        names = {u["name"] for u in await admin.list_users()}
        names |= {v["name"] for v in await admin.list_vms()}
        missing = [a for a in acked if a not in names]
        self.assertEqual(missing, [])
        conn = sqlite3.connect(env.database)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
