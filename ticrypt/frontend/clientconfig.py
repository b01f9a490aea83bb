"""The client config ``~/.config/ticrypt/client.ini`` and the stored session.

``--config`` or ``$TICRYPT_CLIENT_CONFIG`` override the path.  The session
token lives in ``<state_dir>/session.json`` (mode 0600) between commands.
"""

from __future__ import annotations

import json
import os
from typing import Any

import attrs

from ticrypt.config import (
    DirPath,
    FilePath,
    Key,
    RoleConfig,
    Schema,
    Str,
    Url,
    load_config,
    schema_of,
    section,
    setting,
)
from ticrypt.fsutil import atomic_write

SECTION = "client"
SESSION_FILE = "session.json"


@attrs.frozen(kw_only=True)
class ClientSection:
    """``[client]``."""

    rest_url: str = setting(Url(), doc="https://HOST:PORT of ticrypt-rest")
    ca_file: str | None = setting(FilePath(), None, "CA certificate trusted for rest and proxy")
    key_file: str = setting(FilePath(must_exist=False), "id_ed25519",
                            "your Ed25519 private key")
    user: str = setting(Str(pattern=r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"), doc="your user name")
    state_dir: str = setting(DirPath(), "state", "where the session token is kept")


@attrs.frozen(kw_only=True)
class ConnectSection:
    """``[connect]``: where the local ticrypt-connect listens, and its token."""

    url: str = setting(Str(pattern=r"http://127\.0\.0\.1:[0-9]{1,5}"), "http://127.0.0.1:7480",
                       "ticrypt-connect's API, http://127.0.0.1:PORT")
    token_file: str = setting(Str(), "connect-state/api.token",
                              "the API token ticrypt-connect writes (its token_file)")


@attrs.frozen(kw_only=True)
class ClientConfig(RoleConfig):
    """``client.ini``."""

    client: ClientSection = section(ClientSection)
    connect: ConnectSection = section(ConnectSection, optional=True)

    def connect_token_file(self) -> str:
        """``[connect] token_file`` resolved against this file's directory
        (it need not exist until ticrypt-connect has started)."""
        path = os.path.expanduser(self.connect.token_file)
        return os.path.normpath(os.path.join(os.path.dirname(self.path), path))

    def check(self) -> None:
        c = self.client
        if c.rest_url.startswith("https:") and c.ca_file is None:
            raise self.error(SECTION, "ca_file", "missing; an https rest_url needs the CA file "
                             "that signed the rest and proxy certificates")


#: What ``ticrypt keygen`` reads: ``key_file`` alone.  The other keys are
#: known (a misspelt one is still an error) but not checked: a new user
#: creates a key before the administrator hands out the CA file, and maybe
#: before rest_url is known.
KEYGEN_SCHEMA = Schema({part: {
    name: key if name == "key_file" else Key(Str(allow_empty=True), "")
    for name, key in keys.items()}
    for part, keys in schema_of(ClientConfig).sections.items()},
    schema_of(ClientConfig).optional_sections)


def default_path() -> str:
    env = os.environ.get("TICRYPT_CLIENT_CONFIG")
    if env:
        return env
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "ticrypt", "client.ini")


def load(path: str | None = None) -> ClientConfig:
    """Load the client config (ConfigError names file, section and key)."""
    return load_config(path or default_path(), ClientConfig)


def load_key_file(path: str | None = None) -> str:
    """The ``key_file`` of the client config, all that keygen needs
    (ConfigError names file, section and key)."""
    return str(load_config(path or default_path(), KEYGEN_SCHEMA).client.key_file)


class NotLoggedIn(Exception):
    """No usable stored session; ``str()`` says what to do."""


@attrs.frozen
class StoredSession:
    rest_url: str
    user: str
    token: str
    expires: int


def session_path(cfg: ClientConfig) -> str:
    return os.path.join(cfg.client.state_dir, SESSION_FILE)


def save_session(cfg: ClientConfig, token: str, user: str, expires: int) -> None:
    data = {"rest_url": cfg.client.rest_url, "user": user, "token": token, "expires": expires}
    atomic_write(session_path(cfg), json.dumps(data).encode(), 0o600)


def clear_session(cfg: ClientConfig) -> None:
    try:
        os.unlink(session_path(cfg))
    except FileNotFoundError:
        pass


def load_session(cfg: ClientConfig, now: float | None = None) -> StoredSession:
    """The stored session for this config's rest_url; NotLoggedIn if there is
    none, it is for another server, or it has expired (when ``now`` is given)."""
    path = session_path(cfg)
    try:
        with open(path, encoding="utf-8") as f:
            data: Any = json.load(f)
        s = StoredSession(rest_url=str(data["rest_url"]), user=str(data["user"]),
                          token=str(data["token"]), expires=int(data["expires"]))
    except FileNotFoundError:
        raise NotLoggedIn("not logged in; run: ticrypt login") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise NotLoggedIn(f"{path} is unreadable; run: ticrypt login") from None
    if s.rest_url != cfg.client.rest_url:
        raise NotLoggedIn("the stored session is for another server; run: ticrypt login")
    if now is not None and s.expires <= now:
        raise NotLoggedIn("the session has expired; run: ticrypt login")
    return s
