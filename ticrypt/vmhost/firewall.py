"""Table ``inet ticrypt_vmhost``, installed at start and removed at stop:
the DNAT rules of mode = nft and, with ``isolation = yes``, the VMs'
isolation.

Isolation (filter chains of the same table, one transaction with the DNAT):

* forward: to a VM address (``vm_networks``) only what the DNAT rules
  translated, to that VM's tunnel port (``ct status dnat``), and replies;
  from a VM only to ``backend`` (rest, proxy, allowedlist DNS, forwarding
  pool), and replies; everything else to or from the VMs is dropped, VM to
  VM included.  Drops of VM traffic are copied to NFLOG ``log_group``
  (unless 0) for :mod:`ticrypt.nft.denied`.  Traffic that does not touch a
  VM network is left alone (policy accept).
* input: a VM reaches the VM host itself only with replies (the userspace
  forwarders' connections) and IPv6 neighbour discovery.

VMs bridged on one L2 segment of the host exchange frames without the
forward hook; give each VM its own routed interface (a tap or veth), as
the system test does.

``python -m ticrypt.vmhost.firewall --config vmhost.ini [--delete]`` prints
the transaction the daemon would apply (pipe it to ``nft -f -`` by hand).
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from ticrypt.audit import AuditLog
from ticrypt.nft.apply import INft, NftError, OwnedTableService
from ticrypt.nft.ruleset import (
    Chain,
    Dnat,
    NamedSet,
    Rule,
    Table,
    dnat_table,
)
from ticrypt.nft.show import print_table
from ticrypt.service import StartupError
from ticrypt.vmhost.config import VmhostConfig, VmhostSection

TABLE = "ticrypt_vmhost"


def vmhost_table(cfg: VmhostSection) -> Table:
    """mode = nft: port ``base + N`` of this host (of ``listen_host``, unless
    that is 0.0.0.0 or ::) to VM N's address and port; with ``isolation``,
    the filter chains of :func:`isolation_chains`."""
    if cfg.mode == "nft":
        listen = ipaddress.ip_address(cfg.listen_host)
        daddr = None if listen.is_unspecified else str(listen)
        rules = [Dnat(cfg.base + vm.n, vm.host, vm.port, daddr=daddr, comment=f"vm {vm.n}")
                 for vm in cfg.vms]
        table = dnat_table(TABLE, rules, masquerade=cfg.masquerade)
    else:
        table = Table(TABLE, "inet")
    if not cfg.isolation:
        return table
    sets, chains = isolation_chains(cfg)
    return Table(TABLE, "inet", table.chains + chains, table.sets + sets)


def _split(networks: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    nets = [ipaddress.ip_network(n, strict=False) for n in networks]
    v4 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv4Network))
    v6 = ipaddress.collapse_addresses(n for n in nets if isinstance(n, ipaddress.IPv6Network))
    return tuple(map(str, v4)), tuple(map(str, v6))


def isolation_chains(cfg: VmhostSection) -> tuple[tuple[NamedSet, ...], tuple[Chain, ...]]:
    """The sets and the ``isolate_forward``/``isolate_input`` chains."""
    vms4, vms6 = _split(cfg.vm_networks)
    back4, back6 = _split(cfg.backend)
    sets = (NamedSet("vms4", "ipv4_addr", vms4, ("interval",)),
            NamedSet("vms6", "ipv6_addr", vms6, ("interval",)),
            NamedSet("backend4", "ipv4_addr", back4, ("interval",)),
            NamedSet("backend6", "ipv6_addr", back6, ("interval",)))
    log = f"log group {int(cfg.log_group)} " if cfg.log_group else ""
    forward = [Rule("ct state established,related accept")]
    # the forwarded range: what the DNAT rules translated, to each VM's port
    if cfg.mode == "nft":
        for vm in cfg.vms:
            fam = "ip" if ipaddress.ip_address(vm.host).version == 4 else "ip6"
            forward.append(Rule(f"{fam} daddr {vm.host} tcp dport {vm.port} ct status dnat "
                                "accept", f"vm {vm.n}"))
    forward += [
        Rule("ip daddr @vms4 counter drop", "to VMs"),
        Rule("ip6 daddr @vms6 counter drop", "to VMs"),
        Rule("ip saddr @vms4 ip daddr @backend4 accept", "VMs to the backend"),
        Rule("ip6 saddr @vms6 ip6 daddr @backend6 accept", "VMs to the backend"),
        Rule(f"ip saddr @vms4 counter {log}drop", "from VMs"),
        Rule(f"ip6 saddr @vms6 counter {log}drop", "from VMs"),
    ]
    nd = [Rule(f"ip6 saddr @vms6 icmpv6 type {t} accept") for t in (
        "nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit")]
    inbound = [Rule("ct state established,related accept"),
               *nd,
               Rule("ip saddr @vms4 counter drop", "VMs to this host"),
               Rule("ip6 saddr @vms6 counter drop", "VMs to this host")]
    # priority -10: before the host's own filter at 0, which may accept more
    chains = (Chain("isolate_forward", tuple(forward), type="filter", hook="forward",
                    priority=-10, policy="accept"),
              Chain("isolate_input", tuple(inbound), type="filter", hook="input",
                    priority=-10, policy="accept"))
    return sets, chains


def forwarding_sysctls(cfg: VmhostSection) -> list[str]:
    """The sysctl files that must read 1 for DNATed connections to be routed."""
    versions = {ipaddress.ip_address(vm.host).version for vm in cfg.vms}
    files = []
    if 4 in versions:
        files.append("/proc/sys/net/ipv4/ip_forward")
    if 6 in versions:
        files.append("/proc/sys/net/ipv6/conf/all/forwarding")
    return files


class FirewallService(OwnedTableService):
    """Installs :func:`vmhost_table` on start (``ready`` fires once it is in
    the kernel) and removes it on stop."""

    log = Logger()

    def __init__(self, cfg: VmhostSection, nft: INft, audit: AuditLog,
                 check_forwarding: bool = True) -> None:
        super().__init__(nft, audit, role="vmhost", table=TABLE)
        self._cfg = cfg
        self._check_forwarding = check_forwarding
        self.ready: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        if self._check_forwarding and self._cfg.mode == "nft":
            for path in forwarding_sysctls(self._cfg):
                if _read(path) != "1":
                    name = path.removeprefix("/proc/sys/").replace("/", ".")
                    raise StartupError(f"mode = nft needs {name} = 1 (sysctl -w {name}=1): "
                                       "DNATed connections would not be routed to the VMs",
                                       "vmhost", "mode")
        super().startService()
        d = defer.ensureDeferred(self._table.install(vmhost_table(self._cfg)))
        d.addCallbacks(self._installed, self._failed)

    def _installed(self, _: None) -> None:
        self._audit.write("nft-installed", table=TABLE,
                          ports=len(self._cfg.vms) if self._cfg.mode == "nft" else 0,
                          isolation=self._cfg.isolation)
        self.ready.callback(None)

    def _failed(self, failure: Any) -> None:
        why = failure.getErrorMessage() if failure.check(NftError) else repr(failure.value)
        self.ready.errback(StartupError(f"cannot install the nftables rules: {why}",
                                        "vmhost", "mode"))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Print the nft transaction for a vmhost.ini (nothing is applied)."""
    return print_table(
        argv, role="vmhost", config_class=VmhostConfig,
        table=lambda cfg, args: vmhost_table(cfg.vmhost),
        description="Print the nftables transaction ticrypt-vmhost applies in mode = nft "
                    "or with isolation = yes.")


if __name__ == "__main__":
    sys.exit(main())
