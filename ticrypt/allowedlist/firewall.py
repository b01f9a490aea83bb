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

import argparse
import sys
import time
from collections.abc import Sequence

from twisted.internet.task import Clock

from ticrypt.allowedlist.config import AllowedListConfig
from ticrypt.allowedlist.policy import Policy
from ticrypt.allowedlist.tap import make_sync
from ticrypt.audit import AuditLog
from ticrypt.config import ConfigError, load_config
from ticrypt.nft.apply import MemoryNft
from ticrypt.nft.ruleset import render_delete, render_replace


def current_table_text(cfg: AllowedListConfig, delete: bool = False, now: float | None = None) -> str:
    """The transaction for ``cfg``'s saved state at ``now`` (default: the time)."""
    a = cfg.allowedlist
    clock = Clock()
    clock.advance(time.time() if now is None else now)
    policy = Policy(a.vm_networks, refused_answer=a.refused_answer, rate=a.rate, burst=a.burst)
    sync = make_sync(cfg, clock, policy, AuditLog(None, clock), nft=MemoryNft())
    sync.restore()
    table = sync.table_for(sync.routes())
    return render_delete(table) if delete else render_replace(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ticrypt.allowedlist.firewall",
        description="Print the nftables transaction ticrypt-allowedlist installs for its "
                    "current entries and addresses (nothing is applied).")
    parser.add_argument("--config", required=True, help="path to allowedlist.ini")
    parser.add_argument("--delete", action="store_true", help="print the removal instead")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, AllowedListConfig)
    except ConfigError as e:
        print(f"ticrypt-allowedlist: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(current_table_text(cfg, args.delete))
    return 0


if __name__ == "__main__":
    sys.exit(main())
