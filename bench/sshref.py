"""OpenSSH on 127.0.0.1 as the reference of the benchmarks: an sshd with
its own config, host key and authorized key in a scratch folder, started
and stopped by the benchmark (never the machine's own sshd).  Not a test.

    with LocalSshd(workdir) as sshd:
        sshd.run(["true"])                          # ssh 127.0.0.1 true
        with sshd.forward(local_port, 8080):        # ssh -N -L local_port:127.0.0.1:8080
            ...

Cipher ``aes128-gcm@openssh.com`` both ways, as the issues' reference
figures.  When ``sshd`` is missing and we are root, Debian's
``openssh-server`` is installed first (the benchmark's set-up step; no
test needs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CIPHER = "aes128-gcm@openssh.com"


def find_sshd() -> str:
    """The sshd binary, installing openssh-server as root if needed."""
    for path in ("/usr/sbin/sshd", shutil.which("sshd") or ""):
        if path and os.path.exists(path):
            return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], env=env,
                       check=False, stdout=subprocess.DEVNULL)
        if os.path.exists("/usr/sbin/sshd"):
            return "/usr/sbin/sshd"
    raise SystemExit("bench: no sshd (install openssh-server) for the OpenSSH reference")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, seconds: float = 20.0, proc: Any = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bench: {proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: nothing listens on 127.0.0.1:{port} after {seconds} s")


class LocalSshd:
    def __init__(self, workdir: str) -> None:
        self.dir = os.path.join(workdir, "sshd")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = os.environ.get("USER") or "root"

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def start(self) -> LocalSshd:
        sshd = find_sshd()
        for name in ("host_key", "user_key"):
            if not os.path.exists(self._path(name)):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                self._path(name)], check=True)
        shutil.copy(self._path("user_key.pub"), self._path("authorized_keys"))
        os.chmod(self._path("authorized_keys"), 0o600)
        with open(self._path("sshd_config"), "w") as f:
            f.write(f"""ListenAddress 127.0.0.1
Port {self.port}
HostKey {self._path("host_key")}
AuthorizedKeysFile {self._path("authorized_keys")}
PidFile {self._path("sshd.pid")}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
Ciphers {CIPHER}
LogLevel ERROR
MaxStartups 1000
MaxSessions 1000
""")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", self._path("sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LocalSshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def ssh_args(self) -> list[str]:
        """``ssh`` and its options for this server, up to the destination."""
        return ["ssh", "-q", "-i", self._path("user_key"), "-p", str(self.port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", f"Ciphers={CIPHER}", "-o", "Compression=no",
                f"{self.user}@127.0.0.1"]

    def run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*self.ssh_args(), *argv], check=True, **kw)

    @contextmanager
    def forward(self, local_port: int, target_port: int) -> Iterator[subprocess.Popen[bytes]]:
        """``ssh -N -L local_port:127.0.0.1:target_port`` while the block runs."""
        args = self.ssh_args()
        proc = subprocess.Popen([*args[:-1], "-N", "-o", "ExitOnForwardFailure=yes",
                                 "-L", f"127.0.0.1:{local_port}:127.0.0.1:{target_port}",
                                 args[-1]])
        try:
            wait_port(local_port, proc=proc)
            yield proc
        finally:
            proc.terminate()
            proc.wait()
