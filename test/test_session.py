"""Unit tests of the frontend session library, the CLI session commands'
argument handling and the local terminal helpers."""

from __future__ import annotations

import os
import termios
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ticrypt.channel import app
from ticrypt.closecodes import split_reason
from ticrypt.frontend import cmd_session, terminal
from ticrypt.frontend.cli import build_parser
from ticrypt.frontend.errors import close_error
from ticrypt.frontend.session import ChannelSession, Command, RemoteError, SessionError
from ticrypt.vmc.processes import set_window


class CloseErrorTests(SynchronousTestCase):
    def test_not_authorized(self) -> None:
        e = close_error(4401, "not-authorized: this user is not authorized on this VM")
        self.assertEqual(e.code, "not-authorized")
        self.assertIn("ticrypt authorize", str(e))
        self.assertIn("(this user is not authorized on this VM)", str(e))

    def test_reason_format(self) -> None:
        """``name: text`` (PROTOCOL.md §4 Closing), or a bare name."""
        self.assertEqual(split_reason("over-limit: too many sessions on this VM"),
                         ("over-limit", "too many sessions on this VM"))
        self.assertEqual(split_reason("bad-signature"), ("bad-signature", ""))
        self.assertEqual(split_reason("peer-lost: the peer closed with code 1002"),
                         ("peer-lost", "the peer closed with code 1002"))
        self.assertEqual(split_reason("timeout: a: b"), ("timeout", "a: b"))
        self.assertEqual(split_reason(""), ("", ""))

    def test_reasons_without_colon_still_read(self) -> None:
        """vmc builds before the rule wrote ``name text``: the name comes out
        the same (names never contain a space)."""
        self.assertEqual(split_reason("over-limit too many sessions on this VM"),
                         ("over-limit", "too many sessions on this VM"))
        e = close_error(4401, "not-authorized this user is not authorized on this VM")
        self.assertEqual(e.code, "not-authorized")
        self.assertIn("(this user is not authorized on this VM)", str(e))
        e = close_error(4400, "window-exceeded request 1 sent 9 stdin bytes with a window of 0")
        self.assertEqual(e.code, "window-exceeded")
        e = close_error(4009, "over-limit too many sessions on this VM")
        self.assertEqual(e.code, "over-limit")
        self.assertIn("(too many sessions on this VM)", str(e))

    def test_channel_error_reason_is_code(self) -> None:
        e = close_error(4400, "bad-signature")
        self.assertEqual(e.code, "bad-signature")
        self.assertTrue(str(e).startswith("bad-signature:"))

    def test_proxy_codes(self) -> None:
        self.assertEqual(close_error(4004, "no-vm-available: none waiting").code,
                         "no-vm-available")
        self.assertEqual(close_error(4003, "ticket-refused: expired").code, "ticket-refused")
        self.assertIn("expired", str(close_error(4003, "ticket-refused: expired")))
        self.assertEqual(close_error(4999, "weird thing").code, "weird")


class FarEndTextTests(SynchronousTestCase):
    """Text from the proxy or the VM reaches the user's terminal in error
    lines: it must stay one printable line (no forged lines, no escapes)."""

    def assert_clean(self, text: str) -> None:
        self.assertTrue(text.isprintable(), repr(text))

    def test_close_reason_from_proxy(self) -> None:
        for code in (4000, 4003, 4400, 4999):
            e = close_error(code, "ticket-refused \x1b]0;pwned\x07\nticrypt: all good\r")
            self.assert_clean(str(e))
            self.assert_clean(e.code)
        self.assertEqual(close_error(4400, "\x1b[2Jbad-signature").code, "?[2Jbad-signature")

    def test_remote_error_from_vm(self) -> None:
        session = ChannelSession(_FakeLeg(), Clock())
        d = defer.ensureDeferred(session.info())
        session.app_message({"t": "error", "id": 1, "code": "x\ny", "message": "a\x1b[31m\nb"},
                         b"")
        err = self.failureResultOf(d, RemoteError).value
        self.assertEqual((err.code, err.message), ("x?y", "a?[31m?b"))
        cmd = session.exec(["true"])
        session.app_message({"t": "error", "id": 2, "code": "c", "message": "\u202eevil"}, b"")
        self.assertEqual(self.failureResultOf(cmd.done, RemoteError).value.message, "?evil")


class _FakeLeg:
    """Stands in for UserLeg: records the application messages sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], bytes]] = []
        self.closes: list[tuple[int, str]] = []
        self.ended: SessionError | None = None
        self.transport = None
        self.peer_key = b""

    def send_app(self, header: dict[str, Any], body: bytes = b"") -> None:
        app.encode(header, body)  # must be encodable
        self.sent.append((header, body))

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))


class FramingTests(SynchronousTestCase):
    """PROTOCOL.md §5 Framing as the frontend reads vmc's messages: an
    unreadable one is skipped (with a warning), unknown keys are ignored,
    any key order is fine."""

    def test_unreadable_skipped_unknown_keys_ignored(self) -> None:
        from ticrypt.frontend.leg import UserLeg

        leg = UserLeg()
        session = ChannelSession(_FakeLeg(), Clock())
        leg.receiver = session
        d = defer.ensureDeferred(session.info())
        out = bytearray()
        cmd = session.exec(["cat"], on_stdout=out.extend)
        for plaintext in (b'{"t":"ok","id":1}',  # no newline
                          b"[]\n",
                          b'{"vm":"v","future":[1],"id":1,"t":"ok"}\n',
                          b'{"id":2,"t":"stdout","x":1}\nline\n',
                          b'{"t":"exit","id":2,"status":0}\nignored'):
            leg._delivered(plaintext)
        self.assertEqual(self.successResultOf(d), {"vm": "v", "future": [1], "id": 1, "t": "ok"})
        self.assertEqual(bytes(out), b"line\n")
        self.assertEqual(self.successResultOf(cmd.done), 0)


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.leg = _FakeLeg()
        self.clock = Clock()
        self.session = ChannelSession(self.leg, self.clock)

    def test_exec_streams_and_exit(self) -> None:
        out, err = bytearray(), bytearray()
        cmd = self.session.exec(["cat"], stdin=b"abc", on_stdout=out.extend,
                                on_stderr=err.extend)
        # no input before the VM's ok (it announces the window)
        self.assertEqual([h for h, _ in self.leg.sent],
                         [{"t": "req", "id": 1, "op": "exec", "argv": ["cat"]}])
        self.session.app_message({"t": "ok", "id": 1, "window": 100}, b"")
        self.assertEqual([h for h, _ in self.leg.sent[1:]],
                         [{"t": "stdin", "id": 1}, {"t": "eof", "id": 1}])
        self.assertEqual(self.leg.sent[1][1], b"abc")
        self.session.app_message({"t": "stdout", "id": 1}, b"abc")
        self.session.app_message({"t": "stderr", "id": 1}, b"warn")
        self.session.app_message({"t": "exit", "id": 1, "status": 3}, b"")
        self.assertEqual(self.successResultOf(cmd.done), 3)
        self.assertEqual((bytes(out), bytes(err)), (b"abc", b"warn"))
        cmd.write(b"late")  # ignored after exit
        self.assertEqual(len(self.leg.sent), 3)

    def test_big_stdin_is_split(self) -> None:
        """stdin goes in records of a quarter of the window the VM announced,
        from CHUNK (64 KiB) to MAX_BODY (256 KiB), so that up to four are in
        flight."""
        for rid, window, record in ((1, app.WINDOW, app.MAX_BODY),
                                    (2, 4 * app.MAX_BODY + 8, app.MAX_BODY),
                                    (3, 262144, app.CHUNK),
                                    (4, 393216, 98304),
                                    (5, 1000, app.CHUNK)):
            self.leg.sent.clear()
            cmd = self.session.exec(["cat"])
            self.session.app_message({"t": "ok", "id": rid, "window": window}, b"")
            n = min(window, record * 2 + 1)
            cmd.write(b"x" * n)
            sizes = [len(b) for h, b in self.leg.sent if h["t"] == "stdin"]
            expected = [record, record, 1] if n == record * 2 + 1 else [window]
            self.assertEqual(sizes, expected, (window, record))

    def stdin_sent(self) -> list[tuple[str, bytes]]:
        return [(h["t"], b) for h, b in self.leg.sent if h["t"] in ("stdin", "eof")]

    def test_stdin_within_window(self) -> None:
        """At most the window is in flight; window messages release more,
        and eof follows the last byte."""
        cmd = self.session.exec(["cat"], stdin=b"0123456789" * 3)
        self.assertEqual(self.stdin_sent(), [])
        self.session.app_message({"t": "ok", "id": 1, "window": 12}, b"")
        self.assertEqual(self.stdin_sent(), [("stdin", b"012345678901")])
        self.assertEqual((cmd.sent, cmd.pending), (12, 18))
        self.session.app_message({"t": "window", "id": 1, "bytes": 5}, b"")
        self.assertEqual(self.stdin_sent()[-1], ("stdin", b"23456"))
        for bad in (0, -3, True, "9", None):  # malformed credit is ignored
            self.session.app_message({"t": "window", "id": 1, "bytes": bad}, b"")
        self.assertEqual(len(self.stdin_sent()), 2)
        self.session.app_message({"t": "window", "id": 1, "bytes": 100}, b"")
        self.assertEqual(self.stdin_sent()[2:], [("stdin", b"7890123456789"), ("eof", b"")])
        self.assertEqual((cmd.sent, cmd.pending), (30, 0))
        cmd.write(b"after eof")  # ignored
        self.assertEqual(len(self.stdin_sent()), 4)

    def test_shell_eof_takes_a_window_byte(self) -> None:
        cmd = self.session.shell("xterm", 24, 80)
        self.session.app_message({"t": "ok", "id": 1, "window": 3}, b"")
        cmd.write(b"abc")
        cmd.eof()
        self.assertEqual(self.stdin_sent(), [("stdin", b"abc")])
        self.session.app_message({"t": "window", "id": 1, "bytes": 1}, b"")
        self.assertEqual(self.stdin_sent(), [("stdin", b"abc"), ("eof", b"")])

    def test_attach_input_pauses_source(self) -> None:
        """The local input source pauses while the window is exhausted, and
        also while the websocket is full; it resumes only when neither holds."""
        calls: list[str] = []

        class Source:
            def pauseProducing(self) -> None:
                calls.append("pause")

            def resumeProducing(self) -> None:
                calls.append("resume")

            def stopProducing(self) -> None:
                calls.append("stop")

        cmd = self.session.exec(["cat"])
        gate = cmd.attach_input(Source())  # type: ignore[arg-type]
        cmd.write(b"x" * 10)  # before the ok: nothing may be sent
        self.assertEqual(calls, ["pause"])
        self.session.app_message({"t": "ok", "id": 1, "window": 16}, b"")
        self.assertEqual(calls, ["pause", "resume"])
        cmd.write(b"y" * 10)  # 4 over the window
        self.assertEqual((calls[-1], cmd.pending), ("pause", 4))
        gate.pauseProducing()  # the websocket is full too
        self.session.app_message({"t": "window", "id": 1, "bytes": 10}, b"")
        self.assertEqual(calls, ["pause", "resume", "pause"])  # the socket still holds it
        gate.resumeProducing()
        self.assertEqual(calls, ["pause", "resume", "pause", "resume"])
        gate.stopProducing()
        self.assertEqual(calls[-1], "stop")

    def test_error_drops_pending_input(self) -> None:
        cmd = self.session.exec(["nope"], stdin=b"data")
        self.session.app_message({"t": "error", "id": 1, "code": "command-not-found",
                               "message": "command not found"}, b"")
        self.failureResultOf(cmd.done, RemoteError)
        self.assertEqual((self.stdin_sent(), cmd.pending), ([], 0))

    def test_window_exceeded_close_is_explained(self) -> None:
        e = close_error(4400, "window-exceeded: request 1 sent 9 stdin bytes with a window of 0")
        self.assertEqual(e.code, "window-exceeded")
        self.assertIn("more input than it allowed", str(e))
        self.assertIn("(request 1 sent 9 stdin bytes", str(e))

    def test_request_ok_and_error(self) -> None:
        d = defer.ensureDeferred(self.session.info())
        self.session.app_message({"t": "ok", "id": 1, "vm": "v"}, b"")
        self.assertEqual(self.successResultOf(d)["vm"], "v")
        d2 = defer.ensureDeferred(self.session.users())
        self.session.app_message({"t": "error", "id": 2, "code": "not-owner", "message": "no"}, b"")
        f = self.failureResultOf(d2, RemoteError)
        self.assertEqual(f.value.code, "not-owner")

    def test_request_timeout(self) -> None:
        clock = Clock()
        session = ChannelSession(self.leg, clock, request_timeout=5)
        d = defer.ensureDeferred(session.info())
        clock.advance(4)
        self.assertNoResult(d)
        clock.advance(2)
        self.assertEqual(self.failureResultOf(d, SessionError).value.code, "timeout")

    def test_revoke_by_name_or_key(self) -> None:
        defer.ensureDeferred(self.session.revoke("bob"))
        defer.ensureDeferred(self.session.revoke("ed25519:" + "A" * 43))
        self.assertEqual(self.leg.sent[0][0]["name"], "bob")
        self.assertEqual(self.leg.sent[1][0]["key"], "ed25519:" + "A" * 43)

    def test_shell_started_and_resize(self) -> None:
        out = bytearray()
        cmd = self.session.shell("xterm", 10, 20, on_output=out.extend)
        self.assertNoResult(cmd.started)
        self.session.app_message({"t": "ok", "id": 1}, b"")
        self.successResultOf(cmd.started)
        cmd.resize(30, 40)
        self.assertEqual(self.leg.sent[-1][0], {"t": "resize", "id": 1, "rows": 30, "cols": 40})

    def test_connection_end_fails_pending(self) -> None:
        cmd = self.session.exec(["sleep", "9"])
        d = defer.ensureDeferred(self.session.info())
        self.session.leg_closed(SessionError("peer-lost", "peer-lost: gone"))
        self.assertEqual(self.failureResultOf(cmd.done, SessionError).value.code, "peer-lost")
        self.failureResultOf(d, SessionError)
        ended = self.successResultOf(self.session.closed)
        assert ended is not None
        self.assertEqual(ended.code, "peer-lost")

    def test_refused_stream_message_does_not_end_a_running_request(self) -> None:
        """PROTOCOL.md §5 Errors: once the VM accepted a request (its ok), an
        error about a stream message (a bad resize) or a reused id carries
        the request's id but the request keeps running until its exit."""
        warnings: list[RemoteError] = []
        out = bytearray()
        cmd = self.session.shell("xterm", 24, 80, on_output=out.extend,
                                 on_warning=warnings.append)
        self.session.app_message({"t": "ok", "id": 1, "window": 16}, b"")
        cmd.resize(0, 0)
        self.session.app_message({"t": "error", "id": 1, "code": "bad-request",
                                  "message": "rows and cols must be integers in 1..10000"}, b"")
        self.session.app_message({"t": "error", "id": 1, "code": "duplicate-id",
                                  "message": "request id already used on this channel"}, b"")
        self.assertEqual([(w.code, w.message[:4]) for w in warnings],
                         [("bad-request", "rows"), ("duplicate-id", "requ")])
        self.assertNoResult(cmd.done)
        self.assertFalse(cmd.finished)
        cmd.write(b"ls\r")  # the shell still takes input
        self.assertEqual(self.stdin_sent(), [("stdin", b"ls\r")])
        self.session.app_message({"t": "stdout", "id": 1}, b"still here")
        self.session.app_message({"t": "exit", "id": 1, "status": 0}, b"")
        self.assertEqual((self.successResultOf(cmd.done), bytes(out)), (0, b"still here"))

    def test_refusal_without_on_warning_is_logged(self) -> None:
        cmd = self.session.exec(["cat"])
        self.session.app_message({"t": "ok", "id": 1, "window": 16}, b"")
        self.session.app_message({"t": "error", "id": 1, "code": "bad-request",
                                  "message": "resize applies to a shell only"}, b"")
        self.assertNoResult(cmd.done)

    def test_error_before_ok_ends_the_request(self) -> None:
        """The error answering the req itself (no ok yet) is the request's end."""
        cmd = self.session.shell("xterm", 24, 80, on_warning=self.fail)
        self.session.app_message({"t": "error", "id": 1, "code": "spawn-failed",
                                  "message": "cannot start shell"}, b"")
        self.assertEqual(self.failureResultOf(cmd.done, RemoteError).value.code,
                         "spawn-failed")
        self.assertTrue(cmd.finished)

    def test_cancel_wait_needs_no_answer(self) -> None:
        """The session's clock bounds the wait for a cancelled command."""
        cmd = self.session.exec(["sleep", "9"])
        cmd.cancel(wait=2)
        self.clock.advance(2)
        self.assertEqual(self.failureResultOf(cmd.done, SessionError).value.code, "cancelled")

    def test_exec_error_fails_done(self) -> None:
        cmd: Command = self.session.exec(["nope"])
        self.session.app_message({"t": "error", "id": 1, "code": "command-not-found",
                               "message": "command not found"}, b"")
        self.assertEqual(self.failureResultOf(cmd.done, RemoteError).value.code,
                         "command-not-found")


class CliParsingTests(SynchronousTestCase):
    def test_exec_argv_after_double_dash(self) -> None:
        args = build_parser().parse_args(["exec", "vm-1", "--", "sh", "-c", "exit 7"])
        self.assertEqual(args.vm_id, "vm-1")
        self.assertEqual([a for a in args.argv if a != "--"], ["sh", "-c", "exit 7"])
        self.assertIs(args.func, cmd_session.cmd_exec)

    def test_exec_without_command_is_an_error(self) -> None:
        from ticrypt.frontend.cli import CommandError

        args = build_parser().parse_args(["exec", "vm-1", "--"])
        self.assertRaises(CommandError, cmd_session.cmd_exec, args)

    def test_authorize_key_forms(self) -> None:
        from ticrypt import identity
        from ticrypt.frontend.cli import CommandError

        key = identity.public_text(identity.generate())
        args = build_parser().parse_args(["authorize", "vm-1", "bob", "--key", key])
        self.assertEqual(cmd_session._user_key(args), key)
        bad = build_parser().parse_args(["authorize", "vm-1", "bob", "--key", "ed25519:x"])
        self.assertRaises(CommandError, cmd_session._user_key, bad)
        none = build_parser().parse_args(["authorize", "vm-1", "bob"])
        self.assertIsNone(cmd_session._user_key(none))


class RawModeTests(SynchronousTestCase):
    def test_raw_then_restored(self) -> None:
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        before = termios.tcgetattr(slave)
        with terminal.RawMode(slave) as raw:
            self.assertTrue(raw.active)
            during = termios.tcgetattr(slave)
            self.assertFalse(during[3] & termios.ICANON)
            self.assertFalse(during[3] & termios.ECHO)
        self.assertEqual(termios.tcgetattr(slave), before)

    def test_not_a_tty_is_untouched(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        with terminal.RawMode(r) as raw:
            self.assertFalse(raw.active)

    def test_window_size(self) -> None:
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        set_window(slave, 33, 101)
        self.assertEqual(terminal.window_size(slave), (33, 101))
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertIsNone(terminal.window_size(r))

    def test_unknown_window_size(self) -> None:
        """A terminal that reports 0x0 (a fresh PTY, a serial console) has no
        known size: None, so the shell falls back to 24x80 instead of asking
        the VM for a 0x0 window (which it refuses)."""
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        set_window(slave, 0, 0)
        self.assertIsNone(terminal.window_size(slave))


class InputReaderTests(TestCase):
    """Reads a pipe to its end, including end of input signalled by HUP."""

    async def test_pipe_to_eof(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        got = bytearray()
        done: defer.Deferred[None] = defer.Deferred()
        reader = terminal.InputReader(reactor, got.extend, lambda: done.callback(None), fd=r)
        reader.start()
        os.write(w, b"x" * 50000)
        os.close(w)
        await done
        self.assertEqual(len(got), 50000)

    async def test_pause_and_resume(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        got = bytearray()
        done: defer.Deferred[None] = defer.Deferred()
        reader = terminal.InputReader(reactor, got.extend, lambda: done.callback(None), fd=r)
        reader.start()
        reader.pauseProducing()
        self.assertNotIn(reader, reactor.getReaders())
        reader.resumeProducing()
        self.assertIn(reader, reactor.getReaders())
        os.write(w, b"abc")
        os.close(w)
        await done
        self.assertEqual(bytes(got), b"abc")

    async def test_regular_file(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"y" * 70000)
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        got = bytearray()
        done: defer.Deferred[None] = defer.Deferred()
        terminal.InputReader(reactor, got.extend, lambda: done.callback(None), fd=fd).start()
        await done
        self.assertEqual(len(got), 70000)
