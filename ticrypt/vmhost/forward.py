"""User-space mode: one listener per VM, each a :class:`ticrypt.forward.ForwardFactory`."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ClientEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint

from ticrypt.audit import AuditLog
from ticrypt.forward import ForwardFactory
from ticrypt.service import ListenerService
from ticrypt.vmhost.config import VmhostSection, VmTarget


def vm_factory(vm: VmTarget, cfg: VmhostSection, reactor: Any, audit: AuditLog) -> ForwardFactory:
    """The forwarder of VM ``vm``: every connection goes to ``vm.host:vm.port``."""

    def target() -> IStreamClientEndpoint:
        cls = TCP6ClientEndpoint if ":" in vm.host else TCP4ClientEndpoint
        return cls(reactor, vm.host, vm.port, timeout=cfg.connect_timeout)

    def event(name: str, **fields: Any) -> None:
        audit.write(f"forward-{name}", vm=vm.n, port=cfg.base + vm.n, **fields)

    return ForwardFactory(target, clock=reactor, connect_timeout=cfg.connect_timeout,
                          idle_timeout=cfg.idle_timeout, max_connections=cfg.max_connections,
                          on_event=event)


def add_listeners(parent: MultiService, cfg: VmhostSection, reactor: Any,
                  audit: AuditLog) -> dict[int, ForwardFactory]:
    """One :class:`ListenerService` per VM under ``parent`` (labelled
    ``vmN``, so the readiness line lists every port); returns the factories."""
    factories: dict[int, ForwardFactory] = {}
    server = TCP6ServerEndpoint if ":" in cfg.listen_host else TCP4ServerEndpoint
    for vm in cfg.vms:
        factory = vm_factory(vm, cfg, reactor, audit)
        endpoint = server(reactor, cfg.base + vm.n, interface=cfg.listen_host)
        ListenerService(f"vm{vm.n}", endpoint, factory,
                        key=("vmhost", "base")).setServiceParent(parent)
        factories[vm.n] = factory
    return factories
