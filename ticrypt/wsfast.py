"""autobahn's receive path without its per-read and per-message extras.

autobahn's Twisted adapter formats a debug log call's arguments on every
``dataReceived`` (``hltype``, ``hlval``: about 15 us a call, whether debug
logging is on or not), and ``onMessageEnd`` fires its observable ``message``
event (a Deferred per message) for listeners none of our legs has.  On the
data path that is one call per TLS record read and one per message.
:func:`message_end` does what autobahn's ``onMessageEnd`` does without the
event (checked against autobahn 26.10): the frames are joined and handed to
``_onMessage`` unless autobahn failed the connection.  Our protocols
override ``dataReceived`` to call autobahn's ``_dataReceived`` directly:
:class:`LeanClientProtocol` (the frontend's and vmc's legs) and the proxy's
:class:`~ticrypt.proxy.wsmem.LeanWebSocket`.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientProtocol


def message_end(proto: Any) -> None:
    """autobahn's ``onMessageEnd`` without firing the ``message`` event."""
    if not proto.failedByMe:
        data = proto.message_data
        payload = data[0] if len(data) == 1 else b"".join(data)
        proto._onMessage(payload, proto.message_is_binary)
    proto.message_data = None


class LeanClientProtocol(WebSocketClientProtocol):
    """autobahn's client protocol with the receive path above."""

    def dataReceived(self, data: bytes) -> None:
        self._dataReceived(data)

    def onMessageEnd(self) -> None:
        message_end(self)
