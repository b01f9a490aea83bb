"""twistd wiring for ``ticrypt-vmc``: config schema, Options, makeService.

The role itself (state, enrollment, the pool) is
:class:`ticrypt.vmc.service.VmcService`.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from ticrypt.config import (
    Config,
    DirPath,
    Duration,
    FilePath,
    Int,
    Key,
    Kind,
    Schema,
    Size,
    Str,
    Url,
)
from ticrypt.service import options_for
from ticrypt.vmc.pool import MAX_RECORD, PoolSettings
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


def _pool_key(kind: Kind, name: str, doc: str = "") -> Key:
    """The key ``name``, whose default is :class:`PoolSettings`' (each
    default exists once), written as a config file would write it."""
    return Key(kind, str(attrs.fields_dict(PoolSettings)[name].default), doc=doc)


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
            "pool_size": _pool_key(Int(1, 64), "pool_size"),
            "backoff_initial": _pool_key(Duration(), "backoff_initial"),
            "backoff_max": _pool_key(Duration(), "backoff_max"),
            "connect_timeout": _pool_key(Duration(), "connect_timeout"),
            "request_timeout": Key(Duration(), "30s"),
            "handshake_timeout": _pool_key(Duration(), "handshake_timeout"),
            "idle_timeout": _pool_key(Duration(), "idle_timeout"),
            "ping_interval": _pool_key(Duration(), "ping_interval"),
            "max_message": _pool_key(Size(min=MAX_RECORD + 1, max=16 * 1024 * 1024),
                                     "max_message", doc="largest websocket message read; "
                                     "above the largest record"),
        },
        "exec": {
            "shell": Key(FilePath(), DEFAULT_SHELL, doc="shell for the shell command"),
            "run_as": Key(Str(allow_empty=True), "", doc="user commands run as"),
            "max_sessions": _pool_key(Int(1, 10000), "max_sessions"),
            "max_sessions_per_user": _pool_key(Int(1, 10000), "max_sessions_per_user"),
            "max_processes": _pool_key(Int(1, 1000), "max_processes"),
            "kill_grace": _pool_key(Duration(), "kill_grace"),
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
