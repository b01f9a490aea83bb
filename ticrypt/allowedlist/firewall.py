"""``python -m ticrypt.allowedlist.firewall --config allowedlist.ini``:
print the nftables transaction ticrypt-allowedlist would install now, from
its saved state (entries, forwarding addresses, the license servers' last
good addresses whose TTL has not run out), without applying anything.

``--delete`` prints the removal.  The daemon computes the same table
(:meth:`~ticrypt.allowedlist.sync.Sync.routes` and
:meth:`~ticrypt.allowedlist.sync.Sync.table_for`), so what an operator
reviews here is what it installs on its next sync.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from twisted.internet.task import Clock

from ticrypt.allowedlist.config import AllowedListConfig
from ticrypt.allowedlist.policy import Policy
from ticrypt.allowedlist.tap import make_sync
from ticrypt.audit import AuditLog
from ticrypt.nft.apply import MemoryNft
from ticrypt.nft.ruleset import Table, render_delete, render_replace
from ticrypt.nft.show import print_table


def current_table(cfg: AllowedListConfig, now: float | None = None) -> Table:
    """The table for ``cfg``'s saved state at ``now`` (default: the time)."""
    a = cfg.allowedlist
    clock = Clock()
    clock.advance(time.time() if now is None else now)
    policy = Policy(a.vm_networks, refused_answer=a.refused_answer, rate=a.rate, burst=a.burst)
    sync = make_sync(cfg, clock, policy, AuditLog(None, clock), nft=MemoryNft())
    sync.restore()
    return sync.table_for(sync.routes())


def current_table_text(cfg: AllowedListConfig, delete: bool = False, now: float | None = None) -> str:
    """The transaction for ``cfg``'s saved state at ``now`` (default: the time)."""
    table = current_table(cfg, now)
    return render_delete(table) if delete else render_replace(table)


def main(argv: Sequence[str] | None = None) -> int:
    return print_table(
        argv, role="allowedlist", config_class=AllowedListConfig,
        table=lambda cfg, args: current_table(cfg),
        description="Print the nftables transaction ticrypt-allowedlist installs for its "
                    "current entries and addresses (nothing is applied).")


if __name__ == "__main__":
    sys.exit(main())
