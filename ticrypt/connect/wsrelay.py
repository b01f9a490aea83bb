"""The page's websocket to the proxy, relayed by connect (PROTOCOL.md §7
"The page").

``ws://127.0.0.1:PORT/relay/v1/user`` with the subprotocols
``ticrypt-relay-v1`` and ``bearer.PAGE_TOKEN``: :class:`RelayResource`
checks Host, Origin (required) and the token before anything is dialled
(refused: HTTP 403/401, audited ``api-refused``), then hands the connection
to autobahn.  Once the page's websocket is open connect dials rest's
``proxy_url`` + ``/v1/user`` (from rest's ``GET /v1/backend``, cached by
:class:`ProxyUrl`; never a URL from the page) with the deployment's CA
pinned (:func:`ticrypt.ws.connect_ws`), within ``[page]
handshake_timeout``; failing that the page is closed ``4013
proxy-unreachable: ...``.

From then on every message is relayed whole, unchanged, in order, text as
text and binary as binary, at most ``[page] max_message`` bytes each.
Closes are passed on as the proxy passes them (§3 Closing,
:func:`ticrypt.closecodes.passed_on`).  Backpressure: each side's
transport holds a producer that stops reading the other side while its own
send buffer is full (:data:`BUFFER` bytes).  Messages the page sends before
the proxy's side is open are kept, at most ``max_message`` bytes in all.

The page's frames are counted from its open (:class:`~ticrypt.wsfast.FrameCounting`,
``[page]``'s :class:`~ticrypt.framebudget.FrameLimits`, the proxy's
defaults): over a limit nothing more of the page is parsed, the page is
closed ``4009 over-limit: too many websocket frames``, the proxy's side
``4009 over-limit: the peer sent too many websocket frames``, and the
page's connection is dropped once its close frame is out.

Audit: ``relay-open`` (relay id, client) and ``relay-closed`` (relay id,
close code and reason sent to the page, who ended it, bytes each way,
duration); never a token or a payload byte.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

from ticrypt import closecodes as cc
from ticrypt.audit import AuditLog
from ticrypt.connect.api import Admission, header_text
from ticrypt.framebudget import PEER_REASON, FrameBudget, FrameLimits, Violation
from ticrypt.http.client import HttpError, JsonClient
from ticrypt.http.server import error_body
from ticrypt.timers import cancel_call
from ticrypt.ws import connect_ws
from ticrypt.wsfast import FrameCounting, LeanClientProtocol, drop_close_timer

SUBPROTOCOL = "ticrypt-relay-v1"
BEARER = "bearer."
#: Bytes queued towards one side before the other side is not read.
BUFFER = 256 * 1024
#: How long rest's proxy_url is kept (it is fetched again after a failed dial).
PROXY_URL_TTL = 600.0

_OPEN = WebSocketProtocol.STATE_OPEN


@attrs.define
class RelaySettings:
    """What the relay needs of ``[page]``."""

    ca_file: str | None
    max_relays: int
    handshake_timeout: float
    max_message: int
    ping_interval: float = 30.0
    frames: FrameLimits = attrs.field(factory=FrameLimits)


class ProxyUrlSource(Protocol):
    """Where a page relay learns the proxy's URL (:class:`ProxyUrl`)."""

    async def get(self) -> str:
        """The proxy's URL; ValueError (one line) when it is not known."""

    def forget(self) -> None:
        """A dial to the URL failed: ask again next time."""


class ProxyUrl:
    """rest's ``proxy_url`` (``GET /v1/backend``), kept :data:`PROXY_URL_TTL`."""

    def __init__(self, client: JsonClient, rest_url: str, clock: IReactorTime):
        self._client = client
        self._rest_url = rest_url
        self._clock = clock
        self._cached: tuple[str, float] | None = None

    async def get(self) -> str:
        """The URL; ValueError (one line) when rest cannot tell it."""
        now = self._clock.seconds()
        if self._cached is not None and self._cached[1] > now:
            return self._cached[0]
        try:
            status, answer = await self._client.request("GET", self._rest_url + "/v1/backend")
        except HttpError as e:
            raise ValueError(f"rest did not answer: {e}") from None
        url = answer.get("proxy_url") if isinstance(answer, dict) else None
        if status != 200 or not isinstance(url, str) \
                or not url.startswith(("wss://", "ws://")) or len(url) > 2048:
            raise ValueError(f"rest's /v1/backend gave no proxy URL (HTTP {status})")
        self._cached = (url.rstrip("/"), now + PROXY_URL_TTL)
        return self._cached[0]

    def forget(self) -> None:
        self._cached = None


#: Connects a client factory to a websocket URL: ``(url, factory) -> Deferred``.
Dial = Callable[[str, WebSocketClientFactory], "defer.Deferred[Any]"]


@implementer(IPushProducer)
class _FullWatch:
    """On a side's own transport: while its send buffer is full the other
    side is not read."""

    def __init__(self, relay: PageLeg, side: str):
        self._relay = relay
        self._side = side

    def pauseProducing(self) -> None:
        self._relay.hold(self._side, True)

    def resumeProducing(self) -> None:
        self._relay.hold(self._side, False)

    def stopProducing(self) -> None:
        pass


def _watch(proto: Any, producer: IPushProducer) -> None:
    transport: Any = proto.transport
    transport.bufferSize = BUFFER
    # under TLS (the proxy's side) or the connection cap's wrapper (the
    # page's) the buffer that fills is the TCP connection's
    inner = getattr(transport, "transport", None)
    if inner is not None:
        inner.bufferSize = BUFFER
    transport.unregisterProducer()  # the HTTP channel's, on the page's side
    transport.registerProducer(producer, True)


def _send_close(proto: Any, code: int, reason: str) -> None:
    """A close frame with any ``code`` (1001, 1009 too) if the websocket is open."""
    if proto.state == _OPEN:
        proto.sendCloseFrame(code=code, reasonUtf8=cc.reason(reason).encode("utf-8"),
                             isReply=False)


class _HearsClose:
    """Records the close frame the peer sent on the open websocket
    (``received``: its code and reason), not one autobahn failed."""

    received: tuple[int | None, str | None] | None = None

    def onCloseFrame(self, code: int, reasonRaw: bytes) -> Any:
        me: Any = self
        was_open = me.state == _OPEN
        result = super().onCloseFrame(code, reasonRaw)  # type: ignore[misc]
        if was_open and not me.failedByMe:
            self.received = (me.remoteCloseCode, me.remoteCloseReason)
        return result


class ProxyLeg(_HearsClose, LeanClientProtocol):  # type: ignore[misc]
    """connect's websocket to the proxy's ``/v1/user`` for one page."""

    factory: _ProxyFactory

    def onOpen(self) -> None:
        self.factory.page.proxy_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.page.from_proxy(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.page.proxy_closed(self)


class _ProxyFactory(WebSocketClientFactory):
    protocol = ProxyLeg  # type: ignore[assignment]
    page: PageLeg


class PageLeg(FrameCounting, _HearsClose, WebSocketServerProtocol):  # type: ignore[misc]
    """The page's websocket; its relay to the proxy."""

    plog = Logger()
    factory: PageRelayFactory
    proxy: ProxyLeg | None = None
    relay_id = ""
    _ended = False
    _counted = False

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[bytes, bool]] = []
        self.pending_size = 0
        self.bytes_up = 0     # page -> proxy
        self.bytes_down = 0   # proxy -> page
        self.started = 0.0
        self.client = "?"
        self._dial_timer: IDelayedCall | None = None
        self._connecting: defer.Deferred[Any] | None = None
        self._dialled: ProxyLeg | None = None
        self.received: tuple[int | None, str | None] | None = None

    # -- the page's side (autobahn callbacks) ------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> str:
        self.client = str(request.peer).rsplit(":", 1)[0].removeprefix("tcp4:")
        return SUBPROTOCOL  # RelayResource checked it was offered

    def onOpen(self) -> None:
        hub = self.factory
        self.started = hub.clock.seconds()
        self.frame_budget = FrameBudget(hub.settings.frames, self.started)
        hub.serial += 1
        self.relay_id = f"r{hub.serial}"
        if len(hub.relays) >= hub.settings.max_relays:
            self._end_page(cc.OVER_LIMIT.code, cc.reason(
                cc.OVER_LIMIT.name, f"more than {hub.settings.max_relays} page relays at once"),
                "connect")
            return
        hub.relays.add(self)
        self._counted = True
        hub.audit.write("relay-open", relay=self.relay_id, client=self.client)
        _watch(self, _FullWatch(self, "page"))
        self._dial_timer = hub.clock.callLater(hub.settings.handshake_timeout,
                                               self._dial_too_slow)
        d = defer.ensureDeferred(self._dial())
        d.addErrback(lambda f: self.plog.failure("connect: page relay dial failed", f))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._ended:
            return
        self.bytes_up += len(payload)
        if self.proxy is not None and self.proxy.state == _OPEN:
            self.proxy.sendMessage(payload, isBinary)
            return
        self.pending_size += len(payload)
        if self.pending_size > self.factory.settings.max_message:
            self._end_page(cc.OVER_LIMIT.code, cc.reason(
                cc.OVER_LIMIT.name, "too much sent before the proxy answered"), "connect")
            return
        self.pending.append((payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """The page's websocket is closed: close the proxy's side as §3 says."""
        if self.received is not None:
            out = cc.passed_on(*self.received)
        elif self.failedByMe and self.localCloseCode == cc.TOO_BIG.code:
            out = (cc.TOO_BIG.code, cc.reason(cc.TOO_BIG.name, "the page sent a message over "
                                              "connect's limit"))
        else:
            out = (cc.PEER_LOST.code, cc.reason(cc.PEER_LOST.name, "the page's connection "
                                                "was lost without a close frame"))
        self._cancel_dial()
        if self.proxy is not None:
            _send_close(self.proxy, *out)
        self._finish(self.localCloseCode, self.localCloseReason, "page")

    def frames_exceeded(self, violation: Violation) -> None:
        """Over a frame limit (nothing more of the page is parsed): the page
        is closed 4009, the proxy's side too, and the page's connection is
        dropped once the close frame is out (a page that does not read it
        is aborted after autobahn's close handshake timeout)."""
        self.plog.info("connect: page relay {relay} from {client} over the frame limit "
                       "({limit}, {allowed}): dropped", relay=self.relay_id,
                       client=self.client, limit=violation.limit, allowed=violation.allowed)
        if self.proxy is not None:
            _send_close(self.proxy, cc.OVER_LIMIT.code, PEER_REASON)
            self.hold("page", False)  # the proxy's close reply is read
        self._end_page(cc.OVER_LIMIT.code, violation.reason, "page")
        self.unregisterProducer()  # a registered producer keeps the close from finishing
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            drop_close_timer(self)

    # -- dialling the proxy ----------------------------------------------------------

    async def _dial(self) -> None:
        hub = self.factory
        try:
            url = await hub.proxy_url.get()
        except ValueError as e:
            self._unreachable(str(e))
            return
        if self._ended or self.state != _OPEN:
            return
        factory = _ProxyFactory(reactor=hub.reactor)
        factory.page = self
        try:
            self._connecting = hub.dial(url + "/v1/user", factory)
        except (OSError, ValueError) as e:
            self._unreachable(str(e))
            return
        try:
            self._dialled = await self._connecting
        except defer.CancelledError:
            return
        except Exception as e:
            hub.proxy_url.forget()
            self._unreachable(f"cannot connect to the proxy ({e.__class__.__name__})")
        finally:
            self._connecting = None

    def _dial_too_slow(self) -> None:
        self._dial_timer = None
        self.factory.proxy_url.forget()
        self._unreachable(f"no connection to the proxy within "
                          f"{self.factory.settings.handshake_timeout:g}s")

    def _cancel_dial(self) -> None:
        """Stop a dial in progress (a proxy websocket not yet open is dropped)."""
        cancel_call(self._dial_timer)
        self._dial_timer = None
        if self._connecting is not None:
            self._connecting.cancel()
        dialled, self._dialled = self._dialled, None
        if dialled is not None and self.proxy is None and dialled.transport is not None:
            dialled.transport.abortConnection()  # type: ignore[attr-defined]

    def _unreachable(self, why: str) -> None:
        self._end_page(cc.PROXY_UNREACHABLE.code, cc.reason(cc.PROXY_UNREACHABLE.name, why),
                       "connect")

    # -- the proxy's side ------------------------------------------------------------

    def proxy_opened(self, proxy: ProxyLeg) -> None:
        if self._ended or self.state != _OPEN:
            _send_close(proxy, cc.NORMAL.code, "")
            return
        cancel_call(self._dial_timer)
        self._dial_timer = None
        self.proxy, self._dialled = proxy, None
        _watch(proxy, _FullWatch(self, "proxy"))
        pending, self.pending, self.pending_size = self.pending, [], 0
        for payload, is_binary in pending:
            proxy.sendMessage(payload, is_binary)

    def from_proxy(self, payload: bytes, is_binary: bool) -> None:
        if not self._ended and self.state == _OPEN:
            self.bytes_down += len(payload)
            self.sendMessage(payload, is_binary)

    def proxy_closed(self, proxy: ProxyLeg) -> None:
        """The proxy's side ended: close the page's as §3 says."""
        if self.proxy is not proxy:  # never opened: the dial failed
            if not self._ended and self.state == _OPEN and self._connecting is None:
                self._dialled = None
                self.factory.proxy_url.forget()
                self._unreachable("the proxy's websocket did not open (TLS or HTTP "
                                  "refused)")
            return
        if proxy.received is not None:
            code, reason = cc.passed_on(*proxy.received)
        elif proxy.failedByMe and proxy.localCloseCode == cc.TOO_BIG.code:
            code, reason = cc.TOO_BIG.code, cc.reason(cc.TOO_BIG.name, "the proxy sent a "
                                                      "message over connect's limit")
        else:
            code, reason = cc.PEER_LOST.code, cc.reason(
                cc.PEER_LOST.name, "the proxy's connection was lost without a close frame")
        self.hold("proxy", False)
        self._end_page(code, reason, "proxy")

    # -- both --------------------------------------------------------------------------

    def hold(self, side: str, full: bool) -> None:
        """``side``'s send buffer is ``full`` (or drained): the other side is
        not read (or read again)."""
        other: Any = self.proxy if side == "page" else self
        if other is None or other.transport is None:
            return
        if full:
            other.transport.pauseProducing()
        else:
            other.transport.resumeProducing()

    def _end_page(self, code: int, reason: str, by: str) -> None:
        if self._ended:
            return
        self._cancel_dial()
        _send_close(self, code, reason)
        self._finish(code, reason, by)

    def _finish(self, code: int | None, reason: str | None, by: str) -> None:
        if self._ended:
            return
        self._ended = True
        self.pending, self.pending_size = [], 0
        hub = self.factory
        if self._counted:
            hub.relays.discard(self)
            hub.audit.write("relay-closed", relay=self.relay_id, client=self.client,
                            code=code, reason=(reason or "")[:123], ended_by=by,
                            bytes_up=self.bytes_up, bytes_down=self.bytes_down,
                            duration=round(hub.clock.seconds() - self.started, 3))


class PageRelayFactory(WebSocketServerFactory):
    """What the page relays share: settings, the audit log, the count, where
    the proxy's URL comes from and how to dial it."""

    protocol = PageLeg  # type: ignore[assignment]

    def __init__(self, *, reactor: Any, clock: IReactorTime, settings: RelaySettings,
                 audit: AuditLog, proxy_url: ProxyUrlSource, dial: Dial | None = None):
        super().__init__(reactor=reactor, server="ticrypt-connect")
        self.clock = clock
        self.settings = settings
        self.audit = audit
        self.proxy_url = proxy_url
        self.relays: set[PageLeg] = set()
        self.serial = 0
        self.dial: Dial = dial or self._dial
        s = settings
        self.setProtocolOptions(
            webStatus=False, maxMessagePayloadSize=s.max_message,
            maxFramePayloadSize=s.max_message, autoPingInterval=s.ping_interval,
            autoPingTimeout=s.ping_interval, openHandshakeTimeout=s.handshake_timeout,
            closeHandshakeTimeout=5, failByDrop=False, utf8validateIncoming=True,
            requireMaskedClientFrames=True, autoFragmentSize=0, trustXForwardedFor=0,
            perMessageCompressionAccept=lambda offers: None)

    def _dial(self, url: str, factory: WebSocketClientFactory) -> defer.Deferred[Any]:
        s = self.settings
        return connect_ws(self.reactor, url, s.ca_file or "", factory,
                          max_message=s.max_message, timeout=s.handshake_timeout,
                          allow_plain=True)


class RelayResource(WebSocketResource):
    """``/relay/v1/user``: admission, then autobahn takes the connection."""

    def __init__(self, factory: PageRelayFactory, admission: Admission,
                 enabled: bool = True):
        super().__init__(factory)
        self.admission = admission
        self.enabled = enabled

    def render(self, request: server.Request) -> Any:
        offered = [p.strip() for p in (request.getHeader(b"sec-websocket-protocol") or b"")
                   .decode("latin-1").split(",")]
        tokens = [p[len(BEARER):] for p in offered if p.startswith(BEARER)]
        why = self.admission.site_problem(
            header_text(request, b"host"), header_text(request, b"origin"), origin_required=True)
        status = 403
        if why is None:
            if len(tokens) != 1 or self.admission.token_problem(tokens[0]) is not None:
                why, status = "unauthorized", 401
            elif SUBPROTOCOL not in offered:
                why, status = "bad-subprotocol", 400
            elif not self.enabled:
                why, status = "page-disabled", 503
        if why is not None:
            self.admission.refused(request, why)
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            return error_body(why, "the page relay refused this websocket")
        # autobahn owns the connection from now: no HTTP timers on it
        request.channel.setTimeout(None)
        return super().render(request)


__all__ = ["BEARER", "SUBPROTOCOL", "PageLeg", "PageRelayFactory", "ProxyLeg", "ProxyUrl",
           "ProxyUrlSource", "RelayResource", "RelaySettings"]
