"""Benchmark of an application port tunnel, side by side in one run with
OpenSSH local forwarding and a direct connection.  Not a test.

    .venv/bin/python bench/bench_tunnel.py [--quick] [--rounds N]

Every path ends at the same application server (``bench/tcpbench.py``,
its own process, standing in for the application inside the VM) on
127.0.0.1, and starts at the same blocking-socket client in this process:

* ``direct``: the client connects to the application itself;
* ``ssh -L``: through ``ssh -N -L`` to an sshd of the benchmark's own
  (aes128-gcm, ``bench/sshref.py``): ssh + sshd;
* ``ticrypt``: through the user-space tunnel, exactly as ``ticrypt tunnel
  open`` sets it up: ticrypt-connect (TLS client, mux) -> ticrypt-proxy
  (lease listener) -> ticrypt-vmhost (forwarder) -> ticrypt-vmc (TLS
  server, mux, stream to 127.0.0.1:P).

Measured per path, alternating the paths (A B C A B C ...) and reporting
medians over ``--rounds``: single-stream download and upload throughput,
CPU seconds per GB of the path's own processes (ssh + sshd; connect +
proxy + vmhost + vmc; neither client nor application counted, they are
the same on every path), 64-byte round trips, new connections per second
(connect + 1-byte echo + close; 4 client threads), and 16 parallel
downloads.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sshref  # noqa: E402
import tcpbench as tb  # noqa: E402
from twisted.internet import task, threads  # noqa: E402

from ticrypt.lab import daemons  # noqa: E402
from ticrypt.lab.deploy import Addresses, Deployment, free_port  # noqa: E402

USER = "alice"
VM = "benchvm"
MiB = 1024 * 1024


class Path:
    def __init__(self, name: str, port: int, pids: Callable[[], Iterable[int]]):
        self.name = name
        self.port = port
        self.pids = pids


async def start_ticrypt(reactor: Any, workdir: str, app_port: int,
                        procs: list[daemons.Daemon]) -> tuple[int, list[int]]:
    """Every role on 127.0.0.1 and one tunnel to ``app_port``: (local port, pids)."""
    vmhost_port, lease_base = free_port(), free_port()
    dep = Deployment(os.path.join(workdir, "ticrypt"), Addresses(
        rest_port=free_port(), vm_host=f"127.0.0.1:{vmhost_port}",
        lease_ports=f"{lease_base}-{lease_base + 9}"), comment="written by bench_tunnel")
    run = daemons.runner(reactor, cwd=dep.dir)

    async def start(plugin: str, config: str) -> daemons.Daemon:
        log = open(dep.path(f"{plugin}.log"), "a", encoding="utf-8")  # noqa: SIM115

        def echo(_name: str, line: str) -> None:
            log.write(line + "\n")

        proc = daemons.spawn(reactor, plugin, config, timeout=60, echo=echo, cwd=dep.dir)
        procs.append(proc)
        await proc.ready
        return proc

    dep.ca()
    dep.feed_secret()
    dep.user_key(USER)
    dep.rest_ini()
    dep.proxy_ini()
    await dep.init(run, USER)
    await dep.start_backend(start)
    _, token = await dep.add_vm(run, USER, VM)
    tunnel, _sftp = dep.vm_tunnel(ports=(app_port,), sftp=False)
    vmc = await start("ticrypt-vmc", dep.vmc_ini(token, tunnel_settings=tunnel))
    await start("ticrypt-vmhost", dep.vmhost_ini(
        {1: f"127.0.0.1:{vmc.address('tunnel')[1]}"}, base=str(vmhost_port - 1)))
    dep.connect_ini()
    await dep.start_connect(start)
    client_ini = dep.client_ini(USER)
    for args in (["login"], ["tunnel", "open", VM, "--port", str(app_port)]):
        code, out, err = await run(["ticrypt", "--config", client_ini, *args])
        if code:
            raise SystemExit(f"bench: ticrypt {' '.join(args)} failed: {out}{err}")
    m = re.search(r"^127\.0\.0\.1:(\d+) -> ", out, re.M)
    if m is None:
        raise SystemExit(f"bench: no local port in {out!r}")
    pids = [p.transport.pid for p in procs if p.transport is not None]
    return int(m.group(1)), pids


def rounds_of(paths: list[Path], rounds: int,
              measure: Callable[[Path], tuple[float, float]]) -> dict[str, list[tuple[float, float]]]:
    """``measure(path)`` for each path in turn, ``rounds`` times (A B C A B C ...)."""
    out: dict[str, list[tuple[float, float]]] = {p.name: [] for p in paths}
    for _ in range(rounds):
        for p in paths:
            out[p.name].append(measure(p))
    return out


def report(paths: list[Path], opts: argparse.Namespace) -> list[str]:
    size = (128 if opts.quick else 1024) * MiB
    gb = size / 1e9
    lines = [f"{'metric':34} " + " ".join(f"{p.name:>14}" for p in paths)]

    def row(label: str, values: dict[str, float], fmt: str) -> None:
        lines.append(f"{label:34} " + " ".join(f"{format(values[p.name], fmt):>14}"
                                               for p in paths))
        print(lines[-1], flush=True)

    print(lines[0], flush=True)
    for what, fn in (("download", tb.download), ("upload", tb.upload)):
        res = rounds_of(paths, opts.rounds, lambda p, fn=fn: tb.measured(  # type: ignore[misc]
            p.pids, lambda: fn(p.port, size)))
        row(f"{what} {size // MiB} MiB, MB/s (median)",
            {n: size / 1e6 / tb.median([t for t, _ in v]) for n, v in res.items()}, ".0f")
        row(f"{what}, CPU-s/GB of the path",
            {n: tb.median([c for _, c in v]) / gb for n, v in res.items()}, ".2f")
        for n, v in res.items():
            lines.append(f"  {what} {n} runs (s): " + ", ".join(f"{t:.3f}" for t, _ in v))
    count = 500 if opts.quick else 2000
    rtt = rounds_of(paths, opts.rounds, lambda p: (tb.median(tb.round_trips(p.port, count)),
                                                   0.0))
    row("64-byte round trip, us (median)",
        {n: tb.median([t for t, _ in v]) * 1e6 for n, v in rtt.items()}, ".0f")
    seconds = 2.0 if opts.quick else 4.0
    conns = rounds_of(paths, opts.rounds, lambda p: (tb.new_connections(p.port, seconds), 0.0))
    row("new connections/s (4 threads)",
        {n: tb.median([t for t, _ in v]) for n, v in conns.items()}, ".0f")
    each = (8 if opts.quick else 64) * MiB
    par = rounds_of(paths, opts.rounds, lambda p: tb.measured(
        p.pids, lambda: tb.parallel_download(p.port, each, 16)))
    row(f"16 parallel downloads x {each // MiB} MiB, MB/s",
        {n: 16 * each / 1e6 / tb.median([t for t, _ in v]) for n, v in par.items()}, ".0f")
    row("16 parallel, CPU-s/GB of the path",
        {n: tb.median([c for _, c in v]) / (16 * each / 1e9) for n, v in par.items()}, ".2f")
    return lines


async def main(reactor: Any, opts: argparse.Namespace) -> None:
    workdir = tempfile.mkdtemp(prefix="bench-tunnel-")
    port_file = os.path.join(workdir, "app.port")
    app = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                         "tcpbench.py"), "serve", port_file])
    procs: list[daemons.Daemon] = []
    sshd = sshref.LocalSshd(workdir)
    forward = None
    try:
        for _ in range(200):
            if os.path.exists(port_file):
                break
            time.sleep(0.05)
        with open(port_file) as f:
            app_port = int(f.read())
        local, pids = await start_ticrypt(reactor, workdir, app_port, procs)
        sshd.start()
        ssh_local = free_port()
        forward_cm = sshd.forward(ssh_local, app_port)
        forward = forward_cm.__enter__()
        ssh_pid = forward.pid
        paths = [Path("direct", app_port, lambda: []),
                 Path("ssh -L", ssh_local, lambda: [ssh_pid, sshd.pid]),
                 Path("ticrypt", local, lambda: pids)]
        print(f"bench_tunnel: {'quick, ' if opts.quick else ''}{opts.rounds} rounds, "
              f"paths alternate; CPU counts the path's processes only", flush=True)
        lines = await threads.deferToThread(report, paths, opts)
        if opts.out:
            with open(opts.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    finally:
        if forward is not None:
            forward_cm.__exit__(None, None, None)
        sshd.stop()
        for proc in reversed(procs):
            await proc.stop()
        app.kill()
        app.wait()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per metric (median)")
    parser.add_argument("--out", help="also write the table to this file")
    opts = parser.parse_args()
    task.react(lambda reactor: main(reactor, opts))


if __name__ == "__main__":
    cli()
