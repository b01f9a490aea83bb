"""``ticrypt-lab``: every role on this machine, on 127.0.0.1, step by step.

It generates a private CA, keys and configs in a fresh folder, starts
ticrypt-proxy, ticrypt-rest and a ticrypt-vmc (the lab "VM") as real
``twistd -n`` processes, registers and enrolls the VM, signs the researcher
in with the ``ticrypt`` CLI and runs an encrypted ``exec`` and ``shell``
through the proxy, printing each command and what it answered.  Then it
tunnels application ports: a small web server and vmc's SFTP server
"inside the VM", ticrypt-vmhost in front of the VM and the researcher's
ticrypt-connect; ``ticrypt tunnel open`` sets the tunnel up and curl and
OpenSSH's sftp use it.

``--keep`` leaves everything running and prints the commands to use it by
hand; Ctrl-C stops it.  Without ``--keep`` the daemons are stopped and the
folder removed (unless it was given with ``--dir``).

``--netns`` (root) builds the isolated deployment of the system test
instead (:mod:`ticrypt.lab.netns`: user, backend, VM host, two VMs, a
license server and an outside host, each in its own network namespace),
starts every role there, prints how to enter each namespace and waits;
Ctrl-C stops the daemons and removes the namespaces.
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
from ticrypt.lab import apps, daemons, netns
from ticrypt.lab.deploy import Addresses, DeployError, Deployment, Run, free_port

PROG = "ticrypt-lab"
USER = "alice"
VM_NAME = "labvm"


class LabError(Exception):
    """A step failed; ``str()`` is the line to show."""


class _Console:
    """What both labs share: the lines they print, one log file per daemon
    in the working folder, and waiting for a daemon's readiness line."""

    def __init__(self, reactor: Any, workdir: str, out: TextIO):
        self.reactor = reactor
        self.dir = workdir
        self.out = out
        self.procs: list[daemons.Daemon] = []
        self.logs: list[TextIO] = []

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _log(self, name: str) -> tuple[str, Callable[[str, str], None]]:
        """(the path of ``name``.log, an ``echo`` that appends a daemon's lines to it)."""
        log = open(os.path.join(self.dir, f"{name}.log"), "a", encoding="utf-8")  # noqa: SIM115
        self.logs.append(log)

        def echo(_name: str, line: str) -> None:
            log.write(line + "\n")
            log.flush()

        return log.name, echo

    async def _ready(self, proc: daemons.Daemon, what: str, see: str,
                     note: str = "") -> daemons.Daemon:
        """Wait for ``proc``'s readiness line and print where it listens;
        LabError naming ``what`` and where to ``see`` why it did not start."""
        self.procs.append(proc)
        try:
            info = await proc.ready
        except RuntimeError as e:
            raise LabError(f"{what} did not start: {str(e).splitlines()[0]}; "
                           f"see {see}") from None
        where = ", ".join(f"{k} {v}" for k, v in info.get("listening", {}).items())
        self.say(f"      ready{': ' + where if where else ''}{note}")
        return proc

    def _close_logs(self) -> None:
        for log in self.logs:
            log.close()
        self.logs.clear()


class Lab(_Console):
    """Runs the steps; owns the daemons it started."""

    def __init__(self, reactor: Any, workdir: str, out: TextIO = sys.stdout):
        super().__init__(reactor, workdir, out)
        self.env = daemons.daemon_env()
        # the VM's host endpoint: ticrypt-vmhost's port base+1 (VM number 1)
        self.vmhost_port = free_port()
        self.deployment = Deployment(workdir, Addresses(
            rest_port=free_port(), proxy_port=free_port(),
            vm_host=f"127.0.0.1:{self.vmhost_port}"), comment=PROG)
        self.client_ini = self.deployment.client_ini(USER)
        self.env["TICRYPT_CLIENT_CONFIG"] = self.client_ini
        self.step_no = 0
        self.vm_id = ""
        self.web: Any = None
        self.web_port = free_port()
        self.sftp_host_key = ""
        self.tunnel_id = ""
        self.local: dict[int, int] = {}
        self.sftp_port = 0
        self.sftp_args: list[str] = []
        self.vmc: daemons.Daemon | None = None

    def step(self, text: str) -> None:
        self.step_no += 1
        self.say(f"\n[{self.step_no}] {text}")

    async def run(self, args: list[str], *, stdin: bytes = b"", expect: int | None = 0,
                  show: bool = True, tool: bool = False) -> tuple[int, str, str]:
        """Run a CLI (one of ours, or a system ``tool`` such as curl), print
        it and its output; LabError if its status is not ``expect``."""
        name = args[0]
        found = shutil.which(name) if tool else daemons.script_path(name)
        if found is None:
            raise LabError(f"{name} is not installed; it is needed for this step")
        argv = [found, *args[1:]]
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
        log, echo = self._log(plugin)
        self.say(f"    $ twistd -n {plugin} --config {os.path.basename(config)}")
        proc = daemons.spawn(self.reactor, plugin, config, timeout=60, echo=echo,
                             cwd=self.dir)
        return await self._ready(proc, plugin, log, f" (log: {os.path.basename(log)})")

    async def stop_all(self) -> None:
        if self.web is not None:
            web, self.web = self.web, None
            await web.stopListening()
        for proc in reversed(self.procs):
            await proc.stop()
        self._close_logs()

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
        tunnel, sftp = dep.vm_tunnel(ports=(self.web_port,))
        self.sftp_port = int(str(sftp["port"]))
        vmc_ini = dep.vmc_ini(token, backoff_max="5s", tunnel_settings=tunnel,
                              sftp_settings=sftp)
        self.say(f"      vm_id {self.vm_id}, enrollment token written to vmc-enroll.token")

        self.step("Start the VM controller: it makes its VM key, enrolls, pins the owner key "
                  "and keeps websockets open to the proxy; it also runs the tunnel server "
                  "and an SFTP-only server on 127.0.0.1")
        vmc = await self.start("ticrypt-vmc", vmc_ini)
        info = vmc.ready_info or {}
        if info.get("vm_public_key"):
            self.say(f"      VM key {info['vm_public_key']}")
        self.sftp_host_key = str(info.get("sftp_host_key", ""))
        self.vmc = vmc

        self.step(f"{USER} signs in with her key (challenge, Ed25519 signature, session)")
        await self.run(["ticrypt", "login"])
        await self.run(["ticrypt", "vm", "list"])

        self.step("Encrypted exec through the proxy (the proxy relays ciphertext only); "
                  "a VM is named by its id or its name")
        await self.run(["ticrypt", "exec", VM_NAME, "--", "uname", "-sr"])
        await self.run(["ticrypt", "exec", self.vm_id, "--", "sh", "-c",
                        "echo out; echo err >&2; exit 3"], expect=3)
        self.say("      (exit status 3 came back from the VM)")

        self.step("Encrypted interactive shell on a PTY in the VM")
        await self.run(["ticrypt", "shell", self.vm_id],
                       stdin=b"echo hello from $(hostname) over the secure channel; exit\n")

        await self.tunnel_steps()

        self.step("What the relay recorded (metadata only, never payload)")
        for line in _tail(os.path.join(d, "proxy-audit.log"), 3):
            self.say(f"      {line}")

        if keep:
            self.step(f"The browser page of {USER}'s ticrypt-connect: a fresh one-time link")
            await self.run(["ticrypt", "open", "--print"])
            self.keep_instructions()
            await _until_signal(self.reactor)
            self.say(f"\n{PROG}: stopping")
        else:
            self.step("Stop the daemons")
        await self.stop_all()

    async def tunnel_steps(self) -> None:
        """Application ports of the VM on the researcher's machine."""
        d, dep = self.dir, self.deployment
        web = apps.web_folder(os.path.join(d, "www"))
        self.web = await apps.start_web(self.reactor, web, self.web_port)
        sftp_port = self.sftp_port
        assert self.vmc is not None
        tunnel_port = self.vmc.address("tunnel")[1]
        self.step(f"Inside the VM: a web server on 127.0.0.1:{self.web_port} (serving www/) "
                  f"and vmc's SFTP server on 127.0.0.1:{sftp_port}; vmc's tunnel server "
                  f"listens on 127.0.0.1:{tunnel_port} (port 22 of a real VM)")
        self.say(f"      vmc tunnels ports {self.web_port} and {sftp_port} only")

        self.step(f"Start ticrypt-vmhost: host port {self.vmhost_port} -> the VM's tunnel "
                  "endpoint (the address rest registered for the VM)")
        await self.start("ticrypt-vmhost", dep.vmhost_ini(
            {1: f"127.0.0.1:{tunnel_port}"}, base=str(self.vmhost_port - 1)))

        self.step(f"On {USER}'s machine: start ticrypt-connect, her local tunnel agent "
                  "and the browser page's server (API on 127.0.0.1, token in "
                  "connect-state/api.token)")
        connect = await dep.start_connect(self.start)
        dep.client_ini(USER)  # [connect] url: the port it got
        page_url = (connect.ready_info or {}).get("page_url")
        if page_url:
            self.say(f"      the page: {page_url}")
            self.say(f"      (a one-time link; in the page import the key file "
                     f"{dep.path(USER + '.key')} as user {USER}; "
                     "'ticrypt open' makes a new link)")

        self.step("Open a tunnel with one command: rest opens a pathway at the proxy "
                  "(only her address admitted), connect makes a client certificate, "
                  "the VM pins it over the encrypted channel, connect dials")
        _, out, _ = await self.run(["ticrypt", "tunnel", "open", VM_NAME])
        for line in out.splitlines():
            m = re.fullmatch(r"127\.0\.0\.1:(\d+) -> \S+:(\d+)", line.strip())
            if m:
                self.local[int(m.group(2))] = int(m.group(1))
            m = re.match(r"tunnel (\S+) to ", line.strip())
            if m:
                self.tunnel_id = m.group(1)
        if self.web_port not in self.local or sftp_port not in self.local:
            raise LabError(f"ticrypt tunnel open did not print both ports: {out.strip()!r}")

        web_local, sftp_local = self.local[self.web_port], self.local[sftp_port]
        self.step("curl through the tunnel (connect -> proxy -> vmhost -> vmc -> web server)")
        await self.run(["curl", "-sS", "--max-time", "30", f"http://127.0.0.1:{web_local}/"],
                       tool=True)

        self.step("OpenSSH sftp through the tunnel (her ticrypt key, vmc's SFTP host key "
                  "pinned)")
        key, known = apps.openssh_files(d, dep.path(f"{USER}.key"), self.sftp_host_key,
                                        sftp_local)
        self.sftp_args = apps.sftp_argv(key, known, sftp_local, USER)
        batch = dep.write("sftp-batch", "put www/hello.txt hello.txt\nls -l\n"
                          "get hello.txt hello-back.txt\n")
        await self.run(apps.sftp_argv(key, known, sftp_local, USER, batch), tool=True)
        with open(os.path.join(d, "hello-back.txt"), "rb") as f, \
                open(os.path.join(web, "hello.txt"), "rb") as g:
            if f.read() != g.read():
                raise LabError("the file fetched back by sftp differs from the one put")
        self.say("      (the file came back identical)")

        self.step("The tunnel, as connect sees it")
        await self.run(["ticrypt", "tunnel", "list"])

    def keep_instructions(self) -> None:
        env = f"export TICRYPT_CLIENT_CONFIG={shlex.quote(self.client_ini)}"
        self.say(f"""
The lab is running (Ctrl-C stops it).  In another terminal:

    {env}
    ticrypt vm list
    ticrypt exec {VM_NAME} -- id
    ticrypt shell {VM_NAME}
    ticrypt tunnel list
    curl http://127.0.0.1:{self.local.get(self.web_port, 0)}/
    cd {shlex.quote(self.dir)} && {apps.shown(self.sftp_args or ["sftp"], self.dir)}
    ticrypt tunnel open {VM_NAME} --port {self.web_port}
    ticrypt tunnel close {self.tunnel_id or "ID"}
    ticrypt open        # the browser page (key file {self.deployment.path(USER + '.key')},
                        # user {USER}); --print: only print its one-time URL

Logs and audit logs are in {self.dir}.""")


class NetnsLab(_Console):
    """``ticrypt-lab --netns``: the deployment of test_isolation_system, to
    explore by hand."""

    def __init__(self, reactor: Any, workdir: str, out: TextIO = sys.stdout):
        super().__init__(reactor, workdir, out)
        self.spaces = netns.Namespaces("tcl")
        self.deployment: netns.NetnsDeployment | None = None

    async def start_in(self, role: str, plugin: str, config: str) -> daemons.Daemon:
        self.say(f"    [{role}] $ twistd -n {plugin} --config {os.path.basename(config)}")
        _, echo = self._log(f"{plugin}-{role}")
        return await self._ready(netns.spawn_in(self.reactor, self.spaces, role, plugin, config,
                                                echo=echo), plugin, f"the logs in {self.dir}")

    async def helper(self, role: str, args: list[str]) -> daemons.Daemon:
        self.say(f"    [{role}] $ python -m ticrypt.lab.netns {' '.join(args)}")
        _, echo = self._log(f"helper-{role}")
        return await self._ready(netns.helper_in(self.reactor, self.spaces, role, args,
                                                 echo=echo), role, f"the logs in {self.dir}")

    async def run_in(self, role: str | None, args: list[str]) -> tuple[int, str, str]:
        argv = [daemons.script_path(args[0]), *args[1:]]
        self.say(f"    [{role or 'here'}] $ {' '.join(shlex.quote(a) for a in args)}")
        return await daemons.run_command(self.reactor, self.spaces.exec(role, argv)
                                         if role else argv, timeout=60, cwd=self.dir)

    async def main(self) -> None:
        # Ctrl-C from now on ends the wait below instead of the reactor, so
        # the daemons are stopped and the namespaces removed in every case
        stopped = _until_signal(self.reactor)
        pieces = {"vmc firewall": netns.vmc_firewall_missing(),
                  "VM host isolation": netns.vmhost_isolation_missing(),
                  "allowedlist": netns.allowedlist_missing()}
        self.say(f"[1] Network namespaces {self.spaces.name('*')} (10.77.0.0/16)")
        self.spaces.create()
        for role in netns.ROLES:
            self.say(f"      {self.spaces.name(role)}")
        self.say("[2] Every role in its namespace")
        for piece, why in pieces.items():
            if why:
                self.say(f"      without the {piece}: {why}")
        dep = netns.NetnsDeployment(
            self.reactor, self.spaces,
            Deployment(self.dir, netns.NetnsDeployment.addresses(), comment=PROG + " --netns"),
            self.start_in, self.run_in, self.helper,
            vmc_firewall=pieces["vmc firewall"] is None,
            vmhost_isolation=pieces["VM host isolation"] is None,
            allowedlist=pieces["allowedlist"] is None)
        self.deployment = dep
        await dep.start()
        if not stopped.called:
            self.instructions(dep)
        await stopped
        self.say(f"\n{PROG}: stopping")

    def instructions(self, dep: netns.NetnsDeployment) -> None:
        ns = self.spaces.name
        ips = {"user": netns.USER_IP, "backend": netns.BACKEND_IP,
               "vmhost": f"{netns.VMHOST_IP} / {netns.VMHOST_VM_IP}",
               "vm1": netns.VM_IPS[1], "vm2": netns.VM_IPS[2], "license": netns.LICENSE_IP,
               "outside": netns.OUTSIDE_IP, netns.ROUTER: "10.77.x.1"}
        rows = "\n".join(f"    {role:8} {ips[role]:24} ip netns exec {ns(role)} bash"
                         for role in netns.ROLES)
        self.say(f"""
The isolated deployment is running (Ctrl-C stops it and removes the namespaces).
Enter a namespace from another terminal as root:

{rows}

In the user namespace (ip netns exec {ns('user')} bash):

    export TICRYPT_CLIENT_CONFIG={shlex.quote(dep.client_ini)}
    ticrypt vm list
    ticrypt exec vm1 -- ip addr
    ticrypt tunnel open vm1 --port {netns.APP_PORT}     # then curl the local port it prints
    ticrypt allowlist add {netns.LICENSE_NAME} --port {netns.LICENSE_PORTS[0]}

In a VM (ip netns exec {ns('vm1')} bash):

    dig @{netns.BACKEND_IP} {netns.LICENSE_NAME}
    {sys.executable} -m ticrypt.lab.netns sweep --ports 1-1024 {netns.VM_IPS[2]} {netns.OUTSIDE_IP}

Rules: nft list ruleset (in any namespace).  Logs and audit logs: {self.dir}""")

    async def stop_all(self) -> None:
        for proc in reversed(self.procs):
            await proc.stop()
        self.procs.clear()
        self.spaces.remove()
        self._close_logs()


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
    parser.add_argument("--netns", action="store_true",
                        help="the isolated deployment in network namespaces (root): user, "
                             "backend, VM host, two VMs, license server, outside host; runs "
                             "until Ctrl-C, then removes everything")
    args = parser.parse_args(argv)
    if args.netns:
        why = netns.netns_missing()
        if why:
            parser.exit(2, f"{PROG}: --netns {why}\n")

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

    made: list[NetnsLab] = []

    async def go_netns(reactor: Any) -> None:
        lab = NetnsLab(reactor, workdir)
        made.append(lab)
        try:
            await lab.main()
        except (LabError, DeployError, netns.NetnsError, OSError) as e:
            lab.say(f"\n{PROG}: {e}")
            status["code"] = 1
        finally:
            await lab.stop_all()

    async def go(reactor: Any) -> None:
        if args.netns:
            return await go_netns(reactor)
        lab = Lab(reactor, workdir)
        try:
            await lab.main(args.keep)
            lab.say(f"\n{PROG}: all steps passed")
        except (LabError, DeployError, identity.KeyFileError, OSError) as e:
            lab.say(f"\n{PROG}: {e}")
            status["code"] = 1
            await lab.stop_all()

    try:
        _react(go)
    finally:
        for lab in made:  # whatever ended the reactor, no namespace is left
            lab.spaces.remove()
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
