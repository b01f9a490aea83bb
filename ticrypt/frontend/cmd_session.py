"""``ticrypt`` commands that talk to a VM over the secure channel:
``exec``, ``shell``, ``authorize``, ``revoke``, ``users``, ``info``.

Each gets a connection ticket from rest, opens a secure session through the
proxy (:func:`ticrypt.frontend.session.open_session`) and, for ``exec`` and
``shell``, exits with the remote command's exit status.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ticrypt.frontend.cmd_account import load_user_key
from ticrypt.frontend.runner import CommandError, add_command, load_config, run_async, show

if TYPE_CHECKING:
    from ticrypt.frontend import terminal
    from ticrypt.frontend.client import RestClient
    from ticrypt.frontend.clientconfig import ClientConfig
    from ticrypt.frontend.errors import RemoteError
    from ticrypt.frontend.session import ChannelSession, Command
    from ticrypt.frontend.vmref import VmRef

# What a command needs to run is imported in its functions (ticrypt.frontend.commands).

#: Exit status when the command does not exist on the VM (as shells use).
NOT_FOUND = 127


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "exec", cmd_exec, "run a command on a VM", vm="VM",
                    description="Run CMD on VM; exits with its exit status.")
    p.add_argument("-n", "--no-stdin", action="store_true",
                   help="send no input (like ssh -n)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    p = add_command(subparsers, "shell", cmd_shell, "open a terminal on a VM", vm="VM")
    p.add_argument("--term", default=None, help="terminal type (default: $TERM)")

    p = add_command(subparsers, "authorize", cmd_authorize, "let another user use your VM",
                    vm="VM")
    p.add_argument("user", metavar="USER")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--key", metavar="ed25519:...", help="USER's public key")
    g.add_argument("--key-file", metavar="FILE", help="file with USER's public key")

    p = add_command(subparsers, "revoke", cmd_revoke, "take a user's access to your VM away",
                    vm="VM")
    p.add_argument("user", metavar="USER", help="user name or ed25519:... key")

    add_command(subparsers, "users", cmd_users, "list the users authorized on your VM",
                vm="VM", with_json=True)
    add_command(subparsers, "info", cmd_info, "ask a VM about itself", vm="VM", with_json=True)


async def connect(reactor: Any, cfg: ClientConfig, vm: str) -> ChannelSession:
    """Ticket from rest, then a secure session with the VM ``vm`` (its id or
    name, :func:`~ticrypt.frontend.vmref.resolve_vm`)."""
    return (await open_vm(reactor, cfg, vm))[1]


async def open_vm(reactor: Any, cfg: ClientConfig,
                  vm: str) -> tuple[VmRef, ChannelSession, RestClient]:
    """:func:`connect`, also returning the resolved VM and the signed-in
    rest client."""
    from ticrypt.frontend.client import RestError, authenticated_client
    from ticrypt.frontend.errors import SessionError
    from ticrypt.frontend.session import open_session
    from ticrypt.frontend.vmref import resolve_vm

    user_key = load_user_key(cfg)
    client = authenticated_client(reactor, cfg)
    ref = await resolve_vm(client, vm)
    vm_id = ref.id
    what = f"cannot connect to VM {vm}"
    try:
        t = await client.ticket(vm_id)
        proxy_url, ca_file = t["proxy_url"], cfg.client.ca_file
        if ca_file is None and not str(proxy_url).startswith("ws://"):
            # the config needs ca_file only with an https rest_url
            raise CommandError(what, f"{cfg.path}: [client] ca_file: missing; the proxy "
                               f"{proxy_url} needs the CA file")
        session = await open_session(reactor, proxy_url, ca_file or "", t["ticket"],
                                     user_key, vm_id, t["vm_public_key"])
        return ref, session, client
    except RestError as e:
        raise CommandError(what, str(e)) from None
    except (KeyError, TypeError, ValueError):
        raise CommandError(what, "rest answered the ticket request without the "
                           "expected fields") from None
    except SessionError as e:
        raise CommandError(what, str(e)) from None


def _run(args: argparse.Namespace, what: str, body: Any) -> int:
    from ticrypt.frontend.errors import RemoteError, SessionError

    cfg = load_config(args)

    async def run(reactor: Any) -> int:
        session = await connect(reactor, cfg, args.vm_id)
        try:
            return int(await body(reactor, session))
        except RemoteError as e:
            raise CommandError(what, f"{e.code}: {e.message}") from None
        except SessionError as e:
            raise CommandError(what, str(e)) from None
        finally:
            if session.is_open:
                await session.close()

    return run_async(what, run)


def _out(stream: Any) -> Any:
    def write(data: bytes) -> None:
        stream.buffer.write(data)
        stream.buffer.flush()
    return write


def _warn(vm_id: str, end: str = "\n") -> Any:
    """Print the VM's refusal of a message of a running command (PROTOCOL.md
    §5 Errors: the command goes on); ``end`` is ``\r\n`` on a raw terminal."""
    def warn(e: RemoteError) -> None:
        sys.stderr.write(f"ticrypt: warning: {vm_id} refused: {e.code}: {e.message}{end}")
        sys.stderr.flush()
    return warn


def _pump_stdin(reactor: Any, session: ChannelSession, cmd: Command) -> terminal.InputReader:
    from ticrypt.channel import app
    from ticrypt.frontend import terminal

    reader = terminal.InputReader(reactor, cmd.write, cmd.eof)
    terminal.enlarge_pipe(reader.fileno(), app.MAX_BODY)  # whole records per read
    # The reader pauses while the websocket is full and while the command's
    # stdin window is exhausted (the VM has not taken what was sent yet).
    session.transport.registerProducer(cmd.attach_input(reader), True)
    reader.start()

    def done(result: Any) -> Any:
        reader.stopProducing()
        if session.is_open:
            session.transport.unregisterProducer()
        return result

    cmd.done.addBoth(done)
    return reader


def cmd_exec(args: argparse.Namespace) -> int:
    from ticrypt.frontend.errors import RemoteError

    argv = list(args.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise CommandError("exec", "no command given; usage: ticrypt exec VM -- CMD [ARG...]")
    what = f"exec on {args.vm_id} failed"

    async def body(reactor: Any, session: ChannelSession) -> int:
        cmd = session.exec(argv, on_stdout=_out(sys.stdout), on_stderr=_out(sys.stderr),
                           on_warning=_warn(args.vm_id))
        if args.no_stdin:
            cmd.eof()
        else:
            _pump_stdin(reactor, session, cmd)
        previous = signal.signal(signal.SIGINT,
                                 lambda *a: reactor.callFromThread(cmd.cancel))
        try:
            return await cmd.done
        except RemoteError as e:
            if e.code == "command-not-found":
                print(f"ticrypt: {argv[0]}: command not found on {args.vm_id}",
                      file=sys.stderr)
                return NOT_FOUND
            raise
        finally:
            signal.signal(signal.SIGINT, previous)

    return _run(args, what, body)


def cmd_shell(args: argparse.Namespace) -> int:
    from ticrypt.frontend import terminal
    from ticrypt.frontend.errors import SessionError

    what = f"shell on {args.vm_id} failed"
    term = args.term or os.environ.get("TERM") or "xterm-256color"

    async def body(reactor: Any, session: ChannelSession) -> int:
        rows, cols = terminal.window_size(1) or terminal.window_size(0) or (24, 80)
        cmd = session.shell(term, rows, cols, on_output=_out(sys.stdout),
                            on_warning=_warn(args.vm_id, "\r\n"))
        try:
            await cmd.started
        except SessionError:
            cmd.done.addErrback(lambda f: None)  # the same error, reported once
            raise
        with terminal.RawMode(0) as raw:
            undo = None
            if raw.active:
                def resized() -> None:
                    size = terminal.window_size(0)
                    if size:
                        cmd.resize(*size)
                undo = terminal.on_resize(reactor, resized)
            _pump_stdin(reactor, session, cmd)
            try:
                return await cmd.done
            finally:
                if undo is not None:
                    undo()

    return _run(args, what, body)


def _user_key(args: argparse.Namespace) -> str | None:
    from ticrypt import identity

    if args.key:
        try:
            return identity.public_text(identity.parse_public(args.key))
        except ValueError:
            raise CommandError("authorize", "--key must be ed25519:<base64url>") from None
    if args.key_file:
        try:
            return identity.public_text(identity.load_public_file(args.key_file))
        except identity.KeyFileError as e:
            raise CommandError("authorize", str(e)) from None
    return None


def cmd_authorize(args: argparse.Namespace) -> int:
    from ticrypt import identity
    from ticrypt.frontend.client import RestError, authenticated_client

    what = f"cannot authorize {args.user} on {args.vm_id}"
    key = _user_key(args)
    cfg = load_config(args)

    async def lookup(reactor: Any) -> str:
        client = authenticated_client(reactor, cfg)
        try:
            users = await client.list_users()
        except RestError as e:
            raise CommandError(what, f"rest does not show you {args.user}'s key ({e.code}); "
                               f"pass --key ed25519:... or --key-file FILE") from None
        for u in users:
            if u.get("name") == args.user and isinstance(u.get("public_key"), str):
                return str(u["public_key"])
        raise CommandError(what, f"rest knows no user {args.user!r}")

    async def body(reactor: Any, session: ChannelSession) -> int:
        text = key or await lookup(reactor)
        result = await session.authorize(text, args.user)
        verb = "authorized" if result.get("added") else "updated"
        print(f"{verb} {args.user} ({identity.fingerprint(identity.parse_public(text))}) "
              f"on {args.vm_id}")
        return 0

    return _run(args, what, body)


def _ask_vm(args: argparse.Namespace, what: str,
            ask: Callable[[ChannelSession], Awaitable[Any]],
            lines: Callable[[Any], Iterable[str]]) -> int:
    """Ask the VM with ``ask(session)`` and :func:`show` the answer."""
    async def body(reactor: Any, session: ChannelSession) -> int:
        return show(args, await ask(session), lines)

    return _run(args, what, body)


def cmd_revoke(args: argparse.Namespace) -> int:
    return _ask_vm(args, f"cannot revoke {args.user} on {args.vm_id}",
                   lambda session: session.revoke(args.user),
                   lambda result: [f"revoked {result.get('name', args.user)} on {args.vm_id}"])


def cmd_users(args: argparse.Namespace) -> int:
    async def ask(session: ChannelSession) -> dict[str, Any]:
        result = await session.users()
        return {"owner": result.get("owner"), "users": result.get("users")}

    def lines(result: dict[str, Any]) -> Iterator[str]:
        owner = result["owner"] or {}
        yield f"{'NAME':<24} {'ROLE':<8} KEY"
        yield f"{str(owner.get('name')):<24} {'owner':<8} {owner.get('key')}"
        for u in result["users"] or []:
            yield f"{str(u.get('name')):<24} {'user':<8} {u.get('key')}"

    return _ask_vm(args, f"cannot list the users of {args.vm_id}", ask, lines)


def cmd_info(args: argparse.Namespace) -> int:
    async def ask(session: ChannelSession) -> dict[str, Any]:
        return {k: v for k, v in (await session.info()).items() if k not in ("t", "id")}

    return _ask_vm(args, f"cannot get info from {args.vm_id}", ask,
                   lambda result: [f"{k}: {result[k]}" for k in sorted(result)])
