"""ticrypt-allowedlist's config (documented key by key in ``etc/allowedlist.ini``):
``[allowedlist]`` is :class:`AllowedListSection`."""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from ticrypt.allowedlist.upstream import parse_servers
from ticrypt.config import (
    Bool,
    Choice,
    DirPath,
    Duration,
    FilePath,
    Int,
    Kind,
    OptionalUrl,
    RoleConfig,
    nflog_group_setting,
    nft_table_setting,
    section,
    setting,
)
from ticrypt.http import feed_settings_problem

__all__ = ["AllowedListConfig", "AllowedListSection", "parse_listen"]


def parse_listen(raw: str) -> tuple[str, int]:
    """``10.77.1.2:53`` / ``[::1]:53`` as (address, port); port 0 = any."""
    raw = raw.strip()
    if raw.startswith("["):
        host, _, rest = raw[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = raw.rpartition(":")
    ipaddress.ip_address(host)
    value = int(port)
    if not 0 <= value <= 65535:
        raise ValueError("port out of range")
    return host, value


@attrs.frozen
class _Listen(Kind):
    expected: str = "ADDRESS:PORT such as 10.77.1.2:53 or [::1]:5353"

    def parse(self, raw: str, ctx: Any) -> tuple[str, int]:
        try:
            return parse_listen(raw)
        except ValueError:
            raise ValueError(f"got {raw!r}") from None


@attrs.frozen
class _Cidrs(Kind):
    expected: str = "a comma-separated list of networks such as 10.77.3.0/24"

    def parse(self, raw: str, ctx: Any) -> tuple[str, ...]:
        items = [p.strip() for p in raw.split(",") if p.strip()]
        if not items:
            raise ValueError("empty list")
        try:
            return tuple(str(ipaddress.ip_network(p, strict=False)) for p in items)
        except ValueError as e:
            raise ValueError(str(e)) from None


@attrs.frozen
class _Servers(Kind):
    expected: str = "a comma-separated list of resolver addresses, ADDRESS or ADDRESS:PORT"

    def parse(self, raw: str, ctx: Any) -> tuple[tuple[str, int], ...]:
        items = [p for p in raw.split(",") if p.strip()]
        if not items:
            raise ValueError("empty list")
        try:
            return tuple(parse_servers(items))
        except ValueError as e:
            raise ValueError(str(e)) from None


@attrs.frozen(kw_only=True)
class AllowedListSection:
    """``[allowedlist]``."""

    dns_listen: tuple[str, int] = setting(_Listen(), doc="UDP and TCP DNS listener")
    vm_networks: tuple[str, ...] = setting(_Cidrs(), doc="the only networks answered")
    forward_addresses: tuple[str, ...] = setting(_Cidrs(), doc="forwarding address pool")
    upstream: tuple[tuple[str, int], ...] = setting(_Servers(), doc="resolvers of real addresses")
    upstream_timeout: float = setting(Duration(min=0.1, max=60), 5.0, "one upstream lookup")
    min_ttl: float = setting(Duration(min=1, max=86400), 30.0, "shortest upstream TTL used")
    max_ttl: float = setting(Duration(min=1, max=7 * 86400), 3600.0, "longest upstream TTL used")
    max_addresses_per_name: int = setting(Int(1, 64), 4, "upstream addresses kept per name")
    max_names_per_wildcard: int = setting(Int(1, 1024), 16, "names of one wildcard entry")
    wildcard_idle: float = setting(Duration(min=60, max=30 * 86400), 86400.0,
                                   "a wildcard name not asked for this long is dropped")
    rest_url: str | None = setting(OptionalUrl(), doc="rest base URL of the feed, or off")
    allow_plain: bool = setting(Bool(), False, "permit an http:// rest_url")
    ca_file: str | None = setting(FilePath(), None, "CA that signs rest's certificate")
    allowlist_feed_secret: str | None = setting(FilePath(secret=True), None,
                                                "bearer secret of the feed")
    poll_interval: float = setting(Duration(min=0.1, max=3600), 2.0, "how often the feed is read")
    state_dir: str = setting(DirPath(), doc="state kept across restarts")
    audit_log: str = setting(FilePath(must_exist=False), doc="JSON-lines audit log")
    refused_answer: str = setting(Choice(("nxdomain", "refused")), "nxdomain",
                                  "answer to a name not allowed")
    answer_ttl: int = setting(Int(0, 86400), 60, "TTL of our answers")
    answer_wait: float = setting(Duration(min=0.1, max=30), 3.0,
                                 "wait for the firewall before SERVFAIL")
    rate: int = setting(Int(1, 1_000_000), 50, "queries per second per client")
    burst: int = setting(Int(1, 1_000_000), 100, "query burst per client")
    max_tcp: int = setting(Int(1, 100_000), 1024, "open DNS TCP connections")
    max_tcp_per_client: int = setting(Int(1, 1000), 8, "open DNS TCP connections per client")
    mode: str = setting(Choice(("nft", "off")), "nft", "nft rules, or DNS only")
    nft_table: str = nft_table_setting("ticrypt_allowedlist", "the role's own nftables table")
    log_group: int = nflog_group_setting()
    masquerade: bool = setting(Bool(), True, "source-NAT forwarded flows")


@attrs.frozen(kw_only=True)
class AllowedListConfig(RoleConfig):
    """``allowedlist.ini``."""

    allowedlist: AllowedListSection = section(AllowedListSection)

    def check(self) -> None:
        a = self.allowedlist
        if a.min_ttl > a.max_ttl:
            raise self.error("allowedlist", "min_ttl", "must not exceed max_ttl")
        problem = feed_settings_problem(a.rest_url, ca_file=a.ca_file, allow_plain=a.allow_plain,
                                        secret=a.allowlist_feed_secret,
                                        secret_key="allowlist_feed_secret")
        if problem is not None:
            raise self.error("allowedlist", *problem)
