"""The one table of close codes (ticrypt.closecodes) and PROTOCOL.md §1.2."""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from ticrypt import closecodes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def section_1_2() -> str:
    with open(os.path.join(ROOT, "PROTOCOL.md"), encoding="utf-8") as f:
        text = f.read()
    return text.split("### 1.2", 1)[1].split("\n## 2.", 1)[0]


class CloseCodeTableTests(SynchronousTestCase):
    def test_codes_and_names_are_unique(self) -> None:
        self.assertEqual(len({c.code for c in closecodes.ALL}), len(closecodes.ALL))
        self.assertEqual(len({c.name for c in closecodes.ALL}), len(closecodes.ALL))
        for c in closecodes.ALL:
            self.assertRegex(c.name, r"^[a-z0-9]+(-[a-z0-9]+)*$")
            self.assertTrue(c.human)

    def test_every_4xxx_code_of_the_protocol_is_in_the_table(self) -> None:
        # a close code is written before its backticked name, or alone in a table cell
        text = section_1_2()
        documented = {int(n) for n in re.findall(r"\b(4\d{3}) `", text)}
        documented |= {int(n) for n in re.findall(r"^\| (4\d{3}) \|", text, re.M)}
        self.assertEqual(documented - set(closecodes.BY_CODE), set())
        ours = {c.code for c in closecodes.ALL if c.code >= 4000}
        self.assertEqual(ours - documented, set())

    def test_reason_round_trip_and_bound(self) -> None:
        r = closecodes.reason("over-limit", "too many sessions on this VM")
        self.assertEqual(closecodes.split_reason(r), ("over-limit", "too many sessions on this VM"))
        self.assertEqual(closecodes.split_reason("bad-signature"), ("bad-signature", ""))
        self.assertEqual(closecodes.split_reason("old form text"), ("old", "form text"))
        self.assertEqual(closecodes.split_reason(None), ("", ""))
        long = closecodes.reason("timeout", "é" * 200)
        self.assertLessEqual(len(long.encode("utf-8")), closecodes.MAX_REASON)
        long.encode("utf-8").decode("utf-8")  # no split character

    def test_human(self) -> None:
        self.assertIn("authorize", closecodes.human("not-authorized") or "")
        self.assertIsNotNone(closecodes.human("vm-key-mismatch"))
        self.assertIsNone(closecodes.human("no-such-name"))
