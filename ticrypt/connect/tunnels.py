"""connect's tunnels: local listeners whose connections become mux streams.

One :class:`Tunnel` is one TLS connection to ``proxy:port`` (which the
proxy's lease and vmhost forward to vmc's tunnel server) carrying a
:class:`~ticrypt.mux.MuxProtocol`, plus one listener on 127.0.0.1 per
forwarded VM port.  Each accepted local connection is a
:class:`~ticrypt.forward.ForwardFactory` connection whose target is a
stream of the tunnel's current mux (``StreamEndpoint(mux, remote)``): the
local socket stays paused until vmc accepted the stream, then producers
are registered both ways (the mux's per-stream windows bound the memory).

The TLS connection is kept up: when it drops (or cannot be made) it is
dialled again after a :class:`~ticrypt.backoff.Backoff` delay.  The
listeners stay while it is down; a local connection made meanwhile waits
for the link (at most ``connect_timeout``, at most ``max_waiting`` of
them) and is closed if it does not come back in time.  Closing a tunnel
closes its listeners and every connection.

The link is an interface (:class:`Link`, made by a :data:`Dial`), so the
tunnel is tested in memory with fake links; :func:`mux_dialer` makes the
real one (TCP, pinned TLS, mux).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ticrypt.audit import AuditLog
from ticrypt.backoff import Backoff
from ticrypt.connect.config import TunnelSettings
from ticrypt.errors import CodedError
from ticrypt.forward import ForwardFactory
from ticrypt.mux import MuxProtocol, MuxSettings, StreamEndpoint
from ticrypt.mux.tls import MuxTLSFactory
from ticrypt.timers import cancel_call


class TunnelError(CodedError):
    """A tunnel cannot be made or found; ``code`` is stable, ``str()`` one line."""


@attrs.frozen
class Forward:
    """VM port ``remote`` reached on local port ``local`` (0: any free port)."""

    remote: int
    local: int = 0


@attrs.frozen
class TunnelSpec:
    """What a tunnel is: a VM, its proxy lease, the client certificate
    presented and vmc's pinned fingerprint, and the forwarded ports."""

    vm: str
    proxy_host: str
    proxy_port: int
    cert_id: str
    fingerprint: str
    forwards: tuple[Forward, ...]
    #: rest's pathway (the proxy lease) this tunnel rides, for the frontend
    pathway: str | None = None


class Link(Protocol):
    """A live mux connection to vmc (what a tunnel needs of it)."""

    def stream_endpoint(self, port: int) -> IStreamClientEndpoint:
        """An endpoint whose connect opens a stream to VM port ``port``."""

    def when_closed(self) -> defer.Deferred[str]:
        """Fires with the reason once the connection is gone."""

    def close(self, reason: str) -> None:
        """End the connection."""

    def stats(self) -> dict[str, int]:
        """Open ``streams`` and bytes of this connection."""


#: Makes one link: fires once TLS and the mux are up, fails otherwise.
Dial = Callable[[], "defer.Deferred[Link]"]
#: Listens on local port ``port`` (0: any) of 127.0.0.1 with ``factory``.
Listen = Callable[[int, IProtocolFactory], "defer.Deferred[IListeningPort]"]


# ---------------------------------------------------------------- the real link

class MuxLink:
    """:class:`Link` over a :class:`~ticrypt.mux.MuxProtocol`."""

    def __init__(self, mux: MuxProtocol, closed: defer.Deferred[str]):
        self.mux = mux
        self._reason: str | None = None
        self._waiting: list[defer.Deferred[str]] = []
        closed.addCallback(self._closed)

    def _closed(self, reason: str) -> str:
        self._reason = reason
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(reason)
        return reason

    def stream_endpoint(self, port: int) -> IStreamClientEndpoint:
        return StreamEndpoint(self.mux, port)

    def when_closed(self) -> defer.Deferred[str]:
        if self._reason is not None:
            return defer.succeed(self._reason)
        d: defer.Deferred[str] = defer.Deferred()
        self._waiting.append(d)
        return d

    def close(self, reason: str) -> None:
        self.mux.close(reason)

    def stats(self) -> dict[str, int]:
        s = self.mux.stats()
        return {k: int(s.get(k, 0)) for k in ("streams", "bytes_in", "bytes_out")}


@implementer(IHandshakeListener)
class _Mux(MuxProtocol):
    """The client mux, ready once vmc is known to have admitted it.

    Under TLS 1.3 the client's handshake completes before the server has
    checked the client certificate, so a refused client would look "up"
    for a moment.  When the handshake completes the mux sends a PING;
    ``ready`` fires at vmc's first frame (its PONG), which vmc sends only
    to a client it admitted."""

    ready: defer.Deferred[None]
    lost_reason: str | None = None

    def handshakeCompleted(self) -> None:
        parent = getattr(super(), "handshakeCompleted", None)
        if parent is not None:
            parent()
        self.ping()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.frames_received and not self.ready.called:
            self.ready.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_reason = reason.getErrorMessage()
        super().connectionLost(reason)


def mux_dialer(reactor: Any, host: str, port: int, creator: IOpenSSLClientConnectionCreator,
               *, timeout: float, settings: MuxSettings | None = None) -> Dial:
    """A :data:`Dial` for ``host:port``: TCP, TLS with ``creator`` (the
    pinned client of :mod:`ticrypt.connect.certs`), then the client mux;
    the whole within ``timeout`` seconds."""

    def dial() -> defer.Deferred[Link]:
        ready: defer.Deferred[None] = defer.Deferred()
        made: list[_Mux] = []

        def build() -> _Mux:
            mux = _Mux(side="client", clock=reactor, settings=settings or MuxSettings())
            mux.ready = ready
            made.append(mux)
            return mux

        def cancel(_: Any) -> None:
            if connecting is not None and not connecting.called:
                connecting.cancel()
            for mux in made:
                if mux.transport is not None:
                    mux.transport.abortConnection()  # type: ignore[attr-defined]

        result: defer.Deferred[Link] = defer.Deferred(cancel)

        def connected(mux: _Mux) -> None:
            closed = mux.when_closed()

            def lost(reason: str) -> str:
                if not result.called:
                    why = mux.lost_reason or reason
                    result.errback(TunnelError(
                        "tls-failed", f"TLS with {host}:{port} failed ({why[:200]}): is "
                        "the pathway still open, and does the VM still pin this client "
                        "certificate?"))
                return reason

            closed.addCallback(lost)
            ready.addCallback(lambda _: None if result.called
                                  else result.callback(MuxLink(mux, closed)))

        def failed(f: Failure) -> None:
            if not result.called:
                result.errback(TunnelError("unreachable", f"cannot connect to {host}:{port}: "
                                           f"{f.getErrorMessage()}"))

        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        connecting: defer.Deferred[Any] | None = None
        # what wrapClientTLS does, with the batching TLS of ticrypt.mux.tls
        tls: defer.Deferred[Any] = endpoint.connect(
            MuxTLSFactory(creator, True, Factory.forProtocol(build)))
        connecting = tls.addCallback(lambda wrapper: wrapper.wrappedProtocol)
        connecting.addCallbacks(connected, failed)
        result.addTimeout(timeout, reactor)
        return result

    return dial


# ---------------------------------------------------------------- a tunnel

@implementer(IStreamClientEndpoint)
class _TunnelEndpoint:
    """A stream to VM port ``port`` over whatever link the tunnel has now
    (or, while it is down, as soon as it is back)."""

    def __init__(self, tunnel: Tunnel, port: int):
        self._tunnel = tunnel
        self._port = port

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        return self._tunnel._open_stream(self._port, factory)


class _Waiter:
    """A local connection waiting for the link to come back."""

    def __init__(self, tunnel: Tunnel, port: int, factory: IProtocolFactory):
        self.port = port
        self.factory = factory
        self.inner: defer.Deferred[Any] | None = None
        self.d: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self._tunnel = tunnel

    def _cancel(self, _: Any) -> None:
        if self.inner is not None:
            self.inner.cancel()
        elif self in self._tunnel._waiting:
            self._tunnel._waiting.remove(self)

    def start(self, link: Link) -> None:
        self.inner = link.stream_endpoint(self.port).connect(self.factory)
        self.inner.addBoth(self._done)

    def _done(self, result: Any) -> None:
        if not self.d.called:
            self.d.callback(result)
        elif not isinstance(result, Failure):
            # cancelled (timed out) while vmc accepted: drop the stream
            transport = getattr(result, "transport", None)
            if transport is not None:
                transport.loseConnection()


class Tunnel:
    """One tunnel: listeners on 127.0.0.1 and a link kept up with backoff.

    ``state`` is ``connecting`` (never up yet), ``up``, ``down`` (waiting
    to dial again) or ``closed``."""

    log = Logger()

    def __init__(self, tid: str, spec: TunnelSpec, *, clock: IReactorTime, dial: Dial,
                 listen: Listen, settings: TunnelSettings, audit: AuditLog,
                 rand: Callable[[], float] = random.random):
        self.id = tid
        self.spec = spec
        self.name = spec.vm  # what the user called the VM (shown by list)
        self.state = "connecting"
        self.last_error: str | None = None
        self.connects = 0
        self._clock = clock
        self._dial = dial
        self._listen = listen
        self._settings = settings
        self._audit = audit
        self._backoff = Backoff(settings.reconnect_initial, settings.reconnect_max, rand)
        self.link: Link | None = None
        self.ports: list[tuple[Forward, IListeningPort, ForwardFactory]] = []
        self._waiting: list[_Waiter] = []
        self._attempt: defer.Deferred[Link] | None = None
        self._retry: Any = None
        self._listening: list[IListeningPort] = []
        self._local: list[tuple[int, int]] = []
        self._first: list[defer.Deferred[str | None]] = []
        self._attempted = False

    # -- start and stop ------------------------------------------------------

    async def start(self) -> list[tuple[int, int]]:
        """Listen on every local port (all or none; TunnelError naming the
        port that failed), then dial.  Returns ``[(remote, local)]``."""
        for fwd in self.spec.forwards:
            factory = ForwardFactory(
                self._target(fwd.remote),
                clock=self._clock, connect_timeout=self._settings.connect_timeout,
                idle_timeout=self._settings.idle_timeout,
                on_event=self._events_of(fwd.remote))
            try:
                port = await self._listen(fwd.local, factory)
            except Exception as e:
                await self._stop_listening()
                why = getattr(e, "socketError", None) or e
                raise TunnelError("cannot-listen", f"cannot listen on 127.0.0.1:{fwd.local}: "
                                  f"{getattr(why, 'strerror', None) or why}") from None
            self.ports.append((fwd, port, factory))
            self._listening.append(port)
            self._local.append((fwd.remote, int(getattr(port.getHost(), "port", 0))))
        self._connect()
        return self.local_ports()

    def first_attempt(self) -> defer.Deferred[str | None]:
        """Fires with None once the link was up once, or with why the first
        attempt failed."""
        if self._attempted:
            return defer.succeed(None if self.connects else self.last_error)
        d: defer.Deferred[str | None] = defer.Deferred()
        self._first.append(d)
        return d

    def _attempt_done(self) -> None:
        if self._attempted:
            return
        self._attempted = True
        first, self._first = self._first, []
        for d in first:
            d.callback(None if self.connects else self.last_error)

    def local_ports(self) -> list[tuple[int, int]]:
        """``[(VM port, local port)]``, as listened on (kept after close)."""
        return list(self._local)

    async def close(self, reason: str = "closed") -> None:
        """Stop the listeners, end every connection and the link."""
        if self.state == "closed":
            return
        self.state = "closed"
        cancel_call(self._retry)
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        if not self._attempted:
            self.last_error = self.last_error or "the tunnel was closed"
            self._attempt_done()
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.d.errback(error.ConnectError(string="the tunnel was closed"))
        for _, _, factory in self.ports:
            factory.close_all("tunnel closed")
        if self.link is not None:
            self.link.close("normal")
        await self._stop_listening()
        self._audit.write("tunnel-closed", tunnel=self.id, vm=self.spec.vm, reason=reason,
                          **self._bytes())

    async def _stop_listening(self) -> None:
        ports, self._listening = self._listening, []
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports],
                                  consumeErrors=True)

    # -- the link ------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if self.state == "closed":
            return
        d = self._attempt = self._dial()
        d.addCallbacks(self._linked, self._dial_failed)

    def _linked(self, link: Link) -> None:
        self._attempt = None
        if self.state == "closed":
            link.close("normal")
            return
        self.link = link
        self.state = "up"
        self.connects += 1
        self.last_error = None
        self._backoff.reset()
        self.log.info("tunnel {id} to {vm} is up", id=self.id, vm=self.spec.vm)
        self._audit.write("tunnel-up", tunnel=self.id, vm=self.spec.vm,
                          proxy=f"{self.spec.proxy_host}:{self.spec.proxy_port}",
                          connects=self.connects)
        link.when_closed().addCallback(self._unlinked, link)
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            w.start(link)
        self._attempt_done()

    def _unlinked(self, reason: str, link: Link) -> None:
        if self.link is not link:
            return
        self.link = None
        if self.state == "closed":
            return
        self.state = "down"
        self.last_error = f"connection lost: {reason}"
        self._audit.write("tunnel-down", tunnel=self.id, vm=self.spec.vm, reason=reason)
        self._schedule()

    def _dial_failed(self, f: Failure) -> None:
        self._attempt = None
        if self.state == "closed":
            return
        if f.check(defer.TimeoutError, defer.CancelledError):
            why = f"no connection within {self._settings.connect_timeout:g}s"
        else:
            why = f.getErrorMessage()
        if self.state == "up":  # cannot happen; keep the state machine honest
            self.state = "down"
        self.last_error = why
        self.log.info("tunnel {id} to {vm}: {why}", id=self.id, vm=self.spec.vm, why=why)
        self._schedule()
        self._attempt_done()

    def _schedule(self) -> None:
        if self.state == "closed":
            return
        delay = self._backoff.next_delay()
        if self.state != "connecting":
            self.state = "down"
        self._retry = self._clock.callLater(delay, self._connect)

    # -- streams -------------------------------------------------------------

    def _open_stream(self, port: int, factory: IProtocolFactory) -> defer.Deferred[Any]:
        if self.state == "closed":
            return defer.fail(error.ConnectError(string="the tunnel was closed"))
        if self.link is not None:
            return self.link.stream_endpoint(port).connect(factory)
        if len(self._waiting) >= self._settings.max_waiting:
            return defer.fail(error.ConnectError(
                string=f"the tunnel is down and {len(self._waiting)} connections wait"))
        w = _Waiter(self, port, factory)
        self._waiting.append(w)
        return w.d

    def _target(self, remote: int) -> Callable[[], IStreamClientEndpoint]:
        return lambda: _TunnelEndpoint(self, remote)

    def _events_of(self, remote: int) -> Callable[..., None]:
        """The audit hook of the listener of VM port ``remote``."""
        def event(name: str, **fields: Any) -> None:
            if name in ("failed", "closed"):
                self._audit.write(f"stream-{name}", tunnel=self.id, vm=self.spec.vm,
                                  remote_port=remote, **fields)
        return event

    # -- what the API shows ----------------------------------------------------

    def _bytes(self) -> dict[str, int]:
        """Bytes from the VM (``bytes_in``) and to it (``bytes_out``), as the
        local connections counted them."""
        counts = [f.counts() for _, _, f in self.ports]
        return {"bytes_in": sum(c["bytes_out"] for c in counts),
                "bytes_out": sum(c["bytes_in"] for c in counts)}

    def describe(self) -> dict[str, Any]:
        counts = [f.counts() for _, _, f in self.ports]
        return {
            "id": self.id, "vm": self.spec.vm, "name": self.name, "state": self.state,
            "proxy": f"{self.spec.proxy_host}:{self.spec.proxy_port}",
            "pathway": self.spec.pathway,
            "forwards": [{"remote": r, "local": loc} for r, loc in self.local_ports()],
            "streams": sum(c["active"] for c in counts),
            "connections": sum(c["accepted"] for c in counts),
            "connects": self.connects, "last_error": self.last_error,
            **self._bytes(),
        }


class TunnelTable:
    """Every tunnel of this connect, by id (``t`` + 12 hex digits)."""

    def __init__(self, settings: TunnelSettings):
        self.settings = settings
        self.tunnels: dict[str, Tunnel] = {}

    def new_id(self) -> str:
        import secrets

        return "t" + secrets.token_hex(6)

    def check_room(self) -> None:
        if len(self.tunnels) >= self.settings.max_tunnels:
            raise TunnelError("too-many-tunnels", f"{self.settings.max_tunnels} tunnels are "
                              "open; close one first")

    def get(self, tid: str) -> Tunnel:
        t = self.tunnels.get(tid)
        if t is None:
            raise TunnelError("not-found", f"no tunnel {tid!r}")
        return t

    def certs_in_use(self) -> frozenset[str]:
        return frozenset(t.spec.cert_id for t in self.tunnels.values())

    async def close_all(self) -> None:
        tunnels, self.tunnels = list(self.tunnels.values()), {}
        for t in tunnels:
            await t.close("connect stopping")
