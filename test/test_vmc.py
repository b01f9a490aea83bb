"""Unit tests of ticrypt-vmc: state files, owner pin, dispatcher,
app codec, pool reconnect schedule, child processes and the sample config."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import signal
import stat
import struct
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from test.daemon import kill_if_alive, pid_gone
from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.backoff import Backoff
from ticrypt.channel import MAX_PLAINTEXT, Delivered, SendMessage, UserChannel, app
from ticrypt.config import load_config
from ticrypt.encoding import b64
from ticrypt.vmc.commands import (
    Cancel,
    Dispatcher,
    Eof,
    Resize,
    Revoked,
    Send,
    StartExec,
    StartShell,
    Stdin,
    Violation,
)
from ticrypt.vmc.control import State as ControlState
from ticrypt.vmc.leg import Phase
from ticrypt.vmc.processes import ProcessGroup, RunAs, SessionChannel, session_pids
from ticrypt.vmc.session import Peer
from ticrypt.vmc.state import Enrollment, OwnerKeyChanged, StateError, VmState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _enrollment(owner_key: bytes, vm: str = "vm-1") -> Enrollment:
    backend = identity.generate()
    return Enrollment(vm_id=vm, owner="alice", owner_public_key=owner_key,
                      proxy_url="wss://127.0.0.1:9443",
                      backend_public_key=identity.public_bytes(backend),
                      vm_credential="cred.sig")


def _audit_lines(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]



class StateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir, mode=0o700)
        self.audit_path = os.path.join(self.dir, "audit.log")
        self.audit = AuditLog(self.audit_path, Clock(), role="vmc")
        self.addCleanup(self.audit.close)

    def state(self) -> VmState:
        return VmState(self.dir, self.audit)

    def test_first_start_creates_keys(self) -> None:
        s = self.state()
        mode = stat.S_IMODE(os.stat(os.path.join(self.dir, "vm.key")).st_mode)
        self.assertEqual(mode, 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, "tls.pem")).st_mode), 0o600)
        self.assertRegex(s.tls_fingerprint, r"^sha256:[0-9a-f]{64}$")
        self.assertIsNone(s.enrollment)
        again = self.state()
        self.assertEqual(identity.public_bytes(again.vm_key), identity.public_bytes(s.vm_key))
        self.assertEqual(again.tls_fingerprint, s.tls_fingerprint)

    def test_enrollment_persists_and_pins_owner(self) -> None:
        owner = identity.public_bytes(identity.generate())
        s = self.state()
        s.accept_enrollment(_enrollment(owner))
        again = self.state()
        assert again.enrollment is not None
        self.assertEqual(again.enrollment.vm_id, "vm-1")
        self.assertEqual(again.owner_key, owner)
        self.assertTrue(again.is_authorized(owner))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dir, "enrollment.json"))
                                      .st_mode), 0o600)

    def test_owner_key_change_refused(self) -> None:
        owner = identity.public_bytes(identity.generate())
        other = identity.public_bytes(identity.generate())
        s = self.state()
        s.accept_enrollment(_enrollment(owner))
        self.assertRaises(OwnerKeyChanged, s.accept_enrollment, _enrollment(other, "vm-2"))
        self.assertEqual(s.owner_key, owner)
        assert s.enrollment is not None
        self.assertEqual(s.enrollment.vm_id, "vm-1")
        self.assertFalse(s.is_authorized(other))
        lines = [r for r in _audit_lines(self.audit_path)
                 if r["event"] == "owner-key-change-refused"]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["pinned"], identity.fingerprint(owner))
        self.assertEqual(lines[0]["offered"], identity.fingerprint(other))
        # the pin survives a restart
        self.assertEqual(self.state().owner_key, owner)

    def test_tampered_enrollment_file_refused(self) -> None:
        owner = identity.public_bytes(identity.generate())
        s = self.state()
        s.accept_enrollment(_enrollment(owner))
        other = identity.public_bytes(identity.generate())
        path = os.path.join(self.dir, "enrollment.json")
        doc = json.load(open(path))
        doc["owner_public_key"] = identity.public_text(other)
        with open(path, "w") as f:
            json.dump(doc, f)
        self.assertRaises(StateError, self.state)
        events = [r["event"] for r in _audit_lines(self.audit_path)]
        self.assertIn("owner-key-change-refused", events)

    def test_owner_pin_survives_lost_enrollment(self) -> None:
        owner = identity.public_bytes(identity.generate())
        s = self.state()
        s.accept_enrollment(_enrollment(owner))
        os.unlink(os.path.join(self.dir, "enrollment.json"))
        again = self.state()
        self.assertIsNone(again.enrollment)
        other = identity.public_bytes(identity.generate())
        self.assertRaises(OwnerKeyChanged, again.accept_enrollment, _enrollment(other))
        again.accept_enrollment(_enrollment(owner, "vm-9"))

    def test_users_persist(self) -> None:
        owner = identity.public_bytes(identity.generate())
        bob = identity.public_bytes(identity.generate())
        s = self.state()
        s.accept_enrollment(_enrollment(owner))
        self.assertTrue(s.authorize(bob, "bob", by=owner))
        self.assertFalse(s.authorize(bob, "bobby", by=owner))
        again = self.state()
        self.assertTrue(again.is_authorized(bob))
        self.assertEqual([u.name for u in again.users()], ["bobby"])
        gone = again.revoke("bobby", by=owner)
        assert gone is not None
        self.assertEqual(gone.key, bob)
        self.assertFalse(self.state().is_authorized(bob))
        self.assertIsNone(again.revoke(bob, by=owner))
        self.assertRaises(ValueError, again.authorize, owner, "me", by=owner)

    def test_failed_write_keeps_old_users(self) -> None:
        owner = identity.public_bytes(identity.generate())
        bob = identity.public_bytes(identity.generate())
        carol = identity.public_bytes(identity.generate())
        s = self.state()
        s.accept_enrollment(_enrollment(owner))
        s.authorize(bob, "bob", by=owner)

        def full_disk(fd: int, data: Any) -> int:
            raise OSError(28, "No space left on device")

        self.patch(os, "write", full_disk)
        self.assertRaises(OSError, s.authorize, carol, "carol", by=owner)
        self.unpatch = None
        self.assertFalse(s.is_authorized(carol))  # memory matches the file
        self.assertTrue(s.is_authorized(bob))
        leftovers = [n for n in os.listdir(self.dir) if n.startswith(".tmp")]
        self.assertEqual(leftovers, [])

    def test_failed_write_leaves_old_file(self) -> None:
        owner = identity.public_bytes(identity.generate())
        bob = identity.public_bytes(identity.generate())
        s = self.state()
        s.accept_enrollment(_enrollment(owner))
        s.authorize(bob, "bob", by=owner)

        def full_disk(fd: int, data: Any) -> int:
            raise OSError(28, "No space left on device")

        self.patch(os, "write", full_disk)
        self.assertRaises(OSError, s.revoke, "bob", by=owner)
        users_doc = json.load(open(os.path.join(self.dir, "users.json")))
        self.assertEqual([u["name"] for u in users_doc["users"]], ["bob"])


class FakeStore:
    def __init__(self, owner: bytes):
        self.owner_key: bytes | None = owner
        self.authorized: dict[bytes, str] = {}

    def is_owner(self, key: bytes) -> bool:
        return key == self.owner_key

    def users(self) -> list[Any]:
        from ticrypt.vmc.state import AuthorizedUser

        return [AuthorizedUser(name=n, key=k) for k, n in self.authorized.items()]

    def authorize(self, key: bytes, name: str, by: bytes) -> bool:
        new = key not in self.authorized
        self.authorized[key] = name
        return new

    def revoke(self, who: str | bytes, by: bytes) -> Any:
        for u in self.users():
            if who in (u.key, u.name):
                del self.authorized[u.key]
                return u
        return None


class DispatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.owner = identity.public_bytes(identity.generate())
        self.bob = identity.public_bytes(identity.generate())
        self.store = FakeStore(self.owner)

    def d(self, key: bytes | None = None, **kw: Any) -> Dispatcher:
        return Dispatcher(self.store, key or self.owner, {"vm": "vm-1", "owner": "alice"}, **kw)

    def error_code(self, actions: list[Any]) -> str:
        self.assertEqual(len(actions), 1)
        assert isinstance(actions[0], Send)
        self.assertEqual(actions[0].header["t"], "error")
        return str(actions[0].header["code"])

    def test_info(self) -> None:
        [a] = self.d().handle({"t": "req", "id": 1, "op": "info"}, b"")
        assert isinstance(a, Send)
        self.assertEqual(a.header["vm"], "vm-1")
        self.assertEqual(a.header["id"], 1)
        self.assertTrue(a.header["owner_user"])

    def test_exec_and_stream(self) -> None:
        d = self.d()
        self.assertEqual(d.handle({"t": "req", "id": 3, "op": "exec", "argv": ["echo", "x"]}, b""),
                         [StartExec(3, ("echo", "x"))])
        self.assertEqual(d.handle({"t": "stdin", "id": 3}, b"abc"), [Stdin(3, b"abc")])
        self.assertEqual(d.handle({"t": "eof", "id": 3}, b""), [Eof(3)])
        self.assertEqual(d.handle({"t": "cancel", "id": 3}, b""), [Cancel(3)])
        self.assertEqual(self.error_code(d.handle({"t": "resize", "id": 3, "rows": 1,
                                                   "cols": 1}, b"")), "bad-request")
        d.finished(3)
        self.assertEqual(d.handle({"t": "stdin", "id": 3}, b"late"), [])
        self.assertEqual(self.error_code(d.handle({"t": "stdin", "id": 99}, b"x")),
                         "no-such-request")

    def test_exec_validation(self) -> None:
        d = self.d()
        for i, argv in enumerate([[], "ls", [1], [""], ["a\x00b"], None]):
            self.assertEqual(self.error_code(
                d.handle({"t": "req", "id": 10 + i, "op": "exec", "argv": argv}, b"")),
                "bad-request")

    def test_exec_argv_not_encodable(self) -> None:
        """JSON can carry lone surrogates; no exec argument can hold one."""
        d = self.d()
        for i, argv in enumerate([["echo", "\ud800"], ["/bin/\udfff"]]):
            self.assertEqual(self.error_code(
                d.handle({"t": "req", "id": 20 + i, "op": "exec", "argv": argv}, b"")),
                "bad-request")
        self.assertEqual(d.running, {})
        # surrogateescape'd bytes (any non-UTF-8 byte in a file name) still pass
        self.assertEqual(d.handle({"t": "req", "id": 30, "op": "exec",
                                   "argv": ["echo", "a\udcff"]}, b""),
                         [StartExec(30, ("echo", "a\udcff"))])

    def test_stdin_window(self) -> None:
        """Each exec/shell request gets its own stdin window; stdin uses it
        up, consumed() gives it back as a window message, and stdin beyond
        it is a violation that ends the channel (not an error reply)."""
        d = self.d(window=10)
        self.assertEqual(d.handle({"t": "req", "id": 1, "op": "exec", "argv": ["cat"]}, b""),
                         [StartExec(1, ("cat",), 10)])
        self.assertEqual(d.handle({"t": "req", "id": 2, "op": "exec", "argv": ["cat"]}, b""),
                         [StartExec(2, ("cat",), 10)])
        self.assertEqual(d.handle({"t": "stdin", "id": 1}, b"123456"), [Stdin(1, b"123456")])
        self.assertEqual(d.handle({"t": "stdin", "id": 1}, b"7890"), [Stdin(1, b"7890")])
        self.assertEqual(d.credit(1), 0)
        self.assertEqual(d.handle({"t": "stdin", "id": 2}, b"x" * 10), [Stdin(2, b"x" * 10)])
        self.assertEqual(d.consumed(1, 6), [Send({"t": "window", "id": 1, "bytes": 6})])
        self.assertEqual(d.credit(1), 6)
        [violation] = d.handle({"t": "stdin", "id": 1}, b"x" * 7)
        assert isinstance(violation, Violation)
        self.assertEqual(violation.code, "window-exceeded")
        self.assertEqual(d.credit(1), 6)  # nothing of the refused message counted
        # cancel and eof need no window
        self.assertEqual(d.handle({"t": "cancel", "id": 2}, b""), [Cancel(2)])
        self.assertEqual(d.handle({"t": "eof", "id": 2}, b""), [Eof(2)])
        d.finished(1)
        self.assertEqual(d.consumed(1, 6), [])  # no window message after exit
        self.assertIsNone(d.credit(1))

    def test_credit_returned_in_quarter_windows(self) -> None:
        """Credit for bytes passed on is sent once a quarter of the window is
        owed (one window message per quarter, not one per write to the
        child); until then the frontend still has the rest of the window."""
        d = self.d(window=100)
        self.assertEqual(d.credit_step, 25)
        d.handle({"t": "req", "id": 1, "op": "exec", "argv": ["cat"]}, b"")
        self.assertEqual(d.handle({"t": "stdin", "id": 1}, b"x" * 100), [Stdin(1, b"x" * 100)])
        self.assertEqual(d.consumed(1, 10), [])
        self.assertEqual(d.consumed(1, 14), [])
        self.assertEqual(d.credit(1), 0)  # what is owed is not usable before it is sent
        [violation] = d.handle({"t": "stdin", "id": 1}, b"x")
        assert isinstance(violation, Violation)
        self.assertEqual(d.consumed(1, 1), [Send({"t": "window", "id": 1, "bytes": 25})])
        self.assertEqual(d.credit(1), 25)
        self.assertEqual(d.consumed(1, 75), [Send({"t": "window", "id": 1, "bytes": 75})])
        self.assertEqual(d.credit(1), 100)
        d.handle({"t": "stdin", "id": 1}, b"x" * 5)
        self.assertEqual(d.consumed(1, 5), [])
        d.finished(1)  # what was owed goes with the request
        self.assertEqual(d.consumed(1, 30), [])

    def test_exec_stdin_after_eof_is_not_counted(self) -> None:
        d = self.d(window=4)
        d.handle({"t": "req", "id": 1, "op": "exec", "argv": ["cat"]}, b"")
        self.assertEqual(d.handle({"t": "eof", "id": 1}, b""), [Eof(1)])
        self.assertEqual(d.handle({"t": "stdin", "id": 1}, b"x" * 100), [])
        self.assertEqual(d.credit(1), 4)

    def test_shell_eof_takes_one_byte(self) -> None:
        """A shell's eof is a ^D written to its terminal: it is input, and
        counts against the window (else eofs could pile up in vmc)."""
        d = self.d(window=3)
        self.assertEqual(d.handle({"t": "req", "id": 1, "op": "shell"}, b""),
                         [StartShell(1, "xterm-256color", 24, 80, 3)])
        self.assertEqual(d.handle({"t": "stdin", "id": 1}, b"ab"), [Stdin(1, b"ab")])
        self.assertEqual(d.handle({"t": "eof", "id": 1}, b""), [Eof(1)])
        [violation] = d.handle({"t": "eof", "id": 1}, b"")
        assert isinstance(violation, Violation)
        self.assertEqual(violation.code, "window-exceeded")
        d.consumed(1, 3)
        self.assertEqual(d.handle({"t": "eof", "id": 1}, b""), [Eof(1)])

    def test_duplicate_id_and_unknown(self) -> None:
        d = self.d()
        d.handle({"t": "req", "id": 1, "op": "info"}, b"")
        self.assertEqual(self.error_code(d.handle({"t": "req", "id": 1, "op": "info"}, b"")),
                         "duplicate-id")
        self.assertEqual(self.error_code(d.handle({"t": "req", "id": 2, "op": "rm"}, b"")),
                         "unknown-op")
        self.assertEqual(self.error_code(d.handle({"t": "zzz", "id": 4}, b"")), "bad-message")
        self.assertEqual(self.error_code(d.handle({"t": "req", "op": "info"}, b"")),
                         "bad-message")

    def test_shell_and_resize(self) -> None:
        d = self.d()
        self.assertEqual(d.handle({"t": "req", "id": 5, "op": "shell", "term": "xterm",
                                   "rows": 40, "cols": 100}, b""),
                         [StartShell(5, "xterm", 40, 100)])
        self.assertEqual(d.handle({"t": "resize", "id": 5, "rows": 50, "cols": 120}, b""),
                         [Resize(5, 50, 120)])
        self.assertEqual(self.error_code(d.handle({"t": "resize", "id": 5, "rows": 0,
                                                   "cols": 120}, b"")), "bad-request")
        self.assertEqual(self.error_code(d.handle({"t": "req", "id": 6, "op": "shell",
                                                   "term": "x; rm"}, b"")), "bad-request")

    def test_process_limit(self) -> None:
        d = self.d(max_processes=1)
        d.handle({"t": "req", "id": 1, "op": "exec", "argv": ["sleep", "9"]}, b"")
        self.assertEqual(self.error_code(
            d.handle({"t": "req", "id": 2, "op": "exec", "argv": ["true"]}, b"")), "over-limit")
        d.finished(1)
        self.assertEqual(d.handle({"t": "req", "id": 3, "op": "exec", "argv": ["true"]}, b""),
                         [StartExec(3, ("true",))])

    def test_management_owner_only(self) -> None:
        d = self.d(self.bob)
        for i, op in enumerate(["users", "authorize", "revoke"]):
            self.assertEqual(self.error_code(d.handle(
                {"t": "req", "id": i, "op": op, "key": identity.public_text(self.bob),
                 "name": "bob"}, b"")), "not-owner")
        self.assertEqual(self.store.authorized, {})

    def test_storage_error_reported(self) -> None:
        def full(*a: Any, **kw: Any) -> bool:
            raise OSError(28, "No space left on device")

        self.store.authorize = full  # type: ignore[method-assign]
        self.assertEqual(self.error_code(self.d().handle(
            {"t": "req", "id": 1, "op": "authorize", "key": identity.public_text(self.bob),
             "name": "bob"}, b"")), "storage-error")

    def test_authorize_users_revoke(self) -> None:
        d = self.d()
        key = identity.public_text(self.bob)
        [a] = d.handle({"t": "req", "id": 1, "op": "authorize", "key": key, "name": "bob"}, b"")
        assert isinstance(a, Send)
        self.assertEqual(a.header, {"t": "ok", "id": 1, "name": "bob", "key": key,
                                    "added": True})
        [u] = d.handle({"t": "req", "id": 2, "op": "users"}, b"")
        assert isinstance(u, Send)
        self.assertEqual(u.header["users"], [{"name": "bob", "key": key}])
        self.assertEqual(u.header["owner"]["key"], identity.public_text(self.owner))
        r = d.handle({"t": "req", "id": 3, "op": "revoke", "name": "bob"}, b"")
        self.assertEqual(r[1], Revoked(self.bob))
        self.assertEqual(self.error_code(d.handle({"t": "req", "id": 4, "op": "revoke",
                                                   "key": key}, b"")), "no-such-user")
        self.assertEqual(self.error_code(d.handle({"t": "req", "id": 5, "op": "authorize",
                                                   "key": "ed25519:nope", "name": "x"}, b"")),
                         "bad-request")


class AppCodecTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        data = app.encode({"t": "stdout", "id": 7}, b"a\nb\x00")
        self.assertEqual(app.decode(data), ({"t": "stdout", "id": 7}, b"a\nb\x00"))
        self.assertEqual(app.decode(app.encode({"t": "eof", "id": 1})), ({"t": "eof", "id": 1},
                                                                          b""))

    def test_rejects(self) -> None:
        for bad in [b"no newline", b"[1]\n", b"{\"id\":1}\n", b"{\"t\":\"x\",\"id\":-1}\n",
                    b"{\"t\":\"x\",\"id\":true}\n", b"nojson\n"]:
            self.assertRaises(app.AppError, app.decode, bad)

    def test_deeply_nested_header_is_bad_message(self) -> None:
        """A header of nested arrays (within MAX_HEADER) overflows json's
        recursion: it must be an ordinary bad-message, not an exception that
        escapes the websocket's onMessage."""
        e = self.assertRaises(app.AppError, app.decode, b"[" * app.MAX_HEADER + b"\n")
        self.assertEqual(e.code, "bad-message")

    def test_window_size(self) -> None:
        self.assertEqual(app.window_size(app.WINDOW), 1048576)  # PROTOCOL.md §5
        for bad in (0, -1, True, 1.5, "9", None, 2**53):
            self.assertIsNone(app.window_size(bad))
        header, _ = app.decode(app.encode({"t": "window", "id": 3, "bytes": 65536}))
        self.assertEqual(app.window_size(header["bytes"]), 65536)

    def test_chunks(self) -> None:
        self.assertEqual(app.chunks(b""), [b""])
        self.assertEqual(app.chunks(b"abcde", 2), [b"ab", b"cd", b"e"])


class _FailingEndpoint:
    def __init__(self, clock: Clock):
        self.clock = clock
        self.attempts: list[float] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.attempts.append(self.clock.seconds())
        return defer.fail(ConnectionRefusedError())


class PoolReconnectTests(SynchronousTestCase):
    """The reconnect schedule when the proxy is unreachable."""

    def make_pool(self, clock: Clock, endpoint: Any, pool_size: int = 1) -> Any:
        from ticrypt.vmc.pool import LinkSettings, PoolSettings, ProxyPool

        d = self.mktemp()
        os.makedirs(d, mode=0o700)
        audit = AuditLog(None, clock)
        state = VmState(d, audit)
        state.accept_enrollment(_enrollment(identity.public_bytes(identity.generate())))
        settings = PoolSettings(proxy_url="wss://127.0.0.1:1", ca_file="/nonexistent",
                                links=LinkSettings(pool_size=pool_size, backoff_initial=1.0,
                                                   backoff_max=8.0))
        return ProxyPool(reactor=clock, clock=clock, random=random.Random(3).random,
                         settings=settings, state=state, audit=audit,
                         run_as=RunAs.lookup(None, "/bin/sh"), endpoint=endpoint)

    def test_backoff_schedule(self) -> None:
        clock = Clock()
        ep = _FailingEndpoint(clock)
        pool = self.make_pool(clock, ep)
        pool.startService()
        for _ in range(8):
            [call] = clock.getDelayedCalls()
            clock.advance(call.getTime() - clock.seconds())
        gaps = [b - a for a, b in zip(ep.attempts, ep.attempts[1:], strict=False)]
        self.assertEqual(len(gaps), 8)
        expected = Backoff(1.0, 8.0, random.Random(3).random)
        for gap in gaps:
            self.assertAlmostEqual(gap, expected.next_delay())
            self.assertLessEqual(gap, 8.0)
        self.assertGreater(gaps[-1], 4.0 - 1e-9)  # reached the cap's range
        pool.stopService()
        n = len(ep.attempts)
        clock.advance(100)
        self.assertEqual(len(ep.attempts), n)  # stopped: no more attempts
        self.flushLoggedErrors()

    def test_pool_size_sockets(self) -> None:
        clock = Clock()
        ep = _FailingEndpoint(clock)
        pool = self.make_pool(clock, ep, pool_size=3)
        pool.startService()
        self.assertEqual(len(ep.attempts), 3)
        pool.stopService()


class ProcessGroupTests(TestCase):
    """Real child processes (exec on pipes, shell on a PTY)."""

    def setUp(self) -> None:
        self.sent: list[tuple[dict[str, Any], bytes]] = []
        self.finished: list[int] = []
        self.consumed: list[tuple[int, int]] = []
        self.exits: dict[int, defer.Deferred[int]] = {}
        self.group = ProcessGroup(reactor, RunAs.lookup(None, "/bin/sh"), self._send,
                                  self.finished.append, self._consumed, kill_grace=5)
        # Cleanups run last first: close, then drop the SIGKILLs still
        # pending for leftovers that are already gone (a clean reactor).
        self.addCleanup(self.group.stop_timers)
        self.addCleanup(self.group.close)

    def _consumed(self, rid: int, n: int) -> None:
        self.consumed.append((rid, n))

    def _send(self, header: dict[str, Any], body: bytes) -> None:
        self.sent.append((header, body))
        if header["t"] in ("exit", "error"):
            d = self.exits.setdefault(header["id"], defer.Deferred())
            d.callback(header.get("status", -1))

    def wait(self, rid: int) -> defer.Deferred[int]:
        return self.exits.setdefault(rid, defer.Deferred())

    def out(self, rid: int, stream: str = "stdout") -> bytes:
        return b"".join(b for h, b in self.sent if h["t"] == stream and h["id"] == rid)

    async def test_exec_echo_stderr_status(self) -> None:
        self.group.start_exec(1, ("sh", "-c", "echo out; echo err >&2; exit 5"))
        self.assertEqual(await self.wait(1), 5)
        self.assertEqual(self.out(1), b"out\n")
        self.assertEqual(self.out(1, "stderr"), b"err\n")
        self.assertEqual(self.finished, [1])

    async def test_exec_stdin(self) -> None:
        self.group.start_exec(2, ("cat",))
        self.group.write_stdin(2, b"hello stdin\n")
        self.group.eof(2)
        self.assertEqual(await self.wait(2), 0)
        self.assertEqual(self.out(2), b"hello stdin\n")

    async def test_run_as_other_user(self) -> None:
        import pwd

        if os.getuid() != 0:
            raise SkipTest("switching users needs root")
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            raise SkipTest("no user nobody") from None
        group = ProcessGroup(reactor, RunAs.lookup("nobody", "/bin/sh"), self._send,
                             self.finished.append, self._consumed)
        self.addCleanup(group.close)
        group.start_exec(8, ("sh", "-c", "id -u; echo $USER"))
        self.assertEqual(await self.wait(8), 0)
        self.assertEqual(self.out(8), f"{nobody.pw_uid}\nnobody\n".encode())

    async def test_not_found(self) -> None:
        self.group.start_exec(3, ("no-such-command-xyz",))
        await self.wait(3)
        self.assertEqual(self.sent[-1][0]["code"], "command-not-found")

    async def test_unencodable_argument_fails_cleanly(self) -> None:
        """An argument exec cannot take is an error reply that ends the
        request, not an exception out of the websocket callback."""
        self.group.start_exec(9, ("/bin/\ud800",))
        self.group.start_exec(10, ("echo", "\ud800"))
        await self.wait(9)
        await self.wait(10)
        codes = {h["id"]: h["code"] for h, _ in self.sent if h["t"] == "error"}
        self.assertEqual(codes, {9: "command-not-found", 10: "spawn-failed"})
        self.assertEqual(sorted(self.finished), [9, 10])
        self.assertEqual(self.group.count, 0)

    async def test_close_kills_children_that_ignore_sigterm(self) -> None:
        group = ProcessGroup(reactor, RunAs.lookup(None, "/bin/sh"), self._send,
                             self.finished.append, self._consumed, kill_grace=0.2)
        group.start_exec(11, ("sh", "-c", "trap '' TERM; sleep 300 & echo $!; wait"))
        while b"\n" not in self.out(11):
            d: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.05, d.callback, None)
            await d
        background = int(self.out(11).split()[0])
        self.addCleanup(kill_if_alive, background)
        empty = group.when_empty()
        self.assertNoResult(empty)
        group.close()
        group.close()  # idempotent
        await empty
        self.assertTrue(await pid_gone(background), "a child that ignores SIGTERM survived close")
        self.assertEqual(self.finished, [])  # closed: nothing more is reported

    async def test_close_kills_jobs_in_their_own_process_groups(self) -> None:
        """A shell's job-control job has a process group of its own and
        ignores SIGTERM: channel close still kills it (it is in the shell's
        session)."""
        import re

        group = ProcessGroup(reactor, RunAs.lookup(None, "/bin/sh"), self._send,
                             self.finished.append, self._consumed, kill_grace=0.2)
        self.addCleanup(group.stop_timers)
        group.start_shell(12, "xterm", 24, 80)
        group.write_stdin(12, b"set -m; (trap '' TERM; sleep 1000) & echo PID=$!\n")
        while not re.search(rb"PID=\d+", self.out(12)):
            d: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.05, d.callback, None)
            await d
        job = int(re.findall(rb"PID=(\d+)", self.out(12))[0])
        self.addCleanup(kill_if_alive, job)
        shell = group._children[12][0].pid
        self.assertNotEqual(os.getpgid(job), shell)  # job control: a group of its own
        self.assertEqual(os.getsid(job), shell)
        empty = group.when_empty()
        group.close()
        await empty.addTimeout(20, reactor)  # the SIGKILLs went out after kill_grace
        self.assertTrue(await pid_gone(job), "a job in its own process group survived close")

    async def test_cancel_kills_group(self) -> None:
        self.group.start_exec(4, ("sh", "-c", "sleep 300 & echo $!; sleep 301; echo never"))
        while b"\n" not in self.out(4):
            d: defer.Deferred[None] = defer.Deferred()
            reactor.callLater(0.05, d.callback, None)
            await d
        background = int(self.out(4).split()[0])
        self.group.cancel(4)
        status = await self.wait(4)
        self.assertEqual(status, 128 + 15)
        self.assertEqual(self.out(4), f"{background}\n".encode())
        # the background sleep got the signal too
        self.assertTrue(await pid_gone(background), "the background child survived cancel")

    async def test_shell_pty(self) -> None:
        self.group.start_shell(5, "xterm", 30, 91)
        self.group.write_stdin(5, b"stty size; echo hi; exit 3\n")
        self.assertEqual(await self.wait(5), 3)
        self.assertEqual(self.sent[0][0], {"t": "ok", "id": 5, "window": app.WINDOW})
        out = self.out(5)
        self.assertIn(b"30 91", out)
        self.assertIn(b"hi", out)

    async def test_shell_resize(self) -> None:
        self.group.start_shell(6, "xterm", 24, 80)
        self.group.resize(6, 50, 132)
        self.group.write_stdin(6, b"stty size; exit 0\n")
        self.assertEqual(await self.wait(6), 0)
        self.assertIn(b"50 132", self.out(6))


class SessionPidsTests(SynchronousTestCase):
    def write_proc(self, entries: dict[str, bytes | None]) -> str:
        root = self.mktemp()
        os.makedirs(root)
        for name, content in entries.items():
            os.makedirs(os.path.join(root, name))
            if content is not None:
                with open(os.path.join(root, name, "stat"), "wb") as f:
                    f.write(content)
        return root

    def test_members_of_a_session(self) -> None:
        root = self.write_proc({
            "100": b"100 (sh) S 1 100 100 34816 100 4194560 0 0\n",
            "101": b"101 (odd) S 7 (name) S 100 101 100 0 -1\n",  # ")" in comm
            "102": b"102 (sleep) Z 100 101 100 0 -1\n",  # zombie: already dead
            "103": b"103 (other) S 1 103 103 0 -1\n",  # another session
            "104": None,  # vanished while listed
            "105": b"garbage",
            "self": b"100 (sh) S 1 100 100\n",
        })
        self.assertEqual(sorted(session_pids(100, root) or []), [100, 101])
        self.assertEqual(session_pids(103, root), [103])
        self.assertEqual(session_pids(999, root), [])

    def test_no_proc(self) -> None:
        self.assertIsNone(session_pids(1, os.path.join(self.mktemp(), "none")))

    def test_real_proc(self) -> None:
        if not os.path.isdir("/proc/self"):
            raise SkipTest("no /proc")
        self.assertIn(os.getpid(), session_pids(os.getsid(0)) or [])


class _FakeProcessTransport:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.producer: Any = None
        # Above Linux's PID_MAX_LIMIT: no signal sent to it can hit a process.
        self.pid = 2**22 + 1

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def write(self, data: bytes) -> None:
        self.calls.append(f"write {len(data)}")

    def closeStdin(self) -> None:
        self.calls.append("closeStdin")

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")


@implementer(IReactorProcess)
class _FakeProcessReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], _FakeProcessTransport]] = []

    def spawnProcess(self, proto: Any, executable: Any, args: Any,  # type: ignore[override]
                     *a: Any, **kw: Any) -> Any:
        t = _FakeProcessTransport()
        for fd in (kw.get("usePTY") or ())[:2]:
            os.close(fd)
        self.spawned.append((proto, args, t))
        proto.makeConnection(t)
        return t


class FlowControlTests(SynchronousTestCase):
    """Producer wiring: a full websocket pauses the children; a child that
    does not read its stdin fills only its own (window-bounded) buffer."""

    def setUp(self) -> None:
        self.reactor = _FakeProcessReactor()
        self.sent: list[dict[str, Any]] = []
        self.consumed: list[tuple[int, int]] = []
        self.group = ProcessGroup(self.reactor, RunAs.lookup(None, "/bin/sh"),
                                  lambda h, b: self.sent.append(h), lambda rid: None,
                                  lambda rid, n: self.consumed.append((rid, n)))

    def test_output_pause_reaches_children(self) -> None:
        self.group.start_exec(1, ("sh", "-c", "true"))
        [(_, args, t)] = self.reactor.spawned
        self.group.pauseProducing()
        self.group.resumeProducing()
        self.assertEqual(t.calls, ["pause", "resume"])
        self.group.pauseProducing()
        self.group.start_exec(2, ("sh", "-c", "true"))
        self.assertEqual(self.reactor.spawned[1][2].calls, ["pause"])  # born paused

    def test_ok_announces_window(self) -> None:
        self.group.start_exec(1, ("cat",), 1234)
        self.group.start_exec(2, ("no-such-command-xyz",), 1234)
        self.assertEqual(self.sent[0], {"t": "ok", "id": 1, "window": 1234})
        self.assertEqual([h["t"] for h in self.sent], ["ok", "error"])  # no ok if not started

    def test_stdin_buffered_while_child_does_not_read(self) -> None:
        """A child whose pipe is full pauses only its own input: vmc keeps
        the bytes (the window bounds them) and returns credit as the child
        takes them, per request."""
        self.group.start_exec(1, ("cat",))
        self.group.start_exec(2, ("cat",))
        t1 = self.reactor.spawned[0][2]
        t2 = self.reactor.spawned[1][2]
        self.group.write_stdin(1, b"a" * 10)
        self.assertEqual((t1.calls, self.consumed), (["write 10"], [(1, 10)]))
        t1.producer.pauseProducing()  # the child's pipe is full
        self.group.write_stdin(1, b"b" * 20)
        self.group.write_stdin(1, b"c" * 30)
        self.group.eof(1)
        self.assertEqual((t1.calls, self.consumed), (["write 10"], [(1, 10)]))
        self.assertEqual(self.group.buffered(1), 50)
        self.group.write_stdin(2, b"d" * 5)  # the other child is not held up
        self.assertEqual((t2.calls, self.consumed[-1]), (["write 5"], (2, 5)))
        t1.producer.resumeProducing()  # it read: the rest goes on, then eof
        self.assertEqual(t1.calls, ["write 10", "write 20", "write 30", "closeStdin"])
        self.assertEqual(self.consumed[-1], (1, 50))
        self.assertEqual(self.group.buffered(1), 0)

    def test_child_closing_stdin_returns_credit(self) -> None:
        self.group.start_exec(1, ("cat",))
        t = self.reactor.spawned[0][2]
        t.producer.pauseProducing()
        self.group.write_stdin(1, b"x" * 100)
        producer = t.producer
        producer.stopProducing()  # the child closed its stdin: never writable
        self.assertEqual(self.consumed, [(1, 100)])
        self.group.write_stdin(1, b"y" * 7)  # dropped at once, credit back
        self.assertEqual(self.consumed, [(1, 100), (1, 7)])
        self.assertEqual(t.calls, [])

    def test_shell_eof_is_in_order(self) -> None:
        self.group.start_shell(1, "xterm", 24, 80)
        [(_, _, t)] = self.reactor.spawned
        t.producer.pauseProducing()
        self.group.write_stdin(1, b"echo hi\n")
        self.group.eof(1)
        t.producer.resumeProducing()
        self.assertEqual(t.calls, ["write 8", "write 1"])
        self.assertEqual(self.consumed, [(1, 9)])

    def test_stdin_after_eof_is_dropped(self) -> None:
        """After eof the child's stdin has no producer any more: input that
        still arrives would pile up in vmc's memory if a child that does not
        read were sent more.  It is dropped."""
        self.group.start_exec(1, ("sleep", "300"))
        t = self.reactor.spawned[0][2]
        self.group.write_stdin(1, b"x" * 10)
        self.group.eof(1)
        self.group.eof(1)
        for _ in range(3):
            self.group.write_stdin(1, b"y" * 65536)
        self.assertEqual(t.calls, ["write 10", "closeStdin"])

    def test_exec_runs_in_own_process_group(self) -> None:
        self.group.start_exec(1, ("echo", "x"))
        args = self.reactor.spawned[0][1]
        self.assertTrue(args[0].endswith("setsid"))
        self.assertTrue(args[1].endswith("/echo"))
        self.assertEqual(args[2:], ["x"])


class SampleConfigTests(SynchronousTestCase):
    def test_sample_loads(self) -> None:
        from ticrypt.vmc.config import VmcConfig

        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        shutil.copy(os.path.join(ROOT, "etc", "vmc.ini"), d)
        with open(os.path.join(d, "ca.pem"), "w") as f:
            f.write("x")
        cfg = load_config(os.path.join(d, "vmc.ini"), VmcConfig)
        self.assertEqual(cfg.vmc.links.pool_size, 2)
        self.assertEqual(cfg.exec.shell, "/bin/sh")
        self.assertTrue(os.path.isdir(os.path.join(d, "vmc-state")))

    def minimal_config(self, more: str = "") -> str:
        """A vmc.ini with only the required keys (and ``more`` lines)."""
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        with open(os.path.join(d, "ca.pem"), "w") as f:
            f.write("x")
        with open(os.path.join(d, "vmc.ini"), "w") as f:
            f.write("[vmc]\nrest_url = https://127.0.0.1:1\nca_file = ca.pem\n"
                    "state_dir = s\naudit_log = a.log\n" + more)
        return os.path.join(d, "vmc.ini")

    def test_one_default_per_setting(self) -> None:
        """A config that leaves every pool setting out gets the pool's own
        defaults: [vmc] and [exec] hold the pool's settings classes."""
        from ticrypt.vmc.config import VmcConfig
        from ticrypt.vmc.pool import PoolSettings
        from ticrypt.vmc.service import pool_settings

        cfg = load_config(self.minimal_config(), VmcConfig)
        defaults = PoolSettings(proxy_url="wss://p.example", ca_file=cfg.vmc.ca_file)
        self.assertEqual(pool_settings(cfg, "wss://p.example"), defaults)

    def test_bad_backoff_named(self) -> None:
        from ticrypt.config import ConfigError
        from ticrypt.vmc.config import VmcConfig

        path = self.minimal_config("backoff_initial = 9s\nbackoff_max = 2s\n")
        e = self.assertRaises(ConfigError, load_config, path, VmcConfig)
        self.assertIn("[vmc] backoff_initial", str(e))

    def test_plain_ws_proxy_url_refused(self) -> None:
        """The VM credential crosses to the proxy: never over plain ws://."""
        from ticrypt.config import ConfigError
        from ticrypt.vmc.config import VmcConfig

        path = self.minimal_config("proxy_url = ws://127.0.0.1:1\n")
        e = self.assertRaises(ConfigError, load_config, path, VmcConfig)
        self.assertIn("[vmc] proxy_url", str(e))
        self.assertIn("wss://", str(e))


def _server_frame(opcode: int, payload: bytes, length: int | None = None,
                  fin: bool = True) -> bytes:
    """An unmasked frame from the proxy to vmc; ``length`` may announce more
    bytes than ``payload`` holds (the rest follows later, or never)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack("!H", n)
    else:
        head += bytes([127]) + struct.pack("!Q", n)
    return head + payload


def _client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """``(opcode, payload)`` of the whole masked frames vmc wrote."""
    out, i = [], 0
    while i + 2 <= len(data):
        opcode, n, j = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
        if n == 126:
            n, j = struct.unpack("!H", data[j:j + 2])[0], j + 2
        elif n == 127:
            n, j = struct.unpack("!Q", data[j:j + 8])[0], j + 8
        mask, j = data[j:j + 4], j + 4
        masked = data[j:j + n]
        key = (mask * (n // 4 + 1))[:n]
        out.append((opcode, (int.from_bytes(masked, "big") ^ int.from_bytes(key, "big"))
                    .to_bytes(n, "big")))
        i = j + n
    return out


class _Wire:
    """One :class:`VmLeg` of ``pool`` on a ``StringTransport``, through
    autobahn's own handshake and frame parser, and a user's end of its
    secure channel."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.leg = pool.slots[0].factory.buildProtocol(None)
        self.transport = StringTransport()
        self.leg.makeConnection(self.transport)
        request = self.transport.value().decode("latin-1")
        self.transport.clear()
        key = re.search(r"Sec-WebSocket-Key: (\S+)", request)
        assert key is not None
        accept = base64.b64encode(hashlib.sha1(
            (key.group(1) + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.leg.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                              + b"\r\n\r\n")
        self.user: UserChannel | None = None

    def sent(self) -> list[tuple[int, bytes]]:
        frames = _client_frames(self.transport.value())
        self.transport.clear()
        return frames

    def control(self, msg: dict[str, Any]) -> None:
        self.leg.dataReceived(_server_frame(1, json.dumps(msg).encode()))

    def pair(self, user: str = "owen") -> None:
        self.control({"type": "challenge", "nonce": b64(bytes(32))})
        self.control({"type": "waiting"})
        self.control({"type": "paired", "user": user, "client": "127.0.0.1"})
        self.sent()

    def establish(self, key: Any, user: str = "owen") -> UserChannel:
        self.pair(user)
        self.user = UserChannel(key, self.pool.vm_id,
                                identity.public_bytes(self.pool.state.vm_key))
        [hello] = self.user.start()
        assert isinstance(hello.data, str)
        self.leg.dataReceived(_server_frame(1, hello.data.encode()))
        [(opcode, reply)] = self.sent()
        finish, _ = self.user.receive(reply.decode())
        assert isinstance(finish, SendMessage) and isinstance(finish.data, str)
        self.leg.dataReceived(_server_frame(1, finish.data.encode()))
        return self.user

    def send_app(self, header: dict[str, Any], body: bytes = b"") -> None:
        assert self.user is not None
        self.leg.dataReceived(_server_frame(2, self.user.seal(app.encode(header, body))))

    def answers(self) -> list[dict[str, Any]]:
        """The application messages vmc sent since the last look."""
        assert self.user is not None
        out = []
        for opcode, payload in self.sent():
            if opcode == 2:
                [delivered] = self.user.receive(payload)
                assert isinstance(delivered, Delivered)
                out.append(app.decode(delivered.plaintext)[0])
        return out

    def close_frame(self) -> tuple[int, str] | None:
        frames = [p for opcode, p in _client_frames(self.transport.value()) if opcode == 8]
        if not frames:
            return None
        return struct.unpack("!H", frames[0][:2])[0], frames[0][2:].decode()


def _leg_pool(test: SynchronousTestCase, tracker: Any = None) -> Any:
    """A pool whose legs run in memory (``_Wire``) on a fake process reactor;
    its audit lines go to ``pool.audit_lines``."""
    from ticrypt.vmc.pool import PoolSettings, ProxyPool

    clock = _FakeProcessReactor()
    d = test.mktemp()
    os.makedirs(d, mode=0o700)
    state = VmState(d, AuditLog(None, clock))
    owner = identity.generate()
    state.accept_enrollment(_enrollment(identity.public_bytes(owner)))
    pool = ProxyPool(reactor=clock, clock=clock, random=random.Random(3).random,
                     settings=PoolSettings(proxy_url="wss://127.0.0.1:1",
                                           ca_file="/nonexistent"),
                     state=state, audit=AuditLog(None, clock),
                     run_as=RunAs.lookup(None, "/bin/sh"), endpoint=_FailingEndpoint(clock),
                     tracker=tracker)
    pool.owner = owner
    pool.audit_lines = []
    pool.audit = type("A", (), {"write": lambda _, e, **kw: pool.audit_lines.append((e, kw))})()
    # autobahn's own timers run on the global reactor: none in memory.
    pool.slots[0].factory.setProtocolOptions(openHandshakeTimeout=0, autoPingInterval=0,
                                             autoPingTimeout=0, closeHandshakeTimeout=0)
    return pool


class LegTests(SynchronousTestCase):
    """A leg and its session, in memory."""

    def test_revoke_signals_children_at_once(self) -> None:
        """A revoked user's running commands are signalled when the owner
        revokes, not when (or if) the far end completes the close handshake;
        other users' sessions go on."""
        signals: list[tuple[int | None, int]] = []

        class Track(SessionChannel):
            def signal(self, rid: int | None, sig: int) -> None:
                signals.append((rid, sig))

        pool = _leg_pool(self, tracker=type("T", (), {"channel": lambda _: Track()})())
        bob, carol = identity.generate(), identity.generate()
        for name, key in (("bob", bob), ("carol", carol)):
            pool.state.authorize(identity.public_bytes(key), name, pool.state.owner_key)
        wires = {}
        for name, key in (("bob", bob), ("carol", carol)):
            wires[name] = w = _Wire(pool)
            w.establish(key, name)
            w.send_app({"t": "req", "id": 1, "op": "exec", "argv": ["cat"]})
            self.assertEqual(w.answers(), [{"t": "ok", "id": 1, "window": app.WINDOW}])
        pool.revoked(identity.public_bytes(bob))
        self.assertEqual(wires["bob"].close_frame(), (4401, "not-authorized: access revoked"))
        self.assertEqual(signals, [(None, signal.SIGTERM)])  # bob's one channel, now
        self.assertIsNone(wires["carol"].close_frame())

    def test_stop_during_the_opening_handshake(self) -> None:
        """vmc stopping while a socket still waits for the proxy's upgrade
        answer drops that socket (there is no websocket to close yet)
        instead of raising out of stopService."""
        pool = _leg_pool(self)
        leg = pool.slots[0].factory.buildProtocol(None)
        transport = StringTransport()
        leg.makeConnection(transport)
        self.assertIn(b"Upgrade", transport.value())
        done = leg.stop()
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(self.successResultOf(done))

    def test_stdin_never_pauses_the_channel(self) -> None:
        """A child that does not read its stdin does not stop vmc reading the
        websocket: other requests are still answered, window credit comes
        back as the child reads, and input beyond the window closes the
        channel with window-exceeded."""
        pool = _leg_pool(self)
        w = _Wire(pool)
        w.establish(pool.owner)
        w.send_app({"t": "req", "id": 1, "op": "exec", "argv": ["cat"]})
        self.assertEqual(w.answers(), [{"t": "ok", "id": 1, "window": app.WINDOW}])
        [(_, _, child)] = pool.reactor.spawned
        child.producer.pauseProducing()  # the child stops reading
        for _ in range(app.WINDOW // app.CHUNK):
            w.send_app({"t": "stdin", "id": 1}, b"x" * app.CHUNK)
        self.assertEqual(w.transport.producerState, "producing")  # still reading
        w.send_app({"t": "req", "id": 2, "op": "info"})
        self.assertEqual(w.answers()[-1]["t"], "ok")
        child.producer.resumeProducing()  # it reads: credit for all of it
        self.assertEqual(w.answers(), [{"t": "window", "id": 1, "bytes": app.WINDOW}])
        child.producer.pauseProducing()
        for _ in range(app.WINDOW // app.MAX_BODY):  # the whole window again
            w.send_app({"t": "stdin", "id": 1}, b"y" * app.MAX_BODY)
        self.assertIsNone(w.close_frame())
        w.send_app({"t": "stdin", "id": 1}, b"z")  # one byte over the window
        frame = w.close_frame()
        assert frame is not None
        self.assertEqual(frame[0], 4400)
        self.assertTrue(frame[1].startswith("window-exceeded: "), frame[1])
        event, fields = pool.audit_lines[-1]
        self.assertEqual((event, fields["reason"]), ("session-error", "window-exceeded"))
        self.assertEqual(w.transport.producerState, "producing")
        self.assertEqual(child.calls.count(f"write {app.CHUNK}"), app.WINDOW // app.CHUNK)

    def test_session_audit_lines(self) -> None:
        """session-open, exec and session-closed name the VM, the user, the
        key's fingerprint and the client."""
        pool = _leg_pool(self)
        w = _Wire(pool)
        w.establish(pool.owner)
        w.send_app({"t": "req", "id": 1, "op": "exec", "argv": ["cat", "-u"]})
        w.leg.onClose(True, 1000, "bye")
        fp = identity.fingerprint(identity.public_bytes(pool.owner))
        who = {"vm": pool.vm_id, "user": "owen", "user_key": fp}
        self.assertEqual(pool.audit_lines, [
            ("session-open", {**who, "client": "127.0.0.1", "owner": True, "result": "ok"}),
            ("exec", {**who, "command": "cat", "result": "started"}),
            ("session-closed", {**who, "client": "127.0.0.1", "code": 1000,
                                "result": "closed"})])
        self.assertEqual(pool.sessions, set())


    def test_pending_handshakes_count_against_the_user(self) -> None:
        """A channel counts against ``max_sessions_per_user`` from pairing,
        before its secure handshake: a user who is not authorized on the VM
        and never completes a handshake holds at most that many sessions;
        the next is refused 4009 (audited) and other users still get in."""
        pool = _leg_pool(self)
        limit = pool.settings.sessions.max_sessions_per_user

        def paired(user: str) -> _Wire:
            w = _Wire(pool)
            w.control({"type": "challenge", "nonce": b64(bytes(32))})
            w.control({"type": "waiting"})
            w.control({"type": "paired", "user": user, "client": "127.0.0.1"})
            return w

        held = [paired("mallory") for _ in range(limit)]  # no ClientHello ever
        self.assertEqual([w.close_frame() for w in held], [None] * limit)
        over = paired("mallory")
        self.assertEqual(over.close_frame(),
                         (4009, "over-limit: too many sessions for this user"))
        event, fields = pool.audit_lines[-1]
        self.assertEqual((event, fields["user"], fields["limit"]),
                         ("session-refused", "mallory", "max_sessions_per_user"))
        w = _Wire(pool)
        w.establish(pool.owner)  # another user is not held up
        w.send_app({"t": "req", "id": 1, "op": "info"})
        self.assertEqual(w.answers()[-1]["t"], "ok")
        held[0].leg.onClose(True, 1000, "bye")  # a pending one ends: its slot is free
        self.assertIsNone(paired("mallory").close_frame())


class MessageLimitTests(SynchronousTestCase):
    """vmc's websocket message limit (PROTOCOL.md §4 Records), through
    autobahn's own frame parser, in memory: every record a user may send
    fits, a record over the channel's limit is closed 4400 record-too-large
    by the channel, and a message over ``max_message`` gets the same close
    as soon as its frame header arrives (autobahn's 1009 used to reach the
    user as 4010 peer-lost), without vmc reading it."""

    def setUp(self) -> None:
        self.pool = _leg_pool(self)
        self.owner = self.pool.owner
        self.audit = self.pool.audit_lines
        self.wire = _Wire(self.pool)
        self.leg, self.transport = self.wire.leg, self.wire.transport
        self.assertIs(self.leg.control.state, ControlState.CHALLENGE)

    def sent(self) -> list[tuple[int, bytes]]:
        return self.wire.sent()

    def pair(self) -> None:
        self.wire.pair()
        self.assertIs(self.leg.phase, Phase.HANDSHAKE)

    def establish(self) -> UserChannel:
        user = self.wire.establish(self.owner)
        self.assertIs(self.leg.phase, Phase.ESTABLISHED)
        return user

    def assert_closed(self, code: int, reason: str) -> None:
        [(opcode, payload)] = self.sent()
        self.assertEqual(opcode, 8)
        self.assertEqual((struct.unpack("!H", payload[:2])[0], payload[2:].decode()),
                         (code, reason))

    def test_limit_is_above_the_largest_record(self) -> None:
        """One value for the default, above 25 + 1 MiB; a config below it is refused."""
        from ticrypt.config import schema_of
        from ticrypt.vmc.config import VmcConfig
        from ticrypt.vmc.pool import MAX_MESSAGE, MAX_RECORD, LinkSettings

        self.assertEqual(MAX_RECORD, 25 + MAX_PLAINTEXT)
        self.assertGreater(MAX_MESSAGE, MAX_RECORD)
        self.assertEqual(LinkSettings().max_message, MAX_MESSAGE)
        key = schema_of(VmcConfig).sections["vmc"]["max_message"]
        self.assertEqual(key.default, MAX_MESSAGE)
        self.assertEqual(key.kind.min, MAX_RECORD + 1)  # type: ignore[attr-defined]

    def test_largest_record_is_read(self) -> None:
        """A record with 1 MiB of plaintext goes through and is answered."""
        user = self.establish()
        head = app.encode({"t": "req", "id": 1, "op": "info"})
        record = user.seal(head + b"x" * (MAX_PLAINTEXT - len(head)))
        self.assertEqual(len(record), 25 + MAX_PLAINTEXT)
        self.leg.dataReceived(_server_frame(2, record))
        [(opcode, answer)] = self.sent()
        self.assertEqual(opcode, 2)
        [delivered] = user.receive(answer)
        assert isinstance(delivered, Delivered)
        header, _ = app.decode(delivered.plaintext)
        self.assertEqual((header["t"], header["id"]), ("ok", 1))

    def test_record_over_the_channel_limit(self) -> None:
        """One byte over the largest record: the channel's record-too-large."""
        self.establish()
        self.leg.dataReceived(_server_frame(2, b"\x01" + bytes(25 + MAX_PLAINTEXT)))
        self.assert_closed(4400, "record-too-large")
        self.assertEqual(self.audit[-1][0], "session-error")
        self.assertEqual(self.audit[-1][1]["reason"], "record-too-large")

    def test_message_over_max_message_is_not_read(self) -> None:
        """Refused by the announced length, before the payload arrives; what
        follows is dropped, not kept."""
        self.establish()
        limit = self.pool.settings.links.max_message
        self.leg.dataReceived(_server_frame(2, b"\x01" + bytes(999), length=limit + 1))
        self.assert_closed(4400, "record-too-large")
        self.assertEqual(self.audit[-1][1]["reason"], "record-too-large")
        for _ in range(limit // 65536 + 1):
            self.leg.dataReceived(bytes(65536))
        # (autobahn's buffer of the message being received stays empty)
        self.assertEqual(sum(map(len, self.leg.frame_data or [])), 0)
        self.assertEqual(self.sent(), [])

    def test_fragments_count_together(self) -> None:
        """The limit is on the message: fragments under it add up."""
        self.establish()
        limit = self.pool.settings.links.max_message
        self.leg.dataReceived(_server_frame(2, bytes(limit // 2 + 1), fin=False))
        self.assertEqual(self.sent(), [])
        self.leg.dataReceived(_server_frame(0, b"", length=limit // 2 + 1))
        self.assert_closed(4400, "record-too-large")

    def test_codes_by_state(self) -> None:
        """Judged by size alone, as the channel would judge that message."""
        limit = self.pool.settings.links.max_message
        self.leg.dataReceived(_server_frame(1, b"", length=limit + 1))
        self.assert_closed(4000, f"bad-message: message over {limit} bytes")
        for binary, established, code in ((True, False, "unexpected-message"),
                                          (False, False, "bad-message"),
                                          (False, True, "plaintext-after-handshake")):
            self.setUp()
            self.establish() if established else self.pair()
            self.leg.dataReceived(_server_frame(2 if binary else 1, b"", length=limit + 1))
            self.assert_closed(4400, code)


class FramingTests(SynchronousTestCase):
    """PROTOCOL.md §5 Framing as vmc reads it: one record's plaintext in,
    vmc's answers out (through VmSession.received, as after a record)."""

    def setUp(self) -> None:
        pool = _leg_pool(self)
        self.fake = pool.reactor
        self.app: list[tuple[dict[str, Any], bytes]] = []
        self.closes: list[tuple[int, str]] = []
        peer = Peer(pool.vm_id, "owen", "127.0.0.1", identity.public_bytes(pool.owner))
        self.session = pool.open_session(peer, lambda h, b: self.app.append((h, b)),
                                         lambda code, reason: self.closes.append((code, reason)))

    def answers(self, plaintext: bytes) -> list[dict[str, Any]]:
        self.app.clear()
        self.session.received(plaintext)
        self.assertEqual(self.closes, [])  # the channel stays up
        return [header for header, _ in self.app]

    def assert_unreadable(self, plaintext: bytes) -> None:
        [answer] = self.answers(plaintext)
        self.assertEqual((answer["t"], answer["code"]), ("error", "bad-message"), plaintext)
        self.assertNotIn("id", answer)

    def test_no_newline_is_unreadable(self) -> None:
        """The header ends at the first newline; without one (the empty
        plaintext included) the message is unreadable: an error without id."""
        self.assert_unreadable(b"")
        self.assert_unreadable(b'{"t":"req","id":1,"op":"info"}')
        [ok] = self.answers(b'{"t":"req","id":1,"op":"info"}\n')
        self.assertEqual((ok["t"], ok["id"]), ("ok", 1))

    def test_unreadable_headers(self) -> None:
        for header in (b"", b"[1]", b"null", b'"t"', b'{"id":1}', b'{"t":1,"id":1}',
                       b'{"t":"req","id":-1,"op":"info"}', b'{"t":"req","id":true,"op":"info"}',
                       b'{"t":"req","id":1.0,"op":"info"}', b'{"t":"req","id":"1","op":"info"}',
                       b'{"t":"req","id":9007199254740992,"op":"info"}',
                       b'{"t":"req","id":1,"x":NaN}', b"{", b"\xff",
                       b"[" * 40 + b"]" * 40):
            self.assert_unreadable(header + b"\n")

    def test_header_limit_is_16384_bytes(self) -> None:
        base = b'{"t":"req","id":1,"op":"info","pad":""}'
        fill = app.MAX_HEADER - len(base)
        [ok] = self.answers(base[:-2] + b"p" * fill + b'"}\n')
        self.assertEqual(ok["t"], "ok")
        self.assert_unreadable(base[:-2] + b"p" * (fill + 1) + b'"}\n')

    def test_any_key_order_spacing_and_unknown_keys(self) -> None:
        """Not canonical JSON: any key order and JSON whitespace (a newline
        ends the header), UTF-8; keys vmc does not know are ignored."""
        for rid, header in enumerate([
                b'{"op":"info","id":1,"t":"req"}',
                b' {\t"t" : "req" ,\r "id" : 2, "op": "info"} \r',
                b'{"t":"req","id":3,"op":"info","future":{"x":[1,null]},"n":"\xc3\xa9"}',
        ], start=1):
            [ok] = self.answers(header + b"\n")
            self.assertEqual((ok["t"], ok["id"]), ("ok", rid))

    def test_duplicate_keys_take_the_last(self) -> None:
        [ok] = self.answers(b'{"t":"req","id":1,"op":"nope","op":"info"}\n')
        self.assertEqual(ok["t"], "ok")

    def test_bodies(self) -> None:
        """The body is every byte after the first newline (newlines
        included); an empty stdin is nothing, a body where none belongs is
        ignored."""
        [ok] = self.answers(app.encode({"t": "req", "id": 1, "op": "exec", "argv": ["cat"]}))
        self.assertEqual(ok["window"], app.WINDOW)
        [(_, _, child)] = self.fake.spawned
        self.assertEqual(self.answers(b'{"t":"stdin","id":1}\n'), [])
        self.assertEqual(self.session.dispatcher.credit(1), app.WINDOW)
        # the child took all 15 bytes of "\nline 1\nline 2\n" (their credit
        # waits for a quarter of the window)
        self.assertEqual(self.answers(b'{"t":"stdin","id":1}\n\nline 1\nline 2\n'), [])
        self.assertIn("write 15", child.calls)
        self.assertEqual(self.session.dispatcher.credit(1), app.WINDOW - 15)
        [ok] = self.answers(b'{"t":"req","id":2,"op":"info"}\nignored body')
        self.assertEqual(ok["t"], "ok")

    def test_unknown_type_does_not_use_the_id(self) -> None:
        [err] = self.answers(b'{"t":"hello","id":7}\n')
        self.assertEqual((err["t"], err["code"], err["id"]), ("error", "bad-message", 7))
        [ok] = self.answers(b'{"t":"req","id":7,"op":"info"}\n')
        self.assertEqual(ok["t"], "ok")
        [err] = self.answers(b'{"t":"req","op":"info"}\n')
        self.assertEqual(err["code"], "bad-message")
        self.assertNotIn("id", err)

    def test_error_about_a_stream_message_does_not_end_its_request(self) -> None:
        """An error that answers a stream message (or a duplicate req)
        carries the request's id, but the request goes on."""
        self.answers(app.encode({"t": "req", "id": 1, "op": "exec", "argv": ["cat"]}))
        [err] = self.answers(b'{"t":"resize","id":1,"rows":1,"cols":1}\n')
        self.assertEqual((err["t"], err["code"], err["id"]), ("error", "bad-request", 1))
        [err] = self.answers(b'{"t":"req","id":1,"op":"info"}\n')
        self.assertEqual((err["code"], err["id"]), ("duplicate-id", 1))
        self.assertEqual(self.session.dispatcher.running, {1: "exec"})
        self.assertEqual(self.answers(b'{"t":"stdin","id":1}\nx'), [])
        [(_, _, child)] = self.fake.spawned
        self.assertIn("write 1", child.calls)  # still running: the child got it
        self.assertEqual(self.session.dispatcher.credit(1), app.WINDOW - 1)


class PipeReadSizeTests(SynchronousTestCase):
    """A child's output is read a record body at a time, not Twisted's 8 KiB
    (each read becomes one sealed record)."""

    def test_one_read_takes_a_full_record_body(self) -> None:
        from twisted.internet.main import CONNECTION_DONE

        from ticrypt.vmc.processes import PIPE_READ_SIZE, read_pipes_in_chunks
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        os.set_blocking(r, False)
        got: list[bytes] = []

        class Reader:  # what Process.pipes holds for an output fd
            fd = r

            def fileno(self) -> int:
                return r

            def dataReceived(self, data: bytes) -> None:
                got.append(data)

            def doRead(self) -> object:
                raise AssertionError("Twisted's 8 KiB read")

        class Transport:
            pipes: dict[int, Any] = {1: Reader()}

        transport = Transport()
        read_pipes_in_chunks(transport)
        reader = transport.pipes[1]
        self.assertGreaterEqual(fcntl.fcntl(r, 1032, 0), PIPE_READ_SIZE)  # F_GETPIPE_SZ
        os.write(w, b"x" * PIPE_READ_SIZE)
        self.assertIsNone(reader.doRead())
        self.assertEqual([len(g) for g in got], [PIPE_READ_SIZE])
        self.assertIsNone(reader.doRead())  # nothing there: EAGAIN, no data
        os.close(w)
        self.assertIs(reader.doRead(), CONNECTION_DONE)
        self.assertEqual(len(got), 1)
