"""The websocket client pieces every role that dials the proxy shares.

:func:`connect_ws` is the one client set-up: URL -> :class:`HostnameEndpoint`
-> TLS that trusts only the deployment's CA (:func:`ticrypt.tlsutil.client_options`)
-> protocol limits on the autobahn client factory -> ``connect``.  Plain
``ws://`` is refused unless the caller allows it (the frontend does: rest
hands it the proxy URL and refuses ``ws://`` itself unless ``allow_plain_http``).

:class:`ChannelPump` is the one adapter between a sans-IO secure channel
(:mod:`ticrypt.channel`, which knows nothing of autobahn) and a websocket::

    pump = ChannelPump(channel, send=self.sendMessage,
                       on_established=..., on_delivered=..., on_failed=...)
    pump.start()                      # the user end's ClientHello
    pump.feed(payload, isBinary)      # from onMessage
    pump.send_app(plaintext)          # one sealed record

Close codes live in :mod:`ticrypt.closecodes`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

from ticrypt import tlsutil
from ticrypt.channel import (
    ChannelError,
    Delivered,
    Established,
    SendMessage,
    UserChannel,
    VmChannel,
)
from ticrypt.heap import tune_malloc
from ticrypt.tcp import no_delay  # noqa: F401  (the legs import it from here)

_F = TypeVar("_F", bound=WebSocketClientFactory)

#: Seconds to wait for the far end's close frame after sending ours.
CLOSE_TIMEOUT = 5


def ws_endpoint(reactor: Any, url: str, ca_file: str, *, timeout: float,
                allow_plain: bool = False) -> Any:
    """The client endpoint for a ``wss://`` URL (TLS pinned to ``ca_file``,
    host name or IP verified), or for ``ws://`` when ``allow_plain``.

    ``timeout`` bounds the TCP connect.  ValueError (one line) for another
    scheme, or ``ws://`` not allowed; it is raised at once, nothing is sent.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("wss", "ws"):
        raise ValueError(f"{url!r} is not a websocket URL (wss://)")
    secure = parts.scheme == "wss"
    if not secure and not allow_plain:
        raise ValueError(f"refusing plain ws:// to {parts.netloc}; use wss://")
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if secure:
        endpoint = wrapClientTLS(tlsutil.client_options(host, ca_file), endpoint)
    return endpoint


def set_limits(factory: _F, url: str, *, max_message: int, handshake_timeout: float,
               ping_interval: float | None = None) -> _F:
    """Point ``factory`` at ``url`` (its other session parameters kept) and set
    the protocol limits every leg of ours uses; returns ``factory``.

    ``max_message`` bounds each message and each frame (0: autobahn does not
    bound them, the protocol does it itself); ``handshake_timeout`` bounds the
    opening handshake; ``ping_interval`` (None: no pings) sends a ping that
    interval after the last traffic and drops a peer that does not answer
    within as long.  No compression: a compressed message's size is not
    what the bound sees.
    """
    if factory.url != url:
        factory.setSessionParameters(url=url, origin=factory.origin,
                                     protocols=factory.protocols, useragent=factory.useragent,
                                     headers=factory.headers, proxy=factory.proxy)
    options: dict[str, Any] = {}
    if ping_interval is not None:
        options.update(autoPingInterval=ping_interval, autoPingTimeout=ping_interval)
    factory.setProtocolOptions(maxMessagePayloadSize=max_message,
                               maxFramePayloadSize=max_message,
                               openHandshakeTimeout=handshake_timeout,
                               closeHandshakeTimeout=CLOSE_TIMEOUT,
                               perMessageCompressionOffers=[], **options)
    return factory


def connect_ws(reactor: Any, url: str, ca_file: str, factory: WebSocketClientFactory, *,
               max_message: int, timeout: float, handshake_timeout: float | None = None,
               ping_interval: float | None = None, allow_plain: bool = False,
               endpoint: Any = None) -> defer.Deferred[Any]:
    """Connect ``factory``'s protocol to the websocket at ``url``.

    ``timeout`` bounds the TCP connect and (unless ``handshake_timeout`` is
    given) the opening handshake; see :func:`set_limits` for the rest.
    ``endpoint`` replaces the one built from ``url`` (tests).  Fires with the
    protocol once connected (before the websocket is open).
    """
    tune_malloc()
    if endpoint is None:
        endpoint = ws_endpoint(reactor, url, ca_file, timeout=timeout, allow_plain=allow_plain)
    set_limits(factory, url, max_message=max_message,
               handshake_timeout=timeout if handshake_timeout is None else handshake_timeout,
               ping_interval=ping_interval)
    result: defer.Deferred[Any] = endpoint.connect(factory)
    return result


def _never() -> bool:
    return False


@attrs.define(eq=False)
class ChannelPump:
    """Feeds one secure channel's events to its websocket.

    ``send(payload, is_binary)`` is the websocket's ``sendMessage``;
    ``on_established(peer_key)``, ``on_delivered(plaintext)`` and
    ``on_failed(error)`` are the leg's.  After ``on_failed`` the channel is
    dead: the leg closes the websocket.  ``stopped()`` true (the leg sent its
    close) drops whatever the channel still has to say.
    """

    channel: UserChannel | VmChannel
    send: Callable[[bytes, bool], object]
    on_established: Callable[[bytes], object]
    on_delivered: Callable[[bytes], object]
    on_failed: Callable[[ChannelError], object]
    stopped: Callable[[], bool] = _never

    def start(self) -> None:
        """The user end's first message (the channel must be a UserChannel)."""
        assert isinstance(self.channel, UserChannel)
        self.pump(self.channel.start())

    def feed(self, payload: bytes, is_binary: bool) -> None:
        """One websocket message: text must be UTF-8 (else ``bad-message``)."""
        try:
            message: bytes | str = payload if is_binary else payload.decode("utf-8")
            events = self.channel.receive(message)
        except UnicodeDecodeError:
            self.channel.close()
            self.on_failed(ChannelError("bad-message", "a text message is not UTF-8"))
            return
        except ChannelError as e:
            self.on_failed(e)
            return
        self.pump(events)

    def pump(self, events: Iterable[object]) -> None:
        """Write each SendMessage in order; hand on Established and Delivered."""
        for event in events:
            if self.stopped():
                return
            if isinstance(event, SendMessage):
                if isinstance(event.data, str):
                    self.send(event.data.encode("utf-8"), False)
                else:
                    self.send(event.data, True)
            elif isinstance(event, Established):
                self.on_established(event.peer_key)
            elif isinstance(event, Delivered):
                self.on_delivered(event.plaintext)

    def send_app(self, plaintext: bytes) -> None:
        """Seal ``plaintext`` into one binary message; dropped before the
        handshake is done or once stopped.  A sealing failure (the record
        counter ran out) is ``on_failed``."""
        if self.stopped() or not self.channel.established:
            return
        try:
            record = self.channel.seal(plaintext)
        except ChannelError as e:
            self.on_failed(e)
            return
        self.send(record, True)
