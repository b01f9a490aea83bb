"""The VM's own rules: table ``inet ticrypt_vmc`` (``[firewall] enabled``).

Inbound, only TCP to the tunnel port (``[tunnel] listen``, 22), loopback and
the replies of allowed connections.  Outbound, only

* TCP to rest and the proxy: the addresses of ``[vmc] rest_url`` and of
  the proxy URL (``[vmc] proxy_url``, else the one enrollment gave) when
  they are IP literals, and ``[firewall] backend`` (needed when a URL names
  a host: rules hold addresses, not names);
* UDP and TCP 53 to ``[firewall] dns``, the allowedlist DNS responder;
* TCP and UDP to ``[firewall] allow_out``, the allow-list forwarding
  addresses (the ports of each entry are enforced there, by allowedlist);
* loopback, replies, IPv6 neighbour discovery, and DHCPv4 if ``dhcp``.

Everything else is dropped; outbound drops are first copied to NFLOG
``log_group`` (unless 0) for :mod:`ticrypt.nft.denied`, which vmc runs on
that group.  Inbound drops are counted, not logged (a port scan would only
add noise).  The VM routes nothing (forward: drop).

:func:`vmc_table` is pure (config in, :class:`~ticrypt.nft.ruleset.Table`
out); :class:`FirewallService` installs it in one ``nft -f`` transaction
before vmc enrolls or reports ready, replaces it when enrollment names a
new proxy address, and deletes it at stop.
``python -m ticrypt.vmc.firewall --config vmc.ini [--delete]`` prints the
transaction without applying it.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger

from ticrypt.audit import AuditLog
from ticrypt.config import ConfigError
from ticrypt.errors import CodedError
from ticrypt.nft.apply import INft, NftError, OwnedTableService
from ticrypt.nft.ruleset import Chain, NamedSet, Rule, Table
from ticrypt.nft.show import print_table
from ticrypt.service import StartupError

TABLE = "ticrypt_vmc"
DNS_PORT = 53

__all__ = ["TABLE", "FirewallConfigError", "FirewallService", "main", "tunnel_port",
           "vmc_table"]


class FirewallConfigError(CodedError):
    """The config cannot give the rules: ``code`` is the key at fault, in
    ``section``."""

    def __init__(self, key: str, message: str, section: str = "firewall") -> None:
        super().__init__(key, message)
        self.section = section

    @property
    def key(self) -> str:
        return self.code


def tunnel_port(listen: str) -> int:
    """The port of a ``tcp:PORT[:...]`` / ``tcp:port=PORT`` endpoint."""
    for part in listen.split(":")[1:]:
        value = part.split("=", 1)[1] if part.startswith("port=") else part
        if value.isdigit():
            return int(value)
    raise ValueError(f"no port in {listen!r}")


def _literal(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _split(networks: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """IPv4 and IPv6 networks, each sorted with overlaps merged (nft refuses
    overlapping elements of an interval set)."""
    nets = [ipaddress.ip_network(n, strict=False) for n in networks]
    v4 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network))
    v6 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network))
    return tuple(map(str, v4)), tuple(map(str, v6))


def _addr_set(name: str, kind: str, elements: tuple[str, ...]) -> NamedSet:
    return NamedSet(name, kind, elements, flags=("interval",))


def vmc_table(cfg: Any, proxy_url: str | None = None) -> Table:
    """Table ``inet ticrypt_vmc`` for a :class:`~ticrypt.vmc.config.VmcConfig`;
    ``proxy_url`` is the enrolled proxy URL (``[vmc] proxy_url`` wins)."""
    fw = cfg.firewall
    backend: list[str] = list(fw.backend)
    rest_host = urlsplit(cfg.vmc.rest_url).hostname
    rest_ip = _literal(rest_host)
    if rest_ip is not None:
        backend.append(str(rest_ip))
    elif not fw.backend:
        raise FirewallConfigError("backend", f"rest_url names the host {rest_host!r}: list "
                                  "the addresses of rest and the proxy in [firewall] backend")
    proxy_ip = _literal(urlsplit(cfg.vmc.proxy_url or proxy_url or "").hostname)
    if proxy_ip is not None:
        backend.append(str(proxy_ip))
    dns = None
    if fw.dns:
        dns = _literal(fw.dns)
        if dns is None:
            raise FirewallConfigError("dns", f"expected an IP address, got {fw.dns!r}")
    try:
        port = tunnel_port(cfg.tunnel.listen)
    except ValueError as e:
        raise FirewallConfigError("listen", str(e), "tunnel") from None

    backend4, backend6 = _split(backend)
    pool4, pool6 = _split(fw.allow_out)
    sets = (_addr_set("backend4", "ipv4_addr", backend4),
            _addr_set("backend6", "ipv6_addr", backend6),
            _addr_set("allow_out4", "ipv4_addr", pool4),
            _addr_set("allow_out6", "ipv6_addr", pool6))

    nd = [Rule(f"icmpv6 type {t} accept") for t in (
        "nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-advert", "nd-router-solicit")]
    inbound = [
        Rule("iif lo accept"),
        Rule("ct state established,related accept"),
        Rule("ct state invalid drop"),
        *nd,
        Rule(f"tcp dport {port} accept", "tunnel"),
    ]
    outbound = [
        Rule("oif lo accept"),
        Rule("ct state established,related accept"),
        Rule("ct state invalid drop"),
        *nd,
        Rule("ip daddr @backend4 meta l4proto tcp accept", "rest and proxy"),
        Rule("ip6 daddr @backend6 meta l4proto tcp accept", "rest and proxy"),
    ]
    if dns is not None:
        fam = "ip" if dns.version == 4 else "ip6"
        for proto in ("udp", "tcp"):
            outbound.append(Rule(f"{fam} daddr {dns} {proto} dport {DNS_PORT} accept",
                                 "allowedlist dns"))
    # one rule per protocol: rules never hold braces (anonymous sets)
    outbound += [Rule(f"{fam} daddr @allow_out{v} meta l4proto {proto} accept", "allow-list")
                 for fam, v in (("ip", 4), ("ip6", 6)) for proto in ("tcp", "udp")]
    if fw.dhcp:
        inbound.append(Rule("udp sport 67 udp dport 68 accept", "dhcp"))
        outbound.append(Rule("udp sport 68 udp dport 67 accept", "dhcp"))
    inbound.append(Rule("counter drop", "inbound denied"))
    if fw.log_group:
        outbound.append(Rule(f"counter log group {int(fw.log_group)} drop", "egress denied"))
    else:
        outbound.append(Rule("counter drop", "egress denied"))
    chains = (
        Chain("input", tuple(inbound), type="filter", hook="input", priority=0,
              policy="drop"),
        Chain("output", tuple(outbound), type="filter", hook="output", priority=0,
              policy="drop"),
        Chain("forward", (Rule("counter drop", "the VM routes nothing"),), type="filter",
              hook="forward", priority=0, policy="drop"),
    )
    return Table(TABLE, "inet", chains, sets)


class FirewallService(OwnedTableService):
    """Installs :func:`vmc_table` at start; :meth:`when_ready` fires once it
    is in the kernel (or fails with :class:`StartupError`).  :meth:`update`
    replaces it for the enrolled proxy URL; stop deletes it."""

    log = Logger()

    def __init__(self, cfg: Any, nft: INft, audit: AuditLog,
                 proxy_url: str | None = None) -> None:
        super().__init__(nft, audit, role="vmc", table=TABLE)
        self._cfg = cfg
        self._proxy_url = proxy_url
        self._result: Any = None
        self._done = False
        self._waiters: list[defer.Deferred[None]] = []

    def startService(self) -> None:
        super().startService()
        d = defer.ensureDeferred(self._install())
        d.addBoth(self._finished)

    async def _install(self) -> None:
        try:
            table = vmc_table(self._cfg, self._proxy_url)
            await self._table.install(table)
        except (NftError, FirewallConfigError) as e:
            raise StartupError(f"cannot install the nftables rules: {e}", "firewall",
                               "enabled") from None
        self._audit.write("nft-installed", table=TABLE)

    def _finished(self, result: Any) -> None:
        self._result, self._done = result, True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            self._fire(d)

    def _fire(self, d: defer.Deferred[None]) -> None:
        if isinstance(self._result, BaseException) or hasattr(self._result, "value"):
            d.errback(self._result)
        else:
            d.callback(None)

    def when_ready(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if self._done:
            self._fire(d)
        else:
            self._waiters.append(d)
        return d

    async def update(self, proxy_url: str | None) -> None:
        """Replace the table if ``proxy_url`` changes it (enrollment)."""
        self._proxy_url = proxy_url
        table = vmc_table(self._cfg, proxy_url)
        if table != self._table.installed:
            await self._table.install(table)
            self._audit.write("nft-installed", table=TABLE)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the nft transaction for a vmc.ini (nothing is applied)."""
    from ticrypt.vmc.config import VmcConfig

    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--proxy-url", default=None,
                            help="the enrolled proxy URL, if [vmc] proxy_url is empty")

    def table(cfg: VmcConfig, args: argparse.Namespace) -> Table:
        try:
            return vmc_table(cfg, args.proxy_url)
        except FirewallConfigError as e:
            raise ConfigError(args.config, e.section, e.key, e.message) from None

    return print_table(
        argv, role="vmc", config_class=VmcConfig, table=table, options=options,
        description="Print the nftables transaction ticrypt-vmc applies with "
                    "[firewall] enabled = yes.")


if __name__ == "__main__":
    sys.exit(main())
