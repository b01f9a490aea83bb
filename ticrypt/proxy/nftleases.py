"""Kernel mode of the proxy's pathway leases (``[leases] mode = nft``): one
DNAT rule per lease in the proxy's own nftables table, so no proxy process
touches the bytes.

Each lease is ``ip saddr ALLOWED tcp dport PORT dnat to TARGET`` (for
traffic addressed to this host), with a masquerade towards each target so
the VM host answers through the proxy without a route back to users.  The
whole table (:func:`ticrypt.nft.ruleset.dnat_table`) is replaced in one
``nft -f`` transaction on every change (:class:`ticrypt.nft.apply.OwnedTable`),
deleted at start (nothing stale from a crash survives) and at stop; leases
stay journaled, and a restart installs them again.

What the kernel mode does not see: connections.  A connection from
another address to a lease port matches no rule and is answered by the
kernel (a reset, as nothing listens there); it is not audited as
``lease-refused``.  Leases do not end for idleness; they end at their
expiry (the owner's session expiry), on request and at logout.  The host
must forward IPv4/IPv6 (``net.ipv4.ip_forward = 1``) and the target must be
an IP address of the same version as the user's.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.logger import Logger

from ticrypt.nft.apply import INft, NftError, OwnedTable, SpawnNft
from ticrypt.nft.ruleset import Dnat, Table, dnat, dnat_table, render_delete
from ticrypt.proxy.leases import BadTarget, LeaseService, OpenFailed
from ticrypt.proxy.ports import Lease


def lease_rule(lease: Lease) -> Dnat:
    """The DNAT of ``lease``; ValueError if its target cannot be one."""
    host, _, port = lease.target.rpartition(":")
    host = host.strip("[]")
    ipaddress.ip_address(host)  # a name cannot be a DNAT target
    rule = Dnat(dport=lease.port, to_host=host, to_port=int(port), saddr=lease.allowed,
                comment=lease.id)
    dnat(rule)  # checks addresses, versions and ports
    return rule


class NftOpener:
    """Leases as DNAT rules in table ``inet <table>``."""

    log = Logger()

    def __init__(self, nft: INft, table: str):
        self._nft = nft
        self._name = table
        self._owned = OwnedTable(nft)
        self._rules: dict[str, Dnat] = {}
        self.service: LeaseService | None = None

    def table(self) -> Table:
        return dnat_table(self._name, sorted(self._rules.values(), key=lambda r: r.dport),
                          masquerade=True)

    async def _install(self) -> None:
        await self._owned.install(self.table())

    async def start(self) -> None:
        try:
            # a table left by a proxy that crashed: gone before any lease is restored
            await self._nft.apply(render_delete(self.table()))
            await self._install()
        except NftError as e:
            raise OpenFailed(f"nft mode: {e}") from None

    async def open(self, lease: Lease) -> None:
        try:
            rule = lease_rule(lease)
        except ValueError as e:
            raise BadTarget(f"nft mode needs an IP address target of the user's IP "
                             f"version ({lease.target}): {e}") from None
        self._rules[lease.id] = rule
        try:
            await self._install()
        except NftError as e:
            self._rules.pop(lease.id, None)
            raise OpenFailed(f"nft: {e}") from None

    async def close(self, lease: Lease) -> None:
        if self._rules.pop(lease.id, None) is None:
            return
        try:
            await self._install()
        except NftError as e:
            # fail closed: without the table no lease forwards at all
            self.log.error("nft: could not remove lease {id}'s rule ({why}); removing "
                           "the whole table", id=lease.id, why=str(e))
            await self._remove_all()

    async def _remove_all(self) -> None:
        try:
            await self._nft.apply(render_delete(self.table()))
        except NftError as e:
            self.log.error("nft: could not delete table {name}: {why}", name=self._name,
                           why=str(e))

    async def stop(self) -> None:
        self._rules.clear()
        try:
            await self._owned.remove()
        except NftError:
            await self._remove_all()

    def active(self, lease: Lease) -> int:
        # Connections are not seen in the kernel mode: a lease never idles.
        return 1


def make_nft_opener(leases: Any, reactor: Any) -> NftOpener:
    """The opener for ``[leases]`` (mode = nft), running ``nft -f``."""
    return NftOpener(SpawnNft(reactor, reactor), leases.nft_table)
