"""The ``ticrypt`` console script end to end against a real ticrypt-rest."""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SynchronousTestCase, TestCase

from test.daemon import daemon_env, run_command
from test.restfixture import RestEnv, script, start_rest
from ticrypt import identity, tlsutil
from ticrypt.frontend import cli


def write_client_config(env: RestEnv, user: str, ca_file: str | None = None) -> str:
    directory = os.path.join(env.dir, f"client-{user}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, "client.ini")
    with open(path, "w") as f:
        f.write(f"[client]\nrest_url = {env.url}\nca_file = {ca_file or env.ca_file}\n"
                f"key_file = id_ed25519\nuser = {user}\nstate_dir = state\n")
    return path


async def ticrypt(config: str, *args: str, **extra_env: str) -> tuple[int, str, str]:
    env = daemon_env()
    env.pop("TICRYPT_PASSPHRASE", None)
    env.update(extra_env)
    return await run_command([script("ticrypt"), "--config", config, *args], env=env)


class CliEndToEndTests(TestCase):
    timeout = 180

    def one_line(self, err: str, prefix: str) -> None:
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith(prefix), err)

    async def test_keygen_login_whoami_vms_logout(self) -> None:
        env = await start_rest(self)
        config = write_client_config(env, "bob")
        key_file = os.path.join(os.path.dirname(config), "id_ed25519")

        code, out, err = await ticrypt(config, "keygen", "--passphrase-from-env", "PW",
                                       PW="correct horse")
        self.assertEqual(code, 0, err)
        self.assertEqual(stat.S_IMODE(os.stat(key_file).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(key_file + ".pub").st_mode), 0o644)
        code, _, err = await ticrypt(config, "keygen", "--no-passphrase")
        self.assertEqual(code, 1)
        self.one_line(err, f"ticrypt: keygen failed: {key_file} already exists")

        code, out, err = await env.admin("user", "add", "bob", "--public-key",
                                         key_file + ".pub")
        self.assertEqual(code, 0, err)
        code, out, err = await env.admin("--json", "vm", "add", "lab1", "--owner", "bob",
                                         "--host", "127.0.0.1:2201")
        self.assertEqual(code, 0, err)
        vm_id = __import__("json").loads(out)["vm"]["id"]

        code, out, err = await ticrypt(config, "whoami")
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: whoami failed: not logged in; run: ticrypt login")
        code, out, err = await ticrypt(config, "login")
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: cannot read your key: ")
        self.assertIn("TICRYPT_PASSPHRASE", err)
        code, out, err = await ticrypt(config, "login", TICRYPT_PASSPHRASE="wrong")
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: cannot read your key: ")

        code, out, err = await ticrypt(config, "login", TICRYPT_PASSPHRASE="correct horse")
        self.assertEqual(code, 0, err)
        self.assertIn("logged in as bob (user)", out)
        session = os.path.join(os.path.dirname(config), "state", "session.json")
        self.assertEqual(stat.S_IMODE(os.stat(session).st_mode), 0o600)

        code, out, err = await ticrypt(config, "whoami")
        pub = identity.load_public_file(key_file + ".pub")
        self.assertEqual((code, out.strip()), (0, f"bob (user) {identity.public_text(pub)}"))
        code, out, err = await ticrypt(config, "vm", "list")
        self.assertEqual(code, 0, err)
        self.assertIn(vm_id, out)
        self.assertIn("lab1", out)
        code, out, err = await ticrypt(config, "vm", "show", vm_id)
        self.assertEqual(code, 0, err)
        self.assertIn("state:           created", out)
        self.assertIn("public_key:      -", out)
        code, out, err = await ticrypt(config, "vm", "show", "vm-nope")
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: vm show vm-nope failed: no such VM (HTTP 404 no-such-vm)")

        code, out, err = await ticrypt(config, "logout")
        self.assertEqual((code, out.strip()), (0, "logged out bob"), err)
        self.assertFalse(os.path.exists(session))
        code, out, err = await ticrypt(config, "vm", "list")
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: vm list failed: not logged in")

    async def test_untrusted_server_and_bad_config(self) -> None:
        env = await start_rest(self)
        other_ca = os.path.join(env.dir, "other-ca.pem")
        tlsutil.make_ca(other_ca, os.path.join(env.dir, "other-ca.key"))
        config = write_client_config(env, "alice", ca_file=other_ca)
        os.rename(env.admin_key_file, os.path.join(os.path.dirname(config), "id_ed25519"))
        code, out, err = await ticrypt(config, "login")
        self.assertEqual(code, 1)
        self.one_line(err, "ticrypt: login failed: TLS with https://127.0.0.1:")
        with open(config, "a") as f:
            f.write("colour = blue\n")
        code, out, err = await ticrypt(config, "login")
        self.assertEqual(code, 1)
        self.one_line(err, f"ticrypt: cannot load client config: {config}: [client] colour: "
                           "unknown key")
        code, out, err = await ticrypt(config, "vm")
        self.assertEqual(code, 2)


class ParserTests(SynchronousTestCase):
    def test_optional_modules_are_skipped(self) -> None:
        parser = cli.build_parser(("ticrypt.frontend.cmd_account",
                                   "ticrypt.frontend.no_such_module"))
        args = parser.parse_args(["vm", "show", "x"])
        self.assertEqual((args.vm_id, args.func.__name__), ("x", "cmd_vm_show"))
