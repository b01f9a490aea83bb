"""A VM as the user names it on the command line: its id or its name.

Every ``ticrypt`` command that takes a VM resolves it with
:func:`resolve_vm` (one place, one rule):

1. the id of a VM rest shows the user (``GET /v1/vms``) is that VM;
2. else the name of exactly one of those VMs is that VM;
3. a name two or more of them share is refused, the candidates listed;
4. anything else is passed on as an id: rest (or the VM) decides, since a
   user may be authorized on a VM rest does not list for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from ticrypt.frontend.client import RestClient, RestError
from ticrypt.frontend.runner import CommandError


@attrs.frozen
class VmRef:
    """What the user typed (``given``) and the VM id it stands for."""

    given: str
    id: str
    name: str | None = None

    @property
    def label(self) -> str:
        """How to show the VM: its name if it has one, else its id."""
        return self.name or self.id


def pick_vm(vms: Sequence[dict[str, Any]], given: str) -> VmRef:
    """:func:`resolve_vm`'s rule over a list of VMs (``{"id", "name", ...}``);
    CommandError for an ambiguous name."""
    for vm in vms:
        if vm.get("id") == given:
            return VmRef(given, given, _name(vm))
    named = [vm for vm in vms if vm.get("name") == given]
    if len(named) == 1:
        return VmRef(given, str(named[0]["id"]), given)
    if named:
        ids = ", ".join(sorted(str(vm.get("id")) for vm in named))
        raise CommandError(f"VM name {given!r} is ambiguous",
                           f"{len(named)} of your VMs have that name ({ids}); give the id")
    return VmRef(given, given)


def _name(vm: dict[str, Any]) -> str | None:
    name = vm.get("name")
    return name if isinstance(name, str) and name else None


async def resolve_vm(client: RestClient, given: str) -> VmRef:
    """The VM ``given`` (an id or a name) stands for; CommandError for a
    name shared by several VMs or when rest cannot list the VMs."""
    try:
        vms = await client.list_vms()
    except RestError as e:
        raise CommandError(f"cannot look up VM {given!r}", str(e)) from None
    return pick_vm(vms, given)


__all__ = ["VmRef", "pick_vm", "resolve_vm"]
