"""twistd plugin: ticrypt-rest (imports ticrypt lazily)."""

from twisted.application.service import ServiceMaker

ticrypt_rest = ServiceMaker(
    "ticrypt-rest", "ticrypt.rest.tap", "ticrypt backend REST entry point", "ticrypt-rest"
)
