"""The applications "inside" a lab VM and the clients a user points at a
tunnel: a small static web server on 127.0.0.1 (``python -m http.server``
style, on the lab's own reactor), and what OpenSSH ``sftp`` needs to reach
vmc's SFTP server through a tunnel (the user's key in OpenSSH format, a
known_hosts line pinning vmc's SFTP host key).

Used by ``ticrypt-lab`` and the end-to-end tunnel tests.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.web import server, static

from ticrypt import identity
from ticrypt.fsutil import atomic_write

INDEX = """<!doctype html>
<title>ticrypt lab VM</title>
<p>Hello from the web server inside the lab VM, through the ticrypt tunnel.</p>
"""


def web_folder(path: str) -> str:
    """Make ``path`` with an ``index.html`` (and a ``hello.txt``); returns it."""
    os.makedirs(path, mode=0o755, exist_ok=True)
    atomic_write(os.path.join(path, "index.html"), INDEX.encode(), 0o644)
    atomic_write(os.path.join(path, "hello.txt"), b"hello through the tunnel\n", 0o644)
    return path


async def start_web(reactor: Any, folder: str, port: int = 0) -> IListeningPort:
    """Serve ``folder`` read-only over HTTP on 127.0.0.1:``port`` (0: any)."""
    site = server.Site(static.File(folder))
    site.noisy = False
    site.displayTracebacks = False
    ep = endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
    return await ep.listen(site)


def openssh_files(directory: str, user_key: str, sftp_host_key: str,
                  local_port: int, name: str = "sftp") -> tuple[str, str]:
    """For ``sftp`` through a tunnel: ``NAME-id_ed25519`` (the ticrypt key
    ``user_key``, unencrypted, in OpenSSH format, 0600) and
    ``NAME-known_hosts`` pinning vmc's SFTP host key (``ssh-ed25519 ...``)
    for ``[127.0.0.1]:local_port``.  Returns (key file, known_hosts)."""
    key = identity.load_private(user_key)
    key_path = os.path.join(directory, f"{name}-id_ed25519")
    atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()), 0o600)
    known = os.path.join(directory, f"{name}-known_hosts")
    atomic_write(known, f"[127.0.0.1]:{local_port} {sftp_host_key.strip()}\n".encode(), 0o644)
    return key_path, known


def sftp_argv(key_path: str, known_hosts: str, local_port: int, user: str,
              batch: str | None = None) -> list[str]:
    """``sftp`` to 127.0.0.1:local_port with only that key and that host key."""
    argv = ["sftp", "-P", str(local_port), "-i", key_path,
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "GlobalKnownHostsFile=/dev/null", "-F", "/dev/null"]
    if batch is not None:
        argv += ["-b", batch]
    return [*argv, f"{user}@127.0.0.1"]


def shown(argv: list[str], base: str = "") -> str:
    """``argv`` as a shell line, paths under ``base`` shortened."""
    def short(a: str) -> str:
        return os.path.relpath(a, base) if base and a.startswith(base + os.sep) else a
    return " ".join(shlex.quote(short(a)) for a in argv)
