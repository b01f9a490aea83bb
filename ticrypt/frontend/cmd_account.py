"""``ticrypt`` account commands: keygen, login, logout, whoami, vm list, vm show."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ticrypt.frontend.runner import CommandError, add_command, load_config, run_async, show

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ticrypt.frontend.client import RestClient
    from ticrypt.frontend.clientconfig import ClientConfig

# What a command needs to run is imported in its functions (ticrypt.frontend.commands).

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

    add_command(subparsers, "login", cmd_login, "sign in to rest with your key")
    add_command(subparsers, "logout", cmd_logout, "end the session")
    add_command(subparsers, "whoami", cmd_whoami, "show who the session belongs to",
                with_json=True)

    vm = subparsers.add_parser("vm", help="your VMs").add_subparsers(
        dest="vm_command", required=True, metavar="COMMAND")
    add_command(vm, "list", cmd_vm_list, "list your VMs", with_json=True)
    add_command(vm, "show", cmd_vm_show, "show one VM", vm="VM", with_json=True)


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
    from ticrypt.config import ConfigError
    from ticrypt.frontend import clientconfig

    config = getattr(args, "config", None) or clientconfig.default_path()
    if not os.path.exists(config):
        raise CommandError("keygen failed", f"{config} does not exist; name the key with "
                           "--key-file PATH, or create client.ini with key_file = PATH")
    try:
        return clientconfig.load_key_file(config)
    except ConfigError as e:
        raise CommandError("cannot load client config", str(e)) from None


def cmd_keygen(args: argparse.Namespace) -> int:
    from ticrypt import identity

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


def load_user_key(cfg: ClientConfig) -> Ed25519PrivateKey:
    """The user's private key; the passphrase comes from $TICRYPT_PASSPHRASE or
    a prompt when the key is encrypted."""
    from ticrypt import identity

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
    from ticrypt.frontend import clientconfig
    from ticrypt.frontend.client import client_from_config

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
    from ticrypt.frontend import clientconfig
    from ticrypt.frontend.client import RestError, client_from_config

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


def _ask_rest(args: argparse.Namespace, what: str,
              ask: Callable[[RestClient], Awaitable[Any]],
              lines: Callable[[Any], Iterable[str]]) -> int:
    """Ask rest (signed in) with ``ask(client)`` and :func:`show` the answer."""
    from ticrypt.frontend.client import authenticated_client

    cfg = load_config(args)

    async def run(reactor: Any) -> int:
        return show(args, await ask(authenticated_client(reactor, cfg)), lines)

    return run_async(what, run)


def cmd_whoami(args: argparse.Namespace) -> int:
    return _ask_rest(args, "whoami failed", lambda client: client.me(),
                     lambda me: [f"{me['user']} ({me['role']}) {me['public_key']}"])


def cmd_vm_list(args: argparse.Namespace) -> int:
    async def ask(client: RestClient) -> dict[str, Any]:
        return {"vms": await client.list_vms()}

    def lines(result: dict[str, Any]) -> Iterator[str]:
        yield f"{'ID':<20} {'NAME':<16} {'OWNER':<16} STATE"
        for v in result["vms"]:
            yield f"{v['id']:<20} {v['name']:<16} {v['owner']:<16} {v['state']}"

    return _ask_rest(args, "vm list failed", ask, lines)


def cmd_vm_show(args: argparse.Namespace) -> int:
    def lines(vm: dict[str, Any]) -> Iterator[str]:
        for key in ("id", "name", "owner", "owner_key", "host", "state", "public_key",
                    "tls_fingerprint"):
            value = vm.get(key)
            yield f"{key + ':':<17}{'-' if value is None else value}"

    async def ask(client: RestClient) -> dict[str, Any]:
        from ticrypt.frontend.vmref import resolve_vm

        return await client.get_vm((await resolve_vm(client, args.vm_id)).id)

    return _ask_rest(args, f"vm show {args.vm_id} failed", ask, lines)


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
