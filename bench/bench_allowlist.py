"""Benchmark: time from ``ticrypt allowlist add`` to the first successful
connection from a VM to the license server, and from ``allowlist remove``
to the port being closed again.  Not a test.  Root only (network
namespaces); the issue's target for the first is under 2 s.

    .venv/bin/python bench/bench_allowlist.py [--rounds N]

It builds the isolated deployment of the system test (``ticrypt.lab.netns``:
user, backend with rest, proxy and ticrypt-allowedlist, VM host, two VMs
with vmc and its firewall, a license server listening on 27000/27001, an
outside host), then per round: a watcher in VM 1's namespace asks the
allowedlist responder for the license server's name every 20 ms and, once
answered, connects to the answer's port 27000; the benchmark records
CLOCK_MONOTONIC (shared by every process of the machine) just before it
runs ``ticrypt allowlist add`` and the watcher prints it at the first
connection that succeeds.  The same for ``remove`` until a connection
fails.  The path: rest's change, allowedlist's next feed poll
(``poll_interval``, 1 s in this deployment), the upstream lookup, the nft
transaction, then the DNS answer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import task  # noqa: E402

from ticrypt.lab import daemons, netns  # noqa: E402
from ticrypt.lab.deploy import Deployment  # noqa: E402

#: Runs in VM 1's namespace: waits until the name resolves and port 27000
#: connects (argv[1] == "open") or until it no longer does ("closed"), then
#: prints CLOCK_MONOTONIC.
WATCHER = r"""
import socket, sys, time
import dns.message, dns.query, dns.rcode
want, name, server, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
deadline = time.monotonic() + 60
def reachable():
    try:
        q = dns.message.make_query(name, "A")
        r = dns.query.udp(q, server, port=53, timeout=0.5)
    except Exception:
        return False
    addrs = [i.address for a in r.answer for i in a if a.rdtype == 1]
    if r.rcode() != dns.rcode.NOERROR or not addrs:
        return False
    try:
        socket.create_connection((addrs[0], port), timeout=0.5).close()
        return True
    except OSError:
        return False
print("watching", flush=True)
while time.monotonic() < deadline:
    if reachable() == (want == "open"):
        print(repr(time.monotonic()), flush=True)
        sys.exit(0)
    time.sleep(0.02)
sys.exit(1)
"""


async def main(reactor: Any, opts: argparse.Namespace) -> None:
    missing = netns.netns_missing() or netns.allowedlist_missing() or netns.vmc_firewall_missing()
    if missing:
        print(f"bench_allowlist: skipped: {missing}")
        return
    workdir = tempfile.mkdtemp(prefix="bench-allowlist-")
    spaces = netns.Namespaces("tba")
    procs: list[daemons.Daemon] = []
    dep = Deployment(workdir, netns.NetnsDeployment.addresses(), comment="bench_allowlist")

    async def start_in(role: str, plugin: str, config: str) -> daemons.Daemon:
        proc = netns.spawn_in(reactor, spaces, role, plugin, config)
        procs.append(proc)
        await proc.ready
        return proc

    async def helper(role: str, args: list[str]) -> daemons.Daemon:
        proc = netns.helper_in(reactor, spaces, role, args)
        procs.append(proc)
        await proc.ready
        return proc

    async def run_in(role: str | None, args: list[str]) -> tuple[int, str, str]:
        argv = [daemons.script_path(args[0]), *args[1:]]
        return await daemons.run_command(reactor, spaces.exec(role, argv) if role else argv)

    try:
        spaces.create()
        d = netns.NetnsDeployment(reactor, spaces, dep, start_in, run_in, helper,
                                  vmc_firewall=True, vmhost_isolation=True, allowedlist=True)
        await d.start()
        adds: list[float] = []
        removes: list[float] = []
        for _ in range(opts.rounds):
            for what, argv, into in (("open", ["allowlist", "add", netns.LICENSE_NAME,
                                               "--port", str(netns.LICENSE_PORTS[0])], adds),
                                     ("closed", ["allowlist", "remove", netns.LICENSE_NAME],
                                      removes)):
                watcher = daemons.run_command(reactor, spaces.exec("vm1", [
                    sys.executable, "-c", WATCHER, what, netns.LICENSE_NAME, netns.BACKEND_IP,
                    str(netns.LICENSE_PORTS[0])]), timeout=90)
                await task.deferLater(reactor, 0.5, lambda: None)  # the watcher is watching
                t0 = time.monotonic()
                await d.cli(*argv)
                code, out, err = await watcher
                if code != 0:
                    raise SystemExit(f"bench_allowlist: watcher failed ({code}): {err.strip()}")
                into.append(float(out.split()[-1]) - t0)
        print(f"allowlist add -> first connection, s: "
              f"{', '.join(f'{t:.2f}' for t in adds)} (median {statistics.median(adds):.2f})")
        print(f"allowlist remove -> port closed, s:  "
              f"{', '.join(f'{t:.2f}' for t in removes)} "
              f"(median {statistics.median(removes):.2f})")
    finally:
        for proc in reversed(procs):
            await proc.stop()
        spaces.remove()
        shutil.rmtree(workdir, ignore_errors=True)  # keys, certificates, logs


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    task.react(lambda reactor: main(reactor, opts))


if __name__ == "__main__":
    cli()
