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
        # The tunnel: one command printed a local port per VM port, curl got
        # the VM's web page and sftp put and got a file through it.
        self.assertRegex(out, r"127\.0\.0\.1:\d+ -> labvm:\d+\n")
        self.assertIn("Hello from the web server inside the lab VM", out)
        self.assertIn("(the file came back identical)", out)
        self.assertRegex(out, r"t[0-9a-f]{12} +labvm +up ")
        connect_audit = open(os.path.join(workdir, "connect-audit.log")).read()
        for event in ("cert-created", "tunnel-opened", "tunnel-up", "stream-closed"):
            self.assertIn(f'"event": "{event}"', connect_audit)
        self.assertNotIn("PRIVATE", connect_audit)
        # connect removed its API token when it stopped
        self.assertFalse(os.path.exists(os.path.join(workdir, "connect-state", "api.token")))
        # Daemons were stopped: their logs end with a clean shutdown.
        for name in ("ticrypt-rest.log", "ticrypt-proxy.log", "ticrypt-vmc.log",
                     "ticrypt-vmhost.log", "ticrypt-connect.log"):
            self.assertIn("Main loop terminated", open(os.path.join(workdir, name)).read())

    async def test_refuses_non_empty_dir(self) -> None:
        workdir = tempfile.mkdtemp()
        open(os.path.join(workdir, "x"), "w").close()
        code, out, err = await run_command([script_path("ticrypt-lab"), "--dir", workdir])
        self.assertEqual(code, 2)
        self.assertIn("is not empty", err)
