"""Proxy, vmc and frontend together, in memory (:mod:`test.memtrio`):
authorization, revocation, limits, timeouts, close propagation and what
the proxy sees, with real TLS, websockets and the secure channel on one
clock.  What only a process shows (start-up, signals, child reaping, the
PTY, kill -9, memory bounds) is in test_e2e_vmc and test_proxy_daemon."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from test.memtrio import MemTrio
from test.vmcfixture import ws_payloads
from ticrypt import identity
from ticrypt.channel import MAX_PLAINTEXT
from ticrypt.frontend.errors import RemoteError, SessionError
from ticrypt.vmc.pool import MAX_MESSAGE


def _fails(trio: MemTrio, awaitable: object) -> SessionError:
    """The SessionError that ``awaitable`` ends with."""
    try:
        trio.wait(awaitable)  # type: ignore[arg-type]
    except SessionError as e:
        return e
    raise AssertionError("it did not fail")


class AuthorizationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.trio = MemTrio.build(self)

    def test_owner_session(self) -> None:
        owner = self.trio.session("owen")
        self.assertEqual(owner.vm_key, identity.public_bytes(self.trio.state.vm_key))
        info = self.trio.wait(owner.info())
        self.assertEqual(info["vm"], self.trio.vm_id)
        self.assertTrue(info["owner_user"])
        self.assertEqual(info["tls_fingerprint"], self.trio.state.tls_fingerprint)
        self.assertIsNone(self.trio.wait(owner.close()))
        events = [r["event"] for r in self.trio.vmc_audit()]
        self.assertIn("session-open", events)

    def test_unauthorized_user_refused(self) -> None:
        e = _fails(self.trio, self.trio.connect("bob"))
        self.assertEqual(e.code, "not-authorized")
        self.assertIn("not authorized on this VM", str(e))
        refused = [r for r in self.trio.vmc_audit() if r["event"] == "session-refused"]
        self.assertEqual(refused[-1]["reason"], "not-authorized")
        self.assertEqual(refused[-1]["user_key"],
                         identity.fingerprint(identity.public_bytes(self.trio.keys["bob"])))

    def test_authorize_then_revoke(self) -> None:
        trio = self.trio
        owner = trio.session("owen")
        bob_key = identity.public_bytes(trio.keys["bob"])
        self.assertTrue(trio.wait(owner.authorize(bob_key, "bob"))["added"])
        users = trio.wait(owner.users())
        self.assertEqual([u["name"] for u in users["users"]], ["bob"])

        bob = trio.session("bob")
        self.assertFalse(trio.wait(bob.info())["owner_user"])
        with self.assertRaises(RemoteError) as e:
            trio.wait(bob.users())
        self.assertEqual(e.exception.code, "not-owner")

        trio.wait(owner.revoke("bob"))
        err = trio.wait(bob.closed)  # the revoked user's open session is closed
        assert err is not None
        self.assertEqual(err.code, "not-authorized")
        self.assertEqual(_fails(trio, trio.connect("bob")).code, "not-authorized")
        self.assertTrue(owner.is_open)  # the owner's session goes on
        trio.wait(owner.close())

    def test_wrong_vm_key_refused(self) -> None:
        """The frontend refuses a VM whose key is not the one rest registered."""
        e = _fails(self.trio, self.trio.connect(
            "owen", vm_key=identity.public_bytes(identity.generate())))
        self.assertEqual(e.code, "vm-key-mismatch")


class LimitTests(SynchronousTestCase):
    def test_max_sessions_and_idle_timeout(self) -> None:
        trio = MemTrio.build(self, sessions={"max_sessions": 1},
                             links={"idle_timeout": 2.0})
        first = trio.session("owen")
        self.assertEqual(_fails(trio, trio.connect("owen")).code, "over-limit")
        ended = trio.wait(first.closed)  # nothing happens on it: idle timeout
        assert ended is not None
        self.assertEqual(ended.code, "timeout")
        third = trio.session("owen")  # the slot is free again
        self.assertEqual(trio.wait(third.info())["vm"], trio.vm_id)
        trio.wait(third.close())
        events = [(r["event"], r.get("reason")) for r in trio.vmc_audit()]
        self.assertIn(("session-refused", "over-limit"), events)

    def test_traffic_keeps_a_session_open(self) -> None:
        trio = MemTrio.build(self, links={"idle_timeout": 2.0})
        s = trio.session("owen")
        for _ in range(5):
            trio.advance(1.5)
            trio.wait(s.info())
        self.assertTrue(s.is_open)
        trio.wait(s.close())


class ClosePropagationTests(SynchronousTestCase):
    def test_vmc_stop_reaches_the_user(self) -> None:
        """vmc stopping closes its users' sessions at once, cleanly (1000
        ``going-away``, PROTOCOL.md §1.2), and its requests fail."""
        trio = MemTrio.build(self)
        s = trio.session("owen")
        pending = s.request("info")  # never answered
        trio.pool.stopService()
        self.assertIsNone(trio.wait(s.closed))
        self.assertFalse(s.is_open)
        self.assertEqual(_fails(trio, pending).code, "closed")
        events = [r["event"] for r in trio.vmc_audit()]
        self.assertIn("session-closed", events)

    def test_user_close_ends_the_vmc_session(self) -> None:
        trio = MemTrio.build(self)
        s = trio.session("owen")
        self.assertEqual(len(trio.pool.sessions), 1)
        self.assertIsNone(trio.wait(s.close()))
        self.assertEqual(len(trio.pool.sessions), 0)
        # the pool keeps its sockets waiting for the next user
        self.assertEqual(trio.session("owen").is_open, True)

    def test_lost_vm_connection_is_peer_lost(self) -> None:
        """The VM's connection drops without a close: the user hears 4010."""
        trio = MemTrio.build(self)
        s = trio.session("owen")
        [leg] = trio.pool.sessions
        leg.transport.abortConnection()
        trio.pump()
        err = trio.wait(s.closed)
        assert err is not None
        self.assertEqual(err.code, "peer-lost")


class RecordLimitTests(SynchronousTestCase):
    """A record over the channel's limit reaches the user as 4400
    ``record-too-large`` (PROTOCOL.md §4 Records), never as a dropped
    connection (4010 ``peer-lost``): within vmc's websocket limit the channel
    refuses it, above that limit vmc refuses the message by its size."""

    def test_oversized_records_are_record_too_large(self) -> None:
        trio = MemTrio.build(self)
        for size in (25 + MAX_PLAINTEXT + 1, MAX_MESSAGE + 1):
            session = trio.session("owen")
            leg = session._leg
            leg.maxMessagePayloadSize = 0  # the frontend would not send it otherwise
            # Version 1, sequence number 0, then zeros: refused by its length
            # before any decryption.
            leg.sendMessage(b"\x01" + bytes(size - 1), isBinary=True)
            err = trio.wait(session.closed)
            assert err is not None
            self.assertEqual(err.code, "record-too-large", f"{size} bytes: {err}")
        refused = [r for r in trio.vmc_audit() if r["event"] == "session-error"]
        self.assertEqual([r["reason"] for r in refused], ["record-too-large"] * 2)


class WireTests(SynchronousTestCase):
    def test_proxy_sees_no_plaintext(self) -> None:
        """Everything the proxy relays between user and vmc is ciphertext
        (after the handshake): a unique marker in requests and answers
        appears nowhere in what crossed any of the proxy's connections."""
        trio = MemTrio.build(self, plain=True)
        marker = "MARKER-" + os.urandom(8).hex()
        owner = trio.session("owen")
        bob_key = identity.public_bytes(trio.keys["bob"])
        trio.wait(owner.authorize(bob_key, marker))  # in a request
        users = trio.wait(owner.users())  # ... and in an answer
        self.assertEqual(users["users"][0]["name"], marker)
        trio.wait(owner.close())
        taps = trio.reactor.taps
        self.assertGreaterEqual(len(taps), 3)  # two vmc sockets and the user's
        up: list[bytes] = []
        down: list[bytes] = []
        for to_proxy, from_proxy in taps:
            up += ws_payloads(bytes(to_proxy))
            down += ws_payloads(bytes(from_proxy))
        # the capture works: the control messages are visible in it ...
        self.assertTrue(any(b'"vm-auth"' in p for p in up))
        self.assertTrue(any(b'"paired"' in p for p in down))
        # ... and the secure channel's records were relayed both ways ...
        self.assertTrue(any(p[:1] == b"\x01" and len(p) > 25 for p in up))
        self.assertTrue(any(p[:1] == b"\x01" and len(p) > 25 for p in down))
        # ... but no plaintext of the requests or the answers.
        raw = b"".join(bytes(a) + bytes(b) for a, b in taps)
        self.assertNotIn(marker.encode(), raw + b"".join(up + down))
        self.assertNotIn(b"authorize", raw)
