"""Fairness: one user cannot hold all of a VM's sessions (vmc
``[exec] max_sessions_per_user``), with real proxy and vmc daemons and rest
in the test's process.
(rest's failed-login limits per address and per user from one address are
in test_rest.py and test_rest_core.py.)"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from test.test_revocation import wait_for
from test.vmcfixture import start_trio
from ticrypt import identity
from ticrypt.frontend.session import SessionError


class SessionsPerUserTests(TestCase):
    timeout = 120

    async def test_one_user_cannot_take_every_session(self) -> None:
        trio = await start_trio(self, exec_max_sessions="3", exec_max_sessions_per_user="1")
        owen = await trio.session("owen")
        with self.assertRaises(SessionError) as e:
            await trio.session("owen")
        self.assertEqual(e.exception.code, "over-limit")
        self.assertIn("too many sessions for this user", str(e.exception))
        # the VM still has room for someone else
        await owen.authorize(identity.public_bytes(trio.keys["bob"]), "bob")
        bob = await trio.session("bob")
        out = bytearray()
        self.assertEqual(await bob.exec(["echo", "bob"], on_stdout=out.extend).done, 0)
        self.assertEqual(bytes(out), b"bob\n")
        refused = [r for r in trio.vmc_audit_lines() if r["event"] == "session-refused"]
        self.assertEqual([(r["user"], r["reason"], r["limit"]) for r in refused],
                         [("owen", "over-limit", "max_sessions_per_user")])
        await bob.close()
        await owen.close()
        await wait_for(lambda: len([r for r in trio.vmc_audit_lines()
                                    if r["event"] == "session-closed"]) == 2,
                       "vmc saw both sessions close")
        # a closed session frees the user's place
        again = await trio.session("owen")
        await again.close()
