"""Benchmark ticrypt-rest against a hello-world twisted.web over the same TLS.

    .venv/bin/python bench/bench_rest.py [--concurrency 16] [--requests 2000]

Starts, on 127.0.0.1 in a temp dir: ``twistd -n ticrypt-rest`` (initialised
with ``ticrypt-admin init``) and a second process serving a one-line
twisted.web resource on the same kind of ``ssl:`` endpoint and certificate.
One client process drives each with ``--concurrency`` concurrent requests
over a persistent HTTPConnectionPool and prints logins/s (challenge + signed
login), authenticated ``GET /v1/vms``/s and hello-world requests/s, and the
ratios.  Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def hello_server(pem: str) -> None:
    """Child process: hello-world over ssl:0 with ``pem``; prints the port."""
    from twisted.internet import endpoints, reactor
    from twisted.web import resource, server

    class Hello(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"hello":"world"}'

    from ticrypt.tlsutil import server_endpoint

    ep = endpoints.serverFromString(reactor, server_endpoint(0, pem))
    d = ep.listen(server.Site(Hello()))
    d.addCallback(lambda port: print(f"HELLO-READY {port.getHost().port}", flush=True))
    reactor.run()  # type: ignore[attr-defined]


async def drive(reactor: Any, concurrency: int, total: int,
                one: Callable[[], Awaitable[Any]]) -> float:
    """Run ``one()`` ``total`` times with ``concurrency`` workers; return ops/s."""
    from twisted.internet import defer

    remaining = [total]

    async def worker() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            await one()

    start = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)])
    return total / (time.perf_counter() - start)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet import defer, protocol
    from twisted.web import client as webclient
    from twisted.web.http_headers import Headers

    from ticrypt.frontend.client import RestClient
    from ticrypt.http.client import PinnedCAPolicy
    from ticrypt.lab import daemons
    from ticrypt.lab.deploy import Deployment

    tmp = tempfile.mkdtemp(prefix="bench-rest-")
    dep = Deployment(tmp)
    dep.ca()
    dep.feed_secret()
    alice, _ = dep.user_key("alice")
    dep.rest_ini(login_failures_per_address="100000")
    started: list[daemons.Daemon] = []

    async def start(plugin: str, config: str) -> daemons.Daemon:
        started.append(daemons.spawn(reactor, plugin, config))
        await started[-1].ready
        return started[-1]

    try:
        await dep.init(daemons.runner(reactor, cwd=tmp), "alice")
        await dep.start_rest(start)
        url, ca_file = dep.addresses.rest_url, dep.ca_file

        hello_done: defer.Deferred[int] = defer.Deferred()

        class HelloProc(protocol.ProcessProtocol):
            buf = b""

            def outReceived(self, data: bytes) -> None:
                self.buf += data
                if b"HELLO-READY" in self.buf and not hello_done.called:
                    hello_done.callback(int(self.buf.split(b"HELLO-READY", 1)[1].split()[0]))

        hello = HelloProc()
        hp = reactor.spawnProcess(hello, sys.executable, [
            sys.executable, os.path.abspath(__file__), "--hello-server", dep.server_pem],
            env=dict(os.environ, PYTHONPATH=ROOT))
        hello_port = await hello_done

        pool = webclient.HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = args.concurrency
        client = RestClient(reactor, url, ca_file, pool=pool)
        await client.login("alice", alice)
        for i in range(10):
            await client.create_vm(f"vm{i}", "alice", f"10.0.0.{i + 1}:2200")

        async def login() -> None:
            await RestClient(reactor, url, ca_file, pool=pool).login(
                "alice", alice)

        async def list_vms() -> None:
            vms = await client.list_vms()
            assert len(vms) == 10

        agent = webclient.Agent(reactor, contextFactory=PinnedCAPolicy(ca_file), pool=pool)
        hello_url = f"https://127.0.0.1:{hello_port}/".encode()

        async def hello_get() -> None:
            response = await agent.request(b"GET", hello_url, Headers({}))
            assert (await webclient.readBody(response)) == b'{"hello":"world"}'

        # warm up connections and code paths
        for fn in (login, list_vms, hello_get):
            await drive(reactor, args.concurrency, args.concurrency * 4, fn)
        n = args.requests
        logins = await drive(reactor, args.concurrency, n // 2, login)
        vms = await drive(reactor, args.concurrency, n, list_vms)
        hellos = await drive(reactor, args.concurrency, n, hello_get)
        print(f"concurrency {args.concurrency}, {n} requests per run "
              f"(logins: {n // 2}, each = challenge + login)")
        print(f"logins/s                 {logins:8.0f}   ({logins / hellos:.2f} x hello)")
        print(f"GET /v1/vms (auth) /s    {vms:8.0f}   ({vms / hellos:.2f} x hello)")
        print(f"hello-world GET /s       {hellos:8.0f}")
        await pool.closeCachedConnections()
        hp.signalProcess("TERM")
    finally:
        for proc in started:
            await proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--hello-server", metavar="PEM", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hello_server:
        hello_server(args.hello_server)
        return
    from twisted.internet import defer, task

    task.react(lambda reactor: defer.ensureDeferred(main(reactor, args)))


if __name__ == "__main__":
    cli()
