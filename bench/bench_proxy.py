"""Benchmark ticrypt-proxy on 127.0.0.1 (not a test).

    .venv/bin/python bench/bench_proxy.py [--quick] [--plain] [--idle N]

Runs, in one go, with the proxy under ``twistd -n ticrypt-proxy`` in its own
process, the far endpoint ("sink": VM sockets or a direct websocket server) in
a second process, and the load generator (users / writer) in this process:

(a) one-way throughput of 64 B and 64 KiB binary messages, user -> proxy ->
    VM, versus the same two endpoints joined by one direct websocket;
(b) pairings per second and pairing latency (``connect`` sent -> ``paired``
    received) p50/p99, with a pool of waiting VM sockets refilled like vmc;
(c) proxy RSS per idle authenticated VM socket over wss (/proc VmRSS).

Prints one JSON object per measurement and a summary; bench/README.md
holds figures from a run.  ``bench_channel_proxy.py`` runs (a) over the
encrypted channel.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import defer, endpoints, task  # noqa: E402
from twisted.internet.interfaces import IPushProducer  # noqa: E402
from zope.interface import implementer  # noqa: E402

from ticrypt import identity, tlsutil  # noqa: E402
from ticrypt.lab import daemons, peers  # noqa: E402
from ticrypt.lab.deploy import Backend, Deployment  # noqa: E402

MiB = 1024 * 1024


def raise_nofile(n: int = 20000) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(n, soft), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def proc_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user, system) of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


# -- processes -------------------------------------------------------------------


class Child:
    """This script in ``sink`` mode; talks JSON lines over stdout."""

    def __init__(self, args: dict[str, Any]):
        self.proc = subprocess.Popen([sys.executable, __file__, "sink", json.dumps(args)],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, PYTHONPATH=ROOT))

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("sink exited")
        result: dict[str, Any] = json.loads(line)
        return result

    def read_async(self) -> defer.Deferred[dict[str, Any]]:
        from twisted.internet import threads
        return threads.deferToThread(self.read)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# -- the writer (load generator) ----------------------------------------------------


@implementer(IPushProducer)
class Pump:
    """Send ``count`` messages made by ``make(i)`` as fast as the transport
    takes them (streaming producer, bounded memory)."""

    def __init__(self, client: Any, count: int, make: Callable[[int], bytes]):
        self.client, self.count, self.make = client, count, make
        self.i = 0
        self.paused = True
        self.done: defer.Deferred[None] = defer.Deferred()

    def start(self) -> None:
        self.client.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.i < self.count:
            self.client.sendMessage(self.make(self.i), True)
            self.i += 1
        if self.i >= self.count and not self.done.called:
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


# -- the sink process ------------------------------------------------------------


class Counter:
    """Counts binary messages in the sink; with a secure channel, text
    messages are its handshake and binary ones are opened (``Delivered``)."""

    def __init__(self, expect: int, channel: dict[str, Any] | None = None):
        self.expect = expect
        self.n = 0
        self.bytes = 0
        self.first = 0.0
        self.ch: Any = None
        if channel:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            from ticrypt.channel import VmChannel
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(channel["vm_seed"]))
            self.ch = VmChannel(key, channel["vm_id"], lambda user_key: True)

    def got(self, proto: Any, payload: bytes, is_binary: bool) -> bool:
        if self.ch is not None:
            from ticrypt.channel import Delivered, SendMessage
            if not is_binary:
                for ev in self.ch.receive(payload.decode()):
                    if isinstance(ev, SendMessage):
                        data = ev.data
                        proto.sendMessage(data.encode() if isinstance(data, str) else data,
                                          not isinstance(data, str))
                return False
            size = sum(len(ev.plaintext) for ev in self.ch.receive(payload)
                       if isinstance(ev, Delivered))
        else:
            size = len(payload)
        if self.n == 0:
            self.first = time.perf_counter()
        self.n += 1
        self.bytes += size
        if self.n == self.expect:
            emit({"n": self.n, "bytes": self.bytes,
                  "seconds": time.perf_counter() - self.first})
            return True
        return False


async def sink_main(reactor: Any, args: dict[str, Any]) -> None:
    """The far end, until the bench stops it (SIGTERM: the one way this
    process ends, so its reactor is stopped once)."""
    raise_nofile(20000)
    backend = Backend(identity.load_private(Deployment(args["dir"]).path("backend_key")))
    ca = args.get("ca")
    mode = args["mode"]
    done: defer.Deferred[None] = defer.Deferred()
    if mode == "direct":
        counter = Counter(args["count"], args.get("channel"))

        class Sink(WebSocketServerProtocol):
            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                if counter.got(self, payload, isBinary):
                    self.sendClose(1000)

        factory = WebSocketServerFactory("ws://127.0.0.1")
        factory.protocol = Sink
        factory.setProtocolOptions(maxMessagePayloadSize=4 * MiB, webStatus=False)
        ep = (endpoints.serverFromString(reactor, tlsutil.server_endpoint(0, args["pem"]))
              if ca else endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
        port = await ep.listen(factory)
        emit({"port": port.getHost().port})
        await done
    elif mode == "vm":
        counter = Counter(args["count"], args.get("channel"))
        client = await peers.vm_connect(reactor, args["port"], backend, args["vm"], ca=ca,
                                     maxMessagePayloadSize=4 * MiB)
        emit({"waiting": 1})
        await client.next_json()  # paired

        def on_message(payload: bytes, is_binary: bool) -> None:
            counter.got(client, payload, is_binary)

        client.onMessage = on_message  # type: ignore[method-assign,assignment]
        await client.closed
        await done
    elif mode == "pool":
        # keep ``size`` VM sockets waiting; replace each as soon as it pairs
        async def one() -> None:
            try:
                while True:
                    c = await peers.vm_connect(reactor, args["port"], backend, args["vm"], ca=ca)
                    await c.next_json()
                    c.onMessage = lambda *a: None  # type: ignore[method-assign]
                    # then at once a fresh socket for the next user, like vmc
            except Exception:
                return  # the bench is over (the proxy or this process stops)
        for _ in range(args["size"]):
            defer.ensureDeferred(one())
        emit({"pool": args["size"]})
        await done
    elif mode == "idle":
        n = args["count"]
        sem = defer.DeferredSemaphore(100)
        clients = []

        async def connect(i: int) -> None:
            key = identity.generate()
            clients.append(await peers.vm_connect(reactor, args["port"], backend,
                                                  f"idle-{i:05d}", key, ca=ca))
        await defer.gatherResults([sem.run(connect, i) for i in range(n)])
        emit({"idle": len(clients)})
        await done


# -- the measurements ------------------------------------------------------------


class Bench:
    """The proxy under twistd, with a deployment in a temp folder; call
    :meth:`start` first and :meth:`close` at the end."""

    def __init__(self, reactor: Any, opts: argparse.Namespace):
        self.reactor = reactor
        self.opts = opts
        self.deployment = Deployment(tempfile.mkdtemp(prefix="bench-proxy-"))
        self.dir = self.deployment.dir
        self.backend = self.deployment.backend()
        self.ca, self.pem = self.deployment.ca()
        self.tls = not opts.plain
        self.results: list[dict[str, Any]] = []
        self.proxy: daemons.Daemon | None = None
        self.port = 0

    async def start(self) -> None:
        listen = (tlsutil.server_endpoint(0, self.pem) if self.tls
                  else "tcp:0:interface=127.0.0.1")
        limits = {"max_waiting_per_vm": "100000", "max_waiting_total": "100000",
                  "max_connections": "100000", "ping_interval": "60s", "ping_timeout": "60s",
                  "user_wait_timeout": "30s", "handshake_timeout": "60s",
                  "max_pairs": "100000", "max_buffered": self.opts.max_buffered}
        config = self.deployment.proxy_ini(
            limits, listen=listen, allow_plain="no" if self.tls else "yes",
            status_listen="tcp:0:interface=127.0.0.1", rest_url="off", ca_file=None,
            revocation_feed_secret=None)
        # the proxy inherits this process's RLIMIT_NOFILE (raise_nofile)
        self.proxy = daemons.spawn(self.reactor, "ticrypt-proxy", config, timeout=60)
        await self.proxy.ready
        self.port = self.proxy.address("proxy")[1]

    @property
    def proxy_pid(self) -> int:
        assert self.proxy is not None and self.proxy.transport is not None
        return int(self.proxy.transport.pid)  # type: ignore[attr-defined]

    def child(self, **args: Any) -> Child:
        args.setdefault("dir", self.dir)
        if self.tls:
            args.setdefault("ca", self.ca)
            args.setdefault("pem", self.pem)
        return Child(args)

    def record(self, obj: dict[str, Any]) -> None:
        self.results.append(obj)
        print(json.dumps(obj), flush=True)

    async def throughput(self, size: int, count: int, via: str,
                         sink_extra: dict[str, Any] | None = None,
                         user_setup: Callable[[Any], Any] | None = None,
                         label: str = "plain") -> dict[str, Any]:
        """One-way: ``count`` messages of ``size`` bytes, writer -> sink.
        ``user_setup(writer)`` may return a seal function (secure channel)."""
        ca = self.ca if self.tls else None
        filler = os.urandom(size)

        seal: list[Callable[[bytes], bytes]] = []

        def make(i: int) -> bytes:
            msg = struct.pack(">Q", i) + filler[8:]
            return seal[0](msg) if seal else msg

        extra = sink_extra or {}
        if via == "proxy":
            vm = f"tp-{size}-{os.getpid()}-{time.monotonic_ns()}"
            sink = self.child(mode="vm", port=self.port, vm=vm, count=count, **extra)
            await sink.read_async()
            writer = await peers.user_connect(self.reactor, self.port, self.backend.ticket(vm),
                                           ca=ca, maxMessagePayloadSize=4 * MiB)
            await writer.next_json()
        else:
            sink = self.child(mode="direct", count=count, **extra)
            port = (await sink.read_async())["port"]
            writer = await peers.open_ws(self.reactor, port, "/", ca,
                                      maxMessagePayloadSize=4 * MiB)
        if user_setup is not None:
            seal.append(await user_setup(writer))
        result_d = sink.read_async()
        cpu_before = proc_cpu(self.proxy_pid)
        pump = Pump(writer, count, make)
        pump.start()
        result = await result_d
        cpu_after = proc_cpu(self.proxy_pid)
        user, system = (a - b for a, b in zip(cpu_after, cpu_before, strict=True))
        proxy_cpu = user + system
        writer.sendClose(1000)
        await writer.closed
        sink.stop()
        secs = result["seconds"]
        out = {"bench": "throughput", "payload": label, "via": via, "tls": self.tls,
               "size": size,
               "messages": result["n"], "seconds": round(secs, 3),
               "msgs_per_s": round(result["n"] / secs), "MB_per_s": round(
                   result["bytes"] / secs / 1e6, 1)}
        if via == "proxy":  # the proxy's own CPU while it relayed (utime + stime)
            out["proxy_cpu_s"] = round(proxy_cpu, 2)
            out["proxy_sys_s"] = round(system, 2)
            out["proxy_cpu_s_per_GB"] = round(proxy_cpu / (result["bytes"] / 1e9), 2)
        self.record(out)
        return out

    async def pairing(self, total: int, concurrency: int, pool: int) -> None:
        ca = self.ca if self.tls else None
        vm = "pairing-bench"
        sink = self.child(mode="pool", port=self.port, vm=vm, size=pool)
        await sink.read_async()
        latencies: list[float] = []
        started = [0]

        async def user_loop() -> None:
            while started[0] < total:
                started[0] += 1
                client = await peers.open_ws(self.reactor, self.port, "/v1/user", ca)
                t0 = time.perf_counter()
                client.send_json({"type": "connect", "ticket": self.backend.ticket(vm)})
                msg = await client.next_json()
                latencies.append(time.perf_counter() - t0)
                assert msg["type"] == "paired", msg
                client.sendClose(1000)
                await client.closed

        t0 = time.perf_counter()
        await defer.gatherResults([defer.ensureDeferred(user_loop())
                                   for _ in range(concurrency)])
        secs = time.perf_counter() - t0
        sink.stop()
        self.record({"bench": "pairing", "tls": self.tls, "pairings": len(latencies),
                     "concurrency": concurrency, "pool": pool,
                     "pairings_per_s": round(len(latencies) / secs, 1),
                     "latency_ms_p50": round(percentile(latencies, 50) * 1000, 2),
                     "latency_ms_p99": round(percentile(latencies, 99) * 1000, 2),
                     "note": "rate includes TLS + websocket handshakes and close per user"})

    async def idle(self, count: int) -> None:
        pid = self.proxy_pid
        # warm up: one socket, so imports and allocator arenas exist already
        warm = self.child(mode="idle", port=self.port, count=10)
        await warm.read_async()
        warm.stop()
        await task.deferLater(self.reactor, 1.0, lambda: None)
        before = rss(pid)
        sink = self.child(mode="idle", port=self.port, count=count)
        r = await sink.read_async()
        await task.deferLater(self.reactor, 1.0, lambda: None)
        after = rss(pid)
        assert self.proxy is not None
        status = await peers.get_status(self.reactor, self.proxy.address("status")[1])
        sink.stop()
        self.record({"bench": "idle-memory", "tls": self.tls, "sockets": r["idle"],
                     "waiting_in_status": sum(status["vms"].values()),
                     "rss_before_MiB": round(before / MiB, 1),
                     "rss_after_MiB": round(after / MiB, 1),
                     "KiB_per_socket": round((after - before) / r["idle"] / 1024, 1)})

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


async def bench_main(reactor: Any, opts: argparse.Namespace) -> None:
    raise_nofile(20000)
    b = Bench(reactor, opts)
    try:
        await b.start()
        if "a" in opts.only:
            small, big = (20000, 1000) if opts.quick else (100000, 8000)
            for size, count in ((64, small), (65536, big)):
                proxied = await b.throughput(size, count, "proxy")
                direct = await b.throughput(size, count, "direct")
                b.record({"bench": "throughput-ratio", "size": size, "tls": b.tls,
                          "proxy_over_direct": round(proxied["msgs_per_s"]
                                                     / direct["msgs_per_s"], 2)})
        if "b" in opts.only:
            await b.pairing(300 if opts.quick else 2000, 20, 50)
        if "c" in opts.only:
            await b.idle(opts.idle)
    finally:
        await b.close()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "sink":
        args = json.loads(sys.argv[2])
        task.react(lambda r: defer.ensureDeferred(sink_main(r, args)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument("--plain", action="store_true", help="ws:// instead of wss://")
    parser.add_argument("--idle", type=int, default=5000, help="idle VM sockets for (c)")
    parser.add_argument("--only", default="abc", help="which of a, b, c to run")
    parser.add_argument("--max-buffered", default="256KiB", help="proxy [limits] max_buffered")
    opts = parser.parse_args()
    task.react(lambda r: defer.ensureDeferred(bench_main(r, opts)))


if __name__ == "__main__":
    main()
