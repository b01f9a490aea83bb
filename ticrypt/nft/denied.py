"""Denied-egress audit: packets that hit a drop rule with ``log group N``
(NFLOG) are read from userspace and written as one JSON audit line per flow.

Why NFLOG through a stdlib netlink socket: the kernel's printk ``log``
statement shows nothing inside a network namespace, nft's ``queue``
statement is unavailable on the kernels we target, and an NFQUEUE reader
would sit in the packet path (a slow reader delays verdicts).  NFLOG is a
copy: the drop happens in the kernel whatever the reader does, it works in
every network namespace, and needs no library beyond ``socket``.

Layers, as everywhere in ticrypt:

* sans-IO: :func:`nflog_config` builds the netlink config requests,
  :func:`parse_netlink` splits a datagram into messages, :func:`check_ack`
  reads the kernel's answer to a request, :func:`parse_nflog` turns one
  NFLOG packet message into a :class:`DeniedPacket` (addresses, protocol
  and port from the IP header in ``NFULA_PAYLOAD``), and
  :class:`DeniedFlows` aggregates packets per flow over a window and
  decides which audit lines to write (a bounded flow table, a cap of lines
  per interval, counters of what was suppressed), so a flood of denied
  packets cannot fill the disk;
* IO: :func:`open_nflog` binds a socket to a group, :class:`NflogReader`
  is the reactor's ``IReadDescriptor`` for it, and
  :class:`DeniedEgressService` ties reader, aggregator, clock and audit
  log together for any role (vmc, vmhost, allowedlist) to add to its
  service tree.

``python -m ticrypt.nft.denied --group N --audit-log PATH`` runs the
reader alone (for an operator, and for tests of rules a role does not own).
"""

from __future__ import annotations

import argparse
import errno as errno_mod
import ipaddress
import os
import socket
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ticrypt.audit import AuditLog
from ticrypt.service import StartupError, start_loop, stop_loop

__all__ = [
    "NETLINK_NETFILTER",
    "DeniedEgressService",
    "DeniedFlows",
    "DeniedPacket",
    "FlowKey",
    "NetlinkMessage",
    "NflogError",
    "NflogReader",
    "check_ack",
    "nflog_config",
    "open_nflog",
    "parse_ip",
    "parse_netlink",
    "parse_nflog",
]

NETLINK_NETFILTER = 12

# linux/netlink.h
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian value)
_NLATTR = struct.Struct("=HH")

# linux/netfilter/nfnetlink.h, nfnetlink_log.h
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH = 1, 2, 3, 4, 5
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2
NFULA_PACKET_HDR, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV = 1, 4, 5
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10

#: bytes of each packet the kernel copies to us: IPv6 header, a few
#: extension headers and the ports fit; nothing of the payload is kept.
COPY_RANGE = 128
#: a message longer than this is not one NFLOG packet of ours: skipped
MAX_MESSAGE = 64 * 1024
#: how many IPv6 extension headers we walk before giving up on the ports
MAX_EXT_HEADERS = 8
#: bytes kept of a rule's log prefix
MAX_PREFIX = 64

_IPV6_EXT = frozenset({0, 43, 44, 60})  # hop-by-hop, routing, fragment, dest opts
_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
_PORTED = frozenset({6, 17, 132})


class NflogError(Exception):
    """The NFLOG socket could not be set up; ``str()`` is one line."""


# -- netlink messages (sans-IO) ---------------------------------------------

@attrs.frozen
class NetlinkMessage:
    type: int
    flags: int
    seq: int
    pid: int
    body: bytes


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, value: bytes) -> bytes:
    length = _NLATTR.size + len(value)
    return _NLATTR.pack(length, kind) + value + b"\0" * (_align(length) - length)


def _config(group: int, attrs_: bytes, seq: int, family: int = socket.AF_UNSPEC) -> bytes:
    body = _NFGENMSG.pack(family, 0, socket.htons(group)) + attrs_
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                          NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def nflog_config(group: int, *, copy_range: int = COPY_RANGE, flush_cs: int = 10,
                 seq: int = 1) -> list[bytes]:
    """The requests that bind a socket to NFLOG ``group`` (0..65535): bind,
    copy mode (``copy_range`` bytes of each packet), and a flush timeout of
    ``flush_cs`` hundredths of a second, so a lone denied packet reaches us
    promptly.  Sequence numbers ``seq``, ``seq + 1``, ...; each is acked."""
    if not 0 <= group <= 65535:
        raise ValueError(f"NFLOG group out of range: {group}")
    return [
        _config(group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND])), seq),
        _config(group, _attr(NFULA_CFG_MODE, struct.pack(">IBB", copy_range,
                                                         NFULNL_COPY_PACKET, 0)), seq + 1),
        _config(group, _attr(NFULA_CFG_TIMEOUT, struct.pack(">I", flush_cs)), seq + 2),
    ]


def parse_netlink(data: bytes) -> Iterator[NetlinkMessage]:
    """The messages of one datagram.  A truncated or lying header ends the
    walk (the rest of a datagram cannot be framed without it)."""
    offset = 0
    view = memoryview(data)
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return
        yield NetlinkMessage(kind, flags, seq, pid, bytes(view[offset + _NLMSGHDR.size:
                                                               offset + length]))
        offset += _align(length)


def _attributes(data: bytes) -> dict[int, bytes]:
    """Top-level attributes (the first of each type); a malformed one ends
    the walk."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > len(data):
            break
        found.setdefault(kind & NLA_TYPE_MASK, data[offset + _NLATTR.size:offset + length])
        offset += _align(length)
    return found


def check_ack(message: NetlinkMessage) -> int | None:
    """For an ``NLMSG_ERROR`` message: 0 (an ack) or the errno the kernel
    refused with; None for any other message."""
    if message.type != NLMSG_ERROR or len(message.body) < 4:
        return None
    (code,) = struct.unpack_from("=i", message.body)
    return -code


# -- packets and flows ------------------------------------------------------

@attrs.frozen
class FlowKey:
    """What a denied flow is: who, to where, which protocol and port (None
    for protocols without ports and for non-first fragments)."""

    source: str
    destination: str
    protocol: str
    port: int | None


@attrs.frozen
class DeniedPacket:
    group: int
    flow: FlowKey
    prefix: str = ""


def parse_ip(payload: bytes) -> FlowKey | None:
    """The flow of an IPv4 or IPv6 packet (from its first bytes), or None
    when the header is not one."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4:
        if len(payload) < 20:
            return None
        ihl = (payload[0] & 0x0F) * 4
        if ihl < 20:
            return None
        proto = payload[9]
        src = str(ipaddress.IPv4Address(payload[12:16]))
        dst = str(ipaddress.IPv4Address(payload[16:20]))
        fragment_offset = struct.unpack_from(">H", payload, 6)[0] & 0x1FFF
        l4 = ihl if fragment_offset == 0 else None
    elif version == 6:
        if len(payload) < 40:
            return None
        proto = payload[6]
        src = str(ipaddress.IPv6Address(payload[8:24]))
        dst = str(ipaddress.IPv6Address(payload[24:40]))
        offset: int | None = 40
        for _ in range(MAX_EXT_HEADERS):
            if proto not in _IPV6_EXT or offset is None:
                break
            if len(payload) < offset + 8:
                offset = None
                break
            next_proto = payload[offset]
            if proto == 44:  # fragment: fixed 8 bytes; ports only in the first
                if struct.unpack_from(">H", payload, offset + 2)[0] & 0xFFF8:
                    offset = None
                else:
                    offset += 8
            else:
                offset += (payload[offset + 1] + 1) * 8
            proto = next_proto
        else:
            offset = None  # too many extension headers: no ports
        l4 = offset if proto not in _IPV6_EXT else None
    else:
        return None
    port = None
    if proto in _PORTED and l4 is not None and len(payload) >= l4 + 4:
        port = struct.unpack_from(">H", payload, l4 + 2)[0]
    return FlowKey(src, dst, _PROTOCOLS.get(proto, f"ip-{proto}"), port)


def parse_nflog(message: NetlinkMessage) -> DeniedPacket | None:
    """The denied packet an NFLOG packet message reports, or None when the
    message is something else or carries no IP header we can read."""
    if message.type != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
        return None
    if len(message.body) < _NFGENMSG.size or len(message.body) > MAX_MESSAGE:
        return None
    _, _, res_id = _NFGENMSG.unpack_from(message.body)
    found = _attributes(message.body[_NFGENMSG.size:])
    payload = found.get(NFULA_PAYLOAD)
    if payload is None:
        return None
    flow = parse_ip(payload)
    if flow is None:
        return None
    raw = found.get(NFULA_PREFIX, b"").split(b"\0", 1)[0][:MAX_PREFIX]
    prefix = "".join(c if c.isprintable() else "?" for c in raw.decode("ascii", "replace"))
    return DeniedPacket(socket.ntohs(res_id), flow, prefix)


class Clock(Protocol):
    def seconds(self) -> float: ...


@attrs.define
class _Flow:
    group: int
    prefix: str
    first: float
    count: int = 0


class DeniedFlows:
    """Aggregates denied packets per flow and decides the audit lines.

    :meth:`observe` counts a packet in its flow (at most ``max_flows``
    flows are tracked; packets of further flows are only counted as
    ``untracked``).  :meth:`flush` (called each window by the service)
    returns one ``egress-denied`` record per flow seen since the last
    flush, at most ``lines_per_interval`` of them per ``interval`` seconds;
    flows past that cap are counted, and the counts come out as one
    ``egress-denied-suppressed`` record when the interval ends.  So the
    log grows by at most ``lines_per_interval + 1`` lines per interval,
    whatever arrives."""

    def __init__(self, clock: Clock, *, max_flows: int = 4096, lines_per_interval: int = 120,
                 interval: float = 60.0) -> None:
        self._clock = clock
        self.max_flows = max_flows
        self.lines_per_interval = lines_per_interval
        self.interval = interval
        self._flows: OrderedDict[FlowKey, _Flow] = OrderedDict()
        self._interval_start = clock.seconds()
        self._lines = 0
        self.suppressed_flows = 0
        self.suppressed_packets = 0
        self.untracked_packets = 0
        self.lost = 0  # datagrams the kernel dropped (ENOBUFS), told by the reader

    def __len__(self) -> int:
        return len(self._flows)

    def observe(self, packet: DeniedPacket) -> None:
        flow = self._flows.get(packet.flow)
        if flow is None:
            if len(self._flows) >= self.max_flows:
                self.untracked_packets += 1
                return
            flow = self._flows[packet.flow] = _Flow(packet.group, packet.prefix,
                                                    self._clock.seconds())
        flow.count += 1

    def flush(self, final: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """(event, fields) to audit now; ``final`` also ends the interval
        (at shutdown)."""
        now = self._clock.seconds()
        out: list[tuple[str, dict[str, Any]]] = []
        if now - self._interval_start >= self.interval:
            out.extend(self._end_interval(now))
        for key, flow in self._flows.items():
            if self._lines < self.lines_per_interval:
                self._lines += 1
                fields: dict[str, Any] = {
                    "vm": key.source, "destination": key.destination, "protocol": key.protocol,
                    "port": key.port, "count": flow.count, "group": flow.group,
                    "first": round(flow.first, 3)}
                if flow.prefix:
                    fields["rule"] = flow.prefix
                out.append(("egress-denied", fields))
            else:
                self.suppressed_flows += 1
                self.suppressed_packets += flow.count
        self._flows.clear()
        if final:
            out.extend(self._end_interval(now))
        return out

    def _end_interval(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        out: list[tuple[str, dict[str, Any]]] = []
        if self.suppressed_flows or self.untracked_packets or self.lost:
            out.append(("egress-denied-suppressed", {
                "flows": self.suppressed_flows, "packets": self.suppressed_packets,
                "untracked_packets": self.untracked_packets, "lost": self.lost,
                "since": round(self._interval_start, 3)}))
        self.suppressed_flows = self.suppressed_packets = self.untracked_packets = 0
        self.lost = 0
        self._lines = 0
        self._interval_start = now
        return out


# -- IO: the socket and the reactor ------------------------------------------

def open_nflog(group: int, *, rcvbuf: int = 1024 * 1024) -> socket.socket:
    """A non-blocking netlink socket bound to NFLOG ``group``; NflogError
    with one line when the kernel refuses (no permission, group taken)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except (OSError, AttributeError) as e:
        raise NflogError(f"cannot open a netfilter netlink socket: {_why(e)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, 0))
        sock.settimeout(5.0)
        for request in nflog_config(group):
            sock.send(request)
            (seq,) = struct.unpack_from("=I", request, 8)
            while True:
                answer = [m for m in parse_netlink(sock.recv(65536)) if m.seq == seq]
                code = check_ack(answer[0]) if answer else None
                if code is not None:
                    break
            if code:
                # the kernel says EPERM both without CAP_NET_ADMIN and when
                # another socket has bound the group
                hint = {errno_mod.EPERM: " (another process reads this group, or no "
                                         "CAP_NET_ADMIN)"}.get(code, "")
                raise NflogError(f"cannot bind NFLOG group {group}: "
                                 f"{os.strerror(code)}{hint}")
        sock.setblocking(False)
    except NflogError:
        sock.close()
        raise
    except OSError as e:
        sock.close()
        raise NflogError(f"cannot bind NFLOG group {group}: {_why(e)}") from None
    return sock


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


@implementer(IReadDescriptor)
class NflogReader:
    """Reads NFLOG datagrams when the reactor says the socket is readable
    (at most ``batch`` per turn, so a flood shares the reactor) and hands
    each denied packet to ``on_packet``; ``on_lost`` hears of datagrams
    the kernel dropped because we were behind (ENOBUFS)."""

    log = Logger()

    def __init__(self, sock: socket.socket, on_packet: Callable[[DeniedPacket], None],
                 on_lost: Callable[[], None], batch: int = 64) -> None:
        self._sock = sock
        self._on_packet = on_packet
        self._on_lost = on_lost
        self._batch = batch

    def fileno(self) -> int:
        return self._sock.fileno()

    def logPrefix(self) -> str:
        return "nflog"

    def doRead(self) -> None:
        for _ in range(self._batch):
            try:
                data = self._sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno_mod.ENOBUFS:
                    self._on_lost()
                    continue
                raise
            for message in parse_netlink(data):
                packet = parse_nflog(message)
                if packet is not None:
                    self._on_packet(packet)

    def connectionLost(self, reason: Failure) -> None:
        self._sock.close()


class DeniedEgressService(Service):
    """Reads NFLOG ``group`` and writes ``egress-denied`` lines to ``audit``
    each ``window`` seconds (clock and reactor injected)."""

    log = Logger()

    def __init__(self, group: int, audit: AuditLog, reactor: IReactorFDSet, clock: Any, *,
                 window: float = 5.0, flows: DeniedFlows | None = None,
                 open_socket: Callable[[int], socket.socket] = open_nflog) -> None:
        self.group = group
        self._audit = audit
        self._reactor = reactor
        self._clock = clock
        self._window = window
        self.flows = flows if flows is not None else DeniedFlows(clock)
        self._open = open_socket
        self._reader: NflogReader | None = None
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        try:
            sock = self._open(self.group)
        except NflogError as e:
            raise StartupError(str(e)) from None
        super().startService()
        self._reader = NflogReader(sock, self.flows.observe, self._lost)
        self._reactor.addReader(self._reader)
        self._loop = start_loop(self.flush, self._clock, self._window, now=False,
                                failed=lambda f: self.log.failure("denied-egress flush loop stopped", f))

    def _lost(self) -> None:
        self.flows.lost += 1

    def flush(self, final: bool = False) -> None:
        try:
            for event, fields in self.flows.flush(final):
                self._audit.write(event, **fields)
        except Exception:
            self.log.failure("denied-egress: could not write the audit lines")

    def stopService(self) -> None:
        super().stopService()
        stop_loop(self._loop)
        if self._reader is not None:
            self._reactor.removeReader(self._reader)
            self._reader.connectionLost(Failure(ConnectionError("stopped")))
            self._reader = None
        self.flush(final=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the reader alone until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m ticrypt.nft.denied",
        description="Write one JSON audit line per flow denied by rules with 'log group N'.")
    parser.add_argument("--group", type=int, required=True, help="NFLOG group (0..65535)")
    parser.add_argument("--audit-log", required=True, help="JSON-lines file to append to")
    parser.add_argument("--window", type=float, default=1.0, help="seconds per aggregation")
    args = parser.parse_args(argv)

    import json

    from twisted.internet import reactor

    from ticrypt.service import READY_MARKER

    audit = AuditLog(args.audit_log, reactor, "denied")  # type: ignore[arg-type]
    service = DeniedEgressService(args.group, audit, reactor, reactor,  # type: ignore[arg-type]
                                  window=args.window)
    try:
        service.startService()
    except StartupError as e:
        print(f"ticrypt.nft.denied: {e.message}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    print(f"{READY_MARKER} {json.dumps({'role': 'denied', 'group': args.group})}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
    audit.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
