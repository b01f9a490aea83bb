"""Shared foundations: identities, signed tokens and tickets, audit log,
atomic writes, encodings, the test-summary line."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ticrypt import identity, signed
from ticrypt.audit import AuditLog
from ticrypt.encoding import b64, canonical, unb64
from ticrypt.fsutil import atomic_write
from ticrypt.testrun import jobs, summarize


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
                                  client="127.0.0.1", now=now, ttl=ttl, ticket_id="j1",
                                  session=b64(bytes(signed.SID_BYTES)))

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
                                    now=1000, ttl=60, ticket_id="j1",
                                    session=b64(bytes(signed.SID_BYTES)))
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

    def test_clock_is_required(self) -> None:
        # no silent wall clock: every caller says which clock stamps its lines
        self.assertRaises(TypeError, AuditLog, None)
        self.assertRaises(TypeError, AuditLog, None, role="rest")


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

    def test_jobs(self) -> None:
        self.assertEqual(jobs({"TICRYPT_TEST_JOBS": "1"}), 1)
        self.assertEqual(jobs({"TICRYPT_TEST_JOBS": " 4 "}), 4)
        self.assertIn(jobs({}), range(2, 7))
        with self.assertRaises(ValueError):
            jobs({"TICRYPT_TEST_JOBS": "0"})


#: DER of an unencrypted Ed25519 PKCS#8 key before its 32-byte seed
#: (PROTOCOL.md §2 "Key files").
PKCS8_ED25519_PREFIX = bytes.fromhex("302e020100300506032b657004220420")


def _der(data: bytes) -> tuple[int, bytes, bytes]:
    """``(tag, content, rest)`` of the first DER element of ``data``."""
    tag, n, i = data[0], data[1], 2
    if n & 0x80:
        size = n & 0x7F
        n, i = int.from_bytes(data[2:2 + size], "big"), 2 + size
    return tag, data[i:i + n], data[i + n:]


def _der_all(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while data:
        tag, content, data = _der(data)
        out.append((tag, content))
    return out


def _pem_body(text: str, label: str) -> bytes:
    lines = text.splitlines()
    assert lines[0] == f"-----BEGIN {label}-----" and lines[-1] == f"-----END {label}-----"
    assert text.endswith("\n")
    return base64.b64decode("".join(lines[1:-1]), validate=True)


class KeyFileFormatTests(SynchronousTestCase):
    """The key files are what PROTOCOL.md §2 "Key files" says, read back the
    way a stranger would, from the description (not through identity)."""

    SEED = bytes(range(32))

    def setUp(self) -> None:
        self.dir = tmpdir()
        self.key = Ed25519PrivateKey.from_private_bytes(self.SEED)
        self.raw = identity.public_bytes(self.key)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def test_private_key_without_passphrase(self) -> None:
        identity.save_private(self.path("k"), self.key)
        self.assertEqual(os.stat(self.path("k")).st_mode & 0o777, 0o600)
        with open(self.path("k")) as f:
            der = _pem_body(f.read(), "PRIVATE KEY")
        self.assertEqual(der, PKCS8_ED25519_PREFIX + self.SEED)

    def test_private_key_with_passphrase_by_the_recipe(self) -> None:
        """PBES2: PBKDF2-HMAC-SHA256 (16-byte salt, 2048 iterations) and
        AES-256-CBC (16-byte IV) over the DER above; the passphrase as UTF-8."""
        passphrase = "pässwörd ☃"
        identity.save_private(self.path("k"), self.key, passphrase.encode("utf-8"))
        with open(self.path("k")) as f:
            der = _pem_body(f.read(), "ENCRYPTED PRIVATE KEY")
        tag, info, rest = _der(der)
        self.assertEqual((tag, rest), (0x30, b""))
        [(_, algorithm), (octets, encrypted)] = _der_all(info)
        self.assertEqual(octets, 0x04)
        [(_, pbes2_oid), (_, pbes2_params)] = _der_all(algorithm)
        self.assertEqual(pbes2_oid, bytes.fromhex("2a864886f70d01050d"))  # 1.2.840.113549.1.5.13
        [(_, kdf), (_, cipher)] = _der_all(pbes2_params)
        [(_, kdf_oid), (_, kdf_params)] = _der_all(kdf)
        self.assertEqual(kdf_oid, bytes.fromhex("2a864886f70d01050c"))  # PBKDF2
        params = _der_all(kdf_params)
        salt, iterations = params[0][1], int.from_bytes(params[1][1], "big")
        [(_, prf_oid), _null] = _der_all(params[-1][1])
        self.assertEqual(prf_oid, bytes.fromhex("2a864886f70d0209"))  # hmacWithSHA256
        self.assertEqual((len(salt), iterations), (16, 2048))
        [(_, cipher_oid), (_, iv)] = _der_all(cipher)
        self.assertEqual(cipher_oid, bytes.fromhex("60864801650304012a"))  # aes256-CBC
        self.assertEqual(len(iv), 16)
        aes_key = hashlib.pbkdf2_hmac("sha256", passphrase.encode("utf-8"), salt, iterations, 32)
        decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
        padded = decryptor.update(encrypted) + decryptor.finalize()
        plain = padded[:-padded[-1]]
        self.assertEqual(padded[-padded[-1]:], bytes([padded[-1]]) * padded[-1])
        self.assertEqual(plain, PKCS8_ED25519_PREFIX + self.SEED)

    def test_openssl_reads_the_private_keys(self) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise SkipTest("no openssl binary")
        identity.save_private(self.path("plain"), self.key)
        identity.save_private(self.path("enc"), self.key, "pässwörd".encode())
        env = dict(os.environ, TICRYPT_PASSPHRASE="pässwörd")
        seed_hex = ":".join(f"{b:02x}" for b in self.SEED[:15])
        for name, extra in (("plain", []), ("enc", ["-passin", "env:TICRYPT_PASSPHRASE"])):
            out = subprocess.run([openssl, "pkey", "-in", self.path(name), "-noout", "-text",
                                  *extra], env=env, capture_output=True, text=True, check=True)
            self.assertIn("ED25519 Private-Key", out.stdout)
            self.assertIn(seed_hex, out.stdout)
        pub = subprocess.run([openssl, "pkey", "-in", self.path("plain"), "-pubout"],
                             capture_output=True, text=True, check=True).stdout
        with open(self.path("k.pem.pub"), "w") as f:
            f.write(pub)
        self.assertEqual(identity.load_public_file(self.path("k.pem.pub")), self.raw)

    def test_public_key_file_written(self) -> None:
        identity.save_public(self.path("backend.pub"), self.key, "ticrypt-backend")
        identity.save_public(self.path("k.pub"), self.key)
        self.assertEqual(os.stat(self.path("k.pub")).st_mode & 0o777, 0o644)
        with open(self.path("backend.pub"), "rb") as f:
            self.assertEqual(f.read(), f"ed25519:{b64(self.raw)} ticrypt-backend\n".encode())
        with open(self.path("k.pub"), "rb") as f:
            self.assertEqual(f.read(), f"ed25519:{b64(self.raw)}\n".encode())

    def test_public_key_file_read(self) -> None:
        """The first word is the key; the rest of the file is ignored; no
        comment lines; ASCII only."""
        key = b64(self.raw)
        accepted = [f"ed25519:{key}\n", f"ed25519:{key}", f"{key}\n",
                    f"ed25519:{key} ticrypt-backend\n", f"ed25519:{key}\tany comment here\r\n",
                    f"\n\n  ed25519:{key}\n", f"ed25519:{key}\nmore lines\nare ignored\n"]
        refused = ["", "\n", f"# the backend key\ned25519:{key}\n",
                   f"ed25519:{key} café\n", f"ed25519:{key}=\n",
                   f"ed25519:{b64(self.raw[:31])}\n", f"ED25519:{key}\n"]
        for i, text in enumerate(accepted + refused):
            path = self.path(f"p{i}.pub")
            with open(path, "wb") as f:
                f.write(text.encode("utf-8"))
            if i < len(accepted):
                self.assertEqual(identity.load_public_file(path), self.raw, text)
            else:
                self.assertRaises(identity.KeyFileError, identity.load_public_file, path)

    def test_admin_init_writes_backend_pub(self) -> None:
        """``ticrypt-admin init`` writes ``backend.pub`` beside the signing key."""
        from test.restfixture import make_rest_dir
        from ticrypt.admin.cli import main

        env = make_rest_dir(os.path.join(self.dir, "rest"), "alice", None)
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(["--config", env.config_path, "init", "--superadmin", "alice",
                         "--public-key", env.admin_pub_file])
        self.assertEqual(code, 0)
        signing = identity.public_bytes(identity.load_private(env.signing_key))
        path = os.path.join(os.path.dirname(env.signing_key), "backend.pub")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), f"ed25519:{b64(signing)} ticrypt-backend\n".encode())
