"""The ``ticrypt`` command line: the parser and :func:`main`.

The subcommands come from :mod:`ticrypt.frontend.commands`; how they run
and fail (one line, exit 1; usage errors exit 2) is
:mod:`ticrypt.frontend.runner`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ticrypt.frontend.commands import REGISTER, Register, register_all
from ticrypt.frontend.runner import PROG, CommandError, fail


def build_parser(registers: tuple[Register, ...] = REGISTER) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="ticrypt secure VM access.")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="client.ini (default: $TICRYPT_CLIENT_CONFIG or "
                             "~/.config/ticrypt/client.ini)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_all(sub, registers)
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
