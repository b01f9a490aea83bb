"""Service plumbing shared by every daemon: ``--config`` options, listeners
whose failed bind stops start-up, and the readiness line.

When all listeners of a role are up the role logs one line::

    TICRYPT-READY {"role": "rest", "listening": {"https": "127.0.0.1:8443"}}

Tests and ``ticrypt-lab`` wait for that line instead of sleeping.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorCore
from twisted.logger import Logger
from twisted.python import usage

from ticrypt.config import Config, ConfigError, Schema, load_config
from ticrypt.tlsutil import alpn_http11

READY_MARKER = "TICRYPT-READY"


def options_for(role: str, schema: Schema) -> type[usage.Options]:
    """A twistd Options class: ``--config FILE`` loaded into ``self["cfg"]``."""

    class Options(usage.Options):
        synopsis = f"--config {role}.ini"
        longdesc = f"Run ticrypt-{role}.  Every key is documented in etc/{role}.ini."
        optParameters = [["config", "c", None, f"path to the {role} ini file"]]

        def postOptions(self) -> None:
            if not self["config"]:
                raise usage.UsageError(f"ticrypt-{role}: --config FILE is required")
            try:
                self["cfg"] = load_config(self["config"], schema)
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None

    Options.__name__ = f"{role.capitalize()}Options"
    return Options


class ListenerService(Service):
    """Listen on a server endpoint; a failed bind raises from startService,
    which makes twistd exit instead of running without its port.  TLS
    endpoints get the ALPN policy of :func:`ticrypt.tlsutil.alpn_http11`."""

    log = Logger()

    def __init__(self, label: str, endpoint: Any, factory: IProtocolFactory):
        self.label = label
        self.endpoint = alpn_http11(endpoint)
        self.factory = factory
        self.port: IListeningPort | None = None
        self.ready: defer.Deferred[IListeningPort] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        failures: list[Any] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.log.info("{label} listening on {address}", label=self.label,
                      address=self.address())
        self.ready.callback(port)
        return port

    def address(self) -> str:
        if self.port is None:
            return ""
        host = self.port.getHost()
        h = getattr(host, "host", "?")
        port = getattr(host, "port", 0)
        return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class RoleService(MultiService):
    """A role's top service.  Once every :class:`ListenerService` child is
    listening (and every ``extra_ready`` deferred has fired) it logs the
    readiness line."""

    log = Logger()

    def __init__(self, role: str, config: Config | None = None,
                 reactor: IReactorCore | None = None):
        super().__init__()
        self.role = role
        self.config = config
        self.extra_ready: list[defer.Deferred[Any]] = []
        self.ready_info: dict[str, Any] = {}

    def listeners(self) -> list[ListenerService]:
        return [s for s in self if isinstance(s, ListenerService)]

    def startService(self) -> None:
        super().startService()
        waits = [s.ready for s in self.listeners()] + list(self.extra_ready)
        d = defer.gatherResults(waits, consumeErrors=True)
        d.addCallback(lambda _: self._announce())
        d.addErrback(lambda f: self.log.failure("{role} failed to start", f, role=self.role))

    def _announce(self) -> None:
        info = {"role": self.role,
                "listening": {s.label: s.address() for s in self.listeners()}}
        info.update(self.ready_info)
        self.log.info(READY_MARKER + " {ready}", ready=json.dumps(info, sort_keys=True))
