"""Listeners and connection probes inside network namespaces, for the
firewall tests (test_vmc_firewall, test_vmhost): a process that answers
``ok`` on TCP ports of a namespace, and one connect attempt per target from
another namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from twisted.trial.unittest import TestCase

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
    import json, socket, sys
    out = {}
    for target in sys.argv[1:]:
        host, port = target.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=1.5) as c:
                out[target] = c.recv(2).decode()
        except OSError as e:
            out[target] = type(e).__name__
    print(json.dumps(out))
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
    """``{"HOST:PORT": "ok" or the error's name}`` for a connect from ``ns``."""
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, *targets],
                       capture_output=True, text=True, timeout=60)
    test.assertEqual(r.returncode, 0, r.stderr)
    return json.loads(r.stdout)  # type: ignore[no-any-return]
