"""Synchronous queries on the database, shared by rest (on its worker
thread, through :meth:`ticrypt.rest.db.Database.run`) and ``ticrypt-admin``
(directly, through :func:`ticrypt.rest.db.transaction`).

Each function takes the connection first and runs inside the caller's
transaction.  Expected failures raise :class:`StoreError` with a stable code.
Tokens are never stored: only their SHA-256 (:func:`ticrypt.rest.core.token_hash`).
"""

from __future__ import annotations

import sqlite3
from typing import Any

import attrs

from ticrypt import identity
from ticrypt.errors import CodedError

ROLES = ("user", "superadmin")
VM_STATES = ("created", "enrolled", "disabled")


class StoreError(CodedError):
    """An expected failure: ``code`` is stable (and used as the HTTP error code)."""


@attrs.frozen
class User:
    name: str
    role: str
    public_key: bytes
    disabled: bool
    created: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role,
                "public_key": identity.public_text(self.public_key),
                "disabled": self.disabled}


@attrs.frozen
class Vm:
    id: str
    name: str
    owner: str
    owner_key: bytes
    host: str
    state: str
    public_key: bytes | None
    tls_fingerprint: str | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "owner": self.owner,
                "owner_key": identity.public_text(self.owner_key), "host": self.host,
                "state": self.state,
                "public_key": (identity.public_text(self.public_key)
                               if self.public_key is not None else None),
                "tls_fingerprint": self.tls_fingerprint}


@attrs.frozen
class Session:
    user: User
    expires: int
    revoked: bool


def _user(row: Any) -> User:
    return User(name=row[0], role=row[1], public_key=bytes(row[2]), disabled=bool(row[3]),
                created=int(row[4]))


_USER_COLS = "name, role, public_key, disabled, created"


def get_user(conn: sqlite3.Connection, name: str) -> User | None:
    row = conn.execute(f"SELECT {_USER_COLS} FROM users WHERE name = ?", (name,)).fetchone()
    return _user(row) if row else None


def list_users(conn: sqlite3.Connection) -> list[User]:
    rows = conn.execute(f"SELECT {_USER_COLS} FROM users ORDER BY name").fetchall()
    return [_user(r) for r in rows]


def count_users(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM users").fetchone()[0])


def add_user(conn: sqlite3.Connection, name: str, public_key: bytes, role: str,
             now: float) -> User:
    if role not in ROLES:
        raise StoreError("invalid-role", f"role must be one of {', '.join(ROLES)}")
    if get_user(conn, name) is not None:
        raise StoreError("user-exists", f"user {name} already exists")
    conn.execute("INSERT INTO users (name, role, public_key, disabled, created) "
                 "VALUES (?, ?, ?, 0, ?)", (name, role, public_key, int(now)))
    user = get_user(conn, name)
    assert user is not None
    return user


def disable_user(conn: sqlite3.Connection, name: str, now: float) -> User:
    """Disable ``name`` and revoke its sessions (and tell the proxies: the
    user enters the revocation feed)."""
    cur = conn.execute("UPDATE users SET disabled = 1, disabled_at = coalesce(disabled_at, ?) "
                       "WHERE name = ?", (int(now), name))
    if cur.rowcount == 0:
        raise StoreError("no-such-user", f"no user named {name}")
    conn.execute("UPDATE sessions SET revoked = ? WHERE user = ? AND revoked IS NULL",
                 (int(now), name))
    _bump_revocation_serial(conn)
    user = get_user(conn, name)
    assert user is not None
    return user


_VM_SELECT = ("SELECT v.id, v.name, v.owner, u.public_key, v.host, v.state, v.public_key, "
              "v.tls_fingerprint FROM vms v JOIN users u ON u.name = v.owner")


def _vm(row: Any) -> Vm:
    return Vm(id=row[0], name=row[1], owner=row[2], owner_key=bytes(row[3]), host=row[4],
              state=row[5], public_key=bytes(row[6]) if row[6] is not None else None,
              tls_fingerprint=row[7])


def get_vm(conn: sqlite3.Connection, vm_id: str) -> Vm | None:
    row = conn.execute(_VM_SELECT + " WHERE v.id = ?", (vm_id,)).fetchone()
    return _vm(row) if row else None


def list_vms(conn: sqlite3.Connection, owner: str | None = None) -> list[Vm]:
    if owner is None:
        rows = conn.execute(_VM_SELECT + " ORDER BY v.name").fetchall()
    else:
        rows = conn.execute(_VM_SELECT + " WHERE v.owner = ? ORDER BY v.name",
                            (owner,)).fetchall()
    return [_vm(r) for r in rows]


def add_vm(conn: sqlite3.Connection, vm_id: str, name: str, owner: str, host: str,
           token_hash: bytes, now: float, enrollment_ttl: float) -> tuple[Vm, int]:
    """Create a VM in state ``created`` and its single-use enrollment token
    (given as its hash); return the VM and the token's expiry."""
    owner_user = get_user(conn, owner)
    if owner_user is None:
        raise StoreError("no-such-user", f"no user named {owner}")
    if owner_user.disabled:
        raise StoreError("user-disabled", f"user {owner} is disabled")
    if conn.execute("SELECT 1 FROM vms WHERE name = ?", (name,)).fetchone():
        raise StoreError("vm-exists", f"a VM named {name} already exists")
    conn.execute("INSERT INTO vms (id, name, owner, host, state, created) "
                 "VALUES (?, ?, ?, ?, 'created', ?)", (vm_id, name, owner, host, int(now)))
    expires = int(now + enrollment_ttl)
    conn.execute("INSERT INTO enrollment_tokens (token_hash, vm_id, created, expires) "
                 "VALUES (?, ?, ?, ?)", (token_hash, vm_id, int(now), expires))
    vm = get_vm(conn, vm_id)
    assert vm is not None
    return vm, expires


def enroll(conn: sqlite3.Connection, token_hash: bytes, vm_key: bytes, tls_fingerprint: str,
           now: float) -> Vm:
    """Consume an enrollment token and record the VM's keys, atomically."""
    row = conn.execute("SELECT vm_id, expires, used FROM enrollment_tokens "
                       "WHERE token_hash = ?", (token_hash,)).fetchone()
    if row is None:
        raise StoreError("enrollment-token-invalid", "unknown enrollment token")
    vm_id, expires, used = row
    if used is not None:
        raise StoreError("enrollment-token-used", "enrollment token was already used")
    if expires <= now:
        raise StoreError("enrollment-token-expired", "enrollment token has expired")
    vm = get_vm(conn, vm_id)
    if vm is None or vm.state == "disabled":
        raise StoreError("vm-disabled", "the VM of this token is disabled")
    conn.execute("UPDATE enrollment_tokens SET used = ? WHERE token_hash = ?",
                 (int(now), token_hash))
    conn.execute("UPDATE vms SET state = 'enrolled', public_key = ?, tls_fingerprint = ?, "
                 "enrolled = ? WHERE id = ?", (vm_key, tls_fingerprint, int(now), vm_id))
    vm = get_vm(conn, vm_id)
    assert vm is not None
    return vm


def create_session(conn: sqlite3.Connection, token_hash: bytes, user: str, now: float,
                   ttl: float) -> int:
    expires = int(now + ttl)
    conn.execute("INSERT INTO sessions (token_hash, user, created, expires) "
                 "VALUES (?, ?, ?, ?)", (token_hash, user, int(now), expires))
    return expires


def get_session(conn: sqlite3.Connection, token_hash: bytes) -> Session | None:
    row = conn.execute(
        "SELECT u.name, u.role, u.public_key, u.disabled, u.created, s.expires, s.revoked "
        "FROM sessions s JOIN users u ON u.name = s.user WHERE s.token_hash = ?",
        (token_hash,)).fetchone()
    if row is None:
        return None
    return Session(user=_user(row[:5]), expires=int(row[5]), revoked=row[6] is not None)


def revoke_session(conn: sqlite3.Connection, token_hash: bytes, now: float) -> bool:
    cur = conn.execute("UPDATE sessions SET revoked = ? WHERE token_hash = ? "
                       "AND revoked IS NULL", (int(now), token_hash))
    if cur.rowcount > 0:
        _bump_revocation_serial(conn)
    return cur.rowcount > 0


def _bump_revocation_serial(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE revocation_serial SET serial = serial + 1")


@attrs.frozen
class Revocations:
    """What the revocation feed lists (PROTOCOL.md §3 "Revocation")."""

    serial: int
    #: disabled user -> since when
    users: dict[str, int]
    #: token hashes of revoked sessions of users who are not disabled (a
    #: disabled user's sessions are covered by the user's entry), kept until
    #: :func:`prune` deletes them, a day after they expired
    sessions: list[bytes]


def revocations(conn: sqlite3.Connection) -> Revocations:
    serial = int(conn.execute("SELECT serial FROM revocation_serial").fetchone()[0])
    users = {name: int(since or 0) for name, since in conn.execute(
        "SELECT name, disabled_at FROM users WHERE disabled = 1 ORDER BY name")}
    sessions = [bytes(row[0]) for row in conn.execute(
        "SELECT s.token_hash FROM sessions s JOIN users u ON u.name = s.user "
        "WHERE s.revoked IS NOT NULL AND u.disabled = 0")]
    return Revocations(serial=serial, users=users, sessions=sessions)


def prune(conn: sqlite3.Connection, now: float, keep: float = 86400.0) -> int:
    """Delete sessions that expired more than ``keep`` seconds ago."""
    cur = conn.execute("DELETE FROM sessions WHERE expires < ?", (int(now - keep),))
    return cur.rowcount


# -- the license-server allow-list -------------------------------------------------

#: most entries the allow-list holds (each becomes nft rules at allowedlist)
MAX_ALLOWLIST = 1000


@attrs.frozen
class AllowEntry:
    id: str
    name: str
    ports: tuple[int, ...]
    protocol: str
    comment: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "ports": list(self.ports),
                "protocol": self.protocol, "comment": self.comment}


def _entry(row: Any) -> AllowEntry:
    return AllowEntry(id=row[0], name=row[1], ports=tuple(int(p) for p in row[2].split(",")),
                      protocol=row[3], comment=row[4])


_ENTRY_COLS = "id, name, ports, protocol, comment"


def list_allowlist(conn: sqlite3.Connection) -> list[AllowEntry]:
    """Every entry, by name then protocol."""
    rows = conn.execute(f"SELECT {_ENTRY_COLS} FROM allowlist ORDER BY name, protocol")
    return [_entry(r) for r in rows.fetchall()]


def allowlist_feed(conn: sqlite3.Connection) -> tuple[int, list[AllowEntry]]:
    """(serial, entries) read in one transaction."""
    serial = int(conn.execute("SELECT serial FROM allowlist_serial").fetchone()[0])
    return serial, list_allowlist(conn)


def add_allow_entry(conn: sqlite3.Connection, entry: AllowEntry, by: str,
                    now: float) -> AllowEntry:
    """Add a (validated, canonical) entry; one per name and protocol."""
    if conn.execute("SELECT 1 FROM allowlist WHERE name = ? AND protocol = ?",
                    (entry.name, entry.protocol)).fetchone():
        raise StoreError("allowlist-entry-exists",
                         f"{entry.name} ({entry.protocol}) is already allow-listed; "
                         "remove it first to change its ports")
    if int(conn.execute("SELECT count(*) FROM allowlist").fetchone()[0]) >= MAX_ALLOWLIST:
        raise StoreError("allowlist-full", f"the allow-list holds {MAX_ALLOWLIST} entries")
    conn.execute("INSERT INTO allowlist (id, name, protocol, ports, comment, created, "
                 "created_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (entry.id, entry.name, entry.protocol, ",".join(map(str, entry.ports)),
                  entry.comment, int(now), by))
    conn.execute("UPDATE allowlist_serial SET serial = serial + 1")
    return entry


def remove_allow_entry(conn: sqlite3.Connection, entry_id: str) -> AllowEntry:
    row = conn.execute(f"SELECT {_ENTRY_COLS} FROM allowlist WHERE id = ?",
                       (entry_id,)).fetchone()
    if row is None:
        raise StoreError("no-such-entry", f"no allow-list entry {entry_id}")
    conn.execute("DELETE FROM allowlist WHERE id = ?", (entry_id,))
    conn.execute("UPDATE allowlist_serial SET serial = serial + 1")
    return _entry(row)
