"""ticrypt.nft.denied: NFLOG messages -> denied packets -> audit decisions
(sans-IO, on captured and hand-built bytes), the reader and service with a
fake socket and clocks, and a real drop rule with ``log group`` in a
network namespace."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from test.daemon import daemon_env, run_command
from ticrypt.audit import AuditLog
from ticrypt.lab import daemons
from ticrypt.nft import denied
from ticrypt.nft.denied import (
    DeniedEgressService,
    DeniedFlows,
    DeniedPacket,
    FlowKey,
    NetlinkMessage,
    NflogError,
    NflogReader,
    check_ack,
    nflog_config,
    parse_ip,
    parse_netlink,
    parse_nflog,
)
from ticrypt.service import StartupError

#: one datagram as the kernel sent it: a TCP SYN 10.77.0.2 -> 10.77.5.2:27000
#: dropped by ``log prefix "ticrypt-deny" group 7 drop`` (captured here)
CAPTURED = bytes.fromhex(
    "8800000000040000000000000000000002000007080001000800030011000a00746963727970742d64656e79"
    "00000000080005000000000108000b000000000008000e0000000000400009004500003c6e8740004006b297"
    "0a4d00020a4d0502d82e6978812bff6d00000000a002ffd719cc00000204ffd70402080a479dd35400000000"
    "0103030a")


def attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * ((4 - length % 4) % 4)


def nflog_message(payload: bytes, group: int = 3, prefix: bytes | None = None,
                  kind: int = 0x0400) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(group))
    if prefix is not None:
        body += attr(denied.NFULA_PREFIX, prefix + b"\0")
    body += attr(denied.NFULA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def ipv4(proto: int, src: str, dst: str, l4: bytes, frag: int = 0, ihl: int = 5) -> bytes:
    header = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(l4), 1, frag, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header + b"\0" * (ihl * 4 - 20) + l4


def ipv6(next_header: int, src: str, dst: str, rest: bytes) -> bytes:
    return (struct.pack(">IHBB", 0x60000000, len(rest), next_header, 64)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + rest)


def ports(sport: int, dport: int) -> bytes:
    return struct.pack(">HH", sport, dport) + b"\0" * 16


class ParseTests(SynchronousTestCase):
    def test_captured_datagram(self) -> None:
        [message] = list(parse_netlink(CAPTURED))
        self.assertEqual(parse_nflog(message), DeniedPacket(
            7, FlowKey("10.77.0.2", "10.77.5.2", "tcp", 27000), "ticrypt-deny"))

    def test_several_messages_in_one_datagram(self) -> None:
        one = nflog_message(ipv4(17, "10.0.0.1", "10.0.0.9", ports(5000, 53)))
        two = nflog_message(ipv4(1, "10.0.0.1", "10.0.0.9", b"\x08\0\0\0"), group=65535)
        packets = [parse_nflog(m) for m in parse_netlink(one + two)]
        self.assertEqual(packets, [
            DeniedPacket(3, FlowKey("10.0.0.1", "10.0.0.9", "udp", 53)),
            DeniedPacket(65535, FlowKey("10.0.0.1", "10.0.0.9", "icmp", None))])

    def test_framing_refuses_lies(self) -> None:
        good = nflog_message(ipv4(6, "10.0.0.1", "10.0.0.2", ports(1, 2)))
        self.assertEqual(len(list(parse_netlink(good[:-1]))), 0)  # truncated
        lying = struct.pack("=I", 8) + good[4:]  # length below the header's
        self.assertEqual(list(parse_netlink(lying)), [])
        self.assertEqual(len(list(parse_netlink(good + b"\0" * 7))), 1)  # trailing junk
        self.assertEqual(list(parse_netlink(b"")), [])

    def test_not_packets(self) -> None:
        payload = ipv4(6, "10.0.0.1", "10.0.0.2", ports(1, 2))
        # a config message, an error, no payload, a broken attribute
        self.assertIsNone(parse_nflog(next(parse_netlink(nflog_message(payload, kind=0x0401)))))
        self.assertIsNone(parse_nflog(NetlinkMessage(2, 0, 0, 0, b"\0" * 20)))
        empty = NetlinkMessage(0x0400, 0, 0, 0, struct.pack("=BBH", 2, 0, 0))
        self.assertIsNone(parse_nflog(empty))
        broken = NetlinkMessage(0x0400, 0, 0, 0, struct.pack("=BBH", 2, 0, 0)
                                + struct.pack("=HH", 200, denied.NFULA_PAYLOAD) + payload)
        self.assertIsNone(parse_nflog(broken))
        self.assertIsNone(parse_nflog(NetlinkMessage(0x0400, 0, 0, 0, b"\0")))

    def test_prefix_is_bounded_and_printable(self) -> None:
        payload = ipv4(6, "10.0.0.1", "10.0.0.2", ports(1, 2))
        [message] = parse_netlink(nflog_message(payload, prefix=b"a\x1bb" + b"x" * 200))
        packet = parse_nflog(message)
        assert packet is not None
        self.assertEqual(packet.prefix, "a?b" + "x" * 61)

    def test_ipv4_forms(self) -> None:
        self.assertEqual(parse_ip(ipv4(6, "1.2.3.4", "5.6.7.8", ports(9, 443), ihl=7)),
                         FlowKey("1.2.3.4", "5.6.7.8", "tcp", 443))
        # a later fragment carries no ports; a first one does
        self.assertEqual(parse_ip(ipv4(17, "1.2.3.4", "5.6.7.8", ports(9, 53), frag=0x2000 | 3)),
                         FlowKey("1.2.3.4", "5.6.7.8", "udp", None))
        self.assertEqual(parse_ip(ipv4(17, "1.2.3.4", "5.6.7.8", ports(9, 53), frag=0x2000)),
                         FlowKey("1.2.3.4", "5.6.7.8", "udp", 53))
        # ports cut off by the copy range; an unknown protocol; junk
        self.assertEqual(parse_ip(ipv4(6, "1.2.3.4", "5.6.7.8", b"\0\1")),
                         FlowKey("1.2.3.4", "5.6.7.8", "tcp", None))
        self.assertEqual(parse_ip(ipv4(47, "1.2.3.4", "5.6.7.8", b"")),
                         FlowKey("1.2.3.4", "5.6.7.8", "ip-47", None))
        self.assertIsNone(parse_ip(ipv4(6, "1.2.3.4", "5.6.7.8", b"")[:19]))
        self.assertIsNone(parse_ip(b"\x44" + b"\0" * 30))  # IHL below 5
        self.assertIsNone(parse_ip(b"\x70" + b"\0" * 60))
        self.assertIsNone(parse_ip(b""))

    def test_ipv6_forms(self) -> None:
        self.assertEqual(parse_ip(ipv6(6, "fd00::1", "fd00::2", ports(9, 22))),
                         FlowKey("fd00::1", "fd00::2", "tcp", 22))
        hop = bytes([17, 0]) + b"\0" * 6  # hop-by-hop options, then UDP
        self.assertEqual(parse_ip(ipv6(0, "fd00::1", "fd00::2", hop + ports(9, 53))),
                         FlowKey("fd00::1", "fd00::2", "udp", 53))
        later = bytes([6, 0]) + struct.pack(">H", 8 << 3) + b"\0" * 4
        self.assertEqual(parse_ip(ipv6(44, "fd00::1", "fd00::2", later + ports(9, 22))),
                         FlowKey("fd00::1", "fd00::2", "tcp", None))
        first = bytes([6, 0]) + struct.pack(">H", 1) + b"\0" * 4
        self.assertEqual(parse_ip(ipv6(44, "fd00::1", "fd00::2", first + ports(9, 22))),
                         FlowKey("fd00::1", "fd00::2", "tcp", 22))
        # a chain of extension headers longer than we walk: no port
        chain = bytes([60, 0]) + b"\0" * 6
        many = chain * 9 + ports(9, 22)
        self.assertEqual(parse_ip(ipv6(60, "fd00::1", "fd00::2", many)),
                         FlowKey("fd00::1", "fd00::2", "ip-60", None))
        # an extension header cut off by the copy range
        self.assertEqual(parse_ip(ipv6(0, "fd00::1", "fd00::2", b"\x06")),
                         FlowKey("fd00::1", "fd00::2", "ip-0", None))
        self.assertIsNone(parse_ip(ipv6(6, "fd00::1", "fd00::2", b"")[:39]))


class ConfigMessageTests(SynchronousTestCase):
    def test_bind_mode_timeout(self) -> None:
        messages = nflog_config(513, copy_range=96, flush_cs=5, seq=10)
        self.assertEqual(len(messages), 3)
        for seq, raw in enumerate(messages, 10):
            length, kind, flags, got_seq, pid = struct.unpack_from("=IHHII", raw)
            self.assertEqual((length, kind, flags, got_seq, pid),
                             (len(raw), 0x0401, 0x5, seq, 0))
            self.assertEqual(raw[16:20], bytes([0, 0, 2, 1]))  # group 513, big-endian
        self.assertEqual(messages[0][20:], attr(1, b"\x01"))
        self.assertEqual(messages[1][20:], attr(2, struct.pack(">IBB", 96, 2, 0)))
        self.assertEqual(messages[2][20:], attr(4, struct.pack(">I", 5)))
        self.assertRaises(ValueError, nflog_config, 65536)

    def test_acks(self) -> None:
        self.assertEqual(check_ack(NetlinkMessage(2, 0, 1, 0, struct.pack("=i", 0))), 0)
        self.assertEqual(check_ack(NetlinkMessage(2, 0, 1, 0, struct.pack("=i", -errno.EBUSY))),
                         errno.EBUSY)
        self.assertIsNone(check_ack(NetlinkMessage(3, 0, 1, 0, b"")))
        self.assertIsNone(check_ack(NetlinkMessage(2, 0, 1, 0, b"\0")))


def packet(dst: str = "10.77.5.2", port: int | None = 80, src: str = "10.77.3.11") -> DeniedPacket:
    return DeniedPacket(7, FlowKey(src, dst, "tcp", port), "deny")


class FlowTests(SynchronousTestCase):
    def test_one_line_per_flow_with_counts(self) -> None:
        clock = task.Clock()
        clock.advance(100)
        flows = DeniedFlows(clock)
        for _ in range(3):
            flows.observe(packet())
        flows.observe(packet(port=443))
        self.assertEqual(len(flows), 2)
        clock.advance(5)
        self.assertEqual(flows.flush(), [
            ("egress-denied", {"vm": "10.77.3.11", "destination": "10.77.5.2", "protocol": "tcp",
                               "port": 80, "count": 3, "group": 7, "first": 100.0,
                               "rule": "deny"}),
            ("egress-denied", {"vm": "10.77.3.11", "destination": "10.77.5.2", "protocol": "tcp",
                               "port": 443, "count": 1, "group": 7, "first": 100.0,
                               "rule": "deny"})])
        self.assertEqual(flows.flush(), [])  # nothing new: nothing written

    def test_flood_is_bounded(self) -> None:
        clock = task.Clock()
        flows = DeniedFlows(clock, max_flows=10, lines_per_interval=4, interval=60)
        for port in range(1, 1001):  # a port scan: 1000 flows in one window
            flows.observe(packet(port=port))
        self.assertEqual(len(flows), 10)
        self.assertEqual(flows.untracked_packets, 990)
        clock.advance(5)
        lines = flows.flush()
        self.assertEqual([f["port"] for _, f in lines], [1, 2, 3, 4])
        for port in range(1, 5):  # more in the same interval: all suppressed
            flows.observe(packet(port=port))
        clock.advance(5)
        self.assertEqual(flows.flush(), [])
        flows.lost += 2
        clock.advance(50)  # the interval ends: one summary line, then fresh quota
        flows.observe(packet(dst="10.77.4.2"))
        lines = flows.flush()
        self.assertEqual(lines[0], ("egress-denied-suppressed", {
            "flows": 10, "packets": 10, "untracked_packets": 990, "lost": 2, "since": 0.0}))
        self.assertEqual(lines[1][1]["destination"], "10.77.4.2")
        self.assertEqual(len(lines), 2)
        clock.advance(60)
        self.assertEqual(flows.flush(), [])  # a quiet interval writes nothing

    def test_final_flush_reports_suppressed(self) -> None:
        clock = task.Clock()
        flows = DeniedFlows(clock, lines_per_interval=1)
        flows.observe(packet(port=1))
        flows.observe(packet(port=2))
        lines = flows.flush(final=True)
        self.assertEqual([e for e, _ in lines], ["egress-denied", "egress-denied-suppressed"])
        self.assertEqual(lines[1][1]["flows"], 1)


class FakeSocket:
    def __init__(self, reads: list[bytes | OSError]) -> None:
        self.reads = reads
        self.closed = False

    def recv(self, size: int) -> bytes:
        if not self.reads:
            raise BlockingIOError()
        item = self.reads.pop(0)
        if isinstance(item, OSError):
            raise item
        return item[:size]

    def fileno(self) -> int:
        return 99

    def close(self) -> None:
        self.closed = True


def denied_datagram(port: int) -> bytes:
    return nflog_message(ipv4(6, "10.77.3.11", "10.77.5.2", ports(40000, port)), group=7)


class ReaderTests(SynchronousTestCase):
    def test_reads_a_batch_per_turn_and_counts_losses(self) -> None:
        sock = FakeSocket([denied_datagram(1), OSError(errno.ENOBUFS, "No buffer space"),
                           denied_datagram(2) + denied_datagram(3), b"junk", denied_datagram(4)])
        got: list[DeniedPacket] = []
        lost: list[None] = []
        reader = NflogReader(sock, got.append, lambda: lost.append(None),  # type: ignore[arg-type]
                             batch=4)
        reader.doRead()
        self.assertEqual([p.flow.port for p in got], [1, 2, 3])
        self.assertEqual(len(lost), 1)
        reader.doRead()
        self.assertEqual([p.flow.port for p in got], [1, 2, 3, 4])
        reader.doRead()  # would block: returns
        self.assertEqual(reader.fileno(), 99)

    def test_other_errors_end_the_reader(self) -> None:
        sock = FakeSocket([OSError(errno.EBADF, "Bad file descriptor")])
        reader = NflogReader(sock, lambda p: None, lambda: None)  # type: ignore[arg-type]
        self.assertRaises(OSError, reader.doRead)


class ServiceTests(SynchronousTestCase):
    def audit_lines(self, path: str) -> list[dict[str, Any]]:
        with open(path) as f:
            return [json.loads(line) for line in f]

    def test_reads_and_audits_each_window(self) -> None:
        sock = FakeSocket([denied_datagram(25), denied_datagram(25)])
        mem = MemoryReactorClock()
        clock = task.Clock()
        path = self.mktemp()
        audit = AuditLog(path, clock, "vmc")
        self.addCleanup(audit.close)
        opened: list[int] = []

        def open_socket(group: int) -> Any:
            opened.append(group)
            return sock

        svc = DeniedEgressService(7, audit, mem, clock, window=5, open_socket=open_socket)
        svc.startService()
        self.assertEqual(opened, [7])
        [reader] = mem.getReaders()
        reader.doRead()  # type: ignore[attr-defined]
        clock.advance(4.9)
        self.assertEqual(self.audit_lines(path), [])
        clock.advance(0.1)
        [line] = self.audit_lines(path)
        self.assertEqual((line["event"], line["vm"], line["destination"], line["port"],
                          line["count"], line["protocol"], line["role"]),
                         ("egress-denied", "10.77.3.11", "10.77.5.2", 25, 2, "tcp", "vmc"))
        sock.reads.append(denied_datagram(26))
        reader.doRead()  # type: ignore[attr-defined]
        svc.stopService()  # the last window is written at stop
        self.assertEqual([e["port"] for e in self.audit_lines(path)], [25, 26])
        self.assertEqual(mem.getReaders(), [])
        self.assertTrue(sock.closed)
        clock.advance(60)  # the loop is stopped
        self.assertEqual(len(self.audit_lines(path)), 2)

    def test_bind_failure_is_a_startup_error(self) -> None:
        def refuse(group: int) -> Any:
            raise NflogError(f"cannot bind NFLOG group {group}: Device or resource busy "
                             "(another process reads this group)")

        svc = DeniedEgressService(7, AuditLog(None, task.Clock()), MemoryReactorClock(),
                                  task.Clock(), open_socket=refuse)
        e = self.assertRaises(StartupError, svc.startService)
        self.assertEqual(e.message, "cannot bind NFLOG group 7: Device or resource busy "
                                    "(another process reads this group)")
        self.assertFalse(svc.running)


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[3] == "udp" else socket.SOCK_STREAM)
s.settimeout(0.3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.send(b"x")
    s.recv(1)
    print("reached")
except OSError as e:
    print("blocked", type(e).__name__)
"""


class NamespaceTests(TestCase):
    """A drop rule with ``log group`` in a namespace this test creates; the
    reader runs there; a connection attempt becomes an audit line."""

    timeout = 60

    def sh(self, *argv: str, stdin: str | None = None) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, input=stdin)
        if proc.returncode:
            raise AssertionError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        return proc.stdout

    async def test_denied_connection_is_audited(self) -> None:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
            raise self.skipTest("needs root, ip and nft")  # type: ignore[misc]
        if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
            raise self.skipTest("ip netns is not usable here")  # type: ignore[misc]
        ns = f"tc-{os.getpid()}-nflog"
        self.sh("ip", "netns", "add", ns)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", ns], capture_output=True)
        self.sh("ip", "-n", ns, "link", "set", "lo", "up")
        # a veth pair with both ends inside: an interface to route 10.77.0.0/16 out of
        self.sh("ip", "-n", ns, "link", "add", "vm0", "type", "veth", "peer", "name", "vm1")
        self.sh("ip", "-n", ns, "addr", "add", "10.77.3.11/16", "dev", "vm0")
        self.sh("ip", "-n", ns, "link", "set", "vm0", "up")
        self.sh("ip", "-n", ns, "link", "set", "vm1", "up")
        self.sh("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=(
            "table inet t {\n chain out {\n  type filter hook output priority 0; policy accept;\n"
            '  ip daddr 10.77.5.2 log prefix "ticrypt-deny" group 7 drop\n }\n}\n'))

        path = os.path.abspath(self.mktemp())
        ip = shutil.which("ip")
        assert ip is not None
        proc = daemons.Daemon("denied", reactor, 20.0)
        argv = [ip, "netns", "exec", ns, sys.executable, "-m", "ticrypt.nft.denied",
                "--group", "7", "--audit-log", path, "--window", "0.2"]
        reactor.spawnProcess(proc, ip, argv, env=daemon_env())  # type: ignore[attr-defined]
        self.addCleanup(proc.stop)
        await proc.ready

        for port, proto in ((27000, "tcp"), (27000, "tcp"), (53, "udp")):
            code, out, err = await run_command(["ip", "netns", "exec", ns, sys.executable, "-c",
                                                CONNECT, "10.77.5.2", str(port), proto])
            self.assertEqual((code, out.split()[0]), (0, "blocked"), err)
        # a second reader of the same group is refused with one line
        code, out, err = await run_command(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "ticrypt.nft.denied",
             "--group", "7", "--audit-log", path + ".2"], env=daemon_env())
        self.assertEqual((code, err.strip()), (1, "ticrypt.nft.denied: cannot bind NFLOG group "
                                                  "7: Operation not permitted (another process "
                                                  "reads this group, or no CAP_NET_ADMIN)"))
        await proc.stop()
        with open(path) as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual({(e["event"], e["rule"], e["group"]) for e in lines},
                         {("egress-denied", "ticrypt-deny", 7)})
        counts: dict[tuple[str, str, str, int], int] = {}
        for e in lines:  # a flow may span windows: one line per window
            key = (e["vm"], e["destination"], e["protocol"], e["port"])
            counts[key] = counts.get(key, 0) + e["count"]
        self.assertEqual(set(counts), {("10.77.3.11", "10.77.5.2", "tcp", 27000),
                                       ("10.77.3.11", "10.77.5.2", "udp", 53)})
        # two connects, a SYN each (perhaps retransmitted): at least two packets
        self.assertGreaterEqual(counts["10.77.3.11", "10.77.5.2", "tcp", 27000], 2)
