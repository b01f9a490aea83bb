"""The SQLite database: versioned forward migrations and a one-thread runner.

Both ``ticrypt-rest`` and ``ticrypt-admin`` open the file through
:func:`connect`, which applies pending migrations, so the two can never
disagree about the schema.  The daemon runs every transaction in a single
worker thread (:class:`Database`); each request's changes are committed (WAL,
``synchronous=FULL``) before its response is written.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from ticrypt.service import StartupError

T = TypeVar("T")

#: Ordered forward migrations; migration N brings the schema to version N.
#: Never edit a released entry: append a new one.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            role TEXT NOT NULL CHECK (role IN ('user', 'superadmin')),
            public_key BLOB NOT NULL CHECK (length(public_key) = 32),
            disabled INTEGER NOT NULL DEFAULT 0,
            created INTEGER NOT NULL)""",
        """CREATE TABLE vms (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            owner TEXT NOT NULL REFERENCES users(name),
            host TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('created', 'enrolled', 'disabled')),
            public_key BLOB,
            tls_fingerprint TEXT,
            created INTEGER NOT NULL,
            enrolled INTEGER)""",
        "CREATE INDEX vms_owner ON vms(owner)",
        """CREATE TABLE enrollment_tokens (
            token_hash BLOB PRIMARY KEY,
            vm_id TEXT NOT NULL REFERENCES vms(id),
            created INTEGER NOT NULL,
            expires INTEGER NOT NULL,
            used INTEGER)""",
        """CREATE TABLE sessions (
            token_hash BLOB PRIMARY KEY,
            user TEXT NOT NULL REFERENCES users(name),
            created INTEGER NOT NULL,
            expires INTEGER NOT NULL,
            revoked INTEGER)""",
        "CREATE INDEX sessions_expires ON sessions(expires)",
    ),
    (
        # 2: the revocation feed (PROTOCOL.md §3 "Revocation"): since when a
        # user is disabled, a serial bumped by every disable and logout, and
        # the revoked sessions found without a table scan.
        "ALTER TABLE users ADD COLUMN disabled_at INTEGER",
        "UPDATE users SET disabled_at = CAST(strftime('%s', 'now') AS INTEGER) "
        "WHERE disabled = 1",
        "CREATE TABLE revocation_serial (serial INTEGER NOT NULL)",
        "INSERT INTO revocation_serial VALUES (0)",
        "CREATE INDEX sessions_revoked ON sessions(revoked) WHERE revoked IS NOT NULL",
    ),
    (
        # 3: the license-server allow-list (PROTOCOL.md §1.1 "Allow-list"):
        # entries, one per (name, protocol), and a serial bumped by every
        # change, which the allowedlist daemon's feed carries.
        """CREATE TABLE allowlist (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            protocol TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp')),
            ports TEXT NOT NULL,
            comment TEXT NOT NULL,
            created INTEGER NOT NULL,
            created_by TEXT NOT NULL,
            UNIQUE (name, protocol))""",
        "CREATE TABLE allowlist_serial (serial INTEGER NOT NULL)",
        "INSERT INTO allowlist_serial VALUES (0)",
    ),
]

LATEST = len(MIGRATIONS)


class DatabaseError(Exception):
    """The database file is missing, foreign or too new; ``str()`` says which."""


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'"
    ).fetchone()
    if row is None:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations, each in its own transaction; return the version."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = schema_version(conn)
            if version > LATEST:
                raise DatabaseError(
                    f"database schema version {version} is newer than this ticrypt "
                    f"supports ({LATEST}); upgrade ticrypt")
            if version == LATEST:
                conn.execute("COMMIT")
                return version
            if version == 0:
                foreign = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
                if foreign:
                    raise DatabaseError("not a ticrypt database (tables without schema_version)")
                conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO schema_version VALUES (0)")
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("UPDATE schema_version SET version = ?", (version + 1,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def connect(path: str, create: bool = False) -> sqlite3.Connection:
    """Open (or, with ``create``, create 0600) the database and migrate it.

    The connection is in autocommit mode; use :func:`transaction`.
    """
    if not create and not os.path.exists(path):
        raise DatabaseError(f"{path} does not exist; create it with ticrypt-admin init")
    if create:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
    try:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL").fetchone()
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn)
    except sqlite3.DatabaseError as e:
        raise DatabaseError(f"{path}: {e}") from None
    return conn


def transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any,
                write: bool = True) -> T:
    """Run ``fn(conn, *args)`` in one transaction: committed if it returns,
    rolled back if it raises."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        result = fn(conn, *args)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class Database(Service):
    """The daemon's database: one connection used from one worker thread."""

    def __init__(self, reactor: Any, path: str):
        self._reactor = reactor
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="ticrypt-rest-db")

    def startService(self) -> None:
        # Opening and migrating happens here, synchronously, so that a broken
        # database stops twistd at start instead of failing the first request.
        try:
            self._conn = connect(self.path)
        except DatabaseError as e:
            raise StartupError(str(e), "rest", "database") from None
        self._pool.start()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        d = deferToThreadPool(self._reactor, self._pool, self._close)
        d.addBoth(lambda _: self._pool.stop())
        return d

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run(self, fn: Callable[..., T], *args: Any, write: bool = True) -> defer.Deferred[T]:
        """``fn(conn, *args)`` in one transaction on the worker thread."""
        if self._conn is None:
            return defer.fail(DatabaseError("database is closed"))
        return deferToThreadPool(self._reactor, self._pool, transaction, self._conn, fn,
                                 *args, write=write)
