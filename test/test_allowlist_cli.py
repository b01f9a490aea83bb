"""``ticrypt allowlist add|list|remove`` end to end against a real
ticrypt-rest, both in this process (test/restfixture.py; the console
script's own exit codes are test_frontend_cli's)."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase, TestCase

from test.restfixture import start_rest
from test.test_frontend_cli import ticrypt_here, together, write_client_config
from test.test_rest import audit_lines
from ticrypt.frontend import cli


class AllowlistCliTests(TestCase):
    timeout = 180

    def one_line(self, err: str, prefix: str) -> None:
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith(prefix), err)

    async def test_add_list_remove(self) -> None:
        env = await start_rest(self, in_process=True)
        alice = write_client_config(env, "alice")
        code, _, err = await ticrypt_here(alice, "login")
        self.assertEqual(code, 0, err)

        # three different entries
        tcp, udp_add, wild = await together(
            ticrypt_here(alice, "allowlist", "add", "License.Example.org.", "--port", "27001",
                         "--port", "27000", "--comment", "flexlm"),
            ticrypt_here(alice, "allowlist", "add", "license.example.org", "--port", "1947",
                         "--udp", "--json"),
            ticrypt_here(alice, "allowlist", "add", "*.lic.example.net", "--port", "443"))
        code, out, err = tcp
        self.assertEqual(code, 0, err)
        self.assertRegex(out.strip(), r"^added al-[0-9a-f]{16}: license.example.org tcp "
                                      r"27000,27001$")
        tcp_id = out.split()[1].rstrip(":")
        code, out, err = udp_add
        self.assertEqual(code, 0, err)
        udp = json.loads(out)
        self.assertEqual((udp["protocol"], udp["ports"]), ("udp", [1947]))
        code, out, err = wild
        self.assertEqual(code, 0, err)
        wild_id = out.split()[1].rstrip(":")

        code, out, err = await ticrypt_here(alice, "allowlist", "list")
        self.assertEqual(code, 0, err)
        lines = out.strip().splitlines()
        self.assertEqual(lines[0].split(), ["ID", "NAME", "PROTO", "PORTS", "COMMENT"])
        self.assertEqual([line.split()[1:4] for line in lines[1:]],
                         [["*.lic.example.net", "tcp", "443"],
                          ["license.example.org", "tcp", "27000,27001"],
                          ["license.example.org", "udp", "1947"]])
        self.assertTrue(lines[2].endswith("flexlm"))

        # refusals (they change nothing):
        bad_names = ("bücher.example", "a..example.org", "*.org")
        again, port_zero, *bad_results = await together(
            # the same name and protocol again: one line, rest's reason
            ticrypt_here(alice, "allowlist", "add", "license.example.org", "--port", "1"),
            ticrypt_here(alice, "allowlist", "add", "lic.example.org", "--port", "0"),
            # a bad name is refused before asking rest
            *(ticrypt_here(alice, "allowlist", "add", bad, "--port", "1") for bad in bad_names))
        code, out, err = again
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: allowlist add license.example.org failed: "
                           "license.example.org (tcp) is already allow-listed")
        for bad, (code, _out, err) in zip(bad_names, bad_results, strict=True):
            self.assertEqual(code, 1, bad)
            self.one_line(err, f"ticrypt: allowlist add {bad} failed: ")
        self.assertIn("punycode", bad_results[0][2])
        code, _, err = port_zero
        self.assertEqual(code, 2)
        self.assertIn("port out of range", err)

        # remove by id, by name (every protocol), and what is not there
        by_id, by_name = await together(
            ticrypt_here(alice, "allowlist", "remove", wild_id),
            ticrypt_here(alice, "allowlist", "remove", "LICENSE.example.org"))
        code, out, err = by_id
        self.assertEqual((code, out.strip()), (0, f"removed {wild_id}"), err)
        code, out, err = by_name
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(out.strip().splitlines()), sorted([
            f"removed {tcp_id} (license.example.org tcp)",
            f"removed {udp['id']} (license.example.org udp)"]))
        listed, name_gone, id_gone = await together(
            ticrypt_here(alice, "allowlist", "list", "--json"),
            ticrypt_here(alice, "allowlist", "remove", "license.example.org"),
            ticrypt_here(alice, "allowlist", "remove", wild_id))
        code, out, err = listed
        self.assertEqual((code, json.loads(out)), (0, {"entries": []}), err)
        code, out, err = name_gone
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: allowlist remove license.example.org failed: "
                           "no entry for license.example.org")
        code, out, err = id_gone
        self.assertEqual(code, 1)
        self.one_line(err, f"ticrypt: allowlist remove {wild_id} failed: no allow-list entry "
                           f"{wild_id} (HTTP 404 no-such-entry)")
        self.assertEqual([e["event"] for e in audit_lines(env) if e["event"].startswith("allowlist")],
                         ["allowlist-add"] * 3 + ["allowlist-remove"] * 3)

    async def test_not_superadmin(self) -> None:
        env = await start_rest(self, in_process=True)
        _, bob_pub = env.new_user_key("bob")
        code, _, err = env.admin_here("user", "add", "bob", "--public-key", bob_pub)
        self.assertEqual(code, 0, err)
        bob = write_client_config(env, "bob")
        code, _, err = await ticrypt_here(bob, "login")
        self.assertEqual(code, 0, err)
        commands = (("add", "lic.example.org", "--port", "1"), ("list",),
                    ("remove", "al-0000000000000000"))
        results = await together(*(ticrypt_here(bob, "allowlist", *args) for args in commands))
        for args, (code, _out, err) in zip(commands, results, strict=True):
            self.assertEqual(code, 1, args)
            self.one_line(err, f"ticrypt: allowlist {' '.join(args[:2])}")
            self.assertIn("this needs the superadmin role (HTTP 403 forbidden)", err)


class ParserTests(SynchronousTestCase):
    def test_parser(self) -> None:
        args = cli.build_parser().parse_args(
            ["allowlist", "add", "lic.example.org", "--port", "1", "--port", "2", "--udp"])
        self.assertEqual((args.name, args.ports, args.udp, args.comment, args.func.__name__),
                         ("lic.example.org", [1, 2], True, "", "cmd_add"))
        args = cli.build_parser().parse_args(["allowlist", "remove", "x"])
        self.assertEqual((args.entry, args.func.__name__), ("x", "cmd_remove"))
