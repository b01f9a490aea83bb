"""The code base stays ruff- and mypy-clean (CONVENTIONS.md, Style)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ticrypt.lab.daemons import ROOT


def _tool(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if not found:
        raise SkipTest(f"{name} is not installed (pip install -e '.[dev]')")
    return found


class StaticChecks(SynchronousTestCase):
    def test_ruff(self) -> None:
        proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)

    def test_mypy(self) -> None:
        # Incremental, with a cache of this check's own in the checkout
        # (.mypy_cache/ is ignored by git): a fresh clone pays the full run
        # once, later runs only re-check what changed.  Its own directory, so
        # runs of mypy on a few files never feed it.  A failure is confirmed
        # by a run without the cache, so a stale cache cannot fail the test.
        cache = os.path.join(ROOT, ".mypy_cache", "test_static")
        argv = [_tool("mypy"), "ticrypt", "twisted/plugins"]
        proc = subprocess.run([*argv, "--cache-dir", cache], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            proc = subprocess.run([*argv, "--no-incremental"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=600)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
