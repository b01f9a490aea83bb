"""ticrypt-proxy as a real daemon: ``twistd -n ticrypt-proxy`` over wss, and
the memory bound with a reader that stops reading and under hostile frame
patterns (RSS of the twistd process from /proc, a memory bound rather than a
timing assertion)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from test import proxyfixture as pf
from test import wsframes as wf
from test.daemon import start_daemon
from ticrypt import identity, tlsutil

MiB = 1024 * 1024


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """``VmRSS`` (or ``VmHWM``, the peak since start or :func:`reset_peak`)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def reset_peak(pid: int) -> None:
    """From now on ``VmHWM`` is the peak since this call (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def up_to(chunks: Iterable[bytes], limit: int) -> Iterator[bytes]:
    """``chunks`` until about ``limit`` bytes were given."""
    given = 0
    for chunk in chunks:
        if given >= limit:
            return
        given += len(chunk)
        yield chunk


async def reaches(client: pf.WsClient, probe: bytes) -> bool:
    """True once a message ending in ``probe`` arrives at ``client``, False
    if it is closed first."""
    while True:
        try:
            payload, _ = await client.next()
        except ConnectionError:
            return False
        if payload.endswith(probe):
            return True


async def relay_rounds(vm: pf.WsClient, user: pf.WsClient, rounds: int) -> None:
    """A legitimate pair at work: 64 KiB up, echoed back down, ``rounds`` times."""
    for i in range(rounds):
        payload = bytes([i]) * 65536
        user.sendMessage(payload, True)
        got, _ = await vm.next()
        vm.sendMessage(got, True)
        back, _ = await user.next()
        assert back == payload


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

    async def test_ticket_replayed_across_restart(self) -> None:
        """A ticket used before the proxy was killed (-9) is refused after it
        starts again with the same config; a fresh ticket still pairs."""
        path = pf.write_proxy_config(self.dir, self.backend)
        first = await start_daemon(self, "ticrypt-proxy", path)
        _, port = first.address("proxy")
        vm = await pf.vm_connect(reactor, port, self.backend, "vm-r")
        ticket = self.backend.ticket("vm-r", "dave")
        user = await pf.user_connect(reactor, port, ticket)
        self.assertEqual(await user.next_json(), {"type": "paired", "vm": "vm-r"})
        await first.kill()
        await defer.gatherResults([vm.closed, user.closed])
        again = await start_daemon(self, "ticrypt-proxy", path)
        _, port = again.address("proxy")
        vm = await pf.vm_connect(reactor, port, self.backend, "vm-r")
        replay = await pf.user_connect(reactor, port, ticket)
        try:
            accepted: dict[str, Any] | None = await replay.next_json()
        except ConnectionError:
            accepted = None
        self.assertIsNone(accepted, "the replayed ticket was accepted")
        _, code, reason = await replay.closed
        self.assertEqual((code, reason), (4003, "ticket-refused: replayed"))
        fresh = await pf.user_connect(reactor, port, self.backend.ticket("vm-r", "dave"))
        self.assertEqual(await fresh.next_json(), {"type": "paired", "vm": "vm-r"})
        self.assertEqual((await vm.next_json())["user"], "dave")
        refused = [r for r in pf.read_audit(self.dir) if r["event"] == "user-refused"]
        self.assertEqual([r["reason"] for r in refused], ["ticket-refused: replayed"])
        fresh.sendClose(1000)
        await defer.gatherResults([vm.closed, fresh.closed])

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


MAX_BUFFERED = 256 * 1024
MAX_MESSAGE = 2 * MiB
#: Interpreter and allocator slack on top of what the config allows.
ALLOWANCE = 16 * MiB


class FloodMemoryTests(TestCase):
    """Hostile frame patterns (test/wsframes.py) against a real proxy: each
    is cut off, the proxy's peak RSS stays within a bound derived from its
    config, and a legitimate pair keeps relaying meanwhile."""

    timeout = 300

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.backend = pf.Backend(self.dir)

    async def start(self, **limits: Any) -> tuple[int, int]:
        path = pf.write_proxy_config(self.dir, self.backend, max_buffered=MAX_BUFFERED,
                                     max_message_size=MAX_MESSAGE, **limits)
        daemon = await start_daemon(self, "ticrypt-proxy", path)
        _, port = daemon.address("proxy")
        return daemon.transport.pid, port  # type: ignore[union-attr]

    def bound(self, connections: int) -> int:
        """What the proxy may hold for ``connections`` legs (PROTOCOL.md §3,
        "Backpressure and memory"): per leg its queued output and one socket
        read (max_buffered each) and one partial message, plus ALLOWANCE."""
        return connections * (2 * MAX_BUFFERED + MAX_MESSAGE) + ALLOWANCE

    async def flood(self, pid: int, port: int, legit: tuple[pf.WsClient, pf.WsClient] | None,
                    name: str, chunks: Iterator[bytes], *, paired: bool, read: bool,
                    measure: bool = True) -> tuple[str, int, bool]:
        """One pattern: (name, peak RSS over the start, cut off by the proxy).
        ``legit``: the pair that relays meanwhile (None: another flood
        running at the same time drives it); not ``measure``: the caller
        measures the peak of several floods at once (0 is returned)."""
        if measure:
            reset_peak(pid)
        before = rss_bytes(pid)
        vm = None
        if paired:
            vm = await pf.vm_connect(reactor, port, self.backend, name)
            raw = await wf.connect_raw_user(reactor, port, self.backend.ticket(name))
            await vm.next_json()
        else:
            raw = await wf.connect_raw(reactor, port, "/v1/user")
        if not read:
            raw.stop_reading()
        work = defer.ensureDeferred(relay_rounds(*legit, rounds=20)) if legit else defer.succeed(None)
        await raw.flood(chunks)
        if raw.lost_reason is None:
            # all offered and not cut off yet: did the proxy take it all? (a
            # probe behind it); read again, to notice when the proxy ends it
            probe = b"probe after " + name.encode()
            raw.send(wf.frame(wf.CONT, probe) if name == "fragments-endless"
                     else wf.frame(wf.BINARY, probe))
            raw.resume_reading()
        if vm is not None:
            cut_off = not await reaches(vm, b"probe after " + name.encode())
            raw.abort()
        else:
            cut_off = True  # the proxy refuses it at the handshake timeout anyway
        await raw.lost
        await work
        if vm is not None and vm.close_info is None:
            vm.dropConnection(abort=True)
            await vm.closed
        return name, rss_bytes(pid, "VmHWM") - before if measure else 0, cut_off

    async def legit_pair(self, port: int) -> tuple[pf.WsClient, pf.WsClient]:
        vm = await pf.vm_connect(reactor, port, self.backend, "vm-legit")
        user = await pf.user_connect(reactor, port, self.backend.ticket("vm-legit"))
        await user.next_json()
        await vm.next_json()
        return vm, user

    def check(self, results: list[tuple[str, int, bool]], connections: int) -> None:
        report = ", ".join(f"{name}: +{peak / MiB:.1f} MiB{'' if cut else ' NOT cut off'}"
                           for name, peak, cut in results)
        if os.environ.get("PROXY_TEST_VERBOSE"):
            print(f"\npeak RSS over the start of each flood: {report}")
        self.assertEqual([name for name, _, cut in results if not cut], [], report)
        bound = self.bound(connections)
        self.assertEqual([name for name, peak, _ in results if peak > bound], [],
                         f"bound +{bound / MiB:.1f} MiB; {report}")

    async def test_frame_floods(self) -> None:
        # handshake_timeout: the proxy must not need it to stop the floods
        pid, port = await self.start(ping_interval="60s", handshake_timeout="30s",
                                     close_handshake_timeout="2s")
        legit = await self.legit_pair(port)
        results = [
            await self.flood(pid, port, legit, "ping-flood-unauthenticated",
                             up_to(wf.ping_flood(), 64 * MiB), paired=False, read=False),
            await self.flood(pid, port, legit, "ping-flood-paired",
                             up_to(wf.ping_flood(), 64 * MiB), paired=True, read=False),
            await self.flood(pid, port, legit, "fragments",
                             wf.one_byte_fragments(300_000), paired=True, read=True),
            await self.flood(pid, port, legit, "fragments-endless",
                             up_to(wf.empty_continuations(), 4 * MiB), paired=True, read=True),
            await self.flood(pid, port, legit, "empty-messages",
                             up_to(wf.empty_messages(), 4 * MiB), paired=True, read=True),
        ]
        # the hostile leg, its VM partner and the legitimate pair
        self.check(results, connections=4)
        audit = pf.read_audit(self.dir)
        refused = [r["reason"] for r in audit if r["event"] == "user-refused"]
        self.assertEqual(refused, ["over-limit: too many websocket frames"])
        ends = [(r["vm"], r["close_code"], r["ended_by"]) for r in audit
                if r["event"] == "pair-end"]
        self.assertEqual(ends, [(name, 4009, "user") for name, _, _ in results[1:]])
        legit[1].sendClose(1000)
        await defer.gatherResults([legit[0].closed, legit[1].closed])

    async def test_pongs_not_read(self) -> None:
        """The bound on a leg's own output on its own: with the control-frame
        cap out of the way, a peer that floods pings and reads nothing is not
        read once its pongs fill max_buffered, and is dropped at the handshake
        timeout (not paired) or by the proxy's unanswered pings (paired)."""
        pid, port = await self.start(max_control_frames=1_000_000, handshake_timeout="15s",
                                     ping_interval="5s", ping_timeout="5s",
                                     close_handshake_timeout="2s")
        legit = await self.legit_pair(port)
        # Both patterns at once (each ends only at its timeout): one peak for
        # both hostile legs, the paired one's VM partner and the legitimate pair.
        reset_peak(pid)
        before = rss_bytes(pid)
        floods = await defer.gatherResults([
            defer.ensureDeferred(self.flood(
                pid, port, legit, "pongs-unauthenticated", up_to(wf.ping_flood(), 256 * MiB),
                paired=False, read=False, measure=False)),
            defer.ensureDeferred(self.flood(
                pid, port, None, "pongs-paired", up_to(wf.ping_flood(), 256 * MiB),
                paired=True, read=False, measure=False)),
        ])
        peak = rss_bytes(pid, "VmHWM") - before
        results = [(name, peak, cut) for name, _, cut in floods]
        self.check(results, connections=5)
        legit[1].sendClose(1000)
        await defer.gatherResults([legit[0].closed, legit[1].closed])
