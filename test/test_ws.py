"""Tests of ticrypt.ws: the websocket client set-up and the channel pump."""

from __future__ import annotations

import os
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ticrypt import tlsutil
from ticrypt.channel import ChannelError, UserChannel, VmChannel
from ticrypt.channel.primitives import ed25519_public_bytes
from ticrypt.ws import ChannelPump, connect_ws, no_delay, set_limits, ws_endpoint
from ticrypt.wsfast import LeanClientProtocol, message_end


class EndpointTests(SynchronousTestCase):
    def test_plain_ws_refused_unless_allowed(self) -> None:
        reactor = MemoryReactorClock()
        with self.assertRaises(ValueError) as e:
            ws_endpoint(reactor, "ws://proxy.example:8080/v1/vm", "ca.pem", timeout=5)
        self.assertIn("wss://", str(e.exception))
        ep = ws_endpoint(reactor, "ws://proxy.example:8080/v1/vm", "ca.pem", timeout=5,
                         allow_plain=True)
        self.assertIsInstance(ep, HostnameEndpoint)

    def test_other_schemes_refused(self) -> None:
        for url in ("https://proxy.example/v1/user", "proxy.example:443"):
            with self.assertRaises(ValueError):
                ws_endpoint(MemoryReactorClock(), url, "ca.pem", timeout=5, allow_plain=True)

    def test_wss_needs_the_ca_file(self) -> None:
        """TLS trusts only the deployment's CA: a missing file is an error
        at set-up, never a fallback to the system's trust store."""
        with self.assertRaises(FileNotFoundError):
            ws_endpoint(MemoryReactorClock(), "wss://proxy.example/v1/user",
                        self.mktemp(), timeout=5)

    def test_wss_connects_to_host_and_default_port(self) -> None:
        ca_dir = self.mktemp()
        os.mkdir(ca_dir)
        ca = os.path.join(ca_dir, "ca.pem")
        tlsutil.make_ca(ca, os.path.join(ca_dir, "ca.key"))
        reactor = MemoryReactorClock()
        factory = WebSocketClientFactory(reactor=reactor)
        connect_ws(reactor, "wss://127.0.0.1/v1/user", ca, factory, max_message=1000,
                   timeout=7)
        host, port, _, timeout, _ = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 443, 7))


class LimitTests(SynchronousTestCase):
    def test_limits_and_url(self) -> None:
        factory = WebSocketClientFactory(reactor=MemoryReactorClock(), useragent="ua/1")
        set_limits(factory, "wss://p.example:9443/v1/vm", max_message=1234,
                   handshake_timeout=15, ping_interval=30)
        self.assertEqual((factory.host, factory.port, factory.resource, factory.isSecure),
                         ("p.example", 9443, "/v1/vm", True))
        self.assertEqual(factory.useragent, "ua/1")
        self.assertEqual((factory.maxMessagePayloadSize, factory.maxFramePayloadSize), (1234, 1234))
        self.assertEqual((factory.openHandshakeTimeout, factory.closeHandshakeTimeout), (15, 5))
        self.assertEqual((factory.autoPingInterval, factory.autoPingTimeout), (30, 30))
        self.assertEqual(factory.perMessageCompressionOffers, [])

    def test_no_pings_by_default(self) -> None:
        factory = WebSocketClientFactory(reactor=MemoryReactorClock())
        set_limits(factory, "wss://p.example/v1/user", max_message=0, handshake_timeout=3)
        self.assertEqual(factory.autoPingInterval, 0)
        self.assertEqual(factory.maxMessagePayloadSize, 0)


class _End:
    """One end of a pump pair: records what reaches the leg."""

    def __init__(self, channel: UserChannel | VmChannel) -> None:
        self.sent: list[tuple[bytes, bool]] = []
        self.established: list[bytes] = []
        self.delivered: list[bytes] = []
        self.failed: list[ChannelError] = []
        self.stop = False
        self.pump = ChannelPump(channel, send=lambda p, b: self.sent.append((p, b)),
                                on_established=self.established.append,
                                on_delivered=self.delivered.append,
                                on_failed=self.failed.append, stopped=lambda: self.stop)

    def to(self, other: _End) -> None:
        sent, self.sent = self.sent, []
        for payload, binary in sent:
            other.pump.feed(payload, binary)


class PumpTests(SynchronousTestCase):
    def setUp(self) -> None:
        user_key, vm_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        self.user_pub = ed25519_public_bytes(user_key)
        self.vm_pub = ed25519_public_bytes(vm_key)
        self.user = _End(UserChannel(user_key, "vm-1", self.vm_pub))
        self.vm = _End(VmChannel(vm_key, "vm-1", lambda key: True))

    def handshake(self) -> None:
        self.user.pump.start()
        self.user.to(self.vm)
        self.vm.to(self.user)
        self.user.to(self.vm)

    def test_handshake_text_then_sealed_binary(self) -> None:
        self.user.pump.start()
        self.assertEqual([b for _, b in self.user.sent], [False])
        self.user.to(self.vm)
        self.vm.to(self.user)
        self.user.to(self.vm)
        self.assertEqual(self.user.established, [self.vm_pub])
        self.assertEqual(self.vm.established, [self.user_pub])
        self.user.pump.send_app(b"hello vm")
        self.assertTrue(self.user.sent[0][1])
        self.user.to(self.vm)
        self.assertEqual(self.vm.delivered, [b"hello vm"])

    def test_nothing_sealed_before_established(self) -> None:
        self.user.pump.send_app(b"too early")
        self.assertEqual(self.user.sent, [])

    def test_not_utf8_is_bad_message(self) -> None:
        self.vm.pump.feed(b"\xff\xfe", False)
        self.assertEqual([e.code for e in self.vm.failed], ["bad-message"])
        self.assertTrue(self.vm.pump.channel.closed)

    def test_channel_error_is_failed(self) -> None:
        self.vm.pump.feed(b"\x01binary before the handshake", True)
        self.assertEqual([e.code for e in self.vm.failed], ["unexpected-message"])

    def test_stopped_drops_what_is_left(self) -> None:
        self.handshake()
        self.user.stop = True
        self.user.pump.send_app(b"after close")
        self.assertEqual(self.user.sent, [])

    def test_seal_failure_is_failed(self) -> None:
        user_key, vm_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        self.user = _End(UserChannel(user_key, "vm-1", ed25519_public_bytes(vm_key),
                                     max_records=1))
        self.vm = _End(VmChannel(vm_key, "vm-1", lambda key: True))
        self.handshake()
        self.user.pump.send_app(b"one")
        self.user.pump.send_app(b"two")
        self.assertEqual(len(self.user.sent), 1)
        self.assertEqual([e.code for e in self.user.failed], ["counter-exhausted"])


class _TcpTransport(StringTransport):
    """A StringTransport that records Nagle's setting, like a TCP one."""

    nodelay: bool | None = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


class NoDelayTests(SynchronousTestCase):
    def test_sets_nodelay_where_there_is_tcp(self) -> None:
        t = _TcpTransport()
        self.assertTrue(no_delay(t))
        self.assertIs(t.nodelay, True)
        self.assertFalse(no_delay(StringTransport()))  # no TCP socket: nothing to set

    def test_os_error_is_no(self) -> None:
        class Unix(StringTransport):
            def setTcpNoDelay(self, enabled: bool) -> None:
                raise OSError(22, "not a TCP socket")
        self.assertFalse(no_delay(Unix()))

    def test_user_leg_turns_nagle_off(self) -> None:
        """autobahn's own setTcpNoDelay fails on a client protocol (it reads
        the option before copying it from the factory); the frontend's leg
        sets it itself, else each small message waits for a delayed ACK."""
        from ticrypt.frontend.leg import UserLeg, _UserFactory
        factory = _UserFactory(url="ws://127.0.0.1:1/v1/user", reactor=MemoryReactorClock())
        # no opening-handshake timer: autobahn arms it on the global reactor
        factory.setProtocolOptions(openHandshakeTimeout=0)
        leg = factory.buildProtocol(None)
        assert isinstance(leg, UserLeg)
        t = _TcpTransport()
        leg.makeConnection(t)
        self.assertIs(t.nodelay, True)


class LeanReceiveTests(SynchronousTestCase):
    """ticrypt.wsfast: a message's frames joined and handed on, as autobahn's
    onMessageEnd does, without its observable event."""

    def _proto(self, failed: bool, frames: list[bytes]) -> Any:
        got: list[tuple[bytes, bool]] = []

        class P:
            failedByMe = failed
            message_data: list[bytes] | None = frames
            message_is_binary = True

            def _onMessage(self, payload: bytes, is_binary: bool) -> None:
                got.append((payload, is_binary))
        p = P()
        p.got = got  # type: ignore[attr-defined]
        return p

    def test_frames_joined(self) -> None:
        for frames, whole in (([b"one"], b"one"), ([b"a", b"b", b"c"], b"abc")):
            p = self._proto(False, frames)
            message_end(p)
            self.assertEqual(p.got, [(whole, True)])
            self.assertIsNone(p.message_data)

    def test_nothing_after_a_protocol_failure(self) -> None:
        p = self._proto(True, [b"x"])
        message_end(p)
        self.assertEqual(p.got, [])
        self.assertIsNone(p.message_data)

    def test_client_legs_skip_autobahn_extras(self) -> None:
        from ticrypt.frontend.leg import UserLeg
        from ticrypt.vmc.leg import VmLeg
        for cls in (UserLeg, VmLeg):
            self.assertTrue(issubclass(cls, LeanClientProtocol))
            self.assertIs(cls.onMessageEnd, LeanClientProtocol.onMessageEnd)
