"""``ticrypt-lab``: every role on this machine, on 127.0.0.1, step by step.

It generates a private CA, keys and configs in a fresh folder, starts
ticrypt-proxy, ticrypt-rest and a ticrypt-vmc (the lab "VM") as real
``twistd -n`` processes, registers and enrolls the VM, signs the researcher
in with the ``ticrypt`` CLI and runs an encrypted ``exec`` and ``shell``
through the proxy, printing each command and what it answered.

``--keep`` leaves everything running and prints the commands to use it by
hand; Ctrl-C stops it.  Without ``--keep`` the daemons are stopped and the
folder removed (unless it was given with ``--dir``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import Any, TextIO

from twisted.internet import defer, task

from ticrypt import identity
from ticrypt.lab import daemons
from ticrypt.lab.deploy import Addresses, DeployError, Deployment, Run, free_port

PROG = "ticrypt-lab"
USER = "alice"
VM_NAME = "labvm"


class LabError(Exception):
    """A step failed; ``str()`` is the line to show."""


class Lab:
    """Runs the steps; owns the daemons it started."""

    def __init__(self, reactor: Any, workdir: str, out: TextIO = sys.stdout):
        self.reactor = reactor
        self.dir = workdir
        self.out = out
        self.procs: list[daemons.Daemon] = []
        self.logs: dict[str, TextIO] = {}
        self.env = daemons.daemon_env()
        self.deployment = Deployment(workdir, Addresses(
            rest_port=free_port(), proxy_port=free_port(), vm_host="127.0.0.1:2222"),
            comment=PROG)
        self.client_ini = self.deployment.client_ini(USER)
        self.env["TICRYPT_CLIENT_CONFIG"] = self.client_ini
        self.step_no = 0
        self.vm_id = ""

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def step(self, text: str) -> None:
        self.step_no += 1
        self.say(f"\n[{self.step_no}] {text}")

    async def run(self, args: list[str], *, stdin: bytes = b"", expect: int | None = 0,
                  show: bool = True) -> tuple[int, str, str]:
        """Run a CLI, print it and its output; LabError if its status is not ``expect``."""
        name = args[0]
        argv = [daemons.script_path(name), *args[1:]]
        shown = " ".join(shlex.quote(self._short(a)) for a in args)
        if stdin:
            escaped = stdin.decode().replace("\\", "\\\\").replace("\n", "\\n")
            shown = f"printf {shlex.quote(escaped)} | {shown}"
        self.say(f"    $ {shown}")
        code, out, err = await daemons.run_command(self.reactor, argv, env=self.env,
                                                   stdin=stdin, timeout=60, cwd=self.dir)
        if show:
            for line in _printable(out + err).rstrip("\n").splitlines():
                self.say(f"      {line}")
        if expect is not None and code != expect:
            rest = args[3:] if args[1:2] == ["--config"] else args[1:]
            what = next((a for a in rest if not a.startswith("-")), "")
            raise LabError(f"{name} {what} exited {code} "
                           f"(expected {expect}): {(err or out).strip().splitlines()[-1:]}")
        return code, out, err

    def _short(self, arg: str) -> str:
        """A path in the working folder as the folder's own name for it."""
        return os.path.relpath(arg, self.dir) if arg.startswith(self.dir + os.sep) else arg

    def runner(self, show: bool = True) -> Run:
        """:meth:`run` for :class:`Deployment`'s commands."""
        return lambda args: self.run(args, show=show)

    async def start(self, plugin: str, config: str) -> daemons.Daemon:
        log = open(os.path.join(self.dir, f"{plugin}.log"), "a", encoding="utf-8")  # noqa: SIM115
        self.logs[plugin] = log

        def echo(_name: str, line: str) -> None:
            log.write(line + "\n")
            log.flush()

        self.say(f"    $ twistd -n {plugin} --config {os.path.basename(config)}")
        proc = daemons.spawn(self.reactor, plugin, config, timeout=60, echo=echo,
                             cwd=self.dir)
        self.procs.append(proc)
        try:
            info = await proc.ready
        except RuntimeError as e:
            raise LabError(f"{plugin} did not start: {str(e).splitlines()[0]}; "
                           f"see {log.name}") from None
        where = ", ".join(f"{k} {v}" for k, v in info.get("listening", {}).items())
        self.say(f"      ready{': ' + where if where else ''} (log: {os.path.basename(log.name)})")
        return proc

    async def stop_all(self) -> None:
        for proc in reversed(self.procs):
            await proc.stop()
        for log in self.logs.values():
            log.close()

    async def main(self, keep: bool) -> None:
        d, dep = self.dir, self.deployment

        self.step(f"Working folder {d}: private CA and a TLS certificate for 127.0.0.1")
        dep.ca()
        dep.feed_secret()
        dep.rest_ini()
        dep.proxy_ini()
        self.say("    wrote tls/ca.pem, tls/server.pem, rest.ini, proxy.ini, client.ini, "
                 "feed.secret")

        self.step(f"The researcher {USER} creates an Ed25519 key pair")
        await self.run(["ticrypt", "--config", "client.ini", "keygen", "--no-passphrase"])

        self.step("The operator initializes the backend with a first superadmin")
        await dep.init(self.runner(), USER)

        self.step("Start ticrypt-proxy and ticrypt-rest")
        await dep.start_backend(self.start)

        self.step(f"Register the VM {VM_NAME!r} owned by {USER}; rest issues a single-use "
                  "enrollment token")
        self.vm_id, token = await dep.add_vm(self.runner(show=False), USER, VM_NAME)
        vmc_ini = dep.vmc_ini(token, backoff_max="5s")
        self.say(f"      vm_id {self.vm_id}, enrollment token written to vmc-enroll.token")

        self.step("Start the VM controller: it makes its VM key, enrolls, pins the owner key "
                  "and keeps websockets open to the proxy")
        vmc = await self.start("ticrypt-vmc", vmc_ini)
        if vmc.ready_info and vmc.ready_info.get("vm_public_key"):
            self.say(f"      VM key {vmc.ready_info['vm_public_key']}")

        self.step(f"{USER} signs in with her key (challenge, Ed25519 signature, session)")
        await self.run(["ticrypt", "login"])
        await self.run(["ticrypt", "vm", "list"])

        self.step("Encrypted exec through the proxy (the proxy relays ciphertext only)")
        await self.run(["ticrypt", "exec", self.vm_id, "--", "uname", "-sr"])
        await self.run(["ticrypt", "exec", self.vm_id, "--", "sh", "-c",
                        "echo out; echo err >&2; exit 3"], expect=3)
        self.say("      (exit status 3 came back from the VM)")

        self.step("Encrypted interactive shell on a PTY in the VM")
        await self.run(["ticrypt", "shell", self.vm_id],
                       stdin=b"echo hello from $(hostname) over the secure channel; exit\n")

        self.step("What the relay recorded (metadata only, never payload)")
        for line in _tail(os.path.join(d, "proxy-audit.log"), 3):
            self.say(f"      {line}")

        if keep:
            self.keep_instructions()
            await _until_signal(self.reactor)
            self.say(f"\n{PROG}: stopping")
        else:
            self.step("Stop the daemons")
        await self.stop_all()

    def keep_instructions(self) -> None:
        env = f"export TICRYPT_CLIENT_CONFIG={shlex.quote(self.client_ini)}"
        self.say(f"""
The lab is running (Ctrl-C stops it).  In another terminal:

    {env}
    ticrypt vm list
    ticrypt exec {self.vm_id} -- id
    ticrypt shell {self.vm_id}

Logs and audit logs are in {self.dir}.""")


_CSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")


def _printable(text: str) -> str:
    """Terminal output without escape sequences and carriage returns, for the log."""
    return _CSI.sub("", text).replace("\r", "")


def _tail(path: str, n: int) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def _until_signal(reactor: Any) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()

    def fire(*_: Any) -> None:
        if not d.called:
            reactor.callFromThread(d.callback, None)

    signal.signal(signal.SIGINT, fire)
    signal.signal(signal.SIGTERM, fire)
    return d


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="working folder (created; kept afterwards)")
    parser.add_argument("--keep", action="store_true",
                        help="leave everything running and print how to use it")
    args = parser.parse_args(argv)

    if args.dir:
        workdir = os.path.abspath(args.dir)
        if os.path.exists(workdir) and os.listdir(workdir):
            parser.exit(2, f"{PROG}: {workdir} is not empty; give a new or empty folder\n")
        os.makedirs(workdir, mode=0o700, exist_ok=True)
    else:
        workdir = tempfile.mkdtemp(prefix="ticrypt-lab-")
    os.chmod(workdir, 0o700)
    remove = not args.dir and not args.keep
    status = {"code": 0}

    async def go(reactor: Any) -> None:
        lab = Lab(reactor, workdir)
        try:
            await lab.main(args.keep)
            lab.say(f"\n{PROG}: all steps passed")
        except (LabError, DeployError, identity.KeyFileError, OSError) as e:
            lab.say(f"\n{PROG}: {e}")
            status["code"] = 1
            await lab.stop_all()

    _react(go)
    if remove and status["code"] == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    elif status["code"]:
        print(f"{PROG}: logs kept in {workdir}", file=sys.stderr)
    sys.exit(status["code"])


def _react(fn: Callable[[Any], Any]) -> None:
    try:
        task.react(lambda reactor: defer.ensureDeferred(fn(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
