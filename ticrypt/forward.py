"""The one TCP forwarder: accept a connection, connect onwards, relay bytes.

Used by the proxy's lease listeners, vmhost's user-space mode, vmc's
stream-to-``127.0.0.1:P`` bridge and connect's local listeners.  Modelled
on ``twisted.protocols.portforward`` but bounded and complete:

* the accepted side is paused until the outbound connection is up, then
  each transport is registered as the other's streaming producer, so a slow
  reader pauses the fast writer and nothing is buffered without bound;
* ``admit`` refuses a peer in ``buildProtocol``: no byte read, no outbound
  connection made, one ``refused`` event;
* connect timeout, idle timeout (no byte either way), and a drain timeout
  that aborts a side still flushing after the other closed;
* half-close (EOF) travels both ways where the transports support it
  (:class:`IHalfCloseableProtocol` plus ``loseWriteConnection``), otherwise
  EOF closes the other side after its pending data is written;
* byte counters per connection and per factory, ``active()`` and
  ``close_all()`` for owners that end a lease.

:func:`splice` joins two already-connected :class:`Pipe` protocols for
callers that make both connections themselves.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import attrs
from twisted.internet import address, defer
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ticrypt.tcp import no_delay
from ticrypt.timers import cancel_call

__all__ = [
    "Forward",
    "connect_protocol",
    "ForwardFactory",
    "Pipe",
    "allow_hosts",
    "host_of",
    "normalize_host",
    "splice",
]

#: bytes a not-yet-spliced Pipe keeps if its transport ignores pauseProducing
MAX_PENDING = 256 * 1024

#: Bytes a Pipe's TCP transport reads at once, and writes at most before it
#: pauses its producer (Twisted's ``bufferSize``, 64 KiB by default): a
#: quarter as many reads, writes and loop turns per relayed byte; still one
#: bound per connection.
READ_SIZE = 256 * 1024

P = TypeVar("P", bound=Protocol)
EventHook = Callable[..., None]
Admit = Callable[[IAddress], "str | None"]


def normalize_host(host: str) -> str:
    """The canonical text of an IP address: IPv4-mapped IPv6
    (``::ffff:a.b.c.d``) becomes ``a.b.c.d``, IPv6 is compressed and lower
    case, brackets and a zone (``%eth0``) are dropped.  Anything that is not
    an IP address is returned lower-cased and otherwise unchanged."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    bare = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return text.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def host_of(addr: IAddress | None) -> str | None:
    """The normalised host of an IPv4/IPv6 address, ``None`` for others."""
    if isinstance(addr, (address.IPv4Address, address.IPv6Address)):
        return normalize_host(addr.host)
    return None


def allow_hosts(hosts: Iterable[str]) -> Admit:
    """An ``admit`` callable that lets only ``hosts`` (normalised) in."""
    allowed = frozenset(normalize_host(h) for h in hosts)

    def admit(addr: IAddress) -> str | None:
        host = host_of(addr)
        if host is None or host not in allowed:
            return "source address not allowed"
        return None

    return admit


def connect_protocol(endpoint: IStreamClientEndpoint, protocol: P) -> defer.Deferred[P]:
    """``endpoints.connectProtocol`` without its two log lines per connection
    ("Starting factory", "Stopping factory": a noisy one-shot factory), which
    cost a relay more than the connection itself."""
    factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False
    return cast("defer.Deferred[P]", endpoint.connect(factory))


def _consumer(transport: ITransport | None) -> IConsumer:
    return cast(IConsumer, transport)


def _producer(transport: ITransport | None) -> IPushProducer:
    return cast(IPushProducer, transport)


def _abort(transport: ITransport | None) -> None:
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()


@implementer(IHalfCloseableProtocol)
class Pipe(Protocol):
    """One side of a relayed pair.

    Until :func:`splice` gives it a peer, a Pipe keeps its transport paused
    (and holds at most ``max_pending`` bytes if the transport delivers
    anyway; beyond that it aborts).  Spliced, it writes what it receives to
    the peer's transport, whose flow control pauses this transport.

    ``on_data(n)`` is called for every chunk received, ``on_close(pipe,
    reason)`` once when the connection is gone.

    The transport must be a streaming producer and a consumer (TCP, TLS, a
    mux stream).  Half-close needs ``loseWriteConnection`` on it and a
    transport that calls :class:`IHalfCloseableProtocol` methods; without
    them an EOF closes the other side once its pending data is written.
    """

    log = Logger()

    def __init__(
        self,
        *,
        on_data: Callable[[int], None] | None = None,
        on_close: Callable[[Pipe, Failure], None] | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.peer: Pipe | None = None
        self.bytes_received = 0
        self.read_closed = False  # EOF (or loss) seen on our read side
        self.write_closed = False  # our write side was shut (the peer's EOF)
        self.closed = False
        self.close_reason: Failure | None = None
        self._write_shut = False  # the transport reported writeConnectionLost
        self._has_producer = False  # splice registered the peer's transport on ours
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._max_pending = max_pending
        self._on_data = on_data
        self._on_close = on_close

    # -- IProtocol ---------------------------------------------------------
    def connectionMade(self) -> None:
        no_delay(self.transport)  # relayed small writes must not wait for an ACK
        if isinstance(getattr(self.transport, "bufferSize", None), int):
            self.transport.bufferSize = READ_SIZE  # type: ignore[union-attr]
        if self.peer is None:
            # Nothing may be read before there is somewhere to send it.
            _producer(self.transport).pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self._on_data is not None:
            self._on_data(len(data))
        peer = self.peer
        if peer is not None:
            # Bounded: our transport is registered as the producer of the
            # peer's transport, which pauses us when its buffer fills.
            if not peer.closed and not peer.write_closed:
                peer.transport.write(data)  # type: ignore[union-attr]
            return
        self._pending.append(data)
        self._pending_len += len(data)
        if self._pending_len > self._max_pending:
            self.log.warn(
                "forward: {n} bytes arrived before the other side was ready; closing",
                n=self._pending_len,
            )
            self._pending = []
            self._pending_len = 0
            _abort(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.closed:
            return
        self.closed = True
        self.read_closed = True
        self.close_reason = reason
        peer = self.peer
        if peer is not None and not peer.closed:
            peer._close_after_flush()
        if self._on_close is not None:
            self._on_close(self, reason)

    # -- IHalfCloseableProtocol --------------------------------------------
    def readConnectionLost(self) -> None:
        if self.read_closed:
            # A transport resumed after EOF reads EOF again: only once counts.
            return
        self.read_closed = True
        if self.peer is not None:
            self.peer._close_write()
        self._maybe_finished()

    def writeConnectionLost(self) -> None:
        self._write_shut = True
        self._maybe_finished()

    # -- internals ---------------------------------------------------------
    def _close_write(self) -> None:
        """The peer reached EOF: send ours after pending data is written."""
        if self.write_closed or self.closed:
            return
        self.write_closed = True
        transport = self.transport
        # The peer no longer produces for us; a transport keeps waiting for a
        # registered producer before it shuts down, so let it go.
        self._drop_producer()
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is None:
            self._close_after_flush()
        else:
            lose_write()

    def _close_after_flush(self) -> None:
        if self.closed or self.transport is None:
            return
        self._drop_producer()
        self.transport.loseConnection()

    def _drop_producer(self) -> None:
        if self._has_producer:
            self._has_producer = False
            _consumer(self.transport).unregisterProducer()

    def _maybe_finished(self) -> None:
        if self.read_closed and self._write_shut and not self.closed:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _take_pending(self) -> list[bytes]:
        pending, self._pending, self._pending_len = self._pending, [], 0
        return pending


def splice(a: Pipe, b: Pipe) -> None:
    """Join two connected Pipes: each relays to the other, each transport
    is the other's streaming producer, and both start reading.

    If either side is already gone, what it received is written to the other,
    which is then closed after flushing."""
    if a.transport is None or b.transport is None:
        raise ValueError("splice needs two connected pipes")
    if a.peer is not None or b.peer is not None:
        raise ValueError("pipe already spliced")
    if a.closed or b.closed:
        for gone, other in ((a, b), (b, a)):
            if gone.closed and not other.closed:
                for chunk in gone._take_pending():
                    other.transport.write(chunk)  # type: ignore[union-attr]
                other._close_after_flush()
        return
    a.peer, b.peer = b, a
    _consumer(a.transport).registerProducer(_producer(b.transport), True)
    _consumer(b.transport).registerProducer(_producer(a.transport), True)
    a._has_producer = b._has_producer = True
    for src, dst in ((a, b), (b, a)):
        for chunk in src._take_pending():
            dst.transport.write(chunk)  # type: ignore[union-attr]
    for src, dst in ((a, b), (b, a)):
        if src.read_closed:
            dst._close_write()
        else:
            _producer(src.transport).resumeProducing()


class Forward:
    """One forwarded connection: the accepted side, the outbound side once
    connected, counters and timers.  Created by :class:`ForwardFactory`."""

    log = Logger()

    def __init__(self, factory: ForwardFactory, addr: IAddress | None) -> None:
        self._factory = factory
        self._clock = factory.clock
        self.addr = addr
        self.peer = host_of(addr) or str(addr)
        self.started = self._clock.seconds()
        self.last_activity = self.started
        self.inbound = _InboundPipe(self, on_data=self._activity, on_close=self._lost)
        self.outbound: Pipe | None = None
        self.target: str | None = None
        self.closing_reason: str | None = None
        self._connecting: defer.Deferred[Pipe] | None = None
        self._idle_call: IDelayedCall | None = None
        self._drain_call: IDelayedCall | None = None
        self._finished = False

    @property
    def bytes_in(self) -> int:
        """Bytes from the accepted peer towards the target."""
        return self.inbound.bytes_received

    @property
    def bytes_out(self) -> int:
        """Bytes from the target back to the accepted peer."""
        return self.outbound.bytes_received if self.outbound is not None else 0

    def close(self, reason: str = "closed by owner") -> None:
        """Abort both sides now (a lease ended, a timeout fired)."""
        if self._finished:
            return
        if self.closing_reason is None:
            self.closing_reason = reason
        if self._connecting is not None:
            self._connecting.cancel()
        _abort(self.inbound.transport)
        if self.outbound is not None:
            _abort(self.outbound.transport)

    # -- lifecycle -----------------------------------------------------------
    def _start(self) -> None:
        f = self._factory
        f._connections.active.add(self)
        if f.idle_timeout is not None:
            self._idle_call = self._clock.callLater(f.idle_timeout, self._check_idle)
        try:
            endpoint = f.target()
        except Exception:
            self.log.failure("forward: no target for {peer}", peer=self.peer)
            self._connect_failed("no target")
            return
        self.outbound = Pipe(on_data=self._activity, on_close=self._lost)
        d = connect_protocol(endpoint, self.outbound)
        d.addTimeout(f.connect_timeout, self._clock)
        self._connecting = d
        d.addCallbacks(self._connected, self._not_connected)

    def _connected(self, outbound: Pipe) -> None:
        self._connecting = None
        assert self.outbound is outbound
        target = outbound.transport.getPeer() if outbound.transport is not None else None
        host = host_of(target)
        self.target = f"{host}:{getattr(target, 'port', '')}" if host else str(target)
        self._factory._event("connected", peer=self.peer, target=self.target)
        splice(self.inbound, outbound)

    def _not_connected(self, failure: Failure) -> None:
        self._connecting = None
        self.outbound = None
        if self.inbound.closed:
            # The client left while we were connecting.
            self._finish()
            return
        if self.closing_reason is not None:
            # close() cancelled the connect; the inbound abort finishes us.
            _abort(self.inbound.transport)
            return
        if failure.check(defer.TimeoutError, defer.CancelledError, ConnectingCancelledError):
            # only our timeout cancels here: close() and a leaving client are handled above
            why = f"connect timed out after {self._factory.connect_timeout:g}s"
        else:
            why = failure.getErrorMessage()
        self._connect_failed(why)

    def _connect_failed(self, why: str) -> None:
        self.log.info("forward: connection from {peer} not forwarded: {why}",
                      peer=self.peer, why=why)
        self._factory._connections.failed += 1
        self._factory._event("failed", peer=self.peer, reason=why)
        self.closing_reason = self.closing_reason or f"connect failed: {why}"
        self.outbound = None
        _abort(self.inbound.transport)

    def _activity(self, n: int) -> None:
        self.last_activity = self._clock.seconds()

    def _check_idle(self) -> None:
        self._idle_call = None
        timeout = self._factory.idle_timeout
        assert timeout is not None
        remaining = self.last_activity + timeout - self._clock.seconds()
        if remaining > 0:
            self._idle_call = self._clock.callLater(remaining, self._check_idle)
            return
        self.log.info("forward: {peer} idle for {t:g}s; closing", peer=self.peer, t=timeout)
        self.close(f"idle for {timeout:g}s")

    def _lost(self, pipe: Pipe, reason: Failure) -> None:
        if self.closing_reason is None:
            self.closing_reason = "client closed" if pipe is self.inbound else "target closed"
        if self._connecting is not None:
            self._connecting.cancel()  # calls _not_connected, which finishes
            return
        others = [p for p in (self.inbound, self.outbound) if p is not None and not p.closed]
        if not others:
            self._finish()
        elif self._drain_call is None:
            # The other side flushes its pending bytes, but not forever.
            self._drain_call = self._clock.callLater(
                self._factory.drain_timeout, self._drain_expired)

    def _drain_expired(self) -> None:
        self._drain_call = None
        self.log.info("forward: {peer} did not drain in {t:g}s; aborting",
                      peer=self.peer, t=self._factory.drain_timeout)
        self.close("drain timeout")

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        for call in (self._idle_call, self._drain_call):
            cancel_call(call)
        self._idle_call = self._drain_call = None
        f = self._factory
        f._connections.closed(self)
        f._event(
            "closed", peer=self.peer, target=self.target, bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration=round(self._clock.seconds() - self.started, 3),
            reason=self.closing_reason or "closed",
        )


@attrs.define(eq=False)
class _Connections:
    """A factory's connections: those being forwarded now, and its
    counters (the bytes of the closed ones kept when they leave ``active``)."""

    active: set[Forward] = attrs.Factory(set)
    accepted: int = 0
    refused: int = 0
    failed: int = 0
    closed_bytes_in: int = 0
    closed_bytes_out: int = 0

    def closed(self, forward: Forward) -> None:
        self.active.discard(forward)
        self.closed_bytes_in += forward.bytes_in
        self.closed_bytes_out += forward.bytes_out

    def counts(self) -> dict[str, int]:
        active = self.active
        return {
            "accepted": self.accepted,
            "refused": self.refused,
            "failed": self.failed,
            "active": len(active),
            "bytes_in": self.closed_bytes_in + sum(f.bytes_in for f in active),
            "bytes_out": self.closed_bytes_out + sum(f.bytes_out for f in active),
        }


class _InboundPipe(Pipe):
    def __init__(self, forward: Forward, **kw: Any) -> None:
        super().__init__(**kw)
        self._forward = forward

    def connectionMade(self) -> None:
        super().connectionMade()
        self._forward._start()


class ForwardFactory(ServerFactory):
    """Accept connections and forward each to a fresh connection to
    ``target()`` (called per connection, so the target may change).

    ``admit(addr)`` returns a refusal reason or ``None``; ``on_event(name,
    **fields)`` receives ``refused`` (peer, reason), ``connected`` (peer,
    target), ``failed`` (peer, reason) and ``closed`` (peer, target,
    bytes_in, bytes_out, duration, reason): shaped for ``AuditLog.write``.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        target: Callable[[], IStreamClientEndpoint],
        *,
        clock: IReactorTime,
        connect_timeout: float = 10.0,
        idle_timeout: float | None = None,
        admit: Admit | None = None,
        on_event: EventHook | None = None,
        max_connections: int | None = None,
        drain_timeout: float = 30.0,
    ) -> None:
        if connect_timeout <= 0 or drain_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive or None")
        self.target = target
        self.clock = clock
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.drain_timeout = drain_timeout
        self.max_connections = max_connections
        self._admit = admit
        self._on_event = on_event
        self._connections = _Connections()

    def buildProtocol(self, addr: IAddress | None) -> Pipe | None:
        reason: str | None = None
        if self._admit is not None:
            reason = self._admit(addr) if addr is not None else "no peer address"
        if reason is None and self.max_connections is not None \
                and len(self._connections.active) >= self.max_connections:
            reason = "too many connections"
        if reason is not None:
            self._connections.refused += 1
            peer = host_of(addr) or str(addr)
            self.log.info("forward: refused {peer}: {reason}", peer=peer, reason=reason)
            self._event("refused", peer=peer, reason=reason)
            return None
        self._connections.accepted += 1
        forward = Forward(self, addr)
        forward.inbound.factory = self
        return forward.inbound

    def active(self) -> tuple[Forward, ...]:
        """The connections being forwarded now (connecting included)."""
        return tuple(self._connections.active)

    def close_all(self, reason: str = "closed by owner") -> int:
        """Abort every connection of this factory; returns how many."""
        forwards = self.active()
        for forward in forwards:
            forward.close(reason)
        return len(forwards)

    def counts(self) -> dict[str, int]:
        """accepted, refused, failed, active; bytes_in/out over all connections."""
        return self._connections.counts()

    def _event(self, name: str, **fields: Any) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(name, **fields)
        except Exception:
            self.log.failure("forward: event hook failed for {name}", name=name)
