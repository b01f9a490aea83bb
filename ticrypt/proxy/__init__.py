"""ticrypt-proxy: the websocket pairing relay between frontends and VM controllers.

Layers: :mod:`~ticrypt.proxy.pairing` (sans-IO table),
:mod:`~ticrypt.proxy.control` (sans-IO control exchange of each leg),
:mod:`~ticrypt.proxy.relay` (a pair of ends: relay, backpressure, closing),
:mod:`~ticrypt.proxy.ws` (autobahn legs and their factory) with
:mod:`~ticrypt.proxy.wsmem` and :mod:`~ticrypt.proxy.tlsmem` (what they do
to autobahn's and OpenSSL's internals), :mod:`~ticrypt.proxy.replay` and
:mod:`~ticrypt.proxy.revocations` (single-use tickets, rest's revocation
feed), :mod:`~ticrypt.proxy.status` (read-only status resource),
:mod:`~ticrypt.proxy.config` (the typed config) and
:mod:`~ticrypt.proxy.tap` (options and service).
Wire format: ``PROTOCOL.md §3``.
"""

from ticrypt import leanimport

leanimport.install()  # before any module of this package loads autobahn
