"""The tunnel's pin set (ticrypt/vmc/pins.py) and the ``tunnel-accept``
command (ticrypt/vmc/commands.py), sans-IO."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from ticrypt import identity
from ticrypt.config import ConfigError, load_config
from ticrypt.vmc.commands import MAX_CERT_PEM, Dispatcher, Send
from ticrypt.vmc.config import VmcConfig
from ticrypt.vmc.pins import PinLimits, PinRefused, PinSet

ALICE = identity.public_bytes(identity.generate())
BOB = identity.public_bytes(identity.generate())


def fp(n: int) -> str:
    return "sha256:" + f"{n:064x}"


class Pins(SynchronousTestCase):
    def test_accept_and_check(self) -> None:
        pins = PinSet(PinLimits(pin_ttl=100))
        pin = pins.accept(fp(1), "alice", ALICE, now=1000)
        self.assertEqual((pin.user, pin.user_key), ("alice", ALICE))
        self.assertIs(pins.check(fp(1), 1050), pin)
        self.assertIsNone(pins.check(fp(2), 1050))

    def test_expires_when_unused(self) -> None:
        pins = PinSet(PinLimits(pin_ttl=100))
        pins.accept(fp(1), "alice", ALICE, now=1000)
        self.assertIsNotNone(pins.check(fp(1), 1099))  # a use renews it
        self.assertIsNotNone(pins.check(fp(1), 1198))
        self.assertIsNone(pins.check(fp(1), 1298))
        self.assertEqual(len(pins), 0)

    def test_touch_keeps_alive_and_expire_sweeps(self) -> None:
        pins = PinSet(PinLimits(pin_ttl=100))
        pins.accept(fp(1), "alice", ALICE, now=0)
        pins.accept(fp(2), "alice", ALICE, now=0)
        pins.touch(fp(1), 90)
        gone = pins.expire(100)
        self.assertEqual([p.fingerprint for p in gone], [fp(2)])
        self.assertEqual([p.fingerprint for p in pins.pins()], [fp(1)])

    def test_per_user_cap(self) -> None:
        pins = PinSet(PinLimits(max_pins_per_user=2, max_pins=10))
        pins.accept(fp(1), "alice", ALICE, 0)
        pins.accept(fp(2), "alice", ALICE, 0)
        with self.assertRaises(PinRefused) as e:
            pins.accept(fp(3), "alice", ALICE, 0)
        self.assertEqual(e.exception.code, "too-many-pins")
        pins.accept(fp(4), "bob", BOB, 0)  # another user is not affected
        pins.accept(fp(1), "alice", ALICE, 5)  # re-pinning is a refresh

    def test_total_cap(self) -> None:
        pins = PinSet(PinLimits(max_pins_per_user=5, max_pins=2))
        pins.accept(fp(1), "alice", ALICE, 0)
        pins.accept(fp(2), "bob", BOB, 0)
        with self.assertRaises(PinRefused) as e:
            pins.accept(fp(3), "carol", identity.public_bytes(identity.generate()), 0)
        self.assertEqual(e.exception.code, "too-many-pins")

    def test_expired_pins_free_the_caps(self) -> None:
        pins = PinSet(PinLimits(pin_ttl=10, max_pins_per_user=1))
        pins.accept(fp(1), "alice", ALICE, 0)
        pins.accept(fp(2), "alice", ALICE, 10)
        self.assertIsNone(pins.check(fp(1), 10))

    def test_never_rebound_to_another_user(self) -> None:
        pins = PinSet()
        pins.accept(fp(1), "alice", ALICE, 0)
        with self.assertRaises(PinRefused) as e:
            pins.accept(fp(1), "bob", BOB, 0)
        self.assertEqual(e.exception.code, "bad-certificate")
        self.assertEqual(pins.check(fp(1), 1).user_key, ALICE)  # type: ignore[union-attr]

    def test_remove_user(self) -> None:
        pins = PinSet()
        pins.accept(fp(1), "alice", ALICE, 0)
        pins.accept(fp(2), "bob", BOB, 0)
        self.assertEqual([p.fingerprint for p in pins.remove_user(ALICE)], [fp(1)])
        self.assertIsNone(pins.check(fp(1), 1))

    def test_bad_fingerprint(self) -> None:
        self.assertRaises(ValueError, PinSet().accept, "sha256:XYZ", "a", ALICE, 0)

    def test_round_trip(self) -> None:
        limits = PinLimits(pin_ttl=100)
        pins = PinSet(limits)
        pins.accept(fp(1), "alice", ALICE, 1000)
        pins.accept(fp(2), "bob", BOB, 950)
        text = json.dumps(pins.to_json())
        self.assertNotIn("BEGIN", text)
        back = PinSet.from_json(json.loads(text), limits, now=1060)
        self.assertEqual([p.fingerprint for p in back.pins()], [fp(1)])  # bob's expired
        self.assertEqual(back.check(fp(1), 1060).user, "alice")  # type: ignore[union-attr]

    def test_restore_respects_lowered_caps(self) -> None:
        pins = PinSet(PinLimits(max_pins_per_user=3))
        for n, when in ((1, 10), (2, 30), (3, 20)):
            pins.accept(fp(n), "alice", ALICE, when)
        back = PinSet.from_json(pins.to_json(), PinLimits(max_pins_per_user=2), now=40)
        self.assertEqual(sorted(p.fingerprint for p in back.pins()), [fp(2), fp(3)])

    def test_restore_refuses_garbage(self) -> None:
        bad: Any
        for bad in (None, [], {"pins": 3}, {"pins": [1]}, {"pins": [{"fingerprint": fp(1)}]},
                    {"pins": [{"fingerprint": fp(1), "user": "a", "user_key": "x",
                               "last_used": 1}]},
                    {"pins": [{"fingerprint": fp(1), "user": "a",
                               "user_key": identity.public_text(ALICE), "last_used": "1"}]}):
            self.assertRaises(ValueError, PinSet.from_json, bad, PinLimits(), 0)


def pem_cert() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "c")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return (cert.public_bytes(serialization.Encoding.PEM).decode() + "\n" + key_pem,
            "sha256:" + hashlib.sha256(der).hexdigest())


class Gate:
    def __init__(self, refuse: PinRefused | None = None):
        self.calls: list[tuple[str, str, bytes]] = []
        self.refuse = refuse

    def accept(self, fingerprint: str, user: str, user_key: bytes) -> dict[str, Any]:
        self.calls.append((fingerprint, user, user_key))
        if self.refuse:
            raise self.refuse
        return {"ports": [2022], "tls_fingerprint": "sha256:" + "a" * 64, "pin_expires": 3600}

    def revoked(self, user_key: bytes) -> None:
        pass


class Store:
    owner_key: bytes | None = ALICE

    def is_owner(self, key: bytes) -> bool:
        return key == ALICE

    def users(self) -> list[Any]:
        return []

    def authorize(self, key: bytes, name: str, by: bytes) -> bool:
        return True

    def revoke(self, who: str | bytes, by: bytes) -> Any:
        return None


class TunnelAccept(SynchronousTestCase):
    def ask(self, gate: Gate | None, **fields: Any) -> dict[str, Any]:
        d = Dispatcher(Store(), BOB, {}, tunnel=gate, user="bob")
        actions = d.handle({"t": "req", "id": 7, "op": "tunnel-accept", **fields}, b"")
        self.assertEqual(len(actions), 1)
        assert isinstance(actions[0], Send)
        return actions[0].header

    def test_ok(self) -> None:
        both, fingerprint = pem_cert()
        cert = both.split("\n-----BEGIN PRIVATE")[0]
        gate = Gate()
        answer = self.ask(gate, cert=cert)
        self.assertEqual(answer, {"t": "ok", "id": 7, "ports": [2022],
                                  "tls_fingerprint": "sha256:" + "a" * 64,
                                  "pin_expires": 3600})
        # bound to the channel's authenticated user (any user, not only the owner)
        self.assertEqual(gate.calls, [(fingerprint, "bob", BOB)])

    def test_disabled(self) -> None:
        answer = self.ask(None, cert="x")
        self.assertEqual((answer["t"], answer["code"]), ("error", "tunnel-disabled"))

    def test_bad_certificates(self) -> None:
        both, _ = pem_cert()
        cert = both.split("\n-----BEGIN PRIVATE")[0]
        body = "".join(cert.strip().splitlines()[1:-1])
        for bad in (None, 3, "", "x" * (MAX_CERT_PEM + 1), "not a cert", both, cert + cert,
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                    "-----BEGIN CERTIFICATE-----\n" + body[:-8] + "\n-----END CERTIFICATE-----\n",
                    cert.replace("A", "\u00e9", 1)):
            gate = Gate()
            answer = self.ask(gate, **({} if bad is None else {"cert": bad}))
            self.assertEqual((answer["t"], answer["code"]), ("error", "bad-certificate"),
                             repr(bad)[:80])
            self.assertNotIn("BEGIN", answer["message"])
            self.assertEqual(gate.calls, [])

    def test_refused_by_the_pins(self) -> None:
        both, _ = pem_cert()
        cert = both.split("\n-----BEGIN PRIVATE")[0]
        answer = self.ask(Gate(PinRefused("too-many-pins", "at most 8")), cert=cert)
        self.assertEqual((answer["code"], answer["message"]), ("too-many-pins", "at most 8"))
        self.assertEqual(answer["id"], 7)


class TunnelConfig(SynchronousTestCase):
    """[tunnel] and [sftp] in vmc.ini."""

    def load(self, extra: str) -> Any:
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        open(os.path.join(d, "ca.pem"), "w").close()
        os.makedirs(os.path.join(d, "share"), 0o700)
        path = os.path.join(d, "vmc.ini")
        with open(path, "w") as f:
            f.write("[vmc]\nrest_url = https://127.0.0.1:1\nca_file = ca.pem\n"
                    "state_dir = st\naudit_log = a.log\n" + extra)
        return load_config(path, VmcConfig)

    def test_defaults_off(self) -> None:
        cfg = self.load("")
        self.assertFalse(cfg.tunnel.enabled)
        self.assertFalse(cfg.sftp.enabled)
        self.assertEqual((cfg.tunnel.listen, cfg.tunnel.ports, cfg.tunnel.pins.pin_ttl),
                         ("tcp:22", (2022,), 3600.0))

    def test_values(self) -> None:
        cfg = self.load("[tunnel]\nenabled = yes\nlisten = tcp:0:interface=127.0.0.1\n"
                        "ports = 2022, 8080, 2022\npin_ttl = 5m\nmax_pins_per_user = 2\n"
                        "[sftp]\nenabled = yes\nport = 2222\nroot = share\n")
        self.assertEqual(cfg.tunnel.ports, (2022, 8080))
        self.assertEqual((cfg.tunnel.pins.pin_ttl, cfg.tunnel.pins.max_pins_per_user), (300.0, 2))
        self.assertTrue(cfg.sftp.root.endswith("/share"))

    def test_refused(self) -> None:
        for extra, key in (("[tunnel]\nenabled = yes\nlisten = unix:tunnel.sock\n",
                            "[tunnel] listen: expected a tcp: or tcp6: endpoint"),
                           ("[tunnel]\nports = 0\n", "[tunnel] ports"),
                           ("[tunnel]\nports = 80, x\n", "[tunnel] ports"),
                           ("[sftp]\nenabled = yes\n", "[sftp] root"),
                           ("[sftp]\nroot = missing\n", "[sftp] root")):
            with self.assertRaises(ConfigError, msg=extra) as e:
                self.load(extra)
            self.assertIn(key, str(e.exception))
