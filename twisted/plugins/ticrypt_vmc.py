"""twistd plugin: ticrypt-vmc (imports ticrypt lazily)."""

from twisted.application.service import ServiceMaker

ticrypt_vmc = ServiceMaker(
    "ticrypt-vmc", "ticrypt.vmc.tap", "ticrypt VM controller", "ticrypt-vmc"
)
