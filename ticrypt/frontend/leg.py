"""The frontend's websocket to the proxy's ``/v1/user``: an autobahn adapter.

:class:`UserLeg` performs what :class:`~ticrypt.frontend.control.UserControl`
decides (present the ticket, wait for ``paired``, close) and, once paired,
runs the user end of the secure channel through :class:`ticrypt.ws.ChannelPump`.
Application messages go to an :class:`AppReceiver` (the session) that
:func:`open_leg` makes once the channel is established.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer
from twisted.logger import Logger

from ticrypt.channel import ChannelError, UserChannel, app
from ticrypt.frontend.control import Action, Close, Feed, SendText, StartChannel, UserControl
from ticrypt.frontend.errors import SessionError
from ticrypt.timers import cancel_call
from ticrypt.ws import ChannelPump, connect_ws, no_delay
from ticrypt.wsfast import LeanClientProtocol


class AppReceiver(Protocol):
    """What the leg tells the session it carries."""

    def app_message(self, header: dict[str, Any], body: bytes) -> None:
        """One application message from the VM (PROTOCOL.md §5)."""

    def leg_closed(self, err: SessionError | None) -> None:
        """The websocket is closed (``err`` None: cleanly, after the session)."""


_R = TypeVar("_R", bound=AppReceiver)


class UserLeg(LeanClientProtocol):
    """The frontend's websocket to the proxy's ``/v1/user``."""

    # autobahn owns ``log`` (txaio) and ``state``.
    plog = Logger()
    factory: _UserFactory
    pump: ChannelPump | None = None
    receiver: AppReceiver | None = None

    def __init__(self) -> None:
        super().__init__()
        self.control = UserControl()

    @property
    def ended(self) -> SessionError | None:
        """Why the leg ended or is ending (None while it runs or closes cleanly)."""
        return self.control.ended

    @property
    def peer_key(self) -> bytes:
        """The VM's key as verified in the handshake (empty before)."""
        return (self.pump.channel.peer_key or b"") if self.pump is not None else b""

    # -- autobahn callbacks ------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        no_delay(self.transport)  # autobahn's own attempt fails on a client

    def onOpen(self) -> None:
        self._do(self.control.opened(self.factory.ticket))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self._do(self.control.message(payload, isBinary))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.pump is not None:
            self.pump.channel.close()
        err = self.control.closed(code, reason)
        if not self.factory.ready.called:
            self.factory.ready.errback(self.control.ended)
        if self.receiver is not None:
            self.receiver.leg_closed(err)

    # -- what the session uses -----------------------------------------------

    def send_app(self, header: dict[str, Any], body: bytes = b"") -> None:
        """One application message to the VM (dropped unless established)."""
        if self.pump is not None:
            self.pump.send_app(app.encode(header, body))

    def close(self, code: int, reason: str) -> None:
        """Close the websocket (once)."""
        self._do(self.control.close(code, reason))

    def timed_out(self, seconds: float) -> None:
        """The set-up deadline passed (nothing happens once established)."""
        self._do(self.control.timed_out(seconds))

    # -- actions and channel events ----------------------------------------

    def _do(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendText):
                self.sendMessage(action.text.encode("utf-8"), isBinary=False)
            elif isinstance(action, StartChannel):
                f = self.factory
                self.pump = ChannelPump(UserChannel(f.user_key, f.vm_id, f.vm_public_key),
                                        send=self.sendMessage,
                                        on_established=self._established,
                                        on_delivered=self._delivered,
                                        on_failed=self._channel_failed,
                                        stopped=lambda: self.control.closing)
                self.pump.start()
            elif isinstance(action, Feed):
                assert self.pump is not None
                self.pump.feed(action.payload, action.is_binary)
            elif isinstance(action, Close):
                self.sendClose(action.code, action.reason)

    def _established(self, peer_key: bytes) -> None:
        self.control.established()
        self.receiver = self.factory.make_receiver(self)
        if not self.factory.ready.called:
            self.factory.ready.callback(self.receiver)

    def _delivered(self, plaintext: bytes) -> None:
        try:
            header, body = app.decode(plaintext)
        except app.AppError:
            self.plog.warn("malformed application message from the VM")
            return
        if self.receiver is not None:
            self.receiver.app_message(header, body)

    def _channel_failed(self, e: ChannelError) -> None:
        self._do(self.control.channel_failed(e.code, e.message))


class _UserFactory(WebSocketClientFactory):
    protocol = UserLeg  # type: ignore[assignment]
    ticket: str
    user_key: Ed25519PrivateKey
    vm_id: str
    vm_public_key: bytes
    make_receiver: Callable[[UserLeg], AppReceiver]
    ready: defer.Deferred[AppReceiver]


async def open_leg(reactor: Any, proxy_url: str, ca_file: str, ticket: str,
                   user_key: Ed25519PrivateKey, vm_id: str, vm_public_key: bytes,
                   make_receiver: Callable[[UserLeg], _R], *, timeout: float,
                   max_message: int) -> _R:
    """Connect to ``proxy_url``'s ``/v1/user``, present the ticket, pair and
    run the handshake within ``timeout``; then ``make_receiver(leg)`` (the
    session) gets the application messages and is returned.

    Every failure is a SessionError.  Plain ``ws://`` is allowed: the URL
    comes from rest, which refuses one unless ``allow_plain_http`` (tests).
    """
    url = proxy_url.rstrip("/") + "/v1/user"
    factory = _UserFactory(reactor=reactor)
    factory.ticket, factory.user_key, factory.vm_id = ticket, user_key, vm_id
    factory.vm_public_key, factory.make_receiver = vm_public_key, make_receiver
    factory.ready = defer.Deferred()
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'wss' else 80)}"
    try:
        connecting = connect_ws(reactor, url, ca_file, factory, max_message=max_message,
                                timeout=timeout, allow_plain=True)
    except (OSError, ValueError) as e:
        raise SessionError("unreachable", f"unreachable: cannot connect to the proxy at "
                           f"{where}: {e}") from None
    try:
        leg: UserLeg = await connecting
    except Exception as e:
        raise SessionError("unreachable", f"unreachable: cannot connect to the proxy at "
                           f"{where} ({e.__class__.__name__})") from None
    timer = reactor.callLater(timeout, leg.timed_out, timeout)
    try:
        return cast(_R, await factory.ready)
    finally:
        cancel_call(timer)
