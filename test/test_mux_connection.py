"""Tests for ticrypt.mux.connection: the sans-IO core (windows, ids, caps, floods)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ticrypt.mux.connection import (
    PROTOCOL_ERRORS,
    ConnectionEnded,
    DataReceived,
    Event,
    MuxConnection,
    MuxSettings,
    MuxUsageError,
    PongReceived,
    ResetReceived,
    SendWindowOpened,
    StreamAccepted,
    StreamEnded,
    StreamHalfClosed,
    StreamOpened,
)
from ticrypt.mux.frames import (
    FRAME_ERRORS,
    RESET_CANCEL,
    RESET_REFUSED,
    Accept,
    Data,
    Frame,
    FrameDecoder,
    GoAway,
    HalfClose,
    Open,
    Ping,
    Pong,
    Reset,
    Window,
    encode,
)

SMALL = MuxSettings(window=10, max_frame=4, max_streams=4)


def raw(*frames: Frame) -> bytes:
    return b"".join(encode(f) for f in frames)


def sent(conn: MuxConnection) -> list[Frame]:
    return FrameDecoder().feed(conn.data_to_send())


class Pair:
    """A client and a server core wired by hand."""

    def __init__(self, settings: MuxSettings = SMALL) -> None:
        self.client = MuxConnection("client", settings)
        self.server = MuxConnection("server", settings)
        self.now = 0.0

    def to_server(self) -> list[Event]:
        return self.server.receive(self.client.data_to_send(), self.now)

    def to_client(self) -> list[Event]:
        return self.client.receive(self.server.data_to_send(), self.now)

    def open_accepted(self, port: int = 80) -> int:
        stream = self.client.open_stream(port)
        self.to_server()
        self.server.accept(stream)
        self.to_client()
        return stream


class ErrorMixin(SynchronousTestCase):
    def assertEnds(self, conn: MuxConnection, data: bytes, reason: str, now: float = 0.0) -> None:
        """Feeding ``data`` ends ``conn`` with ``reason``, GOAWAY(reason) is queued, later input ignored."""
        events = conn.receive(data, now)
        self.assertEqual(events[-1], ConnectionEnded(reason, by_peer=False))
        self.assertEqual(conn.reason, reason)
        self.assertEqual(sent(conn)[-1], GoAway(reason))
        self.assertEqual(conn.receive(raw(Ping(b"12345678")), now), [])
        self.assertEqual(conn.data_to_send(), b"")
        self.assertEqual(conn.stream_count, 0)


class StreamLifecycleTests(ErrorMixin):
    def test_open_accept_data_both_ways(self) -> None:
        p = Pair()
        stream = p.client.open_stream(8080)
        self.assertEqual(stream, 1)
        self.assertEqual(p.to_server(), [StreamOpened(1, 8080)])
        p.server.accept(1)
        self.assertEqual(p.to_client(), [StreamAccepted(1)])
        self.assertEqual(p.client.send(1, b"abcdef"), 6)
        self.assertEqual(p.to_server(), [DataReceived(1, b"abcd"), DataReceived(1, b"ef")])
        self.assertEqual(p.server.send(1, b"xyz"), 3)
        self.assertEqual(p.to_client(), [DataReceived(1, b"xyz")])

    def test_ids_odd_and_increasing(self) -> None:
        p = Pair()
        ids = []
        for _ in range(3):
            s = p.client.open_stream(1)
            ids.append(s)
            p.client.reset(s, "x")
        self.assertEqual(ids, [1, 3, 5])

    def test_half_close_both_ways_ends_stream(self) -> None:
        p = Pair()
        s = p.open_accepted()
        p.client.half_close(s)
        self.assertEqual(p.to_server(), [StreamHalfClosed(s)])
        self.assertEqual(p.server.send(s, b"late"), 4)  # the other direction still flows
        p.server.half_close(s)
        self.assertFalse(p.server.has_stream(s))
        self.assertEqual(p.to_client(), [DataReceived(s, b"late"), StreamEnded(s)])
        self.assertEqual(p.client.stream_count, 0)
        self.assertRaises(MuxUsageError, p.client.send, s, b"x")

    def test_window_after_close_is_ignored(self) -> None:
        """WINDOW for data the peer consumed can cross our close: harmless."""
        p = Pair()
        s = p.open_accepted()
        p.client.half_close(s)
        p.to_server()
        p.server.half_close(s)
        p.to_client()
        self.assertEqual(p.client.receive(raw(Window(s, 5)), 0), [])
        self.assertFalse(p.client.closed)

    def test_refuse_resets_only_that_stream(self) -> None:
        p = Pair()
        good = p.open_accepted()
        bad = p.client.open_stream(22)
        p.client.send(bad, b"early")  # optimistic, before the answer
        p.to_server()
        p.server.refuse(bad, "port-not-allowed")
        self.assertEqual(p.to_client(), [ResetReceived(bad, RESET_REFUSED, "port-not-allowed")])
        self.assertEqual(p.client.send(good, b"ok"), 2)
        self.assertEqual(p.to_server(), [DataReceived(good, b"ok")])
        self.assertFalse(p.client.closed or p.server.closed)
        self.assertEqual(p.client.stream_count, 1)

    def test_data_in_flight_after_our_reset_is_dropped(self) -> None:
        """DATA the client sent before it saw the refusal is dropped, within its window."""
        p = Pair()
        s = p.client.open_stream(22)
        p.to_server()
        p.server.refuse(s, "port-not-allowed")
        p.client.send(s, b"0123456789")  # crossed the RESET on the wire
        p.client.half_close(s)
        self.assertEqual(p.to_server(), [])
        self.assertFalse(p.server.closed)

    def test_data_after_our_reset_beyond_window(self) -> None:
        p = Pair()
        p.client.open_stream(22)
        p.to_server()
        p.server.refuse(1, "port-not-allowed")
        p.server.data_to_send()
        self.assertEnds(p.server, raw(Data(1, b"0123456789"), Data(1, b"x")), "flow-control-violation")

    def test_optimistic_data_before_accept(self) -> None:
        """The client may send before ACCEPT; the window bounds it until the server consumes."""
        p = Pair()
        s = p.client.open_stream(80)
        self.assertEqual(p.client.send(s, b"x" * 25), 10)
        self.assertEqual(p.client.send_window(s), 0)
        events = p.to_server()
        self.assertEqual(b"".join(e.data for e in events if isinstance(e, DataReceived)), b"x" * 10)
        p.server.accept(s)
        p.server.consumed(s, 10)
        self.assertEqual(p.to_client(), [StreamAccepted(s), SendWindowOpened(s)])
        self.assertEqual(p.client.send_window(s), 10)

    def test_reset_by_peer(self) -> None:
        p = Pair()
        s = p.open_accepted()
        p.server.reset(s, "connect-failed", 2)
        self.assertEqual(p.to_client(), [ResetReceived(s, 2, "connect-failed")])
        self.assertFalse(p.client.has_stream(s))
        p.client.reset(s, "too-late")  # crossing resets: a no-op
        self.assertEqual(p.client.data_to_send(), b"")

    def test_ping_pong(self) -> None:
        p = Pair()
        p.client.ping(b"abcdefgh")
        self.assertEqual(p.to_server(), [])
        self.assertEqual(p.to_client(), [PongReceived(b"abcdefgh")])

    def test_goaway_from_peer(self) -> None:
        p = Pair()
        p.open_accepted()
        p.server.go_away("normal")
        self.assertEqual(p.to_client(), [ConnectionEnded("peer:normal", by_peer=True)])
        self.assertTrue(p.client.closed)
        self.assertEqual(p.client.stream_count, 0)
        self.assertRaises(MuxUsageError, p.client.open_stream, 80)

    def test_usage_errors(self) -> None:
        p = Pair()
        self.assertRaises(MuxUsageError, p.server.open_stream, 80)
        s = p.client.open_stream(80)
        p.to_server()
        self.assertRaises(MuxUsageError, p.server.send, s, b"x")  # not accepted yet
        self.assertRaises(MuxUsageError, p.client.accept, s)
        p.server.accept(s)
        self.assertRaises(MuxUsageError, p.server.refuse, s, "late")
        p.client.half_close(s)
        self.assertRaises(MuxUsageError, p.client.send, s, b"x")
        self.assertRaises(ValueError, p.client.reset, s, "not ascii é")
        self.assertTrue(p.client.has_stream(s))  # a bad reason changed nothing
        self.assertRaises(ValueError, MuxConnection, "both")

    def test_bytes_counted(self) -> None:
        p = Pair()
        p.open_accepted()
        self.assertEqual(p.client.bytes_out, p.server.bytes_in)
        self.assertEqual(p.server.bytes_out, p.client.bytes_in)
        self.assertGreater(p.client.bytes_out, 0)


class WindowTests(ErrorMixin):
    def test_send_respects_window(self) -> None:
        p = Pair()
        s = p.open_accepted()
        self.assertEqual(p.client.send(s, b"a" * 7), 7)
        self.assertEqual(p.client.send(s, b"b" * 7), 3)
        self.assertEqual(p.client.send(s, b"c"), 0)
        self.assertEqual(p.client.send_window(s), 0)
        p.to_server()

    def test_credit_batched_at_half_window(self) -> None:
        p = Pair()
        s = p.open_accepted()
        p.client.send(s, b"a" * 10)
        p.to_server()
        p.server.consumed(s, 4)
        self.assertEqual(p.server.data_to_send(), b"")
        p.server.consumed(s, 1)
        self.assertEqual(sent(p.server), [Window(s, 5)])

    def test_full_transfer_never_stalls(self) -> None:
        """100 bytes through a 10-byte window, consuming as it comes."""
        p = Pair()
        s = p.open_accepted()
        data = bytes(range(100))
        got = b""
        pos = 0
        for _ in range(100):
            pos += p.client.send(s, data[pos:])
            for e in p.to_server():
                if isinstance(e, DataReceived):
                    got += e.data
                    p.server.consumed(s, len(e.data))
            p.to_client()
            if pos == len(data):
                break
        p.to_server()
        self.assertEqual(got, data)

    def test_data_beyond_window(self) -> None:
        p = Pair()
        p.open_accepted()
        self.assertEnds(p.server, raw(Data(1, b"123456"), Data(1, b"12345")), "flow-control-violation")

    def test_window_overflow(self) -> None:
        p = Pair()
        s = p.open_accepted()
        p.client.receive(raw(Window(s, 2**31 - 1 - 10)), 0)
        self.assertEqual(p.client.send_window(s), 2**31 - 1)
        self.assertEnds(p.client, raw(Window(s, 1)), "window-overflow")

    def test_zero_increment(self) -> None:
        p = Pair()
        s = p.open_accepted()
        self.assertEnds(p.client, raw(Window(s, 0)), "zero-window-increment")


class StreamRuleTests(ErrorMixin):
    def test_open_to_client(self) -> None:
        self.assertEnds(MuxConnection("client"), raw(Open(1, 80)), "unexpected-open")

    def test_even_id(self) -> None:
        self.assertEnds(MuxConnection("server"), raw(Open(2, 80)), "even-stream-id")

    def test_id_reuse(self) -> None:
        self.assertEnds(MuxConnection("server"), raw(Open(3, 80), Open(3, 80)), "stream-id-reuse")
        self.assertEnds(MuxConnection("server"), raw(Open(3, 80), Open(1, 80)), "stream-id-reuse")
        # also once the earlier stream is gone
        self.assertEnds(MuxConnection("server"), raw(Open(5, 80), Reset(5, 0, "x"), Open(5, 80)), "stream-id-reuse")

    def test_stream_cap(self) -> None:
        server = MuxConnection("server", SMALL)
        events = server.receive(raw(*(Open(i, 80) for i in (1, 3, 5, 7))), 0)
        self.assertEqual(len(events), 4)
        self.assertEnds(server, raw(Open(9, 80)), "too-many-streams")

    def test_stream_cap_frees_on_close(self) -> None:
        server = MuxConnection("server", SMALL)
        server.receive(raw(*(Open(i, 80) for i in (1, 3, 5, 7))), 0)
        server.refuse(1, "no")
        self.assertEqual(server.receive(raw(Open(9, 80)), 0), [StreamOpened(9, 80)])

    def test_client_respects_cap(self) -> None:
        client = MuxConnection("client", SMALL)
        for _ in range(4):
            client.open_stream(80)
        self.assertRaises(MuxUsageError, client.open_stream, 80)

    def test_unknown_stream(self) -> None:
        self.assertEnds(MuxConnection("server"), raw(Data(1, b"x")), "unknown-stream")
        self.assertEnds(MuxConnection("server"), raw(Open(1, 80), HalfClose(3)), "unknown-stream")
        self.assertEnds(MuxConnection("client"), raw(Accept(1)), "unknown-stream")

    def test_data_on_closed_stream(self) -> None:
        p = Pair()
        s = p.open_accepted()
        p.client.half_close(s)
        p.to_server()
        p.server.half_close(s)
        p.to_client()
        self.assertEnds(p.server, raw(Data(s, b"x")), "stream-closed")

    def test_data_after_peer_reset(self) -> None:
        server = MuxConnection("server", SMALL)
        self.assertEnds(server, raw(Open(1, 80), Reset(1, RESET_CANCEL, ""), Data(1, b"x")), "stream-closed")

    def test_data_after_half_close(self) -> None:
        p = Pair()
        s = p.open_accepted()
        self.assertEnds(p.server, raw(HalfClose(s), Data(s, b"x")), "data-after-half-close")

    def test_accept_rules(self) -> None:
        self.assertEnds(MuxConnection("server"), raw(Open(1, 80), Accept(1)), "unexpected-accept")
        p = Pair()
        s = p.open_accepted()
        self.assertEnds(p.client, raw(Accept(s)), "unexpected-accept")

    def test_data_before_accept(self) -> None:
        p = Pair()
        s = p.client.open_stream(80)
        self.assertEnds(p.client, raw(Data(s, b"x")), "data-before-accept")

    def test_frame_error_ends_connection(self) -> None:
        self.assertEnds(MuxConnection("server"), b"\x0a" + bytes(8), "unknown-type")

    def test_every_reason_documented(self) -> None:
        """PROTOCOL.md's mux section names every reason a connection can end with."""
        text = (Path(__file__).resolve().parents[1] / "PROTOCOL.md").read_text()
        section = text[text.index("Tunnel multiplexing (port 22)") :]
        missing = [r for r in [*PROTOCOL_ERRORS, *FRAME_ERRORS] if f"`{r}`" not in section]
        self.assertEqual(missing, [])


class FloodTests(ErrorMixin):
    def budget(self, **kw: int) -> MuxSettings:
        return MuxSettings(window=10, max_streams=4, flood_interval=10.0, **kw)

    def test_opens(self) -> None:
        server = MuxConnection("server", self.budget(max_opens=3))
        frames = [f for i in (1, 3, 5) for f in (Open(i, 80), Reset(i, 0, ""))]
        server.receive(raw(*frames), 0.0)
        self.assertEnds(server, raw(Open(7, 80)), "open-flood", now=9.9)

    def test_budget_renews_each_interval(self) -> None:
        server = MuxConnection("server", self.budget(max_opens=3))
        for t, ids in ((0.0, (1, 3, 5)), (10.0, (7, 9, 11)), (20.0, (13, 15, 17))):
            server.receive(raw(*[f for i in ids for f in (Open(i, 80), Reset(i, 0, ""))]), t)
        self.assertFalse(server.closed)

    def test_resets(self) -> None:
        """RESETs for closed streams are ignored but still counted."""
        server = MuxConnection("server", self.budget(max_resets=5))
        server.receive(raw(Open(1, 80), Reset(1, 0, "")), 0)
        server.receive(raw(*[Reset(1, 0, "")] * 4), 1)
        self.assertEnds(server, raw(Reset(1, 0, "")), "reset-flood", now=2)

    def test_pings_and_the_pongs_we_owe(self) -> None:
        """A chunk of 10000 PINGs costs at most max_pings PONGs, then GOAWAY."""
        server = MuxConnection("server", self.budget(max_pings=8))
        events = server.receive(raw(*[Ping(b"pingpong")] * 10000), 0)
        self.assertEqual(events, [ConnectionEnded("ping-flood", by_peer=False)])
        out = sent(server)
        self.assertEqual(out, [Pong(b"pingpong")] * 8 + [GoAway("ping-flood")])

    def test_unsolicited_pongs(self) -> None:
        client = MuxConnection("client", self.budget(max_pings=2))
        self.assertEnds(client, raw(*[Pong(b"pingpong")] * 3), "ping-flood")

    def test_window_updates(self) -> None:
        p = Pair(self.budget(max_window_updates=3))
        s = p.open_accepted()
        p.client.receive(raw(*[Window(s, 1)] * 3), 0)
        self.assertEnds(p.client, raw(Window(s, 1)), "window-flood")

    def test_empty_data(self) -> None:
        p = Pair(self.budget(max_empty_data=3))
        s = p.open_accepted()
        self.assertEqual(p.server.receive(raw(*[Data(s, b"")] * 3), 0), [])
        self.assertEnds(p.server, raw(Data(s, b"")), "empty-data-flood")

    def test_clock_going_backwards_renews(self) -> None:
        server = MuxConnection("server", self.budget(max_pings=2))
        server.receive(raw(Ping(b"12345678"), Ping(b"12345678")), 100.0)
        server.receive(raw(Ping(b"12345678")), 50.0)
        self.assertFalse(server.closed)


ids = st.integers(1, 12)
any_frame = st.one_of(
    st.builds(Open, ids, st.integers(1, 65535)),
    st.builds(Accept, ids),
    st.builds(Data, ids, st.binary(max_size=12)),
    st.builds(Window, ids, st.sampled_from([0, 1, 7, 2**31 - 1])),
    st.builds(HalfClose, ids),
    st.builds(Reset, ids, st.sampled_from([0, 1, 2]), st.sampled_from(["", "x", "port-not-allowed"])),
    st.builds(Ping, st.just(b"12345678")),
    st.builds(Pong, st.just(b"12345678")),
    st.builds(GoAway, st.just("normal")),
)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(["client", "server"]), st.lists(any_frame, max_size=30), st.binary(max_size=20))
    def test_hostile_peer_never_raises(self, side: str, frames: list[Frame], tail: bytes) -> None:
        """Whatever the peer sends: events (or an end with a documented reason), never an exception."""
        conn = MuxConnection(side, MuxSettings(window=10, max_streams=3, max_pings=5))  # type: ignore[arg-type]
        if side == "client":
            for _ in range(3):
                conn.open_stream(80)
        for i, frame in enumerate(frames):
            for event in conn.receive(encode(frame), float(i)):
                if isinstance(event, ConnectionEnded):
                    self.assertTrue(event.reason in PROTOCOL_ERRORS or event.reason in FRAME_ERRORS or event.by_peer, event)
                elif isinstance(event, StreamOpened) and i % 2:
                    conn.accept(event.stream)
                elif isinstance(event, DataReceived):
                    conn.consumed(event.stream, len(event.data))
        conn.receive(tail, 99.0)
        self.assertLessEqual(conn.stream_count, 3)
        self.assertLessEqual(len(conn.data_to_send()), 30 * 30)


class LayerTests(SynchronousTestCase):
    def test_core_imports_no_twisted(self) -> None:
        """frames.py and connection.py are sans-IO: no Twisted, no transport, no clock."""
        import ast

        root = Path(__file__).resolve().parents[1] / "ticrypt" / "mux"
        for name in ("frames.py", "connection.py"):
            tree = ast.parse((root / name).read_text())
            imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            self.assertEqual([m for m in imported if m.split(".")[0] in ("twisted", "time", "socket")], [], name)
