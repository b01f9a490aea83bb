"""Benchmark ``ticrypt exec`` / ``ticrypt shell`` against OpenSSH (not a test).

    .venv/bin/python bench/bench_exec.py [--quick] [--runs N] [--size MiB]

In a temp folder it builds the lab deployment (:class:`ticrypt.lab.deploy.Deployment`):
ticrypt-proxy, ticrypt-rest and one ticrypt-vmc (the "VM") as real
``twistd -n`` daemons on 127.0.0.1, signs the user in with ``ticrypt login``,
and starts its own OpenSSH server on 127.0.0.1 (own ``sshd_config``, host
key and authorized key; started and stopped here; ``apt-get install
openssh-server`` first if sshd is missing and we are root).  Then, alternating
ticrypt and ssh (A B A B ...), ``--runs`` times each (median reported):

* **stdout**: ``ticrypt exec VM -- head -c SIZE /dev/zero`` vs
  ``ssh host head -c SIZE /dev/zero`` (stdout to /dev/null);
* **stdin**: SIZE bytes piped into ``ticrypt exec VM -- sh -c 'cat > /dev/null'``
  vs ``ssh host 'cat > /dev/null'``;
* **CPU-s per GB** of both bulk runs, summed over every process of the path:
  the client (``wait4`` rusage), and /proc/PID/stat utime+stime+cutime+cstime
  deltas of the proxy, rest and vmc (vmc's reaped command included) or of
  the listening sshd (its reaped session processes and their commands);
* **exec -- true**: wall time of ``ticrypt exec VM -- true`` vs ``ssh host true``;
* **shell round trip**: in ``ticrypt shell VM`` vs ``ssh -tt host /bin/sh``
  (both a PTY running /bin/sh, stdin/stdout pipes of this script), a 64-byte
  line (``#`` comment) is written and timed until its echo came back.

ssh uses ``aes128-gcm@openssh.com``; the secure channel is AES-256-GCM.
Prints one JSON line per measurement and a summary table.  ``--quick``: 64
MiB and 3 runs (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import defer, task, threads  # noqa: E402

from ticrypt.lab import daemons  # noqa: E402
from ticrypt.lab.deploy import Addresses, Deployment, free_port  # noqa: E402

MiB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")
USER = "alice"


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def proc_cpu(pid: int, reaped: bool = True) -> float:
    """CPU seconds of ``pid`` (and of the children it has reaped), 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    # after the command: state(0) ... utime(11) stime(12) cutime(13) cstime(14)
    return sum(int(x) for x in fields[11:15 if reaped else 13]) / TICK


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def settle(pids: list[int], no_children_of: int | None = None, timeout: float = 5.0) -> None:
    """Wait until the daemons' CPU counters stop moving (what a run leaves
    them to do is counted) and ``no_children_of`` has reaped its children."""
    deadline = time.monotonic() + timeout
    last = [proc_cpu(p) for p in pids]
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = [proc_cpu(p) for p in pids]
        if now == last and (no_children_of is None or not children(no_children_of)):
            return
        last = now


class Timed:
    """One client process: wall time, its own CPU (wait4), its exit status."""

    def __init__(self, argv: list[str], env: dict[str, str], *, stdin: Any = subprocess.DEVNULL,
                 stdout: Any = subprocess.DEVNULL):
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdin=stdin, stdout=stdout,
                                     stderr=subprocess.PIPE)

    def wait(self) -> tuple[float, float, int, str]:
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()  # small: an error line at most
        _, status, usage = os.wait4(self.proc.pid, 0)
        wall = time.perf_counter() - self.start
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return wall, usage.ru_utime + usage.ru_stime, self.proc.returncode, err.decode(
            "utf-8", "replace")


# -- the two paths --------------------------------------------------------------------


class Path:
    name = ""
    env: dict[str, str]

    def exec_argv(self, command: list[str]) -> list[str]:
        raise NotImplementedError

    def shell_argv(self) -> list[str]:
        raise NotImplementedError

    def server_pids(self) -> list[int]:
        raise NotImplementedError

    def reaper(self) -> int | None:
        return None


class TicryptPath(Path):
    name = "ticrypt"

    def __init__(self, vm_id: str, env: dict[str, str], pids: list[int]):
        self.vm_id, self.env, self.pids = vm_id, env, pids

    def exec_argv(self, command: list[str]) -> list[str]:
        return [daemons.script_path("ticrypt"), "exec", self.vm_id, "--", *command]

    def shell_argv(self) -> list[str]:
        return [daemons.script_path("ticrypt"), "shell", self.vm_id]

    def server_pids(self) -> list[int]:
        return self.pids


class SshPath(Path):
    """Our own sshd on 127.0.0.1 (``sshd -D``, a child of this script)."""

    name = "ssh"

    def __init__(self, folder: str):
        self.dir = os.path.join(folder, "ssh")
        os.makedirs(self.dir, mode=0o700)
        self.env = dict(os.environ)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = pwd.getpwuid(os.getuid()).pw_name

    def start(self) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd):
            if os.getuid() != 0:
                raise SystemExit("bench_exec: sshd missing (install openssh-server)")
            subprocess.run(["apt-get", "install", "-y", "openssh-server"], check=True,
                           stdout=subprocess.DEVNULL)
        d = self.dir
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench",
                            "-f", os.path.join(d, name)], check=True)
        shutil.copy(os.path.join(d, "user_key.pub"), os.path.join(d, "authorized_keys"))
        with open(os.path.join(d, "host_key.pub")) as f:
            host_pub = " ".join(f.read().split()[:2])
        with open(os.path.join(d, "known_hosts"), "w") as f:
            f.write(f"[127.0.0.1]:{self.port} {host_pub}\n")
        with open(os.path.join(d, "sshd_config"), "w") as f:
            f.write(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile none
AuthorizedKeysFile {d}/authorized_keys
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
Ciphers aes128-gcm@openssh.com
Compression no
UseDNS no
PrintMotd no
PrintLastLog no
LogLevel ERROR
""")
        if os.getuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
        self.proc = subprocess.Popen([os.path.realpath(sshd), "-D", "-e", "-f",
                                      os.path.join(d, "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("sshd did not start") from None
                time.sleep(0.05)
        wall, _, code, err = Timed(self.exec_argv(["true"]), self.env).wait()
        if code != 0:
            raise RuntimeError(f"ssh to our sshd failed: {err.strip()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def _ssh(self) -> list[str]:
        d = self.dir
        return ["ssh", "-F", "/dev/null", "-p", str(self.port), "-i", f"{d}/user_key",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={d}/known_hosts", "-o", "StrictHostKeyChecking=yes",
                "-o", "Ciphers=aes128-gcm@openssh.com", "-o", "Compression=no",
                "-o", "ControlMaster=no", "-o", "ControlPath=none"]

    def exec_argv(self, command: list[str]) -> list[str]:
        # ssh passes one command line to the login shell, as ticrypt's argv
        # is run without one: quote nothing fancier than these benches need
        return [*self._ssh(), f"{self.user}@127.0.0.1", " ".join(command)]

    def shell_argv(self) -> list[str]:
        return [*self._ssh(), "-tt", f"{self.user}@127.0.0.1", "/bin/sh"]

    def server_pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]

    def reaper(self) -> int | None:
        assert self.proc is not None
        return self.proc.pid


# -- the measurements ---------------------------------------------------------------


def bulk(path: Path, direction: str, size: int) -> dict[str, Any]:
    """SIZE bytes of stdout (``head -c``) or of stdin (into ``cat > /dev/null``)."""
    pids = path.server_pids()
    settle(pids, path.reaper())
    before = {p: proc_cpu(p) for p in pids}
    if direction == "stdout":
        wall, client, code, err = Timed(path.exec_argv(["head", "-c", str(size), "/dev/zero"]),
                                        path.env).wait()
    else:
        feeder = subprocess.Popen(["head", "-c", str(size), "/dev/zero"],
                                  stdout=subprocess.PIPE)
        assert feeder.stdout is not None
        run = Timed(path.exec_argv(["sh", "-c", "'cat > /dev/null'"] if path.name == "ssh"
                                   else ["sh", "-c", "cat > /dev/null"]), path.env,
                    stdin=feeder.stdout)
        feeder.stdout.close()
        wall, client, code, err = run.wait()
        feeder.wait()
    if code != 0:
        raise RuntimeError(f"{path.name} {direction} exited {code}: {err.strip()[-300:]}")
    settle(pids, path.reaper())
    servers = {p: proc_cpu(p) - before[p] for p in pids}
    cpu = client + sum(servers.values())
    return {"bench": f"bulk-{direction}", "path": path.name, "bytes": size,
            "seconds": round(wall, 3), "MB_per_s": round(size / wall / 1e6, 1),
            "cpu_client": round(client, 2),
            "cpu_servers": [round(v, 2) for v in servers.values()],
            "cpu_s": round(cpu, 2), "cpu_s_per_GB": round(cpu / (size / 1e9), 2)}


def exec_true(path: Path) -> dict[str, Any]:
    wall, client, code, err = Timed(path.exec_argv(["true"]), path.env).wait()
    if code != 0:
        raise RuntimeError(f"{path.name} true exited {code}: {err.strip()[-300:]}")
    return {"bench": "exec-true", "path": path.name, "seconds": round(wall, 4),
            "cpu_client": round(client, 3)}


def _read_until(fd: int, buf: bytearray, marker: bytes, deadline: float) -> None:
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"no {marker!r} in {bytes(buf[-200:])!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            data = os.read(fd, 65536)
            if not data:
                raise RuntimeError(f"EOF before {marker!r}: {bytes(buf[-200:])!r}")
            buf += data


def shell_rtt(path: Path, rounds: int) -> dict[str, Any]:
    """Median time from writing a 64-byte line to the shell's PTY until its
    echo is back, over ``rounds`` lines (each after the previous prompt)."""
    proc = subprocess.Popen(path.shell_argv(), env=path.env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin is not None and proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = bytearray()
    deadline = time.monotonic() + 30
    proc.stdin.write(b"PS1=@P@\n")
    proc.stdin.flush()
    _read_until(fd, buf, b"@P@", deadline)
    times = []
    for i in range(rounds):
        buf.clear()
        line = b"#" + b"%02d" % (i % 100) + b"a" * 59 + b"z\n"
        assert len(line) == 64
        t0 = time.perf_counter()
        proc.stdin.write(line)
        proc.stdin.flush()
        _read_until(fd, buf, line[-4:-1], deadline)
        times.append(time.perf_counter() - t0)
        _read_until(fd, buf, b"@P@", deadline)
    proc.stdin.write(b"exit\n")
    proc.stdin.close()
    proc.wait(30)
    return {"bench": "shell-rtt-64B", "path": path.name, "rounds": rounds,
            "median_ms": round(statistics.median(times) * 1000, 3),
            "p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))] * 1000, 3)}


def alternate(paths: list[Path], runs: int, measure: Callable[[Path], dict[str, Any]],
              key: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {p.name: [] for p in paths}
    for _ in range(runs):
        for p in paths:
            r = measure(p)
            emit(r)
            out[p.name].append(r)
    return out


def med(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def measure_all(opts: argparse.Namespace, paths: list[Path]) -> list[dict[str, Any]]:
    size = opts.size * MiB
    summary = []
    for direction in [d for d in ("stdout", "stdin") if d in opts.only]:
        def run(p: Path, d: str = direction) -> dict[str, Any]:
            return bulk(p, d, size)
        res = alternate(paths, opts.runs, run, "seconds")
        t, s = res["ticrypt"], res["ssh"]
        row = {"bench": f"bulk-{direction}", "size_MiB": opts.size,
               "ticrypt_MB_per_s": med(t, "MB_per_s"), "ssh_MB_per_s": med(s, "MB_per_s"),
               "throughput_ratio": round(med(t, "MB_per_s") / med(s, "MB_per_s"), 2),
               "ticrypt_cpu_s_per_GB": med(t, "cpu_s_per_GB"),
               "ssh_cpu_s_per_GB": med(s, "cpu_s_per_GB"),
               "cpu_ratio": round(med(t, "cpu_s_per_GB") / med(s, "cpu_s_per_GB"), 2)}
        emit(row)
        summary.append(row)
    if "true" in opts.only:
        res = alternate(paths, max(opts.runs, 5 if opts.quick else 7), exec_true, "seconds")
        t_true, s_true = med(res["ticrypt"], "seconds"), med(res["ssh"], "seconds")
        row = {"bench": "exec-true", "ticrypt_s": t_true, "ssh_s": s_true,
               "ticrypt_client_cpu_s": med(res["ticrypt"], "cpu_client"),
               "wall_ratio": round(t_true / s_true, 2)}
        emit(row)
        summary.append(row)
    if "shell" in opts.only:
        res = alternate(paths, opts.runs, lambda p: shell_rtt(p, opts.rounds), "median_ms")
        t_rtt, s_rtt = med(res["ticrypt"], "median_ms"), med(res["ssh"], "median_ms")
        row = {"bench": "shell-rtt-64B", "ticrypt_ms": t_rtt, "ssh_ms": s_rtt,
               "ratio": round(t_rtt / s_rtt, 2)}
        emit(row)
        summary.append(row)
    return summary


def print_table(summary: list[dict[str, Any]]) -> None:
    print("\n| what | ticrypt | ssh | ratio |\n|---|---|---|---|")
    for r in summary:
        b = r["bench"]
        if b.startswith("bulk"):
            print(f"| {b} {r['size_MiB']} MiB, MB/s | {r['ticrypt_MB_per_s']} | "
                  f"{r['ssh_MB_per_s']} | {r['throughput_ratio']}x throughput |")
            print(f"| {b} CPU-s per GB, all processes | {r['ticrypt_cpu_s_per_GB']} | "
                  f"{r['ssh_cpu_s_per_GB']} | {r['cpu_ratio']}x |")
        elif b == "exec-true":
            print(f"| exec -- true, wall s (client CPU {r['ticrypt_client_cpu_s']} s) | "
                  f"{r['ticrypt_s']} | {r['ssh_s']} | {r['wall_ratio']}x |")
        else:
            print(f"| shell 64 B round trip, ms | {r['ticrypt_ms']} | {r['ssh_ms']} | "
                  f"{r['ratio']}x |")
    sys.stdout.flush()


# -- the lab ---------------------------------------------------------------------------


class Lab:
    """proxy, rest and one vmc under twistd; the user logged in.  A subclass
    starts more roles in :meth:`start_more` (bench_page: connect)."""

    def __init__(self, reactor: Any, folder: str, comment: str = "bench_exec"):
        self.reactor = reactor
        self.dep = Deployment(folder, Addresses(rest_port=free_port(), proxy_port=free_port(),
                                                vm_host="127.0.0.1:2222"),
                              comment=comment)
        self.procs: list[daemons.Daemon] = []
        #: pid of each role started ("proxy", "rest", "vmc", ...)
        self.by_role: dict[str, int] = {}
        self.env = daemons.daemon_env()
        self.env["TICRYPT_CLIENT_CONFIG"] = self.dep.client_ini(USER)
        # The CLI as installed: its bytecode compiled once and cached, not
        # compiled at every start (PYTHONDONTWRITEBYTECODE in the caller's
        # environment cost `exec -- true` ~0.08 s a run).
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env["PYTHONPYCACHEPREFIX"] = os.path.join(folder, "pycache")
        self.vm_id = ""

    async def _start(self, plugin: str, config: str) -> daemons.Daemon:
        proc = daemons.spawn(self.reactor, plugin, config, timeout=60, cwd=self.dep.dir)
        self.procs.append(proc)
        await proc.ready
        self.by_role[plugin.removeprefix("ticrypt-")] = proc.transport.pid  # type: ignore[union-attr]
        return proc

    async def run(self, args: list[str]) -> tuple[int, str, str]:
        return await daemons.run_command(self.reactor, [daemons.script_path(args[0]), *args[1:]],
                                         env=self.env, cwd=self.dep.dir, timeout=60)

    async def start(self) -> None:
        dep = self.dep
        dep.ca()
        dep.feed_secret()
        dep.user_key(USER)
        dep.rest_ini()
        dep.proxy_ini()
        await dep.init(self.run, USER)
        await dep.start_backend(self._start)
        self.vm_id, token = await dep.add_vm(self.run, USER, "benchvm")
        await self._start("ticrypt-vmc", dep.vmc_ini(token))
        await self.start_more()
        code, out, err = await self.run(["ticrypt", "login"])
        if code != 0:
            raise RuntimeError(f"ticrypt login failed: {err or out}")
        code, out, err = await self.run(["ticrypt", "exec", self.vm_id, "--", "true"])
        if code != 0:  # also caches the bytecode of the exec path
            raise RuntimeError(f"ticrypt exec failed: {err or out}")

    async def start_more(self) -> None:
        """More roles, after vmc and before the CLI logs in."""

    def pids(self) -> list[int]:
        return [p.transport.pid for p in self.procs]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            await proc.stop()


async def bench_main(reactor: Any, opts: argparse.Namespace) -> None:
    folder = tempfile.mkdtemp(prefix="bench-exec-")
    lab = Lab(reactor, folder)
    ssh = SshPath(folder)
    try:
        await lab.start()
        await threads.deferToThread(ssh.start)
        ticrypt = TicryptPath(lab.vm_id, lab.env, lab.pids())
        emit({"bench": "setup", "vm": lab.vm_id, "pids": dict(zip(
            ["proxy", "rest", "vmc"], lab.pids(), strict=True)), "sshd": ssh.server_pids()[0]})
        if opts.hold:
            emit({"hold": folder, "env": {"TICRYPT_CLIENT_CONFIG":
                                          lab.env["TICRYPT_CLIENT_CONFIG"]},
                  "ssh": " ".join(ssh.exec_argv(["CMD"]))})
            await task.deferLater(reactor, opts.hold, lambda: None)
        summary = await threads.deferToThread(measure_all, opts, [ticrypt, ssh])
        print_table(summary)
    finally:
        ssh.stop()
        await lab.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, 3 runs")
    parser.add_argument("--runs", type=int, default=None, help="runs per path (default 3)")
    parser.add_argument("--size", type=int, default=None, help="MiB per bulk run (default 512)")
    parser.add_argument("--rounds", type=int, default=None, help="shell lines per run")
    parser.add_argument("--only", default="stdout,stdin,true,shell",
                        help="which measurements (comma-separated; the rest in order)")
    parser.add_argument("--hold", type=float, default=0,
                        help="seconds to keep the lab up before measuring (profiling)")
    opts = parser.parse_args()
    opts.runs = opts.runs or 3
    opts.size = opts.size or (64 if opts.quick else 512)
    opts.rounds = opts.rounds or (20 if opts.quick else 50)
    task.react(lambda r: defer.ensureDeferred(bench_main(r, opts)))


if __name__ == "__main__":
    main()
