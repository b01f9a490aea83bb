"""ticrypt-lab, the README's main job, runs every step end to end."""

from __future__ import annotations

import os
import tempfile

from twisted.trial.unittest import TestCase

from test.daemon import run_command, script_path


class LabTests(TestCase):
    timeout = 240

    async def test_lab_runs_every_step(self) -> None:
        workdir = os.path.join(tempfile.mkdtemp(), "lab")
        code, out, err = await run_command([script_path("ticrypt-lab"), "--dir", workdir],
                                           timeout=200)
        self.assertEqual(code, 0, out + err)
        self.assertIn("ticrypt-lab: all steps passed", out)
        # The remote exit status and the shell output made it back.
        self.assertIn("(exit status 3 came back from the VM)", out)
        self.assertIn("hello from", out)
        self.assertIn("over the secure channel", out.split("[9]")[1])
        # The relay's audit has a completed pairing with byte counts, and no
        # payload: the shell's marker text never appears in any relay log.
        audit = open(os.path.join(workdir, "proxy-audit.log")).read()
        self.assertIn('"event": "pair-end"', audit)
        for name in ("proxy-audit.log", "ticrypt-proxy.log"):
            self.assertNotIn("secure channel", open(os.path.join(workdir, name)).read())
        # Daemons were stopped: their logs end with a clean shutdown.
        for name in ("ticrypt-rest.log", "ticrypt-proxy.log", "ticrypt-vmc.log"):
            self.assertIn("Main loop terminated", open(os.path.join(workdir, name)).read())

    async def test_refuses_non_empty_dir(self) -> None:
        workdir = tempfile.mkdtemp()
        open(os.path.join(workdir, "x"), "w").close()
        code, out, err = await run_command([script_path("ticrypt-lab"), "--dir", workdir])
        self.assertEqual(code, 2)
        self.assertIn("is not empty", err)
