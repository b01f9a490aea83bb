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
        proc = subprocess.run([_tool("mypy"), "--no-incremental", "ticrypt", "twisted/plugins"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
