"""ticrypt-proxy: the websocket pairing relay between frontends and VM controllers.

Layers: :mod:`~ticrypt.proxy.pairing` (sans-IO table), :mod:`~ticrypt.proxy.ws`
(autobahn legs, relay, backpressure), :mod:`~ticrypt.proxy.status` (read-only
status resource), :mod:`~ticrypt.proxy.tap` (config schema and service).
Wire format: ``PROTOCOL.md §3``.
"""
