"""vmc's SFTP-only server (ticrypt/vmc/sftp.py) against real OpenSSH clients
on 127.0.0.1: put and get with matching checksums, escape attempts refused,
no shell, no exec, no forwarding, only the tunnel user's key.

The server's ``origin`` (which tunnel user a connection comes from) is a
stub here; test_vmc_tunnel checks that the tunnel's Origins name the user of
each stream's local connection."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from ticrypt import identity
from ticrypt.audit import AuditLog
from ticrypt.vmc.sftp import (
    RootedSFTP,
    SftpFactory,
    load_host_key,
    openssh_private,
)

SFTP, SSH = shutil.which("sftp"), shutil.which("ssh")


class Server:
    def __init__(self, case: TestCase):
        if not (SFTP and SSH):
            raise SkipTest("OpenSSH's sftp and ssh are not installed")
        self.dir = tempfile.mkdtemp()
        case.addCleanup(shutil.rmtree, self.dir, True)
        self.root = os.path.join(self.dir, "root")
        self.outside = os.path.join(self.dir, "outside")
        os.makedirs(os.path.join(self.root, "sub"))
        os.makedirs(self.outside)
        with open(os.path.join(self.outside, "secret"), "w") as f:
            f.write("secret\n")
        os.symlink(self.outside, os.path.join(self.root, "out-link"))
        os.symlink("/etc/passwd", os.path.join(self.root, "passwd-link"))
        os.symlink("sub", os.path.join(self.root, "in-link"))
        self.audit = AuditLog(os.path.join(self.dir, "audit.log"), reactor)
        case.addCleanup(self.audit.close)
        self.user_key = identity.generate()
        self.bound: tuple[bytes, str] | None = (identity.public_bytes(self.user_key), "alice")
        factory = SftpFactory(self.root, load_host_key(self.dir), lambda peer: self.bound,
                              self.audit)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
        case.addCleanup(self.port.stopListening)
        self.key_file = self.write_key("alice", self.user_key)

    def write_key(self, name: str, key: Any) -> str:
        path = os.path.join(self.dir, name + ".ssh")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(openssh_private(key))
        return path

    def options(self, key_file: str | None = None) -> list[str]:
        return ["-F", "/dev/null", "-i", key_file or self.key_file,
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR"]

    def sftp(self, *commands: str, key_file: str | None = None
             ) -> defer.Deferred[tuple[bytes, bytes, int]]:
        batch = os.path.join(self.dir, "batch")
        with open(batch, "w") as f:
            f.write("\n".join(commands) + "\n")
        port = str(self.port.getHost().port)  # type: ignore[attr-defined]
        assert SFTP is not None
        return getProcessOutputAndValue(
            SFTP, [*self.options(key_file), "-P", port, "-b", batch, "alice@127.0.0.1"],
            path=self.dir, env={"PATH": os.environ.get("PATH", "")})

    def ssh(self, *args: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
        port = str(self.port.getHost().port)  # type: ignore[attr-defined]
        assert SSH is not None
        return getProcessOutputAndValue(
            SSH, [*self.options(), "-p", port, *args],
            path=self.dir, env={"PATH": os.environ.get("PATH", "")})


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class OpenSSH(TestCase):
    @defer.inlineCallbacks
    def test_put_get_checksums_match(self) -> Any:
        s = Server(self)
        local = os.path.join(s.dir, "data.bin")
        with open(local, "wb") as f:
            f.write(os.urandom(3 * 1024 * 1024 + 17))
        out, err, code = yield s.sftp("put data.bin sub/up.bin", "get sub/up.bin back.bin",
                                      "ls -l /sub", "cd in-link", "get up.bin via-link.bin",
                                      "rename /sub/up.bin /sub/moved.bin", "mkdir /newdir",
                                      "rmdir /newdir")
        self.assertEqual(code, 0, err)
        self.assertEqual(digest(os.path.join(s.root, "sub", "moved.bin")), digest(local))
        self.assertEqual(digest(os.path.join(s.dir, "back.bin")), digest(local))
        self.assertEqual(digest(os.path.join(s.dir, "via-link.bin")), digest(local))
        self.assertIn(b"up.bin", out)

    @defer.inlineCallbacks
    def test_escapes_refused(self) -> Any:
        s = Server(self)
        attempts = ["get ../outside/secret got", "get /../../outside/secret got",
                    "get out-link/secret got", "get passwd-link got",
                    f"get {s.outside}/secret got", "get /etc/passwd got",
                    "put /etc/hostname out-link/planted", "cd ..\nget outside/secret got",
                    "symlink /etc/passwd mylink"]
        for attempt in attempts:
            out, err, code = yield s.sftp(attempt)
            self.assertNotEqual(code, 0, attempt)
            self.assertFalse(os.path.exists(os.path.join(s.dir, "got")), attempt)
        self.assertFalse(os.path.exists(os.path.join(s.outside, "planted")))
        self.assertFalse(os.path.lexists(os.path.join(s.root, "mylink")))
        # and the root's parent is the root
        out, err, code = yield s.sftp("rename sub ../moved", "cd /..", "pwd", "ls")
        self.assertEqual(code, 0, err)
        self.assertIn(b"Remote working directory: /\n", out)
        self.assertIn(b"moved", out)
        self.assertNotIn(b"outside", out)
        self.assertTrue(os.path.isdir(os.path.join(s.root, "moved")))
        self.assertFalse(os.path.exists(os.path.join(s.dir, "moved")))

    @defer.inlineCallbacks
    def test_no_shell_exec_or_forwarding(self) -> Any:
        s = Server(self)
        out, err, code = yield s.ssh("alice@127.0.0.1", "id")
        self.assertNotEqual(code, 0)
        self.assertNotIn(b"uid=", out)
        out, err, code = yield s.ssh("-tt", "alice@127.0.0.1")
        self.assertNotEqual(code, 0)
        port = s.port.getHost().port  # type: ignore[attr-defined]
        out, err, code = yield s.ssh("-W", f"127.0.0.1:{port}", "alice@127.0.0.1")
        self.assertNotEqual(code, 0)
        self.assertNotIn(b"SSH-2.0", out)
        # refused after a successful login each time, not for the key
        with open(s.audit.path or "") as f:
            self.assertEqual(f.read().count('"result": "ok"'), 3)

    @defer.inlineCallbacks
    def test_only_the_tunnel_users_key(self) -> Any:
        s = Server(self)
        other = s.write_key("mallory", identity.generate())
        out, err, code = yield s.sftp("ls", key_file=other)
        self.assertNotEqual(code, 0)
        s.bound = None  # not a tunnel stream: even alice's key is refused
        out, err, code = yield s.sftp("ls")
        self.assertNotEqual(code, 0)
        with open(s.audit.path or "") as f:
            text = f.read()
        self.assertIn('"reason": "key-not-bound"', text)
        self.assertIn('"reason": "not-from-tunnel"', text)


class Rooted(TestCase):
    """The path rules without a client."""

    def test_virtual_paths(self) -> None:
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        fs = RootedSFTP(root)
        for raw, want in ((b"", "/"), (b".", "/"), (b"..", "/"), (b"/../a/../../b", "/b"),
                          (b"//etc/passwd", "/etc/passwd"), (b"a/./b/", "/a/b")):
            self.assertEqual(fs.virtual(raw), want, raw)
            self.assertTrue(fs.resolve(raw).startswith(os.path.realpath(root)))


class ThroughTheTunnel(TestCase):
    """The whole path with real daemons: ``tunnel-accept`` over the secure
    channel, the pinned TLS tunnel to vmc, a mux stream to the SFTP port, and
    OpenSSH's sftp with the tunnel user's key (a local listener of this test
    stands in for ticrypt-connect)."""

    timeout = 120

    async def _through(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from twisted.internet import endpoints, protocol
        from twisted.internet import ssl as tssl

        from test.test_vmc_tunnel import fingerprint, make_cert
        from test.vmcfixture import VMC_TEST_SETTINGS, start_trio
        from ticrypt.forward import Pipe, splice
        from ticrypt.mux import MuxProtocol, StreamEndpoint, StreamRefused

        if not SFTP:
            raise SkipTest("OpenSSH's sftp is not installed")
        trio = await start_trio(self, enroll=False)
        dep = trio.deployment
        tunnel, sftp = dep.vm_tunnel("vmc", ports=(1,))
        config = dep.vmc_ini(trio.token, "vmc", {"shell": "/bin/sh"}, tunnel, sftp,
                             **VMC_TEST_SETTINGS)
        vmc = await trio.start_vmc(self, config)
        sftp_port = int(sftp["port"] or 0)
        session = await trio.session("owen")
        self.addCleanup(session.close)
        key, cert = make_cert("owen-laptop")
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        grant = await session.request("tunnel-accept", cert=pem)
        self.assertEqual(grant["ports"], [1, sftp_port])
        self.assertEqual(grant["tls_fingerprint"], vmc.ready_info["tls_fingerprint"])  # type: ignore[index]
        self.assertTrue(grant["sftp_host_key"].startswith("ssh-ed25519 "))

        options = tssl.PrivateCertificate.loadPEM(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode() + pem).options()
        options.verify = False
        mux = MuxProtocol(side="client", clock=reactor)
        host, port = vmc.address("tunnel")
        await endpoints.connectProtocol(endpoints.wrapClientTLS(
            options, endpoints.TCP4ClientEndpoint(reactor, host, port)), mux)
        self.addCleanup(lambda: mux.transport.abortConnection()  # type: ignore[attr-defined]
                        if mux.transport else None)
        # a port vmc does not list is refused, the tunnel stays up
        with self.assertRaises(StreamRefused):
            await StreamEndpoint(mux, 22).connect(protocol.Factory.forProtocol(Pipe))

        class Local(protocol.Factory):
            def buildProtocol(self, addr: Any) -> Pipe:
                local = Pipe()
                d = StreamEndpoint(mux, sftp_port).connect(protocol.Factory.forProtocol(Pipe))
                d.addCallbacks(lambda remote: splice(local, remote),
                               lambda f: local.transport.abortConnection())  # type: ignore[union-attr]
                return local

        listener = reactor.listenTCP(0, Local(), interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(listener.stopListening)
        work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, work, True)
        key_file = os.path.join(work, "owen.ssh")
        with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(openssh_private(trio.keys["owen"]))
        with open(os.path.join(work, "data.bin"), "wb") as f:
            f.write(os.urandom(2 * 1024 * 1024 + 5))
        with open(os.path.join(work, "batch"), "w") as batch:
            batch.write("put data.bin up.bin\nget up.bin back.bin\n")
        assert SFTP is not None
        out, err, code = await getProcessOutputAndValue(SFTP, [
            "-F", "/dev/null", "-i", key_file, "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-P", str(listener.getHost().port), "-b", "batch",  # type: ignore[attr-defined]
            "anyone@127.0.0.1"], path=work, env={"PATH": os.environ.get("PATH", "")})
        self.assertEqual(code, 0, err + vmc.text()[-6000:].encode())
        want = digest(os.path.join(work, "data.bin"))
        self.assertEqual(digest(dep.path("vmc-sftp/up.bin")), want)
        self.assertEqual(digest(os.path.join(work, "back.bin")), want)
        events = [(a["event"], a.get("user"), a.get("result")) for a in trio.vmc_audit_lines()
                  if a["event"].startswith(("tunnel", "sftp"))]
        self.assertIn(("tunnel-accept", "owen", "ok"), events)
        self.assertIn(("tunnel-open", "owen", "ok"), events)
        self.assertIn(("sftp-login", "owen", "ok"), events)
        self.assertIn(("tunnel-stream-refused", "owen", "refused"), events)
        self.assertEqual(fingerprint(cert), [a for a in trio.vmc_audit_lines()
                                             if a["event"] == "tunnel-open"][0]["cert"])

    def test_sftp_through_the_tunnel(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._through())
