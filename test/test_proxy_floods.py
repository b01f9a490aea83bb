"""The proxy's frame limits and its bound on each leg's own output.

* :class:`FrameBudgetTests`: the sans-IO counter (no autobahn, no clock).
* :class:`LegFrameTests`: one leg on a ``StringTransport`` fed raw frames:
  what it writes, when it closes and aborts (a ``Clock``, no waiting).
* :class:`FloodTests`: hostile frame-level clients (``test/wsframes.py``)
  against an in-process proxy on 127.0.0.1: each flood is cut off with
  4009 and an audit line, and the proxy keeps relaying for others.

The memory bound under the same floods, for a real twistd proxy, is in
``test/test_proxy_daemon.py``.
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from test import wsframes as wf
from test.test_proxy import ProxyCase, _factory, start_pair
from ticrypt import closecodes
from ticrypt.framebudget import REASON, FrameBudget, FrameLimits, Violation
from ticrypt.proxy.control import LegState
from ticrypt.proxy.relay import OWN_FULL, PEER_OVER_FRAME_LIMIT
from ticrypt.proxy.ws import Leg, RelayFactory

_ZERO = b"\x00\x00\x00\x00"
OVER_LIMIT = closecodes.OVER_LIMIT.code


class FrameBudgetTests(SynchronousTestCase):
    def budget(self, **kw: Any) -> FrameBudget:
        return FrameBudget(FrameLimits(**kw), now=0.0)

    def test_unfragmented_messages_are_never_over(self) -> None:
        b = self.budget(max_message_frames=2)
        for i in range(10_000):
            self.assertIsNone(b.frame(wf.BINARY if i % 2 else wf.TEXT, 100, now=0.0))

    def test_fragments_per_message(self) -> None:
        b = self.budget(max_message_frames=3)
        self.assertIsNone(b.frame(wf.BINARY, 1, 0.0))
        self.assertIsNone(b.frame(wf.CONT, 1, 0.0))
        self.assertIsNone(b.frame(wf.CONT, 1, 0.0))
        self.assertEqual(b.frame(wf.CONT, 1, 0.0), Violation("message-frames", 3))
        # a new message starts counting again
        b = self.budget(max_message_frames=3)
        for _ in range(5):
            self.assertIsNone(b.frame(wf.TEXT, 1, 0.0))
            self.assertIsNone(b.frame(wf.CONT, 1, 0.0))
            self.assertIsNone(b.frame(wf.CONT, 1, 0.0))

    def test_empty_continuations_count(self) -> None:
        b = self.budget(max_message_frames=100)
        self.assertIsNone(b.frame(wf.BINARY, 1, 0.0))
        results = [b.frame(wf.CONT, 0, 0.0) for _ in range(100)]
        self.assertEqual(results[:99], [None] * 99)
        self.assertEqual(results[99], Violation("message-frames", 100))
        self.assertEqual(results[99].reason, REASON)  # type: ignore[union-attr]

    def test_control_frames_per_interval(self) -> None:
        b = self.budget(max_control_frames=10, control_frames_interval=10.0)
        for opcode in [wf.PING] * 5 + [wf.PONG] * 4 + [wf.CLOSE]:
            self.assertIsNone(b.frame(opcode, 0, 1.0))
        self.assertEqual(b.frame(wf.PING, 0, 1.0), Violation("control-frames", 10))
        # refilled at 10 per 10 s: one more per second
        self.assertIsNone(b.frame(wf.PING, 125, 2.0))
        self.assertIsNotNone(b.frame(wf.PING, 125, 2.0))
        # a long pause refills the bucket, never above its size
        for _ in range(10):
            self.assertIsNone(b.frame(wf.PONG, 0, 1000.0))
        self.assertIsNotNone(b.frame(wf.PONG, 0, 1000.0))
        # a clock that steps back mints nothing
        self.assertIsNotNone(b.frame(wf.PING, 0, 5.0))
        self.assertIsNotNone(b.frame(wf.PING, 0, 1000.5))

    def test_messages_that_begin_empty_are_control_frames(self) -> None:
        b = self.budget(max_control_frames=3, max_message_frames=1000)
        for _ in range(100):
            self.assertIsNone(b.frame(wf.BINARY, 1, 0.0))      # not counted
            self.assertIsNone(b.frame(wf.CONT, 0, 0.0))        # counted per message only
        for _ in range(3):
            self.assertIsNone(b.frame(wf.TEXT, 0, 0.0))
        self.assertEqual(b.frame(wf.BINARY, 0, 0.0), Violation("control-frames", 3))


def _close_frames(data: bytes) -> list[tuple[int, str]]:
    out = []
    for f in wf.parse_frames(bytearray(data)):
        if f.opcode == wf.CLOSE:
            out.append((struct.unpack("!H", f.payload[:2])[0], f.payload[2:].decode()))
    return out


def _ws_leg(case: SynchronousTestCase, factory: RelayFactory,
            path: str = "/v1/user") -> tuple[Leg, StringTransport]:
    """A leg on a StringTransport that went through the HTTP upgrade."""
    leg = factory.buildProtocol(None)
    assert isinstance(leg, Leg)
    t = StringTransport()
    leg.makeConnection(t)
    leg.dataReceived(wf.RawClient("127.0.0.1", 1, path).request)
    assert leg.ws_open() and leg.phase is LegState.HANDSHAKE
    t.clear()
    case.addCleanup(leg.connectionLost, Failure(ConnectionDone()))
    return leg, t


class LegFrameTests(SynchronousTestCase):
    """One leg on a StringTransport: frames in, bytes and close out."""

    def setUp(self) -> None:
        self.factory = _factory(max_buffered=4096, close_handshake_timeout=5.0,
                                frames=FrameLimits(max_control_frames=10))
        self.clock: Clock = self.factory.clock  # type: ignore[assignment]
        self.audited: list[tuple[str, dict[str, Any]]] = []
        self.factory.audit_write = (  # type: ignore[method-assign]
            lambda event, **fields: self.audited.append((event, fields)))

    def test_output_of_one_read_is_one_write(self) -> None:
        leg, t = _ws_leg(self, self.factory)
        writes: list[bytes] = []
        write = t.write
        t.write = lambda data: (writes.append(data), write(data))[1]  # type: ignore[method-assign]
        leg.dataReceived(wf.frame(wf.PING, b"a") + wf.frame(wf.PING, b"b"))
        self.assertEqual(len(writes), 1)
        self.assertEqual([f.payload for f in wf.parse_frames(bytearray(writes[0]))],
                         [b"a", b"b"])

    def test_over_the_limit_closes_then_aborts_a_peer_that_does_not_read(self) -> None:
        leg, t = _ws_leg(self, self.factory)
        leg.dataReceived(wf.frame(wf.PING, b"p") * 11 + wf.frame(wf.PING, b"after"))
        frames = wf.parse_frames(bytearray(t.value()))
        self.assertEqual([f.opcode for f in frames], [wf.PONG] * 10 + [wf.CLOSE])
        self.assertEqual(_close_frames(t.value()), [(OVER_LIMIT, REASON)])
        self.assertEqual(self.audited, [("user-refused", {"reason": REASON,
                                                          "address": "192.168.1.1",
                                                          "vm": None})])
        self.assertEqual(leg.phase, LegState.DONE)
        # the close frame goes out first, then the connection ends
        self.assertTrue(t.disconnecting)
        self.assertFalse(t.disconnected)
        # nothing more is parsed, nothing more is written
        t.clear()
        leg.dataReceived(wf.frame(wf.PING, b"x") * 50)
        self.assertEqual(t.value(), b"")
        # StringTransport never drains: the peer "does not read" its close
        self.clock.advance(4.9)
        self.assertFalse(t.disconnected)
        self.clock.advance(0.2)
        self.assertTrue(t.disconnected)  # abortConnection

    def test_paired_leg_over_the_limit_ends_its_pair(self) -> None:
        vm, vm_t = _ws_leg(self, self.factory, "/v1/vm")
        user, user_t = _ws_leg(self, self.factory)
        start_pair(self.factory, vm, user)
        vm_t.clear()
        user_t.clear()
        user.dataReceived(wf.frame(wf.BINARY, b"x", fin=False, mask=_ZERO)
                          + wf.frame(wf.CONT, b"", fin=False, mask=_ZERO) * 1024)
        self.assertEqual(_close_frames(user_t.value()), [(OVER_LIMIT, REASON)])
        self.assertEqual(_close_frames(vm_t.value()), [(OVER_LIMIT, PEER_OVER_FRAME_LIMIT)])
        ends = [f for e, f in self.audited if e == "pair-end"]
        self.assertEqual([(f["close_code"], f["close_reason"], f["ended_by"]) for f in ends],
                         [(OVER_LIMIT, PEER_OVER_FRAME_LIMIT, "user")])
        self.assertTrue(user_t.disconnecting)

    def test_graceful_close_to_a_peer_that_does_not_read_is_aborted(self) -> None:
        """Our reply to a peer's close (autobahn then closes the TCP
        connection gracefully and arms no timer) cannot hold the connection
        past close_handshake_timeout."""
        leg, t = _ws_leg(self, self.factory)
        leg.dataReceived(wf.frame(wf.CLOSE, struct.pack("!H", 1000)))
        self.assertTrue(t.disconnecting)
        self.assertFalse(t.disconnected)
        self.clock.advance(5.0)
        self.assertTrue(t.disconnected)


class FloodTests(ProxyCase):
    """Hostile frame-level clients against the proxy in this process."""

    async def start_floods(self, **limits: Any) -> None:
        # (autobahn's close timer fires up to 1 s early: whole-second buckets)
        await self.start(**{"close_handshake_timeout": "2s", **limits})

    async def raw(self, path: str = "/v1/user") -> wf.RawClient:
        client = await wf.connect_raw(reactor, self.port, path)
        self.raws.append(client)
        return client

    async def raw_pair(self, vm_id: str = "vm1") -> tuple[Any, wf.RawClient]:
        """A VM (autobahn client) paired with a raw user."""
        vm = await self.vm(vm_id)
        user = await wf.connect_raw_user(reactor, self.port, self.backend.ticket(vm_id))
        self.raws.append(user)
        self.assertEqual((await vm.next_json())["type"], "paired")
        return vm, user

    async def assert_relay_works(self) -> None:
        """The proxy still pairs and relays for everyone else."""
        vm, user = await self.pair("vm-ok")
        user.sendMessage(b"up" * 5000, True)
        self.assertEqual(await vm.next(), (b"up" * 5000, True))
        vm.sendMessage(b"down", False)
        self.assertEqual(await user.next(), (b"down", False))

    async def test_ping_flood_before_pairing(self) -> None:
        await self.start_floods()
        raw = await self.raw()
        await raw.flood(wf.ping_flood())
        await raw.lost
        self.assertEqual(raw.close_frame, (4009, REASON))
        self.assertLessEqual(raw.pongs, 100)
        self.assertEqual([r["reason"] for r in self.audit("user-refused")], [REASON])
        await self.assert_relay_works()

    async def test_ping_flood_without_reading_before_pairing(self) -> None:
        await self.start_floods()
        raw = await self.raw("/v1/vm")
        raw.stop_reading()
        await raw.flood(wf.ping_flood())
        await raw.lost
        self.assertEqual([r["reason"] for r in self.audit("vm-refused")], [REASON])
        await self.assert_relay_works()

    async def test_peer_that_does_not_read_its_pongs_is_not_read(self) -> None:
        """With the control-frame cap out of the way, the bound on a leg's
        own output shows: once its pongs fill its send buffer the proxy
        stops reading it; at the handshake timeout it is refused, and as it
        does not read the close either, aborted after close_handshake_timeout."""
        # (the handshake timeout leaves time to fill the kernel's socket
        # buffers first: only then does the proxy's own buffer fill)
        await self.start_floods(max_control_frames=1_000_000, max_buffered="16KiB",
                                handshake_timeout="2s", close_handshake_timeout="300ms")
        full: defer.Deferred[Leg] = defer.Deferred()
        pause_reading = Leg.pause_reading

        def spy(leg: Leg, why: int) -> None:
            pause_reading(leg, why)
            if why & OWN_FULL and not full.called:
                full.callback(leg)

        self.patch(Leg, "pause_reading", spy)
        raw = await self.raw()
        raw.stop_reading()
        flooded = raw.flood(wf.ping_flood())
        leg = await full
        self.assertTrue(leg.send_buffer_full())
        await flooded
        await raw.lost
        self.assertEqual([r["reason"] for r in self.audit("user-refused")],
                         ["timeout: no control message within 2s"])
        await self.assert_relay_works()

    async def test_ping_flood_on_a_pair_without_reading(self) -> None:
        await self.start_floods()
        vm, raw = await self.raw_pair()
        raw.stop_reading()
        await raw.flood(wf.ping_flood())
        _, code, reason = await vm.closed
        self.assertEqual((code, reason), (4009, PEER_OVER_FRAME_LIMIT))
        await raw.lost
        end = self.audit("pair-end")
        self.assertEqual([(r["close_code"], r["close_reason"], r["ended_by"]) for r in end],
                         [(4009, PEER_OVER_FRAME_LIMIT, "user")])
        await self.assert_relay_works()

    async def test_message_in_one_byte_fragments(self) -> None:
        await self.start_floods()
        vm, raw = await self.raw_pair()
        await raw.flood(wf.one_byte_fragments(5000))
        await raw.lost
        self.assertEqual(raw.close_frame, (4009, REASON))
        _, code, reason = await vm.closed
        self.assertEqual((code, reason), (4009, PEER_OVER_FRAME_LIMIT))
        self.assertEqual(list(vm.inbox), [])  # nothing of it was relayed
        self.assertEqual(self.audit("pair-end")[0]["close_code"], 4009)
        await self.assert_relay_works()

    async def test_fragments_up_to_the_limit_are_relayed(self) -> None:
        await self.start_floods(max_message_frames=16)
        vm, raw = await self.raw_pair()
        raw.send(*wf.fragments(wf.BINARY, [bytes([i]) for i in range(16)]))
        self.assertEqual(await vm.next(), (bytes(range(16)), True))
        raw.send(*wf.fragments(wf.TEXT, [b"a"] * 17))
        _, code, _ = await vm.closed
        self.assertEqual(code, 4009)
        await raw.lost
        self.assertEqual(raw.close_frame, (4009, REASON))

    async def test_empty_continuation_frames(self) -> None:
        await self.start_floods()
        vm, raw = await self.raw_pair()
        await raw.flood(wf.empty_continuations())
        await raw.lost
        self.assertEqual(raw.close_frame, (4009, REASON))
        _, code, _ = await vm.closed
        self.assertEqual(code, 4009)
        self.assertEqual(list(vm.inbox), [])
        await self.assert_relay_works()

    async def test_empty_messages(self) -> None:
        """Empty messages are relayed (they are legal) until they exceed the
        control-frame budget."""
        await self.start_floods(control_frames_interval="1h")
        vm, raw = await self.raw_pair()
        await raw.flood(wf.empty_messages())
        await raw.lost
        self.assertEqual(raw.close_frame, (4009, REASON))
        _, code, _ = await vm.closed
        self.assertEqual(code, 4009)
        self.assertEqual(list(vm.inbox), [(b"", True)] * 100)
        await self.assert_relay_works()

    async def test_ordinary_traffic_is_never_cut_off(self) -> None:
        """What our clients do, far more of it than they ever do: thousands
        of unfragmented messages both ways, pings both ways."""
        await self.start_floods()
        vm, user = await self.pair()
        for i in range(3000):
            user.sendMessage(b"u%d" % i, True)
            vm.sendMessage(b"v%d" % i, False)
        for _ in range(40):
            user.sendPing()
            vm.sendPing()
        got_vm = [await vm.next() for _ in range(3000)]
        got_user = [await user.next() for _ in range(3000)]
        self.assertEqual(got_vm, [(b"u%d" % i, True) for i in range(3000)])
        self.assertEqual(got_user, [(b"v%d" % i, False) for i in range(3000)])
        user.sendClose(1000)
        _, code, _ = await vm.closed
        self.assertEqual(code, 1000)

class PendingPerUserTests(ProxyCase):
    """One user with valid tickets cannot fill the waiting queues alone: past
    ``[limits] max_pending_per_user`` waiting connections (over all VMs) the next is
    refused 4009 with an audit line; other users still wait, and a place
    comes back when one of the user's connections pairs."""

    async def held(self, user: str, n: int) -> None:
        """Until the proxy counts ``n`` pending connections of ``user``."""
        pending = self.proxy.factory.control.pending
        for _ in range(500):
            if pending.held(user) == n:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{user} holds {pending.held(user)} pending connections, not {n}")

    async def test_pending_connections_per_user(self) -> None:
        await self.start(max_pending_per_user="3")
        limit = self.proxy.factory.control.pending.limit
        self.assertEqual(limit, 3)  # the [limits] key reaches the count
        waiting = [await self.user(f"vm{i}") for i in range(limit)]
        await self.held("alice", limit)
        over = await self.user("vm9")
        _, code, reason = await over.closed
        self.assertEqual((code, reason),
                         (OVER_LIMIT, "over-limit: too many pending connections for this user"))
        [refused] = self.audit("user-refused")
        self.assertEqual((refused["user"], refused["vm"]), ("alice", "vm9"))
        bob = await self.user("vm9", ticket=self.backend.ticket("vm9", "bob"))
        await self.held("bob", 1)
        vm = await self.vm("vm0")  # alice's first pairs: her place is free again
        self.assertEqual(await waiting[0].next_json(), {"type": "paired", "vm": "vm0"})
        self.assertEqual((await vm.next_json())["type"], "paired")
        await self.held("alice", limit - 1)
        await self.user("vm9")
        await self.held("alice", limit)
        self.assertFalse(bob.closed.called)  # bob still waits


del ProxyCase  # its (absent) tests are not this module's
