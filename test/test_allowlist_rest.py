"""The license-server allow-list at rest: ticrypt.dnsname's canonical names,
the superadmin operations and the allowedlist feed (in memory), once over
HTTPS against rest's service run in this process (test/restfixture.py), and
``ticrypt-admin allowlist`` (its ``main``, in this process)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase, TestCase

from test.restfixture import start_rest
from test.test_rest import audit_lines, raw
from test.test_rest_core import SETTINGS, SyncDb, result
from ticrypt import dnsname, identity, signed
from ticrypt.audit import AuditLog
from ticrypt.encoding import b64
from ticrypt.frontend.client import RestError
from ticrypt.http import load_secret
from ticrypt.http.server import ApiError
from ticrypt.rest import db, store
from ticrypt.rest.api import Call, RestApi

ALLOW_SECRET = "a" * 48


class NameTests(SynchronousTestCase):
    def test_canonical_form(self) -> None:
        for given, canonical in [
            ("License.Example.ORG.", "license.example.org"),
            ("lic-1.example.org", "lic-1.example.org"),
            ("*.Example.org", "*.example.org"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("a" * 63 + ".org", "a" * 63 + ".org"),
        ]:
            self.assertEqual(dnsname.canonical_name(given), canonical, given)

    def test_refusals(self) -> None:
        for bad, why in [
            ("", "is empty"), (".", "is empty"),
            ("lic\x00.example.org", "label"),
            ("lic.example.org\x00", "label"),
            ("bücher.example", "punycode"),
            ("lic ense.example.org", "label"),
            ("a..example.org", "empty label"),
            (".example.org", "empty label"),
            ("-a.example.org", "label"),
            ("a-.example.org", "label"),
            ("a_b.example.org", "label"),
            ("a" * 64 + ".org", "label"),
            ("a." * 127 + "org", "longer than 253"),
            ("*.org", "two labels"),
            ("*", "two labels"),
            ("a.*.example.org", "label"),
            ("**.example.org", "label"),
            ("10.0.0.1", "numeric"),
            ("xn--zz.example", "punycode"),         # not valid punycode
            ("xn--abc-.example", "label"),
            ("ab--c.example", "xn--"),              # reserved hyphens
            ("xn--bcher-KVA.example", None),       # lower-cased first: accepted
            ("xn--example-.org", "label"),
        ]:
            if why is None:
                dnsname.canonical_name(bad)
                continue
            with self.assertRaises(ValueError, msg=repr(bad)) as e:
                dnsname.canonical_name(bad)
            self.assertIn(why, str(e.exception), bad)
        with self.assertRaises(ValueError):
            dnsname.canonical_name("*.example.org", wildcard=False)

    def test_punycode_of_ascii_is_a_lookalike(self) -> None:
        # "xn--abc-" style labels that decode to plain ASCII, and a
        # non-canonical encoding, are refused
        with self.assertRaises(ValueError):
            dnsname.canonical_name("xn--example-.org")
        with self.assertRaises(ValueError):
            dnsname.canonical_name("xn--a.example")

    def test_covers(self) -> None:
        self.assertTrue(dnsname.covers("lic.example.org", "lic.example.org"))
        self.assertFalse(dnsname.covers("lic.example.org", "a.lic.example.org"))
        self.assertTrue(dnsname.covers("*.example.org", "a.example.org"))
        self.assertTrue(dnsname.covers("*.example.org", "a.b.example.org"))
        self.assertFalse(dnsname.covers("*.example.org", "example.org"))
        self.assertFalse(dnsname.covers("*.example.org", "badexample.org"))


class AllowlistApiTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.db = SyncDb(self.mktemp())
        self.addCleanup(self.db.conn.close)
        self.key = identity.generate()
        self.keys = {"root": identity.generate(), "bob": identity.generate()}
        for name, role in (("root", "superadmin"), ("bob", "user")):
            db.transaction(self.db.conn, store.add_user, name,
                           identity.public_bytes(self.keys[name]), role, self.clock.seconds())
        self.audit_path = self.mktemp()
        self.audit = AuditLog(self.audit_path, self.clock, "rest")
        self.addCleanup(self.audit.close)
        self.api = RestApi(clock=self.clock, db=self.db, signing_key=self.key,
                           proxy_url="wss://p:1", audit=self.audit, settings=SETTINGS,
                           allowlist_secret=ALLOW_SECRET)
        self.root = self.login("root")

    def call(self, handler: str, body: dict[str, Any] | bytes | None = None,
             params: tuple[str, ...] = (), token: str | None = None,
             client: str = "10.0.0.9") -> Any:
        raw_body = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
        c = Call(method="", params=params, body=raw_body, client=client, bearer=token)
        return result(getattr(self.api, handler)(c))

    def login(self, user: str) -> str:
        _, c = self.call("challenge", {"user": user})
        sig = signed.sign(self.keys[user], signed.LOGIN, {
            "challenge": c["challenge"], "challenge_id": c["challenge_id"], "user": user})
        _, s = self.call("login", {"user": user, "challenge_id": c["challenge_id"],
                                   "signature": b64(sig)})
        return str(s["token"])

    def add(self, token: str | None = None, **body: Any) -> Any:
        return self.call("add_allowlist", body, token=token or self.root)

    def refused(self, handler: str, body: Any = None, **kwargs: Any) -> ApiError:
        with self.assertRaises(ApiError) as e:
            self.call(handler, body, **kwargs)
        return e.exception

    def feed(self) -> dict[str, Any]:
        status, body = self.call("allowlist_feed", token=ALLOW_SECRET)
        self.assertEqual(status, 200)
        return body  # type: ignore[no-any-return]

    def events(self) -> list[dict[str, Any]]:
        with open(self.audit_path) as f:
            return [e for e in map(json.loads, f) if e["event"].startswith("allowlist")]

    def test_add_list_feed_remove(self) -> None:
        self.assertEqual(self.feed(), {"serial": 0, "entries": []})
        status, body = self.add(name="License.Example.org.", ports=[27001, 27000],
                                comment="flexlm")
        self.assertEqual(status, 201)
        entry = body["entry"]
        self.assertRegex(entry["id"], r"^al-[0-9a-f]{16}$")
        self.assertEqual({k: v for k, v in entry.items() if k != "id"},
                         {"name": "license.example.org", "ports": [27000, 27001],
                          "protocol": "tcp", "comment": "flexlm"})
        _, udp = self.add(name="license.example.org", ports=[1947], protocol="udp")
        _, wild = self.add(name="*.lic.example.net", ports=[443])
        self.assertEqual(self.call("list_allowlist", token=self.root),
                         (200, {"entries": [wild["entry"], entry, udp["entry"]]}))
        feed = self.feed()
        self.assertEqual((feed["serial"], feed["entries"]),
                         (3, [wild["entry"], entry, udp["entry"]]))
        self.assertEqual(self.call("remove_allowlist", params=(entry["id"],),
                                   token=self.root), (204, None))
        self.assertEqual(self.feed(), {"serial": 4, "entries": [wild["entry"], udp["entry"]]})
        e = self.refused("remove_allowlist", params=(entry["id"],), token=self.root)
        self.assertEqual((e.status, e.code), (404, "no-such-entry"))
        self.assertEqual(self.feed()["serial"], 4)  # a refused change changes nothing
        # every change is audited, with who and from where
        events = self.events()
        self.assertEqual([(e["event"], e["name"], e["by"], e["client"]) for e in events],
                         [("allowlist-add", "license.example.org", "root", "10.0.0.9"),
                          ("allowlist-add", "license.example.org", "root", "10.0.0.9"),
                          ("allowlist-add", "*.lic.example.net", "root", "10.0.0.9"),
                          ("allowlist-remove", "license.example.org", "root", "10.0.0.9")])
        self.assertEqual((events[0]["ports"], events[0]["protocol"], events[0]["entry"]),
                         ([27000, 27001], "tcp", entry["id"]))

    def test_one_entry_per_name_and_protocol(self) -> None:
        self.add(name="lic.example.org", ports=[1])
        e = self.refused("add_allowlist", {"name": "LIC.example.org.", "ports": [2]},
                         token=self.root)
        self.assertEqual((e.status, e.code), (409, "allowlist-entry-exists"))
        self.assertEqual(self.feed()["serial"], 1)

    def test_allowlist_is_bounded(self) -> None:
        conn = self.db.conn
        for i in range(store.MAX_ALLOWLIST):
            db.transaction(conn, store.add_allow_entry, store.AllowEntry(
                f"al-{i:016x}", f"h{i}.example.org", (1,), "tcp", ""), "root", 0)
        e = self.refused("add_allowlist", {"name": "one-more.example.org", "ports": [1]},
                         token=self.root)
        self.assertEqual((e.status, e.code), (409, "allowlist-full"))

    def test_superadmin_only(self) -> None:
        bob = self.login("bob")
        for handler, body, params in (
                ("add_allowlist", {"name": "lic.example.org", "ports": [1]}, ()),
                ("list_allowlist", None, ()),
                ("remove_allowlist", None, ("al-0000000000000000",))):
            e = self.refused(handler, body, params=params, token=bob)
            self.assertEqual((e.status, e.code), (403, "forbidden"), handler)
            e = self.refused(handler, body, params=params)
            self.assertEqual((e.status, e.code), (401, "missing-token"), handler)
        # a session token does not open the feed, the feed secret no session
        e = self.refused("allowlist_feed", token=self.root)
        self.assertEqual((e.status, e.code), (401, "invalid-token"))
        e = self.refused("list_allowlist", token=ALLOW_SECRET)
        self.assertEqual((e.status, e.code), (401, "invalid-token"))
        self.assertEqual(self.events(), [])

    def test_invalid_entries(self) -> None:
        good = {"name": "lic.example.org", "ports": [27000]}
        changes: list[dict[str, Any]] = [
            {"name": "lic\x00.example.org"}, {"name": "bücher.example"},
            {"name": "xn--zz.example"}, {"name": "*.org"}, {"name": "a..b"},
            {"name": 5}, {"ports": []}, {"ports": [0]}, {"ports": [65536]},
            {"ports": [True]}, {"ports": ["22"]}, {"ports": [1, 1]},
            {"ports": list(range(1, 34))}, {"ports": 22}, {"protocol": "icmp"},
            {"protocol": "TCP"}, {"comment": "x" * 201}, {"comment": "a\nb"},
            {"comment": "\x1b[31m"}, {"extra": 1},
        ]
        for change in changes:
            e = self.refused("add_allowlist", {**good, **change}, token=self.root)
            self.assertEqual(e.status, 400, change)
            self.assertIn(e.code, ("invalid-field", "unknown-field"), change)
        e = self.refused("add_allowlist", {"ports": [1]}, token=self.root)
        self.assertEqual(e.code, "missing-field")
        self.assertEqual(self.add(name=good["name"], ports=list(range(1, 33)))[0], 201)
        self.assertEqual(self.feed()["serial"], 1)

    def test_feed_secret_and_rate_limit(self) -> None:
        for token in (None, "x" * 48, ALLOW_SECRET + "x"):
            e = self.refused("allowlist_feed", token=token)
            self.assertEqual((e.status, e.code), (401, "invalid-token"))
        with open(self.audit_path) as f:
            refused = [e for e in map(json.loads, f) if e["event"] == "feed-refused"]
        self.assertEqual([(e["feed"], e["reason"]) for e in refused],
                         [("allow-list", "missing-token")] + [("allow-list", "invalid-token")] * 2)
        for _ in range(2):
            self.refused("allowlist_feed", token="y")
        e = self.refused("allowlist_feed", token=ALLOW_SECRET)  # 5 failures per address
        self.assertEqual((e.status, e.code), (429, "rate-limited"))
        self.assertEqual(self.call("allowlist_feed", token=ALLOW_SECRET,
                                   client="10.0.0.8")[0], 200)
        self.api._allowlist_secret = None
        e = self.refused("allowlist_feed", token=ALLOW_SECRET, client="10.0.0.7")
        self.assertEqual((e.status, e.code), (404, "feed-disabled"))

    def test_delete_on_the_feed_path_is_not_allowed(self) -> None:
        e = self.refused("remove_allowlist", params=("feed",), token=self.root)
        self.assertEqual((e.status, e.code, e.headers), (405, "method-not-allowed",
                                                          {"Allow": "GET"}))

    def test_migration_from_version_2(self) -> None:
        path = self.mktemp()
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (0)")
        for statements in db.MIGRATIONS[:2]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("UPDATE schema_version SET version = 2")
        conn.close()
        conn = db.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(db.schema_version(conn), db.LATEST)
        self.assertEqual(db.transaction(conn, store.allowlist_feed), (0, []))


class AllowlistRestTests(TestCase):
    timeout = 120

    async def test_real_rest(self) -> None:
        env = await start_rest(self, in_process=True)
        client = env.client()
        await client.login(env.admin_name, env.admin_key)
        entry = await client.add_allowlist("Lic.Example.org", [27000], comment="flexlm")
        self.assertEqual(entry["name"], "lic.example.org")
        with self.assertRaises(RestError) as e:
            await client.add_allowlist("lic\x00.example.org", [1])
        self.assertEqual((e.exception.status, e.exception.code), (400, "invalid-field"))
        self.assertIn("not an allow-list name", e.exception.message)
        self.assertEqual(await client.list_allowlist(), [entry])
        secret = load_secret(env.deployment.path(env.deployment.allowlist_feed_secret()))
        code, feed, _ = await raw(env, "GET", "/v1/allowlist/feed",
                                  headers={b"Authorization": [b"Bearer " + secret.encode()]})
        self.assertEqual((code, feed), (200, {"serial": 1, "entries": [entry]}))
        code, obj, headers = await raw(env, "DELETE", "/v1/allowlist/feed",
                                       headers={b"Authorization": [b"Bearer " + secret.encode()]})
        self.assertEqual((code, obj["error"]["code"]), (405, "method-not-allowed"))
        await client.remove_allowlist(entry["id"])
        self.assertEqual(await client.list_allowlist(), [])
        code, feed, _ = await raw(env, "GET", "/v1/allowlist/feed",
                                  headers={b"Authorization": [b"Bearer " + secret.encode()]})
        self.assertEqual(feed, {"serial": 2, "entries": []})
        self.assertEqual([e["event"] for e in audit_lines(env)
                          if e["event"].startswith("allowlist")],
                         ["allowlist-add", "allowlist-remove"])

    async def test_admin_commands(self) -> None:
        env = await start_rest(self, start=False)
        code, out, err = env.admin_here("--json", "allowlist", "add", "Lic.Example.org.",
                                        "--port", "27000", "--port", "27001", "--udp",
                                        "--comment", "flexlm")
        self.assertEqual(code, 0, err)
        entry = json.loads(out)
        self.assertEqual({k: v for k, v in entry.items() if k != "id"},
                         {"name": "lic.example.org", "ports": [27000, 27001],
                          "protocol": "udp", "comment": "flexlm"})
        for args, why in ((("lic\x01.example.org", "--port", "1"), "not an allow-list name"),
                          (("lic.example.org", "--port", "0"), "1..65535"),
                          (("lic.example.org", "--port", "1", "--udp"), "already allow-listed")):
            code, out, err = env.admin_here("allowlist", "add", *args)
            self.assertEqual(code, 1, args)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(why, err)
        code, out, err = env.admin_here("--json", "allowlist", "list")
        self.assertEqual((code, json.loads(out)), (0, {"serial": 1, "entries": [entry]}), err)
        code, out, err = env.admin_here("allowlist", "remove", entry["id"])
        self.assertEqual((code, out.strip()),
                         (0, f"removed {entry['id']} (lic.example.org udp)"), err)
        code, out, err = env.admin_here("allowlist", "remove", entry["id"])
        self.assertEqual(code, 1)
        self.assertIn("no allow-list entry", err)
        self.assertEqual([e["event"] for e in audit_lines(env)
                          if e["event"].startswith("allowlist")],
                         ["allowlist-add", "allowlist-remove"])
