"""TCP socket options every role's connections share."""

from __future__ import annotations

from typing import Any


def no_delay(transport: Any) -> bool:
    """Turn Nagle's algorithm off on ``transport``'s TCP socket (also under
    TLS, whose wrapper passes the call down); returns whether it could.

    Twisted leaves Nagle on, so a small write (a keystroke's echo, a window
    update, a request line relayed by a forwarder) waits up to a delayed ACK
    (~40 ms) behind the previous one.  Every connection that relays or
    multiplexes bytes calls this from ``connectionMade``.  (autobahn means to
    do it for websockets but reads the option before it has copied the
    factory's options onto a client protocol, so our client legs call this
    too.)
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is None:
        return False
    try:
        set_no_delay(True)
    except (OSError, AttributeError):  # not a TCP socket (UNIX socket, test transport)
        return False
    return True
