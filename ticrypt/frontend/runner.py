"""What every ``ticrypt`` command shares: how it fails and how it runs.

Commands that talk to the network end with ``return run_async(what, fn)``:
``fn(reactor)`` is the command's coroutine, which :func:`run_async` runs
under ``twisted.internet.task.react``; expected failures become one line::

    ticrypt: <what failed>: <why>

(exit 1; usage errors exit 2).  :func:`call_on` runs a command on a reactor
that already runs instead (a test's, in-process): the same code, its
coroutine awaited there.  :func:`load_config` reads the client config; for
an authenticated REST client use
:func:`ticrypt.frontend.client.authenticated_client`.
"""

from __future__ import annotations

import argparse
import contextvars
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from ticrypt import cliutil
from ticrypt.cliutil import OneLineError

if TYPE_CHECKING:
    from ticrypt.frontend.clientconfig import ClientConfig

# The config, the REST client and Twisted are imported by the functions that
# use them, as in the command modules: ``ticrypt --help`` and a usage error
# load none of them (under 0.1 s of CPU instead of about 0.5 s).

PROG = "ticrypt"

#: A command's network part: ``await fn(reactor)`` is its exit code.
CommandBody = Callable[[Any], Awaitable[int]]

#: Set by :func:`call_on` while a command's synchronous part runs: where
#: :func:`run_async` leaves the coroutine for :func:`call_on` to await.
_on_reactor: contextvars.ContextVar[list[tuple[str, CommandBody]] | None] = (
    contextvars.ContextVar("ticrypt_on_reactor", default=None))


class CommandError(OneLineError):
    """An expected failure: ``what`` failed because ``why``."""


def fail(what: str, why: str) -> int:
    """Print ``ticrypt: <what>: <why>``; return the exit code 1."""
    return cliutil.fail(PROG, what, why)


def add_command(subparsers: Any, name: str, func: Callable[[argparse.Namespace], int],
                help: str, *, vm: str | None = None, with_json: bool = False,
                **kwargs: Any) -> argparse.ArgumentParser:
    """Add subcommand ``name`` that runs ``func(args)``: with a positional
    ``vm_id`` shown as ``vm`` if given, and a ``--json`` switch if ``with_json``."""
    p = subparsers.add_parser(name, help=help, **kwargs)
    if vm is not None:
        p.add_argument("vm_id", metavar=vm, help="the VM's id or name")
    if with_json:
        p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)
    return p


def show(args: argparse.Namespace, result: Any, lines: Callable[[Any], Iterable[str]]) -> int:
    """Print ``result`` as one line of sorted JSON with ``--json``, else
    ``lines(result)``; return the exit code 0."""
    if getattr(args, "json", False):
        print(json.dumps(result, sort_keys=True))
    else:
        for line in lines(result):
            print(line)
    return 0


def load_config(args: argparse.Namespace) -> ClientConfig:
    """The client config named by ``--config`` / $TICRYPT_CLIENT_CONFIG / default."""
    from ticrypt.config import ConfigError
    from ticrypt.frontend import clientconfig

    try:
        return clientconfig.load(getattr(args, "config", None))
    except ConfigError as e:
        raise CommandError("cannot load client config", str(e)) from None


async def run_on(reactor: Any, what: str, fn: CommandBody) -> int:
    """``await fn(reactor)``; its exit code.  CommandError, RestError and
    NotLoggedIn become ``ticrypt: <what>: <why>`` and exit code 1 (``what``
    is used when the error has no ``what`` of its own)."""
    from ticrypt.frontend import clientconfig
    from ticrypt.frontend.client import RestError

    try:
        return await fn(reactor)
    except CommandError as e:
        return fail(e.what, e.why)
    except (RestError, clientconfig.NotLoggedIn) as e:
        return fail(what, str(e))


def run_async(what: str, fn: CommandBody) -> int:
    """Run :func:`run_on` under ``task.react``; return its exit code.  A
    command returns this at once (under :func:`call_on` the coroutine runs
    after the command returned)."""
    pending = _on_reactor.get()
    if pending is not None:
        pending.append((what, fn))
        return 0

    from twisted.internet import defer, task

    async def body(reactor: Any) -> None:
        code = await run_on(reactor, what, fn)
        if code:
            raise SystemExit(code)

    try:
        task.react(lambda reactor: defer.ensureDeferred(body(reactor)))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


async def call_on(reactor: Any, command: Callable[[], int]) -> int:
    """Run ``command()`` (a ``ticrypt`` command, ``cli.main`` with its argv
    say) on ``reactor``, which already runs: its coroutine, if it reaches
    :func:`run_async`, is awaited here instead of under ``task.react``.
    The exit code, as the console script's."""
    pending: list[tuple[str, CommandBody]] = []
    token = _on_reactor.set(pending)
    try:
        code = command()
    finally:
        _on_reactor.reset(token)
    if not pending:
        return code
    [(what, fn)] = pending
    return await run_on(reactor, what, fn)
