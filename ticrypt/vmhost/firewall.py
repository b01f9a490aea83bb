"""nft mode: the DNAT rules of table ``ticrypt_vmhost``, installed at start
and removed at stop.  (The isolation rules of the VMs will live here too.)

``python -m ticrypt.vmhost.firewall --config vmhost.ini [--delete]`` prints
the transaction the daemon would apply (pipe it to ``nft -f -`` by hand).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from ticrypt.audit import AuditLog
from ticrypt.config import ConfigError, load_config
from ticrypt.nft.apply import INft, NftError, OwnedTable
from ticrypt.nft.ruleset import Dnat, Table, dnat_table, render_delete, render_replace
from ticrypt.service import StartupError
from ticrypt.vmhost.config import VmhostConfig, VmhostSection

TABLE = "ticrypt_vmhost"


def vmhost_table(cfg: VmhostSection) -> Table:
    """Port ``base + N`` of this host (of ``listen_host``, unless that is
    0.0.0.0 or ::) to VM N's address and port."""
    listen = ipaddress.ip_address(cfg.listen_host)
    daddr = None if listen.is_unspecified else str(listen)
    rules = [Dnat(cfg.base + vm.n, vm.host, vm.port, daddr=daddr, comment=f"vm {vm.n}")
             for vm in cfg.vms]
    return dnat_table(TABLE, rules, masquerade=cfg.masquerade)


def forwarding_sysctls(cfg: VmhostSection) -> list[str]:
    """The sysctl files that must read 1 for DNATed connections to be routed."""
    versions = {ipaddress.ip_address(vm.host).version for vm in cfg.vms}
    files = []
    if 4 in versions:
        files.append("/proc/sys/net/ipv4/ip_forward")
    if 6 in versions:
        files.append("/proc/sys/net/ipv6/conf/all/forwarding")
    return files


class FirewallService(Service):
    """Installs :func:`vmhost_table` on start (``ready`` fires once it is in
    the kernel) and removes it on stop."""

    log = Logger()

    def __init__(self, cfg: VmhostSection, nft: INft, audit: AuditLog,
                 check_forwarding: bool = True) -> None:
        self._cfg = cfg
        self._table = OwnedTable(nft)
        self._audit = audit
        self._check_forwarding = check_forwarding
        self.ready: defer.Deferred[None] = defer.Deferred()

    def startService(self) -> None:
        if self._check_forwarding:
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
        self._audit.write("nft-installed", table=TABLE, ports=len(self._cfg.vms))
        self.ready.callback(None)

    def _failed(self, failure: Any) -> None:
        why = failure.getErrorMessage() if failure.check(NftError) else repr(failure.value)
        self.ready.errback(StartupError(f"cannot install the nftables rules: {why}",
                                        "vmhost", "mode"))

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        d = defer.ensureDeferred(self._table.remove())

        def removed(_: None) -> None:
            self._audit.write("nft-removed", table=TABLE)

        def failed(failure: Any) -> None:
            self.log.error("vmhost: could not remove table {table}: {why}", table=TABLE,
                           why=failure.getErrorMessage())

        d.addCallbacks(removed, failed)
        return d


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Print the nft transaction for a vmhost.ini (nothing is applied)."""
    parser = argparse.ArgumentParser(
        prog="python -m ticrypt.vmhost.firewall",
        description="Print the nftables transaction ticrypt-vmhost applies in mode = nft.")
    parser.add_argument("--config", required=True, help="path to vmhost.ini")
    parser.add_argument("--delete", action="store_true", help="print the removal instead")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, VmhostConfig)
    except ConfigError as e:
        print(f"ticrypt-vmhost: {e}", file=sys.stderr)
        return 1
    table = vmhost_table(cfg.vmhost)
    sys.stdout.write(render_delete(table) if args.delete else render_replace(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
