"""twistd plugin: ticrypt-connect (imports ticrypt lazily)."""

from twisted.application.service import ServiceMaker

ticrypt_connect = ServiceMaker(
    "ticrypt-connect", "ticrypt.connect.tap", "ticrypt local tunnel agent", "ticrypt-connect"
)
