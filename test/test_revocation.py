"""Revocation reaches what is already open (DESIGN §3.1.6, PROTOCOL.md §3
"Revocation"): rest's signed feed, the proxy's list and poller, and end to
end with real proxy and vmc daemons (rest in the test's process): disabling
a user or ending a session closes the user's live pairs and kills the VM
processes they started."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import endpoints, reactor, task
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from zope.interface import implementer

from test import proxyfixture as pf
from test.daemon import pid_alive
from test.test_proxy import open_leg, start_pair
from test.vmcfixture import Trio, start_trio
from ticrypt import closecodes, identity, signed
from ticrypt.audit import AuditLog
from ticrypt.encoding import b64, canonical, unb64
from ticrypt.frontend.session import ChannelSession, SessionError, open_session
from ticrypt.proxy import revocations as rv
from ticrypt.proxy.control import LegState
from ticrypt.proxy.pairing import Limits, PairingTable
from ticrypt.proxy.ws import Leg, RelayFactory, Settings

NOW = 1_800_000_000


def sid(n: int) -> str:
    return b64(bytes([n]) * signed.SID_BYTES)


async def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll ``check`` every 50 ms until it returns something true; fail
    naming ``what`` after ``timeout`` seconds (a deadline, not a timing
    assertion)."""
    for _ in range(int(timeout / 0.05)):
        value = check()
        if value:
            return value
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{what}: not within {timeout:g}s")


# ---------------------------------------------------------------- tokens

class FeedTokenTests(SynchronousTestCase):
    """The feed token (purpose revocations-v1) and the ticket's sid."""

    def setUp(self) -> None:
        self.key = identity.generate()
        self.pub = identity.public_bytes(self.key)

    def feed(self, **kw: Any) -> str:
        args: dict[str, Any] = {"serial": 3, "now": NOW, "users": {"bob": NOW - 50},
                                "sessions": [sid(1), sid(2)]}
        args.update(kw)
        return signed.make_revocation_feed(self.key, **args)

    def code(self, token: str, now: float = NOW + 5) -> str:
        e = self.assertRaises(signed.TokenError, signed.verify_revocation_feed, self.pub,
                              token, now=now, max_age=60)
        return e.code

    def raw(self, payload: dict[str, Any], key: Any = None) -> str:
        return signed.make_token(key or self.key, signed.REVOCATIONS, payload)

    def test_round_trip(self) -> None:
        feed = signed.verify_revocation_feed(self.pub, self.feed(), now=NOW + 5, max_age=60)
        self.assertEqual((feed.issued, feed.serial, feed.users, feed.sessions),
                         (NOW, 3, {"bob": NOW - 50}, {sid(1), sid(2)}))

    def test_refusals(self) -> None:
        self.assertEqual(self.code(self.feed(), now=NOW + 61), "stale")
        self.assertEqual(self.code(self.feed(), now=NOW - 31), "bad-token")  # future
        other = signed.make_revocation_feed(identity.generate(), serial=3, now=NOW, users={},
                                            sessions=[])
        self.assertEqual(self.code(other), "bad-signature")
        # a token of another purpose signed by the same key is worthless here
        ticket = signed.make_ticket(self.key, user="bob", user_key=b"\x01" * 32, vm="vm1",
                                    client="127.0.0.1", now=NOW, ttl=60, ticket_id="j",
                                    session=sid(1))
        self.assertEqual(self.code(ticket), "bad-signature")
        good = {"iat": NOW, "serial": 1, "users": {}, "sessions": []}
        for bad in ({**good, "extra": 1}, {k: v for k, v in good.items() if k != "serial"},
                    {**good, "serial": -1}, {**good, "serial": "1"}, {**good, "serial": True},
                    {**good, "users": []}, {**good, "users": {"bob": "x"}},
                    {**good, "users": {"": 1}}, {**good, "sessions": ["short"]},
                    {**good, "sessions": [sid(1), sid(1)]}, {**good, "sessions": {}}):
            self.assertEqual(self.code(self.raw(bad)), "bad-token", bad)
        huge = self.feed(sessions=[b64(os.urandom(signed.SID_BYTES)) for _ in range(300_000)])
        self.assertGreater(len(huge), signed.MAX_FEED)
        self.assertEqual(self.code(huge), "bad-token")

    def test_ticket_carries_its_session(self) -> None:
        def ticket(**kw: Any) -> str:
            args: dict[str, Any] = {"user": "bob", "user_key": b"\x01" * 32, "vm": "vm1",
                                    "client": "127.0.0.1", "now": NOW, "ttl": 60,
                                    "ticket_id": "j", "session": sid(7)}
            args.update(kw)
            return signed.make_ticket(self.key, **args)

        t = signed.verify_ticket(self.pub, ticket(), vm=None, client="127.0.0.1", now=NOW)
        self.assertEqual(t.session, sid(7))
        for bad_sid in ("", "short", sid(7) + "A"):
            e = self.assertRaises(signed.TokenError, signed.verify_ticket, self.pub,
                                  ticket(session=bad_sid), vm=None, client="127.0.0.1",
                                  now=NOW)
            self.assertEqual(e.code, "bad-token")
        # a ticket of an older rest, without sid: refused cleanly
        payload = json.loads(unb64(ticket().split(".")[0]))
        del payload["sid"]
        old = signed.make_token(self.key, signed.TICKET, payload)
        self.assertEqual(canonical(payload), unb64(old.split(".")[0]))
        e = self.assertRaises(signed.TokenError, signed.verify_ticket, self.pub, old,
                              vm=None, client="127.0.0.1", now=NOW)
        self.assertEqual(e.code, "bad-token")


# ---------------------------------------------------------------- the list

def ticket(user: str = "bob", session: str = "", vm: str = "vm1") -> signed.Ticket:
    return signed.Ticket(user=user, user_key=b"\x01" * 32, vm=vm, client="127.0.0.1",
                         issued=NOW, expires=NOW + 60, ticket_id=os.urandom(4).hex(),
                         session=session or sid(9))


class RevocationListTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = identity.generate()
        self.list = rv.RevocationList(identity.public_bytes(self.key), max_age=60)

    def feed(self, serial: int, now: int = NOW, **kw: Any) -> str:
        return signed.make_revocation_feed(self.key, serial=serial, now=now,
                                           users=kw.get("users", {}),
                                           sessions=kw.get("sessions", []))

    def test_reasons(self) -> None:
        self.assertIsNone(self.list.reason(ticket()))  # empty until the first feed
        self.list.update(self.feed(1, users={"bob": NOW}, sessions=[sid(2)]), NOW)
        self.assertEqual(self.list.reason(ticket("bob")), rv.USER_DISABLED)
        self.assertEqual(self.list.reason(ticket("alice", sid(2))), rv.SESSION_ENDED)
        self.assertIsNone(self.list.reason(ticket("alice", sid(3))))
        # a hand-built ticket without a session never matches a session entry
        self.assertIsNone(self.list.reason(signed.Ticket(
            user="alice", user_key=b"", vm="v", client="c", issued=0, expires=1,
            ticket_id="t")))

    def test_old_forged_and_stale_feeds_leave_the_list_in_force(self) -> None:
        self.list.update(self.feed(5, users={"bob": NOW}), NOW)
        for token, now, code in (
                (self.feed(4, now=NOW + 10), NOW + 10, "rolled-back"),
                (self.feed(5, now=NOW - 1), NOW + 10, "replayed"),
                (self.feed(6, now=NOW - 100), NOW, "stale"),
                (signed.make_revocation_feed(identity.generate(), serial=9, now=NOW,
                                             users={}, sessions=[]), NOW, "bad-signature")):
            e = self.assertRaises(signed.TokenError, self.list.update, token, now)
            self.assertEqual(e.code, code)
            self.assertEqual((self.list.serial, self.list.users), (5, {"bob": NOW}))
        # the same serial, issued later: a fresh copy of the same list
        self.list.update(self.feed(5, now=NOW + 2, users={"bob": NOW}), NOW + 2)
        self.list.update(self.feed(6, now=NOW + 4), NOW + 4)  # bob re-enabled
        self.assertIsNone(self.list.reason(ticket("bob")))


# ---------------------------------------------------------------- the factory

def _close_frame(code: int, reason: str) -> bytes:
    body = struct.pack("!H", code) + reason.encode()
    return bytes([0x88, len(body)]) + body


class RevokePairsTests(SynchronousTestCase):
    """RelayFactory.revoke_pairs and the ticket check, on StringTransports."""

    def setUp(self) -> None:
        self.key = identity.generate()
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.audit_path = self.mktemp()
        audit = AuditLog(self.audit_path, self.clock, "proxy")
        self.addCleanup(audit.close)
        self.factory = RelayFactory(reactor=reactor, clock=self.clock,
                                    backend_key=identity.public_bytes(self.key),
                                    table=PairingTable(Limits()), settings=Settings(),
                                    audit=audit)
        self.factory.revocations = rv.RevocationList(identity.public_bytes(self.key), 60)

    def pair(self, t: signed.Ticket) -> tuple[StringTransport, StringTransport]:
        vm, vm_t = open_leg(self, self.factory, "/v1/vm")
        user, user_t = open_leg(self, self.factory)
        start_pair(self.factory, vm, user, t)
        return vm_t, user_t

    def connect(self, user: str, session: str, vm: str = "vm1") -> tuple[Leg, StringTransport]:
        """A user leg that sent ``connect`` with a ticket of ``user`` and ``session``."""
        leg, t = open_leg(self, self.factory, address="127.0.0.1")
        token = signed.make_ticket(self.key, user=user, user_key=b"\x01" * 32, vm=vm,
                                   client="127.0.0.1", now=NOW, ttl=60,
                                   ticket_id=os.urandom(4).hex(), session=session)
        leg.onMessage(json.dumps({"type": "connect", "ticket": token}).encode(), False)
        return leg, t

    def revoke(self, **kw: Any) -> int:
        assert self.factory.revocations is not None
        self.factory.revocations.update(signed.make_revocation_feed(
            self.key, serial=1, now=NOW, users=kw.get("users", {}),
            sessions=kw.get("sessions", [])), NOW)
        return self.factory.revoke_pairs()

    def audit(self) -> list[dict[str, Any]]:
        with open(self.audit_path) as f:
            return [json.loads(line) for line in f]

    def test_disabled_user_loses_every_pair_and_waiting_leg(self) -> None:
        bob_vm, bob_user = self.pair(ticket("bob"))
        bob2_vm, bob2_user = self.pair(ticket("bob", vm="vm2"))
        alice_vm, alice_user = self.pair(ticket("alice"))
        waiting, waiting_t = self.connect("bob", sid(9), vm="vm3")
        self.assertEqual(waiting.phase, LegState.WAITING)
        self.assertEqual(self.factory.table.users_waiting("vm3"), 1)
        self.assertEqual(self.revoke(users={"bob": NOW - 5}), 3)
        frame = _close_frame(closecodes.REVOKED.code, rv.USER_DISABLED)
        for t in (bob_vm, bob_user, bob2_vm, bob2_user, waiting_t):
            self.assertTrue(t.value().endswith(frame), t.value()[-60:])
        for t in (alice_vm, alice_user):
            self.assertNotIn(b"\x88", t.value()[-40:])
        self.assertEqual((len(self.factory.pairs), self.factory.table.pairs,
                          self.factory.table.users_waiting("vm3")), (1, 1, 0))
        events = [(e["event"], e.get("user"), e.get("reason"), e.get("close_code"))
                  for e in self.audit() if e["event"] not in ("pair-start",)]
        self.assertEqual(events, [("user-refused", "bob", rv.USER_DISABLED, None)] + [
            ("pair-revoked", "bob", rv.USER_DISABLED, None),
            ("pair-end", "bob", None, closecodes.REVOKED.code)] * 2)
        self.assertEqual(self.revoke(users={"bob": NOW - 5}), 0)  # nothing left

    def test_ended_session_loses_its_pairs_only(self) -> None:
        ended_vm, ended_user = self.pair(ticket("bob", session=sid(1)))
        kept_vm, kept_user = self.pair(ticket("bob", session=sid(2)))
        self.assertEqual(self.revoke(sessions=[sid(1)]), 1)
        frame = _close_frame(closecodes.REVOKED.code, rv.SESSION_ENDED)
        self.assertTrue(ended_vm.value().endswith(frame))
        self.assertTrue(ended_user.value().endswith(frame))
        self.assertFalse(kept_user.value().endswith(frame))
        self.assertEqual(len(self.factory.pairs), 1)

    def test_tickets_of_revoked_users_and_sessions_are_refused(self) -> None:
        self.revoke(users={"bob": NOW}, sessions=[sid(1)])
        for user, session in (("bob", sid(2)), ("alice", sid(1))):
            leg, t = self.connect(user, session)
            self.assertTrue(t.value().endswith(_close_frame(4003, "ticket-refused: revoked")))
        self.assertEqual(self.factory.table.users_waiting("vm1"), 0)


# ---------------------------------------------------------------- the poller

class FakeFeed(resource.Resource):
    """rest's GET /v1/revocations: answers ``self.answer`` to the right bearer."""

    isLeaf = True

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret
        self.answer: tuple[int, bytes] = (503, b'{"error":{"code":"down","message":""}}')
        self.requests = 0

    def render_GET(self, request: server.Request) -> bytes:
        self.requests += 1
        if request.getHeader("authorization") != "Bearer " + self.secret:
            request.setResponseCode(401)
            return b'{"error":{"code":"invalid-token","message":"x"}}'
        request.setResponseCode(self.answer[0])
        request.setHeader("content-type", "application/json")
        return self.answer[1]


@implementer(ILogObserver)
class Captured:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("ticrypt.proxy.revocations"):
            from twisted.logger import formatEvent
            self.texts.append(formatEvent(event))


class PollerTests(TestCase):
    """An in-process proxy polling a fake rest over real sockets."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.backend = pf.Backend(self.dir)
        secret_path = os.path.join(self.dir, "feed.secret")
        self.secret = "f" * 64
        with open(os.open(secret_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(self.secret + "\n")
        self.feed = FakeFeed(self.secret)
        site = server.Site(self.feed)
        site.noisy = False
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            site)
        self.addCleanup(port.stopListening)
        self.logs = Captured()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)
        config = pf.write_proxy_config(
            self.dir, self.backend, rest_url=f"http://127.0.0.1:{port.getHost().port}",
            feeds={"revocation_feed_secret": secret_path, "revocation_poll_interval": "100ms"})
        self.proxy = await pf.start_proxy(self, config)
        self.addCleanup(lambda: self.proxy.factory.all_closed())
        self.serial = 0

    def publish(self, users: dict[str, int] | None = None,
                sessions: list[str] | None = None, serial: int | None = None,
                key: Any = None) -> int:
        """Make the fake rest answer a new signed feed; returns its serial."""
        self.serial += 1
        serial = self.serial if serial is None else serial
        if key is None:
            token = self.backend.revocations(serial, users, sessions)
        else:  # forged: another key
            token = signed.make_revocation_feed(key, serial=serial, now=reactor.seconds(),
                                               users=users or {}, sessions=sessions or [])
        self.feed.answer = (200, json.dumps({"feed": token}).encode())
        return self.serial

    async def applied(self, serial: int) -> None:
        revocations = self.proxy.factory.revocations
        await wait_for(lambda: revocations.serial == serial, f"feed serial {serial} applied")

    async def paired(self, user: str, session: str) -> tuple[pf.WsClient, pf.WsClient]:
        vm = await pf.vm_connect(reactor, self.proxy.port, self.backend, "vm1")
        u = await pf.user_connect(reactor, self.proxy.port,
                                  self.backend.ticket("vm1", user=user, session=session))
        self.assertEqual((await u.next_json())["type"], "paired")
        self.assertEqual((await vm.next_json())["type"], "paired")
        return vm, u

    async def test_disable_and_logout_close_live_pairs(self) -> None:
        await self.applied(self.publish())
        bob_vm, bob = await self.paired("bob", sid(1))
        ann_vm, ann = await self.paired("ann", sid(2))
        ann2_vm, ann2 = await self.paired("ann", sid(3))
        self.publish(users={"bob": 1})
        for client in (bob, bob_vm):
            self.assertEqual(await client.closed, (True, closecodes.REVOKED.code, rv.USER_DISABLED))
        self.publish(users={"bob": 1}, sessions=[sid(2)])
        for client in (ann, ann_vm):
            self.assertEqual(await client.closed, (True, closecodes.REVOKED.code, rv.SESSION_ENDED))
        # ann's other session is untouched and still relays
        ann2.sendMessage(b"still here", True)
        self.assertEqual(await ann2_vm.next(), (b"still here", True))
        # and a revoked ticket no longer pairs
        u = await pf.user_connect(reactor, self.proxy.port,
                                  self.backend.ticket("vm1", user="bob", session=sid(4)))
        self.assertEqual((await u.closed)[1:], (4003, "ticket-refused: revoked"))
        events = [(e["event"], e.get("user"), e.get("reason"))
                  for e in pf.read_audit(self.dir) if e["event"] == "pair-revoked"]
        self.assertEqual(events, [("pair-revoked", "bob", rv.USER_DISABLED),
                                  ("pair-revoked", "ann", rv.SESSION_ENDED)])
        for c in (ann2, ann2_vm):
            c.sendClose(1000)
            await c.closed

    async def test_outage_keeps_the_last_list_and_logs_once(self) -> None:
        await self.applied(self.publish(users={"bob": 1}))
        requests = self.feed.requests
        self.feed.answer = (503, b'{"error":{"code":"down","message":"x"}}')
        await wait_for(lambda: self.feed.requests >= requests + 5, "polls during the outage")
        # the last good list still refuses bob
        u = await pf.user_connect(reactor, self.proxy.port,
                                  self.backend.ticket("vm1", user="bob"))
        self.assertEqual((await u.closed)[1:], (4003, "ticket-refused: revoked"))
        unavailable = [t for t in self.logs.texts if "unavailable" in t]
        self.assertEqual(len(unavailable), 1, self.logs.texts)
        self.assertIn("HTTP 503 down", unavailable[0])
        self.assertIn("serial 1", unavailable[0])
        self.assertNotIn(self.secret, "".join(self.logs.texts))
        # forged, rolled back: refused like an outage, nothing logged again
        self.publish(users={}, key=identity.generate())
        await wait_for(lambda: self.feed.requests >= requests + 8, "polls of a forged feed")
        self.publish(users={}, serial=0)
        await wait_for(lambda: self.feed.requests >= requests + 11, "polls of an old feed")
        self.assertEqual(self.proxy.factory.revocations.users, {"bob": 1})
        self.assertEqual(len([t for t in self.logs.texts if "unavailable" in t]), 1)
        await self.applied(self.publish(users={}))
        await wait_for(lambda: any("available again" in t for t in self.logs.texts),
                       "the end of the outage logged")
        vm = await pf.vm_connect(reactor, self.proxy.port, self.backend, "vm1")
        u = await pf.user_connect(reactor, self.proxy.port,
                                  self.backend.ticket("vm1", user="bob"))
        self.assertEqual((await u.next_json())["type"], "paired")
        for c in (u, vm):
            c.sendClose(1000)
            await c.closed

    async def test_wrong_secret_is_an_outage(self) -> None:
        self.feed.secret = "g" * 64
        self.publish(users={"bob": 1})
        await wait_for(lambda: any("unavailable" in t for t in self.logs.texts),
                       "the outage logged")
        self.assertIn("invalid-token", "".join(self.logs.texts))
        self.assertEqual(self.proxy.factory.revocations.serial, -1)


# ---------------------------------------------------------------- end to end

async def _long_command(session: ChannelSession) -> int:
    """Start ``sleep 1000`` on the VM; return its pid once it runs."""
    out = bytearray()
    cmd = session.exec(["sh", "-c", "echo $$; exec sleep 1000"], on_stdout=out.extend)
    cmd.done.addErrback(lambda f: f.trap(SessionError))  # ends with the channel
    await wait_for(lambda: b"\n" in out, "the command started")
    pid = int(out.split()[0])
    assert pid_alive(pid)
    return pid


class EndToEndTests(TestCase):
    """Real proxy and vmc daemons and rest in the test's process
    (test/vmcfixture.py): rest serves the feed, the proxy polls it."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.trio: Trio = await start_trio(self)

    async def assert_revoked(self, session: ChannelSession, pid: int, reason: str,
                             closed_before: int) -> None:
        """``session`` was closed for ``reason`` (4011), the proxy audited
        one revoked pair for it, vmc ended its channel (the
        ``closed_before + 1``-th session it closed) and killed ``pid``."""
        trio = self.trio
        ended: list[Any] = []

        def note(result: Any) -> Any:
            ended.append(result)
            return result
        session.closed.addBoth(note)
        await wait_for(lambda: ended, f"the session closed ({reason})")
        err = ended[0]
        assert isinstance(err, SessionError), err
        self.assertEqual(err.code, "revoked", reason)  # 4011, explained (ticrypt.closecodes)
        self.assertIn("access was revoked", str(err))
        self.assertIn(reason.partition(": ")[2], str(err))
        revoked = await wait_for(lambda: [e for e in trio.proxy_audit_lines()
                                          if e["event"] == "pair-revoked"
                                          and e["reason"] == reason],
                                 f"pair-revoked audited ({reason})")
        self.assertEqual([(e["vm"], e["user"], e["reason"]) for e in revoked],
                         [(trio.vm_id, "owen", reason)])
        await wait_for(lambda: not pid_alive(pid), f"the VM process killed ({reason})")
        closed = await wait_for(lambda: [e for e in trio.vmc_audit_lines()
                                         if e["event"] == "session-closed"][closed_before:],
                                f"vmc ended the channel ({reason})")
        self.assertEqual([e["code"] for e in closed], [closecodes.REVOKED.code], reason)

    async def test_logout_then_disable_close_the_open_sessions(self) -> None:
        """A logout closes that login's pairs only (another login of the same
        user goes on); disabling the user then closes that one too.  Each
        time the VM process the session started is killed."""
        trio = self.trio
        client = trio.rest.client()
        await client.login("owen", trio.keys["owen"])
        t = await client.ticket(trio.vm_id)
        session = await open_session(reactor, t["proxy_url"], trio.rest.ca_file, t["ticket"],
                                     trio.keys["owen"], trio.vm_id, t["vm_public_key"])
        other = await trio.session("owen")  # another login of the same user
        pid = await _long_command(session)
        await client.logout()
        await self.assert_revoked(session, pid, rv.SESSION_ENDED, 0)
        out = bytearray()
        self.assertEqual(await other.exec(["echo", "alive"], on_stdout=out.extend).done, 0,
                         "the other login's session ended with the logout")
        self.assertEqual(bytes(out), b"alive\n")

        pid = await _long_command(other)
        code, out_text, err = trio.rest.admin_here("user", "disable", "owen")
        self.assertEqual(code, 0, err)
        await self.assert_revoked(other, pid, rv.USER_DISABLED, 1)
