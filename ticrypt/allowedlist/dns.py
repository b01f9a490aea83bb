"""The allow-list's DNS responder: twisted.names protocols around the
sans-IO :class:`~ticrypt.allowedlist.policy.Policy`.

One :class:`AllowListServer` (a :class:`twisted.names.server.DNSServerFactory`)
serves UDP (:class:`UDPProtocol`) and TCP (:class:`TCPProtocol`, built by the
factory).  Every query is hostile:

* from outside ``vm_networks`` it is DROPPED, not answered (answering REFUSED
  would make us a reflector and tell scanners we exist); a TCP connection
  from outside is aborted at once;
* a query larger than :data:`MAX_QUERY`, or not exactly one well-formed
  question, is dropped and counted;
* each client has its own token bucket, its own cap on TCP connections and
  on queries waiting for the firewall, so one client cannot starve others;
* an answer goes out only once the firewall admits the name (``admitter``);
  a name it does not admit within ``answer_wait`` gets SERVFAIL;
* over UDP a reply larger than ``udp_size`` loses its records and gets TC.

Over UDP a query whose bytes after the ID were seen before is answered from
a cache of replies (:class:`UDPProtocol`): only its source, size and the
client's bucket are checked again, and the 2-byte ID is put in front of the
cached reply.  Each cached reply remembers the policy state it was decided
with (the entries tuple, the name's admitted address) and is used only while
that state is still the policy's, so a removed entry or a changed admission
is never answered from it.  The key is the query as sent (a name asked in
another case is another key: the reply echoes the question as sent).

:attr:`AllowListServer.counters` counts every outcome (for logs and tests).
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol, overload

import attrs
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.names import dns, server

from ticrypt.allowedlist.policy import (
    Decision,
    Entry,
    Kind,
    Policy,
    Question,
    TokenBuckets,
    question,
    reply,
)
from ticrypt.timers import cancel_call

__all__ = ["MAX_CACHED", "MAX_QUERY", "Admitter", "AllowListServer", "TCPProtocol", "UDPProtocol"]

#: Largest query accepted (a question is at most 259 bytes, plus EDNS0).
MAX_QUERY = 512
#: Reply size over UDP without EDNS0 (RFC 1035).
UDP_SIZE = 512
#: Cached UDP replies at most (emptied when full: a client cycling through
#: names or random EDNS0 cookies costs the slow path, never memory).
MAX_CACHED = 4096


class Admitter(Protocol):
    """The firewall side: fires when ``name`` is admitted (cancel is fine)."""

    def wait(self, name: str, entry: Entry) -> defer.Deferred[None]: ...


@attrs.frozen
class Query:
    """One received query: the raw bytes and its :class:`Question`.  Only
    the header and the question are read (twisted.names' full Message
    decoding and encoding cost ~10x more per query; the reply is built from
    the query's own bytes by :func:`~ticrypt.allowedlist.policy.reply`)."""

    raw: bytes
    question: Question

    @property
    def opcode(self) -> int:
        return (self.raw[2] >> 3) & 0x0F


def _parse(data: bytes) -> Query | None:
    q = question(data)
    return None if q is None else Query(data, q)


@attrs.frozen
class _Cached:
    """A UDP reply after its ID, and what it was decided with."""

    entries: tuple[Entry, ...]
    admitted: str | None
    decision: Decision
    tail: bytes
    truncated: bool


class UDPProtocol(protocol.DatagramProtocol):
    """Queries over UDP: source and size checked before anything else,
    then the client's bucket; a query seen before is answered from the
    server's cache of replies (see the module's text), any other is parsed
    and decided by :meth:`AllowListServer.messageReceived`."""

    noisy = False

    def __init__(self, controller: AllowListServer, reactor: Any = None) -> None:
        self.controller = controller
        self._sendto: Callable[[bytes, tuple[str, int]], object] | None = None

    def startProtocol(self) -> None:
        # the port's own socket when it has one: udp.Port.write checks the
        # address (three parses of it) and logs a full send buffer as an
        # error; the address came from recvfrom, and a reply the kernel
        # cannot take is counted and dropped (the client asks again)
        sock = getattr(self.transport, "socket", None)
        self._sendto = sock.sendto if isinstance(sock, socket.socket) else None

    def stopProtocol(self) -> None:
        self._sendto = None

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        c = self.controller
        policy = c.policy
        host = addr[0]
        if not policy.inside(host):
            c.outsider(host, "udp")
            return
        if len(data) > MAX_QUERY:
            c.counters["dropped-oversized"] += 1
            return
        hit = c.udp_cache.get(data[2:])
        if hit is not None and hit.entries is policy.entries and (
                hit.decision.name is None or policy.admitted.get(hit.decision.name) == hit.admitted):
            now = c.clock.seconds()
            if not policy.buckets.take(host, now):
                c.counters["dropped-rate"] += 1
                return
            c.account(hit.decision, host, now)
            if hit.truncated:
                c.counters["truncated"] += 1
            self.send(data[:2] + hit.tail, addr)
            return
        m = _parse(data)
        if m is None:
            c.counters["dropped-malformed"] += 1
            return
        c.messageReceived(m, self, addr)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._sendto is not None:
            try:
                self._sendto(data, addr)
            except OSError:
                self.controller.counters["send-failed"] += 1
            return
        transport: Any = self.transport
        if transport is not None:
            transport.write(data, addr)


class TCPProtocol(dns.DNSProtocol):
    """Queries over TCP (2-byte length prefix), with an idle timeout and a
    cap on the queries of one connection waiting at once."""

    MAX_LENGTH = MAX_QUERY
    factory: AllowListServer
    controller: AllowListServer

    def __init__(self, controller: AllowListServer, reactor: Any = None) -> None:
        super().__init__(controller, reactor)
        self.peer_host = ""
        self._idle: IDelayedCall | None = None

    def _abort(self) -> None:
        transport: Any = self.transport
        transport.abortConnection()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer_host = getattr(self.transport.getPeer(), "host", "")
        c = self.controller
        if not c.policy.inside(self.peer_host):
            c.outsider(self.peer_host, "tcp")
            self._abort()
            return
        if not c.tcp_open(self.peer_host):
            c.counters["dropped-tcp-cap"] += 1
            self._abort()
            return
        super().connectionMade()
        self._touch()

    def connectionLost(self, reason: Any = None) -> None:
        cancel_call(self._idle)
        if self.peer_host and self in self.controller.connections:
            self.controller.tcp_closed(self.peer_host)
            super().connectionLost(reason)

    def _touch(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.controller.tcp_idle)
        else:
            self._idle = self.controller.clock.callLater(self.controller.tcp_idle, self._expire)

    def _expire(self) -> None:
        self.controller.counters["tcp-idle-closed"] += 1
        self._abort()

    def lengthLimitExceeded(self, length: int) -> None:
        self.controller.counters["dropped-oversized"] += 1
        self._abort()

    def stringReceived(self, data: bytes) -> None:
        self._touch()
        m = _parse(data)
        if m is None:
            self.controller.counters["dropped-malformed"] += 1
            return
        self.controller.messageReceived(m, self)


class _ReplySetting:
    """An int setting of :class:`AllowListServer` that its replies depend
    on: setting it empties the server's ``udp_cache``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = "_" + name

    @overload
    def __get__(self, server: None, owner: type) -> _ReplySetting: ...
    @overload
    def __get__(self, server: AllowListServer, owner: type) -> int: ...
    def __get__(self, server: AllowListServer | None, owner: type) -> _ReplySetting | int:
        return self if server is None else getattr(server, self._slot)  # type: ignore[no-any-return]

    def __set__(self, server: AllowListServer, value: int) -> None:
        setattr(server, self._slot, value)
        server.udp_cache = {}


class AllowListServer(server.DNSServerFactory):
    """Decides with the policy, waits for the firewall, replies."""

    log = Logger()
    protocol = TCPProtocol  # type: ignore[assignment]
    noisy = False
    #: the TTL of our answers, and the largest UDP reply
    answer_ttl = _ReplySetting()
    udp_size = _ReplySetting()

    def __init__(self, policy: Policy, clock: IReactorTime, *, admitter: Admitter | None = None,
                 answer_ttl: int = 60, answer_wait: float = 3.0, udp_size: int = UDP_SIZE,
                 max_waiting: int = 1024, max_waiting_per_client: int = 16,
                 max_tcp: int = 1024, max_tcp_per_client: int = 8,
                 tcp_idle: float = 10.0, audit: Callable[..., None] | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.clock = clock
        self.admitter = admitter
        self.answer_ttl = answer_ttl
        self.answer_wait = answer_wait
        self.udp_size = udp_size
        self.max_waiting, self.max_waiting_per_client = max_waiting, max_waiting_per_client
        self.max_tcp, self.max_tcp_per_client = max_tcp, max_tcp_per_client
        self.tcp_idle = tcp_idle
        self.counters: Counter[str] = Counter()
        #: ``audit(event, **fields)``: one ``allowlist-dns-denied`` line per
        #: client per minute at most (a VM looping on a name cannot flood it)
        self.audit = audit
        self._audit_buckets = TokenBuckets(1 / 60, 1, 4096)
        #: queries from outside vm_networks: one ``allowlist-dns-dropped``
        #: line per source per minute, and at most one a second (burst 60)
        #: over all sources, since UDP sources can be spoofed
        self._outsider_buckets = TokenBuckets(1 / 60, 1, 4096)
        self._outsider_total = TokenBuckets(1.0, 60, 1)
        self._waiting: Counter[str] = Counter()
        self._tcp: Counter[str] = Counter()
        #: UDP replies by the query's bytes after its ID (see the module)
        self.udp_cache: dict[bytes, _Cached] = {}

    def buildProtocol(self, addr: Any) -> TCPProtocol:  # type: ignore[override]
        p = TCPProtocol(self, self.clock)
        p.factory = self
        return p

    def udp_protocol(self) -> UDPProtocol:
        return UDPProtocol(self, self.clock)

    # -- per-client TCP caps ------------------------------------------------

    def tcp_open(self, host: str) -> bool:
        if len(self.connections) >= self.max_tcp or self._tcp[host] >= self.max_tcp_per_client:
            return False
        self._tcp[host] += 1
        return True

    def tcp_closed(self, host: str) -> None:
        self._tcp[host] -= 1
        if self._tcp[host] <= 0:
            del self._tcp[host]

    # -- queries ------------------------------------------------------------

    def messageReceived(self, message: Query, proto: Any,  # type: ignore[override]
                        address: tuple[str, int] | None = None) -> None:
        """Outsiders and clients over their rate are dropped here (never
        answered REFUSED, which ``allowQuery`` would do)."""
        host = address[0] if address is not None else proto.peer_host
        if not isinstance(message, Query):
            self.counters["dropped-malformed"] += 1
            return
        dropped = self.policy.admit(host, self.clock.seconds())
        if dropped is not None:
            self.counters["dropped-" + dropped.why] += 1
            return
        if message.opcode != dns.OP_QUERY:
            self._reply(proto, message, address, dns.ENOTIMP)
            return
        decision = self.policy.answer(message.question)
        if decision.kind is Kind.PENDING:
            self._wait(decision, proto, message, address, host)
        else:
            self._send(proto, message, address, decision)

    def _wait(self, decision: Decision, proto: Any, message: Query,
              address: tuple[str, int] | None, host: str) -> None:
        assert decision.name is not None and decision.entry is not None
        if self.admitter is None or sum(self._waiting.values()) >= self.max_waiting or \
                self._waiting[host] >= self.max_waiting_per_client:
            self.counters["servfail-busy"] += 1
            self._reply(proto, message, address, dns.ESERVER)
            return
        self._waiting[host] += 1
        d = self.admitter.wait(decision.name, decision.entry)
        timer = self.clock.callLater(self.answer_wait, d.cancel)

        def done(result: object) -> None:
            cancel_call(timer)
            self._waiting[host] -= 1
            if self._waiting[host] <= 0:
                del self._waiting[host]
            again = self.policy.answer(message.question)
            if again.kind is Kind.PENDING:
                self.counters["servfail-not-admitted"] += 1
                self._reply(proto, message, address, dns.ESERVER)
            else:
                self._send(proto, message, address, again)

        d.addBoth(done).addErrback(lambda f: self.log.failure("allowedlist: reply failed", f))

    def outsider(self, host: str, transport: str) -> None:
        """A query (or TCP connection) from outside ``vm_networks``: dropped,
        never answered; counted, and audited within the limits above."""
        self.counters["dropped-outside"] += 1
        if self.audit is None:
            return
        now = self.clock.seconds()
        if self._outsider_buckets.take(host, now) and self._outsider_total.take("*", now):
            self.audit("allowlist-dns-dropped", client=host, transport=transport,
                       why="outside vm_networks")

    def account(self, decision: Decision, host: str, now: float) -> None:
        """What every sent decision costs: its counter, the (rate-limited)
        audit line of a denied name, the wildcard name's use stamp."""
        kind = decision.kind
        self.counters[kind.value] += 1
        if (kind is Kind.NXDOMAIN or kind is Kind.REFUSED) and self.audit is not None:
            if self._audit_buckets.take(host, now):
                self.audit("allowlist-dns-denied", client=host,
                           name=decision.name or "(not a plain name)", why=decision.why)
        if decision.entry is not None and decision.entry.wildcard and decision.name:
            self.policy.seen[decision.name] = now

    def _send(self, proto: Any, message: Query, address: tuple[str, int] | None,
              decision: Decision) -> None:
        host = address[0] if address is not None else proto.peer_host
        self.account(decision, host, self.clock.seconds())
        kind = decision.kind
        addresses: tuple[str, ...] = ()
        if kind is Kind.NXDOMAIN:
            rcode = dns.ENAME
        elif kind is Kind.REFUSED:
            rcode = dns.EREFUSED
        else:
            rcode, addresses = dns.OK, decision.addresses
        data = self._reply(proto, message, address, rcode, addresses)
        if data is not None and address is not None:
            if len(self.udp_cache) >= MAX_CACHED:
                self.udp_cache.clear()
            name = decision.name
            self.udp_cache[message.raw[2:]] = _Cached(
                self.policy.entries, None if name is None else self.policy.admitted.get(name),
                decision, data[2:], bool(data[2] & 0x02))

    def _reply(self, proto: Any, message: Query, address: tuple[str, int] | None,
               rcode: int, addresses: tuple[str, ...] = ()) -> bytes | None:
        transport = getattr(proto, "transport", None)
        if transport is None:
            return None  # the connection ended while the query waited
        data = reply(message.raw, message.question, rcode, addresses, ttl=self.answer_ttl,
                     authoritative=rcode in (dns.OK, dns.ENAME),
                     max_size=self.udp_size if address is not None else 0)
        if address is None:
            proto.sendString(data)
        else:
            if data[2] & 0x02:
                self.counters["truncated"] += 1
            proto.send(data, address)
        return data
