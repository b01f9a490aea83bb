"""ticrypt-allowedlist's DNS responder vs dnsmasq, same static answers,
side by side in one run (not a test; see bench/README.md, "Allow-list").

In a temp dir: ``twistd -n ticrypt-allowedlist`` (mode = off, rest_url =
off, its state file seeded with N allow-listed names whose upstream
addresses are valid for a day, per-client rate limit out of the way) and
``dnsmasq`` with the same N names as ``--host-record``s, both on
127.0.0.1.  ``dnsperf`` then sends the same query file (allowed names, and
a share of names that are not allowed: NXDOMAIN from ticrypt, REFUSED or
NXDOMAIN from dnsmasq) to each for ``--seconds``, over UDP, and the
figures are printed side by side: queries/s, average/min/max latency, and
the server's CPU seconds per 100k queries.

Needs dnsperf and dnsmasq (Debian: ``apt-get install -y dnsperf
dnsmasq-base``; with ``--install`` the benchmark runs that itself, as root).

    .venv/bin/python bench/bench_dns.py [--seconds 10] [--names 50]
        [--outstanding 100] [--nx 0.1] [--install]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(ROOT, ".venv", "bin", "twistd")


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return int(port)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_udp(port: int, name: str, deadline: float = 30.0) -> None:
    """Wait until the server answers one query (dig +short)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        out = subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+time=1", "+tries=1",
                              "+short", name], capture_output=True, text=True).stdout
        if out.strip():
            return
        time.sleep(0.2)
    raise SystemExit(f"no answer for {name} on port {port}")


def dnsperf(port: int, queries: str, seconds: float, outstanding: int) -> dict[str, float]:
    proc = subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", queries,
                           "-l", str(seconds), "-q", str(outstanding), "-t", "2"],
                          capture_output=True, text=True)
    text = proc.stdout + proc.stderr

    def num(pattern: str) -> float:
        m = re.search(pattern, text)
        if m is None:
            raise SystemExit(f"dnsperf output without {pattern!r}:\n{text}")
        return float(m.group(1))

    return {
        "qps": num(r"Queries per second:\s+([\d.]+)"),
        "sent": num(r"Queries sent:\s+(\d+)"),
        "lost": num(r"Queries lost:\s+(\d+)"),
        "avg_ms": num(r"Average Latency \(s\):\s+([\d.]+)") * 1000,
        "min_ms": num(r"Average Latency \(s\):\s+[\d.]+ \(min ([\d.]+)") * 1000,
        "max_ms": num(r"Average Latency \(s\):.*max ([\d.]+)\)") * 1000,
    }


def measure(pid: int, port: int, queries: str, args: argparse.Namespace) -> dict[str, float]:
    before = cpu_seconds(pid)
    result = dnsperf(port, queries, args.seconds, args.outstanding)
    result["cpu_s_per_100k"] = (cpu_seconds(pid) - before) / max(1.0, result["sent"]) * 1e5
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--names", type=int, default=50)
    p.add_argument("--outstanding", type=int, default=100)
    p.add_argument("--nx", type=float, default=0.1, help="share of names not allowed")
    p.add_argument("--install", action="store_true", help="apt-get install dnsperf dnsmasq")
    args = p.parse_args()
    if args.install and (shutil.which("dnsperf") is None or shutil.which("dnsmasq") is None):
        subprocess.run(["apt-get", "install", "-y", "-q", "dnsperf", "dnsmasq-base"], check=True)
    for tool in ("dnsperf", "dnsmasq", "dig"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y dnsperf dnsmasq-base "
                             "bind9-dnsutils (or run with --install as root)")
    work = tempfile.mkdtemp(prefix="bench-dns-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        names = [f"lic{i}.example.org" for i in range(args.names)]
        addrs = {n: f"10.77.9.{2 + i % 250}" for i, n in enumerate(names)}
        # the state file: entries, forwarding addresses, upstream good for a day
        state_dir = os.path.join(work, "state")
        os.makedirs(state_dir, mode=0o700)
        expires = time.time() + 86400
        with open(os.path.join(state_dir, "allowedlist-state.json"), "w") as f:
            json.dump({"serial": 1, "entries": [
                {"id": f"al-{i:x}", "name": n, "ports": [27000], "protocol": "tcp",
                 "comment": ""} for i, n in enumerate(names)],
                "forwarding": addrs,
                "upstream": {n: {"addresses": ["10.77.4.2"], "expires": expires}
                             for n in names}}, f)
        al_port, dm_port = free_port(), free_port()
        config = os.path.join(work, "allowedlist.ini")
        with open(config, "w") as f:
            f.write(f"""[allowedlist]
dns_listen = 127.0.0.1:{al_port}
vm_networks = 127.0.0.1/32
forward_addresses = 10.77.9.0/24
upstream = 127.0.0.1:9
rest_url = off
state_dir = state
audit_log = audit.log
mode = off
rate = 1000000
burst = 1000000
""")
        log = open(os.path.join(work, "allowedlist.log"), "wb")
        procs.append(subprocess.Popen([TWISTD, "-n", "--pidfile=", "ticrypt-allowedlist",
                                       "--config", config], cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT))
        dm = ["dnsmasq", "-k", "--port", str(dm_port), "--listen-address=127.0.0.1",
              "--bind-interfaces", "--no-resolv", "--no-hosts", "--no-negcache",
              f"--pid-file={work}/dnsmasq.pid", "--user=root" if os.geteuid() == 0 else "",
              "--local=/example.org/", "--cache-size=0"]
        dm += [f"--host-record={n},{a}" for n, a in addrs.items()]
        procs.append(subprocess.Popen([a for a in dm if a], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        wait_udp(al_port, names[0])
        wait_udp(dm_port, names[0])
        queries = os.path.join(work, "queries.txt")
        with open(queries, "w") as f:
            per_nx = max(1, round(1 / args.nx)) if args.nx > 0 else 0
            for i, n in enumerate(names * 20):
                f.write(f"{n} A\n")
                if per_nx and i % per_nx == 0:
                    f.write(f"nope{i}.example.org A\n")
        results = {}
        for label, pid, port in (("ticrypt-allowedlist", procs[0].pid, al_port),
                                 ("dnsmasq", procs[1].pid, dm_port)):
            measure(pid, port, queries, argparse.Namespace(**{**vars(args), "seconds": 1}))
            results[label] = measure(pid, port, queries, args)
        print(f"{args.seconds:g} s each, {args.names} names, {args.outstanding} outstanding, "
              f"{args.nx:.0%} not allowed, UDP, one dnsperf client on 127.0.0.1")
        cols = ("qps", "avg_ms", "min_ms", "max_ms", "lost", "cpu_s_per_100k")
        print(f"{'server':22}" + "".join(f"{c:>16}" for c in cols))
        for label, r in results.items():
            print(f"{label:22}" + "".join(f"{r[c]:16.3f}" for c in cols))
        ratio = results["ticrypt-allowedlist"]["qps"] / results["dnsmasq"]["qps"]
        print(f"qps ratio ticrypt/dnsmasq: {ratio:.2f}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
