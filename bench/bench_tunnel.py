"""Benchmark of an application port tunnel, side by side in one run with
OpenSSH local forwarding and a direct connection.  Not a test.

    .venv/bin/python bench/bench_tunnel.py [--quick] [--rounds N]
    .venv/bin/python bench/bench_tunnel.py --kernel [--quick]     # as root

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

``--kernel`` (root only; skipped with one line otherwise) measures the
kernel path instead, in four network namespaces the benchmark creates and
always removes: user (client, ticrypt-connect, ssh) -- backend (rest,
proxy with ``[leases] mode = nft``) -- vmhost (``mode = nft``) -- VM (vmc,
sshd, the application), joined by veth pairs in 10.77.0.0/16 that exist
only inside them.  Only connect and vmc touch the tunnel's bytes; proxy and
vmhost are DNAT rules.  ``direct`` there is the client in the user
namespace connecting to the application in the VM namespace through the
same two forwarding namespaces (no NAT), ``ssh -L`` an ssh in the user
namespace to an sshd in the VM namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sshref  # noqa: E402
import tcpbench as tb  # noqa: E402
from twisted.internet import task, threads  # noqa: E402

from ticrypt.lab import daemons  # noqa: E402
from ticrypt.lab.daemons import daemon_env, run_command, script_path, twistd_path  # noqa: E402
from ticrypt.lab.deploy import Addresses, Deployment, free_port  # noqa: E402

USER = "alice"
VM = "benchvm"
MiB = 1024 * 1024


class Path:
    def __init__(self, name: str, port: int, pids: Callable[[], Iterable[int]],
                 host: str = "127.0.0.1"):
        self.name = name
        self.port = port
        self.pids = pids
        self.host = host


#: Port -> host for the client's connections (tcpbench connects to
#: 127.0.0.1; ``--kernel``'s direct path goes to the VM namespace's address).
HOSTS: dict[int, str] = {}


def _connect(port: int) -> socket.socket:
    s = socket.create_connection((HOSTS.get(port, "127.0.0.1"), port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


tb._connect = _connect


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


# -- --kernel: the namespaces ------------------------------------------------------

#: The private range of the namespaces' links: 10.77.N.1 -- 10.77.N.2 for
#: link N (1 user-backend, 2 backend-vmhost, 3 vmhost-VM).
NET = "10.77"
USER_IP, BACKEND_IP, VMHOST_IP, VM_IP = f"{NET}.1.1", f"{NET}.1.2", f"{NET}.2.2", f"{NET}.3.2"
APP_PORT, SSH_LOCAL, VMHOST_BASE, REST_PORT = 5201, 7022, 2200, 8443
ROLES = ("user", "backend", "vmhost", "vm")
CLONE_NEWNET = 0x40000000

#: The application of the VM namespace: tcpbench's server, on every address
#: of the namespace (vmc reaches it on 127.0.0.1, the direct path on VM_IP).
APP = """import socket, sys
sys.path.insert(0, sys.argv[1])
import tcpbench
create = socket.create_server
socket.create_server = lambda addr, **kw: create(("0.0.0.0", int(sys.argv[3])), **kw)
tcpbench.serve(sys.argv[2])
"""


def sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"bench: {' '.join(argv)}: {proc.stderr.strip()}")
    return proc.stdout


class Namespaces:
    """user -- backend -- vmhost -- vm, made by :meth:`create`, all removed
    by :meth:`remove` (which removes the veth pairs with them)."""

    def __init__(self) -> None:
        self.tag = f"tb{os.getpid() % 100000}"
        self.ns = {role: f"{self.tag}-{role}" for role in ROLES}
        self.made: list[str] = []

    def create(self) -> None:
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for n, (a, b) in enumerate(zip(ROLES, ROLES[1:], strict=False), start=1):
            ia, ib = f"{self.tag}{n}a", f"{self.tag}{n}b"  # at most 15 characters
            sh("ip", "link", "add", ia, "netns", self.ns[a], "type", "veth", "peer", "name", ib,
               "netns", self.ns[b])
            for ns, dev, ip in ((self.ns[a], ia, f"{NET}.{n}.1"), (self.ns[b], ib, f"{NET}.{n}.2")):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.ns["user"], "route", "add", "default", "via", BACKEND_IP)
        sh("ip", "-n", self.ns["backend"], "route", "add", f"{NET}.3.0/24", "via", VMHOST_IP)
        sh("ip", "-n", self.ns["vmhost"], "route", "add", "default", "via", f"{NET}.2.1")
        sh("ip", "-n", self.ns["vm"], "route", "add", "default", "via", f"{NET}.3.1")
        for role in ("backend", "vmhost"):
            sh("ip", "netns", "exec", self.ns[role], "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

    def remove(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made.clear()

    def exec(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[role], *argv]


def in_netns(ns: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a new thread moved into network namespace ``ns`` (setns
    moves only the calling thread; the threads it starts inherit it)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # re-raised in the caller
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


class NsSshd:
    """An sshd of the benchmark's own in the VM namespace (on VM_IP:22, the
    cipher and options of ``sshref``) and ``ssh -N -L`` from the user namespace."""

    def __init__(self, spaces: Namespaces, workdir: str) -> None:
        self.spaces = spaces
        self.dir = os.path.join(workdir, "sshd")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def start(self) -> int:
        for name in ("host_key", "user_key"):
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self._path(name))
        shutil.copy(self._path("user_key.pub"), self._path("authorized_keys"))
        with open(self._path("sshd_config"), "w") as f:
            f.write(f"ListenAddress {VM_IP}\nPort 22\nHostKey {self._path('host_key')}\n"
                    f"AuthorizedKeysFile {self._path('authorized_keys')}\n"
                    "PidFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
                    f"AllowTcpForwarding yes\nCiphers {sshref.CIPHER}\nLogLevel ERROR\n"
                    "MaxStartups 1000\nMaxSessions 1000\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        sshd = subprocess.Popen(self.spaces.exec("vm", [
            sshref.find_sshd(), "-D", "-e", "-f", self._path("sshd_config")]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(sshd)
        wait_port(self.spaces.ns["user"], VM_IP, 22, sshd)
        user = os.environ.get("USER") or "root"
        ssh = subprocess.Popen(self.spaces.exec("user", [
            "ssh", "-q", "-i", self._path("user_key"), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", f"Ciphers={sshref.CIPHER}", "-o", "Compression=no", "-N",
            "-o", "ExitOnForwardFailure=yes",
            "-L", f"127.0.0.1:{SSH_LOCAL}:127.0.0.1:{APP_PORT}", f"{user}@{VM_IP}"]))
        self.procs.append(ssh)
        wait_port(self.spaces.ns["user"], "127.0.0.1", SSH_LOCAL, ssh)
        return ssh.pid

    @property
    def sshd_pid(self) -> int:
        return self.procs[0].pid

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_port(ns: str, host: str, port: int, proc: Any = None, seconds: float = 30.0) -> None:
    """Until ``host:port`` accepts a connection from namespace ``ns``."""
    def probe() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"bench: {proc.args[3]} exited with {proc.returncode}")
            try:
                socket.create_connection((host, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"bench: nothing on {host}:{port} (from {ns}) after {seconds} s")
    in_netns(ns, probe)


async def start_ticrypt_kernel(reactor: Any, workdir: str, spaces: Namespaces,
                               procs: list[daemons.Daemon]) -> tuple[int, list[int]]:
    """Every role in its namespace, proxy leases and vmhost in nft mode, one
    tunnel to APP_PORT: (local port in the user namespace, pids of connect
    and vmc: the only processes on the path)."""
    dep = Deployment(os.path.join(workdir, "ticrypt"), Addresses(
        rest_host=BACKEND_IP, rest_port=REST_PORT, proxy_host=BACKEND_IP,
        vm_host=f"{VMHOST_IP}:{VMHOST_BASE + 1}", lease_ports="6000-6009"),
        comment="written by bench_tunnel --kernel")
    where = {"ticrypt-proxy": "backend", "ticrypt-rest": "backend", "ticrypt-vmhost": "vmhost",
             "ticrypt-vmc": "vm", "ticrypt-connect": "user"}

    async def start(plugin: str, config: str) -> daemons.Daemon:
        if plugin == "ticrypt-proxy":  # start_backend writes the default (userspace) leases
            config = dep.proxy_ini(leases={"mode": "nft"})
        log = open(dep.path(f"{plugin}.log"), "a", encoding="utf-8")  # noqa: SIM115

        def echo(_name: str, line: str) -> None:
            log.write(line + "\n")

        proc = daemons.Daemon(plugin, reactor, 60, echo)
        argv = spaces.exec(where[plugin], [twistd_path(), "-n", "--pidfile=", plugin,
                                           "--config", config])
        reactor.spawnProcess(proc, shutil.which("ip"), argv, env=daemon_env(), path=dep.dir)
        procs.append(proc)
        await proc.ready
        return proc

    async def run_in(role: str | None, args: list[str]) -> tuple[int, str, str]:
        argv = [script_path(args[0]), *args[1:]]
        return await run_command(reactor, spaces.exec(role, argv) if role else argv,
                                 cwd=dep.dir)

    async def run(args: list[str]) -> tuple[int, str, str]:
        return await run_in(None, args)

    dep.ca()
    dep.feed_secret()
    dep.user_key(USER)
    dep.rest_ini()
    await dep.init(run, USER)
    await dep.start_backend(start)
    _, token = await dep.add_vm(run, USER, VM)
    tunnel, _sftp = dep.vm_tunnel(ports=(APP_PORT,), sftp=False, host=VM_IP)
    vmc = await start("ticrypt-vmc", dep.vmc_ini(token, tunnel_settings=tunnel))
    await start("ticrypt-vmhost", dep.vmhost_ini(
        {1: f"{VM_IP}:{vmc.address('tunnel')[1]}"}, base=str(VMHOST_BASE), mode="nft",
        listen_host=VMHOST_IP))
    dep.connect_ini()
    connect = await dep.start_connect(start)
    client_ini = dep.client_ini(USER)
    for args in (["login"], ["tunnel", "open", VM, "--port", str(APP_PORT)]):
        code, out, err = await run_in("user", ["ticrypt", "--config", client_ini, *args])
        if code:
            raise SystemExit(f"bench: ticrypt {' '.join(args)} failed: {out}{err}")
    m = re.search(r"^127\.0\.0\.1:(\d+) -> ", out, re.M)
    if m is None:
        raise SystemExit(f"bench: no local port in {out!r}")
    tables = sh("ip", "netns", "exec", spaces.ns["backend"], "nft", "list", "tables") + sh(
        "ip", "netns", "exec", spaces.ns["vmhost"], "nft", "list", "tables")
    print("bench_tunnel: nft tables: " + " ".join(tables.split()), flush=True)
    pids = [p.transport.pid for p in (connect, vmc) if p.transport is not None]
    return int(m.group(1)), pids


async def main_kernel(reactor: Any, opts: argparse.Namespace) -> None:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft")):
        print("bench_tunnel: --kernel needs root, ip and nft; skipped", flush=True)
        return
    workdir = tempfile.mkdtemp(prefix="bench-tunnel-kernel-")
    spaces = Namespaces()
    procs: list[daemons.Daemon] = []
    sshd = NsSshd(spaces, workdir)
    app: subprocess.Popen[bytes] | None = None

    def interrupted() -> None:
        # Ctrl-C stops the reactor; this coroutine's finally may never run:
        # nothing of the run may outlive it.
        trigger.clear()
        for proc in procs:
            proc.signal(signal.SIGKILL)
        sshd.stop()
        if app is not None and app.poll() is None:
            app.kill()
        spaces.remove()
        shutil.rmtree(workdir, ignore_errors=True)

    trigger = [reactor.addSystemEventTrigger("before", "shutdown", interrupted)]
    try:
        spaces.create()
        port_file = os.path.join(workdir, "app.port")
        app = subprocess.Popen(spaces.exec("vm", [
            sys.executable, "-c", APP, os.path.dirname(os.path.abspath(__file__)), port_file,
            str(APP_PORT)]))
        wait_port(spaces.ns["user"], VM_IP, APP_PORT, app)
        local, pids = await start_ticrypt_kernel(reactor, workdir, spaces, procs)
        ssh_pid = sshd.start()
        HOSTS[APP_PORT] = VM_IP
        paths = [Path("direct", APP_PORT, lambda: [], VM_IP),
                 Path("ssh -L", SSH_LOCAL, lambda: [ssh_pid, sshd.sshd_pid]),
                 Path("ticrypt", local, lambda: pids)]
        print(f"bench_tunnel --kernel: {'quick, ' if opts.quick else ''}{opts.rounds} rounds, "
              "namespaces user/backend/vmhost/vm, proxy and vmhost in nft mode; CPU counts "
              "the path's processes only (connect + vmc; ssh + sshd)", flush=True)
        lines = await threads.deferToThread(in_netns, spaces.ns["user"],
                                            lambda: report(paths, opts))
        if opts.out:
            with open(opts.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    finally:
        for t in trigger:
            reactor.removeSystemEventTrigger(t)
        sshd.stop()
        for proc in reversed(procs):
            await proc.stop()
        if app is not None:
            app.kill()
            app.wait()
        spaces.remove()
        shutil.rmtree(workdir, ignore_errors=True)


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
        shutil.rmtree(workdir, ignore_errors=True)  # keys, certificates, logs


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per metric (median)")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--kernel", action="store_true",
                        help="the kernel path (nft at proxy and vmhost) in network namespaces; root only")
    opts = parser.parse_args()
    task.react(lambda reactor: (main_kernel if opts.kernel else main)(reactor, opts))


if __name__ == "__main__":
    cli()
