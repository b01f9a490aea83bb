"""The ``python -m ticrypt.<role>.firewall --config FILE [--delete]`` printers:
each prints the nftables transaction its role would install (or, with
``--delete``, the removal) and applies nothing.

A role gives its config class and a function from the loaded config (and
the parsed options, for a role that adds some) to its :class:`Table`;
:func:`print_table` does the rest the same way for every role: a config
that cannot be used is one line ``ticrypt-<role>: <path>: [section] key:
why`` on stderr and exit code 1, the transaction on stdout and 0.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from ticrypt.config import ConfigError, RoleConfig, load_config
from ticrypt.nft.ruleset import Table, render_delete, render_replace

__all__ = ["print_table"]

C = TypeVar("C", bound=RoleConfig)


def print_table(argv: Sequence[str] | None, *, role: str, description: str,
                config_class: type[C], table: Callable[[C, argparse.Namespace], Table],
                options: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse ``argv`` (``--config``, the role's ``options``, ``--delete``),
    load the config, print ``table(cfg, args)`` rendered; the exit code.
    ``table`` raises :class:`ConfigError` for a config it cannot turn into
    rules."""
    parser = argparse.ArgumentParser(prog=f"python -m ticrypt.{role}.firewall",
                                     description=description)
    parser.add_argument("--config", required=True, help=f"path to {role}.ini")
    if options is not None:
        options(parser)
    parser.add_argument("--delete", action="store_true", help="print the removal instead")
    args = parser.parse_args(argv)
    try:
        rules = table(load_config(args.config, config_class), args)
    except ConfigError as e:
        print(f"ticrypt-{role}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(render_delete(rules) if args.delete else render_replace(rules))
    return 0
