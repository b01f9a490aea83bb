"""twistd wiring for ``ticrypt-vmc``: Options and makeService.

The config is :class:`ticrypt.vmc.config.VmcConfig`; the role itself (state,
enrollment, the pool) is :class:`ticrypt.vmc.service.VmcService`.
"""

from __future__ import annotations

from typing import Any

from ticrypt.service import options_for
from ticrypt.vmc.config import VmcConfig
from ticrypt.vmc.service import VmcService

Options = options_for("vmc", VmcConfig)


def makeService(options: Any) -> VmcService:
    """The vmc service for twistd (no I/O here; it starts in startService)."""
    from twisted.internet import reactor

    return VmcService(options["cfg"], reactor)
