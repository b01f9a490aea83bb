"""vmc's SFTP-only server (twisted.conch) on 127.0.0.1, reached through the tunnel.

* **SFTP only.**  A session channel accepts one request, the ``sftp``
  subsystem; shell, exec, pty, env, agent and X11 requests are refused,
  and so are every other channel type (``direct-tcpip``) and global request
  (``tcpip-forward``): no shell, no commands, no port forwarding.
* **Rooted.**  Users see ``[sftp] root`` as ``/``.  A path is normalised
  inside that root (``..`` stops at ``/``, absolute paths are inside it);
  symbolic links are resolved and refused when they lead outside; files are
  opened with ``O_NOFOLLOW`` on the resolved path; creating links is refused.
  (A concurrent local process that swaps a directory for a symlink between
  the check and the use is not guarded against: such a process already has
  the access SFTP would give.)
* **Bound to the tunnel's user.**  A connection is accepted only if it comes
  through a tunnel stream (:class:`ticrypt.vmc.tunnel.Origins` names the
  pin, hence the user, of each stream's local connection) and authenticates
  with that user's Ed25519 key, the key they sign in to ticrypt with, as an
  ``ssh-ed25519`` key.  Any SSH user name is accepted; public keys only.
  Local connections that are not a tunnel stream are refused.
* **Bounded.**  Requests are processed while the client reads the answers
  (the channel's window): input held is at most :data:`MAX_PENDING` bytes (the
  connection stops being read beyond it), a request is at most
  :data:`MAX_PACKET`, a read answers at most :data:`MAX_READ` bytes.

File operations run as vmc's own user.  The host key is an Ed25519 key in
``state_dir/sftp-host.key`` (made at first start); ``tunnel-accept`` answers
its public half (``sftp_host_key``) so a client can pin it.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import struct
from collections.abc import Callable, Iterator
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from twisted.conch import avatar
from twisted.conch.error import ValidPublicKey
from twisted.conch.interfaces import IConchUser, ISFTPFile, ISFTPServer
from twisted.conch.ls import lsLine
from twisted.conch.ssh import common, connection, factory, keys, userauth
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.filetransfer import (
    FX_FAILURE,
    FX_FILE_ALREADY_EXISTS,
    FX_NO_SUCH_FILE,
    FX_OP_UNSUPPORTED,
    FX_PERMISSION_DENIED,
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FileTransferServer,
    SFTPError,
)
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from zope.interface import implementer

from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.fsutil import atomic_write

HOST_KEY = "sftp-host.key"
#: Largest SFTP request accepted (OpenSSH's sftp-server limit).
MAX_PACKET = 256 * 1024
#: Input held while the client does not read the answers.
MAX_PENDING = 1024 * 1024
#: Largest answer to one read request.
MAX_READ = 64 * 1024
#: Session channels open at once on one connection.
MAX_CHANNELS = 4

#: ``origin(peer)``: the Ed25519 key (raw) and name of the tunnel user whose
#: stream ``peer`` is, or None (not a tunnel stream).
OriginLookup = Callable[[IAddress], "tuple[bytes, str] | None"]


def ssh_public(raw: bytes) -> str:
    """The ``ssh-ed25519 AAAA...`` line of a raw Ed25519 public key."""
    key = Ed25519PublicKey.from_public_bytes(raw)
    return key.public_bytes(serialization.Encoding.OpenSSH,
                            serialization.PublicFormat.OpenSSH).decode()


def openssh_private(key: Ed25519PrivateKey) -> bytes:
    """``key`` in OpenSSH's private key format (what ``ssh -i``/``sftp -i``
    read; OpenSSH does not read PKCS#8 Ed25519 keys)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def load_host_key(state_dir: str) -> keys.Key:
    """The SFTP host key in ``state_dir`` (made 0600 if missing)."""
    path = os.path.join(state_dir, HOST_KEY)
    if not os.path.exists(path):
        atomic_write(path, openssh_private(Ed25519PrivateKey.generate()), 0o600)
    return keys.Key.fromFile(path)


# -- the rooted file system ----------------------------------------------------


def _error(e: OSError) -> SFTPError:
    code = {errno.ENOENT: FX_NO_SUCH_FILE, errno.EACCES: FX_PERMISSION_DENIED,
            errno.EPERM: FX_PERMISSION_DENIED, errno.ELOOP: FX_PERMISSION_DENIED,
            errno.EEXIST: FX_FILE_ALREADY_EXISTS}.get(e.errno or 0, FX_FAILURE)
    return SFTPError(code, e.strerror or "failed")


def _attrs(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "uid": st.st_uid, "gid": st.st_gid,
            "permissions": st.st_mode, "atime": int(st.st_atime), "mtime": int(st.st_mtime)}


def _refused() -> SFTPError:
    return SFTPError(FX_PERMISSION_DENIED, "outside the shared folder")


@implementer(ISFTPFile)
class _File:
    def __init__(self, fd: int):
        self.fd = fd

    def readChunk(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, min(length, MAX_READ), offset)
        except OSError as e:
            raise _error(e) from None
        if not data:
            raise EOFError("end of file")
        return data

    def writeChunk(self, offset: int, data: bytes) -> None:
        try:
            while data:
                n = os.pwrite(self.fd, data, offset)
                data, offset = data[n:], offset + n
        except OSError as e:
            raise _error(e) from None

    def getAttrs(self) -> dict[str, int]:
        try:
            return _attrs(os.fstat(self.fd))
        except OSError as e:
            raise _error(e) from None

    def setAttrs(self, attrs: dict[str, Any]) -> None:
        try:
            _set_attrs(self.fd, attrs)
        except OSError as e:
            raise _error(e) from None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _set_attrs(target: int | str, attrs: dict[str, Any]) -> None:
    """Size, permissions and times; owner changes are ignored."""
    if "size" in attrs:
        os.truncate(target, attrs["size"])
    if "permissions" in attrs:
        os.chmod(target, attrs["permissions"] & 0o7777)
    if "atime" in attrs and "mtime" in attrs:
        os.utime(target, (attrs["atime"], attrs["mtime"]))


class _Dir:
    def __init__(self, path: str, names: list[str]):
        self.path = path
        self.names = iter(names)

    def __iter__(self) -> Iterator[tuple[bytes, bytes, dict[str, int]]]:
        return self

    def __next__(self) -> tuple[bytes, bytes, dict[str, int]]:
        for name in self.names:
            try:
                st = os.lstat(os.path.join(self.path, name))
            except OSError:
                continue  # gone since the listing
            raw = os.fsencode(name)
            return raw, lsLine(name, st).encode("utf-8", "surrogateescape"), _attrs(st)
        raise StopIteration

    def close(self) -> None:
        self.names = iter(())


@implementer(ISFTPServer)
class RootedSFTP:
    """The SFTP operations, confined to ``root``."""

    def __init__(self, root: str, avatar: Any = None):
        self.root = os.path.realpath(root)
        self.avatar = avatar

    # -- paths ---------------------------------------------------------------

    def virtual(self, path: bytes) -> str:
        """``path`` as the user sees it: absolute, normalised, inside /."""
        text = os.fsdecode(path)
        if "\x00" in text:
            raise SFTPError(FX_NO_SUCH_FILE, "bad path")
        return posixpath.normpath("/" + text.lstrip("/"))

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root.rstrip("/") + "/")

    def resolve(self, path: bytes) -> str:
        """The real path of ``path``, symlinks followed; refused outside root."""
        real = os.path.realpath(self.root + self.virtual(path))
        if not self._inside(real):
            raise _refused()
        return real

    def resolve_entry(self, path: bytes) -> str:
        """The real path of the entry ``path`` names (a final symlink itself,
        not followed); its folder must be inside root, and it is not root."""
        v = self.virtual(path)
        if v == "/":
            raise SFTPError(FX_PERMISSION_DENIED, "not on the shared folder itself")
        parent = os.path.realpath(self.root + posixpath.dirname(v))
        if not self._inside(parent):
            raise _refused()
        return os.path.join(parent, posixpath.basename(v))

    # -- ISFTPServer ---------------------------------------------------------

    def gotVersion(self, otherVersion: int, extData: dict[bytes, bytes]) -> dict[bytes, bytes]:
        return {}

    def openFile(self, filename: bytes, flags: int, attrs: dict[str, Any]) -> _File:
        real = self.resolve(filename)
        mode = 0
        if flags & FXF_READ and flags & FXF_WRITE:
            mode = os.O_RDWR
        elif flags & FXF_WRITE:
            mode = os.O_WRONLY
        if flags & FXF_APPEND:
            mode |= os.O_APPEND
        if flags & FXF_CREAT:
            mode |= os.O_CREAT
        if flags & FXF_TRUNC:
            mode |= os.O_TRUNC
        if flags & FXF_EXCL:
            mode |= os.O_EXCL
        perms = attrs.get("permissions", 0o644) & 0o777
        try:
            fd = os.open(real, mode | os.O_NOFOLLOW | os.O_CLOEXEC, perms)
        except OSError as e:
            raise _error(e) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SFTPError(FX_FAILURE, "not a regular file")
        return _File(fd)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as e:
            raise _error(e) from None

    def removeFile(self, filename: bytes) -> None:
        self._call(os.unlink, self.resolve_entry(filename))

    def renameFile(self, oldpath: bytes, newpath: bytes) -> None:
        self._call(os.rename, self.resolve_entry(oldpath), self.resolve_entry(newpath))

    def makeDirectory(self, path: bytes, attrs: dict[str, Any]) -> None:
        self._call(os.mkdir, self.resolve_entry(path), attrs.get("permissions", 0o755) & 0o777)

    def removeDirectory(self, path: bytes) -> None:
        self._call(os.rmdir, self.resolve_entry(path))

    def openDirectory(self, path: bytes) -> _Dir:
        real = self.resolve(path)
        return _Dir(real, self._call(os.listdir, real))

    def getAttrs(self, path: bytes, followLinks: bool) -> dict[str, int]:
        if followLinks or self.virtual(path) == "/":
            return _attrs(self._call(os.stat, self.resolve(path)))
        return _attrs(self._call(os.lstat, self.resolve_entry(path)))

    def setAttrs(self, path: bytes, attrs: dict[str, Any]) -> None:
        self._call(_set_attrs, self.resolve(path), attrs)

    def readLink(self, path: bytes) -> bytes:
        target = self._call(os.readlink, self.resolve_entry(path))
        return os.fsencode(target)

    def makeLink(self, linkPath: bytes, targetPath: bytes) -> None:
        raise SFTPError(FX_OP_UNSUPPORTED, "links cannot be made")

    def realPath(self, path: bytes) -> bytes:
        return os.fsencode(self.virtual(path))

    def extendedRequest(self, extendedName: bytes, extendedData: bytes) -> bytes:
        raise NotImplementedError("no extensions")


# -- SSH: one session channel, the sftp subsystem only ------------------------------


class SftpChannel(SSHChannel):
    """A session channel that runs the ``sftp`` subsystem and nothing else.

    SFTP requests are handed to the server one at a time, and only while the
    client's window takes the answers (conch's own channel would buffer both
    ways without bound)."""

    name = b"session"
    log = Logger()

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.sftp: FileTransferServer | None = None
        self._pending = b""
        self._reading_paused = False

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        if requestType == b"subsystem" and self.sftp is None:
            name, _ = common.getNS(data)
            if name == b"sftp":
                user: SftpUser = self.avatar  # type: ignore[assignment]
                self.sftp = FileTransferServer(avatar=user.files)
                self.sftp.makeConnection(self)
                return 1
        self.log.info("sftp: refused channel request {kind}",
                      kind=requestType.decode("ascii", "replace")[:40])
        return 0

    def dataReceived(self, data: bytes) -> None:
        if self.sftp is None:
            self.loseConnection()
            return
        self._pending += data
        if len(self._pending) > MAX_PENDING:
            self._pause_reading()
        self._pump()

    def _pump(self) -> None:
        sftp = self.sftp
        while sftp is not None and self.areWriting and len(self._pending) >= 4:
            (length,) = struct.unpack("!L", self._pending[:4])
            if length > MAX_PACKET:
                self.log.info("sftp: request of {n} bytes refused; closing", n=length)
                self.loseConnection()
                return
            if len(self._pending) < 4 + length:
                break
            packet, self._pending = self._pending[:4 + length], self._pending[4 + length:]
            sftp.dataReceived(packet)
        if len(self._pending) <= MAX_PENDING // 2:
            self._resume_reading()

    def _tcp(self) -> Any:
        return self.conn.transport.transport  # type: ignore[union-attr]

    def _pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._tcp().pauseProducing()

    def _resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._tcp().resumeProducing()

    def startWriting(self) -> None:
        self._pump()  # the client read answers: take the next requests

    def eofReceived(self) -> None:
        self.loseConnection()

    def closed(self) -> None:
        self._resume_reading()
        if self.sftp is not None:
            sftp, self.sftp = self.sftp, None
            sftp.connectionLost(None)


class SftpUser(avatar.ConchUser):
    """An authenticated SFTP user: session channels only."""

    def __init__(self, name: str, files: RootedSFTP):
        super().__init__()
        self.name = name
        self.files = files
        self.channelLookup = {b"session": SftpChannel}

    def logout(self) -> None:
        pass


@implementer(IRealm)
class _Realm:
    def __init__(self, root: str):
        self.root = root

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if IConchUser not in interfaces:
            raise NotImplementedError("SSH only")
        name = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) \
            else str(avatarId)
        user = SftpUser(name, RootedSFTP(self.root))
        return IConchUser, user, user.logout


@implementer(ICredentialsChecker)
class _BoundKey:
    """Accepts one Ed25519 key (the tunnel user's), or none at all."""

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, allowed: bytes | None, on_result: Callable[[bool, str], None]):
        self.blob = keys.Key(Ed25519PublicKey.from_public_bytes(allowed)).blob() \
            if allowed is not None else None
        self.on_result = on_result

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        if self.blob is None or credentials.blob != self.blob:
            self.on_result(False, "key-not-bound" if self.blob else "not-from-tunnel")
            return defer.fail(UnauthorizedLogin("key not accepted"))
        if credentials.signature is None:
            return defer.fail(ValidPublicKey())  # the client may sign with it
        key = keys.Key.fromString(credentials.blob)
        if not key.verify(credentials.signature, credentials.sigData):
            self.on_result(False, "bad-signature")
            return defer.fail(UnauthorizedLogin("bad signature"))
        self.on_result(True, "")
        return defer.succeed(credentials.username)


class _UserAuth(userauth.SSHUserAuthServer):
    """Public keys only, checked against the key bound to this connection's
    tunnel (looked up now: the stream's bytes already flowed, so vmc's
    connection for it is recorded)."""

    def serviceStarted(self) -> None:
        super().serviceStarted()
        server: SftpFactory = self.transport.factory  # type: ignore[union-attr]
        peer = self.transport.transport.getPeer()  # type: ignore[union-attr]
        origin = server.origin(peer)
        key, user = origin if origin is not None else (None, "")
        peer_text = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.supportedAuthentications = [b"publickey"]

        def audit(ok: bool, why: str) -> None:
            fields: dict[str, Any] = {"peer": peer_text, "user": user,
                                      "result": "ok" if ok else "refused"}
            if key is not None:
                fields["user_key"] = identity.fingerprint(key)
            if why:
                fields["reason"] = why
            server.audit.write("sftp-login", **fields)

        self.portal = Portal(_Realm(server.root), [_BoundKey(key, audit)])


class _Connection(connection.SSHConnection):
    """Session channels only, at most :data:`MAX_CHANNELS` at once; any other
    channel (``direct-tcpip``...) is refused without conch's traceback."""

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        kind, rest = common.getNS(packet)
        if kind != b"session" or len(self.channels) >= MAX_CHANNELS:
            (sender,) = struct.unpack(">L", rest[:4])
            self.transport.sendPacket(  # type: ignore[union-attr]
                connection.MSG_CHANNEL_OPEN_FAILURE,
                struct.pack(">2L", sender, connection.OPEN_ADMINISTRATIVELY_PROHIBITED)
                + common.NS(b"only sftp sessions") + common.NS(b""))
            return
        super().ssh_CHANNEL_OPEN(packet)


class SftpFactory(factory.SSHFactory):
    """The SSH server factory: host key, public-key auth bound to the tunnel
    user (``origin``), SFTP rooted at ``root``."""

    def __init__(self, root: str, host_key: keys.Key, origin: OriginLookup, audit: AuditLog):
        self.root = root
        self.origin = origin
        self.audit = audit
        self.publicKeys = {host_key.sshType(): host_key.public()}
        self.privateKeys = {host_key.sshType(): host_key}
        self.services = {b"ssh-userauth": _UserAuth, b"ssh-connection": _Connection}
        self.portal = Portal(_Realm(root), [])  # replaced per connection by _UserAuth
        self.noisy = False

    def getPrimes(self) -> None:
        return None  # the fixed groups and curves only
