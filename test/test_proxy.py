"""Tests for ticrypt-proxy: pairing table, control messages, backpressure
wiring, config, and real autobahn clients against an in-process proxy.

The daemon-level tests (twistd, TLS, memory bound) are in
``test/test_proxy_daemon.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any, cast

from autobahn.websocket.types import ConnectionRequest
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from test import proxyfixture as pf
from test import wsframes as wf
from ticrypt import closecodes, identity, signed, tlsutil
from ticrypt.audit import AuditLog
from ticrypt.config import ConfigError, load_config, schema_of
from ticrypt.encoding import b64
from ticrypt.proxy import tap, tlsmem, wsmem
from ticrypt.proxy.config import ProxyConfig
from ticrypt.proxy.control import ControlError, LegState, UserLegMachine, parse_control
from ticrypt.proxy.pairing import Limits, Paired, PairingTable, Refused, Waiting
from ticrypt.proxy.relay import IRelayEnd, Pair, SendBufferWatch
from ticrypt.proxy.ws import Leg, RelayFactory, Settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PairingTableTests(SynchronousTestCase):
    """The sans-IO table with plain objects as sockets."""

    def table(self, **kw: int) -> PairingTable[str]:
        return PairingTable(Limits(**kw))

    def test_vm_waits_then_user_takes_oldest(self) -> None:
        t = self.table()
        self.assertEqual(t.add_vm("vm1", "a"), Waiting(1))
        self.assertEqual(t.add_vm("vm1", "b"), Waiting(2))
        self.assertEqual(t.add_vm("vm2", "c"), Waiting(1))
        self.assertEqual(t.snapshot(), {"vm1": 2, "vm2": 1})
        self.assertEqual(t.add_user("vm1", "u1"), Paired("vm1", "a", "u1"))
        self.assertEqual(t.add_user("vm1", "u2"), Paired("vm1", "b", "u2"))
        self.assertEqual(t.pairs, 2)
        self.assertEqual(t.snapshot(), {"vm2": 1})
        self.assertEqual(t.waiting_total, 1)

    def test_user_waits_then_vm_arrives(self) -> None:
        t = self.table()
        self.assertEqual(t.add_user("vm1", "u1"), Waiting(1))
        self.assertEqual(t.add_user("vm1", "u2"), Waiting(2))
        self.assertEqual(t.add_vm("vm1", "a"), Paired("vm1", "a", "u1"))
        self.assertEqual(t.add_vm("vm1", "b"), Paired("vm1", "b", "u2"))
        self.assertEqual(t.waiting_total, 0)
        self.assertEqual(t.snapshot(), {})

    def test_dead_waiting_socket_removed(self) -> None:
        t = self.table()
        t.add_vm("vm1", "a")
        t.add_vm("vm1", "b")
        t.add_vm("vm1", "c")
        self.assertTrue(t.remove_vm("vm1", "b"))
        self.assertFalse(t.remove_vm("vm1", "b"))
        self.assertFalse(t.remove_vm("vm9", "a"))
        self.assertEqual(t.depth("vm1"), 2)
        self.assertEqual(t.add_user("vm1", "u1"), Paired("vm1", "a", "u1"))
        self.assertEqual(t.add_user("vm1", "u2"), Paired("vm1", "c", "u2"))
        t.add_user("vm1", "u3")
        self.assertTrue(t.remove_user("vm1", "u3"))
        self.assertEqual(t.waiting_total, 0)
        self.assertEqual(t.add_vm("vm1", "d"), Waiting(1))

    def test_limit_per_vm(self) -> None:
        t = self.table(max_waiting_per_vm=2)
        t.add_vm("vm1", "a")
        t.add_vm("vm1", "b")
        self.assertIsInstance(t.add_vm("vm1", "c"), Refused)
        self.assertEqual(t.add_vm("vm2", "d"), Waiting(1))
        t.add_user("vm3", "u1")
        t.add_user("vm3", "u2")
        self.assertIsInstance(t.add_user("vm3", "u3"), Refused)

    def test_limit_total(self) -> None:
        t = self.table(max_waiting_total=2)
        t.add_vm("vm1", "a")
        t.add_user("vm2", "u1")
        self.assertIsInstance(t.add_vm("vm3", "b"), Refused)
        self.assertIsInstance(t.add_user("vm4", "u2"), Refused)
        # pairing frees a waiting slot
        self.assertEqual(t.add_user("vm1", "u3"), Paired("vm1", "a", "u3"))
        self.assertEqual(t.add_vm("vm3", "b"), Waiting(1))

    def test_limit_pairs(self) -> None:
        t = self.table(max_pairs=1)
        t.add_vm("vm1", "a")
        t.add_vm("vm1", "b")
        self.assertEqual(t.add_user("vm1", "u1"), Paired("vm1", "a", "u1"))
        refused = t.add_user("vm1", "u2")
        self.assertIsInstance(refused, Refused)
        self.assertIn("pairs", refused.reason)  # type: ignore[union-attr]
        self.assertEqual(t.pair_ended(), [])
        self.assertEqual(t.pairs, 0)
        self.assertEqual(t.add_user("vm1", "u2"), Paired("vm1", "b", "u2"))

    def test_pair_end_joins_waiters_held_by_max_pairs(self) -> None:
        t = self.table(max_pairs=1)
        self.assertEqual(t.add_user("vm2", "u2"), Waiting(1))  # no VM socket yet
        t.add_vm("vm1", "a")
        t.add_user("vm1", "u1")
        self.assertEqual(t.add_vm("vm2", "b"), Waiting(1))  # pairs are full
        self.assertEqual(t.pair_ended(), [Paired("vm2", "b", "u2")])
        self.assertEqual(t.pairs, 1)
        self.assertEqual(t.waiting_total, 0)

    def test_pair_ended_without_pair(self) -> None:
        self.assertRaises(RuntimeError, self.table().pair_ended)


class ControlMessageTests(SynchronousTestCase):
    def test_good(self) -> None:
        msg = parse_control(b'{"type":"connect","ticket":"x.y"}', False, "connect", ("ticket",))
        self.assertEqual(msg, {"ticket": "x.y"})

    def test_refused(self) -> None:
        for payload, binary in [
            (b'{"type":"connect","ticket":"x"}', True),
            (b"not json", False),
            (b"[]", False),
            (b'{"type":"vm-auth","ticket":"x"}', False),
            (b'{"type":"connect"}', False),
            (b'{"type":"connect","ticket":1}', False),
            (b'{"type":"connect","ticket":"x","extra":"y"}', False),
            (b'{"type":"connect","ticket":"' + b"a" * 9000 + b'"}', False),
        ]:
            with self.assertRaises(ControlError) as cm:
                parse_control(payload, binary, "connect", ("ticket",))
            self.assertEqual(cm.exception.code, closecodes.BAD_MESSAGE.code)
            self.assertTrue(cm.exception.reason.startswith("bad-message: "))


def _factory(**settings: Any) -> RelayFactory:
    from twisted.internet.task import Clock
    return RelayFactory(reactor=reactor, clock=Clock(), backend_key=b"\x00" * 32,
                        table=PairingTable(Limits()), settings=Settings(**settings),
                        audit=AuditLog(None, Clock()))


def open_leg(case: SynchronousTestCase, factory: RelayFactory, path: str = "/v1/user",
             address: str = "192.168.1.1") -> tuple[Leg, StringTransport]:
    """An open leg of ``path`` on a StringTransport from ``address``
    (autobahn's own opening handshake skipped)."""
    leg = Leg()
    leg.factory = factory
    transport = StringTransport(peerAddress=IPv4Address("TCP", address, 40000))
    leg.makeConnection(transport)
    leg.onConnect(ConnectionRequest(None, {}, "localhost", path, {}, 13, None, [], []))
    leg.state = Leg.STATE_OPEN
    leg.onOpen()
    # cancels autobahn's timers (handshake, ping, close) on the real reactor
    case.addCleanup(leg.connectionLost, Failure(ConnectionDone()))
    return leg, transport


def start_pair(factory: RelayFactory, vm: Leg, user: Leg,
               ticket: signed.Ticket | None = None) -> Pair:
    """Pair ``vm`` and ``user`` (whose ticket this is) in ``factory``."""
    ticket = ticket or signed.Ticket(user="alice", user_key=b"\x01" * 32, vm="vm1",
                                     client="127.0.0.1", issued=0, expires=10, ticket_id="t")
    factory.table.add_vm(ticket.vm, vm)
    assert isinstance(user.machine, UserLegMachine)
    user.machine.ticket = ticket
    paired = factory.table.add_user(ticket.vm, user)
    assert isinstance(paired, Paired)
    factory.start_pair(paired)
    assert vm.pair is not None
    return vm.pair


class FactoryOptionsTests(SynchronousTestCase):
    def test_options_are_class_attributes_of_the_factorys_leg(self) -> None:
        """The protocol options are read from the leg's class (not through
        Leg.__getattr__, a Python call per read), per factory."""
        a, b = _factory(max_message_size=4096), _factory(max_message_size=8192)
        leg_a, leg_b = a.buildProtocol(None), b.buildProtocol(None)
        self.assertIsInstance(leg_a, Leg)
        self.assertEqual(type(leg_a).maxMessagePayloadSize, 4096)
        self.assertEqual(type(leg_b).maxMessagePayloadSize, 8192)
        self.assertNotIn("maxMessagePayloadSize", vars(Leg))  # Leg itself untouched
        # a callable option stays a plain function (no self passed)
        self.assertIsNone(leg_a.perMessageCompressionAccept([]))


class _NoEnd:
    pair = None

    def pause_reading(self, why: int) -> None:
        pass

    def resume_reading(self, why: int) -> None:
        pass


class BackpressureWiringTests(SynchronousTestCase):
    """Producer wiring seen through StringTransport (iosim cannot show it)."""

    def test_tls_leg_buffer_is_the_tcp_connections(self) -> None:
        """Under TLS the send buffer that fills is the TCP connection's (the
        TLS layer writes through at once): max_buffered is set there too,
        not only on the TLS layer (where it bounded nothing, and a TLS leg
        was paused at Twisted's 64 KiB default)."""
        from types import SimpleNamespace

        from twisted.internet import protocol, ssl
        from twisted.protocols.tls import TLSMemoryBIOFactory

        tls = TLSMemoryBIOFactory(ssl.CertificateOptions(), True,
                                  protocol.Factory.forProtocol(protocol.Protocol)
                                  ).buildProtocol(None)
        tcp = StringTransport()
        tcp.bufferSize = 65536  # type: ignore[attr-defined]
        tls.makeConnection(tcp)
        wsmem.LeanWebSocket.watch_output(SimpleNamespace(transport=tls),  # type: ignore[arg-type]
                                         12345, SendBufferWatch(cast(IRelayEnd, _NoEnd())))
        self.assertEqual(tcp.bufferSize, 12345)  # type: ignore[attr-defined]
        self.assertTrue(tcp.streaming)

    def test_full_buffer_pauses_partner_and_itself(self) -> None:
        factory = _factory(max_buffered=12345, ping_interval=30.0)
        vm, vm_t = open_leg(self, factory, "/v1/vm")
        user, user_t = open_leg(self, factory)
        start_pair(factory, vm, user)
        # each leg's transport holds a streaming producer from open
        self.assertTrue(vm_t.streaming)
        self.assertTrue(user_t.streaming)
        self.assertEqual(vm_t.bufferSize, 12345)  # type: ignore[attr-defined]
        # the VM's outgoing buffer is full: stop reading the user, and the
        # VM itself (what it sends may cost output too: pongs)
        vm_t.producer.pauseProducing()
        self.assertEqual(user_t.producerState, "paused")
        self.assertEqual(vm_t.producerState, "paused")
        # user's pings are suspended while we cannot read its pongs; the
        # VM's own keep running (it is the one not reading)
        self.assertIsNone(user.autoPingTimeoutCall)
        self.assertIsNone(user.autoPingPendingCall)
        self.assertIsNotNone(vm.autoPingPendingCall)
        vm_t.producer.resumeProducing()
        self.assertEqual(user_t.producerState, "producing")
        self.assertEqual(vm_t.producerState, "producing")
        self.assertIsNotNone(user.autoPingPendingCall)  # pings resume
        # the other direction, and both at once: each is read again only
        # when nothing holds it
        user_t.producer.pauseProducing()
        self.assertEqual(vm_t.producerState, "paused")
        vm_t.producer.pauseProducing()
        user_t.producer.resumeProducing()
        self.assertEqual((vm_t.producerState, user_t.producerState), ("paused", "paused"))
        self.assertIsNone(user.autoPingPendingCall)  # held for the VM only
        self.assertIsNotNone(vm.autoPingPendingCall)  # held for its own buffer
        vm_t.producer.resumeProducing()
        self.assertEqual((vm_t.producerState, user_t.producerState),
                         ("producing", "producing"))

    def test_unpaired_leg_with_full_buffer_is_not_read(self) -> None:
        """Before pairing a leg's output is the proxy's own (challenge,
        pongs): when that backs up the leg is not read, pings go on."""
        leg, t = open_leg(self, _factory(ping_interval=30.0))
        t.producer.pauseProducing()
        self.assertEqual(t.producerState, "paused")
        self.assertIsNotNone(leg.autoPingPendingCall)
        t.producer.resumeProducing()
        self.assertEqual(t.producerState, "producing")

    def test_pair_end_unwires_and_resumes(self) -> None:
        factory = _factory()
        vm, vm_t = open_leg(self, factory, "/v1/vm")
        user, user_t = open_leg(self, factory)
        pair = start_pair(factory, vm, user)
        vm_t.producer.pauseProducing()
        self.assertEqual(user_t.producerState, "paused")
        pair.end(vm, 1000, "bye")
        # the partner may read its close reply; the VM's full buffer no
        # longer holds it
        self.assertEqual(user_t.producerState, "producing")
        vm_t.producer.resumeProducing()
        vm_t.producer.pauseProducing()
        self.assertEqual(user_t.producerState, "producing")
        self.assertEqual(factory.table.pairs, 0)
        self.assertEqual(user.phase, LegState.DONE)

    def test_paired_legs_relay_whole_messages(self) -> None:
        factory = _factory()
        vm, _ = open_leg(self, factory, "/v1/vm")
        user, _ = open_leg(self, factory)
        pair = start_pair(factory, vm, user)
        sent: list[tuple[bytes, bool]] = []
        vm.sendMessage = lambda p, b=False: sent.append((p, b))  # type: ignore[method-assign]
        user.onMessage(b"\x00\x01", True)
        user.onMessage(b"hi", False)
        self.assertEqual(sent, [(b"\x00\x01", True), (b"hi", False)])
        self.assertEqual((pair.bytes_up, pair.bytes_down), (4, 0))
        self.assertTrue(verifyObject(IRelayEnd, vm))


class GuardTests(SynchronousTestCase):
    def test_unexpected_error_drops_only_that_leg(self) -> None:
        """An exception in a leg's handling is logged, the leg leaves the
        pairing table and its connection is aborted; nothing escapes."""
        factory = _factory()
        leg, t = open_leg(self, factory)
        assert isinstance(leg.machine, UserLegMachine)
        leg.machine.state, leg.machine.vm_id = LegState.WAITING, "vm1"
        factory.table.add_user("vm1", leg)

        def boom(*args: Any) -> Any:
            raise RuntimeError("surprise")

        self.patch(UserLegMachine, "message", boom)
        leg.onMessage(b"x", False)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(factory.table.users_waiting("vm1"), 0)
        self.assertIs(leg.phase, LegState.DONE)
        self.assertTrue(t.disconnecting)


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.backend = pf.Backend(self.dir)

    def test_sample_documents_every_key(self) -> None:
        with open(os.path.join(ROOT, "etc", "proxy.ini")) as f:
            lines = f.read().splitlines()
        for section, keys in schema_of(ProxyConfig).sections.items():
            self.assertIn(f"[{section}]", lines)
            for key in keys:
                idx = next((i for i, line in enumerate(lines)
                            if line.startswith(f"{key} = ")), None)
                self.assertIsNotNone(idx, f"{key} missing from etc/proxy.ini")
                assert idx is not None
                self.assertTrue(lines[idx - 1].startswith("#"), f"{key} is not documented")

    def test_defaults(self) -> None:
        path = pf.write_proxy_config(self.dir, self.backend)
        cfg = load_config(path, ProxyConfig)
        self.assertEqual(cfg.limits, Settings())
        self.assertEqual(cfg.limits.pairing, Limits())
        self.assertEqual(cfg.limits.max_message_size, 2 * 1024 * 1024)
        self.assertEqual(cfg.proxy.ticket_ledger,
                         os.path.join(os.path.abspath(self.dir), "proxy-tickets.ledger"))

    def test_plain_needs_allow_plain(self) -> None:
        path = pf.write_proxy_config(self.dir, self.backend, allow_plain=False)
        with self.assertRaises(ConfigError) as cm:
            load_config(path, ProxyConfig)
        self.assertIn("[proxy] listen", str(cm.exception))
        self.assertIn("allow_plain", str(cm.exception))

    def test_bad_backend_key(self) -> None:
        with open(self.backend.pub_path, "w") as f:
            f.write("ed25519:nonsense\n")
        path = pf.write_proxy_config(self.dir, self.backend)
        options = tap.Options()
        with self.assertRaises(usage.UsageError) as cm:
            options.parseOptions(["--config", path])
        self.assertIn("[proxy] backend_public_key", str(cm.exception))

    def test_status_off(self) -> None:
        path = pf.write_proxy_config(self.dir, self.backend, status_listen="off")
        cfg = load_config(path, ProxyConfig)
        service = tap.makeService({"cfg": cfg}, reactor=reactor)
        self.assertEqual([s.label for s in service.listeners()], ["proxy"])

    def test_unusable_ticket_ledger_stops_start_up(self) -> None:
        """The ledger is opened before anything listens; if it cannot be
        written the proxy does not start (one line naming the key)."""
        path = pf.write_proxy_config(self.dir, self.backend)
        os.makedirs(os.path.join(self.dir, "proxy-tickets.ledger"))  # not a file
        cfg = load_config(path, ProxyConfig)
        service = tap.makeService({"cfg": cfg}, reactor=reactor)
        lines: list[str] = []
        self.patch(service, "failure_line",
                   lambda e: lines.append(type(service).failure_line(service, e)) or lines[-1])
        self.assertRaises(SystemExit, service.startService)
        self.assertIn("[proxy] ticket_ledger: cannot use ", lines[0])
        self.assertEqual({s.port for s in service.listeners()}, {None})  # none listens


class _ClosesClients:
    """Cleanup for tests that open clients against an in-process proxy: abort
    what is still open, then wait until the proxy has no connection left."""

    clients: list[pf.WsClient]
    raws: list[wf.RawClient] = []
    proxy: Any

    async def _all_closed(self) -> None:
        for c in self.clients:
            if c.close_info is None:
                c.dropConnection(abort=True)
        for r in self.raws:
            r.abort()
        await defer.gatherResults([c.closed for c in self.clients]
                                  + [r.lost for r in self.raws])
        await self.proxy.factory.all_closed()


class ProxyCase(_ClosesClients, TestCase):
    """Helpers for real autobahn clients against the proxy in this process
    (127.0.0.1); no tests of its own."""

    limits: dict[str, Any] = {}

    async def start(self, **limits: Any) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.backend = pf.Backend(self.dir)
        merged = {"ping_interval": "30s", **limits}
        path = pf.write_proxy_config(self.dir, self.backend, **merged)
        self.proxy = await pf.start_proxy(self, path)
        self.port = self.proxy.port
        self.clients: list[pf.WsClient] = []
        self.raws = []
        self.addCleanup(self._all_closed)

    def track(self, client: pf.WsClient) -> pf.WsClient:
        self.clients.append(client)
        return client

    async def vm(self, vm_id: str = "vm1", **kw: Any) -> pf.WsClient:
        return self.track(await pf.vm_connect(reactor, self.port, self.backend, vm_id, **kw))

    async def user(self, vm_id: str = "vm1", ticket: str | None = None,
                   **kw: Any) -> pf.WsClient:
        ticket = ticket or self.backend.ticket(vm_id)
        return self.track(await pf.user_connect(reactor, self.port, ticket, **kw))

    async def pair(self, vm_id: str = "vm1") -> tuple[pf.WsClient, pf.WsClient]:
        vm = await self.vm(vm_id)
        user = await self.user(vm_id)
        self.assertEqual(await user.next_json(), {"type": "paired", "vm": vm_id})
        paired = await vm.next_json()
        self.assertEqual(paired["type"], "paired")
        return vm, user

    def audit(self, event: str) -> list[dict[str, Any]]:
        return [r for r in pf.read_audit(self.dir) if r["event"] == event]

    def assert_no_secrets(self, *secrets: str) -> None:
        with open(os.path.join(self.dir, "proxy-audit.log")) as f:
            text = f.read()
        for word in ('"ticket"', '"signature"', '"credential"', '"nonce"', *secrets):
            self.assertNotIn(word, text)
        for secret in secrets:
            self.assertNotIn(secret.split(".")[-1], text)


class ProxyTests(ProxyCase):
    """Real autobahn clients against the proxy in this process (127.0.0.1)."""

    # -- VM authentication ---------------------------------------------------

    async def test_vm_waits_and_pool_depth_shows_in_status(self) -> None:
        await self.start()
        await self.vm("vm1")
        await self.vm("vm1")
        await self.vm("vm2")
        status = await pf.get_status(reactor, self.proxy.status_port)
        self.assertEqual(status, {"vms": {"vm1": 2, "vm2": 1}, "pairs": 0})
        connected = self.audit("vm-connected")
        self.assertEqual(sorted(r["vm"] for r in connected), ["vm1", "vm1", "vm2"])
        self.assertEqual({r["address"] for r in connected}, {"127.0.0.1"})

    async def _vm_refused(self, build: Any) -> tuple[int | None, str | None]:
        client = self.track(await pf.open_ws(reactor, self.port, "/v1/vm"))
        challenge = await client.next_json()
        build(client, challenge["nonce"])
        _, code, reason = await client.closed
        return code, reason

    async def test_impostor_vm_wrong_key(self) -> None:
        await self.start()
        real, impostor = identity.generate(), identity.generate()
        cred = self.backend.vm_credential("vm1", real)
        code, reason = await self._vm_refused(
            lambda c, n: pf.send_vm_auth(c, cred, impostor, "vm1", n))
        self.assertEqual((code, reason), (4001, "vm-auth-failed: bad-signature"))
        refused = self.audit("vm-refused")
        self.assertEqual(refused[0]["reason"], "vm-auth-failed: bad-signature")
        self.assertEqual(refused[0]["vm"], "vm1")
        self.assert_no_secrets(cred)

    async def test_impostor_vm_forged_credential(self) -> None:
        await self.start()
        vm_key = identity.generate()
        d = self.mktemp()
        os.makedirs(d)
        forger = pf.Backend(d)
        cred = forger.vm_credential("vm1", vm_key)
        code, reason = await self._vm_refused(
            lambda c, n: pf.send_vm_auth(c, cred, vm_key, "vm1", n))
        self.assertEqual((code, reason), (4001, "vm-auth-failed: credential bad-signature"))

    async def test_impostor_vm_signature_over_other_nonce(self) -> None:
        await self.start()
        vm_key = identity.generate()
        cred = self.backend.vm_credential("vm1", vm_key)
        code, _ = await self._vm_refused(
            lambda c, n: pf.send_vm_auth(c, cred, vm_key, "vm1", b64(os.urandom(32))))
        self.assertEqual(code, 4001)

    async def test_vm_signature_for_other_vm_id(self) -> None:
        await self.start()
        vm_key = identity.generate()
        cred = self.backend.vm_credential("vm1", vm_key)
        code, _ = await self._vm_refused(
            lambda c, n: pf.send_vm_auth(c, cred, vm_key, "vm2", n))
        self.assertEqual(code, 4001)

    async def test_vm_bad_message(self) -> None:
        await self.start()
        code, reason = await self._vm_refused(lambda c, n: c.sendMessage(b"{}", True))
        self.assertEqual(code, 4000)
        assert reason is not None
        self.assertTrue(reason.startswith("bad-message: "))

    async def test_deeply_nested_control_message_on_both_paths(self) -> None:
        """Thousands of ``[`` in the first message: an ordinary bad-message
        close with an audit line, not a traceback and a dropped TCP connection."""
        await self.start()
        deep = b"[" * 4000 + b"]" * 4000
        code, reason = await self._vm_refused(lambda c, n: c.sendMessage(deep, False))
        self.assertEqual((code, reason), (4000, "bad-message: control message nested too deeply"))
        client = await pf.open_ws(reactor, self.port, "/v1/user")
        self.track(client)
        client.sendMessage(deep, False)
        _, code, reason = await client.closed
        self.assertEqual((code, reason), (4000, "bad-message: control message nested too deeply"))
        self.assertEqual([r["reason"] for r in self.audit("vm-refused") + self.audit("user-refused")],
                         ["bad-message: control message nested too deeply"] * 2)

    async def test_too_many_waiting_sockets(self) -> None:
        await self.start(max_waiting_per_vm=2)
        await self.vm("vm1")
        await self.vm("vm1")
        vm_key = identity.generate()
        cred = self.backend.vm_credential("vm1", vm_key)
        code, reason = await self._vm_refused(
            lambda c, n: pf.send_vm_auth(c, cred, vm_key, "vm1", n))
        self.assertEqual(code, 4009)
        assert reason is not None
        self.assertTrue(reason.startswith("over-limit: "))
        await self.vm("vm2")

    async def test_handshake_timeout(self) -> None:
        await self.start(handshake_timeout="200ms")
        client = self.track(await pf.open_ws(reactor, self.port, "/v1/user"))
        _, code, reason = await client.closed
        self.assertEqual(code, 4008)
        assert reason is not None
        self.assertTrue(reason.startswith("timeout: "))
        self.assertEqual(self.audit("user-refused")[0]["reason"], reason)

    async def test_unknown_path_denied(self) -> None:
        await self.start()
        factory = pf.client_factory(f"ws://127.0.0.1:{self.port}/v1/other", reactor)
        from twisted.internet import endpoints
        proto = await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(
            factory)
        self.track(proto)
        with self.assertRaises(ConnectionError):
            await proto.opened

    # -- tickets ---------------------------------------------------------------

    async def _user_refused(self, ticket: str) -> tuple[int | None, str | None]:
        client = await self.user("vm1", ticket=ticket)
        _, code, reason = await client.closed
        return code, reason

    async def test_ticket_expired(self) -> None:
        await self.start()
        ticket = self.backend.ticket("vm1", ttl=10, now=reactor.seconds() - 60)
        self.assertEqual(await self._user_refused(ticket), (4003, "ticket-refused: expired"))
        refused = self.audit("user-refused")
        self.assertEqual(refused[0]["reason"], "ticket-refused: expired")
        self.assert_no_secrets(ticket)

    async def test_ticket_forged(self) -> None:
        await self.start()
        d = self.mktemp()
        os.makedirs(d)
        ticket = pf.Backend(d).ticket("vm1")
        self.assertEqual(await self._user_refused(ticket),
                         (4003, "ticket-refused: bad-signature"))

    async def test_ticket_not_recorded_is_refused(self) -> None:
        """A ticket whose use cannot be written to the ledger is refused
        (fail closed): a restart could not tell it was used."""
        await self.start()
        await self.vm("vm1")
        journal = self.proxy.factory.tickets
        self.patch(journal, "_append", lambda line: False)
        self.assertEqual(await self._user_refused(self.backend.ticket("vm1")),
                         (1011, "server-error: cannot record the ticket"))
        self.assertEqual([r["reason"] for r in self.audit("user-refused")],
                         ["server-error: cannot record the ticket"])

    async def test_ticket_is_single_use(self) -> None:
        """A ticket that paired once is refused the second time, even while
        a VM socket waits; the refusal is audited."""
        await self.start()
        ticket = self.backend.ticket("vm1")
        await self.vm("vm1")
        first = await self.user("vm1", ticket=ticket)
        self.assertEqual(await first.next_json(), {"type": "paired", "vm": "vm1"})
        await self.vm("vm1")
        self.assertEqual(await self._user_refused(ticket), (4003, "ticket-refused: replayed"))
        self.assertEqual([r["reason"] for r in self.audit("user-refused")],
                         ["ticket-refused: replayed"])
        status = await pf.get_status(reactor, self.proxy.status_port)
        self.assertEqual(status["vms"], {"vm1": 1})

    async def test_ticket_tampered(self) -> None:
        await self.start()
        ticket = self.backend.ticket("vm1")
        body, sig = ticket.split(".")
        payload = json.loads(__import__("base64").urlsafe_b64decode(body + "=="))
        payload["vm"] = "vm2"
        forged = b64(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
        code, _ = await self._user_refused(forged + "." + sig)
        self.assertEqual(code, 4003)

    async def test_ticket_wrong_client(self) -> None:
        await self.start()
        ticket = self.backend.ticket("vm1", client="10.1.2.3")
        self.assertEqual(await self._user_refused(ticket),
                         (4003, "ticket-refused: wrong-client"))

    async def test_no_vm_after_wait(self) -> None:
        await self.start(user_wait_timeout="200ms")
        await self.vm("vm2")
        self.assertEqual(await self._user_refused(self.backend.ticket("vm1")),
                         (4004, "no-vm-available: no VM socket within 0.2s"))
        self.assertEqual(self.audit("user-refused")[0]["vm"], "vm1")

    async def test_user_waits_for_vm(self) -> None:
        await self.start()
        user = await self.user("vm1")
        vm = await self.vm("vm1")
        self.assertEqual(await user.next_json(), {"type": "paired", "vm": "vm1"})
        self.assertEqual((await vm.next_json())["type"], "paired")

    async def test_too_many_pairs(self) -> None:
        await self.start(max_pairs=1)
        await self.pair("vm1")
        await self.vm("vm1")
        code, reason = await self._user_refused(self.backend.ticket("vm1"))
        self.assertEqual(code, 4009)

    # -- relay -----------------------------------------------------------------

    async def test_pairing_message_to_vm(self) -> None:
        await self.start()
        vm = await self.vm("vm1")
        user_key = identity.generate()
        user = await self.user("vm1", ticket=self.backend.ticket("vm1", "bob", user_key))
        self.assertEqual(await user.next_json(), {"type": "paired", "vm": "vm1"})
        self.assertEqual(await vm.next_json(),
                         {"type": "paired", "user": "bob", "client": "127.0.0.1",
                          "user_key": identity.public_text(user_key)})
        start = self.audit("pair-start")
        self.assertEqual([(r["vm"], r["user"], r["client"]) for r in start],
                         [("vm1", "bob", "127.0.0.1")])
        status = await pf.get_status(reactor, self.proxy.status_port)
        self.assertEqual(status, {"vms": {}, "pairs": 1})

    async def test_relay_text_and_binary_in_order_both_ways(self) -> None:
        await self.start()
        vm, user = await self.pair()
        sent_up = [(f"text {i}".encode(), False) if i % 2 else (os.urandom(i * 100), True)
                   for i in range(40)]
        sent_down = [(os.urandom(70000), True), ("é ünïcode".encode(), False), (b"", True)]
        for payload, binary in sent_up:
            user.sendMessage(payload, binary)
        for payload, binary in sent_down:
            vm.sendMessage(payload, binary)
        got_up = [await vm.next() for _ in sent_up]
        got_down = [await user.next() for _ in sent_down]
        self.assertEqual(got_up, sent_up)
        self.assertEqual(got_down, sent_down)

    async def test_fragmented_message_forwarded_whole(self) -> None:
        await self.start()
        vm, user = await self.pair()
        user.beginMessage(isBinary=True)
        for chunk in (b"abc", b"def", b"ghi"):
            user.sendMessageFrame(chunk)
        user.endMessage()
        self.assertEqual(await vm.next(), (b"abcdefghi", True))

    async def test_close_propagates_code_and_reason(self) -> None:
        await self.start()
        vm, user = await self.pair()
        user.sendMessage(b"last words", True)
        self.assertEqual(await vm.next(), (b"last words", True))
        vm.sendMessage(b"last reply", True)
        vm.sendClose(4400, "channel-error: not-authorized")
        # everything sent before the close arrives before it
        self.assertEqual(await user.next(), (b"last reply", True))
        _, code, reason = await user.closed
        self.assertEqual((code, reason), (4400, "channel-error: not-authorized"))
        await vm.closed
        end = self.audit("pair-end")[0]
        self.assertEqual((end["close_code"], end["close_reason"], end["ended_by"]),
                         (4400, "channel-error: not-authorized", "vm"))
        self.assertEqual((end["bytes_up"], end["bytes_down"]), (10, 10))
        self.assertEqual(end["user"], "alice")
        self.assert_no_secrets()

    async def test_close_normal_from_user(self) -> None:
        await self.start()
        vm, user = await self.pair()
        user.sendClose(1000)
        _, code, _ = await vm.closed
        self.assertEqual(code, 1000)

    async def test_abnormal_close_is_peer_lost(self) -> None:
        await self.start()
        vm, user = await self.pair()
        user.dropConnection(abort=True)
        _, code, reason = await vm.closed
        self.assertEqual(code, 4010)
        assert reason is not None
        self.assertTrue(reason.startswith("peer-lost: "))

    async def test_oversized_message(self) -> None:
        await self.start(max_message_size="64KiB", max_frame_size="64KiB")
        vm, user = await self.pair()
        user.sendMessage(b"x" * (64 * 1024 + 1), True)
        _, code, _ = await user.closed
        self.assertEqual(code, 1009)
        _, code, reason = await vm.closed
        self.assertEqual(code, 1009)
        assert reason is not None
        self.assertTrue(reason.startswith("message-too-big"))
        self.assertEqual(list(vm.inbox), [])  # nothing of it was relayed
        self.assertEqual(self.audit("pair-end")[0]["close_code"], 1009)

    async def test_oversized_fragmented_message(self) -> None:
        await self.start(max_message_size="64KiB", max_frame_size="64KiB")
        vm, user = await self.pair()
        user.beginMessage(isBinary=True)
        for _ in range(5):
            user.sendMessageFrame(b"y" * 20000)
        user.endMessage()
        _, code, _ = await user.closed
        self.assertEqual(code, 1009)
        _, code, _ = await vm.closed
        self.assertEqual(code, 1009)

    async def test_idle_pair_closed(self) -> None:
        await self.start(idle_timeout="300ms")
        vm, user = await self.pair()
        (_, c1, r1), (_, c2, r2) = await defer.gatherResults([vm.closed, user.closed])
        self.assertEqual((c1, c2), (4008, 4008))
        self.assertEqual(r1, "timeout: idle for 0.3s")

    async def test_half_open_leg_closes_partner(self) -> None:
        """A user that stops reading and never answers pings: within
        ping_interval + ping_timeout its VM partner is closed 4010."""
        await self.start(ping_interval="1s", ping_timeout="1s")
        vm, user = await self.pair()
        user.answer_pings = False
        user.transport.pauseProducing()
        _, code, reason = await vm.closed
        self.assertEqual((code, reason), (4010, "peer-lost: no answer to pings"))
        user.transport.resumeProducing()
        await user.closed

    async def test_message_before_pairing_refused(self) -> None:
        await self.start()
        vm = await self.vm("vm1")
        vm.sendMessage(b"early", True)
        _, code, _ = await vm.closed
        self.assertEqual(code, 4000)
        status = await pf.get_status(reactor, self.proxy.status_port)
        self.assertEqual(status["vms"], {})

    async def test_waiting_vm_gone_leaves_pool(self) -> None:
        await self.start(user_wait_timeout="200ms")
        vm = await self.vm("vm1")
        vm.sendClose(1000)
        await vm.closed
        await self.proxy.factory.all_closed()
        self.assertEqual(self.proxy.factory.table.snapshot(), {})
        code, _ = await self._user_refused(self.backend.ticket("vm1"))
        self.assertEqual(code, 4004)


# -- memory held per idle socket (bench/README.md, "idle memory") -----------


def _memory_tls_pair(pem: str) -> tuple[Any, Any]:
    """A server and a client pyOpenSSL Connection on memory BIOs, handshaken
    by shuttling bytes between them in this process."""
    from OpenSSL import SSL
    from twisted.internet import ssl as tssl

    with open(pem) as f:
        server_ctx = tlsmem.lean_server_context(
            tssl.PrivateCertificate.loadPEM(f.read()).options().getContext())
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
    client.set_connect_state()
    _shuttle(server, client, handshake=True)
    return server, client


def _shuttle(server: Any, client: Any, handshake: bool = False) -> None:
    from OpenSSL import SSL

    for _ in range(20):
        moved = False
        for src, dst in ((client, server), (server, client)):
            if handshake:
                try:
                    src.do_handshake()
                except SSL.WantReadError:
                    pass
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            dst.bio_write(data)
            moved = True
        if not moved:
            return
    raise AssertionError("TLS exchange did not settle")


class TlsMemoryTests(SynchronousTestCase):
    """ticrypt.proxy.tlsmem on its own."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        _, self.pem = pf.make_tls(self.dir)

    def test_lean_server_context(self) -> None:
        from OpenSSL import SSL

        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.assertFalse(tlsmem.context_mode(ctx) & SSL.MODE_RELEASE_BUFFERS)
        tlsmem.lean_server_context(ctx)
        self.assertTrue(tlsmem.context_mode(ctx) & SSL.MODE_RELEASE_BUFFERS)
        self.assertTrue(ctx.set_options(0) & SSL.OP_NO_TICKET)
        self.assertEqual(ctx.get_session_cache_mode(), SSL.SESS_CACHE_OFF)

    def test_release_bio_buffers_keeps_the_session(self) -> None:
        server, client = _memory_tls_pair(self.pem)
        old = (server._into_ssl, server._from_ssl)
        self.assertTrue(tlsmem.release_bio_buffers(server))
        self.assertNotIn(server._into_ssl, old)
        self.assertNotIn(server._from_ssl, old)
        # the same TLS session goes on, both ways, over the new BIOs
        client.send(b"up")
        _shuttle(server, client)
        self.assertEqual(server.recv(100), b"up")
        server.send(b"down")
        _shuttle(server, client)
        self.assertEqual(client.recv(100), b"down")

    def test_release_bio_buffers_not_while_data_is_buffered(self) -> None:
        server, client = _memory_tls_pair(self.pem)
        client.send(b"pending")
        server.bio_write(client.bio_read(65536))  # in the BIO, not read yet
        into = server._into_ssl
        self.assertFalse(tlsmem.release_bio_buffers(server))
        self.assertEqual(server._into_ssl, into)
        self.assertEqual(server.recv(100), b"pending")
        server.send(b"reply")  # now in the outgoing BIO, not sent yet
        self.assertFalse(tlsmem.release_bio_buffers(server))
        client.bio_write(server.bio_read(65536))
        self.assertEqual(client.recv(100), b"reply")
        self.assertTrue(tlsmem.release_bio_buffers(server))


class IdleSocketMemoryTests(_ClosesClients, TestCase):
    """The wss listener's TLS settings and what an idle VM leg keeps."""

    async def start(self, tls: bool) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.backend = pf.Backend(self.dir)
        self.ca: str | None = None
        listen = "tcp:0:interface=127.0.0.1"
        if tls:
            self.ca, pem = pf.make_tls(self.dir)
            listen = tlsutil.server_endpoint(0, pem)
        self.proxy = await pf.start_proxy(
            self, pf.write_proxy_config(self.dir, self.backend, listen=listen))
        self.clients: list[pf.WsClient] = []
        self.addCleanup(self._all_closed)

    def waiting_leg(self, vm_id: str) -> Leg:
        legs = list(self.proxy.factory.table._vms[vm_id])
        self.assertEqual(len(legs), 1)
        return legs[0]

    def spy_release(self) -> tuple[list[bool], defer.Deferred[None]]:
        results: list[bool] = []
        called: defer.Deferred[None] = defer.Deferred()

        def spy(conn: Any) -> bool:
            results.append(tlsmem.release_bio_buffers(conn))
            if not called.called:
                called.callback(None)
            return results[-1]

        self.patch(wsmem, "release_bio_buffers", spy)
        return results, called

    async def test_wss_listener_context_is_lean_and_idle_vm_releases_bios(self) -> None:
        from OpenSSL import SSL

        await self.start(tls=True)
        listener = {s.label: s for s in self.proxy.listeners()}["proxy"]
        ctx = listener.endpoint._sslContextFactory.getContext()
        self.assertTrue(tlsmem.context_mode(ctx) & SSL.MODE_RELEASE_BUFFERS)
        self.assertTrue(ctx.set_options(0) & SSL.OP_NO_TICKET)
        self.assertEqual(ctx.get_session_cache_mode(), SSL.SESS_CACHE_OFF)
        results, called = self.spy_release()
        vm = await pf.vm_connect(reactor, self.proxy.port, self.backend, "vm1", ca=self.ca)
        self.clients.append(vm)
        # ran in the reactor turn after the proxy sent "waiting", so before
        # this client could read it
        self.assertTrue(called.called)
        self.assertEqual(results, [True])
        leg = self.waiting_leg("vm1")
        # the context checked above is the one the TLS layer of the socket uses
        self.assertIs(leg.transport.getHandle().get_context(), ctx)  # type: ignore[union-attr]
        # the relay still works both ways over the fresh BIOs
        user = await pf.user_connect(reactor, self.proxy.port, self.backend.ticket("vm1"),
                                     ca=self.ca)
        self.clients.append(user)
        self.assertEqual(await user.next_json(), {"type": "paired", "vm": "vm1"})
        self.assertEqual((await vm.next_json())["type"], "paired")
        user.sendMessage(b"\x00up", True)
        self.assertEqual(await vm.next(), (b"\x00up", True))
        vm.sendMessage(b"down", False)
        self.assertEqual(await user.next(), (b"down", False))

    async def test_plain_leg_release_is_a_no_op(self) -> None:
        await self.start(tls=False)
        results, called = self.spy_release()
        self.clients.append(await pf.vm_connect(reactor, self.proxy.port, self.backend, "vm1"))
        self.assertTrue(called.called)
        self.assertEqual(results, [False])

    async def test_open_leg_drops_handshake_state(self) -> None:
        await self.start(tls=False)
        self.clients.append(await pf.vm_connect(reactor, self.proxy.port, self.backend, "vm1"))
        leg = self.waiting_leg("vm1")
        state = vars(leg)
        for name in ("http_headers", "http_request_data", "http_response_data", "_wskey"):
            self.assertIsNone(state[name], name)
        self.assertEqual(leg.machine.nonce, "")  # type: ignore[union-attr]
        # protocol options are read from the factory, not copied per socket
        settings = self.proxy.factory.settings
        for name, value in (("maxMessagePayloadSize", settings.max_message_size),
                            ("autoPingInterval", settings.ping_interval),
                            ("utf8validateIncoming", True)):
            self.assertNotIn(name, state)
            self.assertEqual(getattr(leg, name), value)
        with self.assertRaises(AttributeError):
            leg.no_such_attribute  # noqa: B018
