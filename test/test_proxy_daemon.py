"""ticrypt-proxy as a real daemon: ``twistd -n ticrypt-proxy`` over wss, and
the memory bound with a reader that stops reading (RSS of the twistd process
from /proc, a memory bound rather than a timing assertion)."""

from __future__ import annotations

import os
import struct
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from test import proxyfixture as pf
from test.daemon import start_daemon
from ticrypt import identity, tlsutil

MiB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@implementer(IPushProducer)
class Pump:
    """Sends numbered binary messages as fast as the writer's transport
    accepts them (a streaming producer: it never buffers beyond Twisted's
    bufferSize on its own side)."""

    def __init__(self, client: pf.WsClient, size: int, total: int):
        self.client = client
        self.size = size
        self.total = total
        self.sent = 0
        self.seq = 0
        self.paused = True
        self.filler = os.urandom(size - 8)
        self.on_pause: list[Any] = []
        self.on_resume: list[Any] = []

    def start(self) -> None:
        self.client.transport.registerProducer(self, True)  # type: ignore[union-attr]
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        for f in self.on_resume:
            f()
        while not self.paused and self.sent < self.total:
            self.client.sendMessage(struct.pack(">Q", self.seq) + self.filler, True)
            self.seq += 1
            self.sent += self.size
        if self.sent >= self.total:
            # everything offered: from now on the writer is as stalled as it gets
            self.paused = True
            for f in self.on_pause:
                f()

    def pauseProducing(self) -> None:
        self.paused = True
        for f in self.on_pause:
            f()

    def stopProducing(self) -> None:
        self.paused = True


class ProxyDaemonTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.backend = pf.Backend(self.dir)

    async def test_twistd_wss_pairing_relay_status(self) -> None:
        ca, pem = pf.make_tls(self.dir)
        path = pf.write_proxy_config(self.dir, self.backend,
                                     listen=tlsutil.server_endpoint(0, pem))
        daemon = await start_daemon(self, "ticrypt-proxy", path)
        _, port = daemon.address("proxy")
        _, status_port = daemon.address("status")
        vm_key = identity.generate()
        vm = await pf.vm_connect(reactor, port, self.backend, "vm-7", vm_key, ca=ca)
        self.assertEqual(await pf.get_status(reactor, status_port),
                         {"vms": {"vm-7": 1}, "pairs": 0})
        user = await pf.user_connect(reactor, port, self.backend.ticket("vm-7", "carol"), ca=ca)
        self.assertEqual(await user.next_json(), {"type": "paired", "vm": "vm-7"})
        self.assertEqual((await vm.next_json())["user"], "carol")
        self.assertEqual(await pf.get_status(reactor, status_port), {"vms": {}, "pairs": 1})
        user.sendMessage(b'{"hello":1}', False)
        self.assertEqual(await vm.next(), (b'{"hello":1}', False))
        vm.sendMessage(b"\x00" * 100000, True)
        self.assertEqual(await user.next(), (b"\x00" * 100000, True))
        user.sendClose(4401, "not-authorized: test")
        _, code, reason = await vm.closed
        self.assertEqual((code, reason), (4401, "not-authorized: test"))
        await user.closed
        # wss must not answer plain websockets
        with self.assertRaises(ConnectionError):
            await pf.open_ws(reactor, port, "/v1/user", openHandshakeTimeout=5)
        events = [r["event"] for r in pf.read_audit(self.dir)]
        self.assertEqual(events[:3], ["vm-connected", "pair-start", "pair-end"])

    async def test_slow_reader_memory_bound(self) -> None:
        """A reader that stops reading while the writer offers >1 GiB: the
        proxy stops reading the writer and its RSS stays under 200 MiB."""
        await self.slow_reader(tls=False, total=1100 * MiB)

    async def test_slow_reader_memory_bound_wss(self) -> None:
        """The same over TLS (the producers sit under the TLS layer)."""
        await self.slow_reader(tls=True, total=400 * MiB)

    async def slow_reader(self, tls: bool, total: int) -> None:
        ca: str | None = None
        if tls:
            ca, pem = pf.make_tls(self.dir)
            path = pf.write_proxy_config(self.dir, self.backend, ping_interval="60s",
                                         listen=tlsutil.server_endpoint(0, pem))
        else:
            path = pf.write_proxy_config(self.dir, self.backend, ping_interval="60s")
        daemon = await start_daemon(self, "ticrypt-proxy", path)
        if not tls:
            self.assertIn("listening WITHOUT TLS", daemon.text())  # allow_plain warns
        pid = daemon.transport.pid  # type: ignore[union-attr]
        _, port = daemon.address("proxy")
        reader = await pf.vm_connect(reactor, port, self.backend, "vm-m", ca=ca)
        writer = await pf.user_connect(reactor, port, self.backend.ticket("vm-m"), ca=ca)
        await writer.next_json()
        await reader.next_json()
        size = 64 * 1024
        rss_before = rss_bytes(pid)
        samples: list[int] = []
        done: defer.Deferred[None] = defer.Deferred()
        expected = [0]
        stalled: list[defer.Deferred[None]] = []
        quiet: list[Any] = [None]
        pump = Pump(writer, size, total)
        chunk = 64 * MiB

        # "stalled": the writer was paused and not resumed for a while; only
        # used to decide when to sample, never asserted on
        def paused() -> None:
            if quiet[0] is None or not quiet[0].active():
                quiet[0] = reactor.callLater(0.3, fire_stalled)  # type: ignore[attr-defined]

        def resumed() -> None:
            if quiet[0] is not None and quiet[0].active():
                quiet[0].cancel()

        def fire_stalled() -> None:
            while stalled:
                stalled.pop().callback(None)

        def wait_stalled() -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            stalled.append(d)
            if pump.paused:
                paused()
            return d

        pump.on_pause.append(paused)
        pump.on_resume.append(resumed)

        def on_message(payload: bytes, is_binary: bool) -> None:
            (seq,) = struct.unpack(">Q", payload[:8])
            assert seq == expected[0] and len(payload) == size, (seq, expected[0])
            expected[0] += 1
            received = expected[0] * size
            if received >= total and not done.called:
                done.callback(None)
            elif received % chunk == 0:
                reader.transport.pauseProducing()  # type: ignore[union-attr]
                wait_stalled().addCallback(lambda _: sample_and_resume())

        def sample_and_resume() -> None:
            samples.append(rss_bytes(pid))
            reader.transport.resumeProducing()  # type: ignore[union-attr]

        reader.onMessage = on_message  # type: ignore[method-assign]
        reader.transport.pauseProducing()  # type: ignore[union-attr]
        pump.start()
        wait_stalled().addCallback(lambda _: sample_and_resume())
        await done
        samples.append(rss_bytes(pid))
        if quiet[0] is not None and quiet[0].active():
            quiet[0].cancel()
        self.assertGreaterEqual(pump.sent, total)
        self.assertEqual(expected[0] * size, total)
        self.assertGreaterEqual(len(samples), total // chunk)
        peak = max(samples)
        if os.environ.get("PROXY_TEST_VERBOSE"):
            print(f"rss before {rss_before / MiB:.1f} MiB samples", [round(s / MiB, 1) for s in samples])
        self.assertLess(peak, 200 * MiB,
                        f"proxy RSS {peak / MiB:.0f} MiB (before {rss_before / MiB:.0f} MiB)")
        writer.sendClose(1000)
        await defer.gatherResults([reader.closed, writer.closed])
        await task.deferLater(reactor, 0, lambda: None)
