"""``ticrypt-admin``: initialise the backend, manage users and VMs, make TLS files.

It opens rest's SQLite database directly (through the same migration code as
the daemon), so it works whether or not ``ticrypt-rest`` is running::

    ticrypt-admin tls init --dir etc/tls --name localhost --name 127.0.0.1
    ticrypt-admin --config etc/rest.ini init --superadmin alice --public-key alice.pub
    ticrypt-admin --config etc/rest.ini user add bob --public-key bob.pub
    ticrypt-admin --config etc/rest.ini vm add lab1 --owner bob --host 10.0.0.5:2201

Every failure prints one line ``ticrypt-admin: <what failed>: <why>`` and exits 1.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.cliutil import OneLineError, fail
from ticrypt.config import ConfigError, load_config
from ticrypt.rest import db, store
from ticrypt.rest.common import allow_entry, new_vm_id
from ticrypt.rest.config import RestAdminConfig
from ticrypt.rest.core import check_name, new_token, token_hash, valid_host

PROG = "ticrypt-admin"

T = TypeVar("T")


class AdminError(OneLineError):
    """One line for the user: ``what`` failed because ``why``."""


def _default_config() -> str:
    return os.environ.get("TICRYPT_REST_CONFIG") or os.path.join("etc", "rest.ini")


def _load(args: argparse.Namespace) -> RestAdminConfig:
    try:
        return load_config(args.config, RestAdminConfig)
    except ConfigError as e:
        raise AdminError("cannot load config", str(e)) from None


def _name(what: str, name: str) -> str:
    problem = check_name(name)
    if problem:
        raise AdminError(what, f"name {name!r} {problem}")
    return name


def _public_key(what: str, path: str) -> bytes:
    try:
        return identity.load_public_file(path)
    except identity.KeyFileError as e:
        raise AdminError(what, str(e)) from None


def _transaction(cfg: RestAdminConfig, what: str, fn: Callable[..., T], *args: Any,
                 write: bool = True) -> T:
    """``fn(conn, *args)`` in one transaction on rest's database; a database
    that cannot be opened or a refusal of the store is ``AdminError(what, why)``."""
    try:
        conn = db.connect(cfg.rest.database)
    except db.DatabaseError as e:
        raise AdminError(what, str(e)) from None
    try:
        return db.transaction(conn, fn, *args, write=write)
    except store.StoreError as e:
        raise AdminError(what, str(e)) from None
    finally:
        conn.close()


def _audit(cfg: RestAdminConfig, event: str, **fields: Any) -> None:
    # ticrypt-admin runs no event loop; the reactor is only its clock
    # (IReactorTime), the same wall clock as the time.time() of its records
    from twisted.internet import reactor

    audit = AuditLog(cfg.rest.audit_log, reactor, role="admin")
    try:
        audit.write(event, by=_actor(), **fields)
    finally:
        audit.close()


def _actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, sort_keys=True) if args.json else text)


# ---------------------------------------------------------------- commands

def cmd_init(args: argparse.Namespace) -> int:
    what = "init failed"
    cfg = _load(args)
    rest = cfg.rest
    name = _name(what, args.superadmin)
    key = _public_key(what, args.public_key)
    if os.path.exists(rest.database) and os.path.getsize(rest.database) > 0:
        raise AdminError(what, f"database {rest.database} already exists; refusing to "
                               "initialise it again")
    if os.path.exists(rest.signing_key):
        try:
            signing = identity.load_private(rest.signing_key)
        except identity.KeyFileError as e:
            raise AdminError(what, str(e)) from None
        created_key = False
    else:
        signing = identity.generate()
        identity.save_private(rest.signing_key, signing)
        created_key = True
    pub_path = os.path.join(os.path.dirname(rest.signing_key), "backend.pub")
    identity.save_public(pub_path, signing, "ticrypt-backend")
    try:
        conn = db.connect(rest.database, create=True)
    except db.DatabaseError as e:
        raise AdminError(what, str(e)) from None
    try:
        db.transaction(conn, store.add_user, name, key, "superadmin", time.time())
    finally:
        conn.close()
    _audit(cfg, "init", user=name, user_role="superadmin")
    print(f"created database {rest.database}")
    if created_key:
        print(f"created backend signing key {rest.signing_key}")
    print(f"backend public key {identity.public_text(signing)} (written to {pub_path})")
    print(f"superadmin {name}")
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    what = f"cannot add user {args.name}"
    cfg = _load(args)
    name = _name(what, args.name)
    key = _public_key(what, args.public_key)
    user = _transaction(cfg, what, store.add_user, name, key, args.role, time.time())
    _audit(cfg, "user-created", user=user.name, user_role=user.role)
    _emit(args, user.to_json(), f"added {user.role} {user.name}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    cfg = _load(args)
    users = _transaction(cfg, "cannot list users", store.list_users, write=False)
    lines = [f"{'NAME':<20} {'ROLE':<10} {'STATE':<8} KEY"]
    for u in users:
        lines.append(f"{u.name:<20} {u.role:<10} {'disabled' if u.disabled else 'active':<8} "
                     f"{identity.fingerprint(u.public_key)}")
    _emit(args, {"users": [u.to_json() for u in users]}, "\n".join(lines))
    return 0


def cmd_user_disable(args: argparse.Namespace) -> int:
    what = f"cannot disable user {args.name}"
    cfg = _load(args)
    user = _transaction(cfg, what, store.disable_user, args.name, time.time())
    _audit(cfg, "user-disabled", user=user.name)
    _emit(args, user.to_json(), f"disabled {user.name}; their sessions are revoked")
    return 0


def cmd_vm_add(args: argparse.Namespace) -> int:
    what = f"cannot add VM {args.name}"
    cfg = _load(args)
    name = _name(what, args.name)
    if not valid_host(args.host):
        raise AdminError(what, f"--host {args.host!r} is not HOST:PORT")
    token = new_token()
    vm, expires = _transaction(cfg, what, store.add_vm, new_vm_id(), name, args.owner,
                               args.host, token_hash(token), time.time(),
                               cfg.rest.api.enrollment_ttl)
    _audit(cfg, "vm-created", vm=vm.id, name=vm.name, owner=vm.owner)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
    _emit(args, {"vm": vm.to_json(), "enrollment_token": token, "enrollment_expires": expires},
          f"vm_id {vm.id}\nenrollment_token {token}\n"
          f"(single use, expires {when}; this is the only time it is shown)")
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    cfg = _load(args)
    vms = _transaction(cfg, "cannot list VMs", store.list_vms, None, write=False)
    lines = [f"{'ID':<20} {'NAME':<16} {'OWNER':<16} {'HOST':<22} STATE"]
    for v in vms:
        lines.append(f"{v.id:<20} {v.name:<16} {v.owner:<16} {v.host:<22} {v.state}")
    _emit(args, {"vms": [v.to_json() for v in vms]}, "\n".join(lines))
    return 0


def cmd_allowlist_add(args: argparse.Namespace) -> int:
    what = f"cannot allow-list {args.name}"
    cfg = _load(args)
    try:
        entry = allow_entry(args.name, args.ports, "udp" if args.udp else "tcp", args.comment)
    except ValueError as e:
        raise AdminError(what, str(e)) from None
    _transaction(cfg, what, store.add_allow_entry, entry, f"admin:{_actor()}", time.time())
    _audit(cfg, "allowlist-add", entry=entry.id, name=entry.name, ports=list(entry.ports),
           protocol=entry.protocol)
    _emit(args, entry.to_json(), f"added {entry.id}: {entry.name} {entry.protocol} "
          f"{','.join(map(str, entry.ports))}")
    return 0


def cmd_allowlist_list(args: argparse.Namespace) -> int:
    cfg = _load(args)
    serial, entries = _transaction(cfg, "cannot list the allow-list", store.allowlist_feed,
                                   write=False)
    lines = [f"{'ID':<20} {'NAME':<32} {'PROTO':<5} {'PORTS':<24} COMMENT"]
    for e in entries:
        lines.append(f"{e.id:<20} {e.name:<32} {e.protocol:<5} "
                     f"{','.join(map(str, e.ports)):<24} {e.comment}")
    _emit(args, {"serial": serial, "entries": [e.to_json() for e in entries]},
          "\n".join(lines))
    return 0


def cmd_allowlist_remove(args: argparse.Namespace) -> int:
    what = f"cannot remove allow-list entry {args.id}"
    cfg = _load(args)
    entry = _transaction(cfg, what, store.remove_allow_entry, args.id)
    _audit(cfg, "allowlist-remove", entry=entry.id, name=entry.name,
           ports=list(entry.ports), protocol=entry.protocol)
    _emit(args, entry.to_json(), f"removed {entry.id} ({entry.name} {entry.protocol})")
    return 0


def cmd_tls_init(args: argparse.Namespace) -> int:
    what = "tls init failed"
    directory = args.dir
    names = tuple(args.name or ("localhost", "127.0.0.1", "::1"))
    ca, ca_key = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    server = os.path.join(directory, "server.pem")
    for path in (ca, ca_key, server):
        if os.path.exists(path):
            raise AdminError(what, f"{path} already exists; refusing to overwrite")
    # here, not at the top: tlsutil loads Twisted's TLS endpoints, which no
    # other command needs (about a tenth of every ticrypt-admin start)
    from ticrypt import tlsutil

    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tlsutil.make_ca(ca, ca_key)
        tlsutil.make_server_cert(ca, ca_key, server, names)
    except OSError as e:
        raise AdminError(what, f"{e.filename or directory}: {e.strerror}") from None
    print(f"CA certificate {ca} (give it to clients as ca_file)")
    print(f"CA key {ca_key} (keep it offline)")
    print(f"server key+certificate {server} for {', '.join(names)}")
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Administer the ticrypt backend.")
    p.add_argument("--config", default=_default_config(),
                   help="rest.ini (default: $TICRYPT_REST_CONFIG or ./etc/rest.ini)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent: Any, name: str, func: Callable[[argparse.Namespace], int],
            help: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    def group(name: str, help: str) -> Any:
        """``ticrypt-admin NAME COMMAND``: the subparsers of NAME's commands."""
        return sub.add_parser(name, help=help).add_subparsers(
            dest=f"{name}_command", required=True, metavar="COMMAND")

    sp = add(sub, "init", cmd_init, "create the database, signing key and first superadmin")
    sp.add_argument("--superadmin", required=True, metavar="NAME")
    sp.add_argument("--public-key", required=True, metavar="FILE")

    users = group("user", "manage users")
    sp = add(users, "add", cmd_user_add, "add a user")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--public-key", required=True, metavar="FILE")
    sp.add_argument("--role", choices=store.ROLES, default="user")
    add(users, "list", cmd_user_list, "list users")
    sp = add(users, "disable", cmd_user_disable, "disable a user and end their sessions")
    sp.add_argument("name", metavar="NAME")

    vms = group("vm", "manage VMs")
    sp = add(vms, "add", cmd_vm_add, "register a VM and print its enrollment token")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--owner", required=True, metavar="USER")
    sp.add_argument("--host", required=True, metavar="HOST:PORT",
                    help="the VM host endpoint that forwards to the VM's port 22")
    add(vms, "list", cmd_vm_list, "list VMs")

    allow = group("allowlist", "license servers VMs may reach")
    sp = add(allow, "add", cmd_allowlist_add, "allow VMs to reach NAME on the given ports")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--port", dest="ports", type=int, action="append", required=True,
                    metavar="P")
    sp.add_argument("--udp", action="store_true", help="UDP instead of TCP")
    sp.add_argument("--comment", default="")
    add(allow, "list", cmd_allowlist_list, "list the allow-list and its serial")
    sp = add(allow, "remove", cmd_allowlist_remove, "remove an entry")
    sp.add_argument("id", metavar="ID")

    tls = group("tls", "TLS files")
    sp = add(tls, "init", cmd_tls_init, "create a private CA and a server certificate")
    sp.add_argument("--dir", required=True, help="directory for ca.pem, ca.key, server.pem")
    sp.add_argument("--name", action="append",
                    help="server name or IP (repeatable; default localhost, 127.0.0.1, ::1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
    except AdminError as e:
        code = fail(PROG, e.what, e.why)
    except (sqlite3.Error, db.DatabaseError) as e:
        print(f"{PROG}: database error: {e}", file=sys.stderr)
        code = 1
    except (identity.KeyFileError, ValueError) as e:
        print(f"{PROG}: {args.command} failed: {e}", file=sys.stderr)
        code = 1
    except OSError as e:
        print(f"{PROG}: {args.command} failed: {e.filename or ''} {e.strerror}",
              file=sys.stderr)
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
