"""What every ``ticrypt`` command shares: how it fails and how it runs.

Commands that talk to the network call :func:`run_async`, which runs the
reactor with ``twisted.internet.task.react`` and turns expected failures
into one line::

    ticrypt: <what failed>: <why>

(exit 1; usage errors exit 2).  :func:`load_config` reads the client config;
for an authenticated REST client use
:func:`ticrypt.frontend.client.authenticated_client`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ticrypt import cliutil
from ticrypt.cliutil import OneLineError
from ticrypt.config import ConfigError
from ticrypt.frontend import clientconfig
from ticrypt.frontend.client import RestError
from ticrypt.frontend.clientconfig import ClientConfig

PROG = "ticrypt"


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
    try:
        return clientconfig.load(getattr(args, "config", None))
    except ConfigError as e:
        raise CommandError("cannot load client config", str(e)) from None


def run_async(what: str, fn: Callable[[Any], Awaitable[int]]) -> int:
    """Run ``await fn(reactor)`` under ``task.react``; return its exit code.

    CommandError, RestError and NotLoggedIn become ``ticrypt: <what>: <why>``
    and exit code 1 (``what`` is used when the error has no ``what`` of its own).
    """
    from twisted.internet import defer, task

    async def body(reactor: Any) -> None:
        try:
            code = await fn(reactor)
        except CommandError as e:
            code = fail(e.what, e.why)
        except (RestError, clientconfig.NotLoggedIn) as e:
            code = fail(what, str(e))
        if code:
            raise SystemExit(code)

    try:
        task.react(lambda reactor: defer.ensureDeferred(body(reactor)))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0
