"""The relay between paired ends (ticrypt.proxy.relay) with fake ends: no
autobahn, no transport; a ``task.Clock`` for the idle timeout.  The same
through real websockets is ``test_proxy.ProxyTests``, the producer wiring
on StringTransports ``test_proxy.BackpressureWiringTests``."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ticrypt import signed
from ticrypt.proxy import relay
from ticrypt.proxy.relay import OWN_FULL, PARTNER_FULL, IRelayEnd, Pair, SendBufferWatch

TICKET = signed.Ticket(user="alice", user_key=b"\x01" * 32, vm="vm1", client="10.0.0.9",
                       issued=0, expires=10, ticket_id="t")


@implementer(IRelayEnd)
class FakeEnd:
    """An end that records what the relay asks of it."""

    def __init__(self, name: str):
        self.name = name
        self.pair: Pair | None = None
        self.sent: list[tuple[bytes, bool]] = []
        self.closed: list[tuple[int, str]] = []
        self.held = 0

    def send(self, payload: bytes, is_binary: bool) -> None:
        self.sent.append((payload, is_binary))

    def close_with(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))

    def pause_reading(self, why: int) -> None:
        self.held |= why

    def resume_reading(self, why: int) -> None:
        self.held &= ~why

    def send_buffer_full(self) -> bool:
        return bool(self.held & OWN_FULL)


class PairTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.vm, self.user = FakeEnd("vm"), FakeEnd("user")
        self.audited: list[tuple[str, dict[str, Any]]] = []
        self.ended: list[Pair] = []
        self.pair = Pair(vm_id="vm1", ticket=TICKET, vm=self.vm, user=self.user,
                         clock=self.clock, idle_timeout=60.0,
                         audit=lambda event, **fields: self.audited.append((event, fields)),
                         on_end=self.ended.append)
        self.vm.pair = self.user.pair = self.pair

    def test_ends_are_relay_ends(self) -> None:
        self.assertTrue(verifyObject(IRelayEnd, self.vm))
        self.assertTrue(verifyObject(IPushProducer, SendBufferWatch(self.vm)))

    def test_relay_counts_and_keeps_type(self) -> None:
        self.pair.start()
        self.pair.relay(self.user, b"\x00\x01", True)
        self.pair.relay(self.user, b"hi", False)
        self.pair.relay(self.vm, b"down", True)
        self.assertEqual(self.vm.sent, [(b"\x00\x01", True), (b"hi", False)])
        self.assertEqual(self.user.sent, [(b"down", True)])
        self.assertEqual((self.pair.bytes_up, self.pair.bytes_down), (4, 4))
        self.pair.end(self.vm, 1000, "")
        self.pair.relay(self.user, b"late", True)
        self.assertEqual(len(self.vm.sent), 2)  # nothing after the end

    def test_end_closes_the_other_audits_and_reports_once(self) -> None:
        self.pair.start()
        self.pair.relay(self.user, b"abc", True)
        self.clock.advance(2.5)
        self.pair.end(self.user, 4400, "channel-error: not-authorized")
        self.pair.end(self.vm, 1000, "")  # the other end's close: already over
        self.assertEqual(self.vm.closed, [(4400, "channel-error: not-authorized")])
        self.assertEqual(self.user.closed, [])  # it ended it
        self.assertEqual(self.audited, [("pair-end", {
            "vm": "vm1", "user": "alice", "client": "10.0.0.9", "duration": 2.5,
            "bytes_up": 3, "bytes_down": 0, "close_code": 4400,
            "close_reason": "channel-error: not-authorized", "ended_by": "user"})])
        self.assertEqual(self.ended, [self.pair])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no idle timer left

    def test_proxy_ends_both(self) -> None:
        self.pair.start()
        self.pair.end(None, 4011, "revoked: the session was ended")
        self.assertEqual(self.vm.closed, [(4011, "revoked: the session was ended")])
        self.assertEqual(self.user.closed, [(4011, "revoked: the session was ended")])
        self.assertEqual(self.audited[0][1]["ended_by"], "proxy")

    def test_idle_pair_ends_after_idle_timeout_without_traffic(self) -> None:
        self.pair.start()
        self.clock.advance(40)
        self.pair.relay(self.vm, b"x", True)  # activity postpones the end
        self.clock.advance(59)
        self.assertEqual(self.vm.closed, [])
        self.clock.advance(1)
        reason = "timeout: idle for 60s"
        self.assertEqual((self.vm.closed, self.user.closed), ([(4008, reason)], [(4008, reason)]))
        self.assertEqual(self.audited[0][1]["close_code"], 4008)
        self.assertEqual(self.ended, [self.pair])

    def test_full_send_buffer_holds_the_partner_while_paired(self) -> None:
        watch = SendBufferWatch(self.vm)
        self.vm.pair = None
        watch.pauseProducing()  # before pairing: the VM's buffer is full already
        self.assertEqual((self.vm.held, self.user.held), (OWN_FULL, 0))
        self.vm.pair = self.pair
        self.pair.start()
        self.assertEqual(self.user.held, PARTNER_FULL)
        watch.resumeProducing()
        self.assertEqual((self.vm.held, self.user.held), (0, 0))
        SendBufferWatch(self.user).pauseProducing()
        self.assertEqual((self.vm.held, self.user.held), (PARTNER_FULL, OWN_FULL))
        self.pair.end(self.user, 1000, "")
        # neither holds the other any more; its own buffer still holds the user
        self.assertEqual((self.vm.held, self.user.held), (0, OWN_FULL))
        watch.pauseProducing()
        self.assertEqual(self.user.held, OWN_FULL)

    def test_unpaired_end_holds_only_itself(self) -> None:
        alone = FakeEnd("alone")
        watch = SendBufferWatch(alone)
        watch.pauseProducing()
        self.assertEqual(alone.held, OWN_FULL)
        watch.resumeProducing()
        self.assertEqual(alone.held, 0)


class ClosingTableTests(SynchronousTestCase):
    """PROTOCOL.md §3 "Closing": what the partner of an end is told."""

    def test_peer_closed(self) -> None:
        for (code, reason), told in [
            ((1000, "bye"), (1000, "bye")),
            ((1001, None), (1001, "")),
            ((4400, "channel-error: x"), (4400, "channel-error: x")),
            ((4999, "x"), (4999, "x")),
            ((None, None), (1000, "")),
            ((1002, "x"), (4010, "peer-lost: the peer closed with code 1002")),
            ((1011, "x"), (4010, "peer-lost: the peer closed with code 1011")),
            ((3000, "x"), (4010, "peer-lost: the peer closed with code 3000")),
        ]:
            self.assertEqual(relay.peer_closed(code, reason), told)
        self.assertEqual(relay.peer_closed(1000, "x", protocol_error=True),
                         (4010, "peer-lost: the peer broke the websocket protocol"))

    def test_peer_failed_and_lost(self) -> None:
        self.assertEqual(relay.peer_failed(1009), (
            1009, "message-too-big: the peer sent a message over the proxy limit"))
        self.assertEqual(relay.peer_failed(1007), (
            4010, "peer-lost: the peer broke the websocket protocol (1007)"))
        self.assertEqual(relay.peer_lost(True), (4010, "peer-lost: no answer to pings"))
        self.assertEqual(relay.peer_lost(False),
                         (4010, "peer-lost: connection lost without a close frame"))
        self.assertEqual(relay.PEER_OVER_FRAME_LIMIT,
                         "over-limit: the peer sent too many websocket frames")
