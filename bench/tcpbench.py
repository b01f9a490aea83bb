"""TCP measurements shared by the tunnel benchmark: an application server
(run as its own process, standing in for the application inside the VM)
and the client side of each measurement, with blocking sockets so the
client costs as little as possible and the same on every path.  Not a test.

The server speaks a one-byte command per connection:

* ``S`` + 8-byte big-endian N: it sends N bytes, then closes (download);
* ``R``: it reads until EOF, then sends the 8-byte count it read (upload);
* ``E``: it echoes everything until EOF (round trips, new connections).

    python bench/tcpbench.py serve PORTFILE     # writes its port, serves until killed
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable

from ticrypt.vmc.processes import descendants, scan_proc

CHUNK = 1 << 18
_ZEROS = bytes(CHUNK)


# -- the application server ---------------------------------------------------------

def _handle(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cmd = conn.recv(1)
        if cmd == b"S":
            header = _recv_exact(conn, 8)
            left = struct.unpack(">Q", header)[0]
            view = memoryview(_ZEROS)
            while left:
                n = conn.send(view[:min(left, CHUNK)])
                left -= n
        elif cmd == b"R":
            buf = bytearray(CHUNK)
            total = 0
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                total += n
            conn.sendall(struct.pack(">Q", total))
        elif cmd == b"E":
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)


def serve(port_file: str) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(listener.getsockname()[1]))
    os.rename(tmp, port_file)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_handle, args=(conn,), daemon=True).start()


# -- the client side ----------------------------------------------------------------

def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def download(port: int, size: int) -> float:
    """Seconds to receive ``size`` bytes from the server through ``port``."""
    buf = bytearray(CHUNK)
    t0 = time.perf_counter()
    with _connect(port) as s:
        s.sendall(b"S" + struct.pack(">Q", size))
        got = 0
        while got < size:
            n = s.recv_into(buf)
            if not n:
                raise ConnectionError(f"closed after {got} of {size} bytes")
            got += n
    return time.perf_counter() - t0


def upload(port: int, size: int) -> float:
    """Seconds to send ``size`` bytes and hear that all of them arrived."""
    view = memoryview(_ZEROS)
    t0 = time.perf_counter()
    with _connect(port) as s:
        s.sendall(b"R")
        left = size
        while left:
            n = s.send(view[:min(left, CHUNK)])
            left -= n
        s.shutdown(socket.SHUT_WR)
        count = struct.unpack(">Q", _recv_exact(s, 8))[0]
    if count != size:
        raise ConnectionError(f"the server read {count} of {size} bytes")
    return time.perf_counter() - t0


def round_trips(port: int, count: int, size: int = 64) -> list[float]:
    """Seconds of each of ``count`` ``size``-byte echo round trips on one connection."""
    payload = b"x" * size
    out = []
    with _connect(port) as s:
        s.sendall(b"E")
        for _ in range(count):
            t0 = time.perf_counter()
            s.sendall(payload)
            _recv_exact(s, size)
            out.append(time.perf_counter() - t0)
    return out


def new_connections(port: int, seconds: float, workers: int = 4) -> float:
    """Connections per second: connect, 1-byte echo, close, in ``workers`` threads."""
    done = [0] * workers
    stop = time.perf_counter() + seconds
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            while time.perf_counter() < stop:
                with _connect(port) as s:
                    s.sendall(b"Ez")
                    _recv_exact(s, 1)
                done[i] += 1
        except BaseException as e:  # reported below
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(done) / (time.perf_counter() - t0)


def parallel_download(port: int, size: int, streams: int) -> float:
    """Seconds for ``streams`` connections to receive ``size`` bytes each."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            download(port, size)
        except BaseException as e:  # reported below
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


# -- CPU accounting -----------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    return sorted(descendants({pid}, scan_proc() or {}))


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of ``pids`` and their descendants, now."""
    total = 0
    for root in pids:
        for pid in _descendants(root):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                continue
    return total / _TICK


def measured(pids: Callable[[], Iterable[int]], fn: Callable[[], float]) -> tuple[float, float]:
    """(result of ``fn``, CPU seconds the processes of the path spent during it)."""
    before = cpu_seconds(pids())
    result = fn()
    return result, cpu_seconds(pids()) - before


def median(values: list[float]) -> float:
    return statistics.median(values)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(__doc__)
