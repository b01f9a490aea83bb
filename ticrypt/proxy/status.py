"""Read-only status: ``GET /v1/status`` -> ``{"vms": {vm_id: waiting}, "pairs": n}``.

Served on its own optional listener (``status_listen``) so the public port
does not reveal which VMs are connected.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request


class _Status(Resource):
    isLeaf = True

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        super().__init__()
        self._snapshot = snapshot

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self._snapshot(), sort_keys=True).encode() + b"\n"


def status_resource(snapshot: Callable[[], dict[str, Any]]) -> Resource:
    """A resource tree with ``/v1/status`` only (404 elsewhere)."""
    root = Resource()
    v1 = Resource()
    root.putChild(b"v1", v1)
    v1.putChild(b"status", _Status(snapshot))
    return root
