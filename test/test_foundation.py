"""Shared foundations: identities, signed tokens and tickets, audit log,
atomic writes, encodings, the test-summary line."""

from __future__ import annotations

import json
import os
import tempfile

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ticrypt import identity, signed
from ticrypt.audit import AuditLog
from ticrypt.encoding import b64, canonical, unb64
from ticrypt.fsutil import atomic_write
from ticrypt.testrun import summarize


def tmpdir() -> str:
    d = tempfile.mkdtemp()
    os.chmod(d, 0o700)
    return d


class EncodingTests(SynchronousTestCase):
    def test_b64_roundtrip_and_strictness(self) -> None:
        for data in (b"", b"\x00", b"\xff" * 31, os.urandom(64)):
            self.assertEqual(unb64(b64(data)), data)
        self.assertRaises(ValueError, unb64, "AA==")  # padding
        self.assertRaises(ValueError, unb64, "A+/B")  # not url-safe
        self.assertRaises(ValueError, unb64, "AB")  # non-canonical trailing bits
        self.assertRaises(ValueError, unb64, b64(b"x" * 31), 32)

    def test_canonical(self) -> None:
        self.assertEqual(canonical({"b": 1, "a": "é"}), b'{"a":"\\u00e9","b":1}')


class IdentityTests(SynchronousTestCase):
    def test_private_key_roundtrip_mode_and_no_overwrite(self) -> None:
        d = tmpdir()
        path = os.path.join(d, "k")
        key = identity.generate()
        identity.save_private(path, key)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(identity.public_bytes(identity.load_private(path)),
                         identity.public_bytes(key))
        self.assertRaises(identity.KeyFileError, identity.save_private, path, key)

    def test_passphrase(self) -> None:
        d = tmpdir()
        path = os.path.join(d, "k")
        identity.save_private(path, identity.generate(), b"pw")
        self.assertRaises(identity.KeyFileError, identity.load_private, path)
        self.assertRaises(identity.KeyFileError, identity.load_private, path, b"wrong")
        identity.load_private(path, b"pw")

    def test_refuses_readable_key(self) -> None:
        d = tmpdir()
        path = os.path.join(d, "k")
        identity.save_private(path, identity.generate())
        os.chmod(path, 0o640)
        err = self.assertRaises(identity.KeyFileError, identity.load_private, path)
        self.assertIn("chmod 600", str(err))

    def test_public_text_forms(self) -> None:
        key = identity.generate()
        raw = identity.public_bytes(key)
        text = identity.public_text(key)
        self.assertTrue(text.startswith("ed25519:"))
        self.assertEqual(identity.parse_public(text), raw)
        self.assertEqual(identity.parse_public(text + " alice@laptop"), raw)
        self.assertRaises(ValueError, identity.parse_public, "ed25519:AAAA")
        d = tmpdir()
        identity.save_public(os.path.join(d, "k.pub"), key, "alice")
        self.assertEqual(identity.load_public_file(os.path.join(d, "k.pub")), raw)
        self.assertTrue(identity.fingerprint(raw).startswith("SHA256:"))


class SignedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backend = Ed25519PrivateKey.generate()
        self.pub = identity.public_bytes(self.backend)
        self.user_key = identity.public_bytes(Ed25519PrivateKey.generate())

    def ticket(self, now: float = 1000.0, ttl: int = 60) -> str:
        return signed.make_ticket(self.backend, user="alice", user_key=self.user_key, vm="vm1",
                                  client="127.0.0.1", now=now, ttl=ttl, ticket_id="j1")

    def test_ticket_roundtrip(self) -> None:
        t = signed.verify_ticket(self.pub, self.ticket(), vm="vm1", client="127.0.0.1",
                                 now=1010)
        self.assertEqual((t.user, t.user_key, t.vm, t.expires), ("alice", self.user_key,
                                                                  "vm1", 1060))

    def assertCode(self, code: str, token: str, **kw: object) -> None:
        args = {"vm": "vm1", "client": "127.0.0.1", "now": 1010.0}
        args.update(kw)
        err = self.assertRaises(signed.TokenError, signed.verify_ticket, self.pub, token,
                                **args)
        self.assertEqual(err.code, code)

    def test_ticket_refusals(self) -> None:
        self.assertCode("expired", self.ticket(), now=1060)
        self.assertCode("wrong-vm", self.ticket(), vm="vm2")
        self.assertCode("wrong-client", self.ticket(), client="127.0.0.2")
        forged = signed.make_ticket(Ed25519PrivateKey.generate(), user="alice",
                                    user_key=self.user_key, vm="vm1", client="127.0.0.1",
                                    now=1000, ttl=60, ticket_id="j1")
        self.assertCode("bad-signature", forged)
        self.assertCode("bad-token", "garbage")
        self.assertCode("bad-token", "a.b.c")
        self.assertCode("bad-token", "x" * 5000)

    def test_tampered_payload(self) -> None:
        body, sig = self.ticket().split(".")
        payload = json.loads(unb64(body))
        payload["vm"] = "vm2"
        self.assertCode("bad-signature", b64(canonical(payload)) + "." + sig, vm="vm2")

    def test_purpose_separation(self) -> None:
        payload = {"vm": "vm1", "vm_key": b64(self.user_key), "iat": 1}
        token = signed.make_token(self.backend, signed.TICKET, payload)
        err = self.assertRaises(signed.TokenError, signed.verify_vm_credential, self.pub, token)
        self.assertEqual(err.code, "bad-signature")
        good = signed.make_vm_credential(self.backend, vm="vm1", vm_key=self.user_key, now=1)
        self.assertEqual(signed.verify_vm_credential(self.pub, good).vm_key, self.user_key)

    def test_non_canonical_payload_refused(self) -> None:
        # the signature is over the canonical form, which is not what the
        # token carries: refused before its payload is parsed
        body = b'{"vm": "vm1"}'
        sig = signed.sign(self.backend, signed.TICKET, {"vm": "vm1"})
        err = self.assertRaises(signed.TokenError, signed.open_token, self.pub, signed.TICKET,
                                b64(body) + "." + b64(sig))
        self.assertEqual(err.code, "bad-signature")


class AuditTests(SynchronousTestCase):
    def test_json_lines(self) -> None:
        d = tmpdir()
        path = os.path.join(d, "audit.log")
        clock = Clock()
        clock.advance(12.5)
        log = AuditLog(path, clock, role="rest")
        log.write("login", user="alice", address="127.0.0.1", result="ok")
        log.write("logout", user="alice")
        log.close()
        lines = [json.loads(x) for x in open(path).read().splitlines()]
        self.assertEqual(lines[0], {"ts": 12.5, "event": "login", "role": "rest",
                                    "user": "alice", "address": "127.0.0.1", "result": "ok"})
        self.assertEqual(len(lines), 2)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_refuses_secret_fields(self) -> None:
        log = AuditLog(None, Clock())
        self.assertRaises(ValueError, log.write, "login", token="abc")
        self.assertRaises(ValueError, log.write, "relay", payload=b"x")


class AtomicWriteTests(SynchronousTestCase):
    def test_replaces_and_keeps_old_on_failure(self) -> None:
        d = tmpdir()
        path = os.path.join(d, "f")
        atomic_write(path, b"old")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

        def fail_write(fd: int, data: object) -> int:
            raise OSError(28, "No space left on device")

        self.patch(os, "write", fail_write)
        self.assertRaises(OSError, atomic_write, path, b"new")
        self.assertEqual(open(path, "rb").read(), b"old")
        self.assertEqual(os.listdir(d), ["f"])


class SummaryTests(SynchronousTestCase):
    def test_summaries(self) -> None:
        self.assertEqual(summarize("x\nPASSED (successes=12)\n"), (12, 0, 0))
        self.assertEqual(summarize("FAILED (skips=2, failures=1, errors=3, successes=7)"),
                         (7, 4, 2))
        self.assertIsNone(summarize("PASSED\n"))
