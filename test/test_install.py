"""The installed wheel, run the way operators run it.

The working tree is copied, built with ``pip wheel`` and installed with pip
into a scratch venv.  Everything is then run from that venv, in a temporary
directory, with no PYTHONPATH: ``twistd`` and its plugin list, the console
scripts, rest and proxy started from the command lines of the systemd units,
and ``systemd-analyze verify`` on those units.

The scratch venv has no network, so it borrows its dependencies from the venv
that runs the tests: one ``.pth`` line names that venv's site-packages.  A
plain path line does not process the ``.pth`` files found there, so the
editable install that points at the checkout stays inert.  Twisted's
``twistd`` launcher is copied into the scratch venv with the scratch
interpreter on its ``#!`` line, which is what pip writes when it installs
Twisted there.

The wheel is built once per test run (about five seconds in all).
"""

from __future__ import annotations

import ast
import concurrent.futures
import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from test.proxyfixture import Backend, get_status, write_proxy_config
from test.restfixture import make_rest_dir
from ticrypt import closecodes as cc
from ticrypt.channel.errors import MESSAGES
from ticrypt.connect.page import CSP, VENDOR
from ticrypt.frontend.client import RestClient
from ticrypt.lab import daemons
from ticrypt.lab.daemons import ROOT

#: The page's npm dependencies, of which the wheel carries what connect serves.
WEB_MODULES = "ticrypt/connect/web/node_modules"

#: Where the units expect the venv and the configs (etc/systemd/*.service).
UNIT_PREFIX = "/opt/ticrypt"
UNIT_CONFIG_DIR = "/etc/ticrypt"

#: Roles that run users' processes and so are not sandboxed (see the unit).
UNSANDBOXED = {"ticrypt-vmc"}
#: Agents a user runs in their own session: no system unit.
USER_AGENTS = {"ticrypt-connect"}

#: What the tree copy leaves out: build output and local state, not sources.
_TOP_LEVEL_IGNORED = {".git", ".venv", "build", "dist", ".mypy_cache", ".ruff_cache"}


def plugin_roles(root: str = ROOT) -> dict[str, str]:
    """``{tapname: module}`` of every ServiceMaker in twisted/plugins/*.py."""
    roles: dict[str, str] = {}
    plugin_dir = os.path.join(root, "twisted", "plugins")
    for name in sorted(os.listdir(plugin_dir)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(plugin_dir, name)) as f:
            tree = ast.parse(f.read(), name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(
                    node.func, "id", getattr(node.func, "attr", None)) == "ServiceMaker":
                args = [str(a.value) for a in node.args if isinstance(a, ast.Constant)]
                kwargs = {k.arg: str(k.value.value) for k in node.keywords
                          if isinstance(k.value, ast.Constant)}
                tapname = args[3] if len(args) > 3 else kwargs["tapname"]
                module = args[1] if len(args) > 1 else kwargs["module"]
                roles[tapname] = module
    return roles


def console_scripts(root: str = ROOT) -> list[str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(root, "setup.cfg"))
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return sorted(line.split("=", 1)[0].strip() for line in lines if line.strip())


def clean_env(home: str, bin_dir: str | None = None) -> dict[str, str]:
    """This process's environment without anything that points Python or
    ticrypt at the checkout or the dev venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
                        "VIRTUAL_ENV") and not k.startswith("TICRYPT_")}
    env["PYTHONNOUSERSITE"] = "1"
    env["HOME"] = home
    env["PATH"] = os.pathsep.join(([bin_dir] if bin_dir else [])
                                  + ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"])
    return env


def _run(args: list[str], env: dict[str, str], cwd: str,
         timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _checked(what: str, args: list[str], env: dict[str, str], cwd: str) -> str:
    proc = _run(args, env, cwd)
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}): {shlex.join(args)}\n"
                             f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


def _ignore_for_copy(directory: str, names: list[str]) -> set[str]:
    ignored = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))
               or n == "dropin.cache" or n.startswith("_trial_temp")}
    if os.path.samefile(directory, ROOT):
        ignored |= _TOP_LEVEL_IGNORED & set(names)
    return ignored


@attrs.frozen
class Install:
    """The built wheel and the scratch venv it is installed in."""

    tmp: Any  # the TemporaryDirectory; removed when the test process exits
    src: str  # the tree copy the wheel was built from
    wheel: str
    prefix: str  # the scratch venv
    site: str  # its site-packages
    home: str  # HOME and working directory of every command run here

    def bin(self, name: str) -> str:
        return os.path.join(self.prefix, "bin", name)

    def env(self) -> dict[str, str]:
        return clean_env(self.home, os.path.join(self.prefix, "bin"))

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return _run(list(args), self.env(), self.home, timeout)

    def run_many(self, argvs: list[list[str]],
                 timeout: float = 60.0) -> list[subprocess.CompletedProcess[str]]:
        """:meth:`run` for each of ``argvs``, all at once (independent
        commands); the results in the same order."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(lambda argv: self.run(*argv, timeout=timeout), argvs))


def _build() -> Install:
    tmp = tempfile.TemporaryDirectory(prefix="ticrypt-install-")
    base = tmp.name
    src, wheels, prefix, home = (os.path.join(base, n) for n in ("src", "wheels", "venv", "home"))
    os.makedirs(home)
    # A copy, so the build neither writes build/ and *.egg-info into the
    # checkout nor packs stale files left in an old build/.
    shutil.copytree(ROOT, src, ignore=_ignore_for_copy, symlinks=True)
    env = clean_env(home)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _checked("building the wheel (the dev extra provides `wheel`)",
             pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", wheels, src], env, base)
    built = [n for n in os.listdir(wheels) if n.endswith(".whl")]
    assert len(built) == 1, built
    wheel = os.path.join(wheels, built[0])

    _checked("creating the scratch venv",
             [sys.executable, "-m", "venv", "--without-pip", prefix], env, base)
    python = os.path.join(prefix, "bin", "python")
    # Installed before the .pth below exists, so pip sees an empty venv.
    _checked("installing the wheel",
             pip + ["--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
             env, base)
    site = _checked("asking the scratch venv for its site-packages",
                    [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    env, home).strip()
    deps = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    with open(os.path.join(site, "_ticrypt_test_dependencies.pth"), "w") as f:
        f.write("".join(f"{d}\n" for d in deps))
    with open(daemons.twistd_path()) as f:
        launcher = f.read().split("\n", 1)[1]
    twistd = os.path.join(prefix, "bin", "twistd")
    with open(twistd, "w") as f:
        f.write(f"#!{python}\n{launcher}")
    os.chmod(twistd, 0o755)
    return Install(tmp=tmp, src=src, wheel=wheel, prefix=prefix, site=site, home=home)


_installed: Install | None = None
_failure: str | None = None


def installed() -> Install:
    """Build and install once; later calls reuse it (or its failure)."""
    global _installed, _failure
    if _installed is None and _failure is None:
        try:
            _installed = _build()
        except (AssertionError, OSError, subprocess.SubprocessError) as e:
            _failure = str(e)
    if _installed is None:
        raise AssertionError(_failure)
    return _installed


class WheelContentsTests(SynchronousTestCase):
    """The wheel carries the plugins, every file of the package and the
    samples, and nothing from test/ or bench/."""

    def setUp(self) -> None:
        self.inst = installed()
        with zipfile.ZipFile(self.inst.wheel) as z:
            self.names = set(z.namelist())
        version = os.path.basename(self.inst.wheel).split("-")[1]
        self.data = f"ticrypt-{version}.data/data/share/ticrypt/"

    def test_plugins(self) -> None:
        """twisted/plugins/ticrypt_*.py and no twisted/plugins/__init__.py,
        which would hide Twisted's own plugins."""
        plugin_dir = os.path.join(self.inst.src, "twisted", "plugins")
        expected = {f"twisted/plugins/{n}" for n in os.listdir(plugin_dir) if n.endswith(".py")}
        self.assertTrue(expected)
        self.assertEqual({n for n in self.names if n.startswith("twisted/")}, expected)
        self.assertNotIn("twisted/plugins/__init__.py", self.names)
        self.assertNotIn("twisted/__init__.py", self.names)

    def test_every_package_file(self) -> None:
        """Every file under ticrypt/ (code, openapi.json, py.typed, the
        page, any data file added later), and no other; of the page's
        node_modules only the files connect serves (when npm ci put them there)."""
        expected = set()
        vendor = {f"{WEB_MODULES}/{rel}" for rel in VENDOR.values()}
        for directory, dirs, files in os.walk(os.path.join(self.inst.src, "ticrypt")):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                path = os.path.relpath(os.path.join(directory, name), self.inst.src)
                path = path.replace(os.sep, "/")
                if not path.startswith(WEB_MODULES + "/") or path in vendor:
                    expected.add(path)
        self.assertIn("ticrypt/rest/openapi.json", expected)
        self.assertEqual({n for n in self.names if n.startswith("ticrypt/")}, expected)

    def test_samples_and_units(self) -> None:
        """etc/*.ini and etc/systemd/*.service, under <venv>/share/ticrypt."""
        etc = os.path.join(self.inst.src, "etc")
        expected = {f"{self.data}etc/{n}" for n in os.listdir(etc) if n.endswith(".ini")}
        expected |= {f"{self.data}systemd/{n}"
                     for n in os.listdir(os.path.join(etc, "systemd")) if n.endswith(".service")}
        self.assertEqual({n for n in self.names if n.startswith(self.data)}, expected)

    def test_top_level(self) -> None:
        tops = {n.split("/", 1)[0] for n in self.names}
        self.assertEqual({t for t in tops if not t.startswith("ticrypt-")}, {"ticrypt", "twisted"})


class InstalledTests(SynchronousTestCase):
    """twistd and the console scripts, run from the scratch venv."""

    def setUp(self) -> None:
        self.inst = installed()

    def test_checkout_not_on_path(self) -> None:
        """The precondition of every other test here: ticrypt and the plugins
        come from the scratch venv, and the dependencies carry no plugins of
        ours (if they did, twistd would list the roles even without them)."""
        proc = self.inst.run(self.inst.bin("python"), "-c", (
            "import json, sys, ticrypt, twisted.plugins; print(json.dumps("
            "{'path': sys.path, 'ticrypt': ticrypt.__file__,"
            " 'plugins': list(twisted.plugins.__path__)}))"))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        info = json.loads(proc.stdout)
        self.assertTrue(info["ticrypt"].startswith(self.inst.site + os.sep), info["ticrypt"])
        root = os.path.realpath(ROOT)
        self.assertNotIn(root, [os.path.realpath(p or ".") for p in info["path"]])
        ours = os.path.join(self.inst.site, "twisted", "plugins")
        self.assertIn(ours, info["plugins"])
        self.assertTrue(os.path.isdir(ours), "the wheel installed no twisted/plugins")
        for directory in info["plugins"]:
            if directory != ours and os.path.isdir(directory):
                self.assertEqual([n for n in os.listdir(directory) if n.startswith("ticrypt")],
                                 [], f"{directory} already holds ticrypt plugins")

    def test_twistd_lists_every_role(self) -> None:
        """``twistd --help`` lists each ServiceMaker of twisted/plugins/, and
        each role's own --help works (it imports ticrypt.<role>.tap)."""
        roles = plugin_roles()
        self.assertIn("ticrypt-rest", roles)
        proc = self.inst.run(self.inst.bin("twistd"), "--help")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        listed = set(re.findall(r"^\s+(\S+)\s", proc.stdout, re.M))
        self.assertEqual(set(roles) - listed, set(), proc.stdout)
        procs = self.inst.run_many([[self.inst.bin("twistd"), t, "--help"] for t in roles])
        for tapname, proc in zip(roles, procs, strict=True):
            self.assertEqual(proc.returncode, 0, f"{tapname}: {proc.stdout}{proc.stderr}")
            self.assertIn("--config", proc.stdout, tapname)

    def test_plugin_files_import_nothing_of_ours(self) -> None:
        """A plugin file imports only Twisted; twistd imports the role's tap
        module when that role is run, not while listing plugins."""
        roles = plugin_roles()
        plugin_dir = os.path.join(ROOT, "twisted", "plugins")
        for name in os.listdir(plugin_dir):
            if name.endswith(".py"):
                with open(os.path.join(plugin_dir, name)) as f:
                    tree = ast.parse(f.read(), name)
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import | ast.ImportFrom):
                        modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                                   else [node.module or ""])
                        for module in modules:
                            self.assertTrue(module.split(".")[0] in ("twisted", "__future__"),
                                            f"{name} imports {module}")
        modules = sorted(n[:-3] for n in os.listdir(os.path.join(self.inst.site, "twisted",
                                                                  "plugins"))
                         if n.startswith("ticrypt_") and n.endswith(".py"))
        script = (
            "import importlib, importlib.util, json, sys\n"
            f"for m in {modules!r}: importlib.import_module('twisted.plugins.' + m)\n"
            "ours = sorted(k for k in sys.modules if k.split('.')[0] == 'ticrypt')\n"
            f"taps = {{t: importlib.util.find_spec(t).origin for t in {sorted(roles.values())!r}}}\n"
            "print(json.dumps({'imported': ours, 'taps': taps}))\n")
        proc = self.inst.run(self.inst.bin("python"), "-c", script)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        info = json.loads(proc.stdout)
        self.assertEqual(info["imported"], [])
        for module, origin in info["taps"].items():
            self.assertTrue(origin.startswith(self.inst.site + os.sep), (module, origin))

    def test_console_scripts(self) -> None:
        """Each console script exists, runs the scratch interpreter, and its
        --help works from the installed package."""
        scripts = console_scripts()
        self.assertEqual(set(scripts) & {"ticrypt", "ticrypt-admin", "ticrypt-lab"},
                         {"ticrypt", "ticrypt-admin", "ticrypt-lab"})
        for name in scripts:
            with open(self.inst.bin(name)) as f:
                self.assertEqual(f.readline().strip(), "#!" + self.inst.bin("python"), name)
        procs = self.inst.run_many([[self.inst.bin(name), "--help"] for name in scripts])
        for name, proc in zip(scripts, procs, strict=True):
            self.assertEqual(proc.returncode, 0, f"{name}: {proc.stdout}{proc.stderr}")
            self.assertIn("usage", proc.stdout.lower(), name)


def unit_settings(path: str) -> dict[str, list[str]]:
    """``{key: [values]}`` of a unit's [Service] section."""
    settings: dict[str, list[str]] = {}
    section = None
    with open(path) as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]":
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
    return settings


def server_roles() -> dict[str, str]:
    """:func:`plugin_roles` but the :data:`USER_AGENTS` (the roles with a unit)."""
    return {t: m for t, m in plugin_roles().items() if t not in USER_AGENTS}


def unit_command(inst: Install, tapname: str, config: str) -> list[str]:
    """The unit's ExecStart with the scratch venv for /opt/ticrypt and
    ``config`` for its config file."""
    unit = os.path.join(inst.prefix, "share", "ticrypt", "systemd", f"{tapname}.service")
    (command,) = unit_settings(unit)["ExecStart"]
    role = tapname.removeprefix("ticrypt-")
    argv = shlex.split(command)
    assert argv[0] == f"{UNIT_PREFIX}/bin/twistd", argv
    assert f"{UNIT_CONFIG_DIR}/{role}.ini" in argv, argv
    return [inst.bin("twistd")] + [config if a == f"{UNIT_CONFIG_DIR}/{role}.ini" else a
                                   for a in argv[1:]]


class SystemdUnitTests(SynchronousTestCase):
    """etc/systemd/: one unit per role, valid for systemd, sandboxed where
    the role allows it, and their command lines work."""

    def setUp(self) -> None:
        self.inst = installed()
        self.units = os.path.join(self.inst.prefix, "share", "ticrypt", "systemd")

    def test_one_unit_per_role(self) -> None:
        expected = {f"{tapname}.service" for tapname in server_roles()}
        self.assertEqual(set(os.listdir(os.path.join(ROOT, "etc", "systemd"))), expected)
        self.assertEqual(set(os.listdir(self.units)), expected)

    def test_systemd_analyze_verify(self) -> None:
        """The installed units pass ``systemd-analyze verify`` once
        /opt/ticrypt/bin/twistd names the scratch venv's twistd (verify checks
        that the binary exists).  verify exits 0 on unknown keys and bad
        values, so any line about the unit is a failure too."""
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise self.skipTest("systemd-analyze is not installed")
        work = tempfile.mkdtemp(dir=self.inst.home)
        for name in sorted(os.listdir(self.units)):
            with open(os.path.join(self.units, name)) as f:
                text = f.read()
            self.assertIn(f"{UNIT_PREFIX}/bin/twistd ", text)
            path = os.path.join(work, name)
            with open(path, "w") as f:
                f.write(text.replace(f"{UNIT_PREFIX}/bin/twistd ", self.inst.bin("twistd") + " "))
            proc = self.inst.run(tool, "verify", path)
            complaints = [line for line in (proc.stdout + proc.stderr).splitlines()
                          if name in line]
            self.assertEqual((proc.returncode, complaints), (0, []), name)
        # The check is live: a unit whose twistd does not exist fails it.
        broken = os.path.join(work, "ticrypt-broken.service")
        with open(broken, "w") as f:
            f.write(text.replace(f"{UNIT_PREFIX}/bin/twistd ", f"{work}/no-such-twistd "))
        self.assertNotEqual(self.inst.run(tool, "verify", broken).returncode, 0)

    def test_sandbox_per_role(self) -> None:
        """rest and proxy run unprivileged in a read-only system; vmc runs as
        root with a delegated cgroup subtree and no sandbox, because the
        sandbox would bind every user process it starts."""
        for tapname in server_roles():
            s = unit_settings(os.path.join(self.units, f"{tapname}.service"))
            self.assertEqual(s["Restart"], ["on-failure"], tapname)
            self.assertEqual(s["Type"], ["exec"], tapname)
            if tapname in UNSANDBOXED:
                self.assertEqual(s["User"], ["root"], tapname)
                self.assertEqual(s["Delegate"], ["yes"], tapname)
                self.assertEqual(s["KillMode"], ["control-group"], tapname)
                for key in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome",
                            "RestrictNamespaces", "SystemCallFilter"):
                    self.assertNotIn(key, s, tapname)
            else:
                self.assertNotIn(s["User"][0], ("", "root"), tapname)
                self.assertEqual(s["NoNewPrivileges"], ["yes"], tapname)
                self.assertEqual(s["ProtectSystem"], ["strict"], tapname)
                self.assertEqual(s["PrivateTmp"], ["yes"], tapname)
                self.assertEqual(s["CapabilityBoundingSet"], [""], tapname)
            # every role keeps state across restarts (rest's database, the
            # proxy's ticket ledger, vmc's keys): under ProtectSystem=strict
            # only its StateDirectory is writable
            self.assertEqual(s["StateDirectory"], [f"ticrypt/{tapname.removeprefix('ticrypt-')}"],
                             tapname)

    def test_unit_commands_parse(self) -> None:
        """Every unit's ExecStart, pointed at the installed sample config,
        reaches the role's own option parser (--help stops before the config
        is loaded)."""
        samples = os.path.join(self.inst.prefix, "share", "ticrypt", "etc")
        argvs = {tapname: unit_command(self.inst, tapname, os.path.join(
                     samples, f"{tapname.removeprefix('ticrypt-')}.ini"))
                 for tapname in server_roles()}
        procs = self.inst.run_many([[*argv, "--help"] for argv in argvs.values()])
        for (tapname, argv), proc in zip(argvs.items(), procs, strict=True):
            role = tapname.removeprefix("ticrypt-")
            self.assertEqual(proc.returncode, 0, f"{shlex.join(argv)}\n{proc.stdout}{proc.stderr}")
            self.assertIn(f"{role} ini file", proc.stdout)


class InstalledDaemonTests(TestCase):
    """rest and proxy start from the installed wheel, with the command
    line of their systemd unit, and answer."""

    def setUp(self) -> None:
        self.inst = installed()

    def spawn(self, tapname: str, config: str) -> daemons.Daemon:
        argv = unit_command(self.inst, tapname, config)
        proc = daemons.Daemon(tapname, reactor, 30.0)
        reactor.spawnProcess(proc, argv[0], argv, env=self.inst.env(),  # type: ignore
                             path=self.inst.home)
        self.addCleanup(proc.stop)
        return proc

    async def test_rest(self) -> None:
        rest = make_rest_dir(os.path.abspath(self.mktemp()))
        code, out, err = await daemons.run_command(
            reactor, [self.inst.bin("ticrypt-admin"), "--config", rest.config_path, "init",
                      "--superadmin", rest.admin_name, "--public-key",
                      rest.admin_pub_file],
            env=self.inst.env(), cwd=self.inst.home, timeout=30)
        self.assertEqual(code, 0, out + err)
        proc = self.spawn("ticrypt-rest", rest.config_path)
        await proc.ready
        host, port = proc.address("https")
        client = RestClient(reactor, f"https://{host}:{port}", rest.ca_file)
        session = await client.login(rest.admin_name, rest.admin_key)
        self.assertEqual(session["user"], rest.admin_name)

    async def test_connect_serves_the_page(self) -> None:
        """The installed connect serves the page, xterm.js, the channel's
        error table and the close codes from the installed package, not from
        the checkout."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "connect.ini")
        with open(config, "w") as f:
            f.write("[connect]\nlisten = tcp:0:interface=127.0.0.1\nstate_dir = state\n"
                    "token_file = state/api.token\naudit_log = audit.log\n"
                    "[page]\nrest_url = http://127.0.0.1:9\n")
        proc = daemons.Daemon("ticrypt-connect", reactor, 30.0)
        argv = [self.inst.bin("twistd"), "-n", "ticrypt-connect", "--config", config]
        reactor.spawnProcess(proc, argv[0], argv, env=self.inst.env(),  # type: ignore
                             path=self.inst.home)
        self.addCleanup(proc.stop)
        await proc.ready
        port = proc.address("api")[1]
        self.assertTrue(str((proc.ready_info or {}).get("page_url", "")).startswith(
            f"http://127.0.0.1:{port}/#link="))
        agent = Agent(reactor)
        for path, source in (("/", "ticrypt/connect/web/index.html"),
                             ("/vendor/xterm.js", f"{WEB_MODULES}/{VENDOR['xterm.js']}")):
            if not os.path.exists(os.path.join(self.inst.src, source)):
                continue  # built without npm ci: nothing to serve (404 not-installed)
            response = await agent.request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
            body = await readBody(response)
            self.assertEqual(response.code, 200, path)
            self.assertEqual(response.headers.getRawHeaders("Content-Security-Policy"), [CSP])
            with open(os.path.join(self.inst.src, source), "rb") as f:
                self.assertEqual(body, f.read(), path)
        # the channel's error table and the close codes come from the installed
        # Python (channelerror.js and closes.js import them)
        tables = {"channelerrors.json": MESSAGES,
                  "closecodes.json": {"codes": {str(c.code): [c.name, c.human] for c in cc.ALL},
                                      "reasons": cc.REASON_HUMAN}}
        for name, table in tables.items():
            response = await agent.request(
                b"GET", f"http://127.0.0.1:{port}/app/js/{name}".encode())
            self.assertEqual(response.code, 200, name)
            self.assertEqual(json.loads(await readBody(response)), table)

    async def test_proxy(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = write_proxy_config(directory, Backend(directory))
        proc = self.spawn("ticrypt-proxy", config)
        await proc.ready
        status = await get_status(reactor, proc.address("status")[1])
        self.assertEqual(status, {"vms": {}, "pairs": 0})
