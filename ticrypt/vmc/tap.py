"""twistd wiring for ``ticrypt-vmc``: config schema, Options, makeService.

The role itself (state, enrollment, the pool) is
:class:`ticrypt.vmc.service.VmcService`.
"""

from __future__ import annotations

import os
from typing import Any

from ticrypt.config import (
    Config,
    DirPath,
    Duration,
    FilePath,
    Int,
    Key,
    Schema,
    Size,
    Str,
    Url,
)
from ticrypt.service import options_for
from ticrypt.vmc.pool import MAX_MESSAGE, MAX_RECORD
from ticrypt.vmc.processes import RunAs
from ticrypt.vmc.service import VmcService

DEFAULT_SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"


def _validate(cfg: Config) -> None:
    v, e = cfg.vmc, cfg["exec"]
    if v.backoff_initial > v.backoff_max:
        raise cfg.error("vmc", "backoff_initial", "must not exceed backoff_max")
    if v.proxy_url and not v.proxy_url.startswith("wss://"):
        raise cfg.error("vmc", "proxy_url", f"expected a wss:// URL; got {v.proxy_url!r}")
    if not os.access(e.shell, os.X_OK):
        raise cfg.error("exec", "shell", f"{e.shell} is not an executable file")
    try:
        RunAs.lookup(e.run_as or None, e.shell)
    except KeyError:
        raise cfg.error("exec", "run_as", f"no such user {e.run_as!r}") from None


SCHEMA = Schema(
    sections={
        "vmc": {
            "rest_url": Key(Url(("https",)), doc="rest base URL"),
            "ca_file": Key(FilePath(), doc="CA that signs rest's and proxy's certificates"),
            "state_dir": Key(DirPath(), doc="keys, enrollment, owner pin, users"),
            "enrollment_token_file": Key(FilePath(must_exist=False), None,
                                         doc="single-use token file (0600)"),
            "audit_log": Key(FilePath(must_exist=False), doc="JSON-lines audit log"),
            "proxy_url": Key(Str(allow_empty=True), "", doc="override the enrolled proxy URL"),
            "pool_size": Key(Int(1, 64), "2"),
            "backoff_initial": Key(Duration(), "1s"),
            "backoff_max": Key(Duration(), "60s"),
            "connect_timeout": Key(Duration(), "10s"),
            "request_timeout": Key(Duration(), "30s"),
            "handshake_timeout": Key(Duration(), "15s"),
            "idle_timeout": Key(Duration(), "1h"),
            "ping_interval": Key(Duration(), "30s"),
            "max_message": Key(Size(min=MAX_RECORD + 1, max=16 * 1024 * 1024), str(MAX_MESSAGE),
                               doc="largest websocket message read; above the largest record"),
        },
        "exec": {
            "shell": Key(FilePath(), DEFAULT_SHELL, doc="shell for the shell command"),
            "run_as": Key(Str(allow_empty=True), "", doc="user commands run as"),
            "max_sessions": Key(Int(1, 10000), "16"),
            "max_sessions_per_user": Key(Int(1, 10000), "4"),
            "max_processes": Key(Int(1, 1000), "16"),
            "kill_grace": Key(Duration(), "3s"),
        },
        "processes": {
            "cgroup": Key(Str(pattern=r"auto|off|/.*"), "auto",
                          doc="parent cgroup of user processes: auto, off or a path"),
        },
    },
    optional_sections=frozenset({"exec", "processes"}),
    validate=_validate,
)

Options = options_for("vmc", SCHEMA)


def makeService(options: Any) -> VmcService:
    """The vmc service for twistd (no I/O here; it starts in startService)."""
    from twisted.internet import reactor

    return VmcService(options["cfg"], reactor)
