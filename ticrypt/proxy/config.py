"""The proxy's config (documented key by key in ``etc/proxy.ini``).

``[proxy]`` is :class:`ProxySection`; ``[limits]`` (optional) is the
websocket layer's own :class:`~ticrypt.proxy.ws.Settings`, which gathers the
pairing table's :class:`~ticrypt.proxy.pairing.Limits` and the frame
budget's :class:`~ticrypt.proxy.framebudget.FrameLimits`: each default is
written once, in the class that uses it.
"""

from __future__ import annotations

from typing import Any

import attrs

from ticrypt import identity
from ticrypt.config import (
    Bool,
    Duration,
    FilePath,
    RoleConfig,
    ServerEndpoint,
    Url,
    section,
    setting,
)
from ticrypt.http import load_secret
from ticrypt.proxy.ws import Settings


@attrs.frozen
class _OptionalUrl(Url):
    """An https (or http) URL, or ``off``."""

    schemes: tuple[str, ...] = ("https", "http")

    @property
    def expected(self) -> str:  # type: ignore[override]
        return "an https:// URL, or off"

    def parse(self, raw: str, ctx: Any) -> str | None:  # type: ignore[override]
        if raw.strip().lower() == "off":
            return None
        return super().parse(raw, ctx)


@attrs.frozen
class _OptionalServerEndpoint(ServerEndpoint):
    """A server endpoint string, or ``off`` (the default) for none."""

    expected: str = "a server endpoint string such as tcp:8081:interface=127.0.0.1, or off"

    def parse(self, raw: str, ctx: Any) -> str | None:  # type: ignore[override]
        if raw.strip().lower() == "off":
            return None
        return super().parse(raw, ctx)


@attrs.frozen(kw_only=True)
class ProxySection:
    """``[proxy]``: listeners, keys, files and the revocation feed."""

    listen: str = setting(ServerEndpoint(), doc="public websocket listener")
    allow_plain: bool = setting(Bool(), False, "permit a non-ssl listen endpoint")
    status_listen: str | None = setting(_OptionalServerEndpoint(), None,
                                        "read-only GET /v1/status listener, or off")
    backend_public_key: str = setting(FilePath(), doc="backend.pub from ticrypt-admin init")
    audit_log: str = setting(FilePath(must_exist=False), doc="JSON-lines audit log")
    ticket_ledger: str = setting(FilePath(must_exist=False), "proxy-tickets.ledger",
                                 "ids of used tickets, kept across restarts")
    rest_url: str | None = setting(_OptionalUrl(),
                                   doc="rest base URL for the revocation feed, or off")
    ca_file: str | None = setting(FilePath(), None, "CA that signs rest's certificate")
    revocation_feed_secret: str | None = setting(
        FilePath(secret=True), None, "bearer secret of the feed (rest's too)")
    revocation_poll_interval: float = setting(Duration(min=0.1, max=3600), 2.0,
                                              "how often the feed is fetched")


@attrs.frozen(kw_only=True)
class ProxyConfig(RoleConfig):
    """``proxy.ini``."""

    proxy: ProxySection = section(ProxySection)
    limits: Settings = section(Settings, optional=True)

    def check(self) -> None:
        listen = self.proxy.listen
        if not listen.startswith("ssl:") and not self.proxy.allow_plain:
            raise self.error("proxy", "listen", f"expected an ssl: endpoint, got {listen!r} "
                             "(plain websockets need allow_plain = yes)")
        try:
            identity.load_public_file(self.proxy.backend_public_key)
        except identity.KeyFileError as e:
            raise self.error("proxy", "backend_public_key", str(e)) from None
        self._check_revocations()
        if self.limits.max_frame_size > self.limits.max_message_size:
            raise self.error("limits", "max_frame_size", "must not exceed max_message_size")

    def _check_revocations(self) -> None:
        p = self.proxy
        if p.rest_url is None:
            return
        if p.rest_url.startswith("https:") and p.ca_file is None:
            raise self.error("proxy", "ca_file", "an https rest_url needs the CA file")
        if p.rest_url.startswith("http:") and not p.allow_plain:
            raise self.error("proxy", "rest_url", "http:// needs allow_plain = yes; use https://")
        if p.revocation_feed_secret is None:
            raise self.error("proxy", "revocation_feed_secret",
                             "missing: rest_url is set, so the feed's bearer secret is needed")
        try:
            load_secret(p.revocation_feed_secret)
        except ValueError as e:
            raise self.error("proxy", "revocation_feed_secret", str(e)) from None
