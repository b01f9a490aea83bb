"""twistd plugin: ticrypt-allowedlist (imports ticrypt lazily)."""

from twisted.application.service import ServiceMaker

ticrypt_allowedlist = ServiceMaker(
    "ticrypt-allowedlist", "ticrypt.allowedlist.tap",
    "ticrypt DNS allow-list of license servers for VMs", "ticrypt-allowedlist"
)
