"""A start-up failure is one line and a non-zero exit, for every role
(CONVENTIONS.md, "Lessons"): real ``twistd -n ticrypt-<role>`` processes with
a bad key, a port out of range, a port already in use and a world-readable
TLS private key; then the same machinery in process.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Any

from twisted.internet import defer, endpoints, protocol, task
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from test import proxyfixture as pf
from test.daemon import kill_if_alive, run_command, twistd_path
from test.restfixture import RestEnv, make_rest_dir, start_rest
from test.vmcfixture import write_vmc_config
from ticrypt import tlsutil
from ticrypt.config import Key, Schema, ServerEndpoint, load_config
from ticrypt.service import (
    ListenerService,
    RoleService,
    StartupError,
    StartupFailed,
    exit_failed,
)

#: a refused start must end by itself well before this (then it is killed)
DEADLINE = 60.0

#: a log line below error level: twistd's banner ("twistd ... starting up"),
#: a port's "Factory starting on 8444" ("[-]": legacy log.msg), a listener that
#: did come up, a warning about the config; none of them is about the failure
QUIET_LINE = re.compile(r"^\S+ \[(-|[^\]]*#(debug|info|warn))\] ")


def _kill_from_pidfile(pidfile: str) -> None:
    """Cleanup for a daemonised twistd that did not end as it should."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return
    kill_if_alive(pid)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class TwistdRefusesTests(TestCase):
    timeout = 4 * DEADLINE

    async def refused(self, role: str, config: str) -> list[str]:
        """Run the role on ``config``; assert it exits 1 by itself without a
        traceback; return its non-empty output lines (stdout and stderr)."""
        code, out, err = await run_command(
            [twistd_path(), "-n", "--pidfile=", f"ticrypt-{role}", "--config", config],
            timeout=DEADLINE)
        text = out + err
        self.assertNotEqual(code, 128 + signal.SIGKILL,
                            f"ticrypt-{role} still ran after {DEADLINE}s:\n{text}")
        self.assertEqual(code, 1, text)
        self.assertNotIn("Traceback", text)
        self.assertNotIn("TICRYPT-READY", text)
        return [line for line in text.splitlines() if line.strip()]

    async def refused_daemon(self, role: str, config: str) -> list[str]:
        """Run the role as a daemon (no -n) on ``config``: twistd's parent
        must hear of the failure and exit 1 (it waits on a pipe for the
        daemon's word), and no pid file is left; returns the daemon's log
        lines."""
        d = os.path.dirname(config)
        pidfile, logfile = (os.path.join(d, n) for n in ("twistd.pid", "twistd.log"))
        self.addCleanup(_kill_from_pidfile, pidfile)
        code, out, err = await run_command(
            [twistd_path(), f"--pidfile={pidfile}", f"--logfile={logfile}", f"ticrypt-{role}",
             "--config", config], timeout=DEADLINE)
        self.assertEqual(code, 1, out + err)
        # twistd's parent shows the first 100 bytes; the log has the line
        self.assertIn("An error has occurred: b'ticrypt.service.StartupFailed: "
                      f"ticrypt-{role}: ", err)
        # twistd's daemon writes its word to the parent, *then* removes the
        # pid file: the parent may exit first (bounded wait, no sleep)
        for _ in range(200):
            if not os.path.exists(pidfile):
                break
            await task.deferLater(_reactor(), 0.05, lambda: None)
        self.assertFalse(os.path.exists(pidfile), "pid file left behind")
        with open(logfile) as f:
            return [line for line in f.read().splitlines() if line.strip()]

    def assertOneLine(self, lines: list[str], role: str, config: str, section: str,
                      key: str, fragment: str) -> None:
        """Exactly one line, naming the role, file, section and key (a config
        error: twistd has printed nothing else, not even its usage text)."""
        self.assertEqual(len(lines), 1, "\n".join(lines))
        self.assertTrue(lines[0].startswith(f"ticrypt-{role}: {config}: [{section}] {key}: "),
                        lines[0])
        self.assertIn(fragment, lines[0])

    def assertOneLogLine(self, lines: list[str], role: str, config: str, section: str,
                         key: str, fragment: str) -> None:
        """Exactly one line at error level or above, or outside the log (a
        bind fails after twistd started logging), naming role, file, section
        and key."""
        ours = [line for line in lines if not QUIET_LINE.match(line)]
        self.assertEqual(len(ours), 1, "\n".join(lines))
        self.assertIn("#critical] ", ours[0])
        self.assertIn(f"ticrypt-{role}: {config}: [{section}] {key}: {fragment}", ours[0])

    def port_in_use(self) -> int:
        port = _reactor().listenTCP(0, protocol.ServerFactory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    # -- ticrypt-rest -----------------------------------------------------------

    def rest_dir(self, **overrides: str) -> RestEnv:
        return make_rest_dir(os.path.abspath(self.mktemp()), overrides=overrides)

    async def test_rest_unknown_key(self) -> None:
        env = self.rest_dir(listne="tcp:0")
        lines = await self.refused("rest", env.config_path)
        self.assertOneLine(lines, "rest", env.config_path, "rest", "listne", "unknown key")

    async def test_rest_port_out_of_range(self) -> None:
        env = await start_rest(self, copy=True, start=False)  # initialised: only listen is wrong
        env.write_config(listen=tlsutil.server_endpoint(70000, env.server_pem))
        lines = await self.refused("rest", env.config_path)
        self.assertOneLine(lines, "rest", env.config_path, "rest", "listen",
                           "port 70000 is not in 0..65535")

    async def test_rest_port_in_use(self) -> None:
        env = await start_rest(self, copy=True, start=False)  # initialised: only the bind fails
        port = self.port_in_use()
        env.write_config(listen=tlsutil.server_endpoint(port, env.server_pem))
        lines = await self.refused("rest", env.config_path)
        self.assertOneLogLine(lines, "rest", env.config_path, "rest", "listen",
                              f"cannot listen on 127.0.0.1:{port}: address already in use")

    async def test_rest_broken_database(self) -> None:
        env = await start_rest(self, copy=True, start=False)  # initialised: then the file is ruined
        with open(env.database, "r+b") as f:
            f.write(b"this is not an SQLite database" * 10)
        lines = await self.refused("rest", env.config_path)
        self.assertOneLogLine(lines, "rest", env.config_path, "rest", "database",
                              env.database)

    async def test_rest_port_in_use_daemon_mode(self) -> None:
        # without -n, twistd's parent waits on a pipe for the daemon's word:
        # it must get it (a plain SystemExit left it waiting for ever)
        env = await start_rest(self, copy=True, start=False)
        port = self.port_in_use()
        env.write_config(listen=tlsutil.server_endpoint(port, env.server_pem))
        lines = await self.refused_daemon("rest", env.config_path)
        self.assertOneLogLine(lines, "rest", env.config_path, "rest", "listen",
                              f"cannot listen on 127.0.0.1:{port}: address already in use")

    async def test_rest_readable_tls_key(self) -> None:
        env = await start_rest(self, copy=True, start=False)
        os.chmod(env.server_pem, 0o644)
        lines = await self.refused("rest", env.config_path)
        self.assertOneLine(lines, "rest", env.config_path, "rest", "listen",
                           "readable by group or others")

    # -- ticrypt-proxy ------------------------------------------------------------

    def proxy_config(self, listen_port: int = 0, status_listen: str = "off",
                     pem_mode: int = 0o600, **limits: str) -> str:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        _, pem = pf.make_tls(d)
        os.chmod(pem, pem_mode)
        return pf.write_proxy_config(d, pf.Backend(d),
                                     listen=tlsutil.server_endpoint(listen_port, pem),
                                     status_listen=status_listen, **limits)

    async def test_proxy_unknown_key(self) -> None:
        config = self.proxy_config(max_pears="1")
        lines = await self.refused("proxy", config)
        self.assertOneLine(lines, "proxy", config, "limits", "max_pears", "unknown key")

    async def test_proxy_port_out_of_range(self) -> None:
        config = self.proxy_config(70000)
        lines = await self.refused("proxy", config)
        self.assertOneLine(lines, "proxy", config, "proxy", "listen", "not in 0..65535")

    async def test_proxy_port_in_use(self) -> None:
        port = self.port_in_use()
        config = self.proxy_config(port)
        lines = await self.refused("proxy", config)
        self.assertOneLogLine(lines, "proxy", config, "proxy", "listen",
                              f"cannot listen on 127.0.0.1:{port}: address already in use")

    async def test_proxy_status_port_in_use(self) -> None:
        port = self.port_in_use()
        config = self.proxy_config(status_listen=f"tcp:{port}:interface=127.0.0.1")
        lines = await self.refused("proxy", config)
        self.assertOneLogLine(lines, "proxy", config, "proxy", "status_listen",
                              f"cannot listen on 127.0.0.1:{port}: address already in use")

    async def test_proxy_readable_tls_key(self) -> None:
        config = self.proxy_config(pem_mode=0o644)
        lines = await self.refused("proxy", config)
        self.assertOneLine(lines, "proxy", config, "proxy", "listen",
                           "readable by group or others")

    # -- ticrypt-vmc (no listener; its endpoints are URLs) --------------------------

    def vmc_config(self, **overrides: str) -> str:
        rest = self.rest_dir()
        rest.deployment.addresses.rest_port = 8443
        return write_vmc_config(rest.deployment, "token", **overrides)

    async def test_vmc_unknown_key(self) -> None:
        config = self.vmc_config(pool_sise="2")
        lines = await self.refused("vmc", config)
        self.assertOneLine(lines, "vmc", config, "vmc", "pool_sise", "unknown key")

    async def test_vmc_port_out_of_range(self) -> None:
        config = self.vmc_config(rest_url="https://127.0.0.1:70000")
        lines = await self.refused("vmc", config)
        self.assertOneLine(lines, "vmc", config, "vmc", "rest_url", "https")


    def broken_state_dir(self) -> tuple[str, str]:
        """A vmc config whose state_dir holds a users.json that is not JSON;
        (config, that file)."""
        config = self.vmc_config()
        state = os.path.join(os.path.dirname(config), "vmc-state")
        os.makedirs(state, mode=0o700)
        users = os.path.join(state, "users.json")
        with open(os.open(users, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("not json")
        return config, users

    async def test_vmc_broken_state_dir(self) -> None:
        config, users = self.broken_state_dir()
        lines = await self.refused("vmc", config)
        self.assertOneLogLine(lines, "vmc", config, "vmc", "state_dir",
                              f"{users}: unreadable (")

    async def test_vmc_broken_state_dir_daemon_mode(self) -> None:
        # a plain SystemExit left twistd's waiting parent hanging
        config, users = self.broken_state_dir()
        lines = await self.refused_daemon("vmc", config)
        self.assertOneLogLine(lines, "vmc", config, "vmc", "state_dir",
                              f"{users}: unreadable (")


class _Never:
    """A server endpoint whose listen result arrives later (``listen``)."""

    def __init__(self) -> None:
        self.result: defer.Deferred[Any] = defer.Deferred()

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        return self.result


class InProcessTests(SynchronousTestCase):
    """ListenerService and RoleService without twistd."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config_path = os.path.join(self.dir, "proxy.ini")
        with open(self.config_path, "w") as f:
            f.write("[proxy]\nlisten = tcp:0\n")
        self.cfg = load_config(self.config_path,
                               Schema({"proxy": {"listen": Key(ServerEndpoint())}}))
        self.events: list[dict[str, Any]] = []

    def role(self, reactor: Any = None) -> RoleService:
        role = RoleService("proxy", self.cfg, reactor)
        role.log = Logger(observer=self.events.append)
        return role

    def busy_port(self) -> int:
        port = _reactor().listenTCP(0, protocol.ServerFactory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def test_listener_binds_in_privileged_start(self) -> None:
        # before twistd sheds privileges, and before siblings start threads
        reactor = MemoryReactor()
        listener = ListenerService("x", endpoints.serverFromString(reactor, "tcp:8080"),
                                   protocol.Factory(), key=("proxy", "listen"))
        listener.privilegedStartService()
        self.assertEqual(len(reactor.tcpServers), 1)
        listener.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertIsNotNone(listener.port)

    def test_listener_bind_failure(self) -> None:
        port = self.busy_port()
        endpoint = endpoints.serverFromString(_reactor(), f"tcp:{port}:interface=127.0.0.1")
        listener = ListenerService("x", endpoint, protocol.Factory(), key=("proxy", "listen"))
        err = self.assertRaises(StartupError, listener.privilegedStartService)
        self.assertEqual((err.section, err.key), ("proxy", "listen"))
        self.assertEqual(err.message,
                         f"cannot listen on 127.0.0.1:{port}: address already in use")

    def test_role_bind_failure_is_one_line_and_exit(self) -> None:
        port = self.busy_port()
        role = self.role()
        endpoint = endpoints.serverFromString(_reactor(), f"tcp:{port}:interface=127.0.0.1")
        ListenerService("proxy", endpoint, protocol.Factory(),
                        key=("proxy", "listen")).setServiceParent(role)
        err = self.assertRaises(StartupFailed, role.privilegedStartService)
        # a SystemExit: Python prints the line (no traceback) and exits 1; an
        # Exception: twistd reports it to its daemon-mode parent first
        self.assertIsInstance(err, SystemExit)
        self.assertIsInstance(err, Exception)
        line = (f"ticrypt-proxy: {self.config_path}: [proxy] listen: "
                f"cannot listen on 127.0.0.1:{port}: address already in use")
        self.assertEqual((err.code, str(err)), (1, line))
        [event] = self.events  # the line is logged; Python prints nothing more
        self.assertEqual((event["log_level"].name, event["line"]), ("critical", line))

    def test_role_later_failure_stops_and_exits_1(self) -> None:
        # a listener that fails after start-up must not leave a daemon
        # running without its port: stop, and exit 1 once shut down
        reactor = MemoryReactor()
        reactor.running = True
        role = self.role(reactor)
        endpoint = _Never()
        listener = ListenerService("proxy", endpoint, protocol.Factory(),
                                   key=("proxy", "listen"))
        listener.setServiceParent(role)
        role.privilegedStartService()
        role.startService()
        self.assertFalse(reactor.hasStopped)
        endpoint.result.errback(OSError("no such device"))
        self.assertTrue(reactor.hasStopped)
        self.assertEqual(reactor.triggers["after"]["shutdown"], [(exit_failed, (), {})])
        [event] = self.events
        self.assertEqual(event["line"], f"ticrypt-proxy: {self.config_path}: [proxy] listen: "
                                        "cannot listen: no such device")
