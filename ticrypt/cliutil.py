"""What the command-line tools share: the one-line failure.

Every expected failure of ``ticrypt``, ``ticrypt-admin`` and their
subcommands is shown as one line, ``<prog>: <what failed>: <why>``, and
exits 1 (:func:`fail`).
"""

from __future__ import annotations

import sys


class OneLineError(Exception):
    """An expected failure: ``what`` failed because ``why``."""

    def __init__(self, what: str, why: str):
        self.what = what
        self.why = why
        super().__init__(f"{what}: {why}")


def fail(prog: str, what: str, why: str) -> int:
    """Print ``<prog>: <what>: <why>`` on stderr; return the exit code 1."""
    print(f"{prog}: {what}: {why}", file=sys.stderr)
    return 1
