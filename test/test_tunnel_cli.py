"""``ticrypt tunnel``'s own pieces in memory: --port parsing, the [connect]
section of client.ini and the one-line failure when connect is not running.
(The whole command runs against real daemons in test_tunnel_e2e.)"""

from __future__ import annotations

import os

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from ticrypt.frontend import clientconfig
from ticrypt.frontend.cli import build_parser
from ticrypt.frontend.cmd_tunnel import ConnectApi, parse_ports
from ticrypt.frontend.runner import CommandError


class PortTests(SynchronousTestCase):
    def test_ports(self) -> None:
        self.assertEqual(parse_ports(["8080", "2022:4022", "80:0"]),
                         [(8080, 0), (2022, 4022), (80, 0)])
        self.assertEqual(parse_ports([]), [])

    def test_bad_ports(self) -> None:
        for spec in ("0", "65536", "80:65536", "x", "80:", ":80", "80:90:100", "-1"):
            e = self.assertRaises(CommandError, parse_ports, [spec])
            self.assertIn("expected REMOTE[:LOCAL]", str(e), spec)
        self.assertRaises(CommandError, parse_ports, ["80", "80:81"])

    def test_parser(self) -> None:
        args = build_parser().parse_args(["tunnel", "open", "labvm", "-p", "8080",
                                          "--port", "2022:0"])
        self.assertEqual((args.vm_id, args.port), ("labvm", ["8080", "2022:0"]))
        args = build_parser().parse_args(["tunnel", "close", "t0123"])
        self.assertEqual(args.tunnel_id, "t0123")


class ConnectSectionTests(SynchronousTestCase):
    def write(self, extra: str) -> str:
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "client.ini")
        with open(path, "w") as f:
            f.write("[client]\nrest_url = http://127.0.0.1:1\nuser = alice\n" + extra)
        return path

    def test_defaults_and_token_path(self) -> None:
        path = self.write("")
        cfg = clientconfig.load(path)
        self.assertEqual(cfg.connect.url, "http://127.0.0.1:7480")
        self.assertEqual(cfg.connect_token_file(),
                         os.path.join(os.path.dirname(os.path.abspath(path)), "connect-state",
                                      "api.token"))
        # keygen reads the same file, [connect] included
        self.assertTrue(clientconfig.load_key_file(
            self.write("[connect]\nurl = http://127.0.0.1:9\n")).endswith("id_ed25519"))

    def test_url_must_be_loopback_ip(self) -> None:
        from ticrypt.config import ConfigError

        for url in ("http://localhost:7480", "https://127.0.0.1:7480", "http://10.0.0.1:80"):
            e = self.assertRaises(ConfigError, clientconfig.load,
                                  self.write(f"[connect]\nurl = {url}\n"))
            self.assertEqual((e.section, e.key), ("connect", "url"))

    def test_connect_not_running_is_one_line(self) -> None:
        cfg = clientconfig.load(self.write("[connect]\ntoken_file = nowhere/api.token\n"))
        api = ConnectApi(task.Clock(), cfg)
        f = self.failureResultOf(defer.ensureDeferred(api.call("GET", "/v1/tunnels")),
                                 CommandError)
        self.assertEqual(f.value.what, "cannot use ticrypt-connect")
        self.assertIn("nowhere/api.token: No such file or directory; is it running?",
                      f.value.why)
