"""ticrypt.frontend.leanimport: the CLI imports autobahn's websocket client
without WAMP and without parsing NVX's C declarations, and masks and
validates exactly as autobahn does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from ticrypt.frontend import leanimport

try:
    import _nvx_utf8validator  # noqa: F401
    import _nvx_xormasker  # noqa: F401
    HAS_NVX = True
except ImportError:
    HAS_NVX = False

_PROBE = """
import json, sys
import ticrypt.frontend.cli
from autobahn.websocket import protocol, xormasker, utf8validator
print(json.dumps({
    "pycparser": "pycparser" in sys.modules,
    "wamp_session": "autobahn.twisted.wamp" in sys.modules,
    "masker": xormasker.create_xor_masker.__module__,
    "validator": utf8validator.Utf8Validator.__module__,
    "lean": type(sys.modules["autobahn.twisted"]).__name__,
}))
"""


def _xor(mask: bytes, data: bytes, offset: int = 0) -> bytes:
    return bytes(b ^ mask[(i + offset) % 4] for i, b in enumerate(data))


class LeanImportTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not HAS_NVX:
            raise self.skipTest("autobahn's NVX extension modules are not built")

    def probe(self, **env: str) -> dict[str, object]:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, check=True,
                             env={**os.environ, "PYTHONPATH": root, **env}, timeout=60)
        result: dict[str, object] = json.loads(out.stdout)
        return result

    def test_cli_imports_no_wamp_session_nor_pycparser(self) -> None:
        """Importing the CLI registers the lean modules: autobahn's masker
        and validator are leanimport's, on the same compiled extensions."""
        r = self.probe()
        self.assertEqual((r["pycparser"], r["wamp_session"]), (False, False))
        self.assertEqual((r["masker"], r["validator"]),
                         ("ticrypt.frontend.leanimport", "ticrypt.frontend.leanimport"))

    def test_nvx_disabled_leaves_autobahn_alone(self) -> None:
        """AUTOBAHN_USE_NVX=0: autobahn's own (pure Python) modules load."""
        r = self.probe(AUTOBAHN_USE_NVX="0")
        self.assertEqual(r["masker"], "autobahn.websocket.xormasker")

    def test_install_is_a_no_op_once_autobahn_is_loaded(self) -> None:
        import autobahn.websocket  # noqa: F401
        self.assertFalse(leanimport.install())

    def test_masking_as_rfc6455(self) -> None:
        """Scalar (< 128 bytes) and SIMD maskers XOR with the 4-byte key,
        carrying the key's phase across calls."""
        mask = b"\x12\xa5\x00\xff"
        for n in (0, 1, 3, 4, 5, 127, 128, 129, 1000, 65536 + 3):
            data = os.urandom(n)
            m = leanimport.create_xor_masker(mask, n)
            self.assertEqual(m.process(data), _xor(mask, data), n)
        m = leanimport.create_xor_masker(mask, 1000)
        first, second = os.urandom(5), os.urandom(300)
        self.assertEqual(m.process(first) + m.process(second), _xor(mask, first + second))
        m.reset()
        self.assertEqual(m.process(second), _xor(mask, second))
        self.assertIsInstance(m.pointer(), int)

    def test_utf8_validation(self) -> None:
        v = leanimport.Utf8Validator()
        self.assertEqual(v.validate("héllo".encode()), (True, True, 6, 6))
        v.reset()
        self.assertEqual(v.validate(b"\xe2\x82")[:2], (True, False))  # incomplete
        self.assertEqual(v.validate(b"\xac")[:2], (True, True))  # completed: the euro sign
        v.reset()
        self.assertFalse(v.validate(b"a\xff")[0])
