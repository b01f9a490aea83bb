"""Schema of ``rest.ini`` (documented key by key in ``etc/rest.ini``)."""

from __future__ import annotations

import os

from ticrypt import identity
from ticrypt.config import (
    Bool,
    Config,
    Duration,
    FilePath,
    Int,
    Key,
    Schema,
    ServerEndpoint,
    Size,
    Url,
)
from ticrypt.http import load_secret

SECTION = "rest"

_KEYS = {
    "listen": Key(ServerEndpoint(), doc="where rest listens (ssl: endpoint)"),
    "allow_plain_http": Key(Bool(), False, "allow a tcp: listen endpoint (tests only)"),
    "database": Key(FilePath(must_exist=False), doc="SQLite database file"),
    "signing_key": Key(FilePath(must_exist=False), doc="backend Ed25519 private key (0600)"),
    "audit_log": Key(FilePath(must_exist=False), doc="JSON-lines audit log"),
    "proxy_url": Key(Url(schemes=("wss", "ws")), doc="proxy websocket URL given to clients"),
    "max_body": Key(Size(min=1024, max=16 * 1024 * 1024), "64KiB", "largest request body"),
    "session_ttl": Key(Duration(min=1, max=30 * 86400), "8h", "session lifetime"),
    "challenge_ttl": Key(Duration(min=1, max=600), "60s", "login challenge lifetime"),
    "ticket_ttl": Key(Duration(min=1, max=3600), "60s", "connection ticket lifetime"),
    "enrollment_ttl": Key(Duration(min=1, max=30 * 86400), "24h", "enrollment token lifetime"),
    "login_window": Key(Duration(min=1, max=86400), "5m", "window of the login rate limits"),
    "login_failures_per_address": Key(Int(1, 100000), "20",
                                      "failed logins and enrollments per address"),
    "login_failures_per_user_and_address": Key(
        Int(1, 100000), "10", "failed logins for one user name from one address"),
    "challenges_per_address": Key(Int(1, 100000), "64", "outstanding challenges per address"),
    "idle_timeout": Key(Duration(min=1, max=3600), "60s", "close idle HTTP connections"),
    "max_connections": Key(Int(1, 1000000), "1000", "open HTTP connections in total"),
    "max_connections_per_address": Key(Int(1, 1000000), "64",
                                       "open HTTP connections from one client address"),
    "request_timeout": Key(Duration(min=1, max=3600), "30s",
                           "time for a whole request to arrive from its first byte"),
    "revocation_feed_secret": Key(FilePath(secret=True), None,
                                  "bearer secret of GET /v1/revocations (shared with "
                                  "the proxy); unset: the feed is off"),
}


def _validate_common(cfg: Config) -> None:
    rest = cfg.rest
    kind = rest.listen.split(":", 1)[0]
    if kind != "ssl" and not rest.allow_plain_http:
        raise cfg.error(SECTION, "allow_plain_http",
                        f"listen is a plain {kind}: endpoint; use an ssl: endpoint, "
                        "or set allow_plain_http = yes (tests only)")
    if rest.proxy_url.startswith("ws:") and not rest.allow_plain_http:
        raise cfg.error(SECTION, "proxy_url",
                        "ws:// needs allow_plain_http = yes; use wss://")
    if os.path.abspath(rest.database) == os.path.abspath(rest.signing_key):
        raise cfg.error(SECTION, "signing_key", "must not be the database file")
    if rest.revocation_feed_secret is not None:
        try:
            load_secret(rest.revocation_feed_secret)
        except ValueError as e:
            raise cfg.error(SECTION, "revocation_feed_secret", str(e)) from None


def _validate_daemon(cfg: Config) -> None:
    _validate_common(cfg)
    rest = cfg.rest
    try:
        identity.load_private(rest.signing_key)
    except identity.KeyFileError as e:
        raise cfg.error(SECTION, "signing_key",
                        f"{e} (ticrypt-admin init creates it)") from None
    if not os.path.exists(rest.database):
        raise cfg.error(SECTION, "database",
                        f"{rest.database} does not exist; create it with ticrypt-admin init")


#: Schema for the daemon: the signing key and the database must exist.
SCHEMA = Schema({SECTION: _KEYS}, validate=_validate_daemon)

#: Schema for ``ticrypt-admin``: ``init`` creates the key and database.
ADMIN_SCHEMA = Schema({SECTION: _KEYS}, validate=_validate_common)
