"""What vmc keeps in ``state_dir``: its keys, its enrollment, the pinned owner
key and the users the owner authorized.

Files (all written with :func:`ticrypt.fsutil.atomic_write`, so a kill or a
full disk during a write leaves the old or the new file, never a torn one)::

    vm.key           Ed25519 VM key, PKCS#8 PEM, 0600
    tls.pem          TLS key + self-signed certificate (tunnel server), 0600
    enrollment.json  result of POST /v1/enroll, 0600 (holds the VM credential)
    owner.pub        the pinned owner key ``ed25519:..``; written once, never changed
    users.json       users the owner authorized, 0600

The owner key is pinned the first time vmc learns it.  Any later report of a
different owner key (a re-enrollment, a refresh, a tampered
``enrollment.json``) is refused with an ``owner-key-change-refused`` audit
line; the pin never changes.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.fsutil import atomic_write

VM_KEY = "vm.key"
TLS_PEM = "tls.pem"
ENROLLMENT = "enrollment.json"
OWNER_PIN = "owner.pub"
USERS = "users.json"

#: Most users an owner may authorize on one VM (keeps users.json bounded).
MAX_USERS = 1000
MAX_NAME = 128


class StateError(Exception):
    """A state file is unusable; ``str()`` names the file and what to do."""


class OwnerKeyChanged(Exception):
    """Something reported an owner key other than the pinned one; refused."""


@attrs.frozen
class Enrollment:
    """The enrollment result, as stored in ``enrollment.json``."""

    vm_id: str
    owner: str
    owner_public_key: bytes
    proxy_url: str
    backend_public_key: bytes
    vm_credential: str = attrs.field(repr=False)

    @classmethod
    def from_json(cls, obj: Any) -> Enrollment:
        """Parse the rest answer (or the stored file); ValueError if malformed."""
        if not isinstance(obj, dict):
            raise ValueError("enrollment is not a JSON object")
        try:
            fields = {k: obj[k] for k in ("vm_id", "owner", "owner_public_key", "proxy_url",
                                          "backend_public_key", "vm_credential")}
        except KeyError as e:
            raise ValueError(f"enrollment lacks {e.args[0]!r}") from None
        for k, v in fields.items():
            if not isinstance(v, str) or not v or len(v) > 4096:
                raise ValueError(f"enrollment field {k!r} is not a non-empty string")
        if not fields["proxy_url"].startswith(("wss://", "ws://")):
            raise ValueError("enrollment proxy_url is not a websocket URL")
        return cls(
            vm_id=fields["vm_id"], owner=fields["owner"],
            owner_public_key=identity.parse_public(fields["owner_public_key"]),
            proxy_url=fields["proxy_url"].rstrip("/"),
            backend_public_key=identity.parse_public(fields["backend_public_key"]),
            vm_credential=fields["vm_credential"],
        )

    def to_json(self) -> dict[str, str]:
        return {
            "vm_id": self.vm_id, "owner": self.owner,
            "owner_public_key": identity.public_text(self.owner_public_key),
            "proxy_url": self.proxy_url,
            "backend_public_key": identity.public_text(self.backend_public_key),
            "vm_credential": self.vm_credential,
        }


@attrs.frozen
class AuthorizedUser:
    """A user the owner authorized: a display name and a raw Ed25519 key."""

    name: str
    key: bytes


def _make_tls(path: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ticrypt-vmc")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(path, pem + cert.public_bytes(serialization.Encoding.PEM), 0o600)


def tls_fingerprint(pem_path: str) -> str:
    """``sha256:<hex>`` of the DER certificate in ``pem_path``."""
    with open(pem_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class VmState:
    """The files in ``state_dir`` and the decisions that depend on them.

    ``audit`` receives the security events (owner pin refusals,
    authorizations, revocations).
    """

    def __init__(self, state_dir: str, audit: AuditLog):
        self.state_dir = state_dir
        self._audit = audit
        self.vm_key: Ed25519PrivateKey = self._load_or_create_key()
        self.tls_pem = self._path(TLS_PEM)
        if not os.path.exists(self.tls_pem):
            _make_tls(self.tls_pem)
        self.tls_fingerprint = tls_fingerprint(self.tls_pem)
        self.owner_key: bytes | None = self._load_pin()
        self.enrollment: Enrollment | None = self._load_enrollment()
        self._users: list[AuthorizedUser] = self._load_users()

    # -- files ---------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.state_dir, name)

    def _load_or_create_key(self) -> Ed25519PrivateKey:
        path = self._path(VM_KEY)
        if not os.path.exists(path):
            identity.save_private(path, identity.generate())
        try:
            return identity.load_private(path)
        except identity.KeyFileError as e:
            raise StateError(str(e)) from None

    def _read_json(self, name: str) -> Any:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                return json.loads(f.read(1 << 20))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StateError(f"{path}: unreadable ({e}); restore it or remove it") from None

    def _load_pin(self) -> bytes | None:
        path = self._path(OWNER_PIN)
        try:
            with open(path, encoding="ascii") as f:
                return identity.parse_public(f.read(200))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            raise StateError(f"{path}: not an owner key; restore it from a backup") from None

    def _load_enrollment(self) -> Enrollment | None:
        obj = self._read_json(ENROLLMENT)
        if obj is None:
            return None
        try:
            enrollment = Enrollment.from_json(obj)
        except ValueError as e:
            raise StateError(f"{self._path(ENROLLMENT)}: {e}") from None
        if self.owner_key is not None and enrollment.owner_public_key != self.owner_key:
            self._refuse_owner(enrollment.owner, enrollment.owner_public_key, "state-file")
            raise StateError(f"{self._path(ENROLLMENT)}: owner key differs from the pinned "
                             f"owner key; refusing to start")
        if self.owner_key is None:
            self._pin(enrollment.owner_public_key)
        return enrollment

    def _load_users(self) -> list[AuthorizedUser]:
        obj = self._read_json(USERS)
        if obj is None:
            return []
        try:
            return [AuthorizedUser(name=str(u["name"]), key=identity.parse_public(u["key"]))
                    for u in obj["users"]]
        except (KeyError, TypeError, ValueError):
            raise StateError(f"{self._path(USERS)}: malformed; restore it or remove it") from None

    def _pin(self, key: bytes) -> None:
        atomic_write(self._path(OWNER_PIN), (identity.public_text(key) + "\n").encode(), 0o600)
        self.owner_key = key

    def _refuse_owner(self, owner: str, key: bytes, source: str) -> None:
        assert self.owner_key is not None
        self._audit.write("owner-key-change-refused", owner=owner, source=source,
                          pinned=identity.fingerprint(self.owner_key),
                          offered=identity.fingerprint(key), result="refused")

    # -- enrollment ------------------------------------------------------

    def accept_enrollment(self, enrollment: Enrollment, source: str = "enroll") -> None:
        """Store an enrollment result; pin its owner key on first learning.

        Raises :class:`OwnerKeyChanged` (after an audit line) when the owner
        key differs from the pinned one; nothing is stored then.
        """
        if self.owner_key is not None and enrollment.owner_public_key != self.owner_key:
            self._refuse_owner(enrollment.owner, enrollment.owner_public_key, source)
            raise OwnerKeyChanged("the owner key reported for this VM differs from the "
                                  "pinned owner key; refused")
        if self.owner_key is None:
            self._pin(enrollment.owner_public_key)
        atomic_write(self._path(ENROLLMENT),
                     json.dumps(enrollment.to_json(), sort_keys=True).encode(), 0o600)
        self.enrollment = enrollment

    # -- users -----------------------------------------------------------

    def is_owner(self, key: bytes) -> bool:
        return self.owner_key is not None and key == self.owner_key

    def is_authorized(self, key: bytes) -> bool:
        """The owner, or a user the owner authorized."""
        return self.is_owner(key) or any(u.key == key for u in self._users)

    def users(self) -> list[AuthorizedUser]:
        return list(self._users)

    def _save_users(self, users: list[AuthorizedUser]) -> None:
        doc = {"users": [{"name": u.name, "key": identity.public_text(u.key)} for u in users]}
        atomic_write(self._path(USERS), json.dumps(doc, sort_keys=True).encode(), 0o600)
        self._users = users  # only after the file is safely replaced

    def authorize(self, key: bytes, name: str, by: bytes) -> bool:
        """Authorize ``key`` as ``name``; False if it already was (name updated)."""
        if self.is_owner(key):
            raise ValueError("the owner is always authorized")
        if not name or len(name) > MAX_NAME or not name.isprintable():
            raise ValueError("user name must be 1..128 printable characters")
        others = [u for u in self._users if u.key != key]
        if len(others) >= MAX_USERS:
            raise ValueError(f"at most {MAX_USERS} users may be authorized")
        new = len(others) == len(self._users)
        self._save_users([*others, AuthorizedUser(name=name, key=key)])
        self._audit.write("user-authorized", user=name, user_key=identity.fingerprint(key),
                          by=identity.fingerprint(by), result="ok")
        return new

    def revoke(self, who: str | bytes, by: bytes) -> AuthorizedUser | None:
        """Revoke a user by key or name; the revoked user, or None if unknown."""
        match = [u for u in self._users if (u.key == who if isinstance(who, bytes)
                                            else u.name == who)]
        if not match:
            return None
        gone = match[0]
        self._save_users([u for u in self._users if u is not gone])
        self._audit.write("user-revoked", user=gone.name, user_key=identity.fingerprint(gone.key),
                          by=identity.fingerprint(by), result="ok")
        return gone
