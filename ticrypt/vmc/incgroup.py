"""Launcher: join a cgroup, then become the user's command.

    python -I -S incgroup.py --cgroup DIR [--setsid] [--user NAME --uid N --gid N] \\
        -- EXE ARGV0 [ARG...]

vmc spawns every exec and shell through this file (see
:mod:`ticrypt.vmc.cgroup`).  In order, before anything of the user's runs:

1. write its own pid to ``DIR/cgroup.procs`` (so the command and everything
   it ever starts is in the request's cgroup, whatever it does later:
   ``setsid``, double forks, daemons);
2. with ``--setsid``: lead a new session and process group (exec requests;
   for a shell Twisted already made the PTY's session);
3. with ``--uid``: drop to the user (supplementary groups, gid, uid); this
   comes after step 1 because only vmc's user may move a process into a
   cgroup it owns;
4. ``execv(EXE, [ARGV0, ARG...])``.

If any step fails the command does not run: one line on stderr, exit 126.

Why a launcher: Twisted's ``spawnProcess`` has no ``preexec_fn`` hook, and
Python (3.11) exposes neither ``clone3(CLONE_INTO_CGROUP)`` nor a safe way
to call it (a raw clone from a Python process skips the interpreter's fork
handling).  This file uses the standard library only and is run by path
with ``-I -S`` (no site packages, no ``PYTHON*`` variables from the user's
environment), so it starts in about 15 ms.
"""

from __future__ import annotations

import os
import sys

#: Exit status when the launcher cannot start the command (as shells use
#: for "found but cannot execute").
CANNOT_START = 126


def _fail(message: str) -> None:
    try:
        os.write(2, f"ticrypt-vmc: cannot start the command: {message}\n".encode(
            "utf-8", "replace"))
    finally:
        os._exit(CANNOT_START)


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """(options, command) from the launcher's arguments; ValueError if malformed."""
    options: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            command = argv[i + 1:]
            if len(command) < 2:
                raise ValueError("no command after --")
            return options, command
        if arg == "--setsid":
            options["setsid"] = "1"
            i += 1
        elif arg in ("--cgroup", "--user", "--uid", "--gid") and i + 1 < len(argv):
            options[arg[2:]] = argv[i + 1]
            i += 2
        else:
            raise ValueError(f"unknown argument {arg!r}")
    raise ValueError("no -- before the command")


def main(argv: list[str]) -> None:
    try:
        options, command = parse(argv)
    except ValueError as e:
        _fail(str(e))
        return
    if "cgroup" in options:
        try:
            with open(os.path.join(options["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            _fail(f"cannot join its cgroup ({e.strerror})")
    if "setsid" in options:
        try:
            os.setsid()
        except OSError as e:
            _fail(f"cannot start a session ({e.strerror})")
    if "uid" in options:
        try:
            uid, gid = int(options["uid"]), int(options["gid"])
            os.initgroups(options["user"], gid)
            os.setgid(gid)
            os.setuid(uid)
        except (KeyError, ValueError, OSError) as e:
            _fail(f"cannot switch to the user ({getattr(e, 'strerror', None) or e})")
    try:
        os.execv(command[0], command[1:])
    except OSError as e:
        _fail(f"{command[0]}: {e.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])
