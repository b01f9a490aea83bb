"""The ``ticrypt`` command line.

Subcommands come from the modules in :data:`COMMAND_MODULES`; each exposes
``register(subparsers) -> None`` and sets ``func=`` on every subparser it adds.
``func(args) -> int`` returns the exit code.  Commands that talk to the
network call :func:`run_async`, which runs the reactor with
``twisted.internet.task.react`` and turns expected failures into one line::

    ticrypt: <what failed>: <why>

(exit 1; usage errors exit 2).  Helpers for command modules: :func:`load_config`,
:class:`CommandError`, :func:`run_async`; for an authenticated REST client use
:func:`ticrypt.frontend.client.authenticated_client`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ticrypt.config import Config, ConfigError
from ticrypt.frontend import clientconfig
from ticrypt.frontend.client import RestError

PROG = "ticrypt"

#: Modules contributing subcommands; missing optional ones are skipped.
COMMAND_MODULES = ("ticrypt.frontend.cmd_account", "ticrypt.frontend.cmd_session")


class CommandError(Exception):
    """An expected failure: ``what`` failed because ``why``."""

    def __init__(self, what: str, why: str):
        self.what = what
        self.why = why
        super().__init__(f"{what}: {why}")


def fail(what: str, why: str) -> int:
    print(f"{PROG}: {what}: {why}", file=sys.stderr)
    return 1


def load_config(args: argparse.Namespace) -> Config:
    """The client config named by ``--config`` / $TICRYPT_CLIENT_CONFIG / default."""
    try:
        return clientconfig.load(getattr(args, "config", None))
    except ConfigError as e:
        raise CommandError("cannot load client config", str(e)) from None


def run_async(what: str, fn: Callable[[Any], Awaitable[int]]) -> int:
    """Run ``await fn(reactor)`` under ``task.react``; return its exit code.

    CommandError, RestError and SessionError become ``ticrypt: <what>: <why>``
    and exit code 1 (``what`` is used when the error has no ``what`` of its own).
    """
    from twisted.internet import defer, task

    async def body(reactor: Any) -> None:
        try:
            code = await fn(reactor)
        except CommandError as e:
            code = fail(e.what, e.why)
        except (RestError, clientconfig.SessionError) as e:
            code = fail(what, str(e))
        if code:
            raise SystemExit(code)

    try:
        task.react(lambda reactor: defer.ensureDeferred(body(reactor)))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="ticrypt secure VM access.")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="client.ini (default: $TICRYPT_CLIENT_CONFIG or "
                             "~/.config/ticrypt/client.ini)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CommandError as e:
        return fail(e.what, e.why)
    except KeyboardInterrupt:
        return fail(args.command, "interrupted")


if __name__ == "__main__":
    sys.exit(main())
