"""``ticrypt-admin`` through its console script, and the shared migrations."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import sys

from twisted.trial.unittest import SynchronousTestCase, TestCase

from test.daemon import run_command, script_path
from test.restfixture import make_rest_dir, start_rest
from ticrypt import identity
from ticrypt.rest import db, store


class AdminCliTests(TestCase):
    """The commands' results and lines through ``ticrypt-admin``'s ``main``
    run in this process (``env.admin_here``: the same code as the console
    script, no Python start-up each); the console script itself, its exit
    code and stderr, through a process (``env.admin``, ``run_command``) in
    a few places that show it."""

    timeout = 120

    def one_line(self, err: str, expected: str) -> None:
        self.assertEqual(err.strip().splitlines(), [expected])

    async def test_init_users_vms(self) -> None:
        env = await start_rest(self, start=False)
        self.assertEqual(stat.S_IMODE(os.stat(env.signing_key).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(env.database).st_mode), 0o600)
        self.assertEqual(env.backend_public,
                         identity.public_bytes(identity.load_private(env.signing_key)))
        # through the console script: its exit code and one line on stderr
        code, out, err = await env.admin("init", "--superadmin", "x", "--public-key",
                                         env.admin_pub_file)
        self.assertEqual(code, 1)
        self.one_line(err, f"ticrypt-admin: init failed: database {env.database} already "
                           "exists; refusing to initialise it again")
        _, bob_pub = env.new_user_key("bob")
        self.assertEqual(env.admin_here("user", "add", "bob", "--public-key", bob_pub)[0], 0)
        code, out, err = env.admin_here("user", "add", "bob", "--public-key", bob_pub)
        self.one_line(err, "ticrypt-admin: cannot add user bob: user bob already exists")
        code, out, err = env.admin_here("user", "add", "eve", "--public-key", env.config_path)
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith("ticrypt-admin: cannot add user eve: "), err)
        code, out, err = env.admin_here("user", "add", "bad name", "--public-key", bob_pub)
        self.assertEqual(code, 1)
        code, out, err = env.admin_here("vm", "add", "lab1", "--owner", "nobody", "--host",
                                        "h:22")
        self.one_line(err, "ticrypt-admin: cannot add VM lab1: no user named nobody")
        code, out, err = env.admin_here("vm", "add", "lab1", "--owner", "bob", "--host", "h")
        self.one_line(err, "ticrypt-admin: cannot add VM lab1: --host 'h' is not HOST:PORT")
        code, out, err = env.admin_here("vm", "add", "lab1", "--owner", "bob", "--host",
                                        "h:22")
        self.assertEqual(code, 0, err)
        self.assertIn("this is the only time it is shown", out)
        code, out, err = env.admin_here("user", "disable", "bob")
        self.assertEqual(code, 0, err)
        code, out, err = env.admin_here("--json", "user", "list")
        users = {u["name"]: u for u in json.loads(out)["users"]}
        self.assertEqual((users["alice"]["role"], users["bob"]["disabled"]),
                         ("superadmin", True))
        code, out, err = env.admin_here("--json", "vm", "list")
        self.assertEqual([v["name"] for v in json.loads(out)["vms"]], ["lab1"])
        with open(env.audit_log) as f:
            events = [json.loads(line)["event"] for line in f]
        self.assertEqual(events, ["init", "user-created", "vm-created", "user-disabled"])
        code, out, err = env.admin_here("user", "disable", "nobody")
        self.one_line(err, "ticrypt-admin: cannot disable user nobody: no user named nobody")

    async def test_missing_config_and_tls_init(self) -> None:
        missing = os.path.abspath("nope.ini")
        code, out, err = await run_command([script_path("ticrypt-admin"), "--config", missing,
                                            "user", "list"])
        self.assertEqual(code, 1)
        self.one_line(err, f"ticrypt-admin: cannot load config: {missing}: config file does "
                           "not exist")
        directory = os.path.abspath(self.mktemp())
        args = [script_path("ticrypt-admin"), "tls", "init", "--dir", directory, "--name",
                "rest.example", "--name", "127.0.0.1"]
        code, out, err = await run_command(args)
        self.assertEqual(code, 0, err)
        for name, mode in (("ca.pem", 0o644), ("ca.key", 0o600), ("server.pem", 0o600)):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode), mode)
        code, out, err = await run_command(args)
        self.assertEqual(code, 1)
        self.assertIn("already exists; refusing to overwrite", err)

    async def test_user_list_before_init(self) -> None:
        env = make_rest_dir(os.path.abspath(self.mktemp()))
        code, out, err = env.admin_here("user", "list")
        self.assertEqual(code, 1)
        self.one_line(err, f"ticrypt-admin: cannot list users: {env.database} does not "
                           "exist; create it with ticrypt-admin init")


    async def test_command_loads_neither_http_server_nor_tls(self) -> None:
        """A command works on rest's database: its process loads neither
        rest's HTTP API (twisted.web.server) nor Twisted's endpoint parser
        and OpenSSL (rest.ini's ssl: listen is rest's; its TLS key and
        certificate are not read), nor any test tooling: about a third of
        the CPU of ``ticrypt-admin user list``."""
        env = await start_rest(self, start=False, copy=True)
        probe = ("import contextlib, io, json, sys\nimport ticrypt.admin.cli as c\n"
                 "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
                 f"    code = c.main(['--config', {env.config_path!r}, '--json', 'user', 'list'])\n"
                 "print(json.dumps({'code': code, 'out': out.getvalue(),"
                 " 'modules': sorted(sys.modules)}))")
        code, out, err = await run_command([sys.executable, "-c", probe])
        self.assertEqual(code, 0, err)
        result = json.loads(out)
        self.assertEqual((result["code"], [u["name"] for u in json.loads(result["out"])["users"]]),
                         (0, [env.admin_name]))
        heavy = ("twisted.web", "ticrypt.http.server", "ticrypt.rest.api",
                 "twisted.internet.endpoints", "twisted.internet.ssl", "OpenSSL",
                 "twisted.trial", "twisted.internet.testing", "unittest")
        self.assertEqual([m for m in result["modules"]
                          if any(m == h or m.startswith(h + ".") for h in heavy)], [])


class MigrationTests(SynchronousTestCase):
    def test_fresh_database_reaches_latest_once(self) -> None:
        path = self.mktemp()
        conn = db.connect(path, create=True)
        self.assertEqual(db.schema_version(conn), db.LATEST)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        conn.close()
        conn = db.connect(path)  # idempotent
        self.assertEqual(db.schema_version(conn), db.LATEST)
        conn.close()

    def test_version_1_database_gains_the_revocation_feed(self) -> None:
        """A database of schema 1 (before the revocation feed) is migrated:
        its disabled users enter the feed, its serial starts at 0."""
        path = self.mktemp()
        self.patch(db, "MIGRATIONS", db.MIGRATIONS[:1])
        self.patch(db, "LATEST", 1)
        conn = db.connect(path, create=True)
        for name, disabled in (("ann", 0), ("bob", 1)):
            conn.execute("INSERT INTO users (name, role, public_key, disabled, created) "
                         "VALUES (?, 'user', ?, ?, 1)", (name, b"k" * 32, disabled))
        conn.close()
        self.patch(db, "MIGRATIONS", type(self).all_migrations)
        self.patch(db, "LATEST", len(type(self).all_migrations))
        conn = db.connect(path)
        found = db.transaction(conn, store.revocations, write=False)
        conn.close()
        self.assertEqual((found.serial, list(found.users), found.sessions), (0, ["bob"], []))
        self.assertGreater(found.users["bob"], 1_700_000_000)  # the time of the upgrade

    all_migrations = db.MIGRATIONS

    def test_refuses_newer_and_foreign_databases(self) -> None:
        path = self.mktemp()
        conn = db.connect(path, create=True)
        conn.execute("UPDATE schema_version SET version = ?", (db.LATEST + 1,))
        conn.close()
        with self.assertRaises(db.DatabaseError) as e:
            db.connect(path)
        self.assertIn("newer than this ticrypt supports", str(e.exception))
        other = self.mktemp()
        sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
        with self.assertRaises(db.DatabaseError) as e:
            db.connect(other)
        self.assertIn("not a ticrypt database", str(e.exception))

    def test_failed_migration_rolls_back(self) -> None:
        path = self.mktemp()
        db.connect(path, create=True).close()
        self.patch(db, "MIGRATIONS", [*db.MIGRATIONS, ("CREATE TABLE ok_one (x)",
                                                       "THIS IS NOT SQL")])
        self.patch(db, "LATEST", len(db.MIGRATIONS))
        with self.assertRaises(db.DatabaseError):
            db.connect(path)
        conn = sqlite3.connect(path)
        self.assertEqual(conn.execute("SELECT version FROM schema_version").fetchone()[0],
                         db.LATEST - 1)
        self.assertIsNone(conn.execute(
            "SELECT name FROM sqlite_master WHERE name = 'ok_one'").fetchone())
        conn.close()
