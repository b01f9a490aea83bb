"""The config of ``rest.ini`` (documented key by key in ``etc/rest.ini``).

``[rest]`` is :class:`RestSection`; its lifetimes and login limits are the
API's own :class:`~ticrypt.rest.common.ApiSettings`, handed to
:class:`~ticrypt.rest.api.RestApi` as they are (``ticrypt-admin`` loads this
module: it does not import the API and its HTTP layer).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import attrs

from ticrypt import identity
from ticrypt.config import (
    Bool,
    ConfigError,
    Duration,
    FilePath,
    Int,
    OptionalUrl,
    RoleConfig,
    ServerEndpoint,
    Size,
    Url,
    group,
    section,
    setting,
)
from ticrypt.http import load_secret
from ticrypt.rest.common import ApiSettings

SECTION = "rest"


_Error = Callable[[str, "str | None", str], ConfigError]


@attrs.frozen(kw_only=True)
class RestSection:
    """``[rest]``."""

    listen: str = setting(ServerEndpoint(), doc="where rest listens (ssl: endpoint)")
    allow_plain_http: bool = setting(Bool(), False, "allow a tcp: listen endpoint (tests only)")
    database: str = setting(FilePath(must_exist=False), doc="SQLite database file")
    signing_key: str = setting(FilePath(must_exist=False),
                               doc="backend Ed25519 private key (0600)")
    audit_log: str = setting(FilePath(must_exist=False), doc="JSON-lines audit log")
    proxy_url: str = setting(Url(schemes=("wss", "ws")),
                             doc="proxy websocket URL given to clients")
    max_body: int = setting(Size(min=1024, max=16 * 1024 * 1024), 64 * 1024,
                            "largest request body")
    api: ApiSettings = group(ApiSettings)
    idle_timeout: float = setting(Duration(min=1, max=3600), 60.0,
                                  "close idle HTTP connections")
    max_connections: int = setting(Int(1, 1000000), 1000, "open HTTP connections in total")
    max_connections_per_address: int = setting(
        Int(1, 1000000), 64, "open HTTP connections from one client address")
    request_timeout: float = setting(Duration(min=1, max=3600), 30.0,
                                     "time for a whole request to arrive from its first byte")
    revocation_feed_secret: str | None = setting(
        FilePath(secret=True), None,
        "bearer secret of GET /v1/revocations (shared with the proxy); unset: the feed is off")
    allowlist_feed_secret: str | None = setting(
        FilePath(secret=True), None,
        "bearer secret of GET /v1/allowlist/feed (shared with ticrypt-allowedlist); "
        "unset: the feed is off")
    proxy_control_url: str | None = setting(
        OptionalUrl(), None, "the proxy's control API (pathways), or off")
    proxy_control_ca_file: str | None = setting(
        FilePath(), None, "CA that signs the proxy control API's certificate")
    proxy_control_timeout: float = setting(Duration(min=0.1, max=600), 10.0,
                                           "deadline of one control API request")

    def check_common(self, error: _Error) -> None:
        """The checks ``ticrypt-admin`` needs too (before ``init`` made the
        key and the database)."""
        kind = self.listen.split(":", 1)[0]
        if kind != "ssl" and not self.allow_plain_http:
            raise error(SECTION, "allow_plain_http",
                        f"listen is a plain {kind}: endpoint; use an ssl: endpoint, "
                        "or set allow_plain_http = yes (tests only)")
        if self.proxy_url.startswith("ws:") and not self.allow_plain_http:
            raise error(SECTION, "proxy_url", "ws:// needs allow_plain_http = yes; use wss://")
        if os.path.abspath(self.database) == os.path.abspath(self.signing_key):
            raise error(SECTION, "signing_key", "must not be the database file")
        if self.proxy_control_url is not None:
            if self.proxy_control_url.startswith("https:") and self.proxy_control_ca_file is None:
                raise error(SECTION, "proxy_control_ca_file",
                            "an https proxy_control_url needs the CA file")
            if self.proxy_control_url.startswith("http:") and not self.allow_plain_http:
                raise error(SECTION, "proxy_control_url",
                            "http:// needs allow_plain_http = yes; use https://")
        for key in ("revocation_feed_secret", "allowlist_feed_secret"):
            path = getattr(self, key)
            if path is not None:
                try:
                    load_secret(path)
                except ValueError as e:
                    raise error(SECTION, key, str(e)) from None


@attrs.frozen(kw_only=True)
class RestConfig(RoleConfig):
    """``rest.ini`` for the daemon: the signing key and the database must exist."""

    rest: RestSection = section(RestSection)

    def check(self) -> None:
        rest = self.rest
        rest.check_common(self.error)
        try:
            identity.load_private(rest.signing_key)
        except identity.KeyFileError as e:
            raise self.error(SECTION, "signing_key",
                             f"{e} (ticrypt-admin init creates it)") from None
        if not os.path.exists(rest.database):
            raise self.error(SECTION, "database",
                             f"{rest.database} does not exist; create it with ticrypt-admin init")


@attrs.frozen(kw_only=True)
class RestAdminConfig(RoleConfig):
    """``rest.ini`` for ``ticrypt-admin``: ``init`` creates the key and
    database; ``listen`` is rest's, not parsed (the TLS key and certificate
    are not loaded)."""

    parse_endpoints = False
    rest: RestSection = section(RestSection)

    def check(self) -> None:
        self.rest.check_common(self.error)
