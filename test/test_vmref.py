"""A VM named by its id or its name (ticrypt.frontend.vmref): the rule in
memory, and the CLI's commands using it against a real rest (both in this
process: test/restfixture.py)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from test.restfixture import start_rest
from test.test_frontend_cli import ticrypt_here, write_client_config
from ticrypt.frontend.client import RestError
from ticrypt.frontend.runner import CommandError
from ticrypt.frontend.vmref import VmRef, pick_vm, resolve_vm

VMS = [
    {"id": "vm-00000000000000a1", "name": "alpha", "owner": "bob", "state": "enrolled"},
    {"id": "vm-00000000000000b1", "name": "twin", "owner": "bob", "state": "enrolled"},
    {"id": "vm-00000000000000b2", "name": "twin", "owner": "bob", "state": "created"},
    # a name that is another VM's id: the id wins
    {"id": "vm-00000000000000c1", "name": "vm-00000000000000a1", "owner": "bob",
     "state": "created"},
]


class PickTests(SynchronousTestCase):
    def test_id(self) -> None:
        self.assertEqual(pick_vm(VMS, "vm-00000000000000b2"),
                         VmRef("vm-00000000000000b2", "vm-00000000000000b2", "twin"))

    def test_unique_name(self) -> None:
        ref = pick_vm(VMS, "alpha")
        self.assertEqual((ref.id, ref.label), ("vm-00000000000000a1", "alpha"))

    def test_id_before_name(self) -> None:
        self.assertEqual(pick_vm(VMS, "vm-00000000000000a1").id, "vm-00000000000000a1")

    def test_shared_name_refused_with_candidates(self) -> None:
        e = self.assertRaises(CommandError, pick_vm, VMS, "twin")
        self.assertEqual(str(e), "VM name 'twin' is ambiguous: 2 of your VMs have that name "
                         "(vm-00000000000000b1, vm-00000000000000b2); give the id")
        self.assertNotIn("\n", str(e))

    def test_unknown_passed_on_as_an_id(self) -> None:
        # a VM the user is authorized on but rest does not list for them
        self.assertEqual(pick_vm(VMS, "vm-0000000000000999").id, "vm-0000000000000999")
        self.assertEqual(pick_vm([], "beta"), VmRef("beta", "beta"))


class _Rest:
    def __init__(self, vms: Any = None, error: RestError | None = None):
        self.vms = vms
        self.error = error
        self.calls = 0

    async def list_vms(self) -> Any:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.vms


class ResolveTests(SynchronousTestCase):
    def test_lists_once(self) -> None:
        rest = _Rest(VMS)
        ref = self.successResultOf(defer.ensureDeferred(resolve_vm(rest, "alpha")))  # type: ignore[arg-type]
        self.assertEqual((ref.id, rest.calls), ("vm-00000000000000a1", 1))

    def test_rest_failure_is_one_line(self) -> None:
        rest = _Rest(error=RestError(401, "unauthorized", "session expired"))
        f = self.failureResultOf(defer.ensureDeferred(resolve_vm(rest, "alpha")),  # type: ignore[arg-type]
                                 CommandError)
        self.assertEqual(str(f.value), "cannot look up VM 'alpha': session expired "
                         "(HTTP 401 unauthorized)")


class CliNameTests(TestCase):
    """``ticrypt vm show`` and a channel command take a name.  (rest keeps
    VM names unique today, so a shared name is tested in memory above.)"""

    timeout = 120

    async def test_names_on_the_command_line(self) -> None:
        env = await start_rest(self, in_process=True)
        config = write_client_config(env, "bob")
        key = env.deployment.path("bob.key")
        env.deployment.user_key("bob")
        code, _, err = env.admin_here("user", "add", "bob", "--public-key", key + ".pub")
        self.assertEqual(code, 0, err)
        code, out, err = env.admin_here("--json", "vm", "add", "solo", "--owner", "bob",
                                        "--host", "127.0.0.1:2201")
        self.assertEqual(code, 0, err)
        vm_id = json.loads(out)["vm"]["id"]
        code, _, err = await ticrypt_here(config, "login")
        self.assertEqual(code, 0, err)

        code, out, err = await ticrypt_here(config, "vm", "show", "solo")
        self.assertEqual(code, 0, err)
        self.assertIn(f"id:              {vm_id}", out)
        code, out, err = await ticrypt_here(config, "vm", "show", "nope")
        self.assertEqual(code, 1)
        self.assertEqual(err.strip(), "ticrypt: vm show nope failed: no such VM "
                         "(HTTP 404 no-such-vm)")

        # a channel command resolves the name before asking rest for a
        # ticket (the VM never enrolled: rest's refusal for that id)
        code, out, err = await ticrypt_here(config, "info", "solo")
        self.assertEqual(code, 1)
        self.assertEqual(err.strip(), "ticrypt: cannot connect to VM solo: the VM has not "
                         "enrolled yet (HTTP 409 vm-not-enrolled)")
