"""ticrypt-connect's config (documented key by key in ``etc/connect.ini``).

``[connect]`` is the local API (:class:`ConnectSection`); ``[tunnels]``
(optional) the tunnels' own :class:`TunnelSettings` and ``[page]``
(optional) the browser page's :class:`PageSettings` (with the frame
budget's :class:`~ticrypt.framebudget.FrameLimits` for the page's
websocket), so each default is written once, in the class that uses it.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import attrs

from ticrypt.config import (
    DirPath,
    Duration,
    FilePath,
    Int,
    OptionalUrl,
    RoleConfig,
    ServerEndpoint,
    Size,
    group,
    section,
    setting,
)
from ticrypt.framebudget import FrameLimits

#: Where the API and every local listener may listen: this machine only.
LOOPBACK = "127.0.0.1"


@attrs.frozen(kw_only=True)
class ConnectSection:
    """``[connect]``: the local API, its token and connect's files."""

    listen: str = setting(ServerEndpoint(), "tcp:7480:interface=127.0.0.1",
                          "local API listener (tcp on 127.0.0.1 only)")
    state_dir: str = setting(DirPath(), "connect-state",
                             "tunnel client keys and certificates (0700)")
    token_file: str = setting(FilePath(must_exist=False), "connect-state/api.token",
                              "API token written here at start (0600)")
    audit_log: str = setting(FilePath(must_exist=False), "connect-audit.log",
                             "JSON-lines audit log")
    max_body: int = setting(Size(min=1024, max=1024 * 1024), 65536,
                            "largest API request body")
    idle_timeout: float = setting(Duration(), 60.0, "idle API connection closed after")
    request_timeout: float = setting(Duration(), 30.0, "an API request must arrive within")
    max_connections: int = setting(Int(1, 4096), 64, "open API connections at most")


@attrs.frozen(kw_only=True)
class TunnelSettings:
    """``[tunnels]``: limits and timers of the tunnels."""

    max_tunnels: int = setting(Int(1, 1024), 32, "tunnels open at once")
    max_forwards: int = setting(Int(1, 256), 32, "forwarded ports per tunnel")
    max_certs: int = setting(Int(1, 4096), 256, "client certificates kept")
    cert_lifetime: float = setting(Duration(min=60), 30 * 86400.0,
                                   "validity of a tunnel client certificate")
    connect_timeout: float = setting(Duration(), 15.0,
                                     "TCP+TLS to the proxy, and a stream's open")
    idle_timeout: float = setting(Duration(), 6 * 3600.0,
                                  "a local connection idle this long is closed")
    reconnect_initial: float = setting(Duration(), 0.5, "first delay before reconnecting")
    reconnect_max: float = setting(Duration(), 30.0, "longest delay before reconnecting")
    max_waiting: int = setting(Int(1, 100000), 256,
                               "local connections waiting for a tunnel that is down")


@attrs.frozen(kw_only=True)
class PageSettings:
    """``[page]``: the browser page connect serves and its relays to rest
    and the proxy (off without ``rest_url``)."""

    rest_url: str | None = setting(OptionalUrl(allow_empty=True), None,
                                   "rest's URL the page's REST calls are relayed to "
                                   "(empty: no page)")
    ca_file: str | None = setting(FilePath(), None,
                                  "CA that signs rest's and the proxy's certificates")
    link_ttl: float = setting(Duration(min=1), 600.0, "a one-time sign-in link expires after")
    session_ttl: float = setting(Duration(min=60), 12 * 3600.0,
                                 "a page token (the page's session with connect) lasts")
    max_relays: int = setting(Int(1, 4096), 32, "websocket relays to the proxy open at once")
    handshake_timeout: float = setting(Duration(), 15.0,
                                       "connection to the proxy (TCP, TLS, websocket) within")
    max_message: int = setting(Size(min=1024 * 1024 + 4096, max=64 * 1024 * 1024),
                               2 * 1024 * 1024, "largest websocket message relayed")
    rest_timeout: float = setting(Duration(), 30.0, "a relayed REST call answered within")
    frames: FrameLimits = group(FrameLimits)

    @property
    def enabled(self) -> bool:
        return self.rest_url is not None


@attrs.frozen(kw_only=True)
class ConnectConfig(RoleConfig):
    """``connect.ini``."""

    connect: ConnectSection = section(ConnectSection)
    tunnels: TunnelSettings = section(TunnelSettings, optional=True)
    page: PageSettings = section(PageSettings, optional=True)

    def check(self) -> None:
        host = listen_interface(self.connect.listen)
        if host is None:
            raise self.error("connect", "listen", "expected tcp:PORT:interface=127.0.0.1 "
                             f"(the API serves this machine only); got {self.connect.listen!r}")
        t = self.tunnels
        if t.reconnect_initial > t.reconnect_max:
            raise self.error("tunnels", "reconnect_initial", "must not exceed reconnect_max")
        p = self.page
        if p.rest_url is not None:
            parts = urlsplit(p.rest_url)
            if parts.scheme == "https" and p.ca_file is None:
                raise self.error("page", "ca_file", "an https rest_url needs the CA file")
            if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
                raise self.error("page", "rest_url", "http:// only to a rest on this "
                                 "machine (session tokens would cross the network in clear); "
                                 "use https://")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listen_interface(endpoint: str) -> str | None:
    """The loopback interface of a ``tcp:PORT:interface=ADDR`` string, else None."""
    parts = endpoint.split(":")
    if parts[0] != "tcp" or len(parts) < 2:
        return None
    fields = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
    iface = fields.get("interface", "")
    try:
        if not ipaddress.ip_address(iface).is_loopback:
            return None
    except ValueError:
        return None
    return iface if ":" not in iface else None
