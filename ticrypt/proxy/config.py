"""The proxy's config (documented key by key in ``etc/proxy.ini``).

``[proxy]`` is :class:`ProxySection`; ``[control]`` and ``[leases]``
(optional: pathways are off until ``[control] listen`` is set) are
:class:`ControlSection` and :class:`LeasesSection`; ``[limits]`` (optional) is the
websocket layer's own :class:`~ticrypt.proxy.ws.Settings`, which gathers the
pairing table's :class:`~ticrypt.proxy.pairing.Limits` and the frame
budget's :class:`~ticrypt.framebudget.FrameLimits`: each default is
written once, in the class that uses it.
"""

from __future__ import annotations

from typing import Any

import attrs

from ticrypt import identity
from ticrypt.config import (
    Bool,
    Choice,
    Duration,
    FilePath,
    Int,
    OptionalUrl,
    PortRange,
    RoleConfig,
    ServerEndpoint,
    Str,
    group,
    nft_table_setting,
    section,
    setting,
)
from ticrypt.http import feed_settings_problem
from ticrypt.proxy.ports import LeaseLimits
from ticrypt.proxy.ws import Settings


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
    rest_url: str | None = setting(OptionalUrl(),
                                   doc="rest base URL for the revocation feed, or off")
    ca_file: str | None = setting(FilePath(), None, "CA that signs rest's certificate")
    revocation_feed_secret: str | None = setting(
        FilePath(secret=True), None, "bearer secret of the feed (rest's too)")
    revocation_poll_interval: float = setting(Duration(min=0.1, max=3600), 2.0,
                                              "how often the feed is fetched")


@attrs.frozen(kw_only=True)
class ControlSection:
    """``[control]``: the internal control API rest opens pathway leases with."""

    listen: str | None = setting(_OptionalServerEndpoint(), None,
                                 "control API listener (ssl:), or off")
    request_window: float = setting(Duration(min=1, max=600), 30.0,
                                    "largest clock difference of a signed request")
    max_connections: int = setting(Int(1, 100_000), 64, "open control connections")


_WILDCARDS = ("0.0.0.0", "::", "")


@attrs.frozen(kw_only=True)
class LeasesSection:
    """``[leases]``: pathway leases (ports of the range, one address each)."""

    mode: str = setting(Choice(("userspace", "nft")), "userspace",
                        "userspace listeners or nftables DNAT rules")
    ports: tuple[int, int] = setting(PortRange(), (6000, 6100), "the ports leases use")
    interface: str = setting(Str(), "0.0.0.0", "address the lease listeners bind")
    public_host: str | None = setting(Str(max_length=255), None,
                                      "host name or address users connect to")
    journal: str = setting(FilePath(must_exist=False), "proxy-leases.json",
                           "live leases, kept across restarts")
    connect_timeout: float = setting(Duration(min=0.1, max=600), 10.0,
                                     "time to reach the VM host endpoint")
    connection_idle_timeout: float = setting(Duration(min=1, max=30 * 86400), 7200.0,
                                             "a forwarded connection with no byte ends")
    max_connections_per_lease: int = setting(Int(1, 100_000), 64,
                                             "forwarded connections of one lease")
    nft_table: str = nft_table_setting("ticrypt_proxy", "the proxy's own nftables table (mode = nft)")
    limits: LeaseLimits = group(LeaseLimits)

    @property
    def host(self) -> str:
        """What users are told to connect to."""
        return self.public_host or self.interface


@attrs.frozen(kw_only=True)
class ProxyConfig(RoleConfig):
    """``proxy.ini``."""

    proxy: ProxySection = section(ProxySection)
    limits: Settings = section(Settings, optional=True)
    control: ControlSection = section(ControlSection, optional=True)
    leases: LeasesSection = section(LeasesSection, optional=True)

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
        self._check_control()

    def _check_control(self) -> None:
        listen = self.control.listen
        if listen is None:
            return
        if not listen.startswith("ssl:") and not self.proxy.allow_plain:
            raise self.error("control", "listen", f"expected an ssl: endpoint, got {listen!r} "
                             "(plain HTTP needs [proxy] allow_plain = yes)")
        # (port 0, a port the kernel picks, differs from every other)
        if listen.split(":")[1:2] != ["0"] and listen in (self.proxy.listen,
                                                          self.proxy.status_listen):
            raise self.error("control", "listen", "must be its own listener")
        leases = self.leases
        if leases.public_host is None and leases.interface in _WILDCARDS:
            raise self.error("leases", "public_host", "required when interface is a wildcard "
                             f"({leases.interface!r}): the address users connect to")

    def _check_revocations(self) -> None:
        p = self.proxy
        problem = feed_settings_problem(p.rest_url, ca_file=p.ca_file, allow_plain=p.allow_plain,
                                        secret=p.revocation_feed_secret,
                                        secret_key="revocation_feed_secret")
        if problem is not None:
            raise self.error("proxy", *problem)
