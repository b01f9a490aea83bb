"""The vmhost's config (documented key by key in ``etc/vmhost.ini``)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import attrs

from ticrypt.config import (
    Bool,
    Choice,
    Duration,
    FilePath,
    Int,
    Kind,
    NetworkList,
    Port,
    RoleConfig,
    Str,
    nflog_group_setting,
    section,
    setting,
)

#: most VMs one vmhost forwards
MAX_VMS = 4096


def _address(text: str) -> str:
    """A literal IP address, IPv4-mapped IPv6 as IPv4 (no names: the nft
    mode needs addresses, and a name would be resolved on every connect)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


@attrs.frozen
class VmTarget:
    """VM ``n``: host port ``base + n`` goes to ``host:port``."""

    n: int
    host: str
    port: int = 22


_ENTRY = re.compile(r"(\d+)=(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)|([0-9A-Fa-f:.]+))(?::(\d+))?")


@attrs.frozen
class VmMap(Kind):
    """``1=10.0.0.11, 2=10.0.0.12:2222, 3=[fd00::3]:22``: VM number to
    address and port (22 when left out), separated by commas or new lines."""

    expected: str = ("N=ADDRESS[:PORT] entries separated by commas or new lines "
                     "(IPv6 as [ADDRESS]:PORT or a bare ADDRESS)")

    def parse(self, raw: str, ctx: Any) -> tuple[VmTarget, ...]:
        items = [p for p in re.split(r"[,\s]+", raw) if p]
        if len(items) > MAX_VMS:
            raise ValueError(f"{len(items)} entries (at most {MAX_VMS})")
        seen: dict[int, VmTarget] = {}
        for item in items:
            m = _ENTRY.fullmatch(item)
            if not m:
                raise ValueError(f"{item!r}")
            n = int(m.group(1))
            host = _address(m.group(2) or m.group(3) or m.group(4))
            port = int(m.group(5)) if m.group(5) else 22
            if not 1 <= port <= 65535:
                raise ValueError(f"{item!r}: port {port} is not in 1..65535")
            if n in seen:
                raise ValueError(f"VM {n} appears twice")
            seen[n] = VmTarget(n, host, port)
        return tuple(seen[n] for n in sorted(seen))


@attrs.frozen(kw_only=True)
class VmhostSection:
    """``[vmhost]``."""

    mode: str = setting(Choice(("userspace", "nft")), "userspace",
                        "userspace forwarders or nftables DNAT rules")
    listen_host: str = setting(Str(), "127.0.0.1", "address the forwarded ports are on")
    base: int = setting(Port(), 2200, "host port of VM N is base + N")
    vms: tuple[VmTarget, ...] = setting(VmMap(), doc="VM number to address[:port]")
    connect_timeout: float = setting(Duration(), 10.0, "userspace: connect to a VM")
    idle_timeout: float = setting(Duration(), 3600.0, "userspace: close a silent connection")
    max_connections: int = setting(Int(1, 100000), 256, "userspace: connections per VM at once")
    masquerade: bool = setting(Bool(), False, "nft: source-NAT forwarded connections")
    audit_log: str = setting(FilePath(must_exist=False), doc="JSON-lines audit log")
    isolation: bool = setting(Bool(), False, "nft: isolate the VMs (forward/input filter)")
    vm_networks: tuple[str, ...] = setting(NetworkList(), (), "isolation: the VMs' networks")
    backend: tuple[str, ...] = setting(NetworkList(), (),
                                       "isolation: backend addresses VMs may reach")
    log_group: int = nflog_group_setting("isolation: NFLOG group of drops, 0 = none")


@attrs.frozen(kw_only=True)
class VmhostConfig(RoleConfig):
    """``vmhost.ini``."""

    vmhost: VmhostSection = section(VmhostSection)

    def check(self) -> None:
        v = self.vmhost
        try:
            host = _address(v.listen_host)
        except ValueError as e:
            raise self.error("vmhost", "listen_host", f"expected an IP address; {e}") from None
        if not v.vms:
            raise self.error("vmhost", "vms", "no VM to forward")
        top = v.vms[-1].n
        if v.base + top > 65535:
            raise self.error("vmhost", "base",
                             f"base + {top} (VM {top}) = {v.base + top} is past port 65535")
        if v.isolation:
            if not v.vm_networks:
                raise self.error("vmhost", "vm_networks", "isolation = yes needs the VMs' "
                                 "networks")
            nets = [ipaddress.ip_network(n) for n in v.vm_networks]
            for vm in v.vms:
                if not any(ipaddress.ip_address(vm.host) in n for n in nets):
                    raise self.error("vmhost", "vm_networks",
                                     f"VM {vm.n} ({vm.host}) is in none of them: it would "
                                     "not be isolated")
            for b in v.backend:
                if any(ipaddress.ip_network(b).overlaps(n) for n in nets):
                    raise self.error("vmhost", "backend",
                                     f"{b} overlaps vm_networks: VMs would reach each other")
        version = ipaddress.ip_address(host).version
        if v.mode == "nft" and not ipaddress.ip_address(host).is_unspecified:
            for vm in v.vms:
                if ipaddress.ip_address(vm.host).version != version:
                    raise self.error("vmhost", "vms",
                                     f"VM {vm.n} ({vm.host}) is not IPv{version} like "
                                     f"listen_host: nft cannot translate between versions")

    def ports(self) -> dict[int, VmTarget]:
        """``{host port: VM}``."""
        return {self.vmhost.base + vm.n: vm for vm in self.vmhost.vms}
