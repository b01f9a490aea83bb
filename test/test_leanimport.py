"""ticrypt.leanimport: the CLI and the daemons that use autobahn (vmc, proxy,
connect) import its websocket code without autobahn.twisted's WAMP
re-exports and without parsing NVX's C declarations, and mask and validate
exactly as RFC 6455 says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from ticrypt import leanimport

try:
    import _nvx_utf8validator  # noqa: F401
    import _nvx_xormasker  # noqa: F401
    HAS_NVX = True
except ImportError:
    HAS_NVX = False

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
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

    def probe(self, module: str, **env: str) -> dict[str, object]:
        """What a fresh process has loaded after importing ``module`` alone."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run([sys.executable, "-c", _PROBE, module], capture_output=True,
                             check=True, env={**os.environ, "PYTHONPATH": root, **env},
                             timeout=60)
        result: dict[str, object] = json.loads(out.stdout)
        return result

    def assert_lean(self, module: str) -> None:
        r = self.probe(module)
        self.assertEqual((r["pycparser"], r["wamp_session"]), (False, False), module)
        self.assertEqual((r["masker"], r["validator"]),
                         ("ticrypt.leanimport", "ticrypt.leanimport"), module)

    def test_cli_imports_no_wamp_session_nor_pycparser(self) -> None:
        """Importing the CLI registers the lean modules: autobahn's masker
        and validator are leanimport's, on the same compiled extensions."""
        self.assert_lean("ticrypt.frontend.cli")

    def test_vmc_daemon_imports_no_wamp_session_nor_pycparser(self) -> None:
        """twistd's entry point of each daemon that uses autobahn (what
        ``twistd ticrypt-ROLE`` imports) loads the lean modules too."""
        self.assert_lean("ticrypt.vmc.tap")

    def test_proxy_daemon_imports_no_wamp_session_nor_pycparser(self) -> None:
        self.assert_lean("ticrypt.proxy.tap")

    def test_connect_daemon_imports_no_wamp_session_nor_pycparser(self) -> None:
        self.assert_lean("ticrypt.connect.tap")

    def test_nvx_disabled_leaves_autobahn_alone(self) -> None:
        """AUTOBAHN_USE_NVX=0: autobahn's own (pure Python) modules load."""
        r = self.probe("ticrypt.vmc.tap", AUTOBAHN_USE_NVX="0")
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
