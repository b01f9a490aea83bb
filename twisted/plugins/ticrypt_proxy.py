"""twistd plugin: ticrypt-proxy (imports ticrypt lazily)."""

from twisted.application.service import ServiceMaker

ticrypt_proxy = ServiceMaker(
    "ticrypt-proxy", "ticrypt.proxy.tap", "ticrypt websocket pairing relay", "ticrypt-proxy"
)
