"""Listeners and connection probes inside network namespaces, for the
firewall tests (test_vmc_firewall, test_vmhost): a process that answers
``ok`` on TCP ports of a namespace, and one connect attempt per target from
another namespace (every target at the same time)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase as TestCase

LISTENER = textwrap.dedent("""
    import socket, sys, select
    socks = []
    for port in map(int, sys.argv[1:]):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(16)
        socks.append(s)
    print("listening", flush=True)
    while True:
        for s in select.select(socks, [], [])[0]:
            c, _ = s.accept()
            c.sendall(b"ok")
            c.close()
""")

PROBE = textwrap.dedent("""
    import json, socket, sys, threading
    out = {}
    def probe(target):
        host, port = target.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=1.5) as c:
                out[target] = c.recv(2).decode()
        except OSError as e:
            out[target] = type(e).__name__
    # every target at the same time: each drop waits its timeout once
    threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({t: out[t] for t in sys.argv[1:]}))
""")


def listen_in(test: TestCase, ns: str, *ports: int) -> None:
    """Answer ``ok`` on ``ports`` of namespace ``ns`` until the test ends."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER,
                             *map(str, ports)], stdout=subprocess.PIPE, text=True)
    test.addCleanup(proc.wait)
    test.addCleanup(proc.kill)
    assert proc.stdout is not None
    test.addCleanup(proc.stdout.close)
    test.assertEqual(proc.stdout.readline().strip(), "listening")


def probe_from(test: TestCase, ns: str, *targets: str) -> dict[str, str]:
    """``{"HOST:PORT": "ok" or the error's name}`` for a connect from ``ns``
    (the targets at the same time)."""
    return probes_from(test, (ns, targets))[0]


def probes_from(test: TestCase, *probes: tuple[str, Sequence[str]]) -> list[dict[str, str]]:
    """:func:`probe_from` for each ``(ns, targets)``, all at the same time."""
    procs = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE,
                               *targets], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for ns, targets in probes]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            test.assertEqual(proc.returncode, 0, err)
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results
