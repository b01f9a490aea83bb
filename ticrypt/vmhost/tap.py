"""``twistd -n ticrypt-vmhost --config etc/vmhost.ini``: options and service.

Every key is documented in ``etc/vmhost.ini``.  userspace mode: one
listener per VM (:mod:`ticrypt.vmhost.forward`); nft mode: the DNAT table
(:mod:`ticrypt.vmhost.firewall`).  The readiness line comes once every
listener is up, or once the rules are in the kernel.
"""

from __future__ import annotations

from typing import Any

from ticrypt.audit import AuditLog
from ticrypt.nft.apply import INft, SpawnNft
from ticrypt.service import RoleService, options_for
from ticrypt.vmhost.config import VmhostConfig
from ticrypt.vmhost.firewall import TABLE, FirewallService
from ticrypt.vmhost.forward import add_listeners

Options = options_for("vmhost", VmhostConfig)


def makeService(options: dict[str, Any], reactor: Any = None, nft: INft | None = None,
                check_forwarding: bool = True) -> RoleService:
    if reactor is None:
        from twisted.internet import reactor as _reactor
        reactor = _reactor
    cfg: VmhostConfig = options["cfg"]
    v = cfg.vmhost
    audit = AuditLog(v.audit_log, clock=reactor, role="vmhost")
    top = RoleService("vmhost", cfg, reactor)
    top.ready_info["mode"] = v.mode
    top.ready_info["forwarding"] = {
        str(port): f"[{vm.host}]:{vm.port}" if ":" in vm.host else f"{vm.host}:{vm.port}"
        for port, vm in cfg.ports().items()}
    if v.mode == "nft" or v.isolation:
        firewall = FirewallService(v, nft if nft is not None else SpawnNft(reactor, reactor),
                                   audit, check_forwarding)
        firewall.setServiceParent(top)
        top.extra_ready.append(firewall.ready)
        top.ready_info["table"] = TABLE
        if v.isolation and v.log_group and nft is None:
            # the VMs' dropped packets, copied to NFLOG by the isolation
            # rules, become egress-denied audit lines (with a memory nft,
            # in tests, no kernel rule copies anything)
            from ticrypt.nft.denied import DeniedEgressService

            DeniedEgressService(v.log_group, audit, reactor, reactor).setServiceParent(top)
    if v.mode != "nft":
        add_listeners(top, v, reactor, audit)
    return top
