"""vmc's tunnel server: TLS with pinned client certificates, then the mux.

A frontend pins a client certificate with ``tunnel-accept`` over the secure
channel (:mod:`ticrypt.vmc.commands`, :mod:`ticrypt.vmc.pins`).  ticrypt-connect
then dials ``[tunnel] listen`` (port 22 in production, reached through the
proxy and the VM host) with TLS and that certificate:

* TLS 1.2 or 1.3 with vmc's own certificate (``state_dir/tls.pem``, whose
  fingerprint ``info`` and enrollment report); no renegotiation, no session
  tickets and no session cache, so every handshake is a full one and carries
  the client's certificate.
* The client must send a certificate whose SHA-256 (of the DER) is pinned:
  checked in the verify callback (a refusal is a TLS alert) and again once
  the handshake is done (the certificate OpenSSL holds for the connection).
  Chains are ignored: a certificate issued by the pinned one, or a self-signed
  one with the same subject, has another fingerprint and is refused.
* ``handshake_timeout`` bounds the handshake; at most ``max_connections``
  connections at once; each refusal is a ``tunnel-refused`` audit line with
  the reason, the peer and (if one was sent) the certificate's fingerprint.

Once accepted, the connection runs the mux (:mod:`ticrypt.mux`, server end).
Each stream asks for a port P: refused ``port-not-allowed`` unless P is in
``[tunnel] ports``; otherwise vmc connects to ``127.0.0.1:P`` (within
``connect_timeout``) and splices the two (:func:`ticrypt.forward.splice`,
producers both ways), or refuses ``connect-failed``.  Only that stream ends.

Each such connection is recorded by its local port in :class:`Origins`, so
that a server in vmc (the SFTP server) can tell which tunnel user a
connection on 127.0.0.1 comes from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import attrs
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IProtocol,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.forward import Pipe, connect_protocol, splice
from ticrypt.fsutil import atomic_write
from ticrypt.mux import IncomingStream, MuxProtocol, MuxSettings
from ticrypt.mux.tls import MuxTLSFactory
from ticrypt.service import start_loop, stop_loop
from ticrypt.timers import cancel_call
from ticrypt.vmc.pins import Pin, PinLimits, PinSet

#: Where the pins are kept (in ``state_dir``), so a restart keeps them.
PINS_FILE = "tunnel-pins.json"

#: TLS 1.2 suites: forward secrecy and AEAD only (1.3 suites are all fine).
CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"


def der_fingerprint(der: bytes) -> str:
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _x509_fingerprint(cert: crypto.X509) -> str:
    return der_fingerprint(cert.to_cryptography().public_bytes(Encoding.DER))


def server_context(tls_pem: str) -> SSL.Context:
    """The tunnel's TLS context: vmc's key and certificate from ``tls_pem``,
    TLS 1.2+, no renegotiation, no resumption (no tickets, no cache)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION
                    | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_session_id(b"ticrypt-vmc-tunnel")
    ctx.set_cipher_list(CIPHERS)
    ctx.use_privatekey_file(tls_pem)
    ctx.use_certificate_chain_file(tls_pem)
    ctx.check_privatekey()
    # the connection sets its own callback (TunnelServer.serverConnectionForTLS)
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *a: False)
    return ctx


@attrs.frozen(kw_only=True)
class TunnelSettings:
    """What the tunnel server needs of ``[tunnel]``."""

    ports: tuple[int, ...] = (2022,)
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    max_connections: int = 64
    pins: PinLimits = attrs.Factory(PinLimits)
    mux: MuxSettings = attrs.Factory(MuxSettings)


class Origins:
    """Local connections made for tunnel streams, by local port: which pin
    (user) each comes from.  Lets a server on 127.0.0.1 in vmc bind a
    connection to the tunnel's user."""

    def __init__(self) -> None:
        self._by_port: dict[int, Pin] = {}

    def add(self, port: int, pin: Pin) -> None:
        self._by_port[port] = pin

    def remove(self, port: int) -> None:
        self._by_port.pop(port, None)

    def user_of(self, peer: IAddress) -> Pin | None:
        """The pin of the tunnel whose stream is ``peer`` (a TCP client on
        127.0.0.1), else None."""
        if getattr(peer, "host", None) != "127.0.0.1":
            return None
        port = getattr(peer, "port", None)
        return self._by_port.get(port) if isinstance(port, int) else None


@implementer(IHandshakeListener)
class TunnelConnection(Protocol):
    """One tunnel client over TLS: the pin check, then the mux."""

    log = Logger()

    def __init__(self, server: TunnelServer, addr: IAddress | None):
        self.server = server
        self.peer = _addr_text(addr)
        self.offered: str | None = None  # fingerprint of the certificate sent
        self.pin: Pin | None = None
        self.mux: IProtocol | None = None
        self.refused: str | None = None
        self._timer: IDelayedCall | None = None
        self._streams = 0

    def connectionMade(self) -> None:
        if not self.server.admit(self):
            self.refuse("over-limit")
            return
        self._timer = self.server.clock.callLater(self.server.settings.handshake_timeout,
                                                  self._timed_out)

    def verify(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
               ok: int) -> bool:
        """OpenSSL's verify callback: only the leaf counts, by its pin."""
        if depth != 0:
            return True  # a chain above the leaf is irrelevant to a pin
        self.offered = _x509_fingerprint(cert)
        self.pin = self.server.check_pin(self.offered)
        return self.pin is not None

    def handshakeCompleted(self) -> None:
        self._cancel_timer()
        if self.refused is not None:
            return
        transport = self.transport
        assert isinstance(transport, TLSMemoryBIOProtocol)
        cert = transport.getPeerCertificate()
        fingerprint = _x509_fingerprint(cert) if cert is not None else None
        pin = self.server.check_pin(fingerprint) if fingerprint else None
        if pin is None:  # not reached while the verify callback holds
            self.offered = fingerprint
            self.refuse("certificate-not-pinned")
            return
        self.pin = pin
        self.server.opened(self)
        mux = self.mux = self.server.make_mux(self)
        mux.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self.mux is None:
            self.refuse("data-before-handshake")
            return
        self.mux.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        if self.mux is not None:
            self.mux.connectionLost(reason)
            self.server.closed(self, reason)
            return
        self.server.gone(self)
        if self.refused is None:
            if self.offered is not None and self.pin is None:
                why = "certificate-not-pinned"
            elif reason.check(SSL.Error):
                why = "no-certificate" if self.offered is None and _no_cert(reason) \
                    else "tls-error"
            else:
                why = "closed-in-handshake"
            self._audit_refused(why, reason)

    def refuse(self, why: str) -> None:
        """End the connection (before the mux runs) for reason ``why``."""
        if self.refused is not None:
            return
        self.refused = why
        self._cancel_timer()
        self._audit_refused(why, None)
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _audit_refused(self, why: str, reason: Failure | None) -> None:
        self.refused = why
        fields: dict[str, Any] = {"peer": self.peer, "reason": why, "result": "refused"}
        if self.offered:
            fields["cert"] = self.offered
        if reason is not None and why == "tls-error":
            fields["detail"] = _ssl_text(reason)
        self.server.audit.write("tunnel-refused", **fields)

    def _timed_out(self) -> None:
        self._timer = None
        self.refuse("handshake-timeout")

    def _cancel_timer(self) -> None:
        cancel_call(self._timer)
        self._timer = None


@implementer(IOpenSSLServerConnectionCreator)
class TunnelServer:
    """The pins, the TLS factory, the connections and their streams.

    ``state_dir`` keeps the pins (``tunnel-pins.json``); ``tls_pem`` is vmc's
    key and certificate; ``tls_fingerprint`` its fingerprint (the
    ``tunnel-accept`` answer names it); ``reactor`` connects streams to
    127.0.0.1, ``clock`` times handshakes and pins (wall-clock seconds)."""

    log = Logger()

    def __init__(self, *, reactor: Any, clock: Any, audit: AuditLog, settings: TunnelSettings,
                 state_dir: str | None, tls_pem: str, tls_fingerprint: str,
                 extra_grant: dict[str, Any] | None = None,
                 mux_factory: Callable[[TunnelConnection], IProtocol] | None = None):
        self.reactor = reactor
        self.clock = clock
        self.audit = audit
        self.settings = settings
        self.tls_fingerprint = tls_fingerprint
        #: more fields of the ``tunnel-accept`` answer (``sftp_host_key``)
        self.extra_grant = dict(extra_grant or {})
        self.context = server_context(tls_pem)
        self.origins = Origins()
        self.connections: set[TunnelConnection] = set()
        self._handshaking: set[TunnelConnection] = set()
        self._path = os.path.join(state_dir, PINS_FILE) if state_dir else None
        self._mux_factory = mux_factory
        self.pins = self._load()
        #: the listener's factory: TLS around :class:`TunnelConnection`
        self.factory = MuxTLSFactory(self, False, _ConnectionFactory(self), clock=reactor)

    # -- pins ------------------------------------------------------------------

    def _now(self) -> float:
        return float(self.clock.seconds())

    def _load(self) -> PinSet:
        limits = self.settings.pins
        if self._path is None or not os.path.exists(self._path):
            return PinSet(limits)
        try:
            with open(self._path, "rb") as f:
                return PinSet.from_json(json.loads(f.read(4 << 20)), limits, self._now())
        except (OSError, ValueError) as e:
            # Only fingerprints are lost: the frontends pin again.
            self.log.warn("{path}: unreadable ({why}); starting with no tunnel pins",
                          path=self._path, why=str(e))
            return PinSet(limits)

    def _save(self) -> None:
        if self._path is None:
            return
        try:
            atomic_write(self._path, json.dumps(self.pins.to_json(), sort_keys=True).encode(),
                         0o600)
        except OSError as e:
            self.log.warn("cannot save the tunnel pins to {path}: {why}", path=self._path,
                          why=str(e))

    def accept(self, fingerprint: str, user: str, user_key: bytes) -> dict[str, Any]:
        """``tunnel-accept``: pin ``fingerprint`` for the user (PinRefused
        over a cap); the fields of the ``ok``."""
        try:
            self.pins.accept(fingerprint, user, user_key, self._now())
        except Exception as e:
            self.audit.write("tunnel-accept", user=user, user_key=identity.fingerprint(user_key),
                             cert=fingerprint, reason=getattr(e, "code", "error"),
                             result="refused")
            raise
        self._save()
        self.audit.write("tunnel-accept", user=user, user_key=identity.fingerprint(user_key),
                         cert=fingerprint, result="ok")
        return {"ports": list(self.settings.ports), "tls_fingerprint": self.tls_fingerprint,
                "pin_expires": int(self.settings.pins.pin_ttl), **self.extra_grant}

    def revoked(self, user_key: bytes) -> None:
        """Drop the user's pins and close their tunnels."""
        gone = self.pins.remove_user(user_key)
        if gone:
            self._save()
        for conn in list(self.connections):
            if conn.pin is not None and conn.pin.user_key == user_key:
                conn.transport.abortConnection()  # type: ignore[union-attr]

    def check_pin(self, fingerprint: str) -> Pin | None:
        return self.pins.check(fingerprint, self._now())

    def sweep(self) -> None:
        """Open tunnels keep their pins alive; unused pins expire."""
        now = self._now()
        for conn in self.connections:
            if conn.pin is not None:
                self.pins.touch(conn.pin.fingerprint, now)
        for pin in self.pins.expire(now):
            self.audit.write("tunnel-pin-expired", user=pin.user,
                             user_key=identity.fingerprint(pin.user_key), cert=pin.fingerprint,
                             result="expired")
        self._save()

    # -- TLS -------------------------------------------------------------------

    def serverConnectionForTLS(self, tls: TLSMemoryBIOProtocol) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        conn.set_app_data(tls)
        owner = tls.wrappedProtocol
        assert isinstance(owner, TunnelConnection)
        conn.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, owner.verify)
        return conn

    # -- connections -----------------------------------------------------------

    def admit(self, conn: TunnelConnection) -> bool:
        if len(self._handshaking) + len(self.connections) >= self.settings.max_connections:
            return False
        self._handshaking.add(conn)
        return True

    def opened(self, conn: TunnelConnection) -> None:
        self._handshaking.discard(conn)
        self.connections.add(conn)
        pin = conn.pin
        assert pin is not None
        self.audit.write("tunnel-open", peer=conn.peer, user=pin.user,
                         user_key=identity.fingerprint(pin.user_key), cert=pin.fingerprint,
                         result="ok")

    def gone(self, conn: TunnelConnection) -> None:
        self._handshaking.discard(conn)

    def closed(self, conn: TunnelConnection, reason: Failure) -> None:
        self.connections.discard(conn)
        pin = conn.pin
        assert pin is not None
        stats: dict[str, Any] = getattr(conn.mux, "stats", dict)()
        self.audit.write("tunnel-closed", peer=conn.peer, user=pin.user,
                         user_key=identity.fingerprint(pin.user_key), cert=pin.fingerprint,
                         streams=stats.get("streams_opened", conn._streams),
                         bytes_in=stats.get("bytes_in"), bytes_out=stats.get("bytes_out"),
                         result="closed")

    def make_mux(self, conn: TunnelConnection) -> IProtocol:
        if self._mux_factory is not None:
            return self._mux_factory(conn)
        return MuxProtocol(side="server", clock=self.clock, settings=self.settings.mux,
                           on_stream=lambda incoming: self.stream(conn, incoming))

    # -- streams ---------------------------------------------------------------

    def stream(self, conn: TunnelConnection, incoming: IncomingStream) -> None:
        """A stream to ``incoming.port``: connect to 127.0.0.1 or refuse."""
        pin = conn.pin
        assert pin is not None
        port = incoming.port
        conn._streams += 1
        if port not in self.settings.ports:
            self._stream_refused(conn, port, "port-not-allowed")
            incoming.refuse("port-not-allowed")
            return
        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", port,
                                                timeout=self.settings.connect_timeout)
        origin: list[int] = []  # the local port, once connected

        def local_closed(pipe: Pipe, reason: Failure) -> None:
            for p in origin:
                self.origins.remove(p)

        local = Pipe(on_close=local_closed)
        d: defer.Deferred[Pipe] = connect_protocol(endpoint, local)

        def connected(local: Pipe) -> None:
            host: Any = local.transport.getHost()  # type: ignore[union-attr]
            if not local.closed:
                origin.append(host.port)
                self.origins.add(host.port, pin)  # before a byte of the stream flows
            remote = Pipe()
            incoming.accept(remote)
            splice(remote, local)

        def failed(f: Failure) -> None:
            self._stream_refused(conn, port, "connect-failed", f.getErrorMessage())
            incoming.refuse("connect-failed")

        d.addCallbacks(connected, failed)

    def _stream_refused(self, conn: TunnelConnection, port: int, why: str,
                        detail: str = "") -> None:
        pin = conn.pin
        assert pin is not None
        fields: dict[str, Any] = {"peer": conn.peer, "user": pin.user, "port": port,
                                  "reason": why, "result": "refused"}
        if detail:
            fields["detail"] = detail[:200]
        self.audit.write("tunnel-stream-refused", **fields)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, server: TunnelServer):
        self.server = server

    def buildProtocol(self, addr: IAddress | None) -> TunnelConnection:
        return TunnelConnection(self.server, addr)


class TunnelService(Service):
    """Sweeps the pins (expiry; open tunnels keep theirs) and closes the
    tunnels at stop.  The listener is a :class:`~ticrypt.service.ListenerService`
    on ``server.factory``."""

    def __init__(self, server: TunnelServer, interval: float | None = None):
        self.server = server
        self.interval = interval or max(1.0, min(60.0, server.settings.pins.pin_ttl / 4))
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = start_loop(self._sweep, self.server.clock, self.interval, now=False)

    def _sweep(self) -> None:
        try:
            self.server.sweep()
        except Exception:
            # a LoopingCall that raises stops for good
            Logger().failure("tunnel pin sweep failed")

    def stopService(self) -> None:
        super().stopService()
        stop_loop(self._loop)
        for conn in list(self.server.connections | self.server._handshaking):
            if conn.transport is not None:
                conn.transport.loseConnection()


def _addr_text(addr: IAddress | None) -> str:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is None:
        return str(addr)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _ssl_text(reason: Failure) -> str:
    return str(reason.value)[:200]


def _no_cert(reason: Failure) -> bool:
    text = _ssl_text(reason).lower()
    return "certificate" in text and ("no " in text or "did not return" in text
                                       or "required" in text)
