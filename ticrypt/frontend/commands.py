"""Every ``ticrypt`` subcommand, registered in one place.

Each command module exposes ``register(subparsers) -> None`` and sets
``func=`` on every subparser it adds; ``func(args) -> int`` returns the exit
code.  Command modules import their helpers from
:mod:`ticrypt.frontend.runner`, never from :mod:`ticrypt.frontend.cli`,
so nothing imports back up.

Every run builds the parser of every command, so a command module imports
at its top only what ``register`` needs (argparse, the runner); what a
command uses to run (the config, keys, REST client, secure channel,
Twisted) it imports in its functions.  ``ticrypt --help`` and usage errors
then load none of it (a test checks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ticrypt.frontend import cmd_account, cmd_allowlist, cmd_page, cmd_session, cmd_tunnel

Register = Callable[[Any], None]

#: In the order ``ticrypt --help`` lists them.
REGISTER: tuple[Register, ...] = (cmd_account.register, cmd_session.register,
                                  cmd_tunnel.register, cmd_page.register,
                                  cmd_allowlist.register)


def register_all(subparsers: Any, registers: tuple[Register, ...] = REGISTER) -> None:
    for register in registers:
        register(subparsers)
