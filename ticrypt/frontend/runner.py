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
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ticrypt.config import Config, ConfigError
from ticrypt.frontend import clientconfig
from ticrypt.frontend.client import RestError

PROG = "ticrypt"


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
