"""``ticrypt`` account commands: keygen, login, logout, whoami, vm list, vm show."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ticrypt import identity
from ticrypt.config import Config, ConfigError
from ticrypt.frontend import clientconfig
from ticrypt.frontend.client import RestError, authenticated_client, client_from_config
from ticrypt.frontend.runner import CommandError, load_config, run_async

PASSPHRASE_ENV = "TICRYPT_PASSPHRASE"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("keygen", help="create your Ed25519 key pair")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--passphrase-from-env", metavar="VAR",
                   help="encrypt the key with the passphrase in environment variable VAR")
    g.add_argument("--no-passphrase", action="store_true", help="leave the key unencrypted")
    p.add_argument("--key-file", metavar="PATH",
                   help="where to write the key (default: key_file of client.ini)")
    p.set_defaults(func=cmd_keygen)

    p = subparsers.add_parser("login", help="sign in to rest with your key")
    p.set_defaults(func=cmd_login)
    p = subparsers.add_parser("logout", help="end the session")
    p.set_defaults(func=cmd_logout)
    p = subparsers.add_parser("whoami", help="show who the session belongs to")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_whoami)

    vm = subparsers.add_parser("vm", help="your VMs").add_subparsers(
        dest="vm_command", required=True, metavar="COMMAND")
    p = vm.add_parser("list", help="list your VMs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vm_list)
    p = vm.add_parser("show", help="show one VM")
    p.add_argument("vm_id", metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vm_show)


# ---------------------------------------------------------------- keys

def _new_passphrase(args: argparse.Namespace) -> bytes | None:
    if args.no_passphrase:
        return None
    if args.passphrase_from_env:
        value = os.environ.get(args.passphrase_from_env)
        if not value:
            raise CommandError("keygen failed",
                               f"environment variable {args.passphrase_from_env} is not set")
        return value.encode()
    if not sys.stdin.isatty():
        raise CommandError("keygen failed", "no terminal to ask for a passphrase; use "
                           "--passphrase-from-env VAR or --no-passphrase")
    first = getpass.getpass("Passphrase for the new key (empty for none): ")
    if first != getpass.getpass("Same passphrase again: "):
        raise CommandError("keygen failed", "the passphrases differ")
    return first.encode() or None


def _key_file(args: argparse.Namespace) -> str:
    """Where keygen writes: --key-file, else the key_file of client.ini,
    which is read alone: no CA file or rest_url is needed yet."""
    if args.key_file:
        return str(args.key_file)
    config = getattr(args, "config", None) or clientconfig.default_path()
    if not os.path.exists(config):
        raise CommandError("keygen failed", f"{config} does not exist; name the key with "
                           "--key-file PATH, or create client.ini with key_file = PATH")
    try:
        return clientconfig.load_key_file(config)
    except ConfigError as e:
        raise CommandError("cannot load client config", str(e)) from None


def cmd_keygen(args: argparse.Namespace) -> int:
    path = _key_file(args)
    pub_path = path + ".pub"
    for p in (path, pub_path):
        if os.path.exists(p):
            raise CommandError("keygen failed", f"{p} already exists; refusing to overwrite")
    parent = os.path.dirname(os.path.abspath(path))
    passphrase = _new_passphrase(args)
    key = identity.generate()
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        identity.save_private(path, key, passphrase)
        identity.save_public(pub_path, key)
    except (OSError, identity.KeyFileError) as e:
        raise CommandError("keygen failed", str(e)) from None
    print(f"private key {path} ({'encrypted' if passphrase else 'not encrypted'}, mode 0600)")
    print(f"public key  {pub_path}: {identity.public_text(key)}")
    print("give the public key to your ticrypt administrator")
    return 0


def load_user_key(cfg: Config) -> Ed25519PrivateKey:
    """The user's private key; the passphrase comes from $TICRYPT_PASSPHRASE or
    a prompt when the key is encrypted."""
    path = cfg.client.key_file
    try:
        with open(path, "rb") as f:
            encrypted = b"ENCRYPTED" in f.readline()
    except OSError as e:
        raise CommandError("cannot read your key", f"{path}: {e.strerror} "
                           "(create one with: ticrypt keygen)") from None
    passphrase = None
    if encrypted:
        env = os.environ.get(PASSPHRASE_ENV)
        if env:
            passphrase = env.encode()
        elif sys.stdin.isatty():
            passphrase = getpass.getpass(f"Passphrase for {path}: ").encode()
        else:
            raise CommandError("cannot read your key", f"{path} is encrypted; set "
                               f"{PASSPHRASE_ENV} or run from a terminal")
    try:
        return identity.load_private(path, passphrase)
    except identity.KeyFileError as e:
        raise CommandError("cannot read your key", str(e)) from None


# ---------------------------------------------------------------- session

def cmd_login(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    key = load_user_key(cfg)

    async def run(reactor: Any) -> int:
        client = client_from_config(reactor, cfg)
        result = await client.login(cfg.client.user, key)
        clientconfig.save_session(cfg, result["token"], result["user"], result["expires"])
        print(f"logged in as {result['user']} ({result['role']}) until "
              f"{_when(result['expires'])}")
        return 0

    return run_async("login failed", run)


def cmd_logout(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def run(reactor: Any) -> int:
        try:
            session = clientconfig.load_session(cfg)
        except clientconfig.NotLoggedIn:
            print("not logged in")
            return 0
        client = client_from_config(reactor, cfg, session.token)
        try:
            await client.logout()
        except RestError as e:
            if e.status != 401:  # an already dead session is logged out too
                raise
        clientconfig.clear_session(cfg)
        print(f"logged out {session.user}")
        return 0

    return run_async("logout failed", run)


def cmd_whoami(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def run(reactor: Any) -> int:
        me = await authenticated_client(reactor, cfg).me()
        print(json.dumps(me, sort_keys=True) if args.json else
              f"{me['user']} ({me['role']}) {me['public_key']}")
        return 0

    return run_async("whoami failed", run)


def cmd_vm_list(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def run(reactor: Any) -> int:
        vms = await authenticated_client(reactor, cfg).list_vms()
        if args.json:
            print(json.dumps({"vms": vms}, sort_keys=True))
            return 0
        print(f"{'ID':<20} {'NAME':<16} {'OWNER':<16} STATE")
        for v in vms:
            print(f"{v['id']:<20} {v['name']:<16} {v['owner']:<16} {v['state']}")
        return 0

    return run_async("vm list failed", run)


def cmd_vm_show(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def run(reactor: Any) -> int:
        vm = await authenticated_client(reactor, cfg).get_vm(args.vm_id)
        if args.json:
            print(json.dumps(vm, sort_keys=True))
            return 0
        for key in ("id", "name", "owner", "owner_key", "host", "state", "public_key",
                    "tls_fingerprint"):
            value = vm.get(key)
            print(f"{key + ':':<17}{'-' if value is None else value}")
        return 0

    return run_async(f"vm show {args.vm_id} failed", run)


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
