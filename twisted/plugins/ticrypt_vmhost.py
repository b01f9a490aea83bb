"""twistd plugin: ticrypt-vmhost (imports ticrypt lazily)."""

from twisted.application.service import ServiceMaker

ticrypt_vmhost = ServiceMaker(
    "ticrypt-vmhost", "ticrypt.vmhost.tap", "ticrypt VM host port forwarder", "ticrypt-vmhost"
)
